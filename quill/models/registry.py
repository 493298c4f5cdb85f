"""Every model family Quill runs. A family is one file in this package that fills in a
`ModelFamily` (see `quill/weights/family.py`), and its entry here."""
from __future__ import annotations

from quill.models import gemma3, llama, mistral, phi3, qwen2, qwen3, qwen3moe, smollm3
from quill.weights.family import Families

FAMILIES = Families([
    llama.FAMILY,
    mistral.FAMILY,
    qwen2.FAMILY,
    gemma3.FAMILY,
    qwen3.FAMILY,
    smollm3.FAMILY,
    phi3.FAMILY,
    qwen3moe.FAMILY,
])

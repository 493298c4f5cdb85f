"""What every checkpoint reader returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quill.config import ModelConfig


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, Any]  # Hugging Face names and conventions: torch.Tensor, or QuantizedWeight
    path: Path
    format: str  # "gguf" or "safetensors"
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF key/values; config.json for HF

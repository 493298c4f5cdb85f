"""GGUF reader: metadata, config mapping, tensors (dequantized to float for now)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quill.errors import ModelLoadError


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value pairs of a GGUF file as plain Python values (str, int, float, bool, lists)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on bad files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from exc
    return {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}

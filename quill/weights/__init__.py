"""Checkpoint formats: readers and the GGUF writer, the quantized-weight format, and the model hub.

Every reader returns a `Checkpoint`: a `ModelConfig` plus tensors named and laid out exactly as in
Hugging Face `transformers` (so model code has one convention to follow). What a reader needs to
know about a family it is given, as a `Families` registry (`quill.models.registry.FAMILIES`), so
that this package depends on no model code."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from quill.errors import ModelLoadError
from quill.weights.checkpoint import Checkpoint

if TYPE_CHECKING:  # torch is only needed once a checkpoint is actually read
    import torch

    from quill.weights.family import Families


def read_checkpoint(path: str | Path, families: "Families", dtype: "torch.dtype | None" = None, *,
                    keep_quantized: bool = False, defer_unpacking: bool = False) -> Checkpoint:
    """Load a `.gguf` file or a Hugging Face directory (config.json + *.safetensors).

    Float tensors come back as float32, or as `dtype` when given: converting each tensor as it
    is read keeps the peak memory of loading near the size of the final model. With
    `keep_quantized`, GGUF weights in a natively supported format stay quantized; with
    `defer_unpacking` too, GGML blocks come back as `DeferredWeight`s, unpacked when loaded."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_dir():
        from quill.weights.safetensors import load_hf_directory

        return load_hf_directory(path, families, dtype)
    from quill.weights.gguf import load_gguf

    return load_gguf(path, families, dtype, keep_quantized=keep_quantized, defer_unpacking=defer_unpacking)

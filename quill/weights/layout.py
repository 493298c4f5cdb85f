"""Checks of a checkpoint's tensors against the Hugging Face names and shapes its family declares
for its config (`ModelFamily.hf_shapes`).

Readers check their result once, so that a corrupt or mismatched checkpoint fails at
load time with a readable message instead of as a shape error deep inside a forward pass.
"""
from __future__ import annotations

import torch

from quill.errors import ModelLoadError


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise ModelLoadError naming what is missing or misshapen; extra names are fine."""
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{source}: missing tensors {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {tuple(found[name])}, expected {shape} from the config"
            )


def check_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor],
                  source: str) -> dict[str, torch.Tensor]:
    """Return exactly the `expected` tensors, or raise ModelLoadError. Extra tensors (e.g. old
    `rotary_emb.inv_freq` buffers, a tied `lm_head.weight`) are dropped."""
    check_shapes(expected, {name: tuple(tensor.shape) for name, tensor in tensors.items()}, source)
    return {name: tensors[name] for name in expected}

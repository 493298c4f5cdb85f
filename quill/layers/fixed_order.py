"""Sums in one fixed order, built from elementwise operations only.

A reduction kernel (`sum`, `matmul`) may split and order its additions by the shape of the call,
the processor and the thread count; an elementwise addition has no order to choose. `tree_sum`
adds the halves of a dimension, then the halves of that, and so on: every result is the same tree
of additions whatever the other dimensions hold. Zero padding changes nothing (x + 0 = x), so a
length padded further (a wider group of keys) gives the same bits as its unpadded self. The
PyTorch paths that must be batch-invariant by construction (attention without the C kernel, the
LM head's exact logits) sum this way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def tree_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over `dim` by pairwise halving, the length zero-padded to a power of two."""
    x = x.movedim(dim, -1)
    width = x.shape[-1]
    padded = 1 << max(0, width - 1).bit_length()
    if padded != width:
        x = F.pad(x, (0, padded - width))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def fixed_order_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products of float32 rows along the last dimension, in `tree_sum`'s order."""
    return tree_sum(a.float() * b.float())

"""The LM head's logits in float32, exact where it matters.

A bfloat16 matmul rounds its output to bfloat16: 8 significant bits, so a logit of 20 can be off
by 0.06. That is enough to turn a near-tie into an exact tie or flip it, and greedy output then
depends on rounding rather than on the model (SmolLM2 answered "What is the capital of France?"
with "L'Étoile..." instead of "The capital of France is Paris" this way). The whole vocabulary in
float32 would cost four times the bandwidth of the largest matrix, so only the tokens that could
be the maximum, those within rounding distance of it, are recomputed exactly.
"""
from __future__ import annotations

import torch
from torch import nn

# A bf16 value v is within 2**-8 * |v| of the exact one; two logits closer than twice that to the
# row's maximum may be in either order.
_BF16_RELATIVE_ERROR = 2.0 ** -8


def lm_head_logits(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    weight = getattr(lm_head, "weight", None)
    if weight is None or weight.dtype == torch.float32:  # exact already, or a quantized head
        return logits
    row_max = logits.max(dim=-1, keepdim=True).values
    near = logits >= row_max - 2 * _BF16_RELATIVE_ERROR * row_max.abs()
    rows, tokens = near.nonzero(as_tuple=True)
    logits[rows, tokens] = (weight[tokens].float() * hidden[rows].float()).sum(dim=-1)
    return logits

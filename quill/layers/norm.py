"""RMSNorm, computed in float32 whatever the activation dtype (as the reference models do)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quill.layers.module import InferenceModule


class RMSNorm(InferenceModule):
    def __init__(self, dim: int, eps: float, *, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        # Gemma stores w and scales by (1 + w); Llama stores the scale itself.
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        # x * rsqrt(mean(x^2) + eps) in one call: bit-identical to spelling it out, with less overhead
        x = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        if self.weight_offset:
            return (x * (self.weight.float() + self.weight_offset)).to(dtype)
        return self.weight * x.to(dtype)

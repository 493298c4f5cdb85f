"""RMSNorm, computed in float32 whatever the activation dtype (as the reference models do).

bfloat16 rows on the CPU go through a C kernel (`quill/kernels/rms_norm.c`) where it can be
built: the PyTorch spelling is five to six calls of per-call overhead for a few hundred numbers.
The two differ only in the order the squares are summed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quill import kernels
from quill.layers.module import InferenceModule


class RMSNorm(InferenceModule):
    def __init__(self, dim: int, eps: float, *, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        # Gemma stores w and scales by (1 + w); Llama stores the scale itself.
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(dim))
        pointer = kernels.POINTER  # bf16 rows only: the kernel reads and writes bf16
        self._kernel = kernels.function("rms_norm", [pointer, kernels.INT64, pointer, pointer, kernels.INT32,
                                                     kernels.INT32, kernels.FLOAT, kernels.FLOAT])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._kernel is not None and x.dtype == self.weight.dtype == torch.bfloat16 and x.dim() == 2
                and x.stride(1) == 1 and x.device.type == "cpu"):
            return self._in_kernel(x)
        dtype = x.dtype
        # x * rsqrt(mean(x^2) + eps) in one call: bit-identical to spelling it out, with less overhead
        x = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        if self.weight_offset:
            return (x * (self.weight.float() + self.weight_offset)).to(dtype)
        return self.weight * x.to(dtype)

    def _in_kernel(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype)
        self._kernel(x.data_ptr(), x.stride(0), self.weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                     self.eps, self.weight_offset)
        return out

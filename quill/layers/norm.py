"""RMSNorm, computed in float32 whatever the activation dtype (as the reference models do).

bfloat16 rows on the CPU go through a C kernel (`quill/kernels/rms_norm.c`) where it can be
built, and so do float32 heads (the q and k norms of Gemma 3 and Qwen3): the PyTorch spelling is
five to six calls of per-call overhead for a few hundred numbers. The two differ only in the order
the squares are summed and in 1 / sqrt against rsqrt."""
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
        pointer, i32, f32 = kernels.POINTER, kernels.INT32, kernels.FLOAT  # bf16 weights only
        # bf16 rows [rows, dim], and float32 heads [tokens, heads, dim] (q and k norms)
        self._kernel = kernels.function("rms_norm", [pointer, kernels.INT64, pointer, pointer, i32, i32, f32, f32])
        self._heads_kernel = kernels.function("rms_norm_heads", [pointer, kernels.INT64, pointer, pointer, i32, i32,
                                                                 i32, f32, f32], source="rms_norm")

    def runs_in_kernel(self, *, heads: bool = False) -> bool:
        """Whether bf16 rows (or, with `heads`, float32 heads) go through the C kernel."""
        return self.weight.dtype == torch.bfloat16 and (self._heads_kernel if heads else self._kernel) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.bfloat16 and x.device.type == "cpu":
            if self._kernel is not None and x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1:
                return self._in_kernel(x)
            if (self._heads_kernel is not None and x.dtype == torch.float32 and x.dim() == 3 and x.stride(2) == 1
                    and x.stride(1) == x.shape[2]):
                return self._heads_in_kernel(x)
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

    def _heads_in_kernel(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape)
        tokens, heads, dim = x.shape
        self._heads_kernel(x.data_ptr(), x.stride(0), self.weight.data_ptr(), out.data_ptr(), tokens, heads, dim,
                           self.eps, self.weight_offset)
        return out

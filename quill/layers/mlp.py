"""Gated feed-forward block: down(act(gate(x)) * up(x)), with gate and up fused into one matmul.

bfloat16 rows on the CPU take act(gate) * up through a C kernel (`quill/kernels/activation.c`)
where it can be built: one call instead of four, and the definition the fused decoder
(`quill.layers.fused_layers`) runs too, so that both paths give the same bits. Its exponential is
its own, so it may differ from PyTorch's activation in the last bit before rounding to bf16."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quill import kernels
from quill.layers.linear import Linear
from quill.layers.module import InferenceModule

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
KERNEL_ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}  # `enum activation` in activation.c


class GatedMLP(InferenceModule):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        pointer, i32 = kernels.POINTER, kernels.INT32
        self._kernel = kernels.function("gated_activation", [pointer, kernels.INT64, i32, i32, i32, pointer],
                                        source="activation")

    @property
    def activates_in_kernel(self) -> bool:
        """Whether bf16 rows take the activation kernel (the fused decoder needs it)."""
        return self._kernel is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if (self._kernel is not None and gate_up.dtype == torch.bfloat16 and gate_up.dim() == 2
                and gate_up.stride(1) == 1 and gate_up.device.type == "cpu"):
            return self.down_proj(self._in_kernel(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)

    def _in_kernel(self, gate_up: torch.Tensor) -> torch.Tensor:
        out = torch.empty(gate_up.shape[0], self.intermediate_size, dtype=torch.bfloat16)
        self._kernel(gate_up.data_ptr(), gate_up.stride(0), gate_up.shape[0], self.intermediate_size,
                     KERNEL_ACTIVATIONS[self.activation], out.data_ptr())
        return out

"""Rotary position embeddings (rotate-half layout, as in Hugging Face checkpoints). The
frequencies, and which scaling variants Quill runs, are in `quill/rope.py`."""
from __future__ import annotations

from typing import Any

import torch

from quill import kernels
from quill.layers.module import InferenceModule
from quill.rope import rope_inverse_frequencies


class RotaryEmbedding(InferenceModule):
    """cos/sin of position x frequency, computed for the positions at hand.

    No table by position: for a long context it would cost hundreds of MB (Gemma 3: 32k positions
    x 256 dims, twice) to save a few microseconds. The values are the same float32 products the
    reference computes."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        # An explicit CPU tensor: models are instantiated on the meta device, but this one is
        # computed here, not loaded from the checkpoint.
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, theta, scaling), persistent=False)
        # Every layer of one forward pass gets the same positions tensor: compute cos/sin once.
        self._positions: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        pointer, i32 = kernels.POINTER, kernels.INT32  # float32 heads on the CPU (quill/kernels/rotary.c)
        self._kernel = kernels.function("rotary", [pointer, kernels.INT64, pointer, pointer, pointer, i32, i32, i32])

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed_sin) of `positions`, each [tokens, 1, head_dim] float32 and contiguous."""
        if positions is not self._positions:
            freqs = positions.float()[:, None] * self.inv_freq[None, :]
            cos, sin = freqs.cos(), freqs.sin()
            # rotate_half(x) * sin == swap_halves(x) * (-sin, sin): the negation folds into the table
            self._positions, self._cos_sin = positions, (torch.cat((cos, cos), dim=-1).unsqueeze(1),
                                                         torch.cat((-sin, sin), dim=-1).unsqueeze(1))
        return self._cos_sin

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, heads, head_dim]; positions: [tokens]. Returns x rotated, in float32."""
        cos, signed_sin = self.tables(positions)
        if (self._kernel is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(2) == 1
                and x.stride(1) == x.shape[2]):
            return self._in_kernel(x, cos, signed_sin)
        x = x.float()
        half = x.shape[-1] // 2
        return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin

    def _in_kernel(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape)
        tokens, heads, dim = x.shape
        self._kernel(x.data_ptr(), x.stride(0), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(),
                     tokens, heads, dim)
        return out

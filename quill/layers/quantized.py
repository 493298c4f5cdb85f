"""Weight-only quantized linear layers: weights stay small in memory and are multiplied natively.

On a CPU, decoding is limited by the bytes of weights read per token, so a 4-bit weight read
through PyTorch's int4 kernel (`_weight_int4pack_mm_for_cpu`, bf16 activations) is several times
faster than a float one for a few rows. For many rows (a long prefill) the kernel is compute
bound and slower than a bf16 matmul; there the layer expands its weight to bf16 for that call
instead, for the rows from `dense_rows_from(start)` on. The runner decides which rows those are:
the prompt rows of long prompts, whatever else is in the batch (a decision that depends only on
the request keeps greedy output batch-invariant; see `linear.py`), or, with batch invariance off,
every row of a step that has many.

Every reader produces one format, `quill.weights.quantized.QuantizedWeight` (codes with a scale
and an offset per group of input columns); `quantized_linear` picks the kernel that runs it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from quill import kernels
from quill.layers.linear import BATCH_INVARIANT_ROW_MULTIPLE
from quill.layers.module import InferenceModule
from quill.weights.quantized import QuantizedWeight

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel accepts
_INT4_BLOCK_N = 64  # the CPU packing interleaves output rows in blocks of 64 (see Int4Linear.dequantize)
# Row count from which expanding to bf16 beats the int4 kernel in one call, measured on this
# machine for SmolLM2's four matrices of a layer: even at 80 rows (1.7 ms either way), 10% faster
# at 96, 37% at 192.
DENSE_MIN_ROWS = 96
# Both kernels work through rows in blocks of 4: 5 to 8 rows cost what 8 do (measured for every
# SmolLM2 matrix: qkv 19 us for 4 rows, 32 us for 5). Speculative decoding plans its extra rows
# around it.
KERNEL_ROW_BLOCK = 4

_dense_from: ContextVar[int | None] = ContextVar("dense_from", default=None)


@contextmanager
def dense_rows_from(start: int | None) -> Iterator[None]:
    """Within this block, quantized layers multiply rows `start:` through their weight expanded to
    bf16 (None: no row), and the rows before it through their kernel."""
    token = _dense_from.set(start)
    try:
        yield
    finally:
        _dense_from.reset(token)


def dense_rows_start() -> int | None:
    """The `start` of the innermost `dense_rows_from` block (None outside any): for layers that
    pass a subset of the step's rows on to quantized layers (mixture-of-experts groups)."""
    return _dense_from.get()


class QuantizedLinear(InferenceModule):
    """Shared plumbing: bias, and the bf16 expansion for prefill-sized rows. The int4 and int8
    kernels compute each row the same way whatever the row count, and so does the bf16 matmul for
    row counts that are multiples of 4 (tests pin both): batch invariance holds for each row as
    long as the same kernel takes it."""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = _dense_from.get()
        if start is None or start >= x.shape[0]:
            y = self._kernel(x)
        elif start == 0:
            y = self._dense(x)
        else:
            y = torch.cat([self._kernel(x[:start]), self._dense(x[start:])])
        return y if self.bias is None else y + self.bias

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:  # the usual case; even a no-op .to() costs a microsecond a call
            return self._matmul(x)
        return self._matmul(x.to(torch.bfloat16)).to(x.dtype)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        pad = -rows % BATCH_INVARIANT_ROW_MULTIPLE
        padded = F.pad(x, (0, 0, 0, pad)) if pad else x
        return F.linear(padded, self.dequantize(x.dtype))[:rows]

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric 4-bit weights in PyTorch's packed CPU layout."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        out, inp = weight.shape
        super().__init__(out, inp, bias)
        self.group_size = weight.group_size
        # The kernel computes (q - 8) * scale + zero; ours is q * scale + offset.
        scales, zeros = weight.scales, weight.offsets + 8 * weight.scales
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.int(), 1))
        self.register_buffer("scales_and_zeros", torch.stack([scales.t(), zeros.t()], dim=-1)
                             .to(torch.bfloat16).contiguous())
        pointer, i32 = kernels.POINTER, kernels.INT32
        self._expand = kernels.function("expand_int4", [pointer, pointer, pointer, i32, i32, i32])

    @staticmethod
    def supports(weight: QuantizedWeight) -> bool:
        out, inp = weight.shape
        return (weight.bits == 4 and weight.group_size in INT4_GROUP_SIZES and out % _INT4_BLOCK_N == 0
                and inp % weight.group_size == 0)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in], as the transpose of a contiguous [in, out] tensor. bf16 on the CPU comes from
        a C kernel (`quill/kernels/expand_int4.c`, the same bits in one pass). The packed layout stores,
        per block of 64 output rows and for each input column, 32 bytes: rows 0-31 in the low
        nibbles, 32-63 in the high ones (tests pin it against `_convert_weight_to_int4pack_for_cpu`).
        It unpacks to [in, out] order in 64-byte runs, and the [in // group, out] scales then
        broadcast along contiguous memory: 2.3x faster than expanding in [out, in] order, and as
        fast to multiply by."""
        out, inp, group = self.out_features, self.in_features, self.group_size
        if dtype == torch.bfloat16 and self._expand is not None and self.packed.device.type == "cpu":
            values = torch.empty(inp, out, dtype=dtype)
            self._expand(self.packed.data_ptr(), self.scales_and_zeros.data_ptr(), values.data_ptr(), out, inp, group)
            return values.t()
        blocks = self.packed.view(out // _INT4_BLOCK_N, inp, _INT4_BLOCK_N // 2)
        nibbles = torch.stack([blocks & 15, blocks >> 4], dim=2).view(torch.int8).sub_(8)  # [blocks, in, 2, 32]
        values = torch.empty(inp, out, dtype=dtype)  # code - 8: small integers, exact in any float type
        values.view(inp, out // _INT4_BLOCK_N, 2, _INT4_BLOCK_N // 2).copy_(nibbles.permute(1, 0, 2, 3))
        # [in // group, 1, out] each; contiguous, or the broadcast below is 4x slower
        scales, zeros = self.scales_and_zeros.to(dtype).permute(2, 0, 1).contiguous().unsqueeze(2)
        # (code - 8) * scale + zero, computed in float32 (as the kernel does) and rounded once. Bf16
        # rounding after each step instead turned SmolLM2's "Paris" into "L'Étoile" for a chat prompt.
        grouped = values.view(inp // group, group, out)
        torch.addcmul(zeros, grouped, scales, out=grouped)
        return values.t()


class Int8Linear(QuantizedLinear):
    """Per-output-channel symmetric 8-bit weights (`_weight_int8pack_mm`)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        out, inp = weight.shape
        super().__init__(out, inp, bias)
        # code - 128 as int8: flipping the top bit of the unsigned code, with no wider copy
        self.register_buffer("weight_int8", (weight.codes ^ 0x80).view(torch.int8))
        self.register_buffer("scales", weight.scales[:, 0].to(torch.bfloat16).contiguous())
        self.max_step = weight.scales.max().item()

    @staticmethod
    def supports(weight: QuantizedWeight) -> bool:
        return (weight.bits == 8 and weight.group_size == weight.shape[1]
                and torch.equal(weight.offsets, -128 * weight.scales))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight_int8, self.scales)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, 1]: how far outputs can be from x @ W.T with the weight it was quantized from.
        Rounding to codes leaves each weight off by an independent, uniform error of at most half
        a step, so an output's error has a standard deviation of at most step * |x|_2 / sqrt(12);
        this is six of them (the worst case, step / 2 * |x|_1, is ~20x wider and useless). The
        bf16 rounding of the scales is relative to each output, like bf16 output rounding."""
        return 6 * self.max_step / 12 ** 0.5 * x.float().norm(dim=-1, keepdim=True)


def quantize_per_channel_int8(weight: torch.Tensor, rows_per_chunk: int = 4096) -> QuantizedWeight:
    """Symmetric int8 with one scale per output row (what `Int8Linear` runs). Works through the
    rows in chunks: float32 copies of a whole embedding table would cost GBs (Gemma 3: 0.7 GB each)."""
    out, inp = weight.shape
    codes = torch.empty(out, inp, dtype=torch.uint8)
    scales = torch.empty(out, 1)
    for start in range(0, out, rows_per_chunk):
        chunk = weight[start:start + rows_per_chunk].detach().to(torch.float32, copy=True)
        scale = chunk.abs().amax(dim=1, keepdim=True) / 127
        step = torch.where(scale > 0, scale, 1)  # an all-zero row keeps scale 0 and codes 128
        codes[start:start + rows_per_chunk] = chunk.div_(step).round_().clamp_(-127, 127).add_(128)
        scales[start:start + rows_per_chunk] = scale
    return QuantizedWeight(codes, scales, -128 * scales, bits=8, group_size=inp, source="int8")


def quantized_linear(weight: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantizedLinear | None:
    """The native layer for `weight` on the CPU, or None when no kernel takes its format."""
    for layer in (Int4Linear, Int8Linear):
        if layer.supports(weight):
            return layer(weight, bias)
    return None

"""Weight-only quantized linear layers: weights stay small in memory and are multiplied natively.

On a CPU, decoding is limited by the bytes of weights read per token, so 4-bit weights read
through a kernel that expands them to bf16 on the fly are several times faster than float ones.
The same kernel takes a long prompt's rows too (it expands each block of weights once per call and
runs every row through it), so one row and many go through the same arithmetic and greedy output
does not depend on the batch (see `quill.layers.matmul`). By default on the CPU, 4-bit layers
multiply activations quantized to 8 bits instead, in integer dot products (`Int4Linear.
use_int8_activations`, `kernels/int4_q8.c`), row-invariant the same way. Where no kernel can be
built, PyTorch's int4 and int8 kernels run instead, in fixed row blocks.

Every reader produces one format, `quill.weights.quantized.QuantizedWeight` (codes with a scale
and an offset per group of input columns); `quantized_linear` picks the layer that runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quill.layers.matmul import PackedMatmul, RowBlockedMatmul, kernel_available, pack_pairs
from quill.layers.module import InferenceModule
from quill.weights.quantized import QuantizedWeight

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4 kernel (the fallback) accepts
_INT4_BLOCK_N = 64  # PyTorch's int4 packing interleaves output rows in blocks of 64
# The kernel takes up to 4 rows in one pass over 4 panels of expanded weights; from the fifth, rows
# cost more each. Measured on SmolLM2's four int4 matrices of a layer, one thread (AMD EPYC): 1 row
# 236 us, 2 rows 258, 4 rows 302, 5 rows 353, 8 rows 466. Speculative decoding plans its extra
# rows around it. With 8-bit activations (the CPU's default) rows cost more evenly: 50 us, 80, 130,
# 150, 220 for 1, 2, 4, 5 and 8 rows; drafts fitted into blocks of 4 still did as well as unfitted
# ones or better (`benchmarks/speculative.py`, n-gram, two alternations: grounded at 4 streams
# 1.56-1.65x against 1.49-1.53x, free writing 0.98-1.07x against 0.96-1.09x).
KERNEL_ROW_BLOCK = 4

class QuantizedLinear(InferenceModule):
    """Shared plumbing: the row-invariant product (`self.matmul`, which adds the bias), set up by
    the subclasses from their weight. The bias stays a parameter too, as checkpoints name it."""

    matmul = None

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric 4-bit weights: weight = (code - 8) * scale + zero, with bf16 scale and
    zero per group of inputs (zero = offset + 8 * scale), rounded to bf16."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        out, inp = weight.shape
        super().__init__(out, inp, bias)
        self.group_size = weight.group_size
        scales = weight.scales.to(torch.bfloat16)
        zeros = (weight.offsets + 8 * weight.scales).to(torch.bfloat16)
        if kernel_available():
            self.matmul = PackedMatmul.int4(weight.codes, scales, zeros, self.group_size, bias)
        else:  # PyTorch's kernel computes (q - 8) * scale + zero too
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.int(), 1)
            self.scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()
            self.matmul = RowBlockedMatmul(_int4_matmul(self.packed, self.group_size, self.scales_and_zeros, bias),
                                           inp, ("int4", out, self.group_size, bias is not None))

    def use_int8_activations(self) -> None:
        """Multiply activations quantized to 8 bits from now on (`PackedMatmul.int4_q8`): the same
        codes, scales and zeros, repacked. Nothing changes where the kernel's format cannot take
        the layer's shape (inputs or groups not multiples of 32) or no kernel runs it."""
        if isinstance(self.matmul, PackedMatmul) and self.matmul.format == "int4" and PackedMatmul.takes_int4_q8(
                self.in_features, self.group_size):
            self.matmul = self.matmul.with_int8_activations()

    @staticmethod
    def supports(weight: QuantizedWeight) -> bool:
        out, inp = weight.shape
        if weight.bits != 4 or inp % weight.group_size:
            return False
        if kernel_available():
            return weight.group_size % 2 == 0
        return weight.group_size in INT4_GROUP_SIZES and out % _INT4_BLOCK_N == 0  # PyTorch's kernel

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] as the layer multiplies by it: bf16((code - 8) * scale + zero), as `dtype`."""
        if isinstance(self.matmul, PackedMatmul):
            return self.matmul.weight(dtype)
        # PyTorch's packing stores, per block of 64 outputs and per input, 32 bytes: outputs 0-31 in
        # the low nibbles, 32-63 in the high ones (the tests pin it).
        out, inp, group = self.out_features, self.in_features, self.group_size
        blocks = self.packed.view(out // _INT4_BLOCK_N, inp, _INT4_BLOCK_N // 2)
        codes = torch.stack([blocks & 15, blocks >> 4], dim=2).permute(0, 2, 3, 1).reshape(out, inp).float()
        scales, zeros = self.scales_and_zeros.float().unbind(-1)  # [in // group, out]
        values = (codes.view(out, -1, group) - 8) * scales.t()[..., None] + zeros.t()[..., None]
        return values.view(out, inp).to(torch.bfloat16).to(dtype)


def _int4_matmul(packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None):
    """PyTorch's int4 kernel on float32 activations (see `RowBlockedMatmul`)."""
    scales_and_zeros, bias = scales_and_zeros.float(), None if bias is None else bias.float()

    def matmul(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
        return y if bias is None else y + bias
    return matmul


class Int8Linear(QuantizedLinear):
    """Per-output-channel symmetric 8-bit weights: weight = code * scale, the scale applied to the
    output."""

    def __init__(self, weight: QuantizedWeight | _PackedCodes, bias: torch.Tensor | None = None) -> None:
        out, inp = weight.shape
        super().__init__(out, inp, bias)
        self.scales = weight.scales[:, 0].float()
        self.max_step = weight.scales.max().item()
        self._codes = None
        if isinstance(weight, _PackedCodes):
            self.matmul = PackedMatmul("int8", out, inp, weight.packed, channel_scale=self.scales, bias=bias)
        elif kernel_available():
            self.matmul = PackedMatmul.int8(weight.codes, self.scales, bias, convert=_signed_codes)
        else:
            self._codes = codes = _signed_codes(weight.codes)
            self.matmul = RowBlockedMatmul(_int8_matmul(codes, self.scales, bias), inp, ("int8", out, bias is not None))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Linear:
        """The layer `quantize_per_channel_int8(weight)` makes, with the codes packed a chunk of
        rows at a time as they are made: never held whole beside their packed copy (SmolLM2's
        49,152 x 576 head: the load's peak 30 MB lower). `weight` may be a table that yields float
        rows when sliced."""
        if not kernel_available():
            return cls(quantize_per_channel_int8(weight))
        scales = []

        def signed_codes(rows: torch.Tensor) -> torch.Tensor:
            codes, scale = _int8_codes(rows)
            scales.append(scale)
            return codes.to(torch.int8)

        packed = pack_pairs(weight, signed_codes, rows_per_chunk=_QUANTIZE_ROWS_PER_CHUNK)
        return cls(_PackedCodes(tuple(weight.shape), packed, torch.cat(scales)))

    @staticmethod
    def supports(weight: QuantizedWeight) -> bool:
        return (weight.bits == 8 and weight.group_size == weight.shape[1]
                and torch.equal(weight.offsets, -128 * weight.scales))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        codes = self.matmul.weight() if self._codes is None else self._codes
        return (codes.float() * self.scales[:, None]).to(dtype)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, 1]: how far outputs can be from x @ W.T with the weight it was quantized from.
        Rounding to codes leaves each weight off by an independent, uniform error of at most half
        a step, so an output's error has a standard deviation of at most step * |x|_2 / sqrt(12);
        this is six of them (the worst case, step / 2 * |x|_1, is ~20x wider and useless)."""
        return 6 * self.max_step / 12 ** 0.5 * x.float().norm(dim=-1, keepdim=True)


def _signed_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 code -> int8 code - 128, by flipping the top bit: no wider copy."""
    return (codes ^ 0x80).view(torch.int8)


class Int8GroupLinear(QuantizedLinear):
    """Group-wise affine codes of up to 8 bits, one byte each (GGML's Q5_0, Q5_1, Q5_K, Q6_K and
    Q8_0, and fused shards of mixed formats), centred per group: weight = bf16((code - c) * scale
    + zero) with bf16 scale and zero = offset + c * scale, c the code nearest -offset / scale (that
    fits a signed byte). Centring keeps the zero small, so that rounding it to bf16 costs nothing:
    an uncentred Q8_0 zero of -128 * scale would be off by a quarter of a step; a symmetric
    format's zero becomes exactly 0. Half the bytes of bf16 weights. Only the packed kernel takes
    them: without it the loader expands them to the model's dtype."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        out, inp = weight.shape
        super().__init__(out, inp, bias)
        self.group_size = weight.group_size
        groups = weight.codes.view(out, -1, self.group_size).to(torch.int16)
        ideal = torch.nan_to_num(-weight.offsets / weight.scales, nan=128.0, posinf=128.0, neginf=128.0).round()
        centre = torch.minimum(torch.maximum(ideal, groups.amax(-1) - 127.0), groups.amin(-1) + 128.0)
        codes = (groups - centre[..., None].to(torch.int16)).to(torch.int8).view(out, inp)
        zeros = weight.offsets + centre * weight.scales
        self.matmul = PackedMatmul.int8g(codes, weight.scales, zeros, self.group_size, bias)

    @staticmethod
    def supports(weight: QuantizedWeight) -> bool:
        out, inp = weight.shape
        return (kernel_available() and weight.bits <= 8 and weight.group_size % 2 == 0
                and inp % weight.group_size == 0)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.matmul.weight(dtype)


def _int8_matmul(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """PyTorch's int8 kernel on float32 activations (see `RowBlockedMatmul`)."""
    bias = None if bias is None else bias.float()

    def matmul(x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x, codes, scales)
        return y if bias is None else y + bias
    return matmul


# Rows quantized at a time: float32 copies of a whole embedding table would cost GBs (Gemma 3:
# 0.7 GB each).
_QUANTIZE_ROWS_PER_CHUNK = 4096


def quantize_per_channel_int8(weight: torch.Tensor, rows_per_chunk: int = _QUANTIZE_ROWS_PER_CHUNK) -> QuantizedWeight:
    """Symmetric int8 with one scale per output row (what `Int8Linear` runs), a chunk of rows at a
    time."""
    out, inp = weight.shape
    codes = torch.empty(out, inp, dtype=torch.uint8)
    scales = torch.empty(out, 1)
    for start in range(0, out, rows_per_chunk):
        chunk_codes, scale = _int8_codes(weight[start:start + rows_per_chunk])
        codes[start:start + rows_per_chunk] = chunk_codes.add_(128)
        scales[start:start + rows_per_chunk] = scale
    return QuantizedWeight(codes, scales, -128 * scales, bits=8, group_size=inp, source="int8")


def _int8_codes(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in -127..127 as float32, scale [rows, 1]) of float rows: code = round(w / scale)
    with scale = max |w| / 127 per row. An all-zero row keeps scale 0 and codes 0."""
    rows = rows.detach().to(torch.float32, copy=True)
    scale = rows.abs().amax(dim=1, keepdim=True) / 127
    step = torch.where(scale > 0, scale, 1)
    return rows.div_(step).round_().clamp_(-127, 127), scale


@dataclass
class _PackedCodes:
    """Int8 codes already in the kernel's packed layout, with their scales [out, 1]."""

    shape: tuple[int, int]
    packed: torch.Tensor
    scales: torch.Tensor


def quantized_linear(weight: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantizedLinear | None:
    """The native layer for `weight` on the CPU, or None when no kernel takes its format."""
    for layer in (Int4Linear, Int8Linear, Int8GroupLinear):
        if layer.supports(weight):
            return layer(weight, bias)
    return None

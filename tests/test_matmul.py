"""Row-invariant matrix products: every row comes out the same whatever else shares the call.

The property is asserted, not one machine's arithmetic: for every distinct linear shape of the
real and tiny models, in every format, rows computed in calls of 1 to 64 rows (at varying
positions) equal the same rows computed alone. The kernel's documented arithmetic is checked bit
for bit in its portable build (plain C, the same on every CPU), and the native build against it
within float32 rounding.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quill import kernels
from quill.hardware import cpu_info
from quill.layers.fixed_order import fixed_order_dot, tree_sum
from quill.layers.linear import Linear, prepare_linears_for_cpu
from quill.layers.matmul import (PackedMatmul, RowBlockedMatmul, kernel_available, probe_row_blocks, unpack_columns,
                                 unpack_nibble_dwords, unpack_nibbles)
from quill.layers.quantized import Int4Linear, Int8GroupLinear, Int8Linear, quantize_per_channel_int8
from quill.weights.quantized import QuantizedWeight

# (out, in) of each matmul: SmolLM2-135M, Gemma 3 270M, and the tiny test models (llama/qwen2, gemma3).
SMOLLM2 = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
GEMMA3 = [(1536, 640), (640, 1024), (4096, 640), (640, 2048)]
TINY = [(128, 64), (64, 64), (320, 64), (64, 160), (192, 64), (64, 128), (256, 64)]
HEADS = [(49152, 576), (262144, 640)]  # the real models' LM heads (int8 in the default path)
SHAPES = SMOLLM2 + GEMMA3 + TINY


def _random_codes(out: int, inp: int, bits: int = 4, group: int = 32) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(out * 7 + inp)
    codes = torch.randint(0, 2 ** bits, (out, inp), dtype=torch.uint8, generator=generator)
    scales = torch.rand(out, inp // group, generator=generator) * 0.01 + 1e-3
    offsets = -torch.rand(out, inp // group, generator=generator) * 0.05 * 2 ** (bits - 4)
    return QuantizedWeight(codes, scales, offsets, bits, group, "test")


def _random_q8_0(out: int, inp: int) -> PackedMatmul:
    """GGML Q8_0: signed codes, a float16 scale per 32 inputs."""
    generator = torch.Generator().manual_seed(out * 5 + inp)
    codes = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=generator)
    scales = (torch.rand(out, inp // 32, generator=generator) * 0.001 + 1e-4).to(torch.float16)
    return PackedMatmul.q8_0(codes, scales)


def _layer(kind: str, out: int, inp: int):
    if kind == "q8_0":
        return _random_q8_0(out, inp) if kernel_available() and inp % 32 == 0 else None
    if kind == "int4":
        return Int4Linear(_random_codes(out, inp)) if out % 64 == 0 or kernel_available() else None
    if kind == "int8g":  # 6-bit codes in groups of 16, as Q6_K
        return Int8GroupLinear(_random_codes(out, inp, bits=6, group=16)) if kernel_available() else None
    if kind == "int8":
        return Int8Linear(quantize_per_channel_int8(torch.randn(out, inp) * 0.05))
    layer = Linear(inp, out, bias=True).to(getattr(torch, kind))
    prepare_linears_for_cpu(torch.nn.ModuleDict({"layer": layer}))
    return layer


def _assert_rows_alone_equal_rows_together(layer, x: torch.Tensor, sizes) -> None:
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    for rows in sizes:
        start = (7 * rows) % (len(x) - rows + 1)  # positions vary with the size
        assert torch.equal(layer(x[start:start + rows]), alone[start:start + rows]), f"{rows} rows from {start}"


@pytest.mark.parametrize("kernels_on", ["1", "0"], ids=["kernel", "pytorch-fallback"])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int4", "int8", "int8g", "q8_0"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rows_in_batches_of_1_to_64_equal_rows_alone(shape, kind, kernels_on, monkeypatch):
    monkeypatch.setenv("QUILL_KERNELS", kernels_on)
    layer = _layer(kind, *shape)
    if layer is None:
        pytest.skip("without the kernel, int4 layers need whole blocks of 64 outputs, and byte codes expand; "
                    "Q8_0 needs whole blocks of 32 inputs")
    dtype = torch.float32 if kind == "float32" else torch.bfloat16
    x = torch.randn(72, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    _assert_rows_alone_equal_rows_together(layer, x, range(1, 65))


@pytest.mark.parametrize("kind", ["int8", "q8_0"])
@pytest.mark.parametrize("shape", HEADS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_lm_head_rows_do_not_depend_on_the_batch(shape, kind):
    layer = _layer(kind, *shape)
    if layer is None:
        pytest.skip("no C compiler")
    x = torch.randn(24, shape[1], generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    _assert_rows_alone_equal_rows_together(layer, x, [1, 2, 3, 4, 5, 16, 17, 23])


# --- the kernel's arithmetic ---------------------------------------------------------------------

def _emulated(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """matmul.c's bf16 definition: per output, over input pairs in order, add the odd product and
    then the even one, rounding each sum to float32 (the products of two bf16 values are exact)."""
    xf, wf = x.float(), w.float()
    acc = torch.zeros(x.shape[0], w.shape[0])
    for i in range(0, x.shape[1], 2):
        acc = acc + xf[:, i + 1:i + 2] * wf[:, i + 1]
        acc = acc + xf[:, i:i + 1] * wf[:, i]
    return acc


def _portable_build(flags: tuple[str, ...] = ("-mno-avx512f",)):
    """The kernel library built with `flags`: by default without AVX-512, the plain C loops."""
    if not kernel_available():
        pytest.skip("no C compiler")
    function = ctypes.CDLL(str(kernels._build("matmul", flags))).matmul
    pointer, i32, i64 = kernels.POINTER, kernels.INT32, kernels.INT64
    function.argtypes, function.restype = [pointer, pointer, i64, i32, pointer, i64, i32], i32
    return function


@pytest.mark.parametrize("build", ["native", "avx2", "portable"])
@pytest.mark.parametrize("fmt", ["bf16", "int4", "int8", "int8g", "q8_0"])
def test_kernel_computes_its_documented_arithmetic(fmt, build):
    """Bit for bit in the builds without AVX-512: plain C (the same on any CPU), and AVX2's
    vectorised expansion where this CPU has it; within float32 rounding in the native one (AVX-512
    BF16 where present, whose dot product is specified the same way but flushes subnormals)."""
    if not kernel_available():
        pytest.skip("no C compiler")
    generator = torch.Generator().manual_seed(3)
    out, inp, rows = 200, 128, 21
    x = torch.randn(rows, inp, generator=generator).to(torch.bfloat16)
    if fmt == "bf16":
        matmul = PackedMatmul.dense(torch.randn(out, inp, generator=generator).to(torch.bfloat16))
    elif fmt == "int4":
        matmul = Int4Linear(_random_codes(out, inp)).matmul
    elif fmt == "int8g":
        matmul = Int8GroupLinear(_random_codes(out, inp, bits=8, group=32)).matmul
    elif fmt == "q8_0":
        matmul = _random_q8_0(out, inp)
    else:
        layer = Int8Linear(quantize_per_channel_int8(torch.randn(out, inp, generator=generator)))
        matmul = layer.matmul
    if build != "native":
        matmul._kernel = _portable_build(("-mno-avx512f",) if build == "avx2" else ("-mno-avx512f", "-mno-avx2"))
    expected = _emulated(x, matmul.weight(torch.bfloat16))
    if fmt == "int8":
        expected = expected * matmul.channel_scale[:out]
    result = matmul(x.float())  # float32 activations: converted to bf16, output kept float32
    if build != "native":
        assert torch.equal(result, expected)
    else:
        torch.testing.assert_close(result, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def test_float32_kernel_matches_float32_matmul():
    if not kernel_available():
        pytest.skip("no C compiler")
    generator = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(100, 70, generator=generator), torch.randn(100, generator=generator)
    x = torch.randn(9, 70, generator=generator)
    torch.testing.assert_close(PackedMatmul.dense(weight, bias)(x), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_packed_layouts_round_trip():
    if not kernel_available():
        pytest.skip("no C compiler")
    weight = torch.randn(37, 24)  # a partial last panel
    assert torch.equal(PackedMatmul.dense(weight).weight(), weight)
    assert torch.equal(PackedMatmul.dense(weight.to(torch.bfloat16)).weight(torch.bfloat16), weight.to(torch.bfloat16))
    codes = torch.randint(-127, 128, (37, 24), dtype=torch.int8)
    assert torch.equal(PackedMatmul.int8(codes, torch.ones(37)).weight(torch.int8), codes)


# --- the PyTorch fallback -------------------------------------------------------------------------

def test_probe_keeps_only_block_sizes_whose_rows_agree():
    """A fake library that takes another path (rounding differently) from 16 rows on: blocks of 64
    and 16 agree with each other, 4 and 1 do not agree with them."""
    weight = torch.randn(8, 32)

    def matmul(x: torch.Tensor) -> torch.Tensor:
        y = x @ weight.T
        return y * (1 + 2 ** -20) if x.shape[0] >= 16 else y

    assert probe_row_blocks(matmul, 32) == (64, 16)


def test_probe_rejects_sizes_where_a_rows_position_matters():
    weight = torch.randn(8, 32)

    def matmul(x: torch.Tensor) -> torch.Tensor:  # the last row of a call rounds differently
        y = x @ weight.T
        y[-1] = y[-1] * (1 + 2 ** -20)
        return y

    assert probe_row_blocks(matmul, 32) == (1,)


def test_blocked_evaluation_pads_the_tail_and_keeps_every_row():
    weight = torch.randn(8, 32)
    calls = []

    def matmul(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x @ weight.T

    blocked = RowBlockedMatmul(matmul, 32, ("test-fake",))
    calls.clear()
    x = torch.randn(70, 32)
    torch.testing.assert_close(blocked(x), x @ weight.T)
    assert set(calls) <= set(blocked.blocks)


def test_tree_sum_ignores_zero_padding_and_the_batch():
    values = torch.randn(5, 37)
    total = tree_sum(values)
    assert torch.equal(tree_sum(F.pad(values, (0, 91))), total)
    assert torch.equal(torch.cat([tree_sum(values[i:i + 1]) for i in range(5)]), total)
    torch.testing.assert_close(total, values.sum(-1))
    a, b = torch.randn(3, 10), torch.randn(3, 10)
    torch.testing.assert_close(fixed_order_dot(a, b), (a * b).sum(-1))


# --- 4-bit weights times 8-bit activations (int4_q8.c) -------------------------------------------

def _int4_q8_layer(out: int, inp: int, group: int = 32, bias: bool = False) -> Int4Linear:
    generator = torch.Generator().manual_seed(out + inp)
    layer = Int4Linear(_random_codes(out, inp, group=group), torch.randn(out, generator=generator) if bias else None)
    layer.use_int8_activations()
    return layer


def _quantized_activations(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """int4_q8.c's activations, computed independently: per row and block of 32, the codes
    round(x * (127 / amax)) (half to even, float32) and d = amax / 127."""
    blocks = x.float().numpy().reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax > 0, np.clip(np.rint(blocks * (np.float32(127) / amax)), -127, 127), 0).astype(np.int64)
    return q, (amax / np.float32(127))[..., 0].astype(np.float32)


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma through float64: a * b is exact there (an int32 sum of at most 17 bits times a
    float32); the one rounding of the sum to float64 could in principle differ from fma's, with
    odds far below anything a test could meet."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _emulated_int4_q8(x: torch.Tensor, matmul: PackedMatmul) -> torch.Tensor:
    """int4_q8.c's chain, per block in order: isum = sum code * q - 8 * sum q (exact), then
    acc = fma(isum, scale * d, acc), acc = fma(zero, sum(q) * d, acc)."""
    n, group = matmul.out_features, matmul.group_size
    codes = unpack_nibble_dwords(matmul.packed, n).numpy().astype(np.int64).reshape(n, -1, 32)
    scales = unpack_columns(matmul.scales, n).float().numpy().repeat(group // 32, axis=1)
    zeros = unpack_columns(matmul.zeros, n).float().numpy().repeat(group // 32, axis=1)
    q, d = _quantized_activations(x)
    acc = np.zeros((x.shape[0], n), np.float32)
    for b in range(q.shape[1]):
        sums = q[:, b].sum(axis=1)  # [rows]
        isum = q[:, b] @ codes[:, b].T - 8 * sums[:, None]  # [rows, n]
        acc = _fma32(isum, (scales[None, :, b] * d[:, b, None]).astype(np.float32), acc)
        acc = _fma32(np.broadcast_to(zeros[None, :, b], acc.shape), (sums.astype(np.float32) * d[:, b])[:, None], acc)
    if matmul.bias is not None:
        acc = acc + matmul.bias.numpy()
    return torch.from_numpy(acc)


# int4_q8.c's builds: "avx2" for a CPU without AVX-512 (byte products through vpmaddubsw), "plain"
# without AVX2 either (plain C), "without-bf16" for VNNI without AVX-512 BF16.
INT4_Q8_BUILDS = {"avx2": ("-mno-avx512f",), "plain": ("-mno-avx512f", "-mno-avx2"),
                  "without-bf16": ("-mno-avx512bf16",)}


@pytest.mark.parametrize("build", ["native", *INT4_Q8_BUILDS])
@pytest.mark.parametrize("group", [32, 64])
def test_int8_activations_kernel_computes_its_documented_chain_bit_for_bit(build, group):
    """Integer sums and one fixed float chain: the AVX-512 VNNI, AVX2 and plain C paths give the
    same bits, and all those of an independent emulation, in float32 and rounded to bfloat16.
    "without-bf16" builds for a CPU with VNNI but not AVX-512 BF16 (Intel Cascade Lake, Ice Lake),
    which rounds to bfloat16 in integer lanes. The rows include one of zeros, one with an outlier
    and tiny values beside it, and values that round to .5 on the 127 scale."""
    if not kernel_available():
        pytest.skip("no C compiler")
    generator = torch.Generator().manual_seed(9)
    out, inp = 100, 192  # a partial last panel
    matmul = _int4_q8_layer(out, inp, group, bias=True).matmul
    x = torch.randn(21, inp, generator=generator)
    x[3] = 0
    x[4, :32] = torch.linspace(-1e-4, 1e-4, 32)
    x[4, 5] = 300.0
    x[5, :32] = torch.arange(32) - 15.5  # amax 15.5: codes at k * 127 / 15.5, ties included
    x = x.to(torch.bfloat16)
    if build != "native":
        matmul._kernel = _portable_build(INT4_Q8_BUILDS[build])
    expected = _emulated_int4_q8(x, matmul)
    assert torch.equal(matmul(x.float()), expected)
    assert torch.equal(matmul(x), expected.to(torch.bfloat16))  # bf16 in, bf16 out: rounded to nearest even
    for rows in (2, 3):  # AVX2's tiles of 2 and 3 rows (21 rows took tiles of 4 and 1)
        assert torch.equal(matmul(x[3:3 + rows].float()), expected[3:3 + rows])


@pytest.mark.parametrize("build", ["native", *INT4_Q8_BUILDS])
def test_int8_activations_kernel_rounds_bfloat16_outputs_as_pytorch(build):
    """Rows of zeros leave each output exactly its bias, which then goes through the kernel's
    bfloat16 rounding: ties to even, overflow to infinity, infinities kept, in every build. A
    subnormal result (1e-40) is kept by the integer rounding; AVX-512 BF16's instruction flushes it
    to zero, as it does in matmul.c's bf16 path."""
    if not kernel_available():
        pytest.skip("no C compiler")
    bias = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.0e38, -3.4e38, float("inf"), float("-inf"),
                         1e-40, 0.1, -7.3] * 4)
    matmul = _int4_q8_layer(bias.numel(), 64, bias=True).matmul
    matmul.bias.copy_(bias)
    if build != "native":
        matmul._kernel = _portable_build(INT4_Q8_BUILDS[build])
    out = matmul(torch.zeros(3, 64, dtype=torch.bfloat16))
    expected = bias.to(torch.bfloat16).expand(3, -1).clone()
    if build == "native" and "avx512_bf16" in cpu_info()["flags"]:
        expected[:, bias.abs() < 2 ** -126] = 0
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("shape", SMOLLM2 + GEMMA3 + [(128, 64), (64, 64), (64, 160)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_activations_rows_in_batches_of_1_to_64_equal_rows_alone(shape):
    """Each row is quantized and multiplied on its own, whatever the tile (1, 2 or up to 16 rows
    a pass) or the thread holding its panels."""
    if not kernel_available():
        pytest.skip("no C compiler")
    layer = _int4_q8_layer(*shape)
    assert layer.matmul.format == "int4_q8"
    x = torch.randn(72, shape[1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    _assert_rows_alone_equal_rows_together(layer, x, range(1, 65))


def test_int8_activations_stay_within_the_quantization_bound():
    """Against the exact product with the same weights (float64), each output is off by at most
    what rounding the activations allows: sum over blocks of d / 2 * sum |w|, plus float32 sums."""
    if not kernel_available():
        pytest.skip("no C compiler")
    layer = _int4_q8_layer(576, 1536)
    x = (torch.randn(8, 1536, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)
    weight = layer.matmul.weight().double()  # exact: (code - 8) * scale + zero needs no rounding here
    exact = x.double() @ weight.T
    _, d = _quantized_activations(x)
    bound = (torch.from_numpy(d).double() / 2) @ weight.abs().view(576, -1, 32).sum(2).T
    error = (layer(x.float()).double() - exact).abs()
    assert (error <= bound + 1e-4 * exact.abs().max()).all()
    assert error.max() > 0  # the activations were rounded: the test can tell


def test_int8_activations_keep_the_weights_and_refuse_shapes_they_cannot_tile():
    if not kernel_available():
        pytest.skip("no C compiler")
    layer = Int4Linear(_random_codes(40, 96))
    weight, codes = layer.matmul.weight(torch.bfloat16), unpack_nibbles(layer.matmul.packed, 40)
    moved = layer.matmul
    layer.use_int8_activations()
    assert layer.matmul.format == "int4_q8"
    # the same weights, unrounded: the bf16 path's are these rounded to bf16
    assert torch.equal(layer.matmul.weight().to(torch.bfloat16), weight)
    assert torch.equal(unpack_nibble_dwords(layer.matmul.packed, 40), codes)
    assert layer.matmul.packed.data_ptr() == moved.packed.data_ptr()  # repacked in place: no second copy
    with pytest.raises(ValueError, match="not int4_q8 \\(moved\\) weights"):
        moved.with_int8_activations()
    narrow = Int4Linear(_random_codes(40, 48, group=16))  # groups of 16: the bf16 path keeps it
    narrow.use_int8_activations()
    assert narrow.matmul.format == "int4"
    with pytest.raises(ValueError, match="multiples of 32"):
        narrow.matmul.with_int8_activations()

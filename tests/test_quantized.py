"""Native quantized execution: GGUF blocks repack exactly, the int4/int8 kernels match
dequantize-then-matmul, and a quantized model loads natively and stays batch invariant."""
from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

from engine_helpers import all_position_logits, run_requests
from quill.engine.engine import Engine
from quill.config import EngineConfig
from quill.layers.linear import Linear
from quill.layers.quantized import Int4Linear, Int8Linear, dense_rows_from, quantize_per_channel_int8, quantized_linear
from quill.sampling_params import SamplingParams
from quill.models.loader import build_model, load_checkpoint
from quill.models.registry import FAMILIES
from quill.optimize.quantize import quantize_checkpoint
from quill.weights.gguf import read_gguf_tensor_types
from quill.weights.gguf_quant import NATIVE_GGML_TYPES, repack_ggml
from quill.weights.safetensors import load_hf_directory
from quill.weights.gguf_export import write_gguf
from quill.weights.quantized import QuantizedWeight

Q = gguf.GGMLQuantizationType
_FP16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2)}  # byte offsets of fp16 scales in a block


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random GGML data with finite fp16 scales: every code and sub-scale bit pattern occurs."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in _FP16_FIELDS[qtype]:
        scales = rng.uniform(-0.05, 0.05, size=len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", NATIVE_GGML_TYPES, ids=lambda t: t.name)
def test_ggml_repacking_is_bit_exact(qtype):
    rows, cols = 64, 512
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(0))
    weight = repack_ggml(raw, qtype, (rows, cols))
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(rows, cols))
    assert weight.bits == 4 and weight.codes.max() <= 15
    assert torch.equal(weight.dequantize(), expected)


@pytest.mark.parametrize("qtype", NATIVE_GGML_TYPES, ids=lambda t: t.name)
def test_int4_kernel_matches_dequantize_then_matmul(qtype):
    rows, cols = 192, 512
    weight = repack_ggml(random_blocks(qtype, rows, cols, np.random.default_rng(1)), qtype, (rows, cols))
    layer = quantized_linear(weight)
    assert isinstance(layer, Int4Linear)
    x = torch.randn(5, cols)
    expected = x @ weight.dequantize().T
    # bf16 activations and bf16 scales: about 3 significant digits.
    torch.testing.assert_close(layer(x), expected, atol=2e-2 * expected.abs().max().item(), rtol=0)
    # The kernel's bf16 scale and zero point each round to 8 significant bits.
    dense = weight.dequantize()
    torch.testing.assert_close(layer.dequantize(torch.float32), dense, atol=2 ** -8 * dense.abs().max().item(), rtol=0)


def _random_weight(rows: int, cols: int, bits: int, group: int, symmetric: bool = False) -> QuantizedWeight:
    codes = torch.randint(0, 2 ** bits, (rows, cols), dtype=torch.uint8)
    scales = torch.rand(rows, cols // group) * 0.01 + 1e-3
    offsets = -(2 ** (bits - 1)) * scales if symmetric else -torch.rand(rows, cols // group) * 0.05
    return QuantizedWeight(codes, scales, offsets, bits, group, "test")


@pytest.mark.parametrize("kernels_on", ["1", "0"])  # bf16: the C expansion, and the PyTorch one
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_packed_layout_unpacks_to_the_codes(group, kernels_on, monkeypatch):
    """Int4Linear reads codes back out of PyTorch's packed layout (for the bf16 path of big
    batches); this pins that layout, so a PyTorch change shows up here."""
    monkeypatch.setenv("QUILL_KERNELS", kernels_on)
    weight = _random_weight(320, 512, 4, group)
    layer = Int4Linear(weight)
    assert layer._expand is None or kernels_on == "1"
    # What the kernel computes: (code - 8) * scale + zero in float32, from its bf16 scale and zero.
    scales, zeros = layer.scales_and_zeros.float().unbind(-1)  # [in // group, out]
    codes = weight.codes.float().view(320, 512 // group, group)
    expected = ((codes - 8) * scales.t()[..., None] + zeros.t()[..., None]).view(320, 512)
    assert torch.equal(layer.dequantize(torch.float32), expected)
    # bf16 rounds that once: rounding each step instead changed a real model's greedy answer.
    assert torch.equal(layer.dequantize(torch.bfloat16), expected.to(torch.bfloat16))


def test_int8_per_channel_kernel():
    weight = _random_weight(128, 256, 8, 256, symmetric=True)
    layer = quantized_linear(weight)
    assert isinstance(layer, Int8Linear)
    x = torch.randn(4, 256)
    expected = x @ weight.dequantize().T
    torch.testing.assert_close(layer(x), expected, atol=2e-2 * expected.abs().max().item(), rtol=0)


def test_formats_without_a_kernel_are_refused():
    assert quantized_linear(_random_weight(128, 256, 8, 32, symmetric=True)) is None  # int8 per group
    assert quantized_linear(_random_weight(128, 256, 5, 32)) is None
    assert quantized_linear(_random_weight(96, 256, 4, 32)) is None  # rows not whole blocks of 64


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_rows_do_not_depend_on_the_batch(kind):
    """The layers rely on it for batch invariance: they pad no rows."""
    layer = quantized_linear(_random_weight(256, 512, 4, 32) if kind == "int4"
                             else quantize_per_channel_int8(torch.randn(256, 512)))
    x = torch.randn(37, 512, dtype=torch.bfloat16)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    for rows in (2, 3, 5, 16, 37):
        assert torch.equal(layer(x[:rows]), alone[:rows]), rows
    assert torch.equal(layer(x[5:9]), alone[5:9])


def test_rows_can_take_the_bf16_path():
    layer = Int4Linear(_random_weight(256, 512, 4, 32), bias=torch.randn(256))
    x = torch.randn(11, 512)
    kernel = layer(x)
    with dense_rows_from(0):
        dense = layer(x)
    with dense_rows_from(5):
        split = layer(x)
    torch.testing.assert_close(dense, kernel, atol=5e-2 * kernel.abs().max().item(), rtol=0)
    assert torch.equal(split[:5], kernel[:5]) and not torch.equal(split[5:], kernel[5:])
    # bf16 rows do not depend on how many others share the matmul, either
    with dense_rows_from(0):
        assert torch.equal(torch.cat([layer(x[i:i + 1]) for i in range(len(x))]), dense)


# --- whole models --------------------------------------------------------------------------------

def _quantized_gguf(tiny_model_dir, tmp_path, arch: str, qtype_of) -> object:
    checkpoint = load_hf_directory(tiny_model_dir(arch), FAMILIES)
    path = tmp_path / f"{arch}.gguf"

    def hook(name, values):
        return qtype_of(name) if values.ndim == 2 and name != "token_embd.weight" else Q.F32

    write_gguf(path, FAMILIES.named(arch), checkpoint.config, checkpoint.tensors, tensor_type=hook)
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_gguf_runs_natively_and_matches_the_dequantized_model(tiny_model_dir, tmp_path, arch):
    path = _quantized_gguf(tiny_model_dir, tmp_path, arch, lambda name: Q.Q4_0)
    native = load_checkpoint(path, torch.float32, keep_quantized=True)
    model = build_model(native.config, native.tensors, torch.float32)
    untied_head = not native.config.tie_word_embeddings
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 4 * native.config.num_layers + untied_head
    reference = load_checkpoint(path, torch.float32)
    reference_model = build_model(reference.config, reference.tensors, torch.float32)

    ids = list(range(3, 40))
    ours, theirs = (all_position_logits(m, native.config, ids) for m in (model, reference_model))
    torch.testing.assert_close(ours, theirs, atol=3e-2 * theirs.abs().max().item(), rtol=0)


def test_quill_quantize_int4_experts_run_natively(tiny_model_dir, tmp_path):
    """`quill quantize` on a Qwen3-MoE model: every expert's projections run through the int4
    kernel like a dense layer's, the router stays float, and the logits stay near the float model's."""
    source = tiny_model_dir("qwen3moe")
    path = tmp_path / "int4.gguf"
    summary = quantize_checkpoint(source, path, "int4", progress=False)
    assert read_gguf_tensor_types(path)["blk.0.ffn_gate_inp.weight"] == "F32"
    assert "blk.0.ffn_gate_exps.weight.codes" in read_gguf_tensor_types(path) and summary.tensor_types["int4 g32"]
    checkpoint = load_checkpoint(path, torch.bfloat16, keep_quantized=True)
    model = build_model(checkpoint.config, checkpoint.tensors, torch.bfloat16)
    for layer in model.layers:
        assert all(isinstance(e.gate_up_proj, Int4Linear) and isinstance(e.down_proj, Int4Linear)
                   for e in layer.mlp.experts)
        assert type(layer.mlp.gate) is Linear
    reference_checkpoint = load_checkpoint(source, torch.bfloat16)
    reference = build_model(reference_checkpoint.config, reference_checkpoint.tensors, torch.bfloat16)
    ids = list(range(3, 40))
    ours, theirs = (all_position_logits(m, checkpoint.config, ids).flatten() for m in (model, reference))
    assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > 0.98


def test_fused_shards_of_different_formats_are_expanded_and_logged(tiny_model_dir, tmp_path, caplog):
    # v_proj in Q8_0 (no kernel) cannot share a fused qkv matmul with Q4_1 q/k.
    path = _quantized_gguf(tiny_model_dir, tmp_path, "llama",
                           lambda name: Q.Q8_0 if ".attn_v." in name else Q.Q4_1)
    checkpoint = load_checkpoint(path, torch.float32, keep_quantized=True)
    with caplog.at_level(logging.INFO, logger="quill"):
        model = build_model(checkpoint.config, checkpoint.tensors, torch.float32)
    layers = model.layers[0]
    assert isinstance(layers.self_attn.qkv_proj, Linear)
    assert isinstance(layers.mlp.gate_up_proj, Int4Linear)
    assert "Q4_1 as Int4Linear" in caplog.text and "expanded" in caplog.text


def test_quantized_model_is_batch_invariant(tiny_model_dir, tmp_path):
    path = _quantized_gguf(tiny_model_dir, tmp_path, "llama", lambda name: Q.Q4_1)
    checkpoint = load_checkpoint(path, torch.bfloat16, keep_quantized=True)
    model = build_model(checkpoint.config, checkpoint.tensors, torch.bfloat16)
    engine = Engine(model, checkpoint.config, None, EngineConfig(dtype="bfloat16", max_num_batched_tokens=64))
    prompts = [[(7 * i + j) % 300 + 3 for j in range(5 + 9 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    together = run_requests(engine, prompts, params, arrive_every=2)
    alone = [run_requests(engine, [prompt], params)[0] for prompt in prompts]
    assert together == alone


def test_quantized_experts_are_batch_invariant(tiny_model_dir, tmp_path):
    """Q4_1 experts, each fed the rows of a step routed to it: a request's greedy tokens and
    logprobs are those it gets alone, also while prompts of 32 tokens or more prefill through bf16
    weights beside other requests' rows through the int4 kernel. Each runs alone on a fresh engine:
    whether a prompt prefills through bf16 also depends on how much of it the prefix cache held
    (`ModelRunner._prefills_in_bf16`), which is not what this test is about."""
    path = _quantized_gguf(tiny_model_dir, tmp_path, "qwen3moe", lambda name: Q.Q4_1)

    def engine() -> Engine:
        checkpoint = load_checkpoint(path, torch.bfloat16, keep_quantized=True)
        model = build_model(checkpoint.config, checkpoint.tensors, torch.bfloat16)
        assert isinstance(model.layers[0].mlp.experts[0].gate_up_proj, Int4Linear)
        return Engine(model, checkpoint.config, None, EngineConfig(dtype="bfloat16", max_num_batched_tokens=64))

    prompts = [[(7 * i + j) % 300 + 3 for j in range(5 + 9 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    together = run_requests(engine(), prompts, params, arrive_every=2, with_logprobs=True)
    assert together == [run_requests(engine(), [prompt], params, with_logprobs=True)[0] for prompt in prompts]


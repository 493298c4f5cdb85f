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
from quill.errors import ModelLoadError
from quill.config import EngineConfig
from quill.layers.embedding import Q8Table, RowsEmbedding
from quill.layers.linear import Linear
from quill.layers.logits import TableHead, int8_lm_head
from quill.layers.matmul import PackedMatmul, kernel_available
from quill.layers.quantized import Int4Linear, Int8GroupLinear, Int8Linear, quantize_per_channel_int8, quantized_linear
from quill.sampling_params import SamplingParams
from quill.models.loader import build_model, load_checkpoint
from quill.models.registry import FAMILIES
from quill.optimize.quantize import quantize_checkpoint
from quill.weights.gguf import read_gguf_tensor_types
from quill.weights.gguf_quant import NATIVE_GGML_TYPES, repack_ggml
from quill.weights.safetensors import load_hf_directory
from quill.weights.gguf_export import write_gguf
from quill.weights.quantized import DeferredWeight, GGMLFileRows, GGMLRows, QuantizedWeight

Q = gguf.GGMLQuantizationType
# byte offsets of the fp16 scales in a block
_FP16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q5_K: (0, 2),
                Q.Q6_K: (208,), Q.Q8_0: (0,)}
_BITS = {Q.Q5_0: 5, Q.Q5_1: 5, Q.Q5_K: 5, Q.Q6_K: 6, Q.Q8_0: 8}  # 4 for the others


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
    bits = _BITS.get(qtype, 4)
    top = int(weight.codes.max())  # random blocks use every bit the format has, and no more
    assert weight.bits == bits and 2 ** (bits - 1) <= top < 2 ** bits
    assert torch.equal(weight.dequantize(), expected)


@pytest.mark.parametrize("qtype", NATIVE_GGML_TYPES, ids=lambda t: t.name)
def test_native_kernels_match_dequantize_then_matmul(qtype):
    rows, cols = 192, 512
    weight = repack_ggml(random_blocks(qtype, rows, cols, np.random.default_rng(1)), qtype, (rows, cols))
    layer = quantized_linear(weight)
    assert isinstance(layer, Int4Linear if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else Int8GroupLinear)
    x = torch.randn(5, cols)
    expected = x @ weight.dequantize().T
    # bf16 activations and bf16 scales: about 3 significant digits.
    torch.testing.assert_close(layer(x), expected, atol=2e-2 * expected.abs().max().item(), rtol=0)
    # The kernel's bf16 scale and zero point each round to 8 significant bits, and so does the
    # weight they make (the kernel multiplies bf16 by bf16).
    dense = weight.dequantize()
    torch.testing.assert_close(layer.dequantize(torch.float32), dense, atol=(2 ** -8 + 2 ** -9) * dense.abs().max().item(),
                               rtol=0)


def _random_weight(rows: int, cols: int, bits: int, group: int, symmetric: bool = False) -> QuantizedWeight:
    codes = torch.randint(0, 2 ** bits, (rows, cols), dtype=torch.uint8)
    scales = torch.rand(rows, cols // group) * 0.01 + 1e-3
    offsets = -(2 ** (bits - 1)) * scales if symmetric else -torch.rand(rows, cols // group) * 0.05
    return QuantizedWeight(codes, scales, offsets, bits, group, "test")


@pytest.mark.parametrize("kernels_on", ["1", "0"])  # the packed kernel, and PyTorch's int4 kernel
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_layers_multiply_by_bf16_of_code_times_scale_plus_zero(group, kernels_on, monkeypatch):
    """What the layer multiplies by: (code - 8) * scale + zero in float32 from its bf16 scale and
    zero, rounded once to bf16 (rounding each step instead changed a real model's greedy answer).
    This pins both the packed layout's round trip and the PyTorch fallback's."""
    monkeypatch.setenv("QUILL_KERNELS", kernels_on)
    weight = _random_weight(320, 512, 4, group)
    layer = Int4Linear(weight)
    scales = weight.scales.to(torch.bfloat16).float()
    zeros = (weight.offsets + 8 * weight.scales).to(torch.bfloat16).float()
    codes = weight.codes.float().view(320, 512 // group, group)
    expected = ((codes - 8) * scales[..., None] + zeros[..., None]).view(320, 512).to(torch.bfloat16)
    assert torch.equal(layer.dequantize(torch.bfloat16), expected)
    x = torch.randn(3, 512).to(torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), x.float() @ expected.float().T, atol=1e-2, rtol=1e-2)


def test_int8_per_channel_kernel():
    weight = _random_weight(128, 256, 8, 256, symmetric=True)
    layer = quantized_linear(weight)
    assert isinstance(layer, Int8Linear)
    x = torch.randn(4, 256)
    expected = x @ weight.dequantize().T
    torch.testing.assert_close(layer(x), expected, atol=2e-2 * expected.abs().max().item(), rtol=0)


def test_byte_codes_run_natively_only_through_the_packed_kernel(monkeypatch):
    assert isinstance(quantized_linear(_random_weight(128, 256, 8, 32, symmetric=True)), Int8GroupLinear)
    assert isinstance(quantized_linear(_random_weight(128, 256, 6, 16)), Int8GroupLinear)
    monkeypatch.setenv("QUILL_KERNELS", "0")
    assert quantized_linear(_random_weight(128, 256, 8, 32, symmetric=True)) is None  # PyTorch has no kernel
    assert quantized_linear(_random_weight(128, 256, 5, 32)) is None


def test_formats_without_a_kernel_are_refused(monkeypatch):
    assert quantized_linear(_random_weight(128, 256, 8, 33)) is None  # an odd group
    assert isinstance(quantized_linear(_random_weight(96, 256, 4, 32)), Int4Linear)
    monkeypatch.setenv("QUILL_KERNELS", "0")
    assert quantized_linear(_random_weight(96, 256, 4, 32)) is None  # PyTorch's takes whole blocks of 64


@pytest.mark.parametrize("kernels_on", ["1", "0"])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_rows_do_not_depend_on_the_batch(kind, kernels_on, monkeypatch):
    """One row (decoding) and many (a prompt) through the same arithmetic: any row, in a call of
    any size from 1 to 64 and at any position, comes out as it does alone."""
    monkeypatch.setenv("QUILL_KERNELS", kernels_on)
    layer = quantized_linear(_random_weight(256, 512, 4, 32) if kind == "int4"
                             else quantize_per_channel_int8(torch.randn(256, 512)))
    x = torch.randn(80, 512, dtype=torch.bfloat16)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    for rows in range(1, 65):
        start = (7 * rows) % (len(x) - rows + 1)
        assert torch.equal(layer(x[start:start + rows]), alone[start:start + rows]), rows


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


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_a_deferred_load_unpacks_one_layer_at_a_time_into_the_same_model(tiny_model_dir, tmp_path, monkeypatch, arch):
    """`load_model` reads GGML blocks as `DeferredWeight`s and unpacks each as its layer is
    installed, instead of every layer first (a byte per code: twice a 4-bit file). The model is
    the eager load's, bit for bit; experts, which a GGUF stacks in one tensor, unpack on reading."""
    import weakref

    import quill.weights.gguf as gguf_reader

    path = _quantized_gguf(tiny_model_dir, tmp_path, arch, lambda name: Q.Q4_1)
    live, most = [0], [0]

    def counted_repack(*args):
        weight = repack_ggml(*args)
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(weight, lambda: live.__setitem__(0, live[0] - 1))
        return weight

    monkeypatch.setattr(gguf_reader, "repack_ggml", counted_repack)
    deferred = load_checkpoint(path, torch.bfloat16, keep_quantized=True, defer_unpacking=True)
    kinds = {type(t) for name, t in deferred.tensors.items() if "layers" in name and name.endswith("proj.weight")}
    model = build_model(deferred.config, deferred.tensors, torch.bfloat16, consume=True)
    most_unpacked, most[0] = most[0], 0
    eager = load_checkpoint(path, torch.bfloat16, keep_quantized=True)
    reference = build_model(eager.config, eager.tensors, torch.bfloat16)
    if arch == "llama":
        assert kinds == {DeferredWeight}
        assert most_unpacked <= 4 < most[0]  # q, k and v to fuse, and the weight before; eagerly all
    else:
        assert DeferredWeight in kinds and QuantizedWeight in kinds  # attention deferred; experts not
    packed = {name: m.matmul.packed for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert packed and packed.keys() == {n for n, m in reference.named_modules() if isinstance(m, Int4Linear)}
    for name, m in reference.named_modules():
        if isinstance(m, Int4Linear):
            assert torch.equal(packed[name], m.matmul.packed) and torch.equal(model.get_submodule(name).matmul.scales,
                                                                               m.matmul.scales), name


def test_quill_quantize_int4_experts_run_natively(tiny_model_dir, tmp_path):
    """`quill quantize` on a Qwen3-MoE model: every expert's projections run through the int4
    kernel like a dense layer's, the router stays float, and the logits stay near the float model's."""
    source = tiny_model_dir("qwen3moe")
    path = tmp_path / "int4.gguf"
    summary = quantize_checkpoint(source, path, "int4", with_tokenizer=False, progress=False)
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


def test_fused_shards_of_different_formats_share_the_widest_codes(tiny_model_dir, tmp_path, caplog):
    # v_proj in Q8_0 beside Q4_1 q/k: one fused qkv matmul of byte codes, exact for both.
    path = _quantized_gguf(tiny_model_dir, tmp_path, "llama",
                           lambda name: Q.Q8_0 if ".attn_v." in name else Q.Q4_1)
    checkpoint = load_checkpoint(path, torch.float32, keep_quantized=True)
    with caplog.at_level(logging.INFO, logger="quill"):
        model = build_model(checkpoint.config, checkpoint.tensors, torch.float32)
    layers = model.layers[0]
    assert isinstance(layers.self_attn.qkv_proj, Int8GroupLinear)
    assert isinstance(layers.mlp.gate_up_proj, Int4Linear)
    assert "Q4_1+Q8_0 as Int8GroupLinear" in caplog.text and "Q4_1 as Int4Linear" in caplog.text
    reference = load_checkpoint(path, torch.float32)
    fused = torch.cat([reference.tensors[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    dense = layers.self_attn.qkv_proj.dequantize(torch.float32)
    torch.testing.assert_close(dense, fused, atol=2 ** -8 * fused.abs().max().item(), rtol=0)


def test_formats_without_a_kernel_are_expanded_and_logged(tiny_model_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("QUILL_KERNELS", "0")  # byte codes have no PyTorch kernel
    path = _quantized_gguf(tiny_model_dir, tmp_path, "llama",
                           lambda name: Q.Q8_0 if ".attn_v." in name else Q.Q4_1)
    checkpoint = load_checkpoint(path, torch.float32, keep_quantized=True)
    with caplog.at_level(logging.INFO, logger="quill"):
        model = build_model(checkpoint.config, checkpoint.tensors, torch.float32)
    assert isinstance(model.layers[0].self_attn.qkv_proj, Linear)
    assert isinstance(model.layers[0].mlp.gate_up_proj, Int4Linear)
    assert "expanded" in caplog.text


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


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_int8_activations_keep_the_model_batch_invariant(tiny_model_dir, tmp_path, qtype):
    """With 8-bit activations every 4-bit layer runs int4_q8.c, and a request's tokens and logprobs
    are still those it gets alone: batched, chunked, with prompts joining mid-flight."""
    if not kernel_available():
        pytest.skip("8-bit activations run in the C kernel")
    path = _quantized_gguf(tiny_model_dir, tmp_path, "llama", lambda name: qtype)
    checkpoint = load_checkpoint(path, torch.bfloat16, keep_quantized=True)
    model = build_model(checkpoint.config, checkpoint.tensors, torch.bfloat16)
    engine = Engine(model, checkpoint.config, None,
                    EngineConfig(dtype="bfloat16", max_num_batched_tokens=64, int8_activations=True))
    assert {m.matmul.format for m in model.modules() if isinstance(m, Int4Linear)} == {"int4_q8"}
    prompts = [[(5 * i + j) % 300 + 3 for j in range(4 + 11 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    together = run_requests(engine, prompts, params, arrive_every=2, with_logprobs=True)
    alone = [run_requests(engine, [prompt], params, with_logprobs=True)[0] for prompt in prompts]
    assert together == alone


def test_int8_activations_are_refused_on_a_gpu_and_reported_where_nothing_takes_them(tiny_model_dir, tmp_path,
                                                                                     caplog):
    """Honoured or refused, never silently ignored: a GPU expands 4-bit weights to bf16, so the
    option is refused there; a model with no 4-bit layer it can switch says so in the log."""
    from quill.engine.runner import ModelRunner
    from quill.errors import InvalidRequestError

    checkpoint = load_checkpoint(tiny_model_dir("llama"), torch.bfloat16)
    model = build_model(checkpoint.config, checkpoint.tensors, torch.bfloat16)
    with pytest.raises(InvalidRequestError, match="on a GPU"):
        ModelRunner(model, checkpoint.config, num_blocks=4, block_size=16, kv_cache_dtype=torch.float16,
                    device=torch.device("cuda"), int8_activations=True)
    with caplog.at_level(logging.WARNING, logger="quill"):
        Engine(model, checkpoint.config, None, EngineConfig(dtype="bfloat16"))
    assert "int8_activations" not in caplog.text  # the default asks for nothing where nothing takes it
    with caplog.at_level(logging.WARNING, logger="quill"):
        Engine(model, checkpoint.config, None, EngineConfig(dtype="bfloat16", int8_activations=True))
    assert "int8_activations changes nothing here" in caplog.text


@pytest.mark.parametrize("dtype, requested, expected", [
    ("bfloat16", None, "int4_q8 with VNNI"), ("float32", None, {"int4"}), ("bfloat16", False, {"int4"}),
    ("float32", True, {"int4_q8"})])
def test_int8_activations_are_the_cpu_default_for_bfloat16_and_an_explicit_choice_wins(
        tiny_model_dir, tmp_path, dtype, requested, expected, monkeypatch):
    """4-bit layers take 8-bit activations by default on the CPU in bfloat16 where the kernel has
    integer dot products (AVX-512 VNNI), as llama.cpp's do; float32, the reference, keeps bfloat16
    activations; and whatever is asked for is done."""
    from quill.engine.runner import int8_activations_for
    from quill.layers.matmul import kernel_path

    if not kernel_available():
        pytest.skip("8-bit activations run in the C kernel")
    if expected == "int4_q8 with VNNI":  # the plain C loops batch slowly: bfloat16 activations stay there
        expected = {"int4"} if kernel_path("int4_q8") == "portable C" else {"int4_q8"}
    path = _quantized_gguf(tiny_model_dir, tmp_path, "llama", lambda name: Q.Q4_1)
    checkpoint = load_checkpoint(path, getattr(torch, dtype), keep_quantized=True)
    model = build_model(checkpoint.config, checkpoint.tensors, getattr(torch, dtype))
    Engine(model, checkpoint.config, None, EngineConfig(dtype=dtype, int8_activations=requested))
    assert {m.matmul.format for m in model.modules() if isinstance(m, Int4Linear)} == expected
    assert not int8_activations_for(None, torch.bfloat16, torch.device("cuda"))  # a GPU expands the weights
    monkeypatch.setattr("quill.engine.runner.kernel_path", lambda fmt="bf16": "portable C")  # a CPU without VNNI
    assert not int8_activations_for(None, torch.bfloat16, torch.device("cpu"))
    assert int8_activations_for(True, torch.bfloat16, torch.device("cpu"))


def test_quantized_experts_are_batch_invariant(tiny_model_dir, tmp_path):
    """Q4_1 experts, each fed the rows of a step routed to it, however many: a request's greedy
    tokens and logprobs are those it gets alone, whatever else the steps held and whatever the
    prefix cache had."""
    path = _quantized_gguf(tiny_model_dir, tmp_path, "qwen3moe", lambda name: Q.Q4_1)
    checkpoint = load_checkpoint(path, torch.bfloat16, keep_quantized=True)
    model = build_model(checkpoint.config, checkpoint.tensors, torch.bfloat16)
    assert isinstance(model.layers[0].mlp.experts[0].gate_up_proj, Int4Linear)
    engine = Engine(model, checkpoint.config, None, EngineConfig(dtype="bfloat16", max_num_batched_tokens=64))
    prompts = [[(7 * i + j) % 300 + 3 for j in range(5 + 9 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    together = run_requests(engine, prompts, params, arrive_every=2, with_logprobs=True)
    assert together == [run_requests(engine, [prompt], params, with_logprobs=True)[0] for prompt in prompts]


class _DenseHead(torch.nn.Module):
    """A head over a float table, with the kernel's arithmetic on it (`PackedMatmul.dense`) and
    `bound` for the error `lm_head_logits` allows it."""

    def __init__(self, table: torch.Tensor, bound) -> None:
        super().__init__()
        self.matmul, self.exact_weight, self.error_bound = PackedMatmul.dense(table), table, bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


@pytest.mark.parametrize("table_type", [Q.Q8_0, Q.Q4_1], ids=lambda t: t.name)
def test_an_embedding_read_from_its_file_blocks_changes_nothing(tiny_model_dir, tmp_path, table_type):
    """A quantized table is held once, never as a float copy, and its rows are the dequantized
    table's bit for bit: a Q8_0 one repacked for the kernel (`Q8Table`), which the tied head
    multiplies by (`TableHead`), any other in its file's blocks (`GGMLRows`) with a tied int8 head.
    The engine's tokens and logprobs are those of the same model holding a float table (and, for
    Q8_0, a head over it that multiplies as the kernel does: the same bf16 weights)."""
    checkpoint = load_hf_directory(tiny_model_dir("gemma3"), FAMILIES)
    path = tmp_path / "gemma3.gguf"
    write_gguf(path, FAMILIES.named("gemma3"), checkpoint.config, checkpoint.tensors,
               tensor_type=lambda name, values: table_type if name == "token_embd.weight" else Q.Q8_0 if values.ndim == 2 else Q.F32)
    native = load_checkpoint(path, torch.bfloat16, keep_quantized=True)
    config = native.config
    model = build_model(config, native.tensors, torch.bfloat16)
    shared = table_type == Q.Q8_0 and kernel_available()
    assert isinstance(model.embed_tokens, RowsEmbedding)
    assert isinstance(model.lm_head, TableHead if shared else Int8Linear)
    assert isinstance(model.embed_tokens.weight, Q8Table if shared else GGMLRows)
    dense = load_checkpoint(path, torch.bfloat16).tensors["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight[0:config.vocab_size], dense)
    ids = torch.tensor([[5, 0, 77], [config.vocab_size - 1, 5, 3]])
    assert torch.equal(model.embed_tokens(ids), dense[ids])

    reference = build_model(config, load_checkpoint(path, torch.bfloat16, keep_quantized=True).tensors, torch.bfloat16)
    reference.embed_tokens = torch.nn.Embedding.from_pretrained(dense)
    reference.lm_head = _DenseHead(dense, model.lm_head.error_bound) if shared else int8_lm_head(dense)
    prompts = [[3, 9, 27, 81], [5, 6], list(range(10, 30))]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
    runs = [run_requests(Engine(m, config, None, EngineConfig(dtype="bfloat16")), prompts, params, with_logprobs=True)
            for m in (model, reference)]
    assert runs[0] == runs[1]


def test_a_q8_0_table_expands_its_rows_as_the_files_blocks_do():
    """Every code (-128 included) and scale sign, by index tensor, slice and a partial last panel:
    `Q8Table`'s rows are gguf-py's dequantized rows, rounded once to the model's dtype."""
    if not kernel_available():
        pytest.skip("no C compiler")
    rows, cols = 16 * 9 + 5, 128
    blocks = torch.from_numpy(random_blocks(Q.Q8_0, rows, cols, np.random.default_rng(4)))
    for dtype in (torch.bfloat16, torch.float32):
        file_rows = GGMLRows(blocks, Q.Q8_0, cols, dtype)
        table = Q8Table(file_rows)
        assert torch.equal(table[0:rows], file_rows[0:rows])
        ids = torch.tensor([[rows - 1, 0, 17], [16, 15, rows - 1]])
        assert torch.equal(table[ids], file_rows[ids])
        assert table[torch.tensor([], dtype=torch.long)].shape == (0, cols)  # no candidates in a vocabulary slice
        assert torch.equal(table.matmul.weight(torch.bfloat16), file_rows[0:rows].to(torch.bfloat16))


def test_a_table_read_from_its_file_a_chunk_at_a_time_is_the_table_read_whole(tmp_path, monkeypatch):
    """`GGMLFileRows` (the loader's table, left in the file): `Q8Table` packs it chunk by chunk
    into what the blocks read whole give; `load` gives those blocks; a cut file is a clear error."""
    if not kernel_available():
        pytest.skip("no C compiler")
    import quill.layers.matmul as matmul_module

    monkeypatch.setattr(matmul_module.pack_pairs, "__defaults__", (None, 64))  # several chunks, a ragged last one
    rows, cols, offset = 16 * 9 + 5, 96, 40
    blocks = random_blocks(Q.Q8_0, rows, cols, np.random.default_rng(6))
    path = tmp_path / "table.bin"
    path.write_bytes(b"h" * offset + blocks.tobytes())
    in_file = GGMLFileRows(path, offset, rows, blocks.shape[1], Q.Q8_0, cols, torch.bfloat16)
    whole = GGMLRows(torch.from_numpy(blocks), Q.Q8_0, cols, torch.bfloat16)
    assert torch.equal(in_file.load().blocks, whole.blocks)
    chunked, reference = Q8Table(in_file), Q8Table(whole)
    assert torch.equal(chunked.matmul.packed, reference.matmul.packed)
    assert torch.equal(chunked.matmul.scales, reference.matmul.scales)
    assert chunked.max_row_norm == reference.max_row_norm > 0
    assert torch.equal(chunked[0:rows], whole[0:rows])
    path.write_bytes(b"h" * offset + blocks.tobytes()[:-1])
    with pytest.raises(ModelLoadError, match="cut short"):
        GGMLFileRows(path, offset, rows, blocks.shape[1], Q.Q8_0, cols, torch.bfloat16).load()


def test_int8_from_float_packs_what_quantizing_whole_would_give():
    """`Int8Linear.from_float` quantizes and packs a chunk of rows at a time (the LM head's load
    peak); the layer must be the one quantizing the whole matrix first makes, bit for bit."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(4096 + 37, 96, generator=generator) * 0.05  # a chunk, then a ragged tail
    weight[3] = 0  # an all-zero row keeps scale 0
    whole, chunked = Int8Linear(quantize_per_channel_int8(weight)), Int8Linear.from_float(weight)
    assert torch.equal(chunked.scales, whole.scales) and chunked.max_step == whole.max_step
    assert torch.equal(chunked.dequantize(torch.float32), whole.dequantize(torch.float32))
    x = torch.randn(3, 96, generator=generator).to(torch.bfloat16)
    assert torch.equal(chunked(x), whole(x))


def test_building_a_model_imports_neither_dynamo_nor_sympy(tiny_model_dir):
    """nn.Embedding's own initialisation on the meta device imported torch._dynamo and sympy,
    80 MB resident for the process's life; the models leave their tables uninitialised."""
    import subprocess
    import sys

    script = ("import sys, torch; from quill.models.loader import build_model, load_checkpoint;"
              "c = load_checkpoint(sys.argv[1]); build_model(c.config, c.tensors, torch.bfloat16);"
              "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir("llama"))], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"

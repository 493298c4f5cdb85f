"""The fused decoder (every layer of a CPU step in one C call) against the module-by-module path:
the same tokens and logprobs, bit for bit, for prompts, chunked prompts, decoding batches and
speculative-free mixed steps; and the models it must leave to the module path."""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from engine_helpers import run_requests, tiny_engine
from quill.config import EngineConfig
from quill.engine.engine import Engine
from quill.layers.fused_layers import FusedLayers
from quill.layers.mlp import GatedMLP
from quill.layers.quantized import Int4Linear
from quill.models.loader import load_model
from quill.optimize.quantize import quantize_checkpoint
from quill.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(320) for _ in range(rng.randint(2, 60))] for _ in range(count)]


def _both_paths(path, rows_per_pass: int | None = None, native: bool = False, **options) -> tuple[list, list]:
    """Tokens and logprobs of staggered requests (prompt rows beside decoding rows, prompts cut
    into chunks), with the fused layers and with the modules. `native`: quantized weights load as
    quantized layers, as `LLM` loads them (the test helper expands them)."""
    prompts = _prompts(5)
    params = [SamplingParams(max_tokens=8 + i, temperature=0, ignore_eos=True, logprobs=3) for i in range(5)]
    results = []
    for fused in (True, False):
        if native:
            engine = Engine(*load_model(path, torch.bfloat16), None,
                            EngineConfig(dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=32, **options))
        else:
            engine = tiny_engine(path, dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=32, **options)
        model = engine.runner.model
        assert model.fused_layers is not None
        if native:  # the 4-bit kernel the options ask for, not weights expanded at load
            wanted = "int4_q8" if options.get("int8_activations") else "int4"
            assert {m.matmul.format for m in model.modules() if isinstance(m, Int4Linear)} == {wanted}
        if rows_per_pass:
            model.fused_layers.rows_per_pass = rows_per_pass
        if not fused:
            model.fused_layers = None
        results.append(run_requests(engine, prompts, params, with_logprobs=True, arrive_every=2))
    return results[0], results[1]


# qwen2: biases on q, k, v; smollm3: a layer without RoPE; phi3: a window shorter than the prompts;
# qwen3: q/k norms; gemma3: those with offset norms, block output norms, GELU, two RoPE tables
@pytest.mark.parametrize("arch", ["llama", "qwen2", "smollm3", "phi3", "qwen3", "gemma3"])
def test_fused_layers_give_the_module_paths_tokens_and_logprobs(arch, tiny_model_dir):
    fused, modules = _both_paths(tiny_model_dir(arch))
    assert fused == modules


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_step_cut_into_passes_through_the_layers_computes_the_same(arch, tiny_model_dir):
    fused, modules = _both_paths(tiny_model_dir(arch), rows_per_pass=5)  # steps of up to 32 rows
    assert fused == modules


@pytest.mark.parametrize("int8_activations", [False, True], ids=["bf16-activations", "int8-activations"])
def test_fused_layers_run_int4_weights_as_the_modules_do(tiny_model_dir, tmp_path, int8_activations):
    path = tmp_path / "int4.gguf"
    quantize_checkpoint(tiny_model_dir("llama"), path, "int4", group_size=32, with_tokenizer=False, progress=False)
    fused, modules = _both_paths(path, native=True, int8_activations=int8_activations)
    assert fused == modules


def test_layers_the_c_file_does_not_describe_keep_the_module_path(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir("qwen3moe"), dtype="bfloat16")  # experts
    assert engine.runner.model.fused_layers is None


def test_float32_models_and_kernels_off_keep_the_module_path(tiny_model_dir, monkeypatch):
    assert tiny_engine(tiny_model_dir("llama"), dtype="float32").runner.model.fused_layers is None
    monkeypatch.setenv("QUILL_KERNELS", "0")
    assert tiny_engine(tiny_model_dir("llama"), dtype="bfloat16").runner.model.fused_layers is None


def test_a_step_with_prompt_spans_is_left_to_the_modules(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir("llama"), dtype="bfloat16")
    fused = engine.runner.model.fused_layers
    assert isinstance(fused, FusedLayers)
    from quill.layers.attention import AttentionMetadata, PromptSpan

    spans = AttentionMetadata(torch.arange(4), None, [PromptSpan(0, 4, 4, None)])
    assert not fused.takes(torch.zeros(4, 64, dtype=torch.bfloat16), spans)


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_the_activation_kernel_is_the_activation_within_its_two_roundings(activation):
    width = 150  # not a multiple of 16: the masked tail
    mlp = GatedMLP(8, width, activation)
    assert mlp._kernel is not None
    gate_up = (torch.randn(37, 2 * width, generator=torch.Generator().manual_seed(0)) * 4).to(torch.bfloat16)
    got = mlp._in_kernel(gate_up).double()
    gate, up = gate_up.double().split(width, dim=-1)
    # x sigmoid(z) in float64; for GELU, 0.5 x (1 + tanh(z / 2)), which rounds to 0 long before
    # the kernel's form does (x = -7: tanh is -1 in float64)
    z = gate if activation == "silu" else 2 * (2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate ** 3)
    expected = gate * torch.sigmoid(z) * up
    # two bf16 roundings (the activation, the product), each within 2^-9 of the value, and the
    # float32 arithmetic before them; below e^-87 the exponential stops (values under 1e-36)
    assert torch.allclose(got, expected, rtol=2 ** -7, atol=1e-35)
    rows = torch.stack([mlp._in_kernel(gate_up[i:i + 1])[0] for i in range(5)])
    assert torch.equal(rows, mlp._in_kernel(gate_up)[:5])  # a row alone computes what it does in a batch

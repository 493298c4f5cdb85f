"""Tensor parallelism (quill/distributed/): a model split over 2 processes on the CPU (gloo, over
loopback) computes the logits of the whole model in one process, within float32 rounding (the
all-reduce sums partial products in another order), and so the same greedy tokens; models that
do not split are refused before any process starts."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import tiny_models
from engine_helpers import run_outputs, run_requests
from quill import LLM, cli
from quill.config import EngineConfig
from quill.distributed import start_tensor_parallel
from quill.distributed.channel import decode, encode
from quill.distributed.shard import ShardPlan
from quill.engine.batch import PromptPlan, StepBatch
from quill.engine.engine import Engine
from quill.errors import InvalidRequestError, UnsupportedModelError
from quill.models.loader import load_checkpoint, load_model
from quill.layers.matmul import kernel_available
from quill.layers.quantized import Int4Linear
from quill.optimize.quantize import quantize_checkpoint
from quill.sampling_params import SamplingParams
from quill.weights.quantized import QuantizedWeight

CPU = torch.device("cpu")
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[(7 * i + j) % 300 + 3 for j in range(5 + 9 * i)] for i in range(4)]


# ----------------------------------------------------------------------------- no processes


def test_a_step_travels_to_the_other_ranks_unchanged():
    batch = StepBatch(token_ids=[5, 6, 7, 8], positions=[0, 1, 2, 9], slot_mapping=[16, 17, 18, 41],
                      single_rows=[3], single_context_lens=[10], single_tables=[[2, 7]],
                      prompts=[PromptPlan(0, 2, 2, None), PromptPlan(2, 1, 5, [32, 33, 34, 35, 36])],
                      sample_rows=[1, 2, 3], prompt_logprob_rows=[0, 1], prompt_logprob_targets=[6, 7],
                      prompt_logprob_top=[2, 2])
    assert decode(encode(batch)) == batch
    assert decode(encode(StepBatch())) == StepBatch()


class _RecordingChannel:
    def __init__(self) -> None:
        self.batches: list[StepBatch] = []

    def open(self, num_blocks: int, block_size: int, cache_dtype: torch.dtype, int8_activations: bool) -> None:
        self.num_blocks = num_blocks

    @contextlib.contextmanager
    def step(self, batch: StepBatch):
        self.batches.append(batch)
        yield


def test_decode_graphs_are_off_with_a_step_channel_so_the_other_ranks_see_every_decode_step(tiny_model_dir):
    """A padded decode step does not go through `ModelRunner.run`: with a channel it must not be taken."""
    model, config = load_model(tiny_model_dir("llama"), torch.float32)
    channel = _RecordingChannel()
    engine = Engine(model, config, None, EngineConfig(dtype="float32", decode_graphs="eager"), step_channel=channel)
    assert engine.runner.decode is None
    run_requests(engine, PROMPTS[:2], GREEDY)
    decode_steps = [b for b in channel.batches if len(b.token_ids) == 2 and b.single_rows == [0, 1]]
    assert len(decode_steps) == GREEDY.max_tokens - 1  # the first token of each comes from its prompt's step


def test_the_ranks_shares_rebuild_every_weight(tmp_path):
    """Heads, KV heads, MLP width and an odd vocabulary split into parts that, put back together,
    are the whole tensors; a row-parallel bias is added once; quantized groups split whole."""
    checkpoint = load_checkpoint(tiny_models.build_llama(tmp_path / "llama", vocab_size=321))
    config, tensors = checkpoint.config, checkpoint.tensors
    plans = [ShardPlan(config, rank, 2) for rank in range(2)]
    shares = [plan.shard(tensors) for plan in plans]
    assert [plan.vocab_range() for plan in plans] == [(0, 161), (161, 321)]
    assert sum(plan.local_config().vocab_size for plan in plans) == 321
    q, kv = config.num_heads * config.head_dim // 2, config.num_kv_heads * config.head_dim // 2
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        full = tensors[f"model.layers.1.self_attn.{name}.weight" if name[0] in "qkv" else f"model.layers.1.mlp.{name}.weight"]
        parts = [s[f"model.layers.1.self_attn.{name}.weight" if name[0] in "qkv" else f"model.layers.1.mlp.{name}.weight"]
                 for s in shares]
        assert torch.equal(torch.cat(parts), full)
        assert parts[0].shape[0] == {"q": q, "k": kv, "v": kv}.get(name[0], config.intermediate_size // 2)
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(torch.cat([s[name] for s in shares], dim=1), tensors[name])
    assert torch.equal(torch.cat([s["lm_head.weight"] for s in shares]), tensors["lm_head.weight"])
    bias = torch.arange(4.0)
    assert [plan.shard({"layers.0.mlp.down_proj.bias": bias})["layers.0.mlp.down_proj.bias"].tolist()
            for plan in plans] == [[0, 1, 2, 3], [0, 0, 0, 0]]
    o_proj = "layers.0.self_attn.o_proj.weight"  # 4 heads of 16: 32 input columns each
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    for weight, group in ((QuantizedWeight(codes, torch.rand(8, 2), torch.rand(8, 2), 4, 32, "Q4_1"), 32),
                          (QuantizedWeight(codes, torch.rand(8, 1), torch.rand(8, 1), 8, 64, "int8"), 32)):
        split = [plan.shard({o_proj: weight})[o_proj] for plan in plans]
        assert [s.group_size for s in split] == [group, group]  # a per-row scale's group narrows with the split
        assert torch.equal(torch.cat([s.dequantize() for s in split], dim=1), weight.dequantize())


def test_a_model_whose_kv_heads_do_not_split_is_refused_before_any_process_starts(tiny_model_dir):
    """Tiny Gemma 3 has one KV head."""
    with pytest.raises(UnsupportedModelError, match="does not divide the model's 1 KV heads"):
        start_tensor_parallel(tiny_model_dir("gemma3"), 2, torch.float32, CPU)
    assert not torch.distributed.is_initialized()


def test_a_trimmed_output_vocabulary_is_refused_before_any_process_starts(tiny_model_dir):
    """Its LM head has a row per kept token, not the vocabulary's rows that the split divides."""
    path = tiny_model_dir("llama")
    config = dataclasses.replace(load_checkpoint(path, torch.float32).config, tie_word_embeddings=False,
                                 output_token_ids=(3, 5, 8))
    with pytest.raises(UnsupportedModelError, match="trimmed output vocabulary"):
        ShardPlan(config, 0, 2).check({})


def test_quantized_groups_that_a_split_would_cut_are_refused(tiny_model_dir, tmp_path):
    """Llama's MLP width 160 splits into 80 columns: not whole groups of int4's 32."""
    path = tmp_path / "int4.gguf"
    quantize_checkpoint(tiny_model_dir("llama"), path, "int4", with_tokenizer=False, progress=False)
    with pytest.raises(UnsupportedModelError, match="80, not a multiple of its int4 group size 32"):
        start_tensor_parallel(path, 2, torch.float32, CPU)


def test_a_size_below_two_or_a_mismatched_launcher_is_refused(tiny_model_dir, monkeypatch):
    with pytest.raises(InvalidRequestError, match="2 or more") as error:
        start_tensor_parallel(tiny_model_dir("llama"), 0, torch.float32, CPU)
    assert error.value.param == "tensor_parallel_size"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(InvalidRequestError, match="does not match WORLD_SIZE 4"):
        start_tensor_parallel(tiny_model_dir("llama"), 2, torch.float32, CPU)


# ----------------------------------------------------------------------------- 2 processes


@contextlib.contextmanager
def _split_engine(path: Path, **options):
    parallel = start_tensor_parallel(path, 2, torch.float32, CPU)
    try:
        yield Engine(parallel.model, parallel.config, None, EngineConfig(dtype="float32", **options),
                     step_channel=parallel.channel)
    finally:
        parallel.close()
    assert not torch.distributed.is_initialized()
    assert all(p.exitcode == 0 for p in parallel.processes.processes)  # stopped, not killed


def test_a_step_that_fails_on_rank_0_midway_ends_the_group_instead_of_hanging(tmp_path, monkeypatch):
    """Rank 0 raises in its MLP, after the step's first all-reduce: the other rank waits in the
    next one for ever. Later steps are refused, and closing ends that rank instead of sending it a
    STOP it would take for the all-reduce (before, both sides waited for ever)."""
    path = tiny_models.build_qwen2(tmp_path / "qwen2")
    parallel = start_tensor_parallel(path, 2, torch.float32, CPU)
    try:
        engine = Engine(parallel.model, parallel.config, None, EngineConfig(dtype="float32"),
                        step_channel=parallel.channel)
        def boom(mlp, x):
            raise RuntimeError("boom in rank 0's MLP")

        monkeypatch.setattr(type(parallel.model.layers[0].mlp), "__call__", boom)  # rank 0's process only
        engine.add_request(PROMPTS[0], GREEDY)
        with pytest.raises(RuntimeError, match="boom"):
            engine.step()
        with pytest.raises(RuntimeError, match=r"out of step since a step failed on rank 0 \(RuntimeError: boom"):
            engine.runner.run(StepBatch(token_ids=[1], positions=[0], slot_mapping=[0]))
    finally:
        closing = threading.Thread(target=parallel.close, daemon=True)
        closing.start()
        closing.join(timeout=60)
    assert not closing.is_alive(), "close() hung"
    assert not torch.distributed.is_initialized()
    assert not any(p.is_alive() for p in parallel.processes.processes)


def _assert_same_model(whole: Engine, split: Engine, tolerance: float = 1e-5) -> None:
    ids = list(range(3, 45))
    expected, got = whole.runner.prompt_logits(ids), split.runner.prompt_logits(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance * expected.abs().max().item())
    assert torch.equal(got.argmax(dim=-1), expected.argmax(dim=-1))
    # Prompt logprobs, the prompt in chunks: the other ranks join every piece of the scoring (the
    # split head's collectives), and the records are the whole model's (the most likely token the
    # same, as the argmax above; the runners-up may swap within the tolerance).
    scoring = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    mine, theirs = (run_outputs(engine, [ids], scoring)[0].prompt_logprobs[1:] for engine in (split, whole))
    assert [(r.token_id, r.top[0][0]) for r in mine] == [(r.token_id, r.top[0][0]) for r in theirs]
    torch.testing.assert_close(torch.tensor([r.logprob for r in mine]), torch.tensor([r.logprob for r in theirs]),
                               rtol=0, atol=tolerance * expected.abs().max().item() * 2)
    # Greedy tokens through every path: prompts chunked, requests joining running batches, decoding;
    # and, as in one process, a request's tokens do not depend on the batch around it.
    together = run_requests(split, PROMPTS, GREEDY, arrive_every=2)
    assert together == run_requests(whole, PROMPTS, GREEDY, arrive_every=2)
    assert together == [run_requests(split, [prompt], GREEDY)[0] for prompt in PROMPTS]


def _gemma3(path: Path) -> Path:
    return tiny_models.build_gemma3(path, num_kv_heads=2)


DENSE = {"qwen2": tiny_models.build_qwen2, "gemma3": _gemma3}
QUANTIZED = {  # MLP widths whose halves are whole groups of 32
    "llama-int8": (tiny_models.build_llama, "int8"),
    "qwen2-q8_0": (lambda path: tiny_models.build_qwen2(path, intermediate_size=128), "q8_0"),
    "gemma3-int4": (_gemma3, "int4"),
}


@pytest.mark.parametrize("arch", DENSE)
def test_split_dense_model_computes_the_whole_models_logits_and_tokens(arch, tmp_path):
    path = DENSE[arch](tmp_path / arch)
    model, config = load_model(path, torch.float32)
    whole = Engine(model, config, None, EngineConfig(dtype="float32", max_num_batched_tokens=32))
    with _split_engine(path, max_num_batched_tokens=32) as split:
        _assert_same_model(whole, split)


@pytest.mark.parametrize("int8_activations", [False, True], ids=["bf16-activations", "int8-activations"])
@pytest.mark.parametrize("variant", QUANTIZED)
def test_split_quantized_model_computes_the_whole_models_logits_and_tokens(variant, int8_activations, tmp_path):
    """The quantized kernels take activations in bf16 (quill/kernels/matmul.c): a float32 rounding
    difference from the all-reduce's order can tip an activation to the neighbouring bf16 value,
    so logits agree within bf16 rounding (measured: at most 0.5% of the largest logit), not
    float32's; the argmax at every position and the greedy tokens are the same. With 8-bit
    activations (4-bit layers only) each rank quantizes its own share of a row-parallel layer's
    inputs, in the whole model's blocks of 32, and the same holds."""
    build, qtype = QUANTIZED[variant]
    if int8_activations and (qtype != "int4" or not kernel_available()):
        pytest.skip("8-bit activations change only 4-bit layers, in the C kernel")
    path = tmp_path / f"{variant}.gguf"
    quantize_checkpoint(build(tmp_path / variant), path, qtype, with_tokenizer=False, progress=False)
    model, config = load_model(path, torch.float32)
    options = dict(max_num_batched_tokens=32, int8_activations=int8_activations)
    whole = Engine(model, config, None, EngineConfig(dtype="float32", **options))
    with _split_engine(path, **options) as split:
        assert split.runner.quantized  # the shares run natively, not expanded
        if int8_activations:
            assert {m.matmul.format for m in split.runner.model.modules() if isinstance(m, Int4Linear)} == {"int4_q8"}
        _assert_same_model(whole, split, tolerance=2 ** -7)


def test_llm_with_tensor_parallel_size_generates_the_single_process_text(tiny_model_with_tokenizer):
    """The Python API (what `quill run` and `quill serve` build): Llama split over 2 processes."""
    path = tiny_model_with_tokenizer("llama", "bpe")
    whole = LLM(path, dtype="float32", device="cpu")
    threads = torch.get_num_threads()
    split = LLM(path, dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        assert split.parallel.processes is not None and len(split.parallel.processes.processes) == 1
        ids = whole.tokenizer.encode("the quick brown fox jumps over the lazy dog")
        torch.testing.assert_close(split.engine.runner.prompt_logits(ids), whole.engine.runner.prompt_logits(ids),
                                   rtol=1e-4, atol=1e-5)
        prompts = ["the quick brown fox", "a b c"]
        assert [o.text for o in split.generate(prompts, GREEDY)] == [o.text for o in whole.generate(prompts, GREEDY)]
    finally:
        split.close()
    assert torch.get_num_threads() == threads  # rank 0 gives back the cores it shared
    assert "RANK" not in os.environ


# ----------------------------------------------------------------------------- entry points


def test_a_single_process_run_does_not_load_torch_distributed_machinery(tiny_model_dir):
    code = ("import sys, torch; from quill.models.loader import load_model; from quill.engine.engine import Engine; "
            "from quill.config import EngineConfig; import quill.llm, quill.cli; "
            f"m, c = load_model({str(tiny_model_dir('llama'))!r}, torch.float32); "
            "Engine(m, c, None, EngineConfig(dtype='float32')); "
            "print(sorted(n for n in sys.modules if n.startswith('quill.distributed')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


class _Built(Exception):
    pass


def test_quill_run_passes_the_tensor_parallel_size_to_the_llm(monkeypatch, tiny_model_dir):
    import quill

    asked = {}

    def fake_llm(model, **options):
        asked.update(options)
        raise _Built

    monkeypatch.setattr(quill, "LLM", fake_llm)
    with pytest.raises(_Built):
        cli.main(["run", str(tiny_model_dir("llama")), "hi", "--tensor-parallel-size", "2"])
    assert asked["tensor_parallel_size"] == 2


def test_under_a_launcher_ranks_past_0_serve_steps_instead_of_the_command(monkeypatch, tiny_model_dir):
    import quill
    import quill.distributed

    served = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(quill.distributed, "serve_as_worker",
                        lambda path, size, dtype, device, dequantize: served.append((Path(path), size, dtype)) or True)
    monkeypatch.setattr(quill, "LLM", lambda *a, **k: pytest.fail("a worker rank built an LLM"))
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", str(tiny_model_dir("llama")), "--tensor-parallel-size", "2", "--dtype", "float32"])
    assert info.value.code == 0
    assert served == [(tiny_model_dir("llama"), 2, torch.float32)]

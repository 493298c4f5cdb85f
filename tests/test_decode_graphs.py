"""Padded decode steps (what CUDA graphs replay): padding rows never change a real row's output.

On the CPU the padded runner is run eagerly, against the plain path on the same requests: logits
(as logprobs) and tokens must be bit-identical, with the C attention kernel and without it. The
CUDA graph's replay is checked against the same runner run eagerly where CUDA is present.
"""
from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import load_model, run_requests, tiny_engine
from quill.config import EngineConfig
from quill.engine.decode_graphs import PaddedDecodeRunner, batch_buckets, build_decode_runner, width_bucket
from quill.engine.engine import Engine
from quill.errors import InvalidRequestError
from quill.sampling_params import SamplingParams

LOGPROBS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(320) for _ in range(rng.randint(2, 70))] for _ in range(count)]


def test_buckets_cover_every_batch_size_up_to_the_maximum():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    for maximum in (1, 3, 8, 13, 64):
        buckets = batch_buckets(maximum)
        assert buckets == sorted(set(buckets)) and buckets[-1] == maximum


def test_table_widths_are_powers_of_two_up_to_the_window():
    assert [width_bucket(n, 512) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    assert width_bucket(300, 256) == 256


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding-window layers
@pytest.mark.parametrize("kernels_on", ["1", "0"])
def test_padded_decode_gives_the_plain_paths_logits(arch, kernels_on, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QUILL_KERNELS", kernels_on)
    path = tiny_model_dir(arch)
    prompts = _prompts(5)  # 5 rows pad to 8, then 4 to 4, 3 to 4... as requests finish
    params = [SamplingParams(max_tokens=6 + i, temperature=0, ignore_eos=True, logprobs=3) for i in range(5)]
    plain = tiny_engine(path, decode_graphs="off", max_num_seqs=12)
    padded = tiny_engine(path, decode_graphs="eager", max_num_seqs=12)
    assert plain.runner.decode is None and isinstance(padded.runner.decode, PaddedDecodeRunner)
    expected = run_requests(plain, prompts, params, with_logprobs=True)
    assert run_requests(padded, prompts, params, with_logprobs=True, arrive_every=2) == expected


def test_padding_rows_leave_real_rows_bit_identical(tiny_model_dir):
    """The same three decode rows padded to 4 and to 16 rows: identical hidden states."""
    engine = tiny_engine(tiny_model_dir("llama"), decode_graphs="eager", max_num_seqs=16)
    for prompt in _prompts(3, seed=1):
        engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.step()  # prefill all three: their KV is in the cache now
    requests = list(engine.requests.values())
    decode = engine.runner.decode
    inputs = ([r.token_ids[-1] for r in requests], [r.num_tokens - 1 for r in requests],
              [engine.runner._slot(r, r.num_tokens - 1) for r in requests], [r.block_ids for r in requests],
              [r.num_tokens for r in requests])
    small = decode.run(*inputs)
    decode.buckets = [16]
    wide = decode.run(*inputs)
    assert small.shape[0] == 3 and torch.equal(small, wide)


def test_modes_choose_the_runner(tiny_model_dir):
    model, _ = load_model(tiny_model_dir("llama"))
    options = dict(max_num_seqs=4, max_blocks=8, block_size=16, pad_block=10, device=torch.device("cpu"))
    assert build_decode_runner("auto", model, has_experts=False, **options) is None  # no graphs on a CPU
    assert build_decode_runner("off", model, has_experts=False, **options) is None
    assert isinstance(build_decode_runner("eager", model, has_experts=True, **options), PaddedDecodeRunner)
    with pytest.raises(ValueError, match="decode_graphs"):
        build_decode_runner("always", model, has_experts=False, **options)
    with pytest.raises(InvalidRequestError, match="decode_graphs"):
        EngineConfig(decode_graphs="always").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager(tiny_model_dir):
    path = tiny_model_dir("llama")
    engines = []
    for mode in ("eager", "auto"):
        model, config = load_model(path)
        engines.append(Engine(model.cuda(), config, None,
                              EngineConfig(dtype="float32", decode_graphs=mode, max_num_seqs=8)))
    eager, graphs = engines
    assert type(graphs.runner.decode).__name__ == "CudaGraphDecodeRunner"
    prompts = _prompts(6)
    assert run_requests(graphs, prompts, LOGPROBS, with_logprobs=True, arrive_every=2) == \
        run_requests(eager, prompts, LOGPROBS, with_logprobs=True, arrive_every=2)

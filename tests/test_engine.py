"""The engine's fast paths against the plain path: batching, prefix caching, chunked prefill and
preemption must give exactly the tokens that one request alone gives, and never leak blocks."""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from engine_helpers import run_requests, tiny_engine
from quill.engine.runner import kv_bytes_per_token
from quill.errors import ContextLengthError, InvalidRequestError
from quill.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def _prompts(seed: int = 0, count: int = 10) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(320) for _ in range(rng.randint(3, 60))] for _ in range(count)]
    shared = prompts[0][:40]  # long shared prefixes exercise the prefix cache
    return prompts + [shared + [5, 6, 7], shared[:33] + [9], list(shared)]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3", "qwen3", "smollm3", "phi3", "qwen3moe"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def reference(arch, tiny_model_dir):
    """Each prompt generated alone, with every fast path off: the plain path."""
    path = tiny_model_dir(arch)
    engine = tiny_engine(path, enable_prefix_caching=False)
    return path, [run_requests(engine, [p], GREEDY)[0] for p in _prompts()]


def _assert_no_leaks(engine) -> None:
    assert not engine.has_unfinished()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert all(count == 0 for count in engine.kv_cache.ref_counts)


@pytest.mark.parametrize("options, arrive_every", [
    ({}, 0),  # everything at once
    ({}, 3),  # continuous batching: requests join a running batch
    ({"enable_prefix_caching": False}, 2),
    ({"max_num_batched_tokens": 7}, 0),  # chunked prefill
    ({"max_num_seqs": 3}, 1),
    ({"decode_graphs": "eager"}, 2),  # decode steps padded to batch buckets, as CUDA graphs replay them
])
def test_fast_paths_match_single_request(reference, options, arrive_every):
    path, expected = reference
    engine = tiny_engine(path, **options)
    assert run_requests(engine, _prompts(), GREEDY, arrive_every=arrive_every) == expected
    _assert_no_leaks(engine)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_bfloat16_batching_matches_single_request(reference):
    """Rows batched, arriving mid-run, prefilled in chunks and from the prefix cache. The C kernel
    attends every prompt token as a row of its own, so a prompt's logits do not depend on how it
    was cut. (PyTorch's fused prompt attention, the path without a compiler, moves them by ~1e-7,
    which a bfloat16 model may round into another token: the limit the README states.)"""
    path, _ = reference
    bf16 = [run_requests(tiny_engine(path, dtype="bfloat16"), [p], GREEDY)[0] for p in _prompts()]
    engine = tiny_engine(path, dtype="bfloat16", max_num_batched_tokens=32)
    assert engine.runner.prompts_as_rows
    assert run_requests(engine, _prompts(), GREEDY, arrive_every=2) == bf16
    assert run_requests(engine, _prompts(), GREEDY) == bf16  # now from the prefix cache
    _assert_no_leaks(engine)


def test_kv_cache_dtype_defaults_and_validation(tiny_model_dir):
    from quill.engine.runner import kv_cache_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kv_cache_dtype("auto", torch.bfloat16, cpu) == torch.float16  # half the bytes to read per token
    assert kv_cache_dtype("auto", torch.float32, cpu) == torch.float32  # the exact reference stays exact
    assert kv_cache_dtype("auto", torch.bfloat16, cuda) == torch.bfloat16
    assert kv_cache_dtype("bfloat16", torch.float32, cpu) == torch.bfloat16
    path = tiny_model_dir("llama")
    float16_blocks = tiny_engine(path, kv_cache_dtype="float16", kv_cache_memory=1 << 20).kv_cache.num_blocks
    assert float16_blocks == 2 * tiny_engine(path, kv_cache_memory=1 << 20).kv_cache.num_blocks
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype"):
        tiny_engine(path, kv_cache_dtype="int8")


@pytest.mark.parametrize("kv_cache_dtype", ["float16", "bfloat16"])
def test_half_size_kv_cache_fast_paths_match_single_request(reference, kv_cache_dtype):
    """A float32 model over a half-size cache: batching, chunked prefill and prefix caching give the
    tokens of each request alone over the same cache (attention sees keys as the cache holds them,
    whichever path wrote or read them)."""
    path, _ = reference
    alone = [run_requests(tiny_engine(path, kv_cache_dtype=kv_cache_dtype), [p], GREEDY)[0] for p in _prompts()]
    engine = tiny_engine(path, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=7)
    assert engine.runner.model.layers[0].self_attn.attn.k_cache.dtype == getattr(torch, kv_cache_dtype)
    assert run_requests(engine, _prompts(), GREEDY, arrive_every=2) == alone
    assert run_requests(engine, _prompts(), GREEDY) == alone  # now from the prefix cache
    _assert_no_leaks(engine)


def test_prefix_cache_hits_and_matches(reference):
    path, expected = reference
    engine = tiny_engine(path)
    prompts = _prompts()
    first = run_requests(engine, prompts, GREEDY)
    hits_before = engine.stats().prefix_cache_hits
    second = run_requests(engine, prompts, GREEDY)  # everything is cached now
    assert first == second == expected
    full_blocks = sum((len(p) - 1) // engine.kv_cache.block_size for p in prompts)
    assert engine.stats().prefix_cache_hits - hits_before == full_blocks * engine.kv_cache.block_size
    _assert_no_leaks(engine)


def test_preemption_when_blocks_run_out(reference, arch):
    path, expected = reference
    probe = tiny_engine(path)
    per_token = kv_bytes_per_token(probe.model_config, torch.float32)
    engine = tiny_engine(path, kv_cache_memory=per_token * 16 * 8)  # 8 blocks of 16 tokens
    assert engine.kv_cache.num_blocks == 8
    assert run_requests(engine, _prompts(), GREEDY) == expected
    assert engine.stats().num_preemptions > 0
    _assert_no_leaks(engine)


def test_seeded_sampling_is_batch_independent(reference):
    path, _ = reference
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    prompts = _prompts()
    alone = run_requests(tiny_engine(path), [prompts[0]], seeded)[0]
    noise = SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True)
    busy = run_requests(tiny_engine(path), prompts, [seeded] + [noise] * (len(prompts) - 1), arrive_every=1)[0]
    assert alone == busy
    other_seed = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    assert run_requests(tiny_engine(path), [prompts[0]], other_seed)[0] != alone


@pytest.mark.parametrize("abort_after_steps", [0, 1, 3, 8])
def test_abort_frees_blocks(reference, abort_after_steps):
    path, _ = reference
    engine = tiny_engine(path, max_num_batched_tokens=16)  # long prompts stay in prefill for a while
    ids = [engine.add_request(p, GREEDY) for p in _prompts()]
    for _ in range(abort_after_steps):
        engine.step()
    for request_id in ids[::2]:
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()
    _assert_no_leaks(engine)


def test_stop_token_ids_and_max_tokens(reference):
    path, expected = reference
    engine = tiny_engine(path)
    target = expected[0][4]
    first_hit = expected[0].index(target)
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[target])
    engine.add_request(_prompts()[0], params)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].token_ids == expected[0][:first_hit + 1]
    engine.add_request(_prompts()[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        last = engine.step()
    assert last[-1].finish_reason == "length" and len(last[-1].token_ids) == 3


def test_bad_requests_are_clear_errors(reference):
    path, _ = reference
    engine = tiny_engine(path, max_model_len=64)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request([1, 2, 10_000], GREEDY)
    with pytest.raises(ContextLengthError, match="64"):
        engine.add_request(list(range(64)), GREEDY)
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        engine.add_request("text needs a tokenizer", GREEDY)
    _assert_no_leaks(engine)


def test_max_model_len_ends_generation(reference):
    path, _ = reference
    engine = tiny_engine(path, max_model_len=40)
    out = run_requests(engine, [list(range(1, 31))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    assert len(out[0]) == 10  # 30 prompt tokens + 10 generated fill the 40-token window


def test_n_completions_share_the_prompt_blocks(reference):
    path, _ = reference
    prompt = _prompts()[1]
    engine = tiny_engine(path)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True)
    request_id = engine.add_request(prompt, params)
    finished = {}
    while engine.has_unfinished():
        for output in engine.step():
            assert output.request_id == request_id
            if output.finished:
                finished[output.index] = output.token_ids
    assert sorted(finished) == [0, 1, 2]
    # The siblings waited for the first one's prefill and then reused its full blocks.
    assert engine.stats().prefix_cache_hits == 2 * ((len(prompt) - 1) // engine.kv_cache.block_size) * 16
    # Completion i is the same as a lone request seeded with seed + i.
    for index, tokens in finished.items():
        alone = SamplingParams(max_tokens=8, temperature=1.0, seed=7 + index, ignore_eos=True)
        assert run_requests(tiny_engine(path), [prompt], alone)[0] == tokens
    _assert_no_leaks(engine)


def test_logprobs_are_the_models_distribution(reference, arch, tiny_model_dir):
    from engine_helpers import all_position_logits, load_model

    path, expected = reference
    prompt = _prompts()[2]
    engine = tiny_engine(path)
    engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0, logprobs=4, ignore_eos=True))
    while engine.has_unfinished():
        outputs = engine.step()
    logprobs = outputs[-1].logprobs
    model, config = load_model(path)
    reference_logprobs = torch.log_softmax(all_position_logits(model, config, prompt)[-1], -1)
    first = logprobs[0]
    assert first.token_id == expected[2][0] == int(reference_logprobs.argmax())
    assert abs(first.logprob - float(reference_logprobs.max())) < 1e-4
    assert [t for t, _ in first.top] == reference_logprobs.topk(4).indices.tolist()
    assert len(logprobs) == 3


def test_penalties_bias_and_min_tokens(reference):
    path, expected = reference
    prompt = _prompts()[0]
    greedy_first = expected[0][0]
    engine = tiny_engine(path)
    banned = SamplingParams(max_tokens=4, temperature=0, logit_bias={greedy_first: -100.0}, ignore_eos=True)
    assert run_requests(engine, [prompt], banned)[0][0] != greedy_first
    forced = SamplingParams(max_tokens=4, temperature=0, logit_bias={17: 100.0}, ignore_eos=True)
    assert run_requests(engine, [prompt], forced)[0] == [17] * 4
    # A strong frequency penalty forbids repeating a token that the bias would otherwise force.
    no_repeats = SamplingParams(max_tokens=4, temperature=0, logit_bias={17: 3.0}, frequency_penalty=2.0,
                                presence_penalty=2.0, ignore_eos=True)
    tokens = run_requests(engine, [prompt], no_repeats)[0]
    assert tokens[0] == 17 and 17 not in tokens[1:]
    # min_tokens suppresses a stop token id until enough tokens exist.
    stop_at_first = SamplingParams(max_tokens=6, temperature=0, stop_token_ids=[greedy_first], min_tokens=3)
    out = run_requests(engine, [prompt], stop_at_first)[0]
    assert len(out) >= 3 and greedy_first not in out[:3]
    _assert_no_leaks(engine)

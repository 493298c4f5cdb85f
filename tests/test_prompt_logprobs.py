"""Prompt logprobs (`SamplingParams.prompt_logprobs`): what the model thought of each prompt token,
checked against the plain path, against the logprobs generation reports, and unchanged by the
engine's fast paths (chunked prefill, batching, the prefix cache, preemption)."""
from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import all_position_logits, load_model, run_outputs, tiny_engine
from quill.engine.runner import kv_bytes_per_token
from quill.sampling_params import SamplingParams

SCORE = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3, ignore_eos=True)


def _prompts(seed: int = 1, count: int = 6) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(320) for _ in range(rng.randint(2, 50))] for _ in range(count)]
    return prompts + [prompts[-1][:30] + [7, 8], [11]]  # a shared prefix, and a one-token prompt


def _records(output) -> list:
    return [None if r is None else (r.token_id, r.logprob, r.top) for r in output.prompt_logprobs]


@pytest.fixture(scope="module", params=["llama", "gemma3"])  # gemma3: sliding-window layers
def path(request, tiny_model_dir):
    return tiny_model_dir(request.param)


@pytest.fixture(scope="module")
def alone(path):
    """Each prompt scored alone, prefix cache off: the engine's plain path."""
    engine = tiny_engine(path, enable_prefix_caching=False)
    return [_records(run_outputs(engine, [prompt], SCORE)[0]) for prompt in _prompts()]


def test_prompt_logprobs_are_the_models_distribution_at_every_position(path, alone):
    model, config = load_model(path)
    for prompt, records in zip(_prompts(), alone):
        assert len(records) == len(prompt) and records[0] is None  # nothing predicts the first token
        reference = torch.log_softmax(all_position_logits(model, config, prompt), dim=-1)
        for position, (token, logprob, top) in enumerate(records[1:]):
            expected = reference[position]
            assert token == prompt[position + 1]
            assert abs(logprob - float(expected[token])) < 1e-4
            assert [t for t, _ in top] == expected.topk(3).indices.tolist()


def test_scoring_a_completion_gives_the_logprobs_its_generation_reported(path):
    """Bit for bit: a prompt token is scored by the row that decoding it would compute."""
    engine = tiny_engine(path)
    prompt = _prompts()[2]
    generated = run_outputs(engine, [prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=3,
                                                             ignore_eos=True))[0]
    scored = run_outputs(engine, [prompt + generated.token_ids], SCORE)[0]
    reported = [(r.token_id, r.logprob, r.top) for r in generated.logprobs]
    assert _records(scored)[len(prompt):] == reported


@pytest.mark.parametrize("options, arrive_every", [
    ({}, 0),  # every prompt in one batch
    ({}, 1),  # joining a running batch
    ({"max_num_batched_tokens": 7}, 0),  # prompts cut into chunks of up to 7 tokens
])
def test_prompt_logprobs_do_not_depend_on_batching_or_chunking(path, alone, options, arrive_every):
    engine = tiny_engine(path, **options)
    outputs = run_outputs(engine, _prompts(), SCORE, arrive_every=arrive_every)
    assert [_records(o) for o in outputs] == alone


def test_a_cached_prompt_is_still_scored_whole(path, alone):
    """The prefix cache holds the prompts' blocks, but a request that scores its prompt computes it."""
    engine = tiny_engine(path)
    plain = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    run_outputs(engine, _prompts(), plain)  # caches every full block
    hits = engine.stats().prefix_cache_hits
    assert [_records(o) for o in run_outputs(engine, _prompts(), SCORE)] == alone
    assert engine.stats().prefix_cache_hits == hits
    run_outputs(engine, _prompts(), plain)
    assert engine.stats().prefix_cache_hits > hits  # the blocks stayed cached for others


def test_preempted_requests_score_each_prompt_token_once(path, alone):
    probe = tiny_engine(path)
    engine = tiny_engine(path, kv_cache_memory=kv_bytes_per_token(probe.model_config, torch.float32) * 16 * 6)
    long = SamplingParams(max_tokens=40, temperature=0, prompt_logprobs=3, ignore_eos=True)
    outputs = run_outputs(engine, _prompts(), long)
    assert engine.stats().num_preemptions > 0
    assert [_records(o) for o in outputs] == alone
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_every_completion_of_n_carries_the_prompt_logprobs(path, alone):
    engine = tiny_engine(path)
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=3, n=2, prompt_logprobs=3)
    (outputs,) = run_outputs(engine, [_prompts()[0]], params)
    assert [_records(o) for o in outputs] == [alone[0], alone[0]]


def test_prompt_logprobs_are_checked_like_logprobs():
    from quill.errors import InvalidRequestError

    for bad in (-1, 21, 1.5, True):
        with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(path, alone):
    engine = tiny_engine(path)
    only_prompt = SamplingParams(max_tokens=0, prompt_logprobs=3)
    outputs = run_outputs(engine, _prompts(), only_prompt)
    assert [(o.token_ids, o.text, o.finish_reason) for o in outputs] == [([], "", "length")] * len(outputs)
    assert [_records(o) for o in outputs] == alone
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks and not engine.has_unfinished()

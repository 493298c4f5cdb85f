"""Constrained decoding through the engine: every output obeys its constraint, and constraints
work with everything else the engine does (batching, chunked prefill, prefix caching,
preemption, n > 1, logprobs, stop strings, speculative decoding) without changing greedy output."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import jsonschema
import pytest
import torch

from engine_helpers import run_outputs, tiny_engine, tiny_text_engine
from quill.engine.async_engine import AsyncEngine
from quill.engine.engine import Engine
from quill.errors import InvalidRequestError, StructuredOutputError
from quill.outputs import RequestOutput
from quill.sampling_params import SamplingParams
from quill.speculative.drafter import Draft
from structured_schemas import property_test_schemas, validate

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2}},
    "required": ["name", "age"], "additionalProperties": False}
LARK = 'start: "(" expr ")"\nexpr: NUM | NUM "+" expr\nNUM: /[0-9]/'


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


def _assert_obeys(output: RequestOutput, params: SamplingParams) -> None:
    assert output.finish_reason == "stop", (output.text, output.finish_reason)
    text = output.text
    if params.json_schema is not None:
        validate(json.loads(text), params.json_schema)
    elif params.json_object:
        assert isinstance(json.loads(text), dict)
    elif params.regex is not None:
        assert re.fullmatch(params.regex, text), text
    elif params.choice is not None:
        assert text in params.choice
    elif params.grammar is not None:
        assert re.fullmatch(r"\(\d(\+\d)*\)", text), text


def _constrained(**sampling) -> list[SamplingParams]:
    """One request per kind. Any JSON object only for greedy requests: sampled from a random model,
    a free-form key runs on for hundreds of tokens (closing it has a chance of ~1/250 per token)."""
    sampling = {"max_tokens": 60, **sampling}
    kinds = [{"json_schema": PERSON}, {"regex": r"[a-d]{2,4}-[0-9]{3}"}, {"choice": ["Hello", "world", "Hi"]},
             {"grammar": LARK}] + ([{"json_object": True}] if not sampling.get("temperature") else [])
    return [SamplingParams(**kind, **sampling) for kind in kinds]


def _assert_no_leaks(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert not engine.structured._matchers


# ---------------------------------------------------------------------------- obedience
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7},
                                      {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 3}])
def test_every_kind_of_constraint_is_obeyed(llama, sampling):
    engine = tiny_text_engine(llama)
    params = _constrained(**sampling)
    for output, p in zip(run_outputs(engine, ["Hello world"] * len(params), params), params):
        _assert_obeys(output, p)
    _assert_no_leaks(engine)


def test_every_output_validates_for_200_schemas(llama):
    """The property test: 200 schemas (tool shapes and generated ones), each once greedy and once
    sampled, all 400 in one batch (fewest steps); every output parses and validates with `jsonschema`."""
    engine = tiny_text_engine(llama, max_num_seqs=400)
    schemas = property_test_schemas(200)
    params = [SamplingParams(json_schema=s, temperature=0, max_tokens=400) for s in schemas] + \
             [SamplingParams(json_schema=s, temperature=1.0, seed=i, max_tokens=400) for i, s in enumerate(schemas)]
    failures = []
    for output, p in zip(run_outputs(engine, ["Hello world"] * len(params), params), params):
        try:
            _assert_obeys(output, p)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append((p.json_schema, output.text, str(exc)[:200]))
    assert not failures, f"{len(failures)} of {len(params)} failed, e.g. {failures[:2]}"
    _assert_no_leaks(engine)


def test_penalties_and_bias_cannot_break_the_grammar(llama):
    engine = tiny_text_engine(llama)
    eos = next(iter(engine.tokenizer.eos_token_ids))
    params = [SamplingParams(json_schema=PERSON, max_tokens=60, temperature=0, repetition_penalty=1.5,
                             frequency_penalty=1.0, logit_bias={eos: 100.0, 128: 100.0}),  # 128 is '}'
              SamplingParams(choice=["Hello", "world"], temperature=0, min_tokens=5)]  # EOS comes too early
    for output, p in zip(run_outputs(engine, ["Hello"] * 2, params), params):
        _assert_obeys(output, p)


# --------------------------------------------------------------------------- invariance
def test_vetted_greedy_picks_are_the_masked_picks(llama):
    """Greedy requests without logprobs pick unmasked and have the pick vetted (see
    quill/structured/decoding.py); with logprobs=0 the same requests are masked up front. The random
    model's argmax often breaks the grammar, so both outcomes of the vetting occur; bias, penalties and
    min_tokens act on the rows either way."""
    eos = next(iter(tiny_text_engine(llama).tokenizer.eos_token_ids))
    params = _constrained(temperature=0) + [
        SamplingParams(json_schema=PERSON, max_tokens=60, temperature=0, repetition_penalty=1.5,
                       frequency_penalty=1.0, logit_bias={eos: 100.0, 128: 100.0}),
        SamplingParams(choice=["Hello", "world"], temperature=0, min_tokens=5),
        *(SamplingParams(json_schema=s, temperature=0, max_tokens=80) for s in property_test_schemas(40))]
    vetted_engine, masked_engine = tiny_text_engine(llama, max_num_seqs=64), tiny_text_engine(llama, max_num_seqs=64)
    prompts = ["Hello world"] * len(params)
    vetted = run_outputs(vetted_engine, prompts, params)
    masked = run_outputs(masked_engine, prompts, [dataclasses.replace(p, logprobs=0) for p in params])
    assert [o.token_ids for o in vetted] == [o.token_ids for o in masked]
    stats = vetted_engine.stats().structured
    assert 0 < stats.vetted_picks_masked < stats.vetted_picks == sum(len(o.token_ids) for o in vetted)
    assert masked_engine.stats().structured.vetted_picks == 0


def _mixed_batch() -> tuple[list[str], list[SamplingParams]]:
    """16 requests: constrained greedy ones (the subject) among sampled and unconstrained ones."""
    greedy = _constrained(temperature=0)
    others = [SamplingParams(max_tokens=20, temperature=0), SamplingParams(max_tokens=30, temperature=1.0, seed=1),
              SamplingParams(json_schema=PERSON, max_tokens=60, temperature=1.0, seed=2, logprobs=2),
              SamplingParams(regex=r"[0-9]{4}", max_tokens=8, temperature=0.7, seed=5),
              SamplingParams(max_tokens=12, temperature=0)]
    params = greedy + others + greedy + [SamplingParams(max_tokens=25, temperature=0.5, seed=9)]
    prompts = [("Hello world " * (1 + i % 5)).strip() for i in range(len(params))]
    return prompts, params


@pytest.fixture(scope="module")
def alone(llama) -> list[RequestOutput]:
    """Each request of the mixed batch run alone (one at a time, nothing cached from the others)."""
    engine = tiny_text_engine(llama, enable_prefix_caching=False)
    return [run_outputs(engine, [prompt], [p])[0] for prompt, p in zip(*_mixed_batch())]


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 16}, {"enable_prefix_caching": False}],
                         ids=["default", "chunked", "no-prefix-cache"])
def test_constrained_output_is_identical_alone_and_in_a_busy_batch(llama, alone, options):
    prompts, params = _mixed_batch()
    engine = tiny_text_engine(llama, **options)
    together = run_outputs(engine, prompts, params, arrive_every=1)
    assert len(prompts) == 16
    for a, b, p in zip(alone, together, params):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        if p.constraint is not None:
            _assert_obeys(b, p)
    _assert_no_leaks(engine)


def test_preemption_keeps_each_matcher_in_place(llama, alone):
    prompts, params = _mixed_batch()
    engine = tiny_text_engine(llama, block_size=4, kv_cache_memory=20 * 4 * 768)  # 20 blocks, 768 B a token
    tight = run_outputs(engine, prompts, params)
    assert engine.stats().num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in alone]
    _assert_no_leaks(engine)


class _OracleDrafter:
    """Proposes the plain run's continuation with every third token corrupted: drafts that are
    partly accepted, partly rejected by the target, partly invalid in the grammar."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], probs: bool = False) -> None:
        self.continuations = continuations
        self.probs = probs
        self.proposed = 0

    def propose(self, requests, max_lengths):
        drafts = []
        for request, length in zip(requests, max_lengths):
            full = self.continuations.get(tuple(request.prompt_token_ids), [])
            tokens = list(full[request.num_output_tokens:request.num_output_tokens + length])
            tokens = [t if (i + request.num_output_tokens) % 3 else 128 for i, t in enumerate(tokens)]  # '}'
            self.proposed += len(tokens)
            probs = torch.full((len(tokens), 320), 1 / 320) if self.probs and tokens else None
            drafts.append(Draft(tokens, probs))
        return drafts

    def finish(self, request_id):
        pass


@pytest.mark.parametrize("drafter", ["ngram", "oracle"])
def test_speculation_does_not_change_constrained_greedy_output(llama, drafter):
    prompts = ['{"name": "Hello", "age": 7} {"name": "Hello", "age": 7} {"name"', "(1+2+3) (1+2+3) (1+2",
               "Hello world Hello world Hello"]
    params = [SamplingParams(json_schema=PERSON, temperature=0, max_tokens=60), SamplingParams(grammar=LARK, temperature=0),
              SamplingParams(regex=r"(Hello |world ){1,6}", temperature=0, max_tokens=40)]
    plain = run_outputs(tiny_text_engine(llama), prompts, params)
    engine = tiny_text_engine(llama, speculative="ngram", num_speculative_tokens=4)
    if drafter == "oracle":
        ids = [engine.tokenizer.encode(p) for p in prompts]
        engine.speculator.drafter = _OracleDrafter({tuple(i): o.token_ids for i, o in zip(ids, plain)})
    speculated = run_outputs(engine, prompts, params)
    assert [o.token_ids for o in speculated] == [o.token_ids for o in plain]
    if drafter == "oracle":
        assert engine.stats().spec_num_accepted_tokens > 0  # drafts were used, some rejected
        assert engine.stats().spec_num_draft_tokens < engine.speculator.drafter.proposed  # '}' cut by the grammar
    _assert_no_leaks(engine)


def test_sampled_drafts_the_grammar_rejects_are_never_accepted(llama):
    """Drafts drawn from a distribution are verified whole: invalid ones must be rejected there."""
    prompts = ["Hello world"] * 4
    params = [SamplingParams(json_schema=PERSON, temperature=1.0, seed=s, max_tokens=60) for s in range(4)]
    plain = run_outputs(tiny_text_engine(llama), prompts, [SamplingParams(json_schema=PERSON, temperature=0,
                                                                       max_tokens=60)] * 4)
    engine = tiny_text_engine(llama, speculative="ngram")
    ids = engine.tokenizer.encode(prompts[0])
    engine.speculator.drafter = _OracleDrafter({tuple(ids): plain[0].token_ids}, probs=True)
    for output, p in zip(run_outputs(engine, prompts, params), params):
        _assert_obeys(output, p)
    assert engine.stats().spec_num_draft_tokens == engine.speculator.drafter.proposed  # none cut
    _assert_no_leaks(engine)


# -------------------------------------------------------------------- the other features
def test_n_completions_each_follow_their_own_matcher(llama):
    engine = tiny_text_engine(llama)
    sampled = SamplingParams(json_schema=PERSON, n=3, temperature=1.0, seed=11, max_tokens=60)
    greedy = SamplingParams(regex=r"[a-d]{2,4}-[0-9]{3}", n=2, temperature=0)
    sampled_out, greedy_out = run_outputs(engine, ["Hello", "Hello"], [sampled, greedy])
    for output in sampled_out:
        _assert_obeys(output, sampled)
    assert len({o.text for o in sampled_out}) > 1
    assert greedy_out[0].token_ids == greedy_out[1].token_ids
    _assert_no_leaks(engine)


def test_logprobs_are_those_of_the_masked_distribution(llama):
    engine = tiny_text_engine(llama)
    choices = ["Hello", "world", "Hi"]
    output = run_outputs(engine, ["Hello"], [SamplingParams(choice=choices, temperature=0, logprobs=20)])[0]
    first = output.logprobs[0]
    allowed_first = {engine.tokenizer.encode(c, add_special_tokens=False)[0] for c in choices} | \
        {t for c in choices for t in range(engine.tokenizer.vocab_size)
         if c.startswith(engine.tokenizer.decode([t]).lstrip() or "\0")}
    finite = [(t, lp) for t, lp in first.top if lp > float("-inf")]
    assert {t for t, _ in finite} <= allowed_first
    assert sum(torch.tensor([lp for _, lp in finite]).exp()) == pytest.approx(1.0, abs=1e-4)
    assert first.logprob == max(lp for _, lp in finite)  # greedy takes the masked maximum


def test_stop_string_ends_a_constrained_output_early(llama):
    engine = tiny_text_engine(llama)
    full = run_outputs(engine, ["Hello"], [SamplingParams(json_schema=PERSON, temperature=0, max_tokens=60)])[0]
    stop = full.text[5:8]
    cut = run_outputs(engine, ["Hello"], [SamplingParams(json_schema=PERSON, temperature=0, max_tokens=60, stop=[stop])])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]


def test_a_grammar_that_cannot_finish_in_max_tokens_ends_with_length(llama):
    engine = tiny_text_engine(llama)
    output = run_outputs(engine, ["Hello"], [SamplingParams(regex="a{50}", temperature=0, max_tokens=10)])[0]
    assert output.finish_reason == "length" and output.text == "a" * len(output.token_ids) and len(output.token_ids) == 10
    _assert_no_leaks(engine)


def test_bad_constraints_leave_the_engine_untouched(llama, tiny_model_dir):
    engine = tiny_text_engine(llama)
    with pytest.raises(StructuredOutputError) as caught:
        engine.add_request("Hello", SamplingParams(json_schema={"type": "array", "uniqueItems": True}))
    assert caught.value.param == "json_schema"
    engine.add_request("Hello", SamplingParams(regex="a", n=2))
    engine.abort("req-0")
    _assert_no_leaks(engine)
    ids_only = tiny_engine(llama)
    with pytest.raises(InvalidRequestError, match="needs a tokenizer"):
        ids_only.add_request([1, 2, 3], SamplingParams(choice=["a"]))
    assert not ids_only.has_unfinished()


def test_stats_count_requests_compiles_cache_hits_and_masks(llama):
    engine = tiny_text_engine(llama)
    params = [SamplingParams(json_schema=PERSON, temperature=0, max_tokens=60)] * 3 + [SamplingParams(regex="ab", n=2)]
    outputs = run_outputs(engine, ["Hello"] * 4, params + [SamplingParams(max_tokens=3)])
    stats = engine.stats().structured
    assert stats.num_constrained_requests == 4
    assert (stats.grammar_cache_misses, stats.grammar_cache_hits) == (2, 2)
    assert stats.grammar_compile_seconds > 0
    greedy_picks = sum(len(o.token_ids) for o in outputs[:3])  # vetted; the random model's are often rejected
    assert stats.vetted_picks == greedy_picks and 0 < stats.vetted_picks_masked < greedy_picks
    masked_positions = stats.vetted_picks_masked + 2 * 2  # the sampled "ab"s: masked up front
    assert stats.mask_seconds_count == masked_positions == stats.mask_seconds_buckets[-1][1]
    assert stats.mask_seconds_sum > 0 and stats.mask_wait_seconds >= 0


def test_a_step_that_fails_mid_forward_leaves_the_matchers_usable(llama, monkeypatch):
    """The mask job started before the forward pass is waited out, not raced, by the next step."""
    engine = tiny_text_engine(llama)
    params = SamplingParams(json_schema=PERSON, temperature=0, max_tokens=60)
    expected = run_outputs(tiny_text_engine(llama), ["Hello"], [params])[0]
    engine.add_request("Hello", params)
    engine.step()
    execute = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    monkeypatch.setattr(engine.runner, "execute", execute)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert outputs[-1].token_ids == expected.token_ids


def test_masks_are_filled_on_the_engine_thread_when_no_job_foresaw_them(llama):
    engine = tiny_text_engine(llama)
    engine.add_request("Hello", SamplingParams(regex="[a-d]{3}", temperature=0))
    batch = engine.scheduler.schedule()
    job = engine.structured.start(batch.requests, batch.num_new_tokens)
    foreseen = engine.structured.collect(job, batch.requests)
    unforeseen = engine.structured.collect(None, batch.requests)
    assert foreseen.rows == unforeseen.rows == [0] and torch.equal(foreseen.bits, unforeseen.bits)


# ------------------------------------------------------------- a grammar that breaks midway
BREAKING = [SamplingParams(regex="[a-d]{40}", temperature=0, max_tokens=50),  # the one that breaks
            SamplingParams(json_schema=PERSON, temperature=0, max_tokens=60),
            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]


def _break_grammar_midway(engine: Engine, group_id: str, after_tokens: int = 2) -> None:
    """Put the request's matcher into llguidance's error state once it has `after_tokens` output
    tokens, as a parser that exceeds its limits while computing a mask ends up: that mask allows
    only EOS, and the token drawn from it cannot be committed."""
    start = engine.structured.start

    def start_and_break(requests, num_new_tokens):
        for request in requests:
            if request.group_id == group_id and request.num_output_tokens == after_tokens:
                matcher = engine.structured._matchers[request.request_id]
                bad = next(t for t in range(engine.structured.compiler.vocab_size) if not matcher.valid_prefix([t]))
                assert not matcher.advance(bad) and matcher.error
        return start(requests, num_new_tokens)

    engine.structured.start = start_and_break


def test_a_grammar_that_breaks_mid_output_ends_only_its_own_request(llama):
    expected = run_outputs(tiny_text_engine(llama), ["Hello"] * 3, BREAKING)
    engine = tiny_text_engine(llama)
    _break_grammar_midway(engine, "req-0")
    broken, *others = run_outputs(engine, ["Hello"] * 3, BREAKING)
    assert broken.finish_reason == "error" and isinstance(broken.error, StructuredOutputError)
    assert (broken.error.code, broken.error.param) == ("grammar_failed", "regex")
    assert "failed at output token 3 (" in broken.error.message and len(broken.error.message) < 600
    assert broken.token_ids[:2] == expected[0].token_ids[:2]
    assert [o.token_ids for o in others] == [o.token_ids for o in expected[1:]]
    assert all(o.error is None and o.finish_reason in ("stop", "length") for o in others)
    _assert_no_leaks(engine)


def test_the_async_engine_fails_the_broken_request_and_serves_the_others(llama):
    expected = run_outputs(tiny_text_engine(llama), ["Hello"] * 3, BREAKING)
    engine = tiny_text_engine(llama)
    _break_grammar_midway(engine, "broken")
    async_engine = AsyncEngine(engine)

    async def collect(index: int) -> list[int] | StructuredOutputError:
        tokens = []
        try:
            async for output in async_engine.generate("Hello", BREAKING[index], request_id=["broken", "b", "c"][index]):
                tokens += output.new_token_ids
        except StructuredOutputError as error:
            return error
        return tokens

    async def main():
        return await asyncio.gather(*(collect(i) for i in range(3)))

    try:
        broken, *others = asyncio.run(main())
        assert isinstance(broken, StructuredOutputError) and broken.code == "grammar_failed"
        assert others == [o.token_ids for o in expected[1:]]
    finally:
        async_engine.shutdown()
    _assert_no_leaks(engine)

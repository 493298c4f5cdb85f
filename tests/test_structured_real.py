"""Structured output on the real models: every constrained output parses and validates against its
schema (200 schemas, tool shapes and generated ones, greedy and sampled, batched through the
engine); greedy picks vetted without a mask are the mask's; and SmolLM2's constrained greedy
output is the same alone, in a busy batch, masked up front and with n-gram speculation."""
from __future__ import annotations

import collections
import dataclasses
import json
import random

import jsonschema
import pytest
import torch

from quill import LLM, SamplingParams
from quill.structured import TokenMasks
from quill.structured.tool_calls import parse_tool_calls
from quill.structured.tools import tool_choice_grammar
from structured_schemas import property_test_schemas, validate

pytestmark = pytest.mark.real_model

MAX_TOKENS = 96
SCHEMAS = property_test_schemas(200)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return LLM(smollm2_gguf, max_num_seqs=128)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    return LLM(gemma3_gguf, max_num_seqs=128)


def _prompt(llm: LLM) -> list[int]:
    """One short prompt for every schema (the grammar dictates the shape): its KV is computed once
    and shared through the prefix cache."""
    ask = "Reply with a short JSON object."
    if llm.tokenizer.chat_template:
        return llm.tokenizer.encode_chat([{"role": "user", "content": ask}])
    return llm.tokenizer.encode(f"{ask}\nJSON:")  # Gemma 3 270M is a base model


def _run(llm: LLM, prompts: list, params: list[SamplingParams]) -> list:
    engine, ids, done = llm.engine, {}, {}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ids[engine.add_request(prompt, p)] = i
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                done[ids[output.request_id]] = output
    return [done[i] for i in range(len(prompts))]


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_every_output_validates_against_its_schema(model, request):
    """The property test: 200 schemas (tool shapes and generated ones), each once greedy and once
    sampled, all 400 requests batched through the engine (18 s on SmolLM2, 50 s on Gemma 3 here)."""
    llm: LLM = request.getfixturevalue(model)
    schemas = SCHEMAS
    prompts = [_prompt(llm)] * (2 * len(schemas))
    # Each schema's two requests side by side: the sampled one reuses the greedy one's grammar
    # (the cache keeps 128, fewer than the 200 schemas).
    params = [p for i, s in enumerate(schemas) for p in (
        SamplingParams(json_schema=s, temperature=0, max_tokens=MAX_TOKENS),
        SamplingParams(json_schema=s, temperature=1.0, seed=i, max_tokens=MAX_TOKENS))]
    outputs = _run(llm, prompts, params)
    failures = []
    for output, p in zip(outputs, params):
        try:
            assert output.finish_reason == "stop", f"finish_reason {output.finish_reason}"
            validate(json.loads(output.text), p.json_schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            failures.append((json.dumps(p.json_schema), output.text, str(exc)[:200]))
    assert not failures, f"{len(failures)} of {len(outputs)} failed, e.g. {failures[:3]}"
    stats = llm.engine.stats().structured
    assert stats.grammar_cache_hits >= len(schemas)  # the sampled half reuses the greedy half's grammars
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.kv_cache.num_blocks


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_vet_gives_the_masked_greedy_pick(model, request):
    """`GrammarMatcher.vet` (how greedy picks skip their masks) against llguidance's masks, on the
    real vocabularies, at every position of real outputs, for the chosen token, EOS and samples of
    each mask's allowed and forbidden tokens: where it names a pick, the mask allows that pick, and
    a forced token is the mask's only one; where the grammar forces no bytes, it names a token with
    bytes exactly when the mask allows it."""
    llm: LLM = request.getfixturevalue(model)
    structured, vocab = llm.engine.structured, llm.engine.structured.compiler.vocab_size
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    params = [SamplingParams(json_schema=s, temperature=0, max_tokens=MAX_TOKENS) for s in SCHEMAS[:12]] + [
        SamplingParams(grammar=tool_choice_grammar(tools, "required", parallel_tool_calls=False), temperature=0,
                       max_tokens=MAX_TOKENS),
        SamplingParams(regex=r"[A-Z][a-z]{2,8} [0-9]{1,2}", temperature=0, max_tokens=12)]
    outputs = _run(llm, [_prompt(llm)] * len(params), params)
    rng, row = random.Random(0), torch.empty(structured.words, dtype=torch.int32)
    cases = collections.Counter()
    for output, p in zip(outputs, params):
        (matcher,) = structured.matchers(p.constraint, 1)
        for token in output.token_ids:
            forced = bool(matcher._matcher.compute_ff_bytes())
            matcher.fill_mask(row)
            allowed = TokenMasks([0], row[None]).allowed(vocab)[0]
            allowed_ids = allowed.nonzero().flatten().tolist()
            checked = {token, *llm.tokenizer.eos_token_ids, *rng.sample(allowed_ids, min(48, len(allowed_ids))),
                       *rng.sample(range(vocab), 48)}
            for t in checked:
                pick = matcher.vet(t)
                where = (p, output.token_ids, token, t, pick)
                if forced:
                    assert pick is None or allowed_ids == [pick], where
                elif t not in structured.compiler._unvettable:
                    assert (pick == t) == bool(allowed[t]) and pick in (t, None), where
                else:
                    assert pick is None, where
            cases["free" if not forced else "forced token" if matcher.vet(token) is not None else "mask"] += 1
            assert matcher.advance(token)
    assert cases["free"] > 50 and cases["forced token"] > 50, cases  # both shortcuts were tried


def _mixed_requests(llm: LLM) -> tuple[list, list[SamplingParams]]:
    """16 requests: 8 constrained greedy ones (the subjects) among sampled and free ones."""
    subjects = [SamplingParams(json_schema=s, temperature=0, max_tokens=MAX_TOKENS) for s in SCHEMAS[:4]] + [
        SamplingParams(choice=["positive", "negative", "neutral"], temperature=0),
        SamplingParams(regex=r"[A-Z][a-z]{2,8} [0-9]{1,2}", temperature=0, max_tokens=12),
        SamplingParams(json_object=True, temperature=0, max_tokens=MAX_TOKENS),
        SamplingParams(grammar='start: "The answer is " /[0-9]{1,3}/ "."', temperature=0, max_tokens=12)]
    others = [SamplingParams(max_tokens=24, temperature=0), SamplingParams(max_tokens=24, temperature=0.8, seed=1),
              SamplingParams(json_schema=SCHEMAS[5], temperature=0.9, seed=2, max_tokens=MAX_TOKENS),
              SamplingParams(max_tokens=40, temperature=0, logprobs=2), SamplingParams(max_tokens=16, temperature=0),
              SamplingParams(regex="[a-z ]{5,30}", temperature=1.0, seed=3, max_tokens=32),
              SamplingParams(max_tokens=32, temperature=0.5, seed=4), SamplingParams(max_tokens=8, temperature=0)]
    params = [p for pair in zip(subjects, others) for p in pair]
    prompts = [_prompt(llm) + llm.tokenizer.encode(f" {i}", add_special_tokens=False) for i in range(16)]
    return prompts, params


def test_smollm2_constrained_greedy_is_the_same_alone_in_a_batch_and_with_speculation(smollm2, smollm2_gguf):
    prompts, params = _mixed_requests(smollm2)
    alone = [_run(smollm2, [prompt], [p])[0] for prompt, p in zip(prompts, params) if p.greedy]
    together = [o for o, p in zip(_run(smollm2, prompts, params), params) if p.greedy]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    # logprobs=0 masks a greedy request up front, where without logprobs its pick is vetted after sampling.
    masked = [o for o, p in zip(_run(smollm2, prompts, [dataclasses.replace(p, logprobs=0) if p.greedy else p
                                                        for p in params]), params) if p.greedy]
    assert [o.token_ids for o in masked] == [o.token_ids for o in alone]
    speculative = LLM(smollm2_gguf, speculative="ngram")
    speculated = [o for o, p in zip(_run(speculative, prompts, params), params) if p.greedy]
    assert [o.token_ids for o in speculated] == [o.token_ids for o in alone]
    assert speculative.engine.stats().spec_num_draft_tokens > 0


def test_smollm2_tool_call_round_trip(smollm2):
    """tool_choice "required" through the fallback prompt: a valid call, then the answer."""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    grammar = tool_choice_grammar(tools, "required", parallel_tool_calls=False)
    out = smollm2.chat(messages, SamplingParams(grammar=grammar, temperature=0, max_tokens=64), tools=tools)
    masked = smollm2.chat(messages, SamplingParams(grammar=grammar, temperature=0, max_tokens=64, logprobs=0), tools=tools)
    assert masked.token_ids == out.token_ids  # the vetted picks are the masked ones (here ' {' once was not)
    message = parse_tool_calls(out.text, "hermes")
    assert out.finish_reason == "stop" and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "clear"}'}]
    answer = smollm2.chat(messages, SamplingParams(temperature=0, max_tokens=32), tools=tools)
    assert answer.num_completion_tokens > 0 and answer.num_prompt_tokens > out.num_prompt_tokens

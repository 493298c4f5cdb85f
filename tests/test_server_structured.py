"""Structured output and tool calling over HTTP, with the official `openai` client.

A tiny random model (tiny tokenizer, a chat template that shows tools) checks the rules fast:
every constrained answer obeys its constraint whatever the model writes, tool calls are parsed
and streamed in OpenAI's shape, bad input is a 400 naming the field and the server keeps
serving, and /metrics counts constrained requests. SmolLM2 (real_model) checks what users do:
`chat.completions.parse` with pydantic models, JSON mode, tool_choice required/named/auto through
the fallback tool prompt (its template has no tool support), and a full tool round trip.
"""
from __future__ import annotations

import json
import re
from enum import Enum

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from engine_helpers import tiny_text_engine
from quill.server import BackgroundServer, ServerConfig, create_app
from quill.structured.tool_calls import join_deltas
from structured_schemas import TOOL_PARAMETER_SCHEMAS, property_test_schemas, validate

# Shows the tool names only, so that prompts fit the tiny model's 256-token window; mentioning
# `tools` makes it a tool-aware template (no fallback prompt), parsed in the Hermes format.
TOOL_TEMPLATE = ("{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
                 "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": TOOL_PARAMETER_SCHEMAS[0]}}
ADD = {"type": "function", "function": {"name": "add", "parameters": TOOL_PARAMETER_SCHEMAS[3]}}
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    config = ServerConfig(served_model_name="tiny", chat_template=TOOL_TEMPLATE)  # response cache on
    app = create_app(tiny_text_engine(tiny_model_dir("llama"), max_num_seqs=64), config)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        with httpx.Client(base_url=server.url, timeout=120) as raw:
            yield client, raw


def _error(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error["message"]


# ------------------------------------------------------------------ the plan, no server
def test_output_constraint_names_the_clients_field():
    from quill.errors import StructuredOutputError
    from quill.server.protocol import ResponseFormat, StructuredOutputs
    from quill.server.structured import output_constraint

    schema = {"type": "object"}
    assert output_constraint(ResponseFormat(type="json_schema", json_schema={"schema": schema}), None) == \
           {"json_schema": schema}
    assert output_constraint(None, StructuredOutputs(json=schema)) == {"json_schema": schema}
    assert output_constraint(ResponseFormat(type="text"), None) == {}
    with pytest.raises(StructuredOutputError) as bad:
        output_constraint(None, StructuredOutputs(regex="("))
    assert bad.value.param == "structured_outputs.regex" and bad.value.message.startswith("structured_outputs.regex")


@pytest.mark.parametrize("template, tool_format", [
    (None, "hermes"),  # no template: the fallback prompt, Hermes calls
    ("{{ messages }}", "hermes"),  # a template without tools: the same
    ("{{ tools }}{% for m in messages %}[TOOL_CALLS]{% endfor %}", "mistral"),
    ("{{ tools }}<|python_tag|>{{ messages }}", "llama3_json"),
])
def test_plan_parses_in_the_templates_format_and_none_shows_no_tools(template, tool_format):
    from quill.server.structured import plan_tools

    plan = plan_tools([WEATHER], "required", None, template)
    assert plan.tool_format == tool_format and plan.grammar
    assert (plan.template_tools is not None) and plan.template_tools[0]["function"]["name"] == "get_weather"
    none = plan_tools([WEATHER], "none", None, template)
    assert (none.template_tools, none.grammar, none.tool_format) == (None, None, None)
    assert none.parse('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>').tool_calls == []


# ---------------------------------------------------------------------- output formats
def test_json_schema_response_format_validates_for_every_schema(tiny):
    """The property test over HTTP: 24 schemas as response_format, sent concurrently (the engine
    batches them); greedy and sampled. All 200 run through the engine in test_structured_engine."""
    import concurrent.futures

    client, _ = tiny
    schemas = property_test_schemas(24, seed=1)

    def ask(i: int) -> tuple[dict, str, str]:
        schema = schemas[i % len(schemas)]
        answer = client.chat.completions.create(
            model="tiny", messages=USER, max_tokens=200, temperature=0 if i < len(schemas) else 1.0, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}})
        return schema, answer.choices[0].message.content, answer.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for schema, content, finish_reason in pool.map(ask, range(2 * len(schemas))):
            assert finish_reason == "stop", content
            validate(json.loads(content), schema)


@pytest.mark.parametrize("fields, check", [
    ({"response_format": {"type": "json_object"}}, lambda text: isinstance(json.loads(text), dict)),
    ({"extra_body": {"structured_outputs": {"regex": "[a-c]{2}-[0-9]{2}"}}},
     lambda text: re.fullmatch("[a-c]{2}-[0-9]{2}", text)),
    ({"extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}}, lambda text: text in ("yes", "no")),
    ({"extra_body": {"guided_choice": ["left", "right"]}}, lambda text: text in ("left", "right")),
    ({"extra_body": {"structured_outputs": {"grammar": 'start: "(" /[0-9]/ ")"'}}},
     lambda text: re.fullmatch(r"\(\d\)", text)),
    ({"extra_body": {"structured_outputs": {"json": TOOL_PARAMETER_SCHEMAS[3]}}},
     lambda text: validate(json.loads(text), TOOL_PARAMETER_SCHEMAS[3]) is None),
])
def test_each_constraint_holds_in_chat_and_completions(tiny, fields, check):
    client, _ = tiny
    chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=120, temperature=0, **fields)
    assert chat.choices[0].finish_reason == "stop" and check(chat.choices[0].message.content)
    fields = {"extra_body": fields.get("extra_body") or {"response_format": fields["response_format"]}}
    completion = client.completions.create(model="tiny", prompt="Hello", max_tokens=120, temperature=0, **fields)
    assert completion.choices[0].finish_reason == "stop" and check(completion.choices[0].text)


def test_text_response_format_is_free_text(tiny):
    client, _ = tiny
    free = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0)
    text = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content == free.choices[0].message.content


# ------------------------------------------------------------------------------- tools
def _arguments(call) -> dict:
    return json.loads(call.function.arguments)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_required_and_named_tool_choice_give_valid_calls(tiny, tool_choice):
    client, _ = tiny
    for seed in range(3):
        answer = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, ADD], seed=seed,
                                                tool_choice=tool_choice, parallel_tool_calls=False, temperature=1.0,
                                                max_tokens=200)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        for call in choice.message.tool_calls:
            tool = {"get_weather": WEATHER, "add": ADD}[call.function.name]
            if isinstance(tool_choice, dict):
                assert call.function.name == "add"
            validate(_arguments(call), tool["function"]["parameters"])
            assert call.id.startswith("call_") and call.type == "function"


def test_parallel_tool_calls_false_gives_one_call(tiny):
    client, _ = tiny
    for seed in range(4):
        answer = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, ADD], seed=seed,
                                                tool_choice="required", parallel_tool_calls=False,
                                                temperature=1.0, max_tokens=150)
        assert len(answer.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls_join_to_the_non_streamed_message(tiny):
    """OpenAI's delta shape: per call index, id, type and name (arguments "") first, then the
    arguments in pieces; joined, the same calls as the non-streamed answer (ids aside)."""
    client, _ = tiny
    request = dict(model="tiny", messages=USER, tools=[WEATHER, ADD], tool_choice="required", temperature=0,
                   max_tokens=150)
    whole = client.chat.completions.create(**request, extra_body={"cache": False}).choices[0]
    chunks = list(client.chat.completions.create(**request, stream=True, extra_body={"cache": False}))
    _assert_stream_joins_to(chunks, whole)
    assert len([tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])
                if tc.function.arguments]) > 1  # live, the arguments arrive in pieces
    client.chat.completions.create(**request)  # stored in the response cache; replayed as a stream:
    replayed = client.chat.completions.with_raw_response.create(**request, stream=True)
    assert replayed.headers["x-quill-cache"] == "hit"
    _assert_stream_joins_to(list(replayed.parse()), whole)


def _assert_stream_joins_to(chunks: list, whole) -> None:
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [tc for d in deltas for tc in (d.tool_calls or [])]
    first_of = {}
    for piece in pieces:
        if piece.index not in first_of:
            first_of[piece.index] = piece
            assert piece.id and piece.type == "function" and piece.function.name and piece.function.arguments == ""
        else:
            assert piece.id is None and piece.function.name is None
    joined = join_deltas([d.model_dump(exclude_none=True) for d in deltas])
    assert [(c.name, c.arguments) for c in joined.tool_calls] == \
           [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason == "tool_calls"


def test_auto_tool_choice_answers_text_or_valid_calls(tiny):
    client, _ = tiny
    for seed in range(4):
        choice = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], seed=seed,
                                                temperature=1.0, max_tokens=40).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                validate(_arguments(call), WEATHER["function"]["parameters"])
        else:
            assert "<tool_call>" not in (choice.message.content or "")


def test_tool_history_is_rendered_and_answered(tiny):
    """An assistant's tool_calls and the tool's result go through the template; the next answer
    is free text when tool_choice is none."""
    client, _ = tiny
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'}}
    messages = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    answer = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none",
                                            temperature=0, max_tokens=6)
    assert answer.choices[0].message.tool_calls is None and answer.usage.prompt_tokens > 10


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}},
     "response_format.json_schema.extra"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a{99999999}"}}, "structured_outputs.regex"),  # would fail mid-step
    ({"structured_outputs": {"json": {"type": "string", "pattern": "^[a-z]{5,100000}$"}}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "zzz", "content": "x"}]},
     "messages"),  # a result of no call
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"ignore_eos": True, "response_format": {"type": "json_object"}}, "ignore_eos"),
])
def test_bad_structured_input_is_a_400_naming_the_field(tiny, body, param):
    _, raw = tiny
    request = {"model": "tiny", "messages": USER, "max_tokens": 4, **body}
    _error(raw.post("/v1/chat/completions", json=request), param)
    assert raw.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("field", ["tools", "tool_choice"])
def test_completions_refuse_tools(tiny, field):
    _, raw = tiny
    value = [WEATHER] if field == "tools" else "auto"
    message = _error(raw.post("/v1/completions", json={"model": "tiny", "prompt": "a", field: value}), field)
    assert "/v1/chat/completions" in message


def test_a_grammar_cut_off_by_max_tokens_ends_with_length(tiny):
    client, _ = tiny
    answer = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, temperature=0,
                                            extra_body={"structured_outputs": {"regex": "[a-z]{10}"}})
    assert answer.choices[0].finish_reason == "length" and len(answer.choices[0].message.content) < 10


# ------------------------------------------------------------------------------- metrics
def test_metrics_count_constrained_requests_compiles_and_masks(tiny):
    client, raw = tiny

    def sample(name: str) -> float:
        text = raw.get("/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    before = {name: sample(name) for name in ("quill:structured_requests_total", "quill:structured_grammar_cache_hits_total",
                                              "quill:structured_mask_seconds_count")}
    for _ in range(2):
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, temperature=0, extra_body={
            "structured_outputs": {"choice": ["metrics-a", "metrics-b"]}, "cache": False})
    assert sample("quill:structured_requests_total") == before["quill:structured_requests_total"] + 2
    assert sample("quill:structured_grammar_cache_hits_total") >= before["quill:structured_grammar_cache_hits_total"] + 1
    assert sample("quill:structured_mask_seconds_count") > before["quill:structured_mask_seconds_count"]
    assert sample("quill:structured_grammar_compile_seconds_total") > 0


# ---------------------------------------------------------------------- SmolLM2 (real)
class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    favourite: Color
    score: float = Field(ge=0, le=10, multiple_of=0.5)
    hobbies: list[str] = Field(max_length=3)
    address: Address
    nickname: str | None = Field(default=None, max_length=12)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from quill import LLM

    app = create_app(LLM(smollm2_gguf), ServerConfig(served_model_name="smollm2", response_cache=False))
    with BackgroundServer(app) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.real_model
def test_smollm2_parse_with_a_pydantic_model(smollm2):
    """Nested objects, an enum, a list, an optional and bounded numbers, as the SDK sends them."""
    completion = smollm2.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Describe a person called Ada who lives in Paris."}],
        response_format=Person, temperature=0, max_tokens=200)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and completion.choices[0].finish_reason == "stop"
    assert 0 <= person.age <= 120 and isinstance(person.favourite, Color) and len(person.hobbies) <= 3


@pytest.mark.real_model
def test_smollm2_json_mode_answers_an_object(smollm2):
    answer = smollm2.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=120)
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.real_model
def test_smollm2_tool_round_trip_through_the_fallback_prompt(smollm2):
    """A call is forced (required), streamed and non-streamed alike; its result goes back as a
    tool message and the model answers in text (auto: text or a valid call)."""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}}, ADD]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    request = dict(model="smollm2", messages=messages, tools=tools, temperature=0, max_tokens=64)
    first = smollm2.chat.completions.create(**request, tool_choice="required").choices[0]
    assert first.finish_reason == "tool_calls" and len(first.message.tool_calls) >= 1
    call = first.message.tool_calls[0]
    assert call.function.name in ("get_weather", "add")
    streamed = [c.choices[0].delta for c in smollm2.chat.completions.create(**request, tool_choice="required", stream=True)
                if c.choices]
    joined = join_deltas([d.model_dump(exclude_none=True) for d in streamed])
    assert [(c.name, c.arguments) for c in joined.tool_calls] == \
           [(c.function.name, c.function.arguments) for c in first.message.tool_calls]
    named = smollm2.chat.completions.create(**request, tool_choice={"type": "function", "function": {"name": "add"}})
    assert named.choices[0].message.tool_calls[0].function.name == "add"
    validate(_arguments(named.choices[0].message.tool_calls[0]), ADD["function"]["parameters"])
    messages += [first.message.model_dump(exclude_none=True),  # every call answered, as OpenAI requires
                 *({"role": "tool", "tool_call_id": c.id, "content": '{"temperature_c": 18, "sky": "clear"}'}
                   for c in first.message.tool_calls)]
    final = smollm2.chat.completions.create(model="smollm2", messages=messages, tools=tools, temperature=0,
                                            max_tokens=40).choices[0]
    if final.message.tool_calls:
        for c in final.message.tool_calls:
            assert c.function.name in ("get_weather", "add")
    else:
        assert final.message.content and final.finish_reason in ("stop", "length")

"""POST /v1/responses (OpenAI's Responses API) with the official `openai` client: a response is the
chat completion it translates to (same prompt tokens, same greedy text), streamed as OpenAI's
semantic events that join to the same response, continued with `previous_response_id`, stored,
fetched and deleted, and refusing by name what it cannot honour.

One tiny text model (tiny tokenizer and chat template) is served on a loopback port, without the
response cache unless a test turns it on.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from engine_helpers import tiny_text_engine
from test_server import assert_error, wait_idle
from quill.server import BackgroundServer, ServerConfig, create_app
from quill.server.protocol import ResponsesRequest
from quill.server.response_items import PlainText
from quill.server.response_store import build_response_store
from quill.server.sampling import SAMPLING_FIELDS

# Short enough for the tiny model's window with tools (which it lists by name, so that calls need
# no fallback prompt); its "<tool_call>" makes the call format Hermes'.
CHAT_TEMPLATE = ("{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
                 "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}"
                 "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}{% endfor %}\n{% endfor %}"
                 "assistant:")
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.done", "response.content_part.done",
               "response.output_item.done"]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    config = ServerConfig(served_model_name="tiny", response_cache=False, chat_template=CHAT_TEMPLATE)
    app = create_app(tiny_text_engine(tiny_model_dir("llama")), config)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        yield app, client, http


def prompt_tokens(app, messages: list[dict]) -> int:
    return len(app.state.engine.tokenizer.encode_chat(messages, True, CHAT_TEMPLATE))


def create(client, **fields):
    return client.responses.create(**{"model": "tiny", "temperature": 0, "max_output_tokens": 8, **fields})


# ------------------------------------------------------------------------------ one response


def test_a_response_is_the_chat_completion_it_translates_to(served):
    app, client, _ = served
    response = create(client, input="Hello world", instructions="Answer briefly.")
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello world"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == "tiny"
    assert response.instructions == "Answer briefly." and response.max_output_tokens == 8
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [part.type for part in item.content] == ["output_text"]
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens == prompt_tokens(app, messages)
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    finished = {"stop": ("completed", None), "length": ("incomplete", "max_output_tokens")}
    status, reason = finished[chat.choices[0].finish_reason]
    assert response.status == item.status == status
    assert (response.incomplete_details.reason if response.incomplete_details else None) == reason
    wait_idle(app)


def test_message_items_take_every_role_and_text_part(served):
    app, client, _ = served
    items = [{"role": "developer", "content": "Be kind."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"},
                                                             {"type": "input_text", "text": "there"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
             {"role": "user", "content": "Again"}]
    response = create(client, input=items, instructions="Sys.")
    expected = [{"role": "system", "content": "Sys."}, {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi\nthere"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again"}]
    assert response.usage.input_tokens == prompt_tokens(app, expected)
    chat = client.chat.completions.create(model="tiny", messages=expected, temperature=0, max_tokens=8)
    assert response.output_text == chat.choices[0].message.content


def test_max_output_tokens_cuts_the_response_short_as_incomplete(served):
    _, client, _ = served
    response = client.responses.create(model="tiny", input="Hello", temperature=0, max_output_tokens=1)
    if response.usage.output_tokens == 1 and response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.output[0].status == "incomplete"
    else:  # the model chose to stop at once
        assert response.status == "completed"
    assert response.usage.output_tokens <= 1


# ------------------------------------------------------------------------------ streaming


def test_stream_events_come_in_openai_order_and_join_to_the_response(served):
    app, client, _ = served
    whole = create(client, input="Tell me a story", max_output_tokens=12)
    with client.responses.stream(model="tiny", input="Tell me a story", temperature=0, max_output_tokens=12) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [k for k in kinds if k != "response.output_text.delta"] == TEXT_EVENTS + [
        "response.completed" if whole.status == "completed" else "response.incomplete"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds.index("response.content_part.added") < kinds.index("response.output_text.delta")
    assert "".join(deltas) == whole.output_text == final.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert done.text == whole.output_text and done.item_id == final.output[0].id
    assert final.id == events[0].response.id != whole.id
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    wait_idle(app)


def test_stream_sends_named_events_without_done_marker(served):
    _, _, http = served
    body = {"model": "tiny", "input": "Hi", "stream": True, "temperature": 0, "max_output_tokens": 3}
    with http.stream("POST", "/v1/responses", json=body) as response:
        text = response.read().decode()
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert all(b.startswith("event: response.") and "\ndata: {" in b for b in blocks), blocks
    assert "[DONE]" not in text


def test_shutdown_ends_a_streamed_response_as_incomplete(tiny_model_dir):
    """A response still generating when the server shuts down gets its closing events (the output
    so far, `response.incomplete` with the usage), numbered in order, not a cut connection."""
    config = ServerConfig(served_model_name="tiny", response_cache=False, chat_template=CHAT_TEMPLATE,
                          shutdown_grace=0.3)
    app = create_app(tiny_text_engine(tiny_model_dir("llama")), config)
    core = app.state.engine.engine
    step = core.step
    core.step = lambda: time.sleep(0.02) or step()  # the run is certainly unfinished at shutdown
    events: list[dict] = []
    body = {"model": "tiny", "input": "Hi", "stream": True, "max_output_tokens": 150, "ignore_eos": True}
    server = BackgroundServer(app).start()
    try:
        def stream() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                with client.stream("POST", "/v1/responses", json=body) as response:
                    events.extend(json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: "))

        thread = threading.Thread(target=stream)
        thread.start()
        deadline = time.monotonic() + 20
        while app.state.engine.stats().num_running < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        server.stop()
    thread.join(30)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] == "response.incomplete", [e["type"] for e in events[-3:]]
    assert final["response"]["status"] == "incomplete"
    assert 0 < final["response"]["usage"]["output_tokens"] < 150


# ------------------------------------------------------------------------------ multi-turn


def test_previous_response_id_continues_the_conversation_without_old_instructions(served):
    app, client, _ = served
    first = create(client, input="What is two plus two?", instructions="Be terse.")
    second = create(client, input="And three?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    history = [{"role": "user", "content": "What is two plus two?"},
               {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And three?"}]
    assert second.usage.input_tokens == prompt_tokens(app, history)
    chat = client.chat.completions.create(model="tiny", messages=history, temperature=0, max_tokens=8)
    assert second.output_text == chat.choices[0].message.content
    third = create(client, input="And four?", previous_response_id=second.id, instructions="Now verbose.")
    conversation = [{"role": "system", "content": "Now verbose."}, *history,
                    {"role": "assistant", "content": second.output_text}, {"role": "user", "content": "And four?"}]
    assert third.usage.input_tokens == prompt_tokens(app, conversation)


def test_a_streamed_response_is_stored_too(served):
    app, client, _ = served
    with client.responses.stream(model="tiny", input="Hi", temperature=0, max_output_tokens=4) as stream:
        final = list(stream)[-1].response  # response.completed, or response.incomplete if cut off
    assert client.responses.retrieve(final.id).output_text == final.output_text
    follow = create(client, input="Next", previous_response_id=final.id)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": final.output_text},
               {"role": "user", "content": "Next"}]
    assert follow.usage.input_tokens == prompt_tokens(app, history)


def test_retrieve_returns_the_stored_response_and_delete_removes_it(served):
    _, client, http = served
    response = create(client, input="Hello", metadata={"topic": "greeting"})
    assert response.metadata == {"topic": "greeting"} and response.store is True
    fetched = client.responses.retrieve(response.id)
    assert fetched.model_dump() == response.model_dump()
    assert http.delete(f"/v1/responses/{response.id}").json() == {"id": response.id, "object": "response",
                                                                  "deleted": True}
    assert_error(http.get(f"/v1/responses/{response.id}"), 404, "response_id", "not_found")
    assert_error(http.delete(f"/v1/responses/{response.id}"), 404, "response_id", "not_found")
    with pytest.raises(openai.BadRequestError) as info:
        create(client, input="More", previous_response_id=response.id)
    assert info.value.body["param"] == "previous_response_id"


def test_store_false_keeps_nothing(served):
    _, client, _ = served
    response = create(client, input="Hello", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as info:
        create(client, input="More", previous_response_id=response.id)
    assert info.value.body["code"] == "previous_response_not_found"


def test_stored_responses_persist_in_the_response_cache_file_and_memory_is_bounded(tmp_path):
    config = ServerConfig(response_cache_path=str(tmp_path / "cache.sqlite"), responses_store_entries=2)
    store = build_response_store(config)
    for i in range(3):
        store.put({"id": f"resp_{i}", "object": "response"}, [{"role": "user", "content": str(i)}])
    assert len(store.tiers.memory) == 2 and store.tiers.memory.get("resp_0") is None  # evicted from memory ...
    store.close()
    reopened = build_response_store(config)  # ... but kept in the file, across restarts
    assert reopened.get("resp_0") == {"response": {"id": "resp_0", "object": "response"},
                                      "conversation": [{"role": "user", "content": "0"}]}
    assert reopened.delete("resp_1") and reopened.get("resp_1") is None and not reopened.delete("resp_1")
    reopened.close()
    memory_only = build_response_store(ServerConfig(responses_store_entries=1))
    memory_only.put({"id": "a"}, [])
    memory_only.put({"id": "b"}, [])
    assert memory_only.get("a") is None and memory_only.get("b") is not None


def test_a_conversation_continues_on_another_server_sharing_the_cache_file(served, tmp_path):
    app, _, _ = served
    config = ServerConfig(served_model_name="tiny", chat_template=CHAT_TEMPLATE,
                          response_cache_path=str(tmp_path / "cache.sqlite"))
    body = {"model": "tiny", "input": "Hello", "temperature": 0, "max_output_tokens": 4}
    with BackgroundServer(create_app(app.state.engine, config)) as server:
        first = httpx.post(f"{server.url}/v1/responses", json=body, timeout=30).json()
    with BackgroundServer(create_app(app.state.engine, config)) as server:  # a restart
        assert httpx.get(f"{server.url}/v1/responses/{first['id']}", timeout=30).json() == first
        second = httpx.post(f"{server.url}/v1/responses", json={**body, "input": "Again", "cache": False,
                                                                "previous_response_id": first["id"]}, timeout=30)
    history = [{"role": "user", "content": "Hello"},
               {"role": "assistant", "content": first["output"][0]["content"][0]["text"]},
               {"role": "user", "content": "Again"}]
    assert second.json()["usage"]["input_tokens"] == prompt_tokens(app, history)


def test_a_response_cache_hit_replays_the_same_events(served):
    app, _, _ = served
    body = {"model": "tiny", "input": "Cached?", "temperature": 0, "max_output_tokens": 5, "stream": True}
    cached_app = create_app(app.state.engine, ServerConfig(served_model_name="tiny", chat_template=CHAT_TEMPLATE))
    with BackgroundServer(cached_app) as server, httpx.Client(base_url=server.url, timeout=30) as cached:
        first = cached.post("/v1/responses", json=body)
        second = cached.post("/v1/responses", json=body)
        whole = cached.post("/v1/responses", json={**body, "stream": False})
    assert [r.headers["x-quill-cache"] for r in (first, second, whole)] == ["miss", "hit", "hit"]
    live, replayed = (_events(r.text) for r in (first, second))
    # the same events, but the stored text comes in one delta
    assert _without_deltas(replayed) == _without_deltas(live)
    assert len([e for e in replayed if e["type"] == "response.output_text.delta"]) <= 1
    texts = [events[-1]["response"]["output"][0]["content"][0]["text"] for events in (live, replayed)]
    assert texts[0] == texts[1] == whole.json()["output"][0]["content"][0]["text"]
    assert live[-1]["response"]["id"] != replayed[-1]["response"]["id"]


def _events(stream_text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in stream_text.splitlines() if line.startswith("data: ")]


def _without_deltas(events: list[dict]) -> list[str]:
    return [e["type"] for e in events if e["type"] != "response.output_text.delta"]


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("fields, param", [
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"conversation": "conv_123"}, "conversation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": 3}]}, "input[0].content"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "call_zzz", "output": "x"}]}, "input"),  # answers no call
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x" * 5000}, "input"),
    ({"input": []}, "input"),
    ({"model": "other"}, "model"),
])
def test_what_cannot_be_honoured_is_refused_by_name(served, fields, param):
    app, _, http = served
    body = {"model": "tiny", "input": "Hello", "max_output_tokens": 4, **fields}
    status = 404 if param == "model" else 400
    error = assert_error(http.post("/v1/responses", json=body), status, param)
    if param in ("max_output_tokens", "top_logprobs", "n"):  # a message in the client's words, not the engine's
        assert param in error["message"], error
    if fields == {"input": []}:  # what the field takes, not pydantic's complaint about each shape
        assert "a string, or a non-empty list of input items" in error["message"], error
    assert http.post("/v1/responses", json={"model": "tiny", "input": "Hi", "max_output_tokens": 2}).status_code == 200
    wait_idle(app)


def test_every_request_field_is_honoured_refused_or_handled():
    """Each field of the request model reaches SamplingParams (same name) or is read by the endpoint."""
    handled = {"model", "user", "stream", "stream_options", "cache", "input", "instructions", "max_output_tokens",
               "metadata", "store", "previous_response_id", "text", "tools", "tool_choice", "parallel_tool_calls",
               "truncation", "background", "conversation", "prompt", "reasoning", "include", "context_management",
               "top_logprobs", "moderation", "response_format", "structured_outputs",
               # vLLM's older names, read as structured_outputs by the protocol model
               "guided_json", "guided_regex", "guided_choice", "guided_grammar"}
    assert not set(ResponsesRequest.model_fields) - SAMPLING_FIELDS - handled


# ------------------------------------------------------------------------------ conformance


def sdk_event_model(kind: str):
    """The openai SDK's pydantic model of one stream event type."""
    import typing

    from openai.types.responses import ResponseStreamEvent

    union = typing.get_args(ResponseStreamEvent)[0]
    (model,) = [m for m in typing.get_args(union) if typing.get_args(m.model_fields["type"].annotation) == (kind,)]
    return model


def test_bodies_and_events_validate_against_the_openai_sdk_models(served):
    """The client builds its objects without validating; here every field is checked strictly."""
    from openai.types.responses import Response

    _, _, http = served
    body = {"model": "tiny", "input": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_output_tokens": 6,
            "metadata": {"a": "b"}}
    Response.model_validate(http.post("/v1/responses", json=body).json())
    streamed = http.post("/v1/responses", json={**body, "stream": True})
    for event in _events(streamed.text):
        sdk_event_model(event["type"]).model_validate(event)


def test_a_failure_after_the_stream_began_is_an_error_event_then_response_failed():
    from quill.server.errors import APIError
    from quill.server.replies import Head
    from quill.server.responses_reply import ResponsesReply

    stored = []
    reply = ResponsesReply(Head("resp_x", "tiny", 0, False), None, True, ECHOED, new_parser=PlainText,
                           shape={}, on_final=stored.append)
    began = [*reply.opening(), *reply.events(_Update("Hel"))]
    text = "".join(began + reply.failure(APIError(500, "the engine failed", type="server_error")))
    events = _events(text)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                           "response.content_part.added", "response.output_text.delta",
                                           "error", "response.failed"]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hel"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-2]["message"] == "the engine failed"
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["code"] == "server_error"
    for event in events:
        sdk_event_model(event["type"]).model_validate(event)
    assert stored == []  # a failed response is not kept


ECHOED = {"metadata": {}, "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}


class _Update:
    """An engine update's fields that a ResponsesReply reads (an unfinished one)."""

    def __init__(self, delta: str) -> None:
        self.delta, self.finished, self.choice = delta, False, None


# ------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from quill import LLM

    llm = LLM(smollm2_gguf)
    app = create_app(llm, ServerConfig(served_model_name="smollm2", response_cache=False))
    with BackgroundServer(app) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120), llm


@pytest.mark.real_model
def test_smollm2_answers_streams_and_continues_a_conversation(smollm2):
    client, llm = smollm2
    question = "Name the capital of France."
    first = client.responses.create(model="smollm2", input=question, temperature=0, max_output_tokens=12)
    assert "Paris" in first.output_text
    with client.responses.stream(model="smollm2", input=question, temperature=0, max_output_tokens=12) as stream:
        streamed = list(stream)[-1].response
    assert streamed.output_text == first.output_text
    second = client.responses.create(model="smollm2", input="And of Italy?", previous_response_id=first.id,
                                     temperature=0, max_output_tokens=12)
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And of Italy?"}]
    assert second.usage.input_tokens == len(llm.tokenizer.encode_chat(history))
    assert "Rome" in second.output_text


# ------------------------------------------------------------------------------ structured output and tools

FLAG_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["small", "large"]}},
               "required": ["ok", "size"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}


def test_json_schema_format_output_validates(served):
    import jsonschema

    _, client, _ = served
    text = {"format": {"type": "json_schema", "name": "flag", "schema": FLAG_SCHEMA, "strict": True}}
    response = create(client, input="Is it ok?", text=text, max_output_tokens=40)
    assert response.status == "completed" and response.text.format.type == "json_schema"
    jsonschema.validate(json.loads(response.output_text), FLAG_SCHEMA)
    with client.responses.stream(model="tiny", input="Is it ok?", text=text, temperature=0,
                                 max_output_tokens=40) as stream:
        final = stream.get_final_response()
    assert final.output_text == response.output_text
    obj = create(client, input="Anything", text={"format": {"type": "json_object"}}, max_output_tokens=60)
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)
    else:  # cut off: still a prefix of an object
        assert obj.output_text.startswith("{")


def test_chat_structured_output_extensions_apply_too(served):
    _, client, _ = served
    response = create(client, input="Yes or no?", extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert response.output_text in ("yes", "no")


def test_a_function_tool_call_round_trip(served):
    app, client, _ = served
    # The tiny tokenizer spells a call nearly character by character: ~100 tokens.
    calling = {"tools": [WEATHER], "parallel_tool_calls": False, "max_output_tokens": 160}
    first = create(client, input="Weather in Paris?", tool_choice="required", **calling)
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    with client.responses.stream(model="tiny", input="Weather in Paris?", tool_choice="required", temperature=0,
                                 **calling) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == done.arguments == call.arguments
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    streamed_call = events[-1].response.output[0]
    assert (streamed_call.name, streamed_call.arguments) == (call.name, call.arguments)
    # the result goes back as a function_call_output item; the model answers in text
    second = create(client, previous_response_id=first.id, tools=[WEATHER], tool_choice="none",
                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}])
    assert second.output[0].type == "message"
    # the same conversation sent whole, as items, gives the same prompt
    again = create(client, tools=[WEATHER], tool_choice="none", input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}])
    assert again.usage.input_tokens == second.usage.input_tokens and again.output_text == second.output_text
    named = create(client, input="Weather?", tool_choice={"type": "function", "name": "get_weather"}, **calling)
    assert [item.type for item in named.output] == ["function_call"] and named.output[0].name == "get_weather"
    wait_idle(app)


def test_function_call_events_and_bodies_validate_against_the_openai_sdk_models(served):
    from openai.types.responses import Response

    _, _, http = served
    body = {"model": "tiny", "input": "Weather?", "tools": [WEATHER], "tool_choice": "required", "temperature": 0,
            "parallel_tool_calls": False, "max_output_tokens": 160}
    Response.model_validate(http.post("/v1/responses", json=body).json())
    events = _events(http.post("/v1/responses", json={**body, "stream": True}).text)
    assert "response.function_call_arguments.delta" in [e["type"] for e in events]
    for event in events:
        sdk_event_model(event["type"]).model_validate(event)


@pytest.mark.parametrize("fields, param", [
    ({"text": {"format": {"type": "json_schema", "schema": FLAG_SCHEMA}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "not": {}}}}},
     "text.format.schema"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{**WEATHER, "parameters": {"type": "object", "properties": {"a": {"type": "strange"}}}}]},
     "tools[0].parameters"),
    ({"tools": [WEATHER], "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"text": {"format": {"type": "json_object"}}, "structured_outputs": {"regex": "a+"}}, "text.format"),
    ({"tools": [{"type": "function", "name": "bad name!"}], "tool_choice": "none"}, "tools[0].name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].name"),
])
def test_bad_formats_and_tools_are_refused_by_name(served, fields, param):
    _, _, http = served
    assert_error(http.post("/v1/responses", json={"model": "tiny", "input": "Hi", "max_output_tokens": 4, **fields}),
                 400, param)


@pytest.mark.real_model
def test_smollm2_parses_into_a_pydantic_model_and_calls_a_function(smollm2):
    from pydantic import BaseModel

    class City(BaseModel):  # no free numbers: SmolLM2-135M writes digits until max_output_tokens
        name: str
        country: str
        is_capital: bool

    client, _ = smollm2
    parsed = client.responses.parse(model="smollm2", input="Describe Paris.", text_format=City, temperature=0,
                                    max_output_tokens=60)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, City)
    called = client.responses.create(model="smollm2", input="What is the weather in Rome?", tools=[WEATHER],
                                     tool_choice="auto", temperature=0, max_output_tokens=60)
    calls = [item for item in called.output if item.type == "function_call"]
    if calls:  # auto: the model chose to call; the call is then a valid one
        assert calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"] in ("Paris", "Rome")
    required = client.responses.create(model="smollm2", input="What is the weather in Rome?", tools=[WEATHER],
                                       tool_choice="required", parallel_tool_calls=False, temperature=0,
                                       max_output_tokens=60)
    (call,) = required.output
    assert json.loads(call.arguments) == {"city": "Rome"}

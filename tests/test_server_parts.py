"""The server's narrow parts, each against the rule it owns.

- Validation: every rule a request can break is checked in one place (SamplingParams for sampling,
  EngineLimits for what depends on the model, the protocol models for the API's own rules) and
  comes back as a 4xx naming the field in the endpoint's words, with the owner's own message.
- Admission: the counts of waiting and running sequences return to zero however requests end.
- Errors map by type, request log lines are built by one object, metric labels come from the router.

One tiny text model (with a tiny tokenizer and chat template) is served on a loopback port.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from engine_helpers import tiny_text_engine
from test_server import assert_error, wait_idle
from quill.engine.async_engine import EngineShutdownError, EngineStepError
from quill.errors import ChatTemplateError, ContextLengthError, InvalidRequestError, ModelLoadError
from quill.sampling_params import BOUNDS, SamplingParams
from quill.server import BackgroundServer, ServerConfig, create_app
from quill.server.admission import Admission
from quill.server.errors import APIError, api_error, validation_error
from quill.server.protocol import ChatCompletionRequest, CompletionRequest
from quill.server.request_log import RequestRecord
from quill.server.sampling import DERIVED, SAMPLING_FIELDS

CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
WINDOW, VOCAB = 256, 320  # the tiny llama's context window and vocabulary
CHAT_NAMES = {"prompt": "messages", "logprobs": "top_logprobs"}  # what chat calls the engine's fields


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    config = ServerConfig(served_model_name="tiny", response_cache=False, chat_template=CHAT_TEMPLATE)
    app = create_app(tiny_text_engine(tiny_model_dir("llama")), config)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield app, client


def completion(**fields) -> dict:
    return {"model": "tiny", "prompt": [1, 5, 9, 13], "max_tokens": 4, "temperature": 0, **fields}


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 4,
            "temperature": 0, **fields}


def post(client: httpx.Client, body: dict) -> httpx.Response:
    return client.post("/v1/chat/completions" if "messages" in body else "/v1/completions", json=body)


# ------------------------------------------------------------- validation: one owner per rule


def _out_of_bounds(name: str) -> list:
    bounds = BOUNDS[name]
    values = [bounds.low if bounds.low_open else bounds.low - 1]
    if bounds.high is not None:
        values.append(bounds.high + 1)
    return values


# Temperatures outside [0, 2] break the API's own bounds first (test_api_rules_name_their_field).
SAMPLING_CASES = [(name, value) for name in BOUNDS for value in _out_of_bounds(name) if name != "temperature"]


@pytest.mark.parametrize("name, value", SAMPLING_CASES, ids=[f"{n}={v}" for n, v in SAMPLING_CASES])
def test_sampling_rules_are_sampling_params_own_in_both_endpoints(served, name, value):
    """Each range is SamplingParams': the HTTP error carries its message, under the endpoint's name."""
    _, client = served
    expected = pytest.raises(InvalidRequestError, SamplingParams, **{name: value}).value
    bodies = [(completion(**{name: value}), name)]
    if name != "max_tokens":  # a chat's own bound (at least 1) comes first: test_api_rules_name_their_field
        bodies.append((chat(**({"logprobs": True, "top_logprobs": value} if name == "logprobs" else {name: value})),
                       CHAT_NAMES.get(name, name)))
    for body, field in bodies:
        if name == "min_tokens":  # min_tokens is clamped to a max_tokens the client did not choose
            body["max_tokens"] = 4
        error = assert_error(post(client, body), 400, field, "invalid_value")
        assert error["message"] == expected.message.replace(name, field, 1), (body, error)  # in the client's words


@pytest.mark.parametrize("fields, param, code, owner", [
    ({"logit_bias": {"x": 1}}, "logit_bias", "invalid_value", "SamplingParams"),
    ({"logit_bias": {"5": 500.0}}, "logit_bias", "invalid_value", "SamplingParams"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", "invalid_value", "SamplingParams"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias", None, "EngineLimits"),
    ({"stop": [""]}, "stop", "invalid_value", "SamplingParams"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "invalid_value", "SamplingParams"),
    ({"stop_token_ids": [3, VOCAB]}, "stop_token_ids", None, "EngineLimits"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", "invalid_value", "SamplingParams"),
    ({"max_tokens": WINDOW}, "prompt", "context_length_exceeded", "EngineLimits"),
    ({"prompt": [1] * WINDOW}, "prompt", "context_length_exceeded", "EngineLimits"),
    ({"prompt": [1, VOCAB]}, "prompt", None, "EngineLimits"),
    ({"prompt": [1, -3]}, "prompt", None, "EngineLimits"),
])
def test_model_and_sampling_rules_name_their_field(served, fields, param, code, owner):
    app, client = served
    error = assert_error(post(client, completion(**fields)), 400, param, code)
    # The owner's own check, run directly, says the same: the rule is written once.
    body = completion(**fields)
    limits = app.state.engine.limits()
    if owner == "SamplingParams":
        direct = pytest.raises(InvalidRequestError, SamplingParams, **{k: v for k, v in fields.items()}).value
    else:
        params = SamplingParams(max_tokens=fields.get("max_tokens", 4), logit_bias=fields.get("logit_bias"),
                                stop_token_ids=fields.get("stop_token_ids"))
        with pytest.raises(InvalidRequestError) as info:
            limits.check_context(len(body["prompt"]), params.max_tokens, "prompt")
            limits.check_request(body["prompt"], params)
        direct = info.value
    assert error["message"] == direct.message and (direct.param, direct.code) == (param, code)


def test_chat_errors_use_the_chat_field_names(served):
    _, client = served
    long = [{"role": "user", "content": "Hello world " * 200}]
    error = assert_error(post(client, chat(messages=long)), 400, "messages", "context_length_exceeded")
    assert "your messages resulted in" in error["message"]
    error = assert_error(post(client, chat(max_tokens=WINDOW)), 400, "messages", "context_length_exceeded")
    assert "in the messages" in error["message"]
    assert_error(post(client, chat(logprobs=True, top_logprobs=99)), 400, "top_logprobs")
    assert_error(post(client, chat(max_tokens=None, max_completion_tokens=0)), 400, "max_completion_tokens")
    assert_error(post(client, chat(max_tokens=0)), 400, "max_tokens")


@pytest.mark.parametrize("body, status, param, code", [
    (chat(top_logprobs=2), 400, "top_logprobs", None),
    (completion(stream_options={"include_usage": True}), 400, "stream_options", None),
    (chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    (completion(temperature=2.5), 400, "temperature", "invalid_value"),
    (chat(temperature=-0.5), 400, "temperature", "invalid_value"),
    # fields of the API that would change the answer but cannot be honoured: refused by name
    (chat(audio={"voice": "alloy", "format": "wav"}), 400, "audio", "unsupported_parameter"),
    (chat(modalities=["text", "audio"]), 400, "modalities", "unsupported_parameter"),
    (chat(web_search_options={}), 400, "web_search_options", "unsupported_parameter"),
    (chat(reasoning_effort="low"), 400, "reasoning_effort", "unsupported_parameter"),
    (completion(best_of=3), 400, "best_of", "unsupported_parameter"),
    (completion(suffix="}"), 400, "suffix", "unsupported_parameter"),
    (completion(prompt_logprobs=1), 400, "prompt_logprobs", "unsupported_parameter"),  # vLLM's: echo scores
    (chat(prompt_logprobs=1), 400, "prompt_logprobs", "unsupported_parameter"),
    (chat(max_tokens=0), 400, "max_tokens", "invalid_value"),  # a text completion's prompt alone, not a chat's
    (completion(n="two"), 400, "n", "invalid_value"),
    (completion(prompt=[]), 400, "prompt", "invalid_value"),
    (chat(messages=[]), 400, "messages", "invalid_value"),
    (completion(model="gpt-4o"), 404, "model", "model_not_found"),
])
def test_api_rules_name_their_field(served, body, status, param, code):
    _, client = served
    assert_error(post(client, body), status, param, code)


def test_refused_fields_at_their_off_values_are_accepted(served):
    """What clients send by default (OpenAI's defaults spelled out) is no reason to refuse."""
    _, client = served
    for body in (chat(modalities=["text"], audio=None, reasoning_effort=None), completion(best_of=1, suffix=""),
                 completion(best_of=2, n=2)):
        assert post(client, body).status_code == 200, body


def test_max_tokens_0_computes_the_prompt_alone(served):
    _, client = served
    body = post(client, completion(max_tokens=0, logprobs=1)).json()
    assert [(c["text"], c["finish_reason"], c["logprobs"]["tokens"]) for c in body["choices"]] == [("", "length", [])]
    assert body["usage"]["completion_tokens"] == 0


def test_tokenize_and_detokenize_rules(served):
    _, client = served
    assert_error(client.post("/tokenize", json={}), 400, "prompt")
    assert_error(client.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
                 400, "prompt")
    assert_error(client.post("/detokenize", json={"tokens": [VOCAB]}), 400, "tokens")
    assert_error(client.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
    assert client.post("/tokenize", json={"prompt": "Hello"}).json()["max_model_len"] == WINDOW


def test_every_request_field_is_honoured_or_handled_by_the_server():
    """A request field is passed to SamplingParams (same name) or handled by the server itself:
    none can be silently ignored, and a misnamed sampling field shows up here."""
    handled_by_server = {"model", "user", "stream", "stream_options", "cache", "messages", "prompt", "echo",
                         "max_completion_tokens", "top_logprobs", "add_generation_prompt",
                         # structured.py: the constraint and the tools (completions refuse tools)
                         "response_format", "structured_outputs", "tools", "tool_choice", "parallel_tool_calls",
                         "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                         "functions", "function_call",  # the deprecated names of tools and tool_choice: refused
                         "best_of"}  # refused unless it equals n
    handled_by_server |= set(ChatCompletionRequest.REFUSED) | set(CompletionRequest.REFUSED)
    for model in (ChatCompletionRequest, CompletionRequest):
        unknown = set(model.model_fields) - SAMPLING_FIELDS - handled_by_server
        assert not unknown, (model.__name__, unknown)
    assert DERIVED <= SAMPLING_FIELDS


def test_schema_publishes_sampling_params_bounds():
    schema = CompletionRequest.model_json_schema()["properties"]
    for name, bounds in BOUNDS.items():
        if name == "temperature":
            continue
        published = schema[name]
        if bounds.low is not None:
            assert published.get("exclusiveMinimum" if bounds.low_open else "minimum") == bounds.low, name
        if bounds.high is not None:
            assert published["maximum"] == bounds.high, name
    temperature = schema["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0.0, 2.0)  # the API's own bounds


def test_engine_refuses_with_the_same_rules(tiny_model_dir):
    engine = tiny_text_engine(tiny_model_dir("llama"))
    limits = engine.limits()
    assert (limits.max_model_len, limits.vocab_size) == (WINDOW, VOCAB)
    assert limits.kv_capacity_tokens == engine.kv_cache.num_blocks * engine.config.block_size
    cases = [([], {}), ([1, VOCAB], {}), ([1] * WINDOW, {}), ([1, 2], {"logit_bias": {VOCAB: 1.0}})]
    for prompt, fields in cases:
        params = SamplingParams(max_tokens=2, **fields)
        with pytest.raises(InvalidRequestError) as by_limits:
            limits.check_request(prompt, params)
        with pytest.raises(InvalidRequestError) as by_engine:
            engine.add_request(prompt, params)
        assert (by_engine.value.message, by_engine.value.param) == (by_limits.value.message, by_limits.value.param)
    assert not engine.has_unfinished()


# ----------------------------------------------------------------------------- admission


def test_admission_counts_return_to_zero_and_refuse_beyond_the_queue():
    config = ServerConfig(max_queue=4, retry_after=7)
    engine_waiting = [0]
    admission = Admission(config, lambda: engine_waiting[0])
    first = admission.admit(3)
    with pytest.raises(APIError) as busy:
        admission.admit(2)
    assert (busy.value.status, busy.value.code, busy.value.headers["Retry-After"]) == (429, "rate_limit_exceeded", "7")
    first.started()
    first.started()
    assert (admission.waiting, admission.running) == (1, 2)
    first.finished()
    second = admission.admit(3)  # 1 + 3 waiting fits
    assert (admission.waiting, admission.running) == (4, 1)
    first.release()  # its last sequence never got a token, one is still running: both go back
    first.release()  # safe twice
    assert (admission.waiting, admission.running) == (3, 0)
    second.started()
    second.release()
    assert (admission.waiting, admission.running) == (0, 0)
    engine_waiting[0] = 4  # the engine's own queue counts too
    with pytest.raises(APIError):
        admission.admit(1)


def test_admission_drain_refuses_new_requests_and_cancels_stragglers():
    admission = Admission(ServerConfig(), lambda: 0)

    async def scenario():
        quick = asyncio.ensure_future(asyncio.sleep(0.01))
        stuck = asyncio.ensure_future(asyncio.sleep(60))
        for task in (quick, stuck):
            admission.active_tasks.add(task)
            task.add_done_callback(admission.active_tasks.discard)
        await admission.drain(grace=0.2)
        await asyncio.sleep(0)
        return quick.done() and not quick.cancelled(), stuck.cancelled()

    assert asyncio.run(scenario()) == (True, True)  # the quick one finished in its grace, the other was cut
    with pytest.raises(APIError) as closed:
        admission.admit(1)
    assert closed.value.status == 503


def test_counts_return_to_zero_after_aborts_errors_and_refusals(served, monkeypatch):
    """Streams cut mid-way, clients that time out, refused requests: afterwards no sequence is
    counted as waiting or running, no task is in flight, and every KV block is free."""
    app, client = served
    admission = app.state.server.admission
    core = app.state.engine.engine
    step = core.step
    # Slow steps: a 200-token run is certainly unfinished when the test looks at it mid-stream.
    monkeypatch.setattr(core, "step", lambda: time.sleep(0.03) or step())
    long = completion(max_tokens=200, ignore_eos=True, n=3, logprobs=0)
    for _ in range(2):
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            # mid-stream, the request's three sequences are counted, at least one as running
            assert admission.running >= 1 and admission.waiting + admission.running == 3
    with pytest.raises(httpx.TimeoutException):
        client.post("/v1/completions", json=long, timeout=0.05)
    assert_error(post(client, completion(prompt=[1, VOCAB])), 400)
    config = app.state.config
    engine_waiting = admission._engine_waiting
    config.max_queue, admission._engine_waiting = 2, lambda: 2  # the engine has two sequences waiting
    try:
        assert_error(post(client, completion()), 429)  # busy: retry
        assert_error(post(client, completion(n=3)), 400, "n", "too_many_sequences")  # never fits
    finally:
        config.max_queue, admission._engine_waiting = ServerConfig().max_queue, engine_waiting
    assert post(client, completion(max_tokens=8, n=2)).status_code == 200
    wait_idle(app)
    assert (admission.waiting, admission.running) == (0, 0)


# -------------------------------------------------------------------------------- errors


def _raw(client: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def test_errors_say_what_is_wrong_in_the_openai_shape(served):
    """The findings of issue 24: no generic parse error for invalid UTF-8, no internal tokenizer
    message for a lone surrogate, no union soup for an image part, no deprecated function fields
    ignored without a word, no boolean taken as an integer, no 8 KB echo of a rejected list."""
    _, client = served
    error = assert_error(_raw(client, "/v1/completions", b'{"prompt": "a\xff", "max_tokens": 2}'), 400,
                         code="invalid_json")
    assert "UTF-8" in error["message"] and "offset 13" in error["message"]
    error = assert_error(_raw(client, "/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}'), 400,
                         "prompt", "invalid_value")
    assert "lone surrogate" in error["message"] and "TextInputSequence" not in error["message"]
    surrogate = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "x\\udc00"}]}'
    assert_error(_raw(client, "/v1/chat/completions", surrogate), 400, "messages[1].content", "invalid_value")
    image = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    error = assert_error(post(client, image), 400, "messages[0].content", "unsupported_value")
    assert "images are not supported by this model" in error["message"] and "more problems" not in error["message"]
    history = chat(messages=[{"role": "user", "content": "Weather?"},
                             {"role": "assistant", "content": None,
                              "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "weather", "arguments": "{}"}}]},
                             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    assert post(client, history).status_code == 200  # rendered through the template (prompts.message_dict)
    tools = chat(tools=[{"type": "function", "function": {"name": "weather"}}])
    # Honoured (structured.py), not refused: the tools are rendered into the prompt, which outgrows
    # the tiny model's 256-token window; with tool_choice "none" they are not shown and it answers.
    assert_error(post(client, tools), 400, "messages", "context_length_exceeded")
    assert post(client, {**tools, "tool_choice": "none"}).status_code == 200
    error = assert_error(post(client, chat(functions=[{"name": "weather"}])), 400, "functions", "unsupported_parameter")
    assert "send 'tools'" in error["message"]
    assert_error(post(client, chat(function_call="auto")), 400, "function_call", "unsupported_parameter")
    for body, param in ((completion(max_tokens=True), "max_tokens"), (chat(max_completion_tokens=True),
                        "max_completion_tokens"), (completion(stream="yes"), "stream"), (completion(n=1.0), "n"),
                        (chat(logprobs=1), "logprobs"), (completion(echo="false"), "echo")):
        assert_error(post(client, body), 400, param, "invalid_value")
    response = post(client, completion(stop=[f"stop {i}" for i in range(1000)]))
    error = assert_error(response, 400, "stop", "invalid_value")
    assert len(response.content) < 1000 and "1,000 items" in error["message"]
    response = post(client, completion(model="m" * 100_000))
    assert_error(response, 404, "model", "model_not_found")
    assert len(response.content) < 1000


def test_errors_map_by_type_not_by_message():
    chat_names = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}]).field_names
    assert chat_names == CHAT_NAMES
    error = api_error(ContextLengthError("too long"), chat_names)
    assert (error.status, error.param, error.code) == (400, "messages", "context_length_exceeded")
    error = api_error(InvalidRequestError("logprobs must be in [0, 20]", param="logprobs"), chat_names)
    assert (error.status, error.param) == (400, "top_logprobs")
    # a message that happens to start with a field name or mention shutting down decides nothing
    error = api_error(InvalidRequestError("temperature talk, shutting down"))
    assert (error.status, error.param) == (400, None)
    assert api_error(ChatTemplateError("no template")).param == "messages"
    assert api_error(EngineShutdownError("the engine is shutting down")).status == 503
    assert api_error(EngineStepError("step failed: shutting down")).status == 500
    assert api_error(ModelLoadError("bad file")).status == 500
    error = api_error(KeyError("secret internals"))
    assert error.status == 500 and "secret" not in error.message
    raised = InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    error = validation_error([{"type": "value_error", "loc": ("body",), "msg": "Value error", "ctx": {"error": raised}}])
    assert (error.status, error.param, error.message) == (400, "top_logprobs", raised.message)


# --------------------------------------------------------------------- request log, metrics


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


def test_request_record_builds_the_line():
    logger, captured = logging.getLogger("quill.requests"), _Lines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(captured)
    try:
        record = RequestRecord("abc", "/v1/completions")
        record.write(401, 0.5, log_prompts=False)
        record.described(model="m", stream=True, n=2, user=None, prompt="secret prompt")
        record.answered_as("cmpl-abc", "bypass")
        record.failed("first")
        record.failed("second", stream_status=500)
        record.write(200, 1.25, log_prompts=False)
        record.write(200, 1.25, log_prompts=True)
    finally:
        logger.removeHandler(captured)
        logger.setLevel(level)
    # Only this record's lines: a server thread left by another test may still log its requests.
    bare, line, with_prompt = [line for line in captured.lines if line["id"] in ("abc", "cmpl-abc")]
    assert bare == {"id": "abc", "endpoint": "/v1/completions", "status": 401, "duration": 0.5}
    assert (line["id"], line["cache"], line["error"], line["stream_error"]) == ("cmpl-abc", "bypass", "first", 500)
    assert "prompt" not in line and with_prompt["prompt"] == "secret prompt"


def test_metric_labels_come_from_the_routes(tiny_model_dir):
    app = create_app(tiny_text_engine(tiny_model_dir("llama")), ServerConfig(served_model_name="tiny"))

    @app.get("/added-later")
    async def added_later():
        return {"ok": True}

    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/added-later").status_code == 200
        assert client.get("/v1/models/other").status_code == 404
        assert client.get("/no/such/path").status_code == 404
        metrics = client.get("/metrics").text
    for label in ('endpoint="/added-later",status="200"', 'endpoint="/v1/models/{model}",status="404"',
                  'endpoint="other",status="404"'):
        assert f"quill:http_requests_total{{{label}}}" in metrics, label


def test_server_logs_go_to_the_current_stderr_not_a_closed_one(monkeypatch):
    """A server's log handler made while stderr was one stream (pytest's capture of an earlier test)
    writes to the stream stderr is now, without an error once the first is closed."""
    import io
    import sys

    from quill.server.runner import StderrHandler

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    handler = StderrHandler()
    logger = logging.getLogger("quill.test-stderr")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "propagate", False)
    try:
        monkeypatch.setattr(sys, "stderr", second)
        first.close()
        monkeypatch.setattr(logging, "raiseExceptions", True)
        logger.warning("after the swap")
    finally:
        logger.removeHandler(handler)
    assert second.getvalue() == "after the swap\n"

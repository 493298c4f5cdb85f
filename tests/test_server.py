"""The OpenAI-compatible server, over real HTTP on loopback ports.

Two servers, each started once per module in a background thread: one on a tiny random model
(no tokenizer: token-id prompts only; fast) for limits, errors, auth and disconnects, and one on
the real SmolLM2 driven by the official `openai` client for conformance and resilience. Both run
without the response cache, so that repeated requests exercise the engine (test_response_cache.py
covers the cache).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from engine_helpers import tiny_engine
from quill.server import BackgroundServer, ServerConfig, create_app
from quill.server.errors import validation_error
from quill.server.logprobs import TokenText
from quill.server.usage import timings
from quill.outputs import RequestMetrics

# ------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def configured(app, **changes):
    """Change a running app's ServerConfig for the duration of a test."""
    config = app.state.config
    saved = {name: getattr(config, name) for name in changes}
    for name, value in changes.items():
        setattr(config, name, value)
    try:
        yield config
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def wait_idle(app, timeout: float = 20.0):
    """Wait until the engine has nothing running or waiting and every KV block is free."""
    engine = app.state.engine
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        admission = app.state.server.admission
        idle = (stats.num_running == stats.num_waiting == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks
                and admission.waiting == 0 and not admission.active_tasks)
        if idle:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout} s: {stats}, server waiting {admission.waiting}, "
                                 f"active tasks {len(admission.active_tasks)}")
        time.sleep(0.02)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def sse_events(response: httpx.Response) -> list:
    """Parse a whole SSE body: the JSON payloads, then the string '[DONE]'."""
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ------------------------------------------------------------------ unit tests, no model


def test_validation_errors_name_the_field():
    error = validation_error([{"type": "greater_than_equal", "loc": ("body", "max_tokens"), "msg": "too small"}])
    assert (error.status, error.param) == (400, "max_tokens")
    error = validation_error([{"type": "literal_error", "loc": ("body", "messages", 0, "role"), "msg": "bad role"}])
    assert error.param == "messages[0].role"
    error = validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "x", "ctx": {"error": "oops"}}])
    assert (error.status, error.param, error.code) == (400, None, "invalid_json")
    error = validation_error([{"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "x"},
                              {"type": "list_type", "loc": ("body", "prompt", "list[int]"), "msg": "x"}])
    assert error.param == "prompt" and "list of token ids" in error.message


def test_timings_of_one_choice_are_its_metrics():
    metrics = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.0,
                             last_token_time=13.0, finished_time=13.0, num_generated_tokens=5)
    metrics.max_inter_token_latency = 0.75
    result = timings([metrics], completion_tokens=5)
    assert result == {"queue_time": 0.5, "time_to_first_token": 1.0, "generation_time": 2.0,
                      "tokens_per_second": 2.0, "inter_token_latency_mean": 0.5, "inter_token_latency_max": 0.75,
                      "e2e_latency": 3.0}
    assert timings([], 0)["time_to_first_token"] is None


def test_token_bytes_for_logprobs():
    from tokenizer_helpers import tiny_sentencepiece_metadata
    from quill.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata())
    text = TokenText(tokenizer)
    pieces = {tokenizer.backend.id_to_token(i): i for i in range(tokenizer.vocab_size)}
    assert text.bytes(pieces["<0x0A>"]) == b"\n" and text.bytes(pieces["<0xE2>"]) == b"\xe2"
    assert text.text(pieces["▁Hello"]) == " Hello"
    assert text.bytes(2) == b"" and text.text(2, skip_special=False) == "</s>"  # EOS
    assert TokenText(None).text(7) == "token_id:7"  # an engine without a tokenizer


def test_serve_command_options():
    from quill import cli
    from quill.cli import common

    args = cli.build_parser().parse_args(["serve", "smollm2"])
    assert (args.host, args.port, args.max_queue, args.max_body_bytes) == ("127.0.0.1", 8000, 256, 4 << 20)
    assert args.api_key is None and args.max_tokens_cap is None and not args.log_prompts
    args = cli.build_parser().parse_args(
        ["serve", "m", "--port", "0", "--api-key", "k", "--max-body-bytes", "1MiB", "--max-tokens-cap", "64",
         "--served-model-name", "x", "--log-prompts", "--shutdown-grace", "2", "--kv-cache-memory", "64MiB",
         "--kv-cache-dtype", "float32"])
    assert (args.port, args.api_key, args.max_body_bytes, args.max_tokens_cap) == (0, "k", 1 << 20, 64)
    assert (args.kv_cache_memory, args.kv_cache_dtype) == (64 << 20, "float32")
    assert (args.served_model_name, args.log_prompts, args.shutdown_grace) == ("x", True, 2.0)
    assert args.response_cache is None and not args.no_response_cache and args.response_cache_ttl is None
    assert common.llm_options(args)["int8_activations"] is None  # the engine's default: on for bf16 on the CPU
    for flag, value in [("--int8-activations", True), ("--no-int8-activations", False)]:
        args = cli.build_parser().parse_args(["serve", "m", flag])
        assert common.llm_options(args)["int8_activations"] is value
    defaults = ServerConfig()
    args = cli.build_parser().parse_args(["serve", "m"])
    assert (args.default_max_tokens, args.stream_idle_timeout, args.stream_buffer, args.request_timeout) == (
        defaults.default_max_tokens, defaults.stream_idle_timeout, defaults.stream_buffer_bytes, None)
    assert not args.public_metrics and not args.public_docs
    args = cli.build_parser().parse_args(["serve", "m", "--default-max-tokens", "64", "--stream-idle-timeout", "5",
                                          "--stream-buffer", "64KiB", "--request-timeout", "120", "--public-metrics",
                                          "--public-docs"])
    assert (args.default_max_tokens, args.stream_idle_timeout, args.stream_buffer, args.request_timeout) == (
        64, 5.0, 64 << 10, 120.0)
    assert args.public_metrics and args.public_docs
    args = cli.build_parser().parse_args(["serve", "m", "--response-cache", "a.db", "--response-cache-ttl", "60",
                                          "--response-cache-memory", "1MiB", "--response-cache-entries", "10"])
    assert (args.response_cache, args.response_cache_ttl, args.response_cache_memory) == ("a.db", 60.0, 1 << 20)
    assert args.response_cache_entries == 10
    with pytest.raises(SystemExit):  # a file cache and no cache at all contradict each other
        cli.build_parser().parse_args(["serve", "m", "--response-cache", "a.db", "--no-response-cache"])


# ------------------------------------------------------------ tiny model (token ids only)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir("llama"))
    app = create_app(engine, ServerConfig(served_model_name="tiny", response_cache=False))
    with BackgroundServer(app) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield app, client
    assert not app.state.engine.is_alive()  # the app owned the engine and shut it down


def _tiny_completion(**fields) -> dict:
    return {"model": "tiny", "prompt": [1, 5, 9, 13], "max_tokens": 8, "temperature": 0, **fields}


def test_tiny_token_id_completion(tiny):
    app, client = tiny
    response = client.post("/v1/completions", json=_tiny_completion(ignore_eos=True,
                                                                     prompt=[[1, 5, 9], [2, 4, 6, 8]], n=2))
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"]
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (7, 32, 39)
    assert set(usage["quill"]) == {"queue_time", "time_to_first_token", "generation_time", "tokens_per_second",
                                   "inter_token_latency_mean", "inter_token_latency_max", "e2e_latency", "cache_hit",
                                   "cost"}
    assert usage["quill"]["cache_hit"] is False and response.headers["x-quill-cache"] == "bypass"
    assert usage["quill"]["cost"]["saved_usd"] == 0.0
    assert usage["quill"]["time_to_first_token"] > 0
    wait_idle(app)


def test_tiny_errors_are_openai_shaped_and_server_keeps_serving(tiny):
    app, client = tiny
    assert_error(client.post("/v1/completions", content=b'{"prompt": [1, 2'), 400, code="invalid_json")
    assert_error(client.post("/v1/completions", content=b"\xff\xfe"), 400)
    assert_error(client.post("/v1/completions", content=b"[1, 2]"), 400)
    assert_error(client.post("/v1/completions", content=b""), 400)
    assert_error(client.post("/v1/completions", json=_tiny_completion(max_tokens="many")), 400, "max_tokens")
    assert_error(client.post("/v1/completions", json=_tiny_completion(max_tokens=-1)), 400, "max_tokens")
    assert_error(client.post("/v1/completions", json=_tiny_completion(temperature=-0.5)), 400, "temperature")
    assert_error(client.post("/v1/completions", json=_tiny_completion(top_p=1.5)), 400, "top_p")
    assert_error(client.post("/v1/completions", json=_tiny_completion(n=10_000)), 400, "n")
    assert_error(client.post("/v1/completions", json=_tiny_completion(stop=[""])), 400, "stop")
    assert_error(client.post("/v1/completions", json=_tiny_completion(logit_bias={"x": 1})), 400, "logit_bias")
    assert_error(client.post("/v1/completions", json=_tiny_completion(logit_bias={"5": 500})), 400, "logit_bias")
    assert_error(client.post("/v1/completions", json=_tiny_completion(min_tokens=20, max_tokens=4)), 400, "min_tokens")
    assert_error(client.post("/v1/completions", json=_tiny_completion(prompt=[1, 99999])), 400, "prompt")
    assert_error(client.post("/v1/completions", json=_tiny_completion(prompt=[])), 400, "prompt")
    assert_error(client.post("/v1/completions", json=_tiny_completion(prompt="text needs a tokenizer")), 400, "prompt")
    assert_error(client.post("/v1/completions", json=_tiny_completion(stream_options={"include_usage": True})),
                 400, "stream_options")
    assert_error(client.post("/v1/completions", json=_tiny_completion(model="gpt-4o")), 404, "model",
                 "model_not_found")
    assert_error(client.get("/v1/models/gpt-4o"), 404, "model", "model_not_found")
    assert_error(client.get("/no/such/path"), 404)
    assert_error(client.get("/v1/completions"), 405)
    # the context window of the tiny model is 256 tokens
    error = assert_error(client.post("/v1/completions", json=_tiny_completion(max_tokens=300)), 400, "prompt",
                         "context_length_exceeded")
    assert "256" in error["message"] and "304" in error["message"] and "300 in the completion" in error["message"]
    assert_error(client.post("/v1/completions", json=_tiny_completion(prompt=[1] * 256)), 400, "prompt",
                 "context_length_exceeded")
    # a form-encoded body (curl -d without a Content-Type) is read as JSON all the same
    response = client.post("/v1/completions", content=json.dumps(_tiny_completion()).encode(),
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    assert client.post("/v1/completions", json=_tiny_completion()).status_code == 200
    assert client.get("/health").json() == {"status": "ok"}
    wait_idle(app)


def test_tiny_default_max_tokens_is_the_servers_within_the_window(tiny):
    """A request without max_tokens gets the server's default (shown in /v1/models), at most the
    room its prompt leaves in the window and the cap; an explicit value is clamped by the cap."""
    app, client = tiny
    body = _tiny_completion(ignore_eos=True)
    del body["max_tokens"]
    assert ServerConfig().default_max_tokens == 1024
    with configured(app, default_max_tokens=10):
        assert client.get("/v1/models").json()["data"][0]["default_max_tokens"] == 10
        assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 10
        with configured(app, max_tokens_cap=6):
            assert client.get("/v1/models/tiny").json()["default_max_tokens"] == 6
    with configured(app, max_tokens_cap=6):
        response = client.post("/v1/completions", json=body)
    assert response.json()["usage"]["completion_tokens"] == 6  # clamped by the cap
    with configured(app, max_tokens_cap=6):  # an explicit larger value is clamped too
        response = client.post("/v1/completions", json={**body, "max_tokens": 100})
    assert response.json()["usage"]["completion_tokens"] == 6
    response = client.post("/v1/completions", json={**body, "prompt": [1] * 250})
    assert response.json()["usage"]["completion_tokens"] == 6  # 256 - 250


def test_tiny_api_key(tiny):
    app, client = tiny
    with configured(app, api_key="sekret"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            error = assert_error(client.post("/v1/completions", json=_tiny_completion(), headers=headers), 401,
                                 code="invalid_api_key")
            assert "API key" in error["message"]
        assert_error(client.get("/v1/models"), 401)
        assert client.get("/health").status_code == 200  # probes stay open
        assert client.get("/version").status_code == 200
        key = {"Authorization": "Bearer sekret"}
        private = ("/metrics", "/docs", "/redoc", "/openapi.json")  # unless the operator makes them public
        for path in private:
            assert_error(client.get(path), 401, code="invalid_api_key")
            assert client.get(path, headers=key).status_code == 200, path
        with configured(app, public_metrics=True):
            assert client.get("/metrics").status_code == 200
            assert client.get("/openapi.json").status_code == 401
        with configured(app, public_docs=True):
            for path in private[1:]:
                assert client.get(path).status_code == 200, path
            assert client.get("/metrics").status_code == 401
        ok = client.post("/v1/completions", json=_tiny_completion(), headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        # the official client sends the key the same way
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="sekret", max_retries=0).models.list()
        assert [m.id for m in models.data] == ["tiny"]
    assert client.get("/v1/models").status_code == 200


def test_tiny_body_limit(tiny):
    app, client = tiny
    with configured(app, max_body_bytes=10_000):
        big = _tiny_completion(prompt=[1] * 20_000)
        assert_error(client.post("/v1/completions", json=big), 413, code="request_too_large")
        assert client.post("/v1/completions", json=_tiny_completion()).status_code == 200


def test_tiny_queue_limit_tells_busy_from_never_fits(tiny):
    """A request for more sequences than may ever wait is a 400 naming the field, even on an idle
    server (a 429 would send a retrying client round forever); a busy server is a 429 with Retry-After."""
    app, client = tiny
    with configured(app, max_queue=4):
        response = client.post("/v1/completions", json=_tiny_completion(n=8))  # 8 sequences > 4, server idle
        error = assert_error(response, 400, "n", "too_many_sequences")
        assert "retry-after" not in response.headers and "4" in error["message"] and "8" in error["message"]
        response = client.post("/v1/completions", json=_tiny_completion(prompt=[[1, 2]] * 5))
        assert_error(response, 400, "prompt", "too_many_sequences")
        assert client.post("/v1/completions", json=_tiny_completion(n=4)).status_code == 200
        admission = app.state.server.admission
        engine_waiting = admission._engine_waiting
        admission._engine_waiting = lambda: 3  # three sequences wait in the engine: busy
        try:
            response = client.post("/v1/completions", json=_tiny_completion(n=2))
            error = assert_error(response, 429, code="rate_limit_exceeded")
            assert int(response.headers["retry-after"]) >= 1 and "busy" in error["message"]
            assert_error(client.post("/v1/completions", json=_tiny_completion(stream=True, n=2)), 429)
        finally:
            admission._engine_waiting = engine_waiting
    assert client.post("/v1/completions", json=_tiny_completion()).status_code == 200
    wait_idle(app)


def test_tiny_stream_events(tiny):
    app, client = tiny
    body = _tiny_completion(stream=True, n=2, prompt=[[1, 2, 3], [4, 5, 6]], ignore_eos=True,
                            stream_options={"include_usage": True}, logprobs=2)
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    finishes = [(choice["index"], choice["finish_reason"]) for c in chunks for choice in c["choices"]
                if choice["finish_reason"] is not None]
    assert sorted(finishes) == [(i, "length") for i in range(4)]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 32
    assert all(c["usage"] is None for c in chunks[:-1])
    tokens = [len(choice["logprobs"]["tokens"]) for c in chunks[:-1] for choice in c["choices"]]
    assert sum(tokens) == 32


def test_tiny_disconnect_mid_stream_aborts(tiny):
    app, client = tiny
    before = app.state.engine.stats().num_generated_tokens
    body = _tiny_completion(stream=True, max_tokens=240, ignore_eos=True, n=2, logprobs=0)  # an event per token
    for _ in range(3):
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
        # leaving the block closes the connection mid-stream
    stats = wait_idle(app)
    assert stats.num_generated_tokens - before < 3 * 2 * 240  # aborted, not run to the end


def test_tiny_client_timeout_on_non_streaming_request_aborts(tiny):
    app, client = tiny
    before = app.state.engine.stats().num_generated_tokens
    body = _tiny_completion(max_tokens=240, ignore_eos=True, n=4)
    with pytest.raises(httpx.TimeoutException):
        client.post("/v1/completions", json=body, timeout=0.05)
    stats = wait_idle(app)
    assert stats.num_generated_tokens - before < 4 * 240
    assert client.post("/v1/completions", json=_tiny_completion()).status_code == 200


def test_tiny_metrics(tiny):
    app, client = tiny
    client.post("/v1/completions", json=_tiny_completion())
    text = client.get("/metrics").text
    for name in ("quill:time_to_first_token_seconds_bucket", "quill:e2e_request_latency_seconds_count",
                 "quill:request_queue_time_seconds_sum", "quill:inter_token_latency_seconds_count",
                 "quill:prompt_tokens_total", "quill:generation_tokens_total", "quill:num_requests_running",
                 "quill:num_requests_waiting", "quill:kv_cache_usage_perc", "quill:prefix_cache_hits_total",
                 "quill:prefix_cache_queries_total", 'quill:http_requests_total{endpoint="/v1/completions",status="200"}',
                 'quill:request_success_total{finished_reason="length",model_name="tiny"}'):
        assert name in text, name
    assert "_created" not in text


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_tiny_request_log(tiny):
    app, client = tiny
    # A handler on the logger itself: other tests' libraries reconfigure logging (propagation,
    # levels), which caplog depends on.
    logger, captured = logging.getLogger("quill.requests"), _Records()
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not assignment: it clears isEnabledFor's cache
    logger.addHandler(captured)
    try:
        client.post("/v1/completions", json=_tiny_completion(user="u1"))
        client.post("/v1/completions", json=_tiny_completion(max_tokens=-1))
        with configured(app, log_prompts=True):
            client.post("/v1/completions", json=_tiny_completion())
            # The line is written once the response has been sent, so it can trail the client.
            deadline = time.monotonic() + 5
            while len(captured.messages) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        logger.removeHandler(captured)
        logger.setLevel(level)
    records = [json.loads(message) for message in captured.messages]
    ok, bad, logged = records[-3:]
    assert ok["status"] == 200 and ok["id"].startswith("cmpl-") and ok["endpoint"] == "/v1/completions"
    assert (ok["prompt_tokens"], ok["completion_tokens"], ok["user"]) == (4, 8, "u1")
    assert ok["finish_reasons"] == ["length"] and ok["ttft"] > 0 and ok["e2e"] > 0
    assert ok["itl_max"] > 0 and ok["itl_mean"] > 0 and ok["cost_usd"] > 0
    assert "prompt" not in ok
    assert bad["status"] == 400 and "max_tokens" in bad["error"]
    assert logged["prompt"] == [1, 5, 9, 13]


# ------------------------------------------------------------------------ real SmolLM2

MESSAGES = [{"role": "user", "content": "Name the capital of France."}]  # see test_real_models


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    from quill import LLM

    return LLM(smollm2_gguf)


@pytest.fixture(scope="module")
def real(llm):
    app = create_app(llm, ServerConfig(served_model_name="smollm2", response_cache=False))
    with BackgroundServer(app) as server:
        yield app, server.url


@pytest.fixture
def client(real):
    return openai.OpenAI(base_url=f"{real[1]}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.real_model
def test_chat_and_completion(client, real, llm):
    chat = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=12, temperature=0)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == "smollm2"
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # exact usage for a known prompt
    assert chat.usage.prompt_tokens == len(llm.tokenizer.encode_chat(MESSAGES))
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert chat.usage.model_extra["quill"]["time_to_first_token"] > 0

    prompt = "The capital of France is"
    text = client.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert text.object == "text_completion" and text.choices[0].finish_reason == "length"
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (len(llm.tokenizer.encode(prompt)), 6)
    assert text.usage.prompt_tokens_details.cached_tokens == 0  # shorter than one block

    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"] and client.models.retrieve("smollm2").id == "smollm2"


@pytest.mark.real_model
def test_streamed_chat_matches_non_streamed(client):
    kwargs = dict(model="smollm2", messages=MESSAGES, max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != whole.id
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.real_model
def test_n_choices_stop_seed_and_logprobs(client):
    prompt = "Here is a list of fruits: apple, banana,"
    greedy = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[len(greedy) // 2:][:3]
    stopped = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == greedy[:greedy.index(stop)]

    sampled = [client.completions.create(model="smollm2", prompt=prompt, max_tokens=10, temperature=1.0, seed=1234,
                                         n=3, logprobs=2) for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    choices = sampled[0].choices
    assert [c.index for c in choices] == [0, 1, 2]
    assert len({c.text for c in choices}) > 1  # n different samples (seed + index)
    assert sum(len(c.logprobs.tokens) for c in choices) == sampled[0].usage.completion_tokens
    assert sampled[0].usage.prompt_tokens == sampled[1].usage.prompt_tokens  # once, not n times
    for c in choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(1 <= len(top) <= 3 for top in c.logprobs.top_logprobs)

    chat = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens
    assert "".join(e.token for e in entries) == chat.choices[0].message.content
    for entry in entries:
        assert bytes(entry.bytes).decode() == entry.token and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


@pytest.mark.real_model
def test_an_echoed_prompt_is_scored_as_its_generation_reported(client, llm):
    """What lm-eval-harness asks to score a text (echo, logprobs, max_tokens 0): every prompt token
    with its logprob, the first null; scoring a greedy answer gives the logprobs generating it
    reported, exactly, streamed or not."""
    prompt = "Here is a list of fruits: apple, banana,"
    answer = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True}).choices[0]
    scored = client.completions.create(model="smollm2", prompt=prompt + answer.text, max_tokens=0, echo=True,
                                       logprobs=2)
    choice = scored.choices[0]
    assert choice.text == prompt + answer.text and choice.finish_reason == "length"
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(llm.tokenizer.encode(prompt + answer.text)), 0)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == scored.usage.prompt_tokens and "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    tail = len(answer.logprobs.tokens)  # the answer's tokens, as the prompt's last (it re-tokenizes alike here)
    assert logprobs.tokens[-tail:] == answer.logprobs.tokens
    assert logprobs.token_logprobs[-tail:] == answer.logprobs.token_logprobs
    assert logprobs.top_logprobs[-tail:] == answer.logprobs.top_logprobs
    streamed = client.completions.create(model="smollm2", prompt=prompt + answer.text, max_tokens=0, echo=True,
                                         logprobs=2, stream=True)
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.text for c in chunks) == choice.text
    assert [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs] == logprobs.token_logprobs


@pytest.mark.real_model
def test_streamed_n_choices_finish_once_each(client):
    stream = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=6, n=3, seed=1,
                                            stream=True)
    roles, finishes = {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.role:
                roles.setdefault(choice.index, choice.delta.role)
                assert choice.index not in finishes
            if choice.finish_reason:
                assert choice.index not in finishes
                finishes[choice.index] = choice.finish_reason
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"} and sorted(finishes) == [0, 1, 2]


@pytest.mark.real_model
def test_prefix_cache_hits_show_in_usage_and_metrics(client, real):
    messages = [{"role": "system", "content": "You are a terse assistant. " * 8}, *MESSAGES]
    first = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=2)
    second = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=2)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens > 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
    metrics = httpx.get(f"{real[1]}/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("quill:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) > 0


@pytest.mark.real_model
def test_real_errors(client, real, llm, monkeypatch):
    app, url = real
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=9000)
    prompt_tokens = len(llm.tokenizer.encode_chat(MESSAGES))
    message = info.value.body["message"]
    assert "8192" in message and f"{prompt_tokens + 9000}" in message and f"{prompt_tokens} in the messages" in message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2, top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"
    response = httpx.post(f"{url}/v1/chat/completions",
                          json={"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2})
    assert_error(response, 400, "messages[0].role")
    response = httpx.post(f"{url}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert_error(response, 400)
    # a lone surrogate cannot be tokenized: a 400, not a crash
    response = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "a\\ud800b", "max_tokens": 2}',
                          headers={"content-type": "application/json"})
    assert_error(response, 400)
    monkeypatch.setattr(llm.tokenizer, "chat_template", None)
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert "no chat template" in assert_error(response, 400)["message"]
    monkeypatch.undo()
    assert client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2).choices
    wait_idle(app)


@pytest.mark.real_model
def test_byte_level_token_bytes_reassemble_the_text(llm):
    text = TokenText(llm.tokenizer)
    for sample in ("Hello world", "café ☃ naïve 日本語"):
        ids = llm.tokenizer.encode(sample)
        assert b"".join(text.bytes(i) for i in ids) == sample.encode()


@pytest.mark.real_model
def test_tokenize_and_detokenize(real, llm):
    url = real[1]
    response = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world"}).json()
    assert response["tokens"] == llm.tokenizer.encode("Hello world") and response["count"] == len(response["tokens"])
    assert response["max_model_len"] == 8192
    chat = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == llm.tokenizer.encode_chat(MESSAGES)
    assert httpx.post(f"{url}/detokenize", json={"tokens": response["tokens"]}).json() == {"prompt": "Hello world"}
    assert_error(httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    assert_error(httpx.post(f"{url}/tokenize", json={}), 400)


@pytest.mark.real_model
def test_queue_full_under_concurrent_load(real):
    app, url = real
    body = {"messages": [{"role": "user", "content": "Tell me a long story about a dragon. " * 100}],
            "max_tokens": 4}

    async def fire():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(6)))

    with configured(app, max_queue=1):
        responses = asyncio.run(fire())
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    for response in responses:
        if response.status_code == 429:
            assert_error(response, 429, code="rate_limit_exceeded")
            assert response.headers["retry-after"]
    wait_idle(app)


@pytest.mark.real_model
def test_many_timed_out_requests_leave_nothing_behind(real, client):
    """200 requests whose clients give up after 0.5 s: the server aborts them all, frees every
    block and answers the next request promptly."""
    app, url = real
    body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 64, "extra": "ignored"}

    async def one(http: httpx.AsyncClient, i: int) -> str:
        try:
            streaming = i % 2 == 0
            request = {**body, "stream": streaming, "messages": [{"role": "user", "content": f"Story number {i}."}]}
            response = await http.post("/v1/chat/completions", json=request, timeout=0.5)
            return str(response.status_code)
        except httpx.TimeoutException:
            return "timeout"

    async def fire():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(200)))

    started = time.monotonic()
    outcomes = asyncio.run(fire())
    assert time.monotonic() - started < 60
    assert outcomes.count("timeout") > 100, outcomes
    asked = time.monotonic()
    answer = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=4, timeout=10)
    assert answer.choices[0].message.content
    assert time.monotonic() - asked < 10
    wait_idle(app, timeout=20)


@pytest.mark.real_model
def test_concurrent_streaming_clients_all_complete(real):
    app, url = real

    async def one(client: openai.AsyncOpenAI, i: int):
        stream = await client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": f"Say something about the number {i}."}],
            max_tokens=12, stream=True)
        text, finishes = [], []
        async for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        return "".join(text), finishes

    async def fire():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(20)))
        finally:
            await client.close()

    results = asyncio.run(fire())
    assert len(results) == 20
    for text, finishes in results:
        assert text and len(finishes) == 1 and finishes[0] in ("stop", "length")
    wait_idle(app)


@pytest.mark.real_model
def test_clients_disconnecting_mid_stream_free_everything(real):
    app, url = real
    body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 500, "stream": True, "ignore_eos": True}

    def reader(results: list):
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                seen = 0
                for line in response.iter_lines():
                    seen += line.startswith("data: ")
                    if seen == 3:
                        break
                results.append(seen)

    results: list = []
    threads = [threading.Thread(target=reader, args=(results,)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [3] * 5
    stats = wait_idle(app)
    assert stats.num_running == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.real_model
def test_quill_serve_exits_cleanly_on_sigterm(smollm2_gguf):
    """The real command: serve, answer, then SIGTERM mid-stream -> after the grace period the stream
    ends with finish_reason "abort" and [DONE], nothing is logged as an error, exit status 0."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "quill.cli", "serve", str(smollm2_gguf), "--port", str(port),
         "--served-model-name", "smol", "--shutdown-grace", "1"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "QUILL_API_KEY": "k"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k"}
        body = {"model": "smol", "messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]  # the stream ends whole
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        assert process.wait(timeout=30) == 0
        log = process.stderr.read()
        request_lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert request_lines and request_lines[-1]["endpoint"] == "/v1/chat/completions"
        assert request_lines[-1]["cut_short"] == "shutdown" and request_lines[-1]["finish_reasons"] == ["abort"]
        assert "prompt" not in request_lines[-1]
        assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
        assert "KV cache: 1.00 GiB (default) holds" in log  # the start-up line says what the cache takes
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

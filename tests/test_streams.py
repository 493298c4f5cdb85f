"""Streams under clients that do not behave, and a server that stops (issue 24's findings 1 and 3):

- a client that keeps its socket open but stops reading is cut after the idle timeout, or as soon as
  it falls further behind than the stream buffer, and its run's KV blocks are freed at once;
- a request past the server's deadline ends with an error (a 504, or an error event in a stream);
- at shutdown, after the grace period, every open stream ends with finish_reason "abort" and
  [DONE], every waiting body gets a 503, and nothing is logged as an error.

`LiveStream` is checked alone with fake ASGI callables; the rest over real sockets, against a tiny
model whose engine steps are slowed so that a run certainly outlasts what the test watches.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from engine_helpers import tiny_engine
from test_server import assert_error, configured, wait_idle
from quill.server import BackgroundServer, ServerConfig, create_app
from quill.server.admission import Admission
from quill.server.streaming import LiveStream, StreamLimits

# ------------------------------------------------------------------- LiveStream, no server


class _Events:
    """An event source like live_events: `count` events of `size` bytes (None: endless), noting its cleanup."""

    def __init__(self, size: int = 100, count: int | None = None, pause: float = 0.0) -> None:
        self.size, self.count, self.pause = size, count, pause
        self.produced = 0
        self.closed = False

    async def events(self):
        try:
            while self.count is None or self.produced < self.count:
                self.produced += 1
                yield "x" * (self.size - 1) + "\n"
                await asyncio.sleep(self.pause)
        finally:
            self.closed = True


def _run_stream(source: _Events, limits: StreamLimits, accept: int | None, disconnect_after: float | None = None):
    """Drive a LiveStream whose connection accepts `accept` body messages, then blocks (None: all).
    Returns (messages sent, stall reasons, cleanups, seconds)."""
    sent, stalls, cleanups = [], [], []

    async def send(message):
        if message["type"] == "http.response.body" and accept is not None and len(sent) > accept:
            await asyncio.sleep(3600)  # a client that stopped reading: the send never completes
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600 if disconnect_after is None else disconnect_after)
        return {"type": "http.disconnect"}

    async def main():
        stream = LiveStream(source.events(), limits, Admission(ServerConfig(), lambda: 0), stalls.append,
                            lambda: cleanups.append(1))
        started = time.monotonic()
        await stream({"type": "http"}, receive, send)
        return time.monotonic() - started

    return sent, stalls, cleanups, asyncio.run(main())


def test_live_stream_sends_every_event_then_ends_the_response():
    source = _Events(count=50)
    sent, stalls, cleanups, _ = _run_stream(source, StreamLimits(idle_timeout=5, buffer_bytes=1 << 20), accept=None)
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert sent[0]["type"] == "http.response.start" and sent[-1] == {"type": "http.response.body", "body": b"",
                                                                      "more_body": False}
    assert body == ("x" * 99 + "\n").encode() * 50 and not stalls and cleanups == [1] and source.closed


def test_a_reader_that_stops_is_cut_after_the_idle_timeout():
    source = _Events(size=100, pause=0.05)  # slow events: the buffer never fills
    _, stalls, cleanups, seconds = _run_stream(source, StreamLimits(idle_timeout=0.3, buffer_bytes=1 << 20), accept=2,
                                               disconnect_after=0.5)
    assert stalls == ["idle_timeout"] and source.closed and cleanups == [1]
    assert seconds < 3, seconds  # cut at the timeout, then ended when the connection went


def test_a_reader_that_falls_behind_the_buffer_is_cut_at_once():
    source = _Events(size=1000)  # fast events: 64 of them fill the buffer
    _, stalls, cleanups, seconds = _run_stream(source, StreamLimits(idle_timeout=60, buffer_bytes=64_000), accept=2,
                                               disconnect_after=0.2)
    assert stalls == ["buffer_full"] and source.closed and cleanups == [1]
    assert source.produced < 100 and seconds < 5, (source.produced, seconds)  # long before the idle timeout


def test_a_client_that_leaves_is_not_a_stall():
    source = _Events(size=100, pause=0.01)
    _, stalls, cleanups, seconds = _run_stream(source, StreamLimits(idle_timeout=60, buffer_bytes=1 << 20),
                                               accept=None, disconnect_after=0.2)
    assert stalls == [] and source.closed and cleanups == [1] and seconds < 5


# ------------------------------------------------------------------ over sockets, tiny model


def _slow_steps(app, seconds: float) -> None:
    """Slow the engine's steps: a long run is then certainly unfinished when the test looks."""
    core = app.state.engine.engine
    step = core.step
    core.step = lambda: time.sleep(seconds) or step()


def _tiny_app(tiny_model_dir, **config) -> object:
    engine = tiny_engine(tiny_model_dir("llama"))
    return create_app(engine, ServerConfig(served_model_name="tiny", response_cache=False, **config))


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    # A buffer too large to fill here: a stalled reader is cut by the idle timeout alone.
    app = _tiny_app(tiny_model_dir, stream_idle_timeout=1.0, stream_buffer_bytes=64 << 20)
    _slow_steps(app, 0.02)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield app, server, client


def _metric(client: httpx.Client, name: str, **labels) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _stalled_reader(port: int, body: dict) -> socket.socket:
    """A raw client that sends a streaming request and never reads (a small receive window, so
    that it is full after a few kilobytes, as a slow link would be after more)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


def test_a_stalled_reader_is_aborted_and_its_blocks_freed(served):
    """Finding 1: a streaming client that keeps its socket open but stops reading used to run to
    max_tokens (here 16 x 240 tokens at 20 ms a step: 5 s at least) with its events piling up in
    memory. It is cut within the 1 s idle timeout of its connection filling up, and a reader
    alongside it is served as usual."""
    app, server, client = served
    before = app.state.engine.stats().num_generated_tokens
    cut_before = _metric(client, "quill:requests_cut_short_total", reason="idle_timeout")
    body = {"prompt": [1, 5, 9], "max_tokens": 240, "ignore_eos": True, "n": 16, "logprobs": 5, "stream": True}
    sock = _stalled_reader(server.port, body)
    try:
        started = time.monotonic()
        normal = client.post("/v1/completions", json={"prompt": [2, 4], "max_tokens": 8, "stream": True})
        assert normal.status_code == 200 and normal.text.endswith("data: [DONE]\n\n")
        while app.state.engine.stats().num_running or app.state.engine.stats().num_waiting:
            assert time.monotonic() - started < 4.5, "the stalled stream is still running"
            time.sleep(0.05)
        stats = app.state.engine.stats()
        assert stats.num_free_kv_blocks == stats.num_kv_blocks  # its blocks are free
        assert stats.num_generated_tokens - before < 16 * 240
        assert _metric(client, "quill:requests_cut_short_total", reason="idle_timeout") == cut_before + 1
    finally:
        sock.close()
    wait_idle(app)


def test_request_deadline_ends_bodies_and_streams_with_an_error(served):
    app, _, client = served
    body = {"prompt": [1, 5, 9], "max_tokens": 240, "ignore_eos": True}
    with configured(app, request_timeout=0.5):
        started = time.monotonic()
        error = assert_error(client.post("/v1/completions", json=body), 504, code="request_timeout")
        assert "0.5 seconds" in error["message"] and time.monotonic() - started < 4
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert all("choices" in json.loads(e) for e in events[:-2])
    assert _metric(client, "quill:requests_cut_short_total", reason="deadline") >= 2
    wait_idle(app)


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _errors_logged():
    """The records logged at ERROR by uvicorn, Quill or anyone (the root logger) inside the block."""
    errors = _ErrorRecords()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "quill", "")]
    for logger in loggers:
        logger.addHandler(errors)
    try:
        yield errors.records
    finally:
        for logger in loggers:
            logger.removeHandler(errors)


def test_shutdown_ends_every_stream_with_abort_and_done(tiny_model_dir):
    """Finding 3: after the grace period, open streams used to be cut with a bare 'incomplete
    chunked read' and a CancelledError traceback each in the log. Each now gets its final chunks
    (finish_reason "abort" for every unfinished choice, the usage when asked for) and [DONE]; a
    request still waiting for its whole body gets a 503; nothing is logged at ERROR."""
    app = _tiny_app(tiny_model_dir, shutdown_grace=0.3)
    _slow_steps(app, 0.02)
    streams: dict[int, list] = {}
    bodies: list[httpx.Response] = []
    long = {"prompt": [1, 5, 9], "max_tokens": 240, "ignore_eos": True}
    with _errors_logged() as errors:
        server = BackgroundServer(app).start()
        try:
            def stream(key: int, fields: dict) -> None:
                with httpx.Client(base_url=server.url, timeout=30) as http:
                    with http.stream("POST", "/v1/completions", json={**long, **fields, "stream": True}) as response:
                        streams[key] = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]

            def whole() -> None:
                with httpx.Client(base_url=server.url, timeout=30) as http:
                    bodies.append(http.post("/v1/completions", json=long))

            threads = [threading.Thread(target=stream, args=(0, {"n": 2, "stream_options": {"include_usage": True}})),
                       threading.Thread(target=stream, args=(1, {"echo": True})), threading.Thread(target=whole)]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 20
            while app.state.engine.stats().num_running < 4:  # every request is generating
                assert time.monotonic() < deadline
                time.sleep(0.02)
        finally:
            server.stop()
        for thread in threads:
            thread.join(30)
    assert streams.keys() == {0, 1}
    for key, events in streams.items():
        assert events[-1] == "[DONE]", (key, events[-3:])
        chunks = [json.loads(e) for e in events[:-1]]
        finishes = sorted((c["index"], c["finish_reason"]) for chunk in chunks for c in chunk["choices"]
                          if c["finish_reason"])
        assert finishes == [(i, "abort") for i in range(2 if key == 0 else 1)], finishes
    usage = json.loads(streams[0][-2])["usage"]
    assert usage["completion_tokens"] > 0 and json.loads(streams[0][-2])["choices"] == []
    assert len(bodies) == 1
    assert_error(bodies[0], 503, code="server_shutting_down")
    assert not errors, [r.getMessage() for r in errors]
    assert not app.state.engine.is_alive()


def test_shutdown_with_a_stalled_reader_ends_quietly(tiny_model_dir):
    """A stream whose client stopped reading cannot be given its final events: at shutdown it is
    ended without them, its run aborted, and still nothing is logged at ERROR (no traceback, no
    'returned without completing response'), and the server stops."""
    app = _tiny_app(tiny_model_dir, shutdown_grace=0.3)
    _slow_steps(app, 0.02)
    body = {"prompt": [1, 5, 9], "max_tokens": 240, "ignore_eos": True, "n": 16, "logprobs": 5, "stream": True}
    with _errors_logged() as errors:
        server = BackgroundServer(app).start()
        sock = _stalled_reader(server.port, body)
        try:
            deadline = time.monotonic() + 20
            while app.state.engine.stats().num_generated_tokens < 16 * 20:  # its connection is full by now
                assert time.monotonic() < deadline
                time.sleep(0.05)
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < 20 and not server.thread.is_alive()
        finally:
            sock.close()
    assert not errors, [r.getMessage() for r in errors]
    assert not app.state.engine.is_alive()

"""The asyncio front of the engine, for the HTTP server.

All model work happens on one dedicated thread that owns the `Engine` (torch's thread pool
suffers badly when several Python threads call into it). Event-loop code only queues commands
and awaits per-request streams of outputs, so a slow client never slows the step loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from quill.engine.engine import Engine, EngineStats
from quill.engine.limits import EngineLimits
from quill.errors import QuillError
from quill.outputs import RequestOutput
from quill.sampling_params import SamplingParams

log = logging.getLogger("quill.engine")


class EngineStepError(QuillError, RuntimeError):
    """The engine failed while running a step; the requests in flight were aborted."""


class EngineShutdownError(EngineStepError):
    """The engine stopped (the server is shutting down); the requests in flight were aborted."""


@runtime_checkable
class EngineClient(Protocol):
    """What the server uses of an engine: `AsyncEngine` below, or a client of engine replicas in
    other processes (quill/deploy/client.py) with the same behaviour."""

    tokenizer: Any  # None for a token-ids-only engine

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 request_id: str | None = None) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def limits(self) -> EngineLimits: ...

    def is_alive(self) -> bool: ...

    def shutdown(self, timeout: float | None = 10.0) -> None: ...


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # touched only by the engine thread
        self._stats = engine.stats()
        self.tokenizer = engine.tokenizer  # None for a token-ids-only engine
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="quill-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as they are produced. Invalid requests raise
        before anything is yielded; leaving the loop early (or being cancelled) aborts it."""
        params = params or SamplingParams()
        # The id is fixed here, not by the engine, so that a caller cancelled while the engine
        # is still adding the request can abort it all the same.
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        added: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._commands.put(("add", (prompt, params, request_id, stream), added))
        remaining = params.n
        try:
            await asyncio.wrap_future(added)
            while remaining:
                item = await stream.queue.get()
                if item is None:  # aborted
                    return
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.finished
                yield item
        finally:
            rejected = added.done() and (added.cancelled() or added.exception() is not None)
            if remaining and not rejected:  # never abort another request that owns a clashing id
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def stats(self) -> EngineStats:
        """A snapshot taken after the latest step (safe to read from any thread)."""
        return self._stats

    def limits(self) -> EngineLimits:
        """What a request must fit (fixed, safe to read from any thread)."""
        return self.engine.limits()

    def is_alive(self) -> bool:
        """Whether the engine thread still runs (it stops at shutdown)."""
        return self._thread.is_alive()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        self._stopping.set()
        self._commands.put(("wake", None, None))
        self._thread.join(timeout)

    # --------------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            if self.engine.has_unfinished():
                self._step()
            self._stats = self.engine.stats()
        for request_id in list(self._streams):
            self._fail(request_id, EngineShutdownError("the engine is shutting down"))

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block)
            while True:
                try:
                    self._run_command(*command)
                except Exception:  # one bad command must not stop the engine thread
                    log.exception("engine command %r failed", command[0])
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _run_command(self, kind: str, payload, done: concurrent.futures.Future | None) -> None:
        if kind == "add":
            if not done.set_running_or_notify_cancel():  # the caller gave up before we got here
                return
            prompt, params, request_id, stream = payload
            try:
                request_id = self.engine.add_request(prompt, params, request_id)
            except Exception as exc:  # invalid request: the caller gets the error
                done.set_exception(exc)
                return
            self._streams[request_id] = stream
            done.set_result(request_id)
        elif kind == "abort":
            self.engine.abort(payload)
            stream = self._streams.pop(payload, None)
            if stream is not None:  # aborted by someone other than its consumer: end the stream
                stream.put(None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a bug must not kill the loop: fail what is in flight, go on
            log.exception("engine step failed; aborting %d requests", len(self._streams))
            for request_id in list(self._streams):
                self._fail(request_id, EngineStepError(f"engine step failed: {exc}"))
            return
        # Before the outputs go out, so a finished request never sees stats that miss its last step.
        self._stats = self.engine.stats()
        for output in outputs:
            if output.error is not None:  # one completion failed: its request fails, the rest go on
                self._fail(output.request_id, output.error)
                continue
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)
            if output.finished and not self.engine.is_unfinished(output.request_id):
                self._streams.pop(output.request_id, None)

    def _fail(self, request_id: str, error: BaseException) -> None:
        self.engine.abort(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)

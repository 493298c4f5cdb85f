"""A live answer's server-sent events on the wire, with the limits that keep one client from costing
the server more than its answer (`LiveStream`).

The events are produced and sent by two tasks with a bounded buffer between them, so that a client
that reads slowly never slows the run and never makes the server hold more than `stream_buffer_bytes`
of its events:

- the producer pulls the answer's events as the engine makes them, into the buffer; when the buffer
  would pass its bound, the client has fallen too far behind: the stream is stalled ("buffer_full");
- the writer sends what the buffer holds, all of it at once; a send that waits longer than
  `stream_idle_timeout` for the connection to accept data is a stall too ("idle_timeout").

A stalled stream is cut: its run is aborted (the producer closes the events, whose cleanup aborts
the engine requests and frees their KV blocks) and counted. Nothing more can be said to a client that
does not read; the task then waits for the connection to go (runner.py's sockets are dropped by the
kernel after `kernel_drop_after` seconds) so that it ends as a disconnect, not as a response left
half-sent (which uvicorn logs as an error).
A client that disconnects ends the stream the same way, without a stall.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.responses import Response

from quill.server.admission import Admission
from quill.server.config import ServerConfig

# Seconds a stalled stream's task waits for its connection to drop when there is no idle timeout.
_LINGER = 5.0
# Seconds added to twice the idle timeout before the kernel drops a connection that accepts nothing:
# the kernel's clock starts when the peer's window closes, the idle timeout's only once the buffers
# between (the kernel's unsent bytes, the transport's) are full too, which for a slow stream takes
# seconds more; the server's own cut, which says why, must come first.
_KERNEL_DROP_MARGIN = 30.0


def kernel_drop_after(idle_timeout: float) -> float:
    """Seconds after which the kernel drops a connection whose peer accepts nothing (runner.py's
    TCP_USER_TIMEOUT), for a server with this idle timeout."""
    return 2 * idle_timeout + _KERNEL_DROP_MARGIN


@dataclass(frozen=True)
class StreamLimits:
    idle_timeout: float | None  # seconds a send may wait for the connection to accept data
    buffer_bytes: int  # bytes of events held for the client (waiting, or being sent)

    @classmethod
    def of(cls, config: ServerConfig) -> StreamLimits:
        return cls(config.stream_idle_timeout, config.stream_buffer_bytes)


class StreamStalled(Exception):
    """The client stopped taking the stream's data (`reason`: "idle_timeout" or "buffer_full")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Buffer:
    """Encoded events between the producer and the writer, counted until the connection took them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending: list[bytes] = []
        self.size = 0  # bytes put and not yet accepted by the connection
        self.closed = False  # the producer has put its last event
        self._ready = asyncio.Event()

    def put(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise StreamStalled("buffer_full")
        self.pending.append(data)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def take(self) -> bytes | None:
        """Everything put so far, at once; None after the last event."""
        while not self.pending:
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        data = b"".join(self.pending)
        self.pending.clear()
        return data

    def sent(self, size: int) -> None:
        self.size -= size


class LiveStream(Response):
    """`events` (SSE text) as a streaming response under `limits`. `on_stall(reason)` is told when the
    client stalls; `cleanup` runs once the response is over, however it ended (even when the client
    left before the first event, when `events` never ran its own cleanup)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], limits: StreamLimits, admission: Admission,
                 on_stall: Callable[[str], None], cleanup: Callable[[], None]) -> None:
        self.events = events
        self.limits = limits
        self.admission = admission
        self.on_stall = on_stall
        self.cleanup = cleanup
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        buffer = _Buffer(self.limits.buffer_bytes)
        producer = asyncio.ensure_future(self._produce(buffer))
        writer = asyncio.ensure_future(self._write(buffer, send))
        gone = asyncio.ensure_future(_client_gone(receive))
        with self.admission.track(asyncio.current_task()):
            try:
                stall = await self._until_done(producer, writer, gone)
                if stall is not None:
                    self.on_stall(stall.reason)
                    producer.cancel()  # the events' cleanup aborts the run now, not when the socket goes
                    writer.cancel()
                    idle = self.limits.idle_timeout
                    await asyncio.wait({gone}, timeout=kernel_drop_after(idle) + 1 if idle else _LINGER)
            except asyncio.CancelledError:  # shutdown cancelled a stream it could not end (its client does
                asyncio.current_task().uncancel()  # not read): end it quietly, as a stall would
            finally:
                for task in (producer, writer, gone):
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.gather(producer, writer, return_exceptions=True)
                await _close(self.events)
                self.cleanup()

    @staticmethod
    async def _until_done(producer: asyncio.Task, writer: asyncio.Task, gone: asyncio.Task) -> StreamStalled | None:
        """Wait until the writer has sent the last event or the client left (None), or a stall."""
        waiting = {producer, writer, gone}
        while True:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if isinstance(error, StreamStalled):
                    return error
                if isinstance(error, OSError):  # ASGI 2.4 servers say "client gone" this way
                    return None
                if error is not None:
                    raise error
            if writer in done or gone in done:
                return None

    async def _produce(self, buffer: _Buffer) -> None:
        async for event in self.events:
            buffer.put(event.encode("utf-8"))
        buffer.close()

    async def _write(self, buffer: _Buffer, send) -> None:
        await self._send(send, {"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
        while (data := await buffer.take()) is not None:
            await self._send(send, {"type": "http.response.body", "body": data, "more_body": True})
            buffer.sent(len(data))
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})

    async def _send(self, send, message: dict) -> None:
        timeout = self.limits.idle_timeout
        try:
            async with asyncio.timeout(timeout):
                await send(message)
        except TimeoutError:
            raise StreamStalled("idle_timeout") from None


async def _client_gone(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _close(events: AsyncIterator[str]) -> None:
    """Run the events' own cleanup now (an async generator left mid-way is only closed when collected)."""
    close = getattr(events, "aclose", None)
    if close is not None:
        with contextlib.suppress(BaseException):
            await close()

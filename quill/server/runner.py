"""Running an app with uvicorn: `serve()` in the foreground until SIGINT/SIGTERM, with a graceful
shutdown (what `quill serve` does), and `BackgroundServer` on a loopback port in a thread (tests
and benchmarks).

Two things are added to uvicorn here, both about clients that do not behave:

- Shutdown drains the app first (`ServerState.drain`): new requests get 503, in-flight ones get
  the grace period, then every open stream ends with its final events (finish_reason "abort" and
  [DONE]) and every waiting body with a 503, all before uvicorn looks at its connections. uvicorn's
  own shutdown would otherwise cancel the request tasks mid-stream after its timeout: a bare
  "incomplete chunked read" for the client and a CancelledError traceback per stream in the log.
- Each connection keeps little unsent data: in the kernel (`TCP_NOTSENT_LOWAT`; otherwise Linux
  grows a loopback socket's send buffer to about 4 MB, so a client that stops reading costs that
  much memory and goes unnoticed for minutes) and in asyncio's transport (its write buffer's high
  mark, 64 KiB by default, is lowered). Then sending waits after a few tens of KB and the stream's
  idle timeout (streaming.py) sees the stall. `TCP_USER_TIMEOUT` then lets the kernel drop a
  connection whose peer accepts nothing, so a stalled socket does not linger; well past the idle
  timeout (`streaming.kernel_drop_after` says why).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
import time

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from quill.server.streaming import kernel_drop_after

# Unsent bytes a connection may queue in the kernel before writes wait (measured on loopback:
# 36 KB written before the transport paused, against 2.8 MB without the option).
UNSENT_BYTES_LOW_WATER = 16 << 10
# Bytes asyncio's transport buffers before it tells uvicorn to wait (its default is 64 KiB): at
# 64 KiB a stalled tiny-model stream was dropped by the kernel before the idle timeout could see it.
TRANSPORT_HIGH_WATER = 16 << 10
# Seconds uvicorn waits for connections after the app has drained: long enough for the final
# events to reach clients that read, short for a socket whose client never will.
CLOSE_WAIT = 5.0


def configure_logging() -> None:
    """Request lines are bare JSON on stderr; other Quill messages get a level and a name. (For
    every process that runs a server: `quill serve`, and the ingress of quill/deploy.)"""
    _log_to_stderr("quill.requests", "%(message)s", propagate=False)
    _log_to_stderr("quill", "%(levelname)s %(name)s: %(message)s")


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not the stream it was when the
    handler was made: that one may be closed by then (pytest's capture of a test that started a
    server, whose threads log on after it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one: always sys.stderr instead
        pass


def _log_to_stderr(name: str, form: str, propagate: bool = True) -> None:
    logger = logging.getLogger(name)
    if logger.handlers:  # configured already (a second server in this process, or the embedding app)
        return
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(form))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = propagate


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM. On SIGTERM the app drains (see the module's
    docstring), uvicorn closes the connections, then the app's shutdown stops the engine; the
    process then returns normally."""
    server = _Server(_config(app, host, port, log_level))
    # uvicorn re-raises the signal it caught once it has shut down; a no-op SIGTERM handler (restored
    # by uvicorn after its own) turns that into a normal return, i.e. exit status 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


class BackgroundServer:
    """Run an app with uvicorn on a loopback port in a background thread (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = _Server(_config(app, host, port, "warning"))
        self.thread = threading.Thread(target=self.server.run, name="quill-http", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down as on SIGTERM (the app's drain included) and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=CLOSE_WAIT, http=_protocol(app))


def _protocol(app: FastAPI) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, with each connection's socket set up as the module's docstring says."""

    class QuillHTTPProtocol(AutoHTTPProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
            config = getattr(app.state, "config", None)
            limit_unsent_data(transport.get_extra_info("socket"), getattr(config, "stream_idle_timeout", None))

    return QuillHTTPProtocol


def limit_unsent_data(sock: socket.socket | None, idle_timeout: float | None) -> None:
    """Keep at most `UNSENT_BYTES_LOW_WATER` unsent bytes in the kernel and, with an idle timeout,
    let the kernel drop the connection once its peer has accepted nothing for `kernel_drop_after`
    seconds (Linux; elsewhere what the platform lacks is skipped)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [("TCP_NOTSENT_LOWAT", UNSENT_BYTES_LOW_WATER)]
    if idle_timeout:
        options.append(("TCP_USER_TIMEOUT", int(kernel_drop_after(idle_timeout) * 1000)))
    for name, value in options:
        if hasattr(socket, name):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            except OSError:  # not supported for this socket: the app's own limits still hold
                pass


class _Server(uvicorn.Server):
    """uvicorn's server, which lets the app drain before it shuts connections down."""

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:  # stop accepting first, as uvicorn's own shutdown does
            server.close()
        state = getattr(self.config.app.state, "server", None)
        if state is not None:
            await state.drain()
        await super().shutdown(sockets)

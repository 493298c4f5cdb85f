"""Running an app with uvicorn: `serve()` in the foreground until SIGINT/SIGTERM, with a graceful
shutdown (what `quill serve` does), and `BackgroundServer` on a loopback port in a thread (tests
and benchmarks).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time

from fastapi import FastAPI


def configure_logging() -> None:
    """Request lines are bare JSON on stderr; other Quill messages get a level and a name. (For
    every process that runs a server: `quill serve`, and the ingress of quill/deploy.)"""
    _log_to_stderr("quill.requests", "%(message)s", propagate=False)
    _log_to_stderr("quill", "%(levelname)s %(name)s: %(message)s")


def _log_to_stderr(name: str, form: str, propagate: bool = True) -> None:
    logger = logging.getLogger(name)
    if logger.handlers:  # configured already (a second server in this process, or the embedding app)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(form))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = propagate


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, shutdown_grace: float = 10.0,
          log_level: str = "info") -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM. On SIGTERM uvicorn stops accepting
    connections, gives open ones `shutdown_grace` seconds, cancels the rest (which aborts their
    engine requests), then the app's shutdown stops the engine; the process then returns normally."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_grace)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op SIGTERM handler (restored
    # by uvicorn after its own) turns that into a normal return, i.e. exit status 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


class BackgroundServer:
    """Run an app with uvicorn on a loopback port in a background thread (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, shutdown_grace: float = 2.0) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=shutdown_grace, lifespan="on")
        self.server = uvicorn.Server(config)
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

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

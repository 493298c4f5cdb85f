"""The OpenAI-compatible HTTP server: FastAPI routes that translate HTTP to engine calls and back.

The server never runs the model: every request goes to the `AsyncEngine`, whose one thread owns
the engine, and comes back as a stream of `RequestOutput`s. A generation request passes through
narrow parts, each with one job (docs/ARCHITECTURE.md, "The server", has the map):

  middleware.Gate        API key, body limit, request id, HTTP counter, the request's log line
  routes                 every route; generation endpoints cancelled when the client leaves
  chat / completions     the endpoints, top to bottom: check, tokenize (prompts), convert
                         (sampling: the one place a request becomes SamplingParams), respond
  respond                response cache replay, or admission (admission) and a live answer
                         (answer: a Run through the engine plus its books), as a body or a stream
  replies                what the body and the chunks look like, per endpoint
  errors                 typed errors -> OpenAI's error shape, with `param` and `code`
  ui                     the chat page at `/` (unless `ServerConfig.ui` is off), on the public API

Build an app with `create_app(llm, ServerConfig(...))`; `runner.serve()` runs it with uvicorn
(what `quill serve` does) and `runner.BackgroundServer` runs it on a loopback port in a thread (tests).
"""
from __future__ import annotations

import contextlib

from fastapi import FastAPI

from quill import __version__
from quill.server.config import ServerConfig
from quill.server.errors import add_exception_handlers
from quill.server.middleware import Gate
from quill.server.routes import add_routes
from quill.server.state import ServerState, build_state
from quill.server.ui import add_ui


def create_app(model, config: ServerConfig | None = None) -> FastAPI:
    """`model`: an `LLM`, an `Engine` (with a tokenizer) or an `AsyncEngine`. The app owns (and shuts
    down) the `AsyncEngine` it creates for an `LLM` or `Engine`, not one it is given."""
    config = config or ServerConfig()
    server = build_state(model, config)
    app = FastAPI(
        title="Quill", version=__version__, lifespan=_lifespan(server),
        description="OpenAI-compatible API of the Quill inference engine.",
    )
    app.state.server = server
    app.state.config = config  # read per request: tests may change it on a running app
    app.state.engine = server.engine
    app.add_middleware(Gate, config=config, metrics=server.metrics, router=app.router)
    add_exception_handlers(app)
    add_routes(app, server)
    if config.ui:
        add_ui(app, server)
    return app


def _lifespan(server: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await server.shutdown()

    return lifespan

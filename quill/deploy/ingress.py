"""The ingress: the ordinary Quill server app (quill/server, `create_app`) with a `ReplicaClient`
where the engine would be. Requests are validated, tokenized, admitted, cached, billed and logged
there exactly as in one process; only the engine work goes to the replicas. It runs in one of two
places:

- `local_ingress`: in the process that deployed the replicas, served by uvicorn as `quill serve`
  serves one engine. This is what `quill serve --replicas` does. Every token a replica streams
  crosses one Ray hop, replica to here.
- `Ingress`: as a Ray Serve deployment behind Ray's HTTP proxy (`build_app`, for `serve run`,
  `serve deploy` and KubeRay). Each token crosses a second hop, its SSE chunk from the ingress
  replica to the proxy. On 2 cores (AMD EPYC, SmolLM2, 2 replicas x 1 thread, 16 streams) the
  ingress and the proxy spent 1.3 ms of CPU per streamed token between them, the local ingress
  0.6 ms, next to the engines' ~1.6 ms.

Tokenization happens in the ingress rather than in the replicas: routing compares prompts by their
KV blocks (token ids at the engine's block size), a bad request (too long, unknown token ids) is
refused with a 400 before it costs a replica anything, and the response cache is keyed by token
ids. The price is the ingress's CPU for tokenizing, small next to generating (a short chat prompt
takes well under a millisecond; long ones are tokenized off the event loop, see server/prompts.py).
"""
from __future__ import annotations

import contextlib

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from quill.deploy.client import ReplicaClient
from quill.deploy.settings import ClusterSettings
from quill.server.app import create_app
from quill.server.runner import configure_logging


def local_ingress(engine: DeploymentHandle, settings: ClusterSettings) -> FastAPI:
    """The server app for this process, answering from the engine deployment behind `engine`.
    Call it outside an event loop (it asks a replica what it serves); the app starts reading the
    replicas' stats when it starts, and stops when it shuts down, after its drain."""
    client = ReplicaClient(engine, engine.describe.remote().result(), settings)
    app = create_app(client, settings.server)
    serving = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        try:
            async with serving(app):
                yield
        finally:
            client.shutdown()

    app.router.lifespan_context = lifespan
    return app


@serve.ingress()
class Ingress:
    async def __init__(self, engine: DeploymentHandle, settings: ClusterSettings) -> None:
        configure_logging()
        self.settings = settings
        self.client = await ReplicaClient.connect(engine, settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Ray runs the app's lifespan: at shutdown the server drains (admission, shutdown_grace).
        return create_app(self.client, self.settings.server)

    def __del__(self) -> None:
        self.client.shutdown()

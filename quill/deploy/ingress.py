"""The ingress: the ordinary Quill server app (quill/server, `create_app`) running as a Ray Serve
deployment behind Ray's HTTP proxy, with a `ReplicaClient` where the engine would be. Requests are
validated, tokenized, admitted, cached, billed and logged here exactly as in one process; only the
engine work goes to the replicas.

Tokenization happens here rather than in the replicas: routing compares prompts by their KV blocks
(token ids at the engine's block size), a bad request (too long, unknown token ids) is refused
with a 400 before it costs a replica anything, and the response cache is keyed by token ids.
The price is the ingress's CPU for tokenizing, small next to generating (a short chat prompt takes
well under a millisecond; long ones are tokenized off the event loop, see server/prompts.py).
"""
from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from quill.deploy.client import ReplicaClient
from quill.deploy.settings import ClusterSettings
from quill.server.app import create_app
from quill.server.runner import configure_logging


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

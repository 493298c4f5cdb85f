"""The parts one server is made of, built once per app from the model and the `ServerConfig`
(`build_state`): the engine and its limits, prompts (tokenizer and chat template), admission,
metrics, billing, the response cache, and the served model's name. Endpoints receive this object
and use its parts; the parts hold the behaviour, this only wires them together."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from quill import __version__
from quill.cache import ResponseCache, model_identity
from quill.cost import CostModel
from quill.engine.async_engine import AsyncEngine, EngineClient
from quill.engine.limits import EngineLimits
from quill.errors import quoted
from quill.server.admission import Admission
from quill.server.billing import Billing
from quill.server.cached import build_response_cache
from quill.server.config import ServerConfig
from quill.server.errors import APIError
from quill.server.logprobs import TokenText
from quill.server.metrics import ServerMetrics
from quill.server.prompts import Prompts
from quill.server.response_store import ResponseStore, build_response_store


@dataclass(frozen=True)
class ServedModel:
    """The one model this server serves, as `/v1/models` shows it."""

    name: str
    created: int
    max_model_len: int

    def check(self, name: str | None) -> None:
        """A request naming another model is a 404 (naming none means this one)."""
        if name is not None and name != self.name:
            raise APIError(404, f"The model {quoted(name)} does not exist. This server serves `{self.name}`.",
                           param="model", code="model_not_found")

    def card(self, default_max_tokens: int) -> dict:
        """`default_max_tokens`: what a request that sets no max_tokens gets (see sampling.py)."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "quill",
                "max_model_len": self.max_model_len, "default_max_tokens": default_max_tokens}


@dataclass
class ServerState:
    config: ServerConfig  # read per request: changes to a running app's config apply at once
    engine: AsyncEngine
    owns_engine: bool  # built here (for an LLM or Engine): shut down with the app
    limits: EngineLimits
    model: ServedModel
    prompts: Prompts
    token_text: TokenText
    admission: Admission
    metrics: ServerMetrics
    billing: Billing
    cache: ResponseCache | None
    responses: ResponseStore  # the Responses API's stored responses
    # Cache keys include what the answer depends on beyond the request (see `build_state`).
    cache_identity: dict

    async def drain(self) -> None:
        """Refuse new requests, give in-flight ones the grace period, then end the rest: streams with
        their final events, bodies with a 503 (see `Admission.drain`). Safe to call again."""
        await self.admission.drain(self.config.shutdown_grace)

    async def shutdown(self) -> None:
        """Drain (runner.py's servers have done so before closing connections), stop the engine."""
        await self.drain()
        if self.owns_engine:
            await asyncio.to_thread(self.engine.shutdown, 5.0)
        if self.cache is not None:
            self.cache.close()
        self.responses.close()


def build_state(model, config: ServerConfig) -> ServerState:
    """`model`: an `LLM`, an `Engine` (with a tokenizer) or an `EngineClient` (an `AsyncEngine`, or
    the replicas' client of quill/deploy). The server owns (and shuts down) the `AsyncEngine` it
    creates for an `LLM` or `Engine`, not one it is given."""
    owns_engine = not isinstance(model, EngineClient)
    engine = AsyncEngine(getattr(model, "engine", model)) if owns_engine else model
    limits = engine.limits()
    path = getattr(model, "path", None)
    name = config.served_model_name or (Path(path).stem if path else "quill")
    costs = CostModel(config.hourly_cost, config.reference_prices)
    cache = build_response_cache(config)
    metrics = ServerMetrics(engine, name, costs, cache)
    return ServerState(
        config=config, engine=engine, owns_engine=owns_engine, limits=limits,
        model=ServedModel(name, int(time.time()), limits.max_model_len),
        prompts=Prompts(engine.tokenizer, getattr(model, "chat_template", None), config),
        token_text=TokenText(engine.tokenizer),
        admission=Admission(config, lambda: engine.stats().num_waiting),
        metrics=metrics, billing=Billing(costs, engine.stats, metrics, name), cache=cache,
        responses=build_response_store(config),
        cache_identity={"model": name, "dtype": limits.dtype, "quill": __version__, "weights": _weights(model, path)},
    )


def _weights(model, path: str | None) -> str:
    """What identifies the weights in cache keys: the identity an engine client brings (its files
    may be on another machine), else the file's; a model without a file (an engine built in
    process) gets an identity of its own, so no stored answer matches it."""
    return getattr(model, "weights_identity", None) or (model_identity(path) if path else uuid.uuid4().hex)

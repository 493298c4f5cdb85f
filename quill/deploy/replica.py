"""One engine replica, as a Ray Serve deployment: it loads the model once, runs it on its own
`AsyncEngine` (the same one thread that owns the engine as in `quill serve`) and answers the
ingress's `Submission`s with a stream of `OutputDelta` lists. Cancelling the stream (the client went
away, the ingress aborted the request) cancels the generator here, which aborts the engine request
and frees its KV blocks.

Ray Serve health-checks it (`check_health`: the engine thread must be running) and replaces it when
it fails or dies; at shutdown Ray waits for its requests in flight (the graceful timeout) before
`__del__` stops the engine. Every `stats_interval_s` it posts its engine stats to the deployment's
`StatsBoard`, which is how the ingress's /metrics sees each replica.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from ray import serve
from ray.exceptions import RayActorError

from quill.cache import model_identity
from quill.deploy.settings import ClusterSettings
from quill.deploy.wire import DeltaEncoder, OutputDelta, ReplicaInfo, Submission, merge_deltas
from quill.engine.async_engine import AsyncEngine
from quill.engine.engine import EngineStats
from quill.llm import LLM

log = logging.getLogger("quill.deploy")

BOARD = "stats"  # the deployment-scoped StatsBoard's name


class EngineReplica:
    async def __init__(self, settings: ClusterSettings) -> None:
        self.name = serve.get_replica_context().replica_id.unique_id
        self.stream_interval = settings.stream_interval
        # As in `quill serve` (quill/cli/serve.py): load single-threaded so that the engine thread's
        # OpenMP pool is the only one, then give the engine thread this replica's share of cores
        # (Ray also set OMP_NUM_THREADS for the process, see application.py).
        torch.set_num_threads(1)
        llm = LLM(settings.model, **settings.engine)
        torch.set_num_threads(settings.threads_per_replica)
        self.engine = AsyncEngine(llm.engine)
        self.info = ReplicaInfo(limits=self.engine.limits(), tokenizer=llm.tokenizer,
                                chat_template=llm.chat_template, path=str(llm.path),
                                weights_identity=model_identity(llm.path))
        self._board = serve.get_deployment_actor(BOARD)
        self._publisher = asyncio.ensure_future(self._publish(settings.stats_interval_s))
        log.info("replica %s serves %s with %d threads", self.name, Path(llm.path).name, settings.threads_per_replica)

    async def generate(self, submission: Submission) -> AsyncIterator[list[OutputDelta]]:
        """The request's outputs, `stream_interval` at a time (the first and the last at once),
        merged per completion: each item crosses a Ray hop to the ingress (and behind Ray's HTTP proxy
        a second, its SSE chunk), about as much CPU as the engine spends on a token of a small model."""
        encoder = DeltaEncoder()
        pending: list[OutputDelta] = []
        first = True
        async for output in self.engine.generate(submission.prompt_ids, submission.params, submission.request_id):
            pending.append(encoder.encode(output))
            if first or output.finished or len(pending) >= self.stream_interval:
                yield merge_deltas(pending)
                pending, first = [], False
        if pending:
            yield merge_deltas(pending)

    def describe(self) -> ReplicaInfo:
        return self.info

    async def replica_stats(self) -> dict[str, EngineStats]:
        """Every live replica's latest stats (from the board this replica shares with the others)."""
        return await self._on_board("read")

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError(f"the engine thread of replica {self.name} has stopped")

    async def _publish(self, interval: float) -> None:
        while True:
            try:
                await self._on_board("post", self.name, self.engine.stats())
            except (RayActorError, ValueError):  # the board is being restarted: post again next time
                pass
            await asyncio.sleep(interval)

    async def _on_board(self, method: str, *args):
        try:
            return await getattr(self._board, method).remote(*args)
        except RayActorError:  # Ray Serve restarts a board that died: look the new one up next time
            try:
                self._board = serve.get_deployment_actor(BOARD)
            except ValueError:  # not registered yet
                pass
            raise

    async def __del__(self) -> None:
        """Ray Serve has let the requests in flight finish (or the graceful timeout pass)."""
        self._publisher.cancel()
        await asyncio.to_thread(self.engine.shutdown, 5.0)
        try:
            await self._board.remove.remote(self.name)
        except Exception:  # the board may already be gone with the deployment; nothing to tidy then
            pass

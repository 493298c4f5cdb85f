"""The engine replicas as the ingress's server sees them: `ReplicaClient` has the interface the
server uses of an `AsyncEngine` (`quill.engine.async_engine.EngineClient`: generate, abort, stats,
limits, tokenizer, is_alive, shutdown), so the ingress is the ordinary server app with this in
place of the engine; every endpoint, admission, the response cache, billing and metrics are the
same code as in one process.

A request goes out as a `Submission` on a streaming call through the Ray Serve handle (whose
router, router.py, picks the replica) and comes back as deltas, rebuilt into `RequestOutput`s.
Aborting it cancels the call, which aborts it on the replica. If the replica dies before the
request's first token, the request is resubmitted (to another replica: Ray drops a dead one at
once); after that, or when no replica has been running for `unavailable_timeout_s`, the request
fails with `ReplicaLostError` (a 503), never hangs. The replicas' stats are read every
`stats_interval_s` from their board (board.py) and summed (stats.py) for admission and billing.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from quill.deploy.affinity import prefix_hashes
from quill.deploy.settings import ClusterSettings
from quill.deploy.stats import combine_stats
from quill.deploy.wire import OutputAssembler, OutputDelta, ReplicaInfo, Submission
from quill.engine.async_engine import EngineShutdownError
from quill.engine.engine import EngineStats
from quill.engine.limits import EngineLimits
from quill.outputs import RequestOutput
from quill.sampling_params import SamplingParams

log = logging.getLogger("quill.deploy")

_LOST = (RayActorError, ReplicaUnavailableError)  # the replica died or went away mid-call


class ReplicaLostError(EngineShutdownError):
    """The engine replica answering a request stopped before it finished, or none is running."""


class ReplicaClient:
    def __init__(self, handle: DeploymentHandle, info: ReplicaInfo, settings: ClusterSettings) -> None:
        self._handle = handle
        self._streams = handle.options(stream=True)
        self._settings = settings
        self._limits = info.limits
        # What the server's state reads of a model (quill/server/state.py build_state).
        self.tokenizer = info.tokenizer
        self.chat_template = info.chat_template
        self.path = info.path
        self.weights_identity = info.weights_identity
        self._calls: dict[str, DeploymentResponseGenerator] = {}
        self._aborted: set[str] = set()
        self._replica_stats: dict[str, EngineStats] = {}
        self._stats = combine_stats([])
        self._last_live = time.monotonic()
        self._refresher: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def connect(cls, handle: DeploymentHandle, settings: ClusterSettings, timeout: float = 120.0) -> ReplicaClient:
        """Ask a replica what it serves, wait until the replicas' stats arrive, then keep them fresh."""
        client = cls(handle, await handle.describe.remote(), settings)
        await client.start(timeout)
        return client

    async def start(self, timeout: float = 120.0) -> None:
        """Wait until the replicas' stats arrive, then keep them fresh from the running event loop."""
        deadline = time.monotonic() + timeout
        while not await self.refresh() and time.monotonic() < deadline:
            await asyncio.sleep(self._settings.stats_interval_s)
        self._refresher = asyncio.ensure_future(self._refresh_forever())

    # ------------------------------------------------------------------ the engine interface
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        params = params or SamplingParams()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        hashes = prefix_hashes(prompt_ids, self._limits.block_size, self._settings.routing.max_blocks)
        submission = Submission(prompt_ids, params, request_id, hashes)
        assembler = OutputAssembler(request_id, prompt_ids)
        attempt = 0
        while True:
            started = complete = False
            call = self._streams.generate.remote(submission)
            self._calls[request_id] = call
            try:
                async for deltas in self._deltas(call):
                    started = True
                    for delta in deltas:
                        yield assembler.add(delta)
                complete = True
                return
            except _LOST as exc:
                if started or attempt >= self._settings.retries or request_id in self._aborted:
                    raise ReplicaLostError(f"the engine replica answering this request stopped ({type(exc).__name__}); "
                                           "the request was aborted, please retry it") from None
                log.warning("replica lost before request %s started; resubmitting it", request_id)
            except (RequestCancelledError, asyncio.CancelledError):
                if request_id in self._aborted and not _being_cancelled():
                    return  # aborted by `abort`: the stream just ends, as with AsyncEngine
                raise
            except RayTaskError as exc:  # the replica raised: an invalid request, an engine failure
                raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
            finally:
                self._calls.pop(request_id, None)
                self._aborted.discard(request_id)
                if not complete:
                    call.cancel()
            attempt += 1

    def abort(self, request_id: str) -> None:
        call = self._calls.get(request_id)
        if call is not None:
            self._aborted.add(request_id)
            call.cancel()

    def stats(self) -> EngineStats:
        """The replicas' stats summed, as of the latest refresh."""
        return self._stats

    def replica_stats(self) -> dict[str, EngineStats]:
        """Each live replica's latest stats, by replica id (/metrics labels its series with them)."""
        return dict(self._replica_stats)

    def limits(self) -> EngineLimits:
        return self._limits

    def is_alive(self) -> bool:
        """Whether any replica is running (has posted its stats recently)."""
        return not self._closed and bool(self._replica_stats)

    def shutdown(self, timeout: float | None = None) -> None:
        self._closed = True
        if self._refresher is not None:
            self._refresher.cancel()
        for call in list(self._calls.values()):
            call.cancel()

    # ------------------------------------------------------------------------- internals
    async def refresh(self) -> bool:
        """Read every replica's stats from the board; True if any replica is running."""
        try:
            stats = await asyncio.wait_for(self._handle.replica_stats.remote(),
                                           timeout=max(2.0, 4 * self._settings.stats_interval_s))
        except Exception as exc:  # no replica could answer in time: none is running for now
            log.debug("replica stats unavailable: %r", exc)
            stats = {}
        self._replica_stats = stats
        self._stats = combine_stats(list(stats.values()))
        if stats:
            self._last_live = time.monotonic()
        return bool(stats)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.stats_interval_s)
            await self.refresh()

    async def _deltas(self, call: DeploymentResponseGenerator) -> AsyncIterator[list[OutputDelta]]:
        """The call's items (lists of deltas). Until the first one arrives, give up once no replica has been running
        for `unavailable_timeout_s` (Ray would otherwise hold the request until one comes back)."""
        iterator = call.__aiter__()
        first = asyncio.ensure_future(iterator.__anext__())
        try:
            while not first.done():
                await asyncio.wait({first}, timeout=1.0)
                if not first.done() and self._unavailable_for() > self._settings.unavailable_timeout_s:
                    raise ReplicaLostError(f"no engine replica has been running for "
                                           f"{self._settings.unavailable_timeout_s:g} s")
        except BaseException:
            first.cancel()
            raise
        try:
            yield first.result()
        except StopAsyncIteration:
            return
        async for delta in iterator:
            yield delta

    def _unavailable_for(self) -> float:
        return 0.0 if self._replica_stats else time.monotonic() - self._last_live


def _being_cancelled() -> bool:
    """Whether the current task itself is being cancelled (not just a call it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0

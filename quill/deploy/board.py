"""Where the engine replicas publish their stats: a small actor that Ray Serve keeps for the
engine deployment (a deployment-scoped actor: started with it, restarted if it dies, removed with
it). Each replica posts its latest `EngineStats` every `stats_interval_s`; the ingress reads all of
them through any replica (`EngineReplica.replica_stats`). A replica that stops posting (killed
without a goodbye) drops out after `max_age_s`."""
from __future__ import annotations

import time

import ray

from quill.engine.engine import EngineStats


@ray.remote(num_cpus=0)
class StatsBoard:
    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._posts: dict[str, tuple[float, EngineStats]] = {}

    def post(self, replica: str, stats: EngineStats) -> None:
        self._posts[replica] = (time.monotonic(), stats)

    def remove(self, replica: str) -> None:
        self._posts.pop(replica, None)

    def read(self) -> dict[str, EngineStats]:
        """The latest stats of each replica that posted within `max_age_s`."""
        oldest = time.monotonic() - self.max_age_s
        for replica in [r for r, (posted, _) in self._posts.items() if posted < oldest]:
            del self._posts[replica]
        return {replica: stats for replica, (_, stats) in self._posts.items()}

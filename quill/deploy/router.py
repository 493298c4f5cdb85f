"""Ray Serve's side of the routing: a request router (Ray Serve's custom-router API) that lives in
the ingress's handle to the engine deployment and asks `affinity.choose` for each request's
candidates. A request is a `Submission` carrying its prompt's block hashes; anything else (the
ingress's stats and start-up calls) goes to the least loaded replica. Once Ray has sent a request,
its blocks are recorded against the replica that got it.

The table lives in each ingress replica and learns from the requests that replica routes: with
one ingress (the default) it sees every request; with several, a conversation whose turns reach
different ingress replicas may be split between engine replicas.
"""
from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from quill.deploy.affinity import AffinityTable, choose
from quill.deploy.wire import Submission


def _submission(request: PendingRequest | None) -> Submission | None:
    args = request.args if request is not None else ()
    return args[0] if args and isinstance(args[0], Submission) else None


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, policy: str = "prefix", max_imbalance: int = 4, table_entries: int = 100_000,
                         seed: int | None = None) -> None:
        self.policy = policy
        self.max_imbalance = max_imbalance
        self.table = AffinityTable(table_entries)
        self.rng = random.Random(seed)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        submission = _submission(pending_request)
        hashes = submission.prefix_hashes if submission is not None else ()
        holders = self.table.holders(hashes, set(by_id)) if hashes else []
        queue = self.replica_queue_len_cache
        ranks = choose(self.policy if submission is not None else "least-loaded", list(by_id),
                       lambda replica: queue.get(by_id[replica].replica_id), holders, self.max_imbalance, self.rng)
        return [[by_id[replica] for replica in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        submission = _submission(pending_request)
        if submission is not None and submission.prefix_hashes:
            self.table.record(submission.prefix_hashes, replica_id.unique_id)

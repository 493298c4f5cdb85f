"""Ray Serve's side of the routing: a request router (Ray Serve's custom-router API) that lives in
the ingress's handle to the engine deployment and asks `affinity.choose` for each request's
candidates. A request is a `Submission` carrying its prompt's block hashes; anything else (the
ingress's stats and start-up calls) goes to the least loaded replica. Once Ray has sent a request,
its blocks are recorded against the replica that got it. A request counts as in flight on the
replica ranked first from the moment it is ranked (on the one Ray confirms, once it does) until Ray
reports it finished (`affinity.InFlight`), and a replica's load is that count. Ray's probed queue
lengths are not used: a probe can be seconds old, and one replica's stale count sent a whole burst
to the other. With several ingress replicas (a config file's `ingress_replicas`), each balances
the requests it routes.

The table lives in each ingress replica and learns from the requests that replica routes: with
one ingress (the default) it sees every request; with several, a conversation whose turns reach
different ingress replicas may be split between engine replicas.
"""
from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from quill.deploy.affinity import AffinityTable, InFlight, choose
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
        self.in_flight = InFlight()
        self.rng = random.Random(seed)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        submission = _submission(pending_request)
        hashes = submission.prefix_hashes if submission is not None else ()
        holders = self.table.holders(hashes, set(by_id)) if hashes else []
        ranks = choose(self.policy if submission is not None else "least-loaded", list(by_id), self.in_flight.count,
                       holders, self.max_imbalance, self.rng)
        if ranks and pending_request is not None:
            self.in_flight.reserve(pending_request.metadata.internal_request_id, ranks[0][0])
        return [[by_id[replica] for replica in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.in_flight.confirm(pending_request.metadata.internal_request_id, replica_id.unique_id)
        submission = _submission(pending_request)
        if submission is not None and submission.prefix_hashes:
            self.table.record(submission.prefix_hashes, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.in_flight.finished(internal_request_id)

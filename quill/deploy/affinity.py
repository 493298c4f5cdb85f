"""Which engine replica should answer a prompt, so that each replica's prefix cache keeps paying.

A replica's prefix cache only helps requests that reach it. Requests that share a prefix (the
turns of one conversation, a system prompt many requests share) should therefore go where that
prefix was sent before, unless that replica is busy enough that waiting there costs more than
computing the prefix again elsewhere.

Prompts are compared the way the engine's prefix cache compares them: by the chained hashes of
their full KV blocks (`quill.engine.kv_cache.hash_block`, at the engine's block size), so a match
here is a prefix the replica can actually reuse. `AffinityTable` remembers which replicas were
last sent each block; `choose` turns that and the replicas' queue lengths (requests in flight,
counted by `InFlight`) into the order in which Ray Serve tries the replicas.

This module is plain Python: Ray's request router (router.py) calls it.
"""
from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from quill.engine.kv_cache import hash_block

_MAX_HOLDERS = 8  # replicas remembered per block: more than hold any one prefix in practice


def prefix_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int) -> tuple[bytes, ...]:
    """The chained hashes of the prompt's leading full blocks (at most `max_blocks`), as the
    engine's prefix cache computes them."""
    hashes: list[bytes] = []
    parent = None
    for start in range(0, min(len(token_ids) // block_size, max_blocks) * block_size, block_size):
        parent = hash_block(parent, list(token_ids[start:start + block_size]))
        hashes.append(parent)
    return tuple(hashes)


class AffinityTable:
    """Block hash -> the replicas most recently sent a prompt with that block (least recently
    used entries are dropped beyond `max_entries`). Replicas that have gone are filtered out when
    looked up, so nothing needs telling when one dies."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._holders: OrderedDict[bytes, list[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def holders(self, hashes: Sequence[bytes], live: set[str]) -> list[str]:
        """The live replicas that were sent the longest known prefix of these blocks (none: no
        block is known)."""
        for block_hash in reversed(hashes):
            found = [r for r in self._holders.get(block_hash, ()) if r in live]
            if found:
                return found
        return []

    def record(self, hashes: Sequence[bytes], replica: str) -> None:
        """`replica` was sent a prompt with these blocks. Longest prefix first, so that shorter
        prefixes (shared by more prompts) end up the most recently used and are evicted last."""
        for block_hash in reversed(hashes):
            holders = self._holders.pop(block_hash, [])
            if replica in holders:
                holders.remove(replica)
            holders.append(replica)
            self._holders[block_hash] = holders[-_MAX_HOLDERS:]
        while len(self._holders) > self.max_entries:
            self._holders.popitem(last=False)


def choose(policy: str, replicas: Sequence[str], queue_length: Callable[[str], int | None], holders: Sequence[str],
           max_imbalance: int, rng: random.Random) -> list[list[str]]:
    """The replicas in the order Ray Serve should try them, one per rank (it sends the request to
    the first with room).

    prefix: the holders of the request's longest known prefix that have at most `max_imbalance`
    more requests in flight than the least-loaded replica, least loaded first, then the others;
    with no such holder, least-loaded. least-loaded: every replica, least loaded first. random:
    one at random. Equally loaded replicas come in random order, and an unknown queue length
    counts as empty.

    The order is decided here, from queue lengths the router keeps itself (router.py), rather
    than left to Ray Serve's pick within a rank: Ray probes the replicas' queues, and a burst of
    requests that arrive together all read the same probe, so they went to one replica."""
    if not replicas:
        return []
    if policy == "random":
        return [[rng.choice(list(replicas))]]

    def load(replica: str) -> int:
        return queue_length(replica) or 0

    order = sorted(replicas, key=lambda replica: (load(replica), rng.random()))
    if policy == "prefix" and holders:
        least = load(order[0])
        preferred = [r for r in order if r in holders and load(r) - least <= max_imbalance]
        order = preferred + [r for r in order if r not in preferred]
    return [[replica] for replica in order]


class InFlight:
    """Requests a router has sent to each replica and not yet seen finish: the queue length it
    knows without asking (a burst is spread by it, see `choose`).

    A request counts from the moment it is routed (`reserve`, on the replica ranked first), not
    from Ray's word that the replica took it (`confirm`, which may name another replica): Ray routes
    a burst's requests one after the other but confirms them only later, so counting confirmed
    requests alone let a whole burst see the same counts. A reservation that is never confirmed
    (the request was cancelled while Ray was still routing it) stops counting after `hold_s`."""

    def __init__(self, hold_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.hold_s = hold_s
        self._clock = clock
        self._replica_of: dict[str, str] = {}  # request id -> replica
        self._reserved_at: dict[str, float] = {}  # request id -> when, for requests not yet confirmed
        self._counts: dict[str, int] = {}

    def reserve(self, request_id: str, replica: str) -> None:
        self._expire()
        self._move(request_id, replica)
        self._reserved_at.pop(request_id, None)  # re-inserted last: the dict stays in time order
        self._reserved_at[request_id] = self._clock()

    def confirm(self, request_id: str, replica: str) -> None:
        self._move(request_id, replica)
        self._reserved_at.pop(request_id, None)

    def finished(self, request_id: str) -> None:
        """A request ended (or was never sent: then nothing changes)."""
        self._reserved_at.pop(request_id, None)
        self._move(request_id, None)

    def count(self, replica: str) -> int:
        return self._counts.get(replica, 0)

    def _move(self, request_id: str, replica: str | None) -> None:
        held = self._replica_of.pop(request_id, None)
        if held is not None:
            self._counts[held] -= 1
            if not self._counts[held]:
                del self._counts[held]
        if replica is not None:
            self._replica_of[request_id] = replica
            self._counts[replica] = self._counts.get(replica, 0) + 1

    def _expire(self) -> None:
        cutoff = self._clock() - self.hold_s
        while self._reserved_at:
            request_id, at = next(iter(self._reserved_at.items()))  # the oldest
            if at >= cutoff:
                return
            self.finished(request_id)

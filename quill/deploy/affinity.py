"""Which engine replica should answer a prompt, so that each replica's prefix cache keeps paying.

A replica's prefix cache only helps requests that reach it. Requests that share a prefix (the
turns of one conversation, a system prompt many requests share) should therefore go where that
prefix was sent before, unless that replica is busy enough that waiting there costs more than
computing the prefix again elsewhere.

Prompts are compared the way the engine's prefix cache compares them: by the chained hashes of
their full KV blocks (`quill.engine.kv_cache.hash_block`, at the engine's block size), so a match
here is a prefix the replica can actually reuse. `AffinityTable` remembers which replicas were
last sent each block; `choose` turns that and the replicas' queue lengths (requests in flight)
into ranked candidate lists, from which Ray Serve takes the least loaded that has room.

This module is plain Python: Ray's request router (router.py) calls it.
"""
from __future__ import annotations

import random
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
    """Ranked candidate lists for one request (Ray Serve sends it to the least loaded replica with
    room in the first list that has one).

    prefix: the holders of the request's longest known prefix that have at most `max_imbalance`
    more requests in flight than the least-loaded replica, then every replica; with no such
    holder, every replica (least-loaded). least-loaded: every replica. random: one at random.
    Every-replica lists are shuffled, so that ties do not all go to the same replica. An unknown
    queue length counts as empty (Ray Serve probes it before sending)."""
    if not replicas:
        return []
    if policy == "random":
        return [[rng.choice(list(replicas))]]
    everyone = rng.sample(list(replicas), len(replicas))
    if policy == "prefix" and holders:
        def load(replica: str) -> int:
            return queue_length(replica) or 0

        least = min(load(r) for r in replicas)
        preferred = [r for r in holders if load(r) - least <= max_imbalance]
        if preferred:
            return [preferred, everyone]
    return [everyone]

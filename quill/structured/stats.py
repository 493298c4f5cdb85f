"""Constrained decoding's counters, as a snapshot the engine's stats carry (and a server exports).

The mask-time histogram is kept as Prometheus keeps one: cumulative counts per upper bound, the
last bound +inf, with the sum and count beside, so an exporter hands it over as it is."""
from __future__ import annotations

import bisect
from dataclasses import dataclass

# Seconds. A mask usually takes 10-100 us; a new grammar's first one builds its lexer (milliseconds).
MASK_SECONDS_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
                        float("inf"))


@dataclass(frozen=True)
class StructuredStats:
    num_constrained_requests: int = 0  # requests admitted with a constraint (n > 1 counts once)
    grammar_cache_hits: int = 0
    grammar_cache_misses: int = 0  # = grammars compiled
    grammar_compile_seconds: float = 0.0  # total, over the misses
    # Per token mask (one per sampled position, drafts' positions included): see the module docstring.
    mask_seconds_buckets: tuple[tuple[float, int], ...] = tuple((b, 0) for b in MASK_SECONDS_BUCKETS)
    mask_seconds_sum: float = 0.0
    mask_seconds_count: int = 0
    # Time the engine thread waited for masks after the forward pass, vetted greedy picks and masked
    # the rejected ones (see quill/structured/decoding.py): the constraint cost not hidden.
    mask_wait_seconds: float = 0.0
    vetted_picks: int = 0  # greedy picks made unmasked and vetted against the grammar
    vetted_picks_masked: int = 0  # ... that the grammar's mask then had to decide


class Histogram:
    def __init__(self, bounds: tuple[float, ...] = MASK_SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        total, buckets = 0, []
        for bound, count in zip(self.bounds, self.counts):
            total += count
            buckets.append((bound, total))
        return tuple(buckets)

"""Engine stats across replicas: the ingress's view of the whole deployment is the sum of its
replicas' snapshots (`combine_stats`), with the ratios worked out again from the sums by the rules
that define them for one engine (`KVCacheStats`, `SpeculativeStats`), never averaged.

The sum is what admission (sequences waiting) and billing (engine seconds over tokens: with
replicas, `--hourly-cost` is the price of one replica's share of the machine) read; `/metrics`
shows each replica's own snapshot under its `replica` label."""
from __future__ import annotations

from collections.abc import Sequence

from quill.engine.engine import EngineStats
from quill.engine.kv_cache import KVCacheStats
from quill.speculative import SpeculativeStats


def combine_stats(snapshots: Sequence[EngineStats]) -> EngineStats:
    def total(name: str):
        return sum(getattr(s, name) for s in snapshots)

    kv = KVCacheStats(num_blocks=total("num_kv_blocks"), num_free_blocks=total("num_free_kv_blocks"),
                      prefix_cache_queries=total("prefix_cache_queries"), prefix_cache_hits=total("prefix_cache_hits"))
    spec = SpeculativeStats(num_drafts=total("spec_num_drafts"), num_draft_tokens=total("spec_num_draft_tokens"),
                            num_accepted_tokens=total("spec_num_accepted_tokens"))
    return EngineStats(
        num_running=total("num_running"), num_waiting=total("num_waiting"),
        num_kv_blocks=kv.num_blocks, num_free_kv_blocks=kv.num_free_blocks,
        kv_cache_usage=kv.usage if kv.num_blocks else 0.0,
        prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
        prefix_cache_hit_rate=kv.hit_rate, num_prompt_tokens=total("num_prompt_tokens"),
        num_generated_tokens=total("num_generated_tokens"), num_preemptions=total("num_preemptions"),
        prefill_seconds=total("prefill_seconds"), decode_seconds=total("decode_seconds"),
        spec_num_drafts=spec.num_drafts, spec_num_draft_tokens=spec.num_draft_tokens,
        spec_num_accepted_tokens=spec.num_accepted_tokens, spec_acceptance_rate=spec.acceptance_rate,
        spec_mean_accepted_length=spec.mean_accepted_length,
    )

"""A response's `usage`: OpenAI's token counts plus Quill's `quill` object, the request's timeline
(`timings`, from the engine's `RequestMetrics`) and its cost. `run_usage` is a live run's;
`hit_usage` a response cache hit's (the stored answer's tokens, no engine timings, no cost)."""
from __future__ import annotations

from quill.server.runs import Run


def run_usage(run: Run, cost: dict) -> dict:
    """Tokens, timings and cost of a finished (or aborted) run."""
    prompt_tokens, completion_tokens = run.prompt_tokens, run.completion_tokens
    quill = timings([c.metrics for c in run.choices if c.metrics is not None], completion_tokens)
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": run.cached_tokens},
        "quill": {**quill, "cache_hit": False, "cost": cost},
    }


def hit_usage(prompt_tokens: int, completion_tokens: int, elapsed: float, cost: dict) -> dict:
    """Usage of a replayed response: the original token counts (what the answer is worth), every
    prompt token counted as cached, no engine timings, `quill.cache_hit`, and its `cost`
    (`CostModel.charge_hit`: nothing self-hosted, and what computing the answer had cost)."""
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": prompt_tokens},
        "quill": {**timings([], 0), "e2e_latency": round(elapsed, 6), "cache_hit": True, "cost": cost},
    }


def timings(all_metrics: list, completion_tokens: int) -> dict:
    """Queue time, TTFT, generation time (first to last token), decode tokens/second, mean and
    longest inter-token latency, over all choices: for one choice these are exactly its
    `RequestMetrics` values."""
    def first(values):
        values = [v for v in values if v is not None]
        return min(values) if values else None

    def last(values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    first_token = first(m.first_token_time for m in all_metrics)
    last_token = last(m.last_token_time for m in all_metrics)
    generation_time = None if first_token is None or last_token is None else last_token - first_token
    decoded = completion_tokens - sum(1 for m in all_metrics if m.first_token_time is not None)
    rate = decoded / generation_time if generation_time and decoded > 0 else None
    # Per choice, not 1 / rate: n choices decode side by side, each at its own pace.
    gaps = [1 / r for r in (m.decode_tokens_per_second for m in all_metrics) if r]
    values = {
        "queue_time": first(m.queue_time for m in all_metrics),
        "time_to_first_token": first(m.ttft for m in all_metrics),
        "generation_time": generation_time,
        "tokens_per_second": rate,
        "inter_token_latency_mean": sum(gaps) / len(gaps) if gaps else None,
        "inter_token_latency_max": last(m.max_inter_token_latency for m in all_metrics),
        "e2e_latency": last(m.e2e_latency for m in all_metrics),
    }
    return {k: None if v is None else round(v, 6) for k, v in values.items()}

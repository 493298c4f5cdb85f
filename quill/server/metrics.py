"""Prometheus metrics of one server, named like vLLM's with a `quill:` prefix.

Each app has its own `CollectorRegistry`, so several servers in one process (tests) never clash.
Per-request numbers (latencies, tokens, outcomes) are recorded through the `observe_*` methods as
requests are admitted, produce tokens and end (`answer.LiveAnswer` and `billing.Billing` call them);
engine-wide numbers (running/waiting requests, KV usage, prefix cache) are read from the
engine's latest stats snapshot at scrape time, so the engine thread is never touched; so are the
response cache's numbers, from its own counters. Cost (`quill/cost.py`) shows as cumulative dollars
per price and as the live price per 1K tokens. A cache hit is not engine work: it moves no token or
cost counter, only the cache's own (hits, and the dollars they saved).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client import disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from quill.cost import SELF_HOSTED, CostModel
from quill.engine.engine import EngineStats

# No `*_created` series next to every counter and histogram (vLLM drops them too). This is a
# process-wide switch in prometheus-client; nothing else in Quill wants those series.
disable_created_metrics()

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                          0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def _gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, doc: str, labels: dict[str, str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class _EngineCollector:
    """Engine-wide gauges and counters, from `AsyncEngine.stats()` at scrape time. An engine of
    several replicas (quill/deploy) has `replica_stats()`: each replica's series then carry a
    `replica` label, and the measured price is the whole deployment's."""

    def __init__(self, engine, model_name: str, costs: CostModel) -> None:
        self.engine = engine
        self.model_name = model_name
        self.costs = costs

    def collect(self):
        families: dict[str, GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily] = {}
        for label, stats in self._snapshots():
            for family in self._families(label, stats):
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        yield from families.values()
        yield self._prices(self.engine.stats())

    def _snapshots(self) -> list[tuple[dict[str, str], EngineStats]]:
        label = {"model_name": self.model_name}
        per_replica = getattr(self.engine, "replica_stats", None)
        if per_replica is None:
            return [(label, self.engine.stats())]
        return [({**label, "replica": replica}, stats) for replica, stats in sorted(per_replica().items())]

    def _families(self, label: dict[str, str], stats):
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return _gauge(name, doc, label, value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return _counter(name, doc, label, value)

        yield gauge("quill:num_requests_running", "Sequences in the engine's running batch.", stats.num_running)
        yield gauge("quill:num_requests_waiting", "Sequences waiting to be scheduled.", stats.num_waiting)
        yield gauge("quill:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", stats.kv_cache_usage)
        yield gauge("quill:num_kv_blocks", "KV-cache blocks in the engine.", stats.num_kv_blocks)
        limits = self.engine.limits()
        yield gauge("quill:kv_cache_memory_bytes", "Memory of the KV cache (within --kv-cache-memory).",
                    limits.kv_cache_bytes)
        yield gauge("quill:kv_cache_capacity_tokens", "Tokens the KV cache holds.", limits.kv_capacity_tokens)
        yield gauge("quill:max_model_len", "The usable context window, in tokens (at most the KV cache).",
                    limits.max_model_len)
        yield counter("quill:prefix_cache_queries", "Prefix-cache lookups.", stats.prefix_cache_queries)
        yield counter("quill:prefix_cache_hits", "Prefix-cache lookups that hit.", stats.prefix_cache_hits)
        yield counter("quill:num_preemptions", "Sequences preempted to free KV blocks.", stats.num_preemptions)
        yield counter("quill:engine_prompt_tokens", "Prompt tokens the model computed (prefix-cache hits excluded).",
                      stats.num_prompt_tokens)
        yield counter("quill:spec_decode_num_drafts", "Speculative verification rounds.", stats.spec_num_drafts)
        yield counter("quill:spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
                      stats.spec_num_draft_tokens)
        yield counter("quill:spec_decode_num_accepted_tokens", "Draft tokens accepted.", stats.spec_num_accepted_tokens)
        yield gauge("quill:spec_decode_draft_acceptance_rate", "Accepted / proposed draft tokens.",
                    stats.spec_acceptance_rate)
        yield gauge("quill:spec_decode_mean_accepted_length",
                    "Tokens committed per verification round (accepted drafts + 1).", stats.spec_mean_accepted_length)
        yield counter("quill:engine_prefill_seconds", "Engine step time attributed to prompt tokens.",
                      stats.prefill_seconds)
        yield counter("quill:engine_decode_seconds", "Engine step time attributed to output tokens.",
                      stats.decode_seconds)
        yield from self._structured(stats.structured, label)

    @staticmethod
    def _structured(stats, label: dict[str, str]):
        """Constrained decoding (`quill.structured.stats.StructuredStats`)."""
        yield _counter("quill:structured_requests", "Requests with a structured-output constraint (tools included).",
                       label, stats.num_constrained_requests)
        yield _counter("quill:structured_grammar_compiles", "Grammars compiled (schema-cache misses).", label,
                       stats.grammar_cache_misses)
        yield _counter("quill:structured_grammar_cache_hits", "Constraints served by an already compiled grammar.",
                       label, stats.grammar_cache_hits)
        yield _counter("quill:structured_grammar_compile_seconds", "Time spent compiling grammars.", label,
                       stats.grammar_compile_seconds)
        yield _counter("quill:structured_mask_wait_seconds",
                       "Time the engine waited for token masks after the forward pass, or vetted greedy picks "
                       "(constraint cost not hidden).", label, stats.mask_wait_seconds)
        yield _counter("quill:structured_vetted_picks", "Greedy constrained picks made unmasked and vetted.", label,
                       stats.vetted_picks)
        yield _counter("quill:structured_vetted_picks_masked",
                       "Vetted greedy picks the grammar's mask then decided (picked again under it).", label,
                       stats.vetted_picks_masked)
        masks = HistogramMetricFamily("quill:structured_mask_seconds", "Time to compute one token mask.",
                                      labels=list(label))
        buckets = [("+Inf" if bound == float("inf") else repr(bound), count) for bound, count in stats.mask_seconds_buckets]
        masks.add_metric(list(label.values()), buckets, stats.mask_seconds_sum)
        yield masks

    def _prices(self, stats) -> GaugeMetricFamily:
        family = GaugeMetricFamily("quill:price_per_1k_tokens_dollars",
                                   "Dollars per 1K tokens: self-hosted (measured) and reference APIs.",
                                   labels=["model_name", "price", "token_type"])
        prices = dict(self.costs.reference_prices)
        measured = self.costs.self_hosted_price(stats)
        if measured is not None:
            prices[SELF_HOSTED] = measured
        for name, price in prices.items():
            family.add_metric([self.model_name, name, "input"], price.input_per_1k)
            family.add_metric([self.model_name, name, "output"], price.output_per_1k)
        return family


class _ResponseCacheCollector:
    """The response cache's counters and sizes, from `ResponseCache.stats()` at scrape time."""

    def __init__(self, cache, model_name: str) -> None:
        self.cache = cache
        self.model_name = model_name

    def collect(self):
        stats = self.cache.stats()
        label = {"model_name": self.model_name}
        yield _counter("quill:response_cache_hits", "Requests answered from the response cache.", label, stats.hits)
        yield _counter("quill:response_cache_misses", "Cacheable requests the engine had to answer.", label,
                       stats.misses)
        yield _counter("quill:response_cache_evictions", "Answers evicted to stay within the cache's bounds.", label,
                       stats.evictions)
        for store, entries, size in (("memory", stats.memory_entries, stats.memory_bytes),
                                     ("sqlite", stats.disk_entries, stats.disk_bytes)):
            yield _gauge("quill:response_cache_entries", "Answers in the response cache.",
                         {**label, "store": store}, entries)
            yield _gauge("quill:response_cache_bytes", "Bytes of answers (JSON) in the response cache.",
                         {**label, "store": store}, size)


class ServerMetrics:
    def __init__(self, engine, model_name: str, costs: CostModel, response_cache=None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        registry = self.registry
        self.http_requests = Counter("quill:http_requests", "HTTP requests by endpoint and status code.",
                                     ["endpoint", "status"], registry=registry)
        self.request_success = Counter("quill:request_success", "Finished sequences by finish reason.",
                                       ["model_name", "finished_reason"], registry=registry)
        self.prompt_tokens = Counter("quill:prompt_tokens", "Prompt tokens of admitted requests.",
                                     ["model_name"], registry=registry)
        self.generation_tokens = Counter("quill:generation_tokens", "Generated tokens.",
                                         ["model_name"], registry=registry)
        self.time_to_first_token = Histogram("quill:time_to_first_token_seconds", "Time to first token.",
                                             ["model_name"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.e2e_latency = Histogram("quill:e2e_request_latency_seconds", "End-to-end latency of a sequence.",
                                     ["model_name"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram("quill:request_queue_time_seconds", "Time a sequence waited to be scheduled.",
                                    ["model_name"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("quill:inter_token_latency_seconds", "Time between output tokens.",
                                             ["model_name"], buckets=_TOKEN_LATENCY_BUCKETS, registry=registry)
        self.request_prompt_tokens = Histogram("quill:request_prompt_tokens", "Prompt length of a request.",
                                               ["model_name"], buckets=_TOKEN_COUNT_BUCKETS, registry=registry)
        self.request_generation_tokens = Histogram("quill:request_generation_tokens", "Tokens generated per sequence.",
                                                   ["model_name"], buckets=_TOKEN_COUNT_BUCKETS, registry=registry)
        self.requests_cut = Counter("quill:requests_cut_short",
                                    "Requests the server ended early, by reason: a stream whose client stopped "
                                    "reading (idle_timeout, buffer_full), the request deadline, shutdown.",
                                    ["model_name", "reason"], registry=registry)
        self.cost = Counter("quill:request_cost_dollars",
                            "Cost of the tokens served: self-hosted at the measured price, and at reference API prices.",
                            ["model_name", "price"], registry=registry)
        registry.register(_EngineCollector(engine, model_name, costs))
        # The server process's resident memory and CPU time (process_resident_memory_bytes, ...).
        ProcessCollector(registry=registry)
        if response_cache is not None:
            self.cache_saved = Counter("quill:response_cache_saved_dollars",
                                       "Self-hosted cost of computing the answers served from the response cache.",
                                       ["model_name"], registry=registry)
            registry.register(_ResponseCacheCollector(response_cache, model_name))

    def observe_prompts(self, prompts: list[list[int]]) -> None:
        """An admitted request's prompts."""
        for ids in prompts:
            self.prompt_tokens.labels(self.model_name).inc(len(ids))
            self.request_prompt_tokens.labels(self.model_name).observe(len(ids))

    def observe_output(self, num_tokens: int, gap: float | None) -> None:
        """One output of a sequence: its new tokens, and the time since its previous output."""
        self.generation_tokens.labels(self.model_name).inc(num_tokens)
        if gap is not None:
            self.inter_token_latency.labels(self.model_name).observe(gap)

    def observe_sequence(self, metrics, finish_reason: str | None, num_tokens: int) -> None:
        """Record one finished (or aborted) sequence from its engine-side `RequestMetrics`."""
        name = self.model_name
        self.request_success.labels(name, finish_reason or "abort").inc()
        self.request_generation_tokens.labels(name).observe(num_tokens)
        if metrics is None:
            return
        for histogram, value in ((self.time_to_first_token, metrics.ttft), (self.queue_time, metrics.queue_time),
                                 (self.e2e_latency, metrics.e2e_latency)):
            if value is not None:
                histogram.labels(name).observe(max(0.0, value))

    def observe_cut(self, reason: str) -> None:
        """A request the server ended early (see `requests_cut`)."""
        self.requests_cut.labels(self.model_name, reason).inc()

    def observe_cost(self, cost: dict) -> None:
        """Add one request's cost (`CostModel.charge`) to the cumulative counters."""
        name = self.model_name
        self.cost.labels(name, SELF_HOSTED).inc(cost["self_hosted_usd"] or 0.0)
        for price, dollars in cost["reference_usd"].items():
            self.cost.labels(name, price).inc(dollars)

    def observe_cache_hit(self, cost: dict) -> None:
        """Add what one cache hit saved (`CostModel.charge_hit`); the cost counters stay for engine work."""
        self.cache_saved.labels(self.model_name).inc(cost["saved_usd"] or 0.0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

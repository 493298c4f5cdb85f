"""Pricing the server's work: each request charged by `quill.cost.CostModel` at the price the
engine's measured step times give (`EngineStats`), the charge added to `/metrics`, and the totals
for `GET /v1/usage`. A response cache hit is not engine work: it is free, and counted apart with
what it saved."""
from __future__ import annotations

from collections.abc import Callable

from quill.cost import CostModel
from quill.engine.engine import EngineStats
from quill.server.metrics import ServerMetrics


class Billing:
    def __init__(self, costs: CostModel, stats: Callable[[], EngineStats], metrics: ServerMetrics,
                 model_name: str) -> None:
        self.costs = costs
        self.stats = stats
        self.metrics = metrics
        self.model_name = model_name

    def charge(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
        """A run's cost (aborted runs too: their tokens were computed)."""
        cost = self.costs.charge(self.model_name, self.stats(), prompt_tokens, cached_tokens, completion_tokens)
        self.metrics.observe_cost(cost)
        return cost

    def charge_hit(self, prompt_tokens: int, completion_tokens: int, stored_cost_usd: float | None) -> dict:
        """A cache hit's cost: nothing self-hosted, and what computing the answer had cost."""
        cost = self.costs.charge_hit(self.model_name, self.stats(), prompt_tokens, completion_tokens,
                                     stored_cost_usd)
        self.metrics.observe_cache_hit(cost)
        return cost

    def report(self) -> dict:
        """Traffic and cost since the server started (`GET /v1/usage`)."""
        return self.costs.report({self.model_name: self.costs.self_hosted_price(self.stats())})

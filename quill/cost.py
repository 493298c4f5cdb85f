"""Token pricing: what a request costs on this machine, and what it would cost on a hosted API.

Two kinds of price, both in US dollars per 1K input (prompt) and per 1K output (completion) tokens:

- **self-hosted**, measured live: the machine's hourly price (`--hourly-cost`) spread over the
  tokens the engine actually processed in the time it was busy (see `measured_price`);
- **reference** API prices (GPT-4o, Claude 3.5 Sonnet by default), for comparison; a JSON or TOML
  file (`--price-file`) replaces the built-in table.

`CostModel` prices each request as it ends and keeps per-model totals (`GET /v1/usage`,
`quill cost`). An answer served from the response cache (`quill.cache`) is not engine work: it
costs nothing self-hosted and is counted apart, as a hit with the cost it saved (`charge_hit`).
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from quill.errors import QuillError

# About what one on-demand 2-vCPU cloud VM costs (AWS m7i.large, 2 vCPU / 8 GiB: $0.1008/hour in
# us-east-1), the class of machine Quill's numbers are measured on.
DEFAULT_HOURLY_COST = 0.10
SELF_HOSTED = "self-hosted"


class PriceFileError(QuillError):
    """A price file that cannot be read or has the wrong shape."""


@dataclass(frozen=True)
class Price:
    """Dollars per 1K input and per 1K output tokens."""

    input_per_1k: float
    output_per_1k: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_1k + output_tokens * self.output_per_1k) / 1000

    def as_dict(self) -> dict[str, float]:
        return {"input_per_1k": self.input_per_1k, "output_per_1k": self.output_per_1k}


REFERENCE_PRICES: dict[str, Price] = {
    "gpt-4o": Price(input_per_1k=0.0025, output_per_1k=0.01),
    "claude-3.5-sonnet": Price(input_per_1k=0.003, output_per_1k=0.015),
}


def load_price_file(path: str | Path) -> dict[str, Price]:
    """Reference prices from a JSON or TOML file (by its suffix; TOML unless it ends in .json),
    one entry per API, which replace the built-in table:

        [gpt-4o]                          {"gpt-4o": {"input_per_1k": 0.0025,
        input_per_1k = 0.0025                         "output_per_1k": 0.01}}
        output_per_1k = 0.01
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        table = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise PriceFileError(f"cannot read price file {path}: {exc}") from None
    if not isinstance(table, dict) or not table:
        raise PriceFileError(f"price file {path}: expected a table of APIs, e.g. gpt-4o = {{input_per_1k = ...}}")
    prices = {}
    for name, entry in table.items():
        try:
            price = Price(float(entry["input_per_1k"]), float(entry["output_per_1k"]))
        except (TypeError, KeyError, ValueError):
            raise PriceFileError(f"price file {path}: {name!r} needs numbers input_per_1k and output_per_1k") from None
        if price.input_per_1k < 0 or price.output_per_1k < 0:
            raise PriceFileError(f"price file {path}: {name!r} has a negative price")
        prices[name] = price
    return prices


def measured_price(hourly_cost: float, prefill_seconds: float, prompt_tokens: int, decode_seconds: float,
                   generated_tokens: int) -> Price | None:
    """The self-hosted price per 1K tokens from the engine's own measurements, or None until it
    has processed both prompt and output tokens.

    Attribution: the engine times every step and splits the step's time between its prompt rows
    (prefill) and its output rows (decode) in proportion to their numbers: each row of the batch
    passes through every weight, which is most of a step's cost. Prefill seconds over prompt
    tokens computed (prefix-cache hits cost nothing) give the input price; decode seconds over
    generated tokens give the output price (a request's first token comes out of its prefill step,
    so it is billed at the output price while its time counts as prefill). Thus billed tokens add
    up exactly to the machine's price for the time it was busy; idle time is not charged, so the
    price is what the measured throughput costs while the machine works.
    """
    if prompt_tokens <= 0 or generated_tokens <= 0:
        return None
    dollars_per_second = hourly_cost / 3600
    return Price(input_per_1k=1000 * dollars_per_second * prefill_seconds / prompt_tokens,
                 output_per_1k=1000 * dollars_per_second * decode_seconds / generated_tokens)


@dataclass
class UsageTotals:
    """Tokens and dollars of one model's engine work, and the response cache hits that spared it."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    self_hosted_usd: float = 0.0
    reference_usd: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0
    cache_saved_usd: float = 0.0


class CostModel:
    """Prices requests (self-hosted at the engine's measured price, and at each reference price)
    and keeps per-model totals."""

    def __init__(self, hourly_cost: float = DEFAULT_HOURLY_COST,
                 reference_prices: dict[str, Price] | None = None) -> None:
        if hourly_cost < 0:
            raise ValueError(f"the hourly cost must be >= 0, got {hourly_cost}")
        self.hourly_cost = hourly_cost
        self.reference_prices = dict(REFERENCE_PRICES if reference_prices is None else reference_prices)
        self.totals: dict[str, UsageTotals] = {}

    def self_hosted_price(self, stats) -> Price | None:
        """The live price from an `EngineStats` snapshot."""
        return measured_price(self.hourly_cost, stats.prefill_seconds, stats.num_prompt_tokens,
                              stats.decode_seconds, stats.num_generated_tokens)

    def charge(self, model: str, stats, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
        """Price one request, add it to the model's totals, and return its cost (`usage.quill.cost`).
        Self-hosted, cached prompt tokens are free (no compute); reference APIs bill every prompt token
        at their input price."""
        price = self.self_hosted_price(stats)
        self_hosted = None if price is None else price.cost(prompt_tokens - cached_tokens, completion_tokens)
        reference = self._reference_costs(prompt_tokens, completion_tokens)
        totals = self.totals.setdefault(model, UsageTotals())
        totals.requests += 1
        totals.prompt_tokens += prompt_tokens
        totals.cached_prompt_tokens += cached_tokens
        totals.completion_tokens += completion_tokens
        totals.self_hosted_usd += self_hosted or 0.0
        for name, dollars in reference.items():
            totals.reference_usd[name] = totals.reference_usd.get(name, 0.0) + dollars
        return _cost(self_hosted, price, reference, saved=0.0)

    def charge_hit(self, model: str, stats, prompt_tokens: int, completion_tokens: int,
                   saved_usd: float | None) -> dict:
        """Price an answer served from the response cache and count it as a hit of the model.

        A hit runs no engine work, so it costs nothing self-hosted, and `saved_usd` is what computing
        the answer cost when it was stored (the original request's `self_hosted_usd`, kept with the
        entry: the price actually paid, not today's). Hits stay out of the engine-work totals
        (requests, tokens, dollars at every price), so those keep comparing the same tokens with the
        reference APIs; they add up in `cache_hits` and `cache_saved_usd` instead. The returned
        `reference_usd` is still what this response's tokens would cost on each API."""
        totals = self.totals.setdefault(model, UsageTotals())
        totals.cache_hits += 1
        totals.cache_saved_usd += saved_usd or 0.0
        return _cost(0.0, self.self_hosted_price(stats), self._reference_costs(prompt_tokens, completion_tokens),
                     saved=saved_usd)

    def _reference_costs(self, prompt_tokens: int, completion_tokens: int) -> dict[str, float]:
        """Reference APIs bill every prompt token at their input price."""
        return {name: ref.cost(prompt_tokens, completion_tokens) for name, ref in self.reference_prices.items()}

    def report(self, live_prices: dict[str, Price | None]) -> dict:
        """Totals per model (the body of `GET /v1/usage`), with each model's live self-hosted price."""
        data = []
        for model, totals in self.totals.items():
            price = live_prices.get(model)
            data.append({
                "model": model, "requests": totals.requests, "prompt_tokens": totals.prompt_tokens,
                "cached_prompt_tokens": totals.cached_prompt_tokens, "completion_tokens": totals.completion_tokens,
                "self_hosted_usd": totals.self_hosted_usd,
                "self_hosted_price": None if price is None else price.as_dict(),
                "reference": {name: {"usd": totals.reference_usd.get(name, 0.0), **ref.as_dict()}
                              for name, ref in self.reference_prices.items()},
                "cache_hits": totals.cache_hits, "cache_saved_usd": totals.cache_saved_usd,
            })
        return {"object": "usage", "hourly_cost_usd": self.hourly_cost, "data": data}


def _cost(self_hosted: float | None, price: Price | None, reference: dict[str, float], saved: float | None) -> dict:
    """A request's `usage.quill.cost`."""
    return {
        "self_hosted_usd": self_hosted,
        "self_hosted_price": None if price is None else price.as_dict(),
        "reference_usd": reference,
        "saved_usd": saved,
    }


def usage_table(report: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """`GET /v1/usage` as a header and rows: one row per model, a column per price."""
    references = sorted({name for entry in report["data"] for name in entry["reference"]})
    header = ("model", "requests", "prompt tokens", "output tokens", SELF_HOSTED, *references)
    rows = [(entry["model"], str(entry["requests"]), str(entry["prompt_tokens"]), str(entry["completion_tokens"]),
             dollars(entry["self_hosted_usd"]),
             *(dollars(entry["reference"][name]["usd"]) if name in entry["reference"] else "-" for name in references))
            for entry in report["data"]]
    return header, rows


def comparison_lines(report: dict) -> list[str]:
    """One sentence per model and reference API: "this traffic would have cost $X on gpt-4o", and
    one per model whose response cache answered requests: what those hits saved."""
    lines = []
    for entry in report["data"]:
        own = entry["self_hosted_usd"]
        for name, reference in entry["reference"].items():
            ratio = f" ({reference['usd'] / own:,.1f}x self-hosted)" if own > 0 else ""
            lines.append(f"{entry['model']}: this traffic cost {dollars(own)} self-hosted at "
                         f"${report['hourly_cost_usd']:g}/hour and would have cost {dollars(reference['usd'])} "
                         f"on {name}{ratio}.")
        hits = entry.get("cache_hits", 0)  # absent from servers without a response cache
        if hits:
            lines.append(f"{entry['model']}: the response cache answered {hits} more request{'s' * (hits != 1)}, "
                         f"saving {dollars(entry['cache_saved_usd'])} self-hosted.")
    return lines


def dollars(amount: float | None) -> str:
    """Dollars, with three significant digits below $1: one request costs millionths."""
    if amount is None:
        return "n/a"
    if amount >= 1 or amount == 0:
        return f"${amount:,.2f}"
    decimals = 2 - math.floor(math.log10(amount))
    return f"${amount:.{decimals}f}"

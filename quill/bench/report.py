"""Per-level numbers from the client's measurements, the printed table and the JSON report.

A report (`report.json`) is {"runs": [run, ...]}: one run per server measured (the first is the
main one, the rest come from --compare), each with its settings and a list of levels.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from quill.bench.client import RequestResult
from quill.cost import SELF_HOSTED, Price, dollars
from quill.errors import QuillError
from quill.table import format_table


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (`fraction` in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _percentiles(values: list[float], *points: int) -> dict[str, float | None]:
    return {f"p{point}": percentile(values, point / 100) for point in points}


def summarize_level(results: list[RequestResult], duration: float, *, concurrency: int | None, rate: float | None,
                    slo_ttft: float, hourly_cost: float, reference_prices: dict[str, Price]) -> dict:
    """One level's numbers. Goodput counts the requests that finished within the TTFT SLO, per
    second; cost per 1M output tokens is the machine's hourly price over the level's output rate.
    The traffic's cost on the reference APIs needs the prompt tokens, so servers that report usage."""
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_counts = [r.prompt_tokens for r in ok]
    prompt_tokens = sum(prompt_counts) if ok and None not in prompt_counts else None
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    within_slo = sum(1 for r in ok if r.ttft is not None and r.ttft <= slo_ttft)

    def per_second(amount: float) -> float:
        return amount / duration if duration > 0 else 0.0

    machine_cost = hourly_cost * duration / 3600
    traffic_cost = {SELF_HOSTED: machine_cost}
    for name, price in reference_prices.items():
        traffic_cost[name] = None if prompt_tokens is None else price.cost(prompt_tokens, output_tokens)
    return {
        "concurrency": concurrency, "rate": rate, "requests": len(results), "completed": len(ok),
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": duration, "requests_per_s": per_second(len(ok)),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "output_tokens_per_s": per_second(output_tokens),
        "ttft_s": _percentiles(ttfts, 50, 90, 99),
        "itl_s": _percentiles([gap for r in ok for gap in r.itls], 50, 99),
        "e2e_s": _percentiles([r.e2e for r in ok if r.e2e is not None], 50, 99),
        "goodput_requests_per_s": per_second(within_slo),
        "slo_attainment": within_slo / len(results) if results else None,
        "cost_per_1m_output_tokens_usd": machine_cost / output_tokens * 1e6 if output_tokens else None,
        "traffic_cost_usd": traffic_cost,
    }


def level_name(level: dict) -> str:
    return f"{level['rate']:g}/s" if level["rate"] is not None else str(level["concurrency"])


def format_report(runs: list[dict]) -> str:
    """The table printed after a run: a row per server and level."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rate_mode = any(level["rate"] is not None for run in runs for level in run["levels"])
    header = ("server", "rate" if rate_mode else "conc", "ok/fail", "req/s", "out tok/s", "TTFT p50 ms", "p90",
              "p99", "ITL p50 ms", "p99", "e2e p50 s", "p99", "goodput req/s", "$/1M out")
    rows = []
    for run in runs:
        for level in run["levels"]:
            ttft, itl, e2e = level["ttft_s"], level["itl_s"], level["e2e_s"]
            cost = level["cost_per_1m_output_tokens_usd"]
            rows.append((run["label"], level_name(level), f"{level['completed']}/{level['failed']}",
                         f"{level['requests_per_s']:.2f}", f"{level['output_tokens_per_s']:.1f}",
                         ms(ttft["p50"]), ms(ttft["p90"]), ms(ttft["p99"]), ms(itl["p50"]), ms(itl["p99"]),
                         seconds(e2e["p50"]), seconds(e2e["p99"]), f"{level['goodput_requests_per_s']:.2f}",
                         "-" if cost is None else dollars(cost)))
    lines = [format_table(header, rows, numeric=True)]
    first = runs[0]
    lines.append(f"goodput: requests with TTFT <= {first['slo']['ttft_s'] * 1000:.0f} ms per second; "
                 f"$/1M out at ${first['hourly_cost_usd']:g}/hour")
    for run in runs:
        for level in run["levels"]:
            if level["errors"]:
                lines.append(f"{run['label']} at {level_name(level)}: {level['failed']} failed, e.g. {level['errors'][0]}")
    return "\n".join(lines)


def cost_lines(run: dict) -> list[str]:
    """What the run's traffic cost self-hosted vs on the reference APIs, over all its levels."""
    levels = run["levels"]
    own = sum(level["traffic_cost_usd"][SELF_HOSTED] for level in levels)
    output_tokens = sum(level["output_tokens"] for level in levels)
    references = [name for name in levels[0]["traffic_cost_usd"] if name != SELF_HOSTED] if levels else []
    lines = []
    for name in references:
        amounts = [level["traffic_cost_usd"][name] for level in levels]
        if None not in amounts:  # the server reported prompt tokens at every level
            lines.append(f"{run['label']}: this traffic ({output_tokens} output tokens) cost {dollars(own)} "
                         f"self-hosted and would have cost {dollars(sum(amounts))} on {name}.")
    return lines


def write_report(runs: list[dict], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "report.json"
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return path


def load_runs(path: str | Path) -> list[dict]:
    """The runs of a report written by `write_report` (a file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QuillError(f"cannot read a `quill bench` report from {path}: {exc}") from None
    return runs

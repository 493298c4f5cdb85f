"""`quill bench`: measure one or more servers with the same sweep, then print, save and plot."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from quill.bench import servers
from quill.bench.client import Target, fetch_model, run_level, send_request
from quill.bench.report import cost_lines, format_report, level_name, load_runs, summarize_level, write_report
from quill.bench.workload import RequestSpec, load_jsonl, poisson_arrivals, synthetic_workload, take
from quill.cost import REFERENCE_PRICES, Price, load_price_file
from quill.errors import InvalidRequestError
from quill.hardware import host_description

# Not measured: the first request of a run pays for connection set-up and lazy initialisation.
_WARM_UP = RequestSpec(max_tokens=4, messages=[{"role": "user", "content": "Say hello."}], prompt="Say hello.")


@dataclass
class Sweep:
    """The load applied to every server of a run, and how its results are judged."""

    levels: list  # concurrency levels (ints) or request rates (floats)
    by_rate: bool
    requests_per_level: list[int]
    workload: list[RequestSpec]
    workload_name: str
    args: argparse.Namespace
    reference_prices: dict[str, Price]

    @property
    def most_in_flight(self) -> int:
        """The most requests a server has at once: the top concurrency, or a rate level's count."""
        return max(self.requests_per_level) if self.by_rate else max(self.levels)


def run_bench(args: argparse.Namespace) -> int:
    sweep = _sweep(args)
    reports = _compared_reports(args, sweep)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(_start_quill(args)) if args.start else args.url.rstrip("/")
        runs = [_measure(url, args.label or ("quill" if args.start else None), sweep)]
    runs += _compared_servers(args, sweep) + reports
    print(format_report(runs))
    for run in runs:
        for line in cost_lines(run):
            print(line)
    if args.output:
        from quill.bench.plots import plot_report  # matplotlib is slow to import: only when plotting

        paths = [write_report(runs, args.output), *plot_report(runs, args.output)]
        print("wrote " + ", ".join(str(path) for path in paths))
    return 0 if all(level["failed"] == 0 for run in runs for level in run["levels"]) else 1


def _sweep(args: argparse.Namespace) -> Sweep:
    by_rate = args.rate is not None
    levels = args.rate if by_rate else args.concurrency
    if args.num_requests is not None and args.num_requests < 1:
        raise InvalidRequestError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.max_tokens < 1:
        raise InvalidRequestError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.hourly_cost < 0:
        raise InvalidRequestError(f"--hourly-cost must be >= 0, got {args.hourly_cost}")
    counts = [args.num_requests or (32 if by_rate else max(16, 4 * level)) for level in levels]
    if args.workload:
        workload, name = load_jsonl(args.workload, args.max_tokens), str(args.workload)
        if args.api == "completions" and any(spec.prompt is None for spec in workload):
            raise InvalidRequestError(f"--api completions needs a 'prompt' on every line of {args.workload}")
    else:
        workload, name = synthetic_workload(sum(counts), args.prompt_words, args.max_tokens), "synthetic"
    prices = load_price_file(args.price_file) if args.price_file else REFERENCE_PRICES
    return Sweep(levels, by_rate, counts, workload, name, args, prices)


def _log_dir(args: argparse.Namespace) -> Path:
    """Where started servers log: kept after the run, to look into when a server fails."""
    return args.output or Path(tempfile.gettempdir())


@contextlib.contextmanager
def _start_quill(args: argparse.Namespace):
    log_dir = _log_dir(args)
    port = servers.free_port()
    options = ["--hourly-cost", str(args.hourly_cost), *shlex.split(args.serve_args)]
    if args.price_file:
        options += ["--price-file", str(args.price_file)]
    url = f"http://127.0.0.1:{port}"
    print(f"starting quill serve {args.start} on {url} (log: {log_dir / 'quill-serve.log'})", file=sys.stderr)
    with servers.started_server(servers.quill_serve_command(args.start, port, *options), url, "/health",
                                log_dir / "quill-serve.log"):
        yield url


def _compared_reports(args: argparse.Namespace, sweep: Sweep) -> list[dict]:
    """The runs of the earlier reports given to --compare, checked before anything is measured."""
    runs = []
    mode = "rate" if sweep.by_rate else "concurrency"
    for label, target in map(_split_label, args.compare):
        if target.startswith(("http://", "https://")):
            continue
        loaded = load_runs(target)
        if any(run["mode"] != mode for run in loaded):
            raise InvalidRequestError(f"{target} swept another kind of level than {mode}: the plots need one x axis")
        runs += [{**run, "label": label} for run in loaded] if label and len(loaded) == 1 else loaded
    return runs


def _compared_servers(args: argparse.Namespace, sweep: Sweep) -> list[dict]:
    """Measure the servers given to --compare, --compare-llama-cpp and --compare-llama-server, one
    after the other."""
    runs = [_measure(target.rstrip("/"), label, sweep) for label, target in map(_split_label, args.compare)
            if target.startswith(("http://", "https://"))]
    if args.compare_llama_cpp:
        runs.append(_measure_started(args, sweep, "llama-cpp-python", "/v1/models", lambda model_file, port:
                                     servers.llama_cpp_command(args.compare_llama_cpp, model_file, port)))
    if args.compare_llama_server:
        context = servers.llama_server_slot_context(max(spec.max_tokens for spec in sweep.workload),
                                                    max(spec.prompt_words for spec in sweep.workload))
        runs.append(_measure_started(args, sweep, "llama-server", "/health", lambda model_file, port:
                                     servers.llama_server_command(args.compare_llama_server, model_file, port,
                                                                  sweep.most_in_flight, context)))
    return runs


def _split_label(value: str) -> tuple[str | None, str]:
    """'LABEL=TARGET' or just 'TARGET' (a URL or a path, which may hold '=' only after a '/')."""
    head, sep, rest = value.partition("=")
    return (head, rest) if sep and "/" not in head else (None, value)


def _measure_started(args: argparse.Namespace, sweep: Sweep, label: str, ready_path: str,
                     command: Callable[[Path, int], list[str]]) -> dict:
    """Start a peer server, `command(model_file, port)`, on the GGUF file Quill serves; measure it
    under `label` once `ready_path` answers; stop it."""
    if args.model_file:
        model_file = args.model_file
    elif args.start:
        from quill.weights.hub import resolve_model

        model_file = resolve_model(args.start)
    else:
        raise InvalidRequestError(f"measuring {label} needs --model-file GGUF (or --start MODEL)")
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    log = _log_dir(args) / f"{label}.log"
    print(f"starting {label} on {url} (log: {log})", file=sys.stderr)
    with servers.started_server(command(model_file, port), url, ready_path, log):
        return _measure(url, label, sweep)


def _measure(url: str, label: str | None, sweep: Sweep) -> dict:
    return asyncio.run(_measure_async(url, label, sweep))


async def _measure_async(url: str, label: str | None, sweep: Sweep) -> dict:
    args = sweep.args
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    # Every request reaches the engine: the workload repeats from run to run, and a response cache
    # (Quill's answers repeated greedy requests) would flatter the figures. Servers without one ignore it.
    headers = {"Cache-Control": "no-store", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(args.timeout, connect=30),
                                 limits=httpx.Limits(max_connections=sweep.most_in_flight + 4)) as client:
        model = args.model or await fetch_model(client)
        target = Target(url, model, args.api, args.temperature, {"ignore_eos": True} if args.ignore_eos else {})
        label = label or model
        await send_request(client, target, _WARM_UP)
        levels, offset = [], 0
        for level, count in zip(sweep.levels, sweep.requests_per_level):
            specs = take(sweep.workload, offset, count)
            offset += count  # each level gets fresh prompts: no prefix-cache hits from the level before
            concurrency, rate = (None, level) if sweep.by_rate else (level, None)
            arrivals = poisson_arrivals(rate, count, args.seed) if sweep.by_rate else None
            with tqdm(total=count, desc=f"{label} at {level_name({'rate': rate, 'concurrency': concurrency})}",
                      unit="req", file=sys.stderr, disable=None, leave=False) as progress:
                results, duration = await run_level(lambda spec: send_request(client, target, spec), specs,
                                                    concurrency=concurrency, arrivals=arrivals,
                                                    on_done=lambda result: progress.update(1))
            levels.append(summarize_level(results, duration, concurrency=concurrency, rate=rate,
                                          slo_ttft=args.slo_ttft_ms / 1000, hourly_cost=args.hourly_cost,
                                          reference_prices=sweep.reference_prices))
    return {
        "label": label, "url": url, "model": model, "api": args.api, "mode": "rate" if sweep.by_rate else "concurrency",
        "workload": {"source": sweep.workload_name, "prompt_words": None if args.workload else args.prompt_words,
                     "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos, "temperature": args.temperature},
        "slo": {"ttft_s": args.slo_ttft_ms / 1000}, "hourly_cost_usd": args.hourly_cost,
        "host": host_description(),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "levels": levels,
    }

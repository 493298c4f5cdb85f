"""Serving load: N concurrent streaming chat clients against an OpenAI-compatible server.

(`quill bench` is the general tool: sweeps of concurrency or request rate, percentiles, goodput,
cost, plots. This script keeps the one-shot measurement behind the README's serving tables; it
sends the same requests with the same client, `quill.bench`.)

Each client sends one streaming chat request (a distinct prompt that invites a long answer) and
reads it to the end. Reported per server: aggregate output tokens/s over the whole run (first
request sent to last stream finished), time to first token p50/p99, end-to-end latency p50, and
the tokens actually generated (servers may stop early at EOS; Quill is asked to ignore EOS).

Against a running server, or one this script starts (and stops) itself; several in one run are
measured one after the other, never at the same time (2 cores):

    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000
    python benchmarks/serve_load.py --start-quill smollm2 \\
        --start-llama-cpp /tmp/peer/venv/bin/python --json benchmarks/results/serve_load.json

`--start-llama-server BINARY` runs llama.cpp's own server (continuous batching over one slot per
client; build it with ../shared/peers/build-llama-server.sh; on AMD processors without AVX-VNNI
build it with -DGGML_AVX_VNNI=OFF, or it dies of an illegal instruction).
`--stalled-readers 0 1` measures the same server twice: alone, then with one client that sends
a long streaming request (one choice, no logprobs, no max_tokens: what a normal client costs)
and never reads (`quill.bench.soak.stalled_reader`). Its events fill the connection's buffers
(~100 KB, a few hundred tokens), then Quill started with `--serve-option=--stream-idle-timeout=N`
cuts it N seconds later; the others' inter-token latency (ITL p99) should stay near the run
without it. The "cut" column is the server's `quill:requests_cut_short` count afterwards.

`--start-llama-cpp PYTHON` runs `PYTHON -m llama_cpp.server --model FILE --n_threads 2
--interrupt_requests False` (by default that server cancels the stream in progress when a new
request arrives) on the same GGUF file as Quill (`--model-file`, default: SmolLM2's).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from quill.bench.client import Target, fetch_model, send_request
from quill.bench.report import percentile
from quill.bench.servers import (
    free_port,
    llama_cpp_command,
    llama_server_command,
    llama_server_slot_context,
    peak_rss_mb,
    quill_serve_command,
    started_server,
)
from quill.bench.soak import cut_short_by_reason, server_metrics, stalled_reader
from quill.bench.workload import story_request, synthetic_workload
from quill.hardware import host_description
from quill.table import format_table
from quill.weights.hub import resolve_model  # pulls a known model on first use


async def run_load(base_url: str, args: argparse.Namespace, stalled: int = 0) -> dict:
    timeout = httpx.Timeout(args.timeout, connect=30)
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        model = await fetch_model(client)
        # Quill is asked to ignore EOS and to answer from the model, never its response cache (a
        # second --stalled-readers level repeats the same requests); other servers ignore the fields.
        extra = {"cache": False} | ({"ignore_eos": True} if args.ignore_eos else {})
        target = Target(base_url, model, temperature=args.temperature, extra_body=extra)
        specs = synthetic_workload(args.clients, args.prompt_words, args.max_tokens)
        # Warm up on a request outside the workload: warming on the first client's own prompt left it
        # in both servers' prompt caches, so that one of the measured requests skipped its prefill.
        await send_request(client, target, story_request(args.clients, args.prompt_words, max_tokens=4))
        # Stalled readers hold their sockets past the load's end; they are closed once it is done.
        stalls = [asyncio.create_task(stalled_reader(base_url, model, args.timeout, choices=1, logprobs=None))
                  for _ in range(stalled)]
        started = time.perf_counter()
        results = await asyncio.gather(*(send_request(client, target, spec) for spec in specs))
        wall = time.perf_counter() - started
        for stall in stalls:
            stall.cancel()
        await asyncio.gather(*stalls, return_exceptions=True)
        cut = await _requests_cut_short(client)
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [gap for r in ok for gap in r.itls]
    return {
        "model": model, "clients": args.clients, "stalled_readers": stalled, "requests_cut_short": cut,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "output_tokens": tokens, "mean_tokens_per_stream": tokens / len(ok) if ok else 0.0,
        "wall_seconds": wall, "output_tokens_per_second": tokens / wall if wall else 0.0,
        "ttft_p50": percentile(ttfts, 0.50), "ttft_p99": percentile(ttfts, 0.99),
        "e2e_p50": percentile([r.e2e for r in ok if r.e2e is not None], 0.50),
        "itl_p50": percentile(itls, 0.50), "itl_p99": percentile(itls, 0.99),
        "finish_reasons": {reason: sum(r.finish_reason == reason for r in ok)
                           for reason in sorted({r.finish_reason for r in ok})},
        "streams": [{k: v for k, v in asdict(r).items() if k != "itls"} for r in results],
    }


async def _requests_cut_short(client: httpx.AsyncClient) -> float | None:
    """Quill's count of requests it ended early (stalled readers among them); None for other servers."""
    try:
        metrics = await server_metrics(client)
    except httpx.HTTPError:
        return None
    return sum(cut_short_by_reason(metrics).values())


def quill_command(model: str, port: int, args: argparse.Namespace) -> list[str]:
    return quill_serve_command(model, port, *(["--dtype", args.dtype] if args.dtype else []), *args.serve_option)


# ---------------------------------------------------------------------------- main


def measure(name: str, url: str, args: argparse.Namespace) -> dict[str, dict]:
    """The load against the server at `url` once per --stalled-readers level, one after the other."""
    return {name if not stalled else f"{name} +{stalled} stalled": asyncio.run(run_load(url, args, stalled))
            for stalled in args.stalled_readers}


def measure_started(name: str, command: list[str], port: int, ready_path: str, log: Path,
                    args: argparse.Namespace) -> dict[str, dict]:
    """Start a server, run the load against it once it answers `ready_path`, stop it."""
    url = f"http://127.0.0.1:{port}"
    print(f"starting {name} ({Path(command[0]).name} ...) on {url} ...", file=sys.stderr, flush=True)
    with started_server(command, url, ready_path, log, timeout=180.0) as process:
        results = measure(name, url, args)
        peak = peak_rss_mb(process.pid)  # the server's own, from its start to the end of the load
    return {key: result | {"server_peak_rss_mb": peak} for key, result in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", action="append", default=[], metavar="URL",
                        help="an already running server (repeatable)")
    parser.add_argument("--start-quill", metavar="MODEL", help="start `quill serve MODEL` and measure it")
    parser.add_argument("--start-llama-cpp", metavar="PYTHON",
                        help="start llama-cpp-python's server with this interpreter and measure it")
    parser.add_argument("--start-llama-server", metavar="BINARY",
                        help="start llama.cpp's llama-server binary (one slot per client) and measure it")
    parser.add_argument("--model-file", help="GGUF file for llama.cpp (default: the --start-quill model's file, "
                                             "else SmolLM2's)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streams (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per stream (default: %(default)s)")
    parser.add_argument("--prompt-words", type=int, default=0, metavar="N",
                        help="prepend N words of notes to each prompt (400 give SmolLM2 prompts of ~512 tokens)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let Quill stop at EOS (by default it is asked to ignore it)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="Quill's compute dtype")
    parser.add_argument("--serve-option", action="append", default=[], metavar="OPTION",
                        help="an option for the started Quill server, e.g. --serve-option=--stream-idle-timeout=5")
    parser.add_argument("--stalled-readers", type=int, nargs="+", default=[0], metavar="N",
                        help="clients that send a long streaming request and never read, during the load; "
                             "several levels measure the same server once each (default: 0)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"), help="where started servers log")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (args.base_url or args.start_quill or args.start_llama_cpp or args.start_llama_server):
        parser.error("give --base-url, --start-quill, --start-llama-server or --start-llama-cpp")

    results: dict[str, dict] = {}
    for url in args.base_url:
        results |= measure(url, url.rstrip("/"), args)
    if args.start_quill:
        port = free_port()
        results |= measure_started("quill", quill_command(args.start_quill, port, args),
                                   port, "/health", args.log_dir / "serve_load_quill.log", args)
    model_file = Path(args.model_file) if args.model_file else resolve_model(args.start_quill or "smollm2")
    if args.start_llama_server:
        port = free_port()
        context = llama_server_slot_context(args.max_tokens, args.prompt_words)
        results |= measure_started(
            "llama-server", llama_server_command(args.start_llama_server, model_file, port, args.clients, context),
            port, "/health", args.log_dir / "serve_load_llama_server.log", args)
    if args.start_llama_cpp:
        port = free_port()
        results |= measure_started("llama.cpp", llama_cpp_command(args.start_llama_cpp, model_file, port),
                                   port, "/v1/models", args.log_dir / "serve_load_llama_cpp.log", args)

    print_table(results)
    if args.json:
        report = {"host": host_description(),
                  "clients": args.clients, "max_tokens": args.max_tokens, "temperature": args.temperature,
                  "ignore_eos": args.ignore_eos, "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["failed"] == 0 for r in results.values()) else 1


def print_table(results: dict[str, dict]) -> None:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1000:.0f}"

    header = ("server", "clients", "ok", "tokens", "tok/stream", "wall s", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
              "e2e p50 ms", "ITL p50 ms", "ITL p99 ms", "cut", "peak RSS MB")
    rows = [(name, str(r["clients"]), str(r["completed"]), str(r["output_tokens"]),
             f"{r['mean_tokens_per_stream']:.0f}", f"{r['wall_seconds']:.1f}", f"{r['output_tokens_per_second']:.1f}",
             ms(r["ttft_p50"]), ms(r["ttft_p99"]), ms(r["e2e_p50"]), ms(r["itl_p50"]), ms(r["itl_p99"]),
             "n/a" if r["requests_cut_short"] is None else f"{r['requests_cut_short']:.0f}",
             "n/a" if r.get("server_peak_rss_mb") is None else f"{r['server_peak_rss_mb']:.0f}")
            for name, r in results.items()]
    print(format_table(header, rows, numeric=True))
    for name, r in results.items():
        if r["errors"]:
            print(f"{name}: {r['failed']} failed, e.g. {r['errors'][0]}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

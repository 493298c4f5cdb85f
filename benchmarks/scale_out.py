"""Scaling out on one machine: replicas against threads, and prefix-affinity routing against random.

Two measurements, each server started by this script (`quill serve MODEL --replicas R
--threads-per-replica T`, a local Ray instance each time) and stopped before the next, so that
no two run at the same time:

1. Throughput by layout: `1x1` (1 replica x 1 thread), `2x1` and `1x2`, each under 16 and 32
   streaming clients with distinct prompts (serve_load.py's load: aggregate output tokens/s, TTFT
   and end-to-end percentiles). All layouts run behind the same Ray Serve ingress, so they differ
   only in how the cores are split. Target (issue 20): 2x1 >= 1.6x the tokens/s of 1x1.

2. Routing, on 2 replicas x 1 thread: `prefix` (quill/deploy/affinity.py) against `random`, on
   conversations that all start with the same long system prompt. Each conversation sends its
   turns one after another (each turn's prompt extends the last: system prompt, earlier
   questions, a fixed stand-in for each answer), the conversations at the same time. TTFT p50
   over every turn; target: prefix <= 0.6x random. Once both replicas hold the shared prompt,
   random routing loses only a conversation's own short history; `--context-words N` gives each
   conversation a record of its own after the shared prompt, which it loses on the other replica.

    python benchmarks/scale_out.py --model smollm2 --json benchmarks/results/scale_out.json

The machine must have as many cores as the largest layout uses (2 here); the numbers mean
something only on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from serve_load import run_load  # noqa: E402  (benchmarks/, next to this script)

from quill.bench.client import Target, fetch_model, send_request  # noqa: E402
from quill.bench.report import percentile  # noqa: E402
from quill.bench.servers import free_port, quill_serve_command, started_server  # noqa: E402
from quill.bench.workload import RequestSpec  # noqa: E402
from quill.hardware import host_description  # noqa: E402
from quill.table import format_table  # noqa: E402

_SYSTEM_WORDS = ("You are the help desk of a large public library. Answer patrons politely and precisely, cite the "
                 "shelf of every book you mention, never invent a title, and keep each answer short. ").split()


def layout(text: str) -> tuple[int, int]:
    """'2x1' -> (2 replicas, 1 thread each)."""
    try:
        replicas, threads = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a layout: {text!r} (REPLICASxTHREADS, e.g. 2x1)") from None
    if replicas < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"not a layout: {text!r} (both numbers at least 1)")
    return replicas, threads


def serve_command(args: argparse.Namespace, port: int, replicas: int, threads: int, routing: str) -> list[str]:
    return quill_serve_command(args.model, port, "--replicas", str(replicas), "--threads-per-replica", str(threads),
                               "--routing", routing, "--stream-interval", str(args.stream_interval),
                               *(["--dtype", args.dtype] if args.dtype else []))


def started(args: argparse.Namespace, name: str, replicas: int, threads: int, routing: str = "prefix"):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"starting {name} ({replicas} replicas x {threads} threads, {routing} routing) on {url} ...",
          file=sys.stderr, flush=True)
    command = serve_command(args, port, replicas, threads, routing)
    return url, started_server(command, url, "/health", args.log_dir / f"scale_out_{name}.log", timeout=300.0)


# ---------------------------------------------------------------------------- routing workload


_RECORD_WORDS = ("loan", "returned", "renewed", "atlas", "novel", "periodical", "fine", "waived", "branch",
                 "reserve", "archive", "card")


def system_prompt(words: int) -> str:
    return " ".join(_SYSTEM_WORDS[i % len(_SYSTEM_WORDS)] for i in range(words))


def patron_record(index: int, words: int) -> str:
    """`words` words of one conversation's own context (a patron's record), different from the
    first word on for every conversation."""
    return " ".join(f"{_RECORD_WORDS[(i * 7 + index) % len(_RECORD_WORDS)]}{index}" for i in range(words))


async def conversation(client: httpx.AsyncClient, target: Target, index: int, args: argparse.Namespace) -> list:
    """One conversation's turns, in order; the answers are replaced by a fixed stand-in, so every
    turn's prompt extends the previous one whatever the model said. With --context-words, the
    shared system prompt is followed by the conversation's own record."""
    system = system_prompt(args.system_words)
    if args.context_words:
        system += f"\n\nThe patron's record: {patron_record(index, args.context_words)}"
    messages = [{"role": "system", "content": system}]
    results = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": f"Patron {index}, question {turn}: where are the atlases?"})
        result = await send_request(client, target, RequestSpec(max_tokens=args.turn_tokens, messages=list(messages)))
        results.append(result)
        messages.append({"role": "assistant", "content": f"(answer {turn})"})
    return results


async def run_conversations(url: str, args: argparse.Namespace) -> dict:
    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=args.conversations + 4)) as client:
        target = Target(url, await fetch_model(client), extra_body={"ignore_eos": True})
        started_at = time.perf_counter()
        turns = [r for rs in await asyncio.gather(*(conversation(client, target, i, args)
                                                    for i in range(args.conversations))) for r in rs]
        wall = time.perf_counter() - started_at
    ok = [r for r in turns if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    return {"conversations": args.conversations, "turns": args.turns, "completed": len(ok),
            "failed": len(turns) - len(ok), "errors": sorted({r.error for r in turns if r.error})[:5],
            "wall_seconds": wall, "ttft_p50": percentile(ttfts, 0.50), "ttft_p99": percentile(ttfts, 0.99),
            "e2e_p50": percentile([r.e2e for r in ok if r.e2e is not None], 0.50)}


# ---------------------------------------------------------------------------- main


def measure_layouts(args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for replicas, threads in args.layouts:
        name = f"{replicas}x{threads}"
        url, server = started(args, name, replicas, threads)
        with server:
            for clients in args.clients:
                load = argparse.Namespace(**{**vars(args), "clients": clients})
                results[f"{name} c{clients}"] = {"replicas": replicas, "threads": threads,
                                                 **asyncio.run(run_load(url, load))}
    return results


def measure_routing(args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for policy in ("prefix", "random"):
        url, server = started(args, f"routing_{policy}", args.routing_replicas, 1, policy)
        with server:
            results[policy] = asyncio.run(run_conversations(url, args))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="model to serve (default: %(default)s)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="Quill's compute dtype")
    parser.add_argument("--layouts", type=layout, nargs="+", default=[(1, 1), (2, 1), (1, 2)], metavar="RxT",
                        help="replicas x threads per replica (default: 1x1 2x1 1x2)")
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 32], help="concurrent streams per level")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per stream (default: %(default)s)")
    parser.add_argument("--prompt-words", type=int, default=0, help="words of notes before each prompt")
    parser.add_argument("--routing-replicas", type=int, default=2, help="replicas for the routing comparison")
    parser.add_argument("--conversations", type=int, default=16, help="concurrent conversations (routing)")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation (routing)")
    parser.add_argument("--turn-tokens", type=int, default=16, help="output tokens per turn (routing)")
    parser.add_argument("--system-words", type=int, default=300,
                        help="words of the shared system prompt (300 are ~400 SmolLM2 tokens)")
    parser.add_argument("--context-words", type=int, default=0,
                        help="words of each conversation's own record after the shared system prompt (routing; "
                             "default: %(default)s, the conversations share everything but their questions)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="the servers' --stream-interval: engine outputs per item streamed from a replica "
                             "(default: %(default)s)")
    parser.add_argument("--skip", choices=["layouts", "routing"], action="append", default=[])
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"), help="where started servers log")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.temperature, args.ignore_eos = 0.0, True  # what serve_load's run_load reads

    layouts = {} if "layouts" in args.skip else measure_layouts(args)
    routing = {} if "routing" in args.skip else measure_routing(args)
    print_tables(layouts, routing)
    if args.json:
        report = {"host": host_description(), "model": args.model, "max_tokens": args.max_tokens,
                  "stream_interval": args.stream_interval, "layouts": layouts, "routing": routing,
                  "routing_workload": {"replicas": args.routing_replicas, "conversations": args.conversations,
                                       "turns": args.turns, "turn_tokens": args.turn_tokens,
                                       "system_words": args.system_words, "context_words": args.context_words}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = sum(r["failed"] for r in [*layouts.values(), *routing.values()])
    return 0 if failed == 0 else 1


def print_tables(layouts: dict[str, dict], routing: dict[str, dict]) -> None:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1000:.0f}"

    if layouts:
        base = {r["clients"]: r["output_tokens_per_second"] for r in layouts.values()
                if (r["replicas"], r["threads"]) == (1, 1)}
        rows = [(name, str(r["completed"]), f"{r['output_tokens_per_second']:.1f}",
                 f"{r['output_tokens_per_second'] / base[r['clients']]:.2f}x" if base.get(r["clients"]) else "n/a",
                 ms(r["ttft_p50"]), ms(r["ttft_p99"]), ms(r["e2e_p50"])) for name, r in layouts.items()]
        print(format_table(("layout", "ok", "tok/s", "vs 1x1", "TTFT p50 ms", "TTFT p99 ms", "e2e p50 ms"), rows,
                           numeric=True))
    if routing:
        random_p50 = (routing.get("random") or {}).get("ttft_p50")
        rows = [(policy, str(r["completed"]), ms(r["ttft_p50"]),
                 f"{r['ttft_p50'] / random_p50:.2f}x" if random_p50 and r["ttft_p50"] is not None else "n/a",
                 ms(r["ttft_p99"]), ms(r["e2e_p50"])) for policy, r in routing.items()]
        print(format_table(("routing", "ok", "TTFT p50 ms", "vs random", "TTFT p99 ms", "e2e p50 ms"), rows,
                           numeric=True))
    for name, r in [*layouts.items(), *routing.items()]:
        if r["errors"]:
            print(f"{name}: {r['failed']} failed, e.g. {r['errors'][0]}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

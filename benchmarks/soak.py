"""Soak a server for N minutes with well- and badly-behaved clients (`quill.bench.soak`): mixed
prompt lengths and sampling, deliberate disconnects, stalled readers and invalid requests, the
server's RSS sampled every few seconds, TTFT and inter-token percentiles per minute, and the
server's metrics once the traffic has stopped.

Against a running server, or a `quill serve` this script starts (and stops) itself:

    python benchmarks/soak.py --start-quill smollm2 --minutes 10 --clients 16 --json benchmarks/results/soak.json
    python benchmarks/soak.py --base-url http://127.0.0.1:8000 --minutes 10

The exit status is 1 when anything the soak must not see happened: a 5xx, a dropped connection,
a wrong status for an invalid request, or sequences still running or KV blocks still in use once
the server is idle.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from quill.bench.servers import free_port, quill_serve_command, started_server
from quill.bench.soak import SoakPlan, format_soak, problems, run_soak
from quill.hardware import host_description
from quill.weights.hub import resolve_model  # pulls a known model on first use


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", metavar="URL", help="an already running server")
    parser.add_argument("--start-quill", metavar="MODEL", help="start `quill serve MODEL` and soak it")
    parser.add_argument("--serve-option", action="append", default=[], metavar="OPTION",
                        help="an option for the started server, e.g. --serve-option=--stream-idle-timeout=5")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the traffic runs (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--prompt-words", type=_numbers, default=SoakPlan.prompt_words, metavar="N,N,...",
                        help="words of notes per prompt, one picked per request (default: 0,40,300; a model "
                             "with a short window needs fewer)")
    parser.add_argument("--max-tokens", type=_numbers, default=SoakPlan.max_tokens, metavar="N,N,...",
                        help="max_tokens, one picked per request (default: 8,32,96)")
    parser.add_argument("--stall-seconds", type=float, default=SoakPlan.stall_seconds,
                        help="how long a stalled reader keeps its socket (default: %(default)s)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per latency row (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("QUILL_API_KEY"), help="the server's key, if any")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"), help="where a started server logs")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the report here")
    args = parser.parse_args()
    if not (args.base_url or args.start_quill):
        parser.error("give --base-url or --start-quill")
    plan = SoakPlan(seconds=args.minutes * 60, clients=args.clients, prompt_words=args.prompt_words,
                    max_tokens=args.max_tokens, stall_seconds=args.stall_seconds, window=args.window,
                    api_key=args.api_key)
    if args.base_url:
        report = asyncio.run(run_soak(args.base_url.rstrip("/"), plan))
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = quill_serve_command(str(resolve_model(args.start_quill)), port, "--no-response-cache",
                                      *args.serve_option)
        print(f"starting {' '.join(command)}", file=sys.stderr, flush=True)
        with started_server(command, url, "/health", args.log_dir / "soak_quill.log", timeout=300.0):
            report = asyncio.run(run_soak(url, plan))
    report["host"] = host_description()
    print(format_soak(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    found = problems(report)
    for problem in found:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

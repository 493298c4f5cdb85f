"""`quill bench` and `quill cost`: measure a running server under load (the work is in
`quill.bench`), and report what its traffic cost."""
from __future__ import annotations

import argparse

from quill.bench.options import DESCRIPTION as BENCH_DESCRIPTION, EPILOG as BENCH_EPILOG, add_bench_arguments
from quill.cost import comparison_lines, usage_table
from quill.errors import QuillError
from quill.table import format_table


def add_commands(commands) -> None:
    """Add `bench` and `cost` to the `quill` subcommands."""
    bench = commands.add_parser("bench", help="measure an OpenAI-compatible server under load",
                                description=BENCH_DESCRIPTION, epilog=BENCH_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    cost = commands.add_parser(
        "cost",
        help="what a running server's traffic cost, and would have cost on hosted APIs",
        description="Print a Quill server's traffic since it started (GET /v1/usage): per model, requests, "
        "tokens, the self-hosted cost (its --hourly-cost over the throughput it measured) and what the same "
        "tokens would have cost on each reference API.",
    )
    cost.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (default: %(default)s)")
    cost.add_argument("--api-key", metavar="KEY", help="the server's API key (default: $QUILL_API_KEY)")
    cost.add_argument("--json", action="store_true", help="print the raw report as JSON")
    cost.set_defaults(func=_cmd_cost)


def _cmd_bench(args: argparse.Namespace) -> int:
    from quill.bench.command import run_bench  # httpx, and matplotlib when plotting

    return run_bench(args)


def _cmd_cost(args: argparse.Namespace) -> int:
    import json
    import os

    import httpx

    api_key = args.api_key or os.environ.get("QUILL_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(args.url.rstrip("/") + "/v1/usage", headers=headers, timeout=30)
        response.raise_for_status()
        report = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise QuillError(f"cannot read {args.url}/v1/usage: {exc}") from None
    if args.json:
        print(json.dumps(report, indent=2))
    elif not report["data"]:
        print("No requests served yet.")
    else:
        print(format_table(*usage_table(report), numeric=True))
        print("\n".join(comparison_lines(report)))
    return 0


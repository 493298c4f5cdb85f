"""The options of `quill bench` (kept apart from the code that runs it, so `quill --help` stays quick)."""
from __future__ import annotations

import argparse
from pathlib import Path

from quill.cost import DEFAULT_HOURLY_COST

DESCRIPTION = """\
Measure an OpenAI-compatible server under load, as its users see it: streaming requests at each
concurrency level (or each request rate, with Poisson arrivals), timed on the client side. Reports
per level: requests/s, output tokens/s, time to first token (TTFT) p50/p90/p99, inter-token latency
(ITL) p50/p99, end-to-end latency p50/p99, goodput (requests/s that met the TTFT SLO) and the cost
per 1M output tokens at --hourly-cost. Prints a table; --output DIR also writes report.json,
throughput.png and ttft.png. Measure a running server (--url) or let the command start
`quill serve MODEL` (--start); --compare adds other servers (or earlier reports) to the table and
the plots. Servers are measured one after the other, never at the same time. The exit status is 1
when any request in the table failed."""

EPILOG = """\
examples:
  quill bench --url http://127.0.0.1:8000 --concurrency 1,4,16
  quill bench --start smollm2 --rate 1,2,4 --num-requests 64 --output bench-rate
  quill bench --start smollm2 --compare-llama-cpp PEER_VENV/bin/python --output bench-vs-llama
  quill bench --start smollm2 --concurrency 16 --compare-llama-server path/to/llama-server
  quill bench --url http://127.0.0.1:8001 --label other --compare quill=bench-vs-llama/report.json"""


def _number_list(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
        if not values or any(value <= 0 for value in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers, e.g. 1,4,16: {text!r}")
        return values
    return parse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("server")
    where = target.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    where.add_argument("--start", metavar="MODEL",
                       help="start `quill serve MODEL` on a free port for the run, and stop it afterwards")
    target.add_argument("--serve-args", default="", metavar="ARGS",
                        help="more options for the started `quill serve`, e.g. --serve-args=\"--dtype float32\"")
    target.add_argument("--label", help="the server's name in the table, plots and report "
                                        "(default: quill with --start, else the served model's name)")
    target.add_argument("--model", help="model to request (default: the first one /v1/models lists)")
    target.add_argument("--api-key", metavar="KEY", help="sent as `Authorization: Bearer KEY` (default: $OPENAI_API_KEY)")
    target.add_argument("--api", choices=["chat", "completions"], default="chat",
                        help="/v1/chat/completions or /v1/completions (default: %(default)s)")
    target.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="per-request timeout (default: %(default)s)")

    load = parser.add_argument_group("load")
    sweep = load.add_mutually_exclusive_group()
    sweep.add_argument("--concurrency", type=_number_list(int), default=[1, 4, 16, 32], metavar="N,N,...",
                       help="concurrency levels: requests kept in flight at once (default: 1,4,16,32)")
    sweep.add_argument("--rate", type=_number_list(float), metavar="R,R,...",
                       help="request rates (requests/s) to sweep instead, with Poisson arrivals and no concurrency cap")
    load.add_argument("--num-requests", type=int, metavar="N",
                      help="requests per level (default: 4 x the concurrency, at least 16; 32 per rate)")
    load.add_argument("--workload", type=Path, metavar="FILE.jsonl",
                      help='requests from a JSONL file, one a line: {"messages": [...]} or {"prompt": "..."}, '
                           'optionally with "max_tokens" (default: a built-in synthetic workload of story requests)')
    load.add_argument("--prompt-words", type=int, default=32, metavar="N",
                      help="synthetic workload: words of notes in each prompt, ~1.3 tokens each (default: %(default)s)")
    load.add_argument("--max-tokens", type=int, default=128, metavar="N",
                      help="output tokens per request (default: %(default)s)")
    load.add_argument("--temperature", type=float, default=0.0, metavar="T",
                      help="sampling temperature; 0 is greedy (default: %(default)s)")
    load.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                      help="let the server stop at end-of-sequence; by default requests carry ignore_eos "
                           "(a vLLM/Quill extension; other servers ignore it) so every answer has --max-tokens tokens")
    load.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals (default: %(default)s)")

    report = parser.add_argument_group("report")
    report.add_argument("--slo-ttft-ms", type=float, default=500.0, metavar="MS",
                        help="TTFT target for goodput (default: %(default)s ms, the interactive-chat target)")
    report.add_argument("--hourly-cost", type=float, default=DEFAULT_HOURLY_COST, metavar="USD",
                        help="price of the machine per hour, for the cost per 1M output tokens (default: $%(default)s, "
                             "about a 2-vCPU on-demand cloud VM such as AWS m7i.large)")
    report.add_argument("--price-file", type=Path, metavar="FILE",
                        help="reference API prices per 1K tokens (JSON or TOML) instead of the built-in "
                             "GPT-4o and Claude 3.5 Sonnet prices")
    report.add_argument("--compare", action="append", default=[], metavar="[LABEL=]URL_OR_REPORT",
                        help="also measure this server URL with the same load, or add the runs of an earlier "
                             "report.json (or its directory); repeatable")
    report.add_argument("--compare-llama-cpp", metavar="PYTHON",
                        help="also start llama-cpp-python's server with this interpreter on the same GGUF file "
                             "and measure it (label llama-cpp-python)")
    report.add_argument("--compare-llama-server", metavar="BINARY",
                        help="also start llama.cpp's own llama-server (continuous batching; build it with "
                             "../shared/peers/build-llama-server.sh) on the same GGUF file, two threads and one "
                             "slot per request in flight, and measure it (label llama-server)")
    report.add_argument("--model-file", type=Path, metavar="GGUF",
                        help="GGUF file for --compare-llama-cpp and --compare-llama-server (default: the --start "
                             "model's file)")
    report.add_argument("--output", type=Path, metavar="DIR", help="write report.json, throughput.png and ttft.png here")

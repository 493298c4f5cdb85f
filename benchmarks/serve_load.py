"""Serving load: N concurrent streaming chat clients against an OpenAI-compatible server.

Each client sends one streaming chat request (a distinct prompt that invites a long answer) and
reads it to the end. Reported per server: aggregate output tokens/s over the whole run (first
request sent to last stream finished), time to first token p50/p99, end-to-end latency p50, and
the tokens actually generated (servers may stop early at EOS; Quill is asked to ignore EOS).

Against a running server, or one this script starts (and stops) itself; several in one run are
measured one after the other, never at the same time (2 cores):

    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000
    python benchmarks/serve_load.py --start-quill smollm2 \\
        --start-llama-cpp /tmp/peer/venv/bin/python --json benchmarks/results/serve_load.json

`--start-llama-cpp PYTHON` runs `PYTHON -m llama_cpp.server --model FILE --n_threads 2
--interrupt_requests False` (by default that server cancels the stream in progress when a new
request arrives) on the same GGUF file as Quill (`--model-file`, default: SmolLM2's).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

TOPICS = ["a lighthouse keeper", "a dragon who cannot fly", "a lost robot", "the first city on Mars", "a clockmaker",
          "a river that flows uphill", "a chess prodigy", "a haunted library", "a deep-sea explorer", "a tiny village baker",
          "a time-travelling cat", "a mountain rescue team", "an old sailing ship", "a desert caravan", "a secret garden",
          "a jazz musician", "a volcano observatory", "a forgotten king", "a polar research station", "a street magician"]
NOTE_WORDS = " ".join(TOPICS).split()


@dataclass
class StreamResult:
    ok: bool
    ttft: float | None = None  # seconds from sending to the first content
    e2e: float | None = None
    tokens: int = 0  # from the usage chunk when the server sends one, else content chunks
    finish_reason: str | None = None
    error: str | None = None


async def one_stream(client: httpx.AsyncClient, model: str, index: int, args: argparse.Namespace) -> StreamResult:
    topic = TOPICS[index % len(TOPICS)]
    request = f"Write a long, detailed story about {topic} (story {index})."
    if args.prompt_words:  # a long prompt, distinct from its first words on so no prefix is shared
        notes = " ".join(NOTE_WORDS[(index * 7 + i) % len(NOTE_WORDS)] for i in range(args.prompt_words))
        request = f"Reader {index} took these notes: {notes}. {request}"
    body = {
        "model": model, "stream": True, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "messages": [{"role": "user", "content": request}],
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True  # a Quill extension; other servers ignore unknown fields
    started = time.perf_counter()
    result = StreamResult(ok=False)
    chunks = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    result.tokens = event["usage"].get("completion_tokens", 0)
                for choice in event.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        chunks += 1
                        if result.ttft is None:
                            result.ttft = time.perf_counter() - started
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - started
    result.tokens = result.tokens or chunks
    result.ok = result.finish_reason is not None
    return result


async def run_load(base_url: str, args: argparse.Namespace) -> dict:
    timeout = httpx.Timeout(args.timeout, connect=30)
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        models = (await client.get("/v1/models")).json()["data"]
        model = models[0]["id"]
        # warm-up: one short request, not measured
        warm = argparse.Namespace(**{**vars(args), "max_tokens": 4})
        await one_stream(client, model, 0, warm)
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, model, i, args) for i in range(args.clients)))
        wall = time.perf_counter() - started
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttfts = sorted(r.ttft for r in ok if r.ttft is not None)
    e2es = sorted(r.e2e for r in ok if r.e2e is not None)
    return {
        "model": model, "clients": args.clients, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "output_tokens": tokens, "mean_tokens_per_stream": tokens / len(ok) if ok else 0.0,
        "wall_seconds": wall, "output_tokens_per_second": tokens / wall if wall else 0.0,
        "ttft_p50": percentile(ttfts, 0.50), "ttft_p99": percentile(ttfts, 0.99),
        "e2e_p50": percentile(e2es, 0.50),
        "finish_reasons": {reason: sum(r.finish_reason == reason for r in ok)
                           for reason in sorted({r.finish_reason for r in ok})},
        "streams": [asdict(r) for r in results],
    }


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return None
    return values[max(0, math.ceil(fraction * len(values)) - 1)]


# ------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def started_server(command: list[str], base_url: str, ready_path: str, log_path: Path, timeout: float = 180.0):
    """Start a server process, wait until `ready_path` answers 200, stop it (SIGTERM) afterwards."""
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with status {process.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base_url + ready_path, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout:.0f} s; see {log_path}")
            time.sleep(0.5)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def quill_command(model: str, port: int, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "quill.cli", "serve", model, "--port", str(port),
               "--max-queue", str(max(256, args.clients * 2))]
    return command + (["--dtype", args.dtype] if args.dtype else [])


def llama_cpp_command(python: str, model_file: Path, port: int) -> list[str]:
    return [python, "-m", "llama_cpp.server", "--model", str(model_file), "--n_threads", "2",
            "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)]


def default_model_file(model: str) -> Path:
    if model.endswith(".gguf"):
        return Path(model)
    from quill.weights.hub import resolve_model  # pulls on first use

    return resolve_model(model)


# ---------------------------------------------------------------------------- main


def measure_started(name: str, command: list[str], port: int, ready_path: str, log: Path,
                    args: argparse.Namespace) -> dict:
    """Start a server, run the load against it once it answers `ready_path`, stop it."""
    url = f"http://127.0.0.1:{port}"
    print(f"starting {name} on {url} ...", file=sys.stderr, flush=True)
    with started_server(command, url, ready_path, log):
        return asyncio.run(run_load(url, args))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", action="append", default=[], metavar="URL",
                        help="an already running server (repeatable)")
    parser.add_argument("--start-quill", metavar="MODEL", help="start `quill serve MODEL` and measure it")
    parser.add_argument("--start-llama-cpp", metavar="PYTHON",
                        help="start llama-cpp-python's server with this interpreter and measure it")
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
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"), help="where started servers log")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (args.base_url or args.start_quill or args.start_llama_cpp):
        parser.error("give --base-url, --start-quill or --start-llama-cpp")

    results: dict[str, dict] = {}
    for url in args.base_url:
        results[url] = asyncio.run(run_load(url.rstrip("/"), args))
    if args.start_quill:
        port = free_port()
        results["quill"] = measure_started(f"quill serve {args.start_quill}", quill_command(args.start_quill, port, args),
                                           port, "/health", args.log_dir / "serve_load_quill.log", args)
    if args.start_llama_cpp:
        model_file = Path(args.model_file) if args.model_file else default_model_file(args.start_quill or "smollm2")
        port = free_port()
        results["llama.cpp"] = measure_started("llama-cpp-python's server",
                                               llama_cpp_command(args.start_llama_cpp, model_file, port),
                                               port, "/v1/models", args.log_dir / "serve_load_llama_cpp.log", args)

    print_table(results)
    if args.json:
        report = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
                  "clients": args.clients, "max_tokens": args.max_tokens, "temperature": args.temperature,
                  "ignore_eos": args.ignore_eos, "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["failed"] == 0 for r in results.values()) else 1


def print_table(results: dict[str, dict]) -> None:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1000:.0f}"

    header = ("server", "clients", "ok", "tokens", "tok/stream", "wall s", "tok/s", "TTFT p50 ms", "TTFT p99 ms",
              "e2e p50 ms")
    rows = [(name, str(r["clients"]), str(r["completed"]), str(r["output_tokens"]),
             f"{r['mean_tokens_per_stream']:.0f}", f"{r['wall_seconds']:.1f}", f"{r['output_tokens_per_second']:.1f}",
             ms(r["ttft_p50"]), ms(r["ttft_p99"]), ms(r["e2e_p50"])) for name, r in results.items()]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths))))
    for name, r in results.items():
        if r["errors"]:
            print(f"{name}: {r['failed']} failed, e.g. {r['errors'][0]}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""Throughput under load: offline batch, a concurrency sweep, and the prefix cache's effect on TTFT.

Quill runs in this process on one model; the peer (llama.cpp via llama-cpp-python, which serves one
stream at a time) is measured by `single_stream.py`'s worker in its own subprocess, for its
single-stream decode rate. Nothing runs concurrently with anything else (2 cores).

    python benchmarks/throughput.py --model smollm2 --peer-python /tmp/peer/venv/bin/python --json out.json

- offline: `--offline-prompts` prompts of mixed lengths (32..512 tokens) submitted at once,
  `--output-tokens` each (EOS ignored): output tokens/s over the whole run.
- sweep: for each concurrency C, a closed loop keeps C requests in flight until `--requests-per-level`
  (at least 2C) have finished; reports aggregate output tokens/s, mean time per output token (TPOT)
  and median TTFT.
- prefix cache: a ~500-token shared system prompt; TTFT of the first request (cold) and of a second
  one with a different question (the shared blocks come from the cache).
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from single_stream import PROMPT_TEXT, _host, _peer_available, _resolve, _run_worker

from quill import LLM, SamplingParams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="known model name or .gguf path (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--offline-prompts", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--peer-python", help="interpreter that can `import llama_cpp`; omit to skip the peer")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the results here")
    args = parser.parse_args()

    path = _resolve(args.model)
    results: dict = {"host": _host(), "model": args.model, "dtype": args.dtype, "output_tokens": args.output_tokens}
    llm = LLM(path, dtype=args.dtype, max_num_seqs=max(args.concurrency + [args.offline_prompts]))
    tokens = llm.tokenizer.encode(PROMPT_TEXT * 2)
    rng = random.Random(0)

    def prompt(length: int) -> list[int]:  # a fresh slice each time, so the prefix cache rarely helps
        start = rng.randrange(len(tokens) - length)
        return tokens[start:start + length]

    params = SamplingParams(max_tokens=args.output_tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt(32)], params)  # warm-up

    print("offline batch ...", file=sys.stderr, flush=True)
    offline = [prompt(rng.randint(32, 512)) for _ in range(args.offline_prompts)]
    started = time.perf_counter()
    llm.generate(offline, params)
    elapsed = time.perf_counter() - started
    results["offline"] = {"prompts": len(offline), "seconds": elapsed,
                          "output_tokens_per_s": len(offline) * args.output_tokens / elapsed}

    results["sweep"] = []
    for concurrency in args.concurrency:
        print(f"concurrency {concurrency} ...", file=sys.stderr, flush=True)
        total = max(args.requests_per_level, 2 * concurrency)
        results["sweep"].append(_closed_loop(llm, concurrency, [prompt(rng.randint(32, 128)) for _ in range(total)], params))

    results["prefix_cache"] = _prefix_cache_ttft(llm, tokens)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.peer_python and _peer_available(args.peer_python):
        print("llama.cpp single stream ...", file=sys.stderr, flush=True)
        peer = _run_worker(args.peer_python, "llama.cpp", path, None,
                           argparse.Namespace(repeats=2, dtype=args.dtype))
        if peer:
            peer.pop("prompt_ids")
            results["peer_single_stream_decode_tokens_per_s"] = peer["decode_tokens_per_s"]
    _print_report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _closed_loop(llm: LLM, concurrency: int, prompts: list[list[int]], params: SamplingParams) -> dict:
    engine = llm.engine
    pending = list(prompts)
    finished = []
    started = time.perf_counter()
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < concurrency:
            engine.add_request(pending.pop(), params)
            in_flight += 1
        for output in engine.step():
            if output.finished:
                finished.append(output.metrics)
                in_flight -= 1
    elapsed = time.perf_counter() - started
    tpots = [m.decode_time / (m.num_generated_tokens - 1) for m in finished]
    return {
        "concurrency": concurrency, "requests": len(finished), "seconds": elapsed,
        "output_tokens_per_s": sum(m.num_generated_tokens for m in finished) / elapsed,
        "mean_tpot_ms": 1000 * statistics.mean(tpots),
        "ttft_p50_ms": 1000 * statistics.median(m.ttft for m in finished),
    }


def _prefix_cache_ttft(llm: LLM, tokens: list[int]) -> dict:
    system = tokens[1000:1500]  # not used by earlier phases' prompts as a block-aligned prefix
    params = SamplingParams(max_tokens=1, temperature=0)
    cold = llm.generate(system + tokens[:12], params)[0].metrics.ttft
    warm = llm.generate(system + tokens[40:52], params)[0].metrics.ttft
    return {"shared_prefix_tokens": len(system), "cold_ttft_ms": 1000 * cold, "warm_ttft_ms": 1000 * warm,
            "speedup": cold / warm}


def _print_report(results: dict) -> None:
    offline = results["offline"]
    print(f"model {results['model']} ({results['dtype']}), {results['output_tokens']} output tokens per request")
    print(f"offline: {offline['prompts']} prompts in {offline['seconds']:.1f} s = "
          f"{offline['output_tokens_per_s']:.1f} output tok/s")
    peer = results.get("peer_single_stream_decode_tokens_per_s")
    header = ("concurrency", "output tok/s", "mean TPOT ms", "TTFT p50 ms") + (("x peer 1-stream",) if peer else ())
    rows = [(str(r["concurrency"]), f"{r['output_tokens_per_s']:.1f}", f"{r['mean_tpot_ms']:.1f}",
             f"{r['ttft_p50_ms']:.0f}") + ((f"{r['output_tokens_per_s'] / peer:.2f}x",) if peer else ())
            for r in results["sweep"]]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    if peer:
        print(f"llama.cpp single-stream decode: {peer:.1f} tok/s")
    cache = results["prefix_cache"]
    print(f"prefix cache, {cache['shared_prefix_tokens']}-token shared prompt: TTFT {cache['cold_ttft_ms']:.0f} ms cold, "
          f"{cache['warm_ttft_ms']:.0f} ms warm ({cache['speedup']:.1f}x)")
    print(f"peak RSS {results['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())

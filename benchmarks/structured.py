"""Structured output on SmolLM2: what a JSON schema costs the engine.

    python benchmarks/structured.py              # the table, JSON to benchmarks/results/structured.json
    python benchmarks/structured.py --quick      # a short run: does it work

- Decode tokens/s of JSON-schema-constrained requests against unconstrained ones, at 1 and 16
  concurrent streams, through the LLM API (greedy, chat-templated prompts, no prefix caching so
  that every repeat does the same work; best of --repeats, the modes alternating). Decode rate is tokens after each
  stream's first one over the time from the earliest first token to the last token. The issue's
  target: constrained at least 0.9x unconstrained at both.
- Mask time per token, p50 and p99 (the time per mask, over the constrained runs), the time the
  engine thread waited for masks after the forward pass or vetted greedy picks (the cost not
  hidden), and how many greedy picks were vetted and how many of those the mask then decided.
- Grammar compile time for the first request of a schema (compile + first mask) and for a
  cached one (copy + first mask).
The host's CPU model and AMX flag are recorded with the figures (see benchmarks/structured_matchers.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from structured_matchers import host  # the CPU model and AMX flag, recorded the same way

# Eight products: a long, regular answer (~150 tokens), so that decode dominates.
SCHEMA = {"type": "object", "properties": {"products": {"type": "array", "minItems": 8, "maxItems": 8, "items": {
    "type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24},
        "price": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01},
        "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2}},
    "required": ["name", "price", "in_stock", "tags"], "additionalProperties": False}}},
    "required": ["products"], "additionalProperties": False}
TOPICS = ["a bakery", "a bike shop", "a bookshop", "a garden centre", "a music store", "a toy shop",
          "a pharmacy", "a hardware store"]


def _prompts(llm, streams: int) -> list[list[int]]:
    return [llm.tokenizer.encode_chat([{"role": "user", "content": f"List eight products of {TOPICS[i % len(TOPICS)]} "
                                                                   f"(shop {i}) as JSON, with prices."}])
            for i in range(streams)]


def _decode_run(llm, prompts: list[list[int]], params) -> dict:
    structured = llm.engine.structured
    structured.recent_mask_seconds.clear()
    before = llm.engine.stats().structured
    outputs = llm.generate(prompts, params)
    after = llm.engine.stats().structured
    first = min(o.metrics.first_token_time for o in outputs)
    last = max(o.metrics.last_token_time for o in outputs)
    decoded = sum(len(o.token_ids) - 1 for o in outputs)
    return {"decode_tokens_per_s": decoded / (last - first) if last > first else 0.0,
            "generated_tokens": sum(len(o.token_ids) for o in outputs),
            "finish_reasons": sorted({o.finish_reason for o in outputs}),
            "mask_seconds": list(structured.recent_mask_seconds),
            "mask_wait_s": after.mask_wait_seconds - before.mask_wait_seconds,
            "vetted_picks": after.vetted_picks - before.vetted_picks,
            "vetted_picks_masked": after.vetted_picks_masked - before.vetted_picks_masked,
            "decode_s": last - first}


def _compile_times(llm, repeats: int) -> dict:
    """Cold: a schema never seen (a fresh description makes a new cache key); cached: the same again."""
    import torch

    from quill.sampling_params import SamplingParams
    from quill.structured.matcher import fill_masks

    structured = llm.engine.structured
    bits = torch.empty((1, structured.words), dtype=torch.int32)
    cold, cached = [], []
    for i in range(repeats):
        schema = {**SCHEMA, "description": f"run {time.time_ns()} {i}"}
        constraint = SamplingParams(json_schema=schema).constraint
        for times in (cold, cached):
            started = time.perf_counter()
            (matcher,) = structured.matchers(constraint, 1)
            fill_masks([(matcher, 0, [])], bits)
            times.append(time.perf_counter() - started)
    return {"compile_cold_ms": 1e3 * statistics.median(cold), "compile_cached_ms": 1e3 * statistics.median(cached)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cell (best shown)")
    parser.add_argument("--quick", action="store_true", help="one repeat, 1 and 2 streams, 24 tokens")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "structured.json")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.max_tokens, args.repeats = [1, 2], 24, 1

    from quill import LLM, SamplingParams

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    llm = LLM(args.model, enable_prefix_caching=False)
    compile_times = _compile_times(llm, max(args.repeats, 3))
    modes = {"unconstrained": SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True),
             "json_schema": SamplingParams(json_schema=SCHEMA, max_tokens=args.max_tokens, temperature=0)}
    llm.generate(_prompts(llm, 1), SamplingParams(json_schema=SCHEMA, max_tokens=8, temperature=0))  # warm-up
    results = []
    for streams in args.streams:
        prompts = _prompts(llm, streams)
        # The modes alternate run by run, so that a slow spell on this shared machine hits both alike.
        runs = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, params in modes.items():
                runs[mode].append(_decode_run(llm, prompts, params))
        for mode in modes:
            best = max(runs[mode], key=lambda r: r["decode_tokens_per_s"])
            masks = best.pop("mask_seconds")
            results.append({"mode": mode, "streams": streams, **best,
                            "mask_us_p50": 1e6 * _percentile(masks, 50) if masks else None,
                            "mask_us_p99": 1e6 * _percentile(masks, 99) if masks else None})
            print(f"  {mode} x{streams}: {best['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    _add_ratios(results)
    _print_report(results, compile_times)
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"host": host(), "model": args.model, "max_tokens": args.max_tokens,
                                         "repeats": args.repeats, "schema": SCHEMA, **compile_times,
                                         "results": results}, indent=2) + "\n")
    return 0


def _add_ratios(results: list[dict]) -> None:
    free = {r["streams"]: r["decode_tokens_per_s"] for r in results if r["mode"] == "unconstrained"}
    for r in results:
        r["vs_unconstrained"] = r["decode_tokens_per_s"] / free[r["streams"]] if free.get(r["streams"]) else None


def _print_report(results: list[dict], compile_times: dict) -> None:
    from quill.table import format_table

    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = ("mode", "streams", "decode tok/s", "vs free", "mask p50 us", "mask p99 us", "mask wait s",
              "vetted (masked)", "finish")
    rows = [(r["mode"], str(r["streams"]), f"{r['decode_tokens_per_s']:.1f}", number(r["vs_unconstrained"], ".2f"),
             number(r["mask_us_p50"], ".0f"), number(r["mask_us_p99"], ".0f"), f"{r['mask_wait_s']:.3f}",
             f"{r['vetted_picks']} ({r['vetted_picks_masked']})", ",".join(r["finish_reasons"])) for r in results]
    print(format_table(header, rows, numeric=True))
    print(f"\ngrammar compile (to the first mask): first request {compile_times['compile_cold_ms']:.2f} ms, "
          f"cached {compile_times['compile_cached_ms']:.3f} ms")
    print(f"host: {host()}")


if __name__ == "__main__":
    sys.exit(main())

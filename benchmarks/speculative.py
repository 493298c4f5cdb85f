"""Speculative decoding on SmolLM2: decode speed with it off, with n-gram drafting, with a draft model.

    python benchmarks/speculative.py                      # the full table, JSON to benchmarks/results/
    python benchmarks/speculative.py --max-tokens 48 --streams 1 --configs off ngram   # a quick look

Two workloads, greedy, chat-templated:
- grounded: "repeat / rewrite / summarise this passage": the answer copies its input, so n-gram
  (prompt lookup) drafts are often right;
- free: story writing with nothing to copy, where drafts are rarely accepted: this shows what
  speculation costs when it does not pay (adaptive drafting should keep that under ~5%).
Each runs with 1 and 4 concurrent streams. Decode rate is tokens after each stream's first one,
divided by the time from the earliest first token to the last token of the run (best of
--repeats). The draft model defaults to the target's own file: nothing smaller shares SmolLM2's
tokenizer here, so that row is only a sanity check (every draft accepted, each token paid twice).
Every configuration's greedy text is compared with speculation off ("same" column).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PASSAGES = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He polished the great lens, "
    "trimmed the wick, and wrote the weather in a leather logbook: wind from the west, light rain, three "
    "fishing boats returning late. In forty years the light had never failed, and the town below trusted "
    "it the way it trusted the tide.",
    "Photosynthesis turns light into chemical energy. In the chloroplasts, chlorophyll absorbs sunlight "
    "and uses it to split water into oxygen, protons and electrons. The electrons travel along a chain of "
    "proteins that pumps protons across a membrane, and the flow of protons back drives the enzyme that "
    "makes ATP, which the plant then spends to build sugars from carbon dioxide.",
    "Our team meeting is moved from Tuesday to Thursday at ten in the small conference room. Please bring "
    "the quarterly figures, the draft of the customer survey, and your notes on the new onboarding process. "
    "If you cannot attend, send your updates to Maria by Wednesday evening so that she can present them.",
    "To make the bread, mix the flour, salt and yeast in a large bowl, then add warm water and stir until a "
    "rough dough forms. Knead it for ten minutes until smooth, cover it, and let it rise for an hour. Shape "
    "the loaf, let it rise again for thirty minutes, and bake it at two hundred degrees for forty minutes.",
]
GROUNDED_ASKS = ["Repeat the following passage exactly, word for word:", "Rewrite the following passage, "
                 "keeping its wording as much as possible:", "Copy this text:", "Repeat this passage:"]
STORY_TOPICS = ["a dragon who is afraid of heights", "a robot learning to paint", "two rival chefs in Venice",
                "a lost letter that travels the world"]
CONFIGS = {"off": None, "ngram": "ngram", "draft": "SELF"}


def _workloads() -> dict[str, list[list[dict]]]:
    grounded = [[{"role": "user", "content": f"{ask}\n\n{passage}"}] for ask, passage in zip(GROUNDED_ASKS, PASSAGES)]
    free = [[{"role": "user", "content": f"Write a long, imaginative story about {topic}."}] for topic in STORY_TOPICS]
    return {"grounded": grounded, "free": free}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/quill/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--draft-model", help="draft model for the 'draft' row (default: the model itself)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cell (best shown)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--int8-activations", action=argparse.BooleanOptionalAction,
                        help="4-bit layers on 8-bit activations (default: the engine's, on for bfloat16 on the "
                             "CPU; see README: Quantization)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "speculative.json")
    args = parser.parse_args()

    from quill import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    results, baseline_text = [], {}
    for config in args.configs:
        speculative = CONFIGS[config]
        if speculative == "SELF":
            speculative = args.draft_model or args.model
        print(f"loading {config} ...", file=sys.stderr, flush=True)
        # No prefix caching: every repeat must prefill and decode the same work again.
        llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=False, speculative=speculative,
                  num_speculative_tokens=args.num_speculative_tokens, int8_activations=args.int8_activations)
        llm.generate([llm.tokenizer.encode_chat(_workloads()["free"][0])], SamplingParams(max_tokens=8))  # warm-up
        for workload, conversations in _workloads().items():
            for streams in args.streams:
                prompts = [llm.tokenizer.encode_chat(c) for c in conversations[:streams]]
                runs = [_run(llm, prompts, params) for _ in range(args.repeats)]
                best = max(runs, key=lambda r: r["decode_tokens_per_s"])
                key = (workload, streams)
                baseline_text.setdefault(key, best["texts"])
                results.append({"config": config, "workload": workload, "streams": streams,
                                "same_output": best["texts"] == baseline_text[key],
                                **{k: v for k, v in best.items() if k != "texts"}})
                print(f"  {workload} x{streams}: {best['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        del llm
    _add_speedups(results)
    _print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"host": _host(), "model": args.model,
                                     "draft_model": str(args.draft_model or args.model), "max_tokens": args.max_tokens,
                                     "num_speculative_tokens": args.num_speculative_tokens, "dtype": args.dtype,
                                     "repeats": args.repeats, "results": results}, indent=2) + "\n")
    return 0


def _run(llm, prompts: list[list[int]], params) -> dict:
    before = llm.engine.stats()
    outputs = llm.generate(prompts, params)
    after = llm.engine.stats()
    first = min(o.metrics.first_token_time for o in outputs)
    last = max(o.metrics.last_token_time for o in outputs)
    decoded = sum(len(o.token_ids) - 1 for o in outputs)
    drafts = after.spec_num_drafts - before.spec_num_drafts
    proposed = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    return {
        "decode_tokens_per_s": decoded / (last - first) if last > first else 0.0,
        "generated_tokens": sum(len(o.token_ids) for o in outputs),
        "draft_tokens": proposed, "accepted_tokens": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "mean_accepted_length": 1 + accepted / drafts if drafts else 0.0,
        "texts": [o.text for o in outputs],
    }


def _add_speedups(results: list[dict]) -> None:
    off = {(r["workload"], r["streams"]): r["decode_tokens_per_s"] for r in results if r["config"] == "off"}
    for r in results:
        base = off.get((r["workload"], r["streams"]))
        r["speedup"] = r["decode_tokens_per_s"] / base if base else None


def _print_table(results: list[dict]) -> None:
    header = ("config", "workload", "streams", "decode tok/s", "speedup", "accept rate", "mean accepted", "same")
    rows = [(r["config"], r["workload"], str(r["streams"]), f"{r['decode_tokens_per_s']:.1f}",
             f"{r['speedup']:.2f}x" if r["speedup"] else "-", f"{r['acceptance_rate']:.2f}",
             f"{r['mean_accepted_length']:.2f}", "yes" if r["same_output"] else "NO") for r in results]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def _host() -> dict:
    from quill.hardware import host_description

    return {**host_description(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


if __name__ == "__main__":
    sys.exit(main())

"""How soon a burst of long prompts gets its first tokens, for several engine step sizes, with the
engine alone (no HTTP, no client on the same cores): what `--max-num-batched-tokens` changes.

    python benchmarks/prefill_queue.py --budgets 512 1024 2048

N prompts of ~520 tokens (consecutive slices of the held-out corpus, so no prefix is shared and
the prefix cache cannot help) arrive together, then each decodes --max-tokens greedily with EOS
ignored. Per budget: the median and last time to first token, aggregate output tokens/s, and the
number of engine steps. Each budget loads the model afresh and warms it up on a short prompt.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from quill import LLM  # noqa: E402
from quill.hardware import cpu_summary, host_description  # noqa: E402
from quill.optimize.evaluate import corpus_path  # noqa: E402
from quill.sampling_params import SamplingParams  # noqa: E402

PROMPT_TOKENS = 520


def run(model: str, budget: int, num_prompts: int, max_tokens: int) -> dict:
    llm = LLM(model, max_num_batched_tokens=budget)
    try:
        corpus = llm.tokenizer.encode(corpus_path("heldout").read_text())
        prompts = [corpus[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS] for i in range(num_prompts)]
        llm.generate([corpus[-64:]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        engine, params = llm.engine, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        started = time.perf_counter()
        for prompt in prompts:
            engine.add_request(prompt, params)
        finished, steps = [], 0
        while engine.has_unfinished():
            finished += [output for output in engine.step() if output.finished]
            steps += 1
        wall = time.perf_counter() - started
    finally:
        llm.close()
    ttfts = sorted(output.metrics.ttft for output in finished)  # the engine's own timestamps, from arrival
    return {"budget": budget, "ttft_p50": statistics.median(ttfts), "ttft_max": ttfts[-1],
            "output_tokens_per_second": num_prompts * max_tokens / wall, "steps": steps, "ttfts": ttfts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048],
                        help="--max-num-batched-tokens values to compare (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts arriving together (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens each (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}")
    results = [run(args.model, budget, args.prompts, args.max_tokens) for budget in args.budgets]
    print(f"{'budget':>7} {'TTFT p50 s':>11} {'TTFT max s':>11} {'tok/s':>7} {'steps':>6}")
    for r in results:
        print(f"{r['budget']:>7} {r['ttft_p50']:>11.2f} {r['ttft_max']:>11.2f} "
              f"{r['output_tokens_per_second']:>7.0f} {r['steps']:>6}")
    if args.json:
        args.json.write_text(json.dumps({"host": host_description(), "model": args.model, "prompts": args.prompts,
                                         "prompt_tokens": PROMPT_TOKENS, "max_tokens": args.max_tokens,
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

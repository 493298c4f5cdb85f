"""Tensor parallelism against one process: single-stream prefill and decode speed of the same model
split over N processes (`--tensor-parallel-size`), on this machine's CPUs or GPUs.

    python benchmarks/tensor_parallel.py --model MODEL --sizes 1 2

The size must divide the model's attention heads, KV heads and MLP width: SmolLM2-135M (9 heads, 3
KV heads) splits 3 ways, not 2 (hence the default sizes), and Gemma 3 270M (1 KV head) not at all.

Each size loads the model afresh (N ranks share the machine's cores: each takes 1/N of them), does
one untimed warm-up run, then `--repeats` timed runs of one request: a prompt of --prompt-tokens
token ids, then --decode-tokens greedy tokens. Prefill rate is prompt tokens / time to first token;
decode rate is (tokens - 1) / (end - first token). The table shows the best run of each size (all
runs go to --json). On a 2-core CPU two ranks mainly prove correctness: each gets one core, and
every layer adds two all-reduces.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="known model name, .gguf file or HF directory")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 3],
                        help="tensor-parallel sizes (default: 1 3, which SmolLM2 splits into)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every run here")
    args = parser.parse_args()

    from quill import LLM, SamplingParams
    from quill.hardware import host_description

    results = []
    for size in args.sizes:
        # No prefix caching: every run repeats the prompt, which must be computed each time.
        llm = LLM(args.model, dtype=args.dtype, device=args.device, tensor_parallel_size=size,
                  max_model_len=args.prompt_tokens + args.decode_tokens, enable_prefix_caching=False)
        try:
            vocab = llm.config.vocab_size
            prompt = [(17 * i + 5) % (vocab - 10) + 5 for i in range(args.prompt_tokens)]
            params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
            _timed_run(llm, prompt, params)  # warm-up
            runs = [_timed_run(llm, prompt, params) for _ in range(args.repeats)]
        finally:
            llm.close()
        results.append({"tensor_parallel_size": size, "device": str(llm.device), "runs": runs})
        print(f"size {size}: done", file=sys.stderr, flush=True)
    _print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "dtype": args.dtype, "host": host_description(),
                                         "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                                         "results": results}, indent=2) + "\n")
    return 0


def _timed_run(llm, prompt: list[int], params) -> dict:
    started = time.perf_counter()
    first = None
    tokens = 0
    for output in llm.stream(prompt, params):
        if first is None:
            first = time.perf_counter()
        tokens = len(output.token_ids)
    end = time.perf_counter()
    return {"prefill_tok_s": len(prompt) / (first - started),
            "decode_tok_s": (tokens - 1) / (end - first) if tokens > 1 and end > first else None}


def _print_table(results: list[dict]) -> None:
    print(f"{'TP size':>8} {'device':>8} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for result in results:
        best_prefill = max(r["prefill_tok_s"] for r in result["runs"])
        decodes = [r["decode_tok_s"] for r in result["runs"] if r["decode_tok_s"] is not None]
        decode = f"{max(decodes):13.1f}" if decodes else f"{'n/a':>13}"
        print(f"{result['tensor_parallel_size']:>8} {result['device']:>8} {best_prefill:14.1f} {decode}")


if __name__ == "__main__":
    raise SystemExit(main())

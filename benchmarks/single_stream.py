"""Single-stream speed: prefill of a 512-token prompt, decode of 128 tokens, and peak memory.

Quill and llama.cpp (through llama-cpp-python, which may live in another virtual environment: pass
`--peer-python`) run the same GGUF file on the same prompt token ids. Every measurement runs in its
own subprocess, one after another (never concurrently: the machines have 2 cores), so that each peak
RSS belongs to one engine and one model alone.

    python benchmarks/single_stream.py --models smollm2 gemma3 --peer-python /tmp/peer/venv/bin/python

Engines: `quill` (the defaults: on the CPU, 4-bit weights times 8-bit activations, as llama.cpp
computes them), `quill-bf16` (`--no-int8-activations`: bfloat16 activations) and `llama.cpp`.

Prefill rate is prompt tokens / time to first token; decode rate is (tokens - 1) / (end - first token).
Each engine first does one untimed warm-up run of the same shape; the table shows the best of
`--repeats` timed runs, the one least disturbed by other work on the machine (all runs go to --json).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ["quill", "quill-bf16", "llama.cpp"]
PROMPT_TOKENS = 512
DECODE_TOKENS = 128
# Any text longer than PROMPT_TOKENS tokens in both vocabularies; it is tokenized once and truncated.
PROMPT_TEXT = " ".join(
    f"Chapter {i}. The river town woke before dawn: bakers lit their ovens, ferrymen checked the ropes, "
    f"and the clock tower rang {i} times while gulls argued over the harbour. Merchants unrolled maps "
    f"of distant coasts, children raced along the quay, and an old engineer explained to anyone who "
    f"would listen how the lock gates balanced {i * 7} tonnes of water with a single lever."
    for i in range(1, 16)
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"],
                        help="known model names or .gguf paths (default: %(default)s)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=["quill", "quill-bf16", "llama.cpp"])
    parser.add_argument("--peer-python", default=sys.executable,
                        help="interpreter that can `import llama_cpp` (default: this one)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine and model (best shown)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="Quill's compute dtype (default: %(default)s)")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    engines = [e for e in args.engines if e != "llama.cpp" or _peer_available(args.peer_python)]
    results, failed = [], False
    for model in args.models:
        path = _resolve(model)
        prompt_ids = None  # the first engine tokenizes; the others reuse its ids
        for engine in engines:
            python = args.peer_python if engine == "llama.cpp" else sys.executable
            print(f"[{model}] {engine} ...", file=sys.stderr, flush=True)
            result = _run_worker(python, engine, path, prompt_ids, args)
            if result is None:
                failed = True
                continue
            prompt_ids = result.pop("prompt_ids")
            results.append({"model": model, "engine": engine, **result})
    _print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"host": _host(), "prompt_tokens": PROMPT_TOKENS,
                                         "decode_tokens": DECODE_TOKENS, "repeats": args.repeats,
                                         "quill_dtype": args.dtype, "results": results}, indent=2) + "\n")
    return 1 if failed else 0


def _resolve(model: str) -> Path:
    if model.endswith(".gguf"):
        return Path(model)
    from quill.weights.hub import resolve_model  # pulls on first use

    return resolve_model(model)


def _peer_available(python: str) -> bool:
    found = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not found:
        print(f"llama.cpp peer skipped: {python} cannot import llama_cpp (see --peer-python)", file=sys.stderr)
    return found


def _run_worker(python: str, engine: str, path: Path, prompt_ids: list[int] | None,
                args: argparse.Namespace) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        command = [python, __file__, "--worker", engine, "--model-path", str(path), "--repeats", str(args.repeats),
                   "--dtype", args.dtype, "--result", f"{tmp}/result.json"]
        if prompt_ids is not None:
            Path(tmp, "prompt.json").write_text(json.dumps(prompt_ids))
            command += ["--prompt-ids", f"{tmp}/prompt.json"]
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(f"{engine} on {path.name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            return None
        return json.loads(Path(tmp, "result.json").read_text())


def _worker(args: argparse.Namespace) -> int:
    prompt_ids = json.loads(args.prompt_ids.read_text()) if args.prompt_ids else None
    started = time.perf_counter()
    if args.worker.startswith("quill"):
        prompt_ids, run_once = _quill(args.model_path, prompt_ids, args.dtype, None if args.worker == "quill" else False)
    else:
        prompt_ids, run_once = _llama_cpp(args.model_path, prompt_ids)
    load_seconds = time.perf_counter() - started
    if len(prompt_ids) != PROMPT_TOKENS:
        raise SystemExit(f"prompt has {len(prompt_ids)} tokens, expected {PROMPT_TOKENS}")
    run_once()  # warm-up: same shape, not timed
    runs = [run_once() for _ in range(args.repeats)]
    args.result.write_text(json.dumps({
        "prefill_tokens_per_s": max(PROMPT_TOKENS / r["ttft"] for r in runs),
        "decode_tokens_per_s": max((r["tokens"] - 1) / (r["e2e"] - r["ttft"]) for r in runs),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_s": load_seconds,
        "runs": runs,
        "prompt_ids": prompt_ids,
    }))
    return 0


def _quill(path: str, prompt_ids: list[int] | None, dtype: str, int8_activations: bool | None):
    from quill import LLM, SamplingParams

    # Every run repeats the same prompt: without this, runs after the first would skip prefill.
    llm = LLM(path, dtype=dtype, enable_prefix_caching=False, int8_activations=int8_activations)
    prompt_ids = prompt_ids or llm.tokenizer.encode(PROMPT_TEXT)[:PROMPT_TOKENS]
    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)

    def run_once() -> dict:
        *_, final = llm.stream(prompt_ids, params)
        metrics = final.metrics  # the engine's own timestamps, from arrival of the request
        return {"ttft": metrics.ttft, "e2e": metrics.e2e_latency, "tokens": final.num_completion_tokens}

    return prompt_ids, run_once


def _llama_cpp(path: str, prompt_ids: list[int] | None):
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=2048, n_batch=PROMPT_TOKENS, n_threads=2, n_threads_batch=2, verbose=False)
    prompt_ids = prompt_ids or llm.tokenize(PROMPT_TEXT.encode())[:PROMPT_TOKENS]

    def run_once() -> dict:
        llm.reset()  # forget the previous run's tokens; eval() then clears their KV entries
        start = time.perf_counter()
        llm.eval(prompt_ids)
        token = llm.sample(temp=0.0)  # greedy, like Quill's run
        first = time.perf_counter()
        # Feed each sampled token back without checking for end-of-sequence (Quill's ignore_eos).
        for _ in range(DECODE_TOKENS - 1):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        return {"ttft": first - start, "e2e": time.perf_counter() - start, "tokens": DECODE_TOKENS}

    return prompt_ids, run_once


def _print_table(results: list[dict]) -> None:
    header = ("model", "engine", "prefill tok/s", "decode tok/s", "peak RSS MB", "load s")
    rows = [(r["model"], r["engine"], f"{r['prefill_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s']:.1f}",
             f"{r['peak_rss_mb']:.0f}", f"{r['load_s']:.1f}") for r in results]
    by_key = {(r["model"], r["engine"]): r for r in results}
    for model in dict.fromkeys(r["model"] for r in results):
        peer = by_key.get((model, "llama.cpp"))
        for engine in ("quill", "quill-bf16"):
            ours = by_key.get((model, engine))
            if ours and peer:
                rows.append((model, f"{engine}/llama.cpp",
                             *(f"{ours[key] / peer[key]:.2f}x" for key in
                               ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb", "load_s"))))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def _host() -> dict:
    from quill.hardware import host_description

    return host_description()


if __name__ == "__main__":
    sys.exit(main())

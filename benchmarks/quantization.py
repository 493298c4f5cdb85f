"""Quality, speed and memory of one model across quantized variants, in one table.

Variants of SmolLM2 (its packaged Q4_1 GGUF is the only copy there is):
- the Q4_1 file run natively (with 8-bit activations, the CPU's default, and with bfloat16 ones,
  `int8_activations=False`), and dequantized to float32 and to bfloat16 (`LLM(dequantize=True)`);
- the "float model": the Q4_1 weights dequantized and written as an F16 GGUF (`write_gguf`);
- what `quill quantize` makes of the float model: int8, int4 (group 32), q8_0, q4_0, q4_1.

Columns: file size; resident memory added by loading (RSS after load minus before, each variant
in its own subprocess, with a fixed 64 MiB KV cache); prefill rate of a 512-token prompt and
single-stream greedy decode rate (best of --repeats, as benchmarks/single_stream.py measures them);
perplexity on Quill's held-out corpus; greedy agreement with the float model run in float32 (the
reference); and, with --llama-cpp-python, llama.cpp's decode rate on the same file (GGML types only),
and with --llama-cpp-perplexity its perplexity too, on the same tokens in the same windows (about
three minutes a file on 2 cores).

    python benchmarks/quantization.py --llama-cpp-python /tmp/peer/venv/bin/python

Variants run one after another (the machines have 2 cores); the quantized files are made once into
--work-dir and reused. Results go to benchmarks/results/quantization.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from single_stream import DECODE_TOKENS, PROMPT_TEXT, PROMPT_TOKENS, _host, _peer_available

REPO = Path(__file__).resolve().parent.parent
KV_CACHE_MEMORY = 64 << 20
QUANTIZED = {"int8": [], "int4 g32": ["--group-size", "32"], "q8_0": [], "q4_0": [], "q4_1": []}


@dataclass(frozen=True)
class Variant:
    name: str
    file: str  # key into the files made by _make_files
    dtype: str = "bfloat16"
    dequantize: bool = False
    ggml: bool = True  # llama.cpp can run the file (and its decode goes in the row)
    int8_activations: bool | None = None  # None: the engine's default

    def options(self) -> list[str]:
        return (["--dtype", self.dtype] + (["--dequantize"] if self.dequantize else [])
                + ([] if self.int8_activations is None else
                   ["--int8-activations" if self.int8_activations else "--no-int8-activations"]))


REFERENCE = Variant("float (F16 file) fp32", "float", dtype="float32")
VARIANTS = [
    Variant("Q4_1 native", "source"),
    Variant("Q4_1 native, bf16 activations", "source", ggml=False, int8_activations=False),  # llama.cpp: row above
    Variant("Q4_1 dequantized fp32", "source", dtype="float32", dequantize=True),
    Variant("Q4_1 dequantized bf16", "source", dequantize=True),
    REFERENCE,
    Variant("float (F16 file) bf16", "float"),
    *(Variant(f"quantized {name}", name, ggml=not name.startswith("int")) for name in QUANTIZED),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="known model name or a quantized .gguf (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "quill-quantization",
                        help="where the float and quantized files are made (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", metavar="NAME", help="run only these rows (names as in the table)")
    parser.add_argument("--eval-tokens", type=int, help="score only the first N corpus tokens (default: all)")
    parser.add_argument("--window", type=int, default=512, help="perplexity window (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generation runs per variant (best shown)")
    parser.add_argument("--llama-cpp-python", metavar="PYTHON", help="interpreter that can `import llama_cpp`")
    parser.add_argument("--llama-cpp-perplexity", action="store_true",
                        help="also score the corpus with llama.cpp on each file it runs (needs --llama-cpp-python)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "quantization.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--dequantize", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--int8-activations", action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)
    parser.add_argument("--reference-scores", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    files = _make_files(args.model, args.work_dir)
    variants = [v for v in VARIANTS if not args.variants or v.name in args.variants or v == REFERENCE]
    variants.sort(key=lambda v: v != REFERENCE)  # the reference's greedy tokens are needed first
    peer = args.llama_cpp_python if args.llama_cpp_python and _peer_available(args.llama_cpp_python) else None
    reference_scores = args.work_dir / "reference_scores.pt"
    reference_scores.unlink(missing_ok=True)  # from an earlier run, perhaps over other tokens
    rows, prompt_ids = [], None
    for variant in variants:
        print(f"[{variant.name}] ...", file=sys.stderr, flush=True)
        row = {"variant": variant.name, "file": files[variant.file].name,
               "file_mb": files[variant.file].stat().st_size / 2**20,
               **_run_quill(variant, files[variant.file], reference_scores, args)}
        prompt_ids, eval_ids = row.pop("prompt_ids"), row.pop("eval_ids")
        if peer and variant.ggml and not variant.dequantize and variant.dtype == "bfloat16":
            row["llama_cpp_decode_tokens_per_s"] = _run_llama_cpp(peer, files[variant.file], prompt_ids, args.repeats)
            if args.llama_cpp_perplexity:
                row["llama_cpp_perplexity"] = _llama_cpp_perplexity(peer, files[variant.file], eval_ids, args.window)
        rows.append(row)
    _print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "host": _host(), "model": args.model, "prompt_tokens": PROMPT_TOKENS, "decode_tokens": DECODE_TOKENS,
        "repeats": args.repeats, "eval_tokens": args.eval_tokens, "window": args.window,
        "kv_cache_memory": KV_CACHE_MEMORY, "reference": REFERENCE.name, "results": rows}, indent=2) + "\n")
    return 0


def _make_files(model: str, work_dir: Path) -> dict[str, Path]:
    """The source GGUF, its float version, and each `quill quantize` output (made once, then reused)."""
    from quill.weights.hub import resolve_model

    work_dir.mkdir(parents=True, exist_ok=True)
    files = {"source": resolve_model(model), "float": work_dir / "float-f16.gguf"}
    if not files["float"].exists():
        _python(["-c", _FLOAT_SCRIPT, str(files["source"]), str(files["float"])])
    for name, options in QUANTIZED.items():
        files[name] = work_dir / f"{name.replace(' ', '-')}.gguf"
        if not files[name].exists():
            _python(["-m", "quill.cli", "quantize", str(files["float"]), "-o", str(files[name]),
                     "--type", name.split()[0], "-q", *options])
    return files


_FLOAT_SCRIPT = """
import sys
from quill.models.loader import load_checkpoint
from quill.models.registry import FAMILIES
from quill.weights.gguf_export import write_gguf
source, out = sys.argv[1:]
checkpoint = load_checkpoint(source)  # dequantized to float32
tokenizer = {k: v for k, v in checkpoint.metadata.items() if k.startswith("tokenizer.")}
write_gguf(out, FAMILIES.named(checkpoint.config.architecture), checkpoint.config, checkpoint.tensors, tokenizer,
           dtype="f16")
"""


def _python(arguments: list[str]) -> None:
    subprocess.run([sys.executable, *arguments], check=True, cwd=REPO)


def _run_quill(variant: Variant, path: Path, reference_scores: Path, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp, "result.json")
        command = [sys.executable, __file__, "--worker", "--model-path", str(path), *variant.options(), "--repeats", str(args.repeats),
                   "--window", str(args.window), "--reference-scores", str(reference_scores), "--result", str(result)]
        if args.eval_tokens:
            command += ["--eval-tokens", str(args.eval_tokens)]
        subprocess.run(command, check=True, cwd=REPO)
        return json.loads(result.read_text())


def _run_llama_cpp(python: str, path: Path, prompt_ids: list[int], repeats: int) -> float:
    """single_stream.py's llama.cpp worker on the same prompt ids."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "prompt.json").write_text(json.dumps(prompt_ids))
        subprocess.run([python, str(REPO / "benchmarks" / "single_stream.py"), "--worker", "llama.cpp",
                        "--model-path", str(path), "--repeats", str(repeats), "--prompt-ids", f"{tmp}/prompt.json",
                        "--result", f"{tmp}/result.json"], check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(tmp, "result.json").read_text())["decode_tokens_per_s"]


def _llama_cpp_perplexity(python: str, path: Path, token_ids: list[int], window: int) -> float:
    """llama.cpp's perplexity on `token_ids`, scored in the windows Quill's `score` uses."""
    from quill.optimize.evaluate import windows

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "job.json").write_text(json.dumps(
            {"tokens": token_ids, "window": window, "windows": list(windows(len(token_ids), window))}))
        done = subprocess.run([python, "-c", _LLAMA_CPP_PERPLEXITY_SCRIPT, str(path), f"{tmp}/job.json"], check=True,
                              capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])["perplexity"]


# Each window is one forward pass; logits_all keeps every position's logits, from which the scored
# tokens' negative log-likelihoods are summed in float64 (every token after the first, once).
_LLAMA_CPP_PERPLEXITY_SCRIPT = """
import json, math, os, sys
import numpy as np
from llama_cpp import Llama
path, job_file = sys.argv[1:]
job = json.load(open(job_file))
tokens = job["tokens"]
llm = Llama(path, n_ctx=job["window"], n_batch=job["window"], logits_all=True, n_threads=os.cpu_count(), verbose=False)
nll = 0.0
for start, end, first in job["windows"]:
    llm.reset()
    llm.eval(tokens[start:end])
    logits = np.asarray(llm.scores[first - start - 1:end - start - 1], dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    log_total = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    nll += float((log_total - logits[np.arange(len(logits)), tokens[first:end]]).sum())
print(json.dumps({"perplexity": math.exp(nll / (len(tokens) - 1))}))
"""


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _worker(args: argparse.Namespace) -> int:
    """One variant in a fresh process: load, time generation, then score the corpus."""
    import torch

    from quill import LLM, SamplingParams
    from quill.optimize.evaluate import Scores, corpus_path, score, tokenize_corpus

    before = _rss_mb()
    llm = LLM(args.model_path, dtype=args.dtype, dequantize=args.dequantize, kv_cache_memory=KV_CACHE_MEMORY,
              enable_prefix_caching=False, int8_activations=args.int8_activations)  # every run repeats the prompt; it must be prefilled each time
    loaded_rss = _rss_mb() - before
    prompt_ids = llm.tokenizer.encode(PROMPT_TEXT)[:PROMPT_TOKENS]
    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    runs = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        *_, final = llm.stream(prompt_ids, params)
        runs.append(final.metrics)
    runs = runs[1:]

    # Scoring rebinds the attention caches, so it comes after generation, on the engine's own network.
    tokens = tokenize_corpus(llm.tokenizer, corpus_path(), args.eval_tokens)
    started = time.perf_counter()
    scores = score(llm.engine.runner.model, llm.config, tokens, args.window, int8_activations=args.int8_activations)
    result = {"rss_mb": loaded_rss, "load_s": llm.load_seconds,
              "prefill_tokens_per_s": max(PROMPT_TOKENS / m.ttft for m in runs),
              "decode_tokens_per_s": max((DECODE_TOKENS - 1) / (m.e2e_latency - m.ttft) for m in runs),
              "tokens_scored": scores.tokens_scored, "perplexity": scores.perplexity, "mean_nll": scores.mean_nll,
              "eval_s": time.perf_counter() - started, "prompt_ids": prompt_ids,
              "eval_ids": tokens}
    if args.reference_scores.exists():
        result["greedy_agreement"] = scores.agreement(Scores(**torch.load(args.reference_scores)))
    else:  # this is the reference
        torch.save({"nll": scores.nll, "greedy": scores.greedy}, args.reference_scores)
        result["greedy_agreement"] = 1.0
    args.result.write_text(json.dumps(result))
    return 0


def _print_table(rows: list[dict]) -> None:
    reference = next(r for r in rows if r["variant"] == REFERENCE.name)
    header = ("variant", "file MB", "RSS MB", "prefill tok/s", "decode tok/s", "llama.cpp decode",
              "perplexity", "vs float", "greedy agree", "llama.cpp perplexity")
    table = [(r["variant"], f"{r['file_mb']:.0f}", f"{r['rss_mb']:.0f}", f"{r['prefill_tokens_per_s']:.0f}",
              f"{r['decode_tokens_per_s']:.1f}",
              f"{r['llama_cpp_decode_tokens_per_s']:.1f}" if "llama_cpp_decode_tokens_per_s" in r else "-",
              f"{r['perplexity']:.3f}", f"{r['perplexity'] / reference['perplexity'] - 1:+.2%}",
              f"{r['greedy_agreement']:.2%}",
              f"{r['llama_cpp_perplexity']:.3f}" if "llama_cpp_perplexity" in r else "-") for r in rows]
    widths = [max(len(row[i]) for row in (header, *table)) for i in range(len(header))]
    for row in (header, *table):
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"({reference['tokens_scored']:,} held-out tokens scored; reference: {REFERENCE.name})")


if __name__ == "__main__":
    sys.exit(main())

"""Pruning and distillation in one table: the teacher, its pruned copy and the pruned copy after
distillation, each as a float model and quantized.

    python -m quill.cli prune smollm2 -o /tmp/quill-compression/pruned --drop-layers 7 --mlp-keep 0.85
    python benchmarks/make_docstring_corpus.py -o /tmp/quill-compression/distill.txt --packages numpy networkx matplotlib
    python -m quill.cli distill --teacher smollm2 --student /tmp/quill-compression/pruned \\
        -o /tmp/quill-compression/distilled --data /tmp/quill-compression/distill.txt \\
        --ce-weight 0.5 --lr 3e-4 --max-tokens 1500000 --max-minutes 44
    python benchmarks/compression.py --pruned /tmp/quill-compression/pruned --distilled /tmp/quill-compression/distilled

Rows: the teacher's float model (its packaged GGUF dequantized and written as F16, as
benchmarks/quantization.py does; the reference), the pruned and the distilled directories, and
each of the three quantized by `quill quantize --type TYPE` (made once into --work-dir).
Columns: parameters; file size; resident memory added by loading (each row in its own process,
64 MiB KV cache); prefill rate of a 512-token prompt and single-stream greedy decode rate (best of
--repeats); perplexity on Quill's held-out corpus; mean KL divergence from the teacher float
model's next-token distribution to the row's, per scored token; greedy agreement with the teacher;
and the share of positions whose next token the row can produce at all (below 100% only with a
trimmed vocabulary, whose perplexity and KL are then over what it can produce; see `_worker`).

    python -m quill.cli prune gemma3 -o /tmp/quill-compression/gemma3-trimmed.gguf --trim-vocab 32768
    python benchmarks/compression.py --teacher gemma3 --pruned /tmp/quill-compression/gemma3-trimmed.gguf

The teacher runs in float32 as the reference for KL and agreement; every row computes in --dtype.
Results go to benchmarks/results/compression.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from quantization import _FLOAT_SCRIPT, KV_CACHE_MEMORY, _python, _rss_mb
from single_stream import DECODE_TOKENS, PROMPT_TEXT, PROMPT_TOKENS, _host

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="smollm2", help="known model name or .gguf (default: %(default)s)")
    parser.add_argument("--pruned", type=Path, help="`quill prune` output directory")
    parser.add_argument("--distilled", type=Path, help="`quill distill` output directory")
    parser.add_argument("--type", default="q4_0", help="`quill quantize --type` for the quantized rows (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "quill-compression")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--eval-tokens", type=int, help="score only the first N held-out tokens (default: all)")
    parser.add_argument("--window", type=int, default=512, help="perplexity window (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generation runs per row (best shown)")
    parser.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS, help="tokens generated per timed run")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "compression.json")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(json.loads(args.worker.read_text()))

    args.work_dir.mkdir(parents=True, exist_ok=True)
    teacher = _teacher_float(args.teacher, args.work_dir)
    models = [("teacher", teacher)] + [(name, path) for name, path in (("pruned", args.pruned),
                                                                       ("pruned + distilled", args.distilled)) if path]
    rows = []
    for name, path in models:
        for label, file in ((name, path), (f"{name} {args.type}", _quantized(path, args.type, args.work_dir, name))):
            print(f"[{label}] ...", file=sys.stderr, flush=True)
            rows.append({"variant": label, "path": str(file), **_run(file, teacher, args)})
    _print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"host": _host(), "teacher": args.teacher, "type": args.type, "dtype": args.dtype,
                                     "prompt_tokens": PROMPT_TOKENS, "decode_tokens": args.decode_tokens,
                                     "eval_tokens": args.eval_tokens, "window": args.window, "results": rows},
                                    indent=2) + "\n")
    return 0


def _teacher_float(teacher: str, work_dir: Path) -> Path:
    from quill.weights.hub import resolve_model

    source = resolve_model(teacher)
    if source.suffix != ".gguf" or not _is_quantized(source):
        return source
    float_file = work_dir / "teacher-f16.gguf"
    if not float_file.exists():
        _python(["-c", _FLOAT_SCRIPT, str(source), str(float_file)])
    return float_file


def _is_quantized(path: Path) -> bool:
    from quill.weights.gguf import read_gguf_tensor_types

    return any(t not in ("F32", "F16", "BF16") for t in read_gguf_tensor_types(path).values())


def _quantized(path: Path, qtype: str, work_dir: Path, name: str) -> Path:
    out = work_dir / f"{name.replace(' + ', '-')}-{qtype}.gguf"
    if not out.exists():
        _python(["-m", "quill.cli", "quantize", str(path), "-o", str(out), "--type", qtype, "-q"])
    return out


def _run(path: Path, teacher: Path, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job = {"path": str(path), "teacher": str(teacher), "dtype": args.dtype, "eval_tokens": args.eval_tokens,
               "window": args.window, "repeats": args.repeats, "decode_tokens": args.decode_tokens,
               "result": f"{tmp}/result.json"}
        Path(tmp, "job.json").write_text(json.dumps(job))
        subprocess.run([sys.executable, __file__, "--worker", f"{tmp}/job.json"], check=True, cwd=REPO)
        return json.loads(Path(job["result"]).read_text())


def _worker(job: dict) -> int:
    """One row in a fresh process: load, time generation, then score against the teacher."""
    import torch

    from quill import LLM, SamplingParams
    from quill.models.registry import FAMILIES
    from quill.optimize.evaluate import corpus_path, load_scoring_model, scoring_runner, tokenize_corpus, windows

    before = _rss_mb()
    llm = LLM(job["path"], dtype=job["dtype"], kv_cache_memory=KV_CACHE_MEMORY, enable_prefix_caching=False)
    loaded_rss = _rss_mb() - before
    prompt_ids = llm.tokenizer.encode(PROMPT_TEXT)[:PROMPT_TOKENS]
    params = SamplingParams(max_tokens=job["decode_tokens"], temperature=0.0, ignore_eos=True)
    runs = [list(llm.stream(prompt_ids, params))[-1].metrics for _ in range(job["repeats"] + 1)][1:]  # first: warm-up
    config = llm.config
    parameters = sum(torch.Size(s).numel() for s in FAMILIES.named(config.architecture).hf_shapes(config).values())

    tokens = tokenize_corpus(llm.tokenizer, corpus_path(), job["eval_tokens"])
    reference = load_scoring_model(job["teacher"], "float32")
    ours = scoring_runner(llm.engine.runner.model, config, min(job["window"], len(tokens)))
    theirs = scoring_runner(reference.model, reference.config, min(job["window"], len(tokens)))
    targets, nll, kl, agree, scored, covered = torch.tensor(tokens), 0.0, 0.0, 0, 0, 0
    # A trimmed output vocabulary cannot produce some tokens: perplexity is over the positions whose
    # next token it can produce (their share is the "covered" column), and KL is from the teacher's
    # distribution restricted to the kept tokens (renormalised). Untrimmed, both are the usual ones.
    kept = torch.zeros(config.vocab_size, dtype=torch.bool)
    kept[list(config.output_token_ids) or slice(None)] = True
    for start, end, first in windows(len(tokens), job["window"]):
        rows = slice(first - start - 1, end - start - 1)
        log_q = torch.log_softmax(ours.prompt_logits(tokens[start:end])[rows].float(), -1)
        teacher = theirs.prompt_logits(tokens[start:end])[rows].float()
        log_p = torch.log_softmax(teacher.masked_fill(~kept, float("-inf")), -1)
        target = targets[first:end]
        nll -= float(log_q.gather(1, target[:, None])[kept[target]].sum())
        kl += float((log_p.exp() * (log_p - log_q)).nan_to_num(nan=0.0).sum())  # 0 * -inf terms are 0
        agree += int((log_q.argmax(-1) == teacher.argmax(-1)).sum())
        scored += end - first
        covered += int(kept[target].sum())
    result = {"parameters": parameters, "file_mb": _size(Path(job["path"])) / 2**20, "rss_mb": loaded_rss,
              "prefill_tokens_per_s": max(PROMPT_TOKENS / m.ttft for m in runs),
              "decode_tokens_per_s": max((job["decode_tokens"] - 1) / (m.e2e_latency - m.ttft) for m in runs),
              "tokens_scored": scored, "covered": covered / scored, "perplexity": float(torch.tensor(nll / covered).exp()),
              "kl_to_teacher": kl / scored, "greedy_agreement": agree / scored}
    Path(job["result"]).write_text(json.dumps(result))
    return 0


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _print_table(rows: list[dict]) -> None:
    from quill.table import format_table

    print(format_table(["variant", "params (M)", "file MiB", "RSS MiB", "prefill tok/s", "decode tok/s", "perplexity",
                        "KL to teacher", "greedy agreement", "covered"],
                       [[r["variant"], f"{r['parameters'] / 1e6:.1f}", f"{r['file_mb']:.1f}", f"{r['rss_mb']:.0f}",
                         f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['perplexity']:.3f}",
                         f"{r['kl_to_teacher']:.4f}", f"{r['greedy_agreement']:.1%}", f"{r['covered']:.1%}"] for r in rows], numeric=True))


if __name__ == "__main__":
    sys.exit(main())

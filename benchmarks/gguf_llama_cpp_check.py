"""Do the GGUF files Quill writes run in llama.cpp as they run in Quill? (Not part of `make test`.)

Writes the matrix the tests write (tests/test_gguf_tokenizer.py): tiny random Llama, Qwen2 and Gemma 3
models, each with a trained byte-level BPE and a trained SentencePiece-style tokenizer, through
`quill quantize` to every type, plus models with RoPE scaling (linear, llama3) and Gemma 3
soft-capping and scaled global RoPE. Then every file is loaded in llama.cpp (llama-cpp-python, in its
own interpreter: --peer-python) and in Quill, and compared on:
- the model settings llama.cpp reports reading (its print_info log) against config.json;
- tokenization of --texts random strings (words, unicode, whitespace runs, digits, special token
  texts; special tokens parsed, BOS/EOS added as the file says);
- greedy tokens from the same prompt ids: Quill in float32 (quantized weights run natively) against
  llama.cpp. Random tiny models have near-ties, so a divergence is reported with Quill's margin
  between its top two tokens there (a margin near zero is a tie that arithmetic order decides).
int4/int8 files are Quill's own tensor format: llama.cpp is expected to refuse them.
`--files` checks given GGUF files instead (e.g. real models written by `quill quantize`).

    python benchmarks/gguf_llama_cpp_check.py --peer-python /work/peers/llama-cpp-python/bin/python
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PEER = Path("/work/peers/llama-cpp-python/bin/python")
PROMPTS = ["The quick brown fox jumps over", "def main(argv):\n    for index", "Café naïve 中文 😀 12345",
           # longer than Gemma's 8-token sliding window and the llama3-scaled model's 64 original positions
           "The quick brown fox jumps over the lazy dog. It's the dog's bone, isn't it? We'll see. " * 4]
STEPS = 16
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
QUILL_FORMATS = ("int8", "int4")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", default=str(DEFAULT_PEER) if DEFAULT_PEER.exists() else sys.executable,
                        help="interpreter that can `import llama_cpp` (default: %(default)s)")
    parser.add_argument("--files", nargs="+", type=Path, help="check these GGUF files instead of the tiny matrix")
    parser.add_argument("--types", nargs="+", help="quantize types for the matrix (default: all for the six model and "
                        "tokenizer pairs, f32 and q8_0 for the RoPE-scaling and soft-capping models)")
    parser.add_argument("--texts", type=int, default=500, help="random strings per file (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a job file: run llama.cpp on it
    args = parser.parse_args()
    if args.worker:
        return _llama_cpp_worker(args.worker)

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    with tempfile.TemporaryDirectory() as tmp:
        files = [(path.name, path, None) for path in args.files] if args.files else _write_matrix(Path(tmp), args.types)
        results = [_check(label, path, source, args) for label, path, source in files]
    _print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return 0 if all(r["verdict"].startswith(("ok", "refused as expected")) for r in results) else 1


def _variants() -> dict:
    """name -> (model builder, tokenizer writer, default types)."""
    import tiny_models
    from tokenizer_helpers import TOKENIZER_KINDS

    from quill.optimize import FLOAT_TYPES, QUANT_TYPES

    every, some = QUANT_TYPES + FLOAT_TYPES, ("f32", "q8_0")
    build = {arch: getattr(tiny_models, f"build_{arch}") for arch in TOKENIZER_KINDS}
    variants = {f"{arch}-{kind}": (lambda d, b=build[arch]: b(d, vocab_size=512), writer, every)
                for arch, kinds in TOKENIZER_KINDS.items() for kind, writer in kinds.items()}
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    for name, options in [("llama-rope-linear", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
                          ("llama-rope-llama3", {"rope_scaling": llama3}),
                          ("gemma3-softcap", {"softcap": True}),
                          ("gemma3-rope-linear", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}})]:
        arch = name.split("-")[0]
        variants[name] = (lambda d, b=build[arch], o=options: b(d, vocab_size=512, **o),
                          TOKENIZER_KINDS[arch]["bpe"], some)
    return variants


def _write_matrix(folder: Path, types: list[str] | None) -> list[tuple[str, Path, Path]]:
    """(label, GGUF file, the Hugging Face directory it was written from) for every variant and type."""
    from quill.optimize.quantize import quantize_checkpoint

    files = []
    for name, (build_model, write_tokenizer, default_types) in _variants().items():
        source = folder / name
        build_model(source)
        write_tokenizer(source)
        for qtype in types or default_types:
            path = folder / f"{name}-{qtype}.gguf"
            quantize_checkpoint(source, path, qtype, progress=False)
            files.append((path.stem, path, source))
    return files


def _check(label: str, path: Path, source: Path | None, args: argparse.Namespace) -> dict:
    from tokenizer_helpers import random_texts

    from quill.tokenizer import load_tokenizer
    from quill.weights.gguf import read_gguf_metadata

    metadata = read_gguf_metadata(path)
    specials = [token for token, kind in zip(metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"])
                if kind in (CONTROL, USER_DEFINED)]
    texts = random_texts(args.texts, seed=25, specials=specials)
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode(prompt) for prompt in PROMPTS]
    result = {"file": label, "pre": metadata.get("tokenizer.ggml.pre", metadata["tokenizer.ggml.model"])}
    peer = _run_peer(args.peer_python, path, texts, prompts)
    if "error" in peer:
        expected = any(label.endswith(f"-{qtype}") for qtype in QUILL_FORMATS) or "quill.quantization.type" in metadata
        result["verdict"] = "refused as expected (Quill's own int4/int8 tensors)" if expected else "FAILED to load"
        result["error"] = peer["error"]
        return result
    result["settings"] = _compare_settings(peer["settings"], tokenizer, source)
    ours = [tokenizer.encode(text) for text in texts]
    mismatches = [(text, mine, theirs) for text, mine, theirs in zip(texts, ours, peer["tokens"]) if mine != theirs]
    result["tokenization"] = f"{len(texts) - len(mismatches)}/{len(texts)}"
    result["mismatches"] = [{"text": t, "quill": a, "llama.cpp": b} for t, a, b in mismatches[:5]]
    result["greedy"] = [_compare_greedy(path, prompt, theirs) for prompt, theirs in zip(prompts, peer["greedy"])]
    exact = not mismatches and not result["settings"] and all(g["same"] for g in result["greedy"])
    ties = all(g["same"] or g["quill_margin"] < 0.05 for g in result["greedy"])
    result["verdict"] = ("ok" if exact else "ok (greedy differs only at near-ties)"
                         if not mismatches and not result["settings"] and ties else "DIFFERS")
    return result


def _compare_settings(settings: dict[str, list[str]], tokenizer, source: Path | None) -> list[str]:
    """What llama.cpp reports reading (print_info) that differs from config.json and Quill's tokenizer."""
    expected: dict[str, object] = {"EOG token": sorted(tokenizer.eos_token_ids)}
    if tokenizer.bos_token_id is not None:
        expected["BOS token"] = [tokenizer.bos_token_id]
    if source is not None:
        config = json.loads((source / "config.json").read_text())
        rope = config["rope_parameters"].get("full_attention", config["rope_parameters"])
        expected.update({
            "n_ctx_train": config["max_position_embeddings"], "n_embd": config["hidden_size"],
            "n_layer": config["num_hidden_layers"], "n_head": config["num_attention_heads"],
            "n_head_kv": config["num_key_value_heads"], "n_ff": config["intermediate_size"],
            "n_embd_head_k": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
            "f_norm_rms_eps": config["rms_norm_eps"], "freq_base_train": rope["rope_theta"],
            "freq_scale_train": 1 / rope["factor"] if rope.get("rope_type") == "linear" else 1.0,
            "n_swa": (config.get("sliding_window") or 0) if config["model_type"] == "gemma3_text" else 0,
        })
    differences = []
    for key, want in expected.items():
        values = settings.get(key, [])
        got = sorted(int(v.split()[0]) for v in values) if isinstance(want, list) else values[0] if values else None
        same = got == want if isinstance(want, list) else got is not None and float(got) == want
        if not same:
            differences.append(f"{key}: llama.cpp {got}, expected {want}")
    return differences


def _compare_greedy(path: Path, prompt: list[int], theirs: list[int]) -> dict:
    from quill import SamplingParams

    llm = _quill_model(path)
    output = llm.generate(prompt, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, logprobs=2))[0]
    ours = output.token_ids
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    compared = {"same": first is None, "agree": STEPS if first is None else first, "quill": ours, "llama.cpp": theirs}
    if first is not None:
        top = output.logprobs[first].top
        compared["quill_margin"] = top[0][1] - top[1][1]
    return compared


_models: dict[Path, object] = {}


def _quill_model(path: Path):
    from quill import LLM

    if path not in _models:
        _models.clear()  # one model in memory at a time
        _models[path] = LLM(path, dtype="float32")
    return _models[path]


def _run_peer(python: str, path: Path, texts: list[str], prompts: list[list[int]]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp, "job.json")
        job.write_text(json.dumps({"path": str(path), "texts": texts, "prompts": prompts, "steps": STEPS}))
        done = subprocess.run([python, __file__, "--worker", str(job)], capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
        result = json.loads(Path(tmp, "result.json").read_text())
        # llama.cpp logs the settings it read as "print_info: name = value" (some names repeat: EOG token).
        result["settings"] = {}
        for line in done.stderr.splitlines():
            if line.startswith("print_info: ") and " = " in line:
                name, value = line.removeprefix("print_info: ").split(" = ", 1)
                result["settings"].setdefault(name.strip(), []).append(value.strip())
        return result


def _llama_cpp_worker(job_path: Path) -> int:
    """Runs in the peer's interpreter: tokenize every text and decode greedily from every prompt."""
    import numpy as np
    from llama_cpp import Llama

    job = json.loads(job_path.read_text())
    # verbose: llama.cpp logs the settings it read (print_info), which the parent compares.
    llm = Llama(job["path"], n_ctx=256, n_threads=2, n_threads_batch=2, logits_all=True, verbose=True)
    tokens = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) for text in job["texts"]]
    greedy = []
    for prompt in job["prompts"]:
        llm.reset()
        llm.eval(prompt)
        generated = []
        for _ in range(job["steps"]):
            generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(generated[-1:])
        greedy.append(generated)
    job_path.with_name("result.json").write_text(json.dumps({"tokens": tokens, "greedy": greedy}))
    return 0


def _print_table(results: list[dict]) -> None:
    sys.path.insert(0, str(ROOT))
    from quill.table import format_table

    rows = []
    for r in results:
        greedy = r.get("greedy") or []
        agree = " ".join(f"{g['agree']}/{STEPS}" + ("" if g["same"] else f" (margin {g['quill_margin']:.3f})")
                         for g in greedy)
        settings = "-" if "settings" not in r else "same" if not r["settings"] else f"{len(r['settings'])} differ"
        rows.append([r["file"], r["pre"], settings, r.get("tokenization", "-"), agree or "-", r["verdict"]])
    print(format_table(["file", "tokenizer", "settings", "tokenization same", "greedy tokens same (per prompt)",
                        "verdict"], rows))
    for r in results:
        for difference in r.get("settings", []):
            print(f"{r['file']}: {difference}")
        for m in r.get("mismatches", []):
            print(f"{r['file']}: {m['text']!r}\n  quill     {m['quill']}\n  llama.cpp {m['llama.cpp']}")
        if "error" in r:
            print(f"{r['file']}: llama.cpp: {r['error']}")


if __name__ == "__main__":
    sys.exit(main())

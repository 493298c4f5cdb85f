"""GPU check: Quill on CUDA against Quill on the CPU (correctness), then its speed on the GPU.

GPU machines here are lent for minutes and reach no network, and the real GGUF models are too big
to send along, so the check builds random-weight models of real shapes (transformers, saved as a
Hugging Face directory): identical shapes give identical speed, and random weights are as good as
trained ones for comparing two devices on the same inputs. Shapes: SmolLM2-135M (`smollm2`) and
Llama-3.2-1B (`llama1b`); formats: `bf16` (the float weights) and `int4` (the same weights through
`quill quantize --type int4`; on a GPU they are expanded to bfloat16 at load today, so int4 shows
the 4-bit weights' accuracy, not a 4-bit kernel's speed).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h100.json   # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --quick                            # dry run, anywhere

For every shape and format:
- logits at every position of a 256-token sequence as the engine's runner prefills it, on the
  device in float32 and bfloat16, against the CPU in float32 (errors and the tolerances they are
  held to, `TOLERANCES`);
- greedy tokens of 8 prompts, float32, device against CPU; bfloat16 batch invariance on the device;
- CUDA-graph decoding against the same padded steps run eagerly (`decode_graphs="eager"`): tokens
  and logprobs must be identical (on the CPU: the padded path against the plain one);
- speed in bfloat16: prefill of a 512-token prompt, decode with 1, 16 and 64 streams, with CUDA
  graphs and with `--enforce-eager`; weight bytes, so that the single-stream figure can be read
  against the memory-bandwidth ceiling (bytes per token / HBM bandwidth).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from quill.config import EngineConfig  # noqa: E402
from quill.engine.engine import Engine  # noqa: E402
from quill.models.loader import load_model  # noqa: E402
from quill.optimize.evaluate import scoring_runner  # noqa: E402
from quill.optimize.quantize import quantize_checkpoint  # noqa: E402
from quill.sampling_params import SamplingParams  # noqa: E402

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, num_hidden_layers=30, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True),
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                    num_key_value_heads=8, num_hidden_layers=16, max_position_embeddings=131072, rope_theta=500000.0,
                    tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8192}),
}
FORMATS = ("bf16", "int4")
# What the device's logits are held to against the CPU's float32 ones: float32 is the same maths
# (only summation order differs); bfloat16 rounds every activation to 8 significant bits.
TOLERANCES = {"float32": {"max_abs_error": 1e-3}, "bfloat16": {"mean_abs_error": 0.25, "argmax_agreement": 0.75}}
MAX_MODEL_LEN = 2048  # every run fits; bounds the KV cache and the widest block table


def build_random_model(directory: Path, shape: str, layers: int | None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    options = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    # A wider init than the default makes logits peaked enough for greedy tokens to be meaningful.
    config = LlamaConfig(initializer_range=0.08, **options)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def model_file(scratch: Path, shape: str, fmt: str, layers: int | None) -> Path:
    directory = scratch / shape
    if not directory.exists():
        build_random_model(directory, shape, layers)
    if fmt == "bf16":
        return directory
    path = scratch / f"{shape}-{fmt}.gguf"
    quantize_checkpoint(directory, path, fmt, with_tokenizer=False, progress=False)
    return path


def generate(engine: Engine, prompts: list[list[int]], max_tokens: int, logprobs: int | None = None
             ) -> tuple[list[list], float]:
    """Greedy tokens (with `logprobs`: (token, logprob) pairs) for every prompt, run as one batch;
    and the wall time it took."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=logprobs)
    order = {engine.add_request(prompt, params): i for i, prompt in enumerate(prompts)}
    results: dict[int, list] = {}
    started = time.perf_counter()
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                results[order[output.request_id]] = output.token_ids if logprobs is None else \
                    [(r.token_id, r.logprob) for r in output.logprobs]
    synchronize(engine.runner.device)
    return [results[i] for i in range(len(prompts))], time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_for(path: Path, dtype: str, device: str, *, dequantize: bool = False, **options) -> Engine:
    model, config = load_model(path, getattr(torch, dtype), device, dequantize=dequantize)
    return Engine(model, config, None, EngineConfig(dtype=dtype, device=device, max_model_len=MAX_MODEL_LEN,
                                                    **options))


def count_identical(a: list, b: list) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def check_logits(path: Path, device: str, sequence: list[int]) -> dict:
    reference_model, config = load_model(path, torch.float32, "cpu", dequantize=True)
    reference = scoring_runner(reference_model, config, len(sequence)).prompt_logits(sequence)
    del reference_model
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        model, _ = load_model(path, dtype, device, dequantize=True)  # on a GPU it is anyway
        logits = scoring_runner(model, config, len(sequence)).prompt_logits(sequence)
        error = (logits - reference).abs()
        figures = {"max_abs_error": error.max().item(), "mean_abs_error": error.mean().item(),
                   "reference_mean_abs": reference.abs().mean().item(),
                   "argmax_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()}
        tolerance = TOLERANCES[name]
        figures["tolerance"] = tolerance
        figures["within_tolerance"] = all(figures[k] >= v if k == "argmax_agreement" else figures[k] <= v
                                          for k, v in tolerance.items())
        result[f"logits_{name}"] = figures
        del model
    return result


def check_engine(path: Path, device: str, prompts: list[list[int]], max_tokens: int) -> dict:
    result = {}
    cpu_tokens, _ = generate(engine_for(path, "float32", "cpu", dequantize=True), prompts, max_tokens)
    device_tokens, _ = generate(engine_for(path, "float32", device, dequantize=True), prompts, max_tokens)
    result["greedy_float32_identical_sequences"] = count_identical(cpu_tokens, device_tokens)
    engine = engine_for(path, "bfloat16", device, enable_prefix_caching=False)  # the batch alone differs
    together, _ = generate(engine, prompts, max_tokens)
    alone = [generate(engine, [prompt], max_tokens)[0][0] for prompt in prompts]
    result["greedy_bfloat16_batch_invariant_sequences"] = count_identical(together, alone)
    # Graphs against the same padded steps run eagerly: the capture must change nothing. On a CPU,
    # where there are no graphs, the padded steps against the plain path.
    graphs = "auto" if device.startswith("cuda") else "eager"
    reference = "eager" if device.startswith("cuda") else "off"
    try:  # never run on a GPU before this script: a failed capture is a finding, not the end of the run
        replayed, _ = generate(engine_for(path, "bfloat16", device, decode_graphs=graphs), prompts, max_tokens, 1)
    except Exception as exc:  # noqa: BLE001
        result["decode_graphs_error"] = repr(exc)
        return result
    eager, _ = generate(engine_for(path, "bfloat16", device, decode_graphs=reference), prompts, max_tokens, 1)
    result["decode_graphs_vs"] = f"{graphs} vs {reference}"
    result["decode_graphs_identical_sequences"] = count_identical(replayed, eager)
    result["decode_graphs_max_logprob_difference"] = max(
        abs(a[1] - b[1]) for x, y in zip(replayed, eager) for a, b in zip(x, y))
    return result


def measure_speed(path: Path, device: str, *, streams: list[int], decode_tokens: int, prefill_tokens: int) -> dict:
    result = {}
    for mode in ("auto", "off"):  # CUDA graphs, then --enforce-eager
        try:
            result.update(_measure_mode(path, device, mode, streams, decode_tokens, prefill_tokens))
        except Exception as exc:  # noqa: BLE001 (see check_engine)
            result[f"error_{mode}"] = repr(exc)
    if device.startswith("cuda"):
        result["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def _measure_mode(path: Path, device: str, mode: str, streams: list[int], decode_tokens: int,
                  prefill_tokens: int) -> dict:
    """Speed with CUDA graphs ("auto") or without ("off")."""
    result = {}
    engine = engine_for(path, "bfloat16", device, max_num_seqs=max(streams), decode_graphs=mode,
                        max_num_batched_tokens=max(512, prefill_tokens))
    vocab = engine.model_config.vocab_size
    warm_up, prompt = ([(i * 7919 + offset) % vocab for i in range(prefill_tokens)] for offset in (1, 0))
    generate(engine, [warm_up], 4)  # kernels, allocator; another prompt, so the prefix cache cannot help
    for count in streams:  # capture every bucket's graph before timing
        generate(engine, [[(i * 13 + j) % vocab for j in range(16)] for i in range(count)], 4)
    label = "graphs" if mode == "auto" else "eager"
    if mode == "auto":
        _, seconds = generate(engine, [prompt], 1)
        result[f"prefill_{prefill_tokens}_tokens_per_s"] = prefill_tokens / seconds
    for count in streams:
        prompts = [[(i * 31 + j) % vocab for j in range(16)] for i in range(count)]
        _, seconds = generate(engine, prompts, decode_tokens + 1)
        result[f"decode_{count}_streams_{label}_tokens_per_s"] = count * decode_tokens / seconds
    if mode == "auto":
        result["graphs_captured"] = getattr(engine.runner.decode, "num_graphs", 0)
    return result


def weight_bytes(path: Path, device: str) -> int:
    """Bytes of weights a decode step reads on `device` (bfloat16 model, as measured)."""
    model, _ = load_model(path, torch.bfloat16, device)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return total


def check(shape: str, fmt: str, scratch: Path, args: argparse.Namespace) -> dict:
    path = model_file(scratch, shape, fmt, args.layers)
    vocab = min(SHAPES[shape]["vocab_size"], 4000)
    prompts = [[(i * 131 + j * 17) % vocab + 10 for j in range(8 + 5 * i)] for i in range(args.prompts)]
    started = time.perf_counter()
    report = {"model": f"random {shape} shapes, {args.layers or SHAPES[shape]['num_hidden_layers']} layers, {fmt}",
              "weight_bytes_bfloat16": weight_bytes(path, args.device),
              "correctness": {**check_logits(path, args.device, (prompts[0] * 64)[:args.logit_tokens]),
                              **check_engine(path, args.device, prompts, args.max_tokens)}}
    if not args.skip_speed:
        report["speed_bfloat16"] = measure_speed(path, args.device, streams=args.streams,
                                                 decode_tokens=args.decode_tokens, prefill_tokens=args.prefill_tokens)
    report["seconds"] = time.perf_counter() - started
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="smollm2,llama1b", help="comma-separated, of: " + ", ".join(SHAPES))
    parser.add_argument("--formats", default="bf16,int4", help="comma-separated, of: " + ", ".join(FORMATS))
    parser.add_argument("--layers", type=int, help="layers of the random models (default: the real model's)")
    parser.add_argument("--device", default="cuda", help="the device to check (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a dry run's settings: 1 layer, SmolLM2 shapes, 2 prompts, streams 1 and 2, 8 tokens")
    parser.add_argument("--skip-speed", action="store_true", help="correctness only")
    parser.add_argument("--out", type=Path, help="write the results here as JSON, after every model (a file of the "
                                                   "same device's earlier runs keeps their models)")
    args = parser.parse_args()
    args.prompts, args.max_tokens, args.logit_tokens = 8, 32, 256
    args.streams, args.decode_tokens, args.prefill_tokens = [1, 16, 64], 128, 512
    if args.quick:
        args.layers, args.shapes = args.layers or 1, "smollm2"
        args.prompts, args.max_tokens, args.logit_tokens = 2, 6, 32
        args.streams, args.decode_tokens, args.prefill_tokens = [1, 2], 8, 64
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch", file=sys.stderr)
        return 1
    cuda = args.device.startswith("cuda")
    report = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              "torch": torch.__version__, "models": {}}
    if args.out and args.out.exists():  # runs split across calls add to one file, per device
        earlier = json.loads(args.out.read_text())
        if earlier.get("device") == report["device"]:
            report["models"] = earlier.get("models", {})
    with tempfile.TemporaryDirectory() as scratch:
        for shape in args.shapes.split(","):
            for fmt in args.formats.split(","):
                report["models"][f"{shape}-{fmt}"] = check(shape, fmt, Path(scratch), args)
                print(json.dumps(report["models"][f"{shape}-{fmt}"], indent=2), flush=True)
                if args.out:  # a lent machine may go away mid-run: keep what is measured
                    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

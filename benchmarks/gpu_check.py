"""GPU check: Quill on CUDA against Quill on the CPU (correctness), then its speed on the GPU.

GPU machines here are lent for minutes and reach no network, and the real GGUF models are too big
to send along, so by default the check builds a random-weight model with SmolLM2-135M's shapes
(transformers, saved as a Hugging Face directory): identical shapes give identical speed, and
random weights are as good as trained ones for comparing two devices on the same inputs.

    python benchmarks/gpu_check.py --out results.json        # on a machine with a GPU
    python benchmarks/gpu_check.py --device cpu --layers 2   # a quick dry run of the script anywhere

Correctness: logits at every position of a 256-token sequence as the engine's runner prefills it
(CUDA float32 and bfloat16 against CPU float32), greedy tokens of a batch (CUDA against CPU), and whether greedy output on CUDA
depends on the batch. Speed (bfloat16): prefill of a 512-token prompt, single-stream decode, and
aggregate decode throughput with 16 and 64 concurrent sequences.
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
from quill.sampling_params import SamplingParams  # noqa: E402

SMOLLM2_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                      num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                      tie_word_embeddings=True)


def build_random_model(directory: Path, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # A wider init than the default makes logits peaked enough for greedy tokens to be meaningful.
    config = LlamaConfig(num_hidden_layers=layers, initializer_range=0.08, **SMOLLM2_SHAPES)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def generate(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy tokens for every prompt, run as one batch; and the wall time it took."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    order = {engine.add_request(prompt, params): i for i, prompt in enumerate(prompts)}
    results: dict[int, list[int]] = {}
    started = time.perf_counter()
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                results[order[output.request_id]] = output.token_ids
    return [results[i] for i in range(len(prompts))], time.perf_counter() - started


def engine_for(path: Path, dtype: str, device: str, **options) -> Engine:
    model, config = load_model(path, getattr(torch, dtype), device)
    return Engine(model, config, None, EngineConfig(dtype=dtype, device=device, **options))


def check_correctness(path: Path, device: str, prompts: list[list[int]]) -> dict:
    sequence = prompts[0] * 4
    reference_model, config = load_model(path, torch.float32, "cpu")
    reference = scoring_runner(reference_model, config, len(sequence)).prompt_logits(sequence)
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load_model(path, dtype, device)
        logits = scoring_runner(model, config, len(sequence)).prompt_logits(sequence)
        error = (logits - reference).abs()
        result[f"logits_{str(dtype).removeprefix('torch.')}"] = {
            "max_abs_error": error.max().item(), "mean_abs_error": error.mean().item(),
            "reference_mean_abs": reference.abs().mean().item(),
            "argmax_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        }
        del model
    cpu_tokens, _ = generate(engine_for(path, "float32", "cpu"), prompts, 32)
    gpu_tokens, _ = generate(engine_for(path, "float32", device), prompts, 32)
    result["greedy_float32_identical_sequences"] = f"{sum(a == b for a, b in zip(cpu_tokens, gpu_tokens))}/{len(prompts)}"
    engine = engine_for(path, "bfloat16", device, enable_prefix_caching=False)  # the batch alone differs
    together, _ = generate(engine, prompts, 32)
    alone = [generate(engine, [prompt], 32)[0][0] for prompt in prompts]
    result["greedy_bfloat16_batch_invariant_sequences"] = f"{sum(a == b for a, b in zip(together, alone))}/{len(prompts)}"
    return result


def measure_speed(path: Path, device: str) -> dict:
    engine = engine_for(path, "bfloat16", device, max_num_seqs=64)
    vocab = engine.model_config.vocab_size
    warm_up, prompt = ([(i * 7919 + offset) % vocab for i in range(512)] for offset in (1, 0))
    generate(engine, [warm_up], 4)  # kernels, allocator; another prompt, so the prefix cache cannot help
    result = {}
    _, seconds = generate(engine, [prompt], 1)
    result["prefill_512_tokens_per_s"] = 512 / seconds
    _, seconds = generate(engine, [prompt[:16]], 257)
    result["single_stream_decode_tokens_per_s"] = 256 / seconds
    for streams in (16, 64):
        prompts = [[(i * 31 + j) % vocab for j in range(16)] for i in range(streams)]
        _, seconds = generate(engine, prompts, 128)
        result[f"decode_{streams}_streams_tokens_per_s"] = streams * 128 / seconds
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a model Quill loads (default: random weights, SmolLM2's shapes)")
    parser.add_argument("--layers", type=int, default=30, help="layers of the random model (default: %(default)s)")
    parser.add_argument("--device", default="cuda", help="the device to check (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU visible to PyTorch", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        path = args.model or build_random_model(Path(scratch), args.layers)
        prompts = [[(i * 131 + j * 17) % 4000 + 10 for j in range(8 + 5 * i)] for i in range(8)]
        report = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
            "torch": torch.__version__, "model": str(args.model or f"random SmolLM2 shapes, {args.layers} layers"),
            "correctness": check_correctness(path, args.device, prompts),
            "speed_bfloat16": measure_speed(path, args.device),
        }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

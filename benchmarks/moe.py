"""Decode speed of a mixture-of-experts model against a dense model of the same active size.

The MoE model has Qwen3-30B-A3B's layer shapes (hidden 2048, 32 query and 4 key/value heads of
128, 128 experts of 768, 8 per token) with random weights, in --layers layers instead of 48 so
that it fits and runs on a 2-core machine in a couple of minutes. The dense model is Qwen3 with
the same attention and one MLP as wide as the experts a token uses (8 x 768 = 6,144): per token
both read the same number of weights, which is what bounds decoding on a CPU. The vocabulary is
cut in proportion (8,192 by default), so that the LM head weighs on both as it does in the full
48-layer model (about a tenth of the active weights).

Each model runs in bfloat16, and in int4 (group 32) as `quill quantize --type int4` would store it
(embeddings and the router stay float), single-stream and with --streams concurrent sequences:
decode tokens/s after every sequence's first token. A decode step of one sequence touches 8 of
a layer's 128 experts; a batch touches more, which is where MoE costs more than its active size.
The CPU model and its AMX and AVX-512 flags (`quill.hardware`) go into the JSON with the results.

    python benchmarks/moe.py                 # results -> benchmarks/results/moe.json
    python benchmarks/moe.py --quick         # a small check that the script runs (seconds)
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from quill.config import EngineConfig, ModelConfig  # noqa: E402
from quill.engine.engine import Engine  # noqa: E402
from quill.hardware import host_description  # noqa: E402
from quill.models.loader import build_model  # noqa: E402
from quill.models.registry import FAMILIES  # noqa: E402
from quill.optimize.quantize import quantize_int4  # noqa: E402
from quill.sampling_params import SamplingParams  # noqa: E402
from quill.table import format_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QWEN3_30B_A3B = dict(hidden_size=2048, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_token=8, moe_intermediate_size=768)
QUICK = dict(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, num_experts=16, num_experts_per_token=4,
             moe_intermediate_size=128)
PROMPT_TOKENS = 16
INT4_GROUP = 32
# Kept float by `quill quantize`: the vocabulary (read as a lookup table) and routers.
_FLOAT_MATRICES = ("model.embed_tokens.weight", "lm_head.weight", ".mlp.gate.weight")


def model_configs(shapes: dict, layers: int, vocab: int) -> dict[str, ModelConfig]:
    """The MoE model and the dense model of the same active size."""
    common = dict(vocab_size=vocab, hidden_size=shapes["hidden_size"], num_layers=layers, num_heads=shapes["num_heads"],
                  num_kv_heads=shapes["num_kv_heads"], head_dim=shapes["head_dim"], rms_norm_eps=1e-6,
                  max_position_embeddings=4096, rope_theta=1e6)
    active_width = shapes["num_experts_per_token"] * shapes["moe_intermediate_size"]
    return {
        "qwen3moe": ModelConfig(architecture="qwen3moe", intermediate_size=active_width, norm_topk_prob=True,
                                num_experts=shapes["num_experts"], num_experts_per_token=shapes["num_experts_per_token"],
                                moe_intermediate_size=shapes["moe_intermediate_size"], **common),
        "qwen3 (dense)": ModelConfig(architecture="qwen3", intermediate_size=active_width, **common),
    }


def random_tensors(config: ModelConfig, weights: str, seed: int = 0) -> dict:
    """Random checkpoint tensors (Hugging Face names) in bf16; with weights="int4", every matrix but
    the float ones as `quill quantize --type int4` would quantize it."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in FAMILIES.named(config.architecture).hf_shapes(config).items():
        if len(shape) == 1:  # norms: near one, as trained ones are
            tensors[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
            continue
        values = torch.randn(shape, generator=generator).mul_(0.02)
        if weights == "int4" and not name.endswith(_FLOAT_MATRICES):
            tensors[name] = quantize_int4(values.numpy(), INT4_GROUP)
        else:
            tensors[name] = values.to(torch.bfloat16)
    return tensors


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) weights; experts count once per chosen expert for the active."""
    total = active = 0
    for name, shape in FAMILIES.named(config.architecture).hf_shapes(config).items():
        size = torch.Size(shape).numel()
        total += size
        if ".experts." not in name or ".experts.0." in name:  # one expert's share, times the chosen ones
            active += size * (config.num_experts_per_token if ".experts." in name else 1)
    return total, active


def decode_rate(engine: Engine, streams: int, max_tokens: int, vocab: int, seed: int) -> float:
    """Aggregate decode tokens/s of `streams` greedy sequences, counted from the step by which every
    sequence has its first token (prefill done) to the last."""
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for _ in range(streams):
        engine.add_request(torch.randint(0, vocab, (PROMPT_TOKENS,), generator=generator).tolist(), params)
    generated: dict[str, int] = {}
    started = baseline = None
    while engine.has_unfinished():
        for output in engine.step():
            generated[output.request_id] = len(output.token_ids)
        if started is None and len(generated) == streams and min(generated.values()) >= 1:
            started, baseline = time.perf_counter(), sum(generated.values())
    return (sum(generated.values()) - baseline) / (time.perf_counter() - started)


def measure(label: str, config: ModelConfig, weights: str, streams: list[int], max_tokens: int,
            repeats: int) -> list[dict]:
    model = build_model(config, random_tensors(config, weights), torch.bfloat16)
    engine = Engine(model, config, None, EngineConfig(dtype="bfloat16", kv_cache_memory=64 << 20,
                                                      max_num_seqs=max(streams), max_model_len=1024))
    decode_rate(engine, 1, 4, config.vocab_size, seed=99)  # warm-up: kernel builds, first-call costs
    total, active = parameter_counts(config)
    rows = []
    for count in streams:
        rate = max(decode_rate(engine, count, max_tokens, config.vocab_size, seed=r) for r in range(repeats))
        rows.append({"model": label, "weights": weights, "streams": count,
                     "decode_tokens_per_second": rate, "total_parameters": total, "active_parameters": active})
    del engine, model
    gc.collect()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of both models (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default: %(default)s)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8], help="concurrent sequences (default: 1 8)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row, best shown (default: %(default)s)")
    parser.add_argument("--weights", nargs="+", choices=["bf16", "int4"], default=["bf16", "int4"])
    parser.add_argument("--quick", action="store_true", help="small shapes and few tokens: checks that it runs")
    parser.add_argument("--json", type=Path, help="where results go (default: benchmarks/results/moe.json, "
                                                 "or a temporary file with --quick)")
    args = parser.parse_args()
    shapes = QUICK if args.quick else QWEN3_30B_A3B
    if args.quick:
        args.layers, args.vocab, args.tokens, args.repeats, args.streams = 1, 1024, 6, 1, [1, 2]
    out = args.json or (Path(tempfile.gettempdir()) / "moe-quick.json" if args.quick
                        else REPO / "benchmarks" / "results" / "moe.json")
    host = host_description() | {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    print(host["summary"])
    results = []
    for label, config in model_configs(shapes, args.layers, args.vocab).items():
        for weights in args.weights:
            results += measure(label, config, weights, args.streams, args.tokens, args.repeats)
    print(format_table(
        ["model", "weights", "streams", "decode tok/s", "active params", "total params"],
        [[r["model"], r["weights"], str(r["streams"]), f"{r['decode_tokens_per_second']:.1f}",
          f"{r['active_parameters'] / 1e6:.0f}M", f"{r['total_parameters'] / 1e6:.0f}M"] for r in results],
        numeric=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": host, "shapes": shapes, "layers": args.layers, "vocab": args.vocab,
                               "prompt_tokens": PROMPT_TOKENS, "tokens": args.tokens, "results": results}, indent=2))
    print(f"results -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

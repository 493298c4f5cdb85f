"""What several `quill` commands share: the model options, sizes on the command line, and loading
the model.

The engine (and torch with it) is imported only by the commands that run a model, inside
`load_llm`, which tests replace with a fake (commands call it as `common.load_llm`, so one
replacement reaches them all).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quill.config import KV_CACHE_DTYPES, EngineConfig
from quill.errors import ChatTemplateError
from quill.weights import hub

MODEL_HELP = (
    f"a known model name ({', '.join(hub.KNOWN_MODELS)}; pulled on first use), "
    "a model in the cache directory, a .gguf file, or a Hugging Face directory"
)
CACHE_HELP = "the cache directory is $QUILL_HOME/models, and QUILL_HOME defaults to ~/.cache/quill"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_SIZE_UNITS = {"": 1, "b": 1, "kib": 2**10, "kb": 10**3, "mib": 2**20, "mb": 10**6, "gib": 2**30, "gb": 10**9}


def byte_size(text: str) -> int:
    """'512MiB', '2GiB', '1.5GB' or a plain number of bytes."""
    number = text.rstrip("KMGiBkmgib")
    unit = text[len(number):].lower()
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 2GiB)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def model_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("model", help=MODEL_HELP)
    options.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                         help="compute precision (default: %(default)s)")
    options.add_argument("--device", default="auto", metavar="DEVICE",
                         help="cpu, cuda, cuda:N, or auto: the first CUDA GPU when there is one (default: %(default)s)")
    options.add_argument("--dequantize", action="store_true",
                         help="expand quantized GGUF weights to --dtype at load instead of running Q4_0/Q4_1/Q4_K "
                              "and int4/int8 weights natively (more memory, slower decoding; the reference path)")
    options.add_argument("--int8-activations", action=argparse.BooleanOptionalAction,
                         help="multiply 4-bit weights by activations quantized to 8 bits per block of 32, as "
                              "llama.cpp does: integer dot products, 1.2-3.5x faster 4-bit matrix products than "
                              "bfloat16 activations, which are a little more exact (README: Quantization). "
                              "Default: on for --dtype bfloat16 on a CPU with AVX-512 VNNI or AVX2")
    options.add_argument("--max-model-len", type=int, metavar="N",
                         help="context length limit (default: the model's own)")
    options.add_argument("--kv-cache-memory", type=byte_size, metavar="SIZE",
                         help="memory for the paged KV cache, e.g. 512MiB or 2GiB; never exceeded: a context window "
                              "longer than it holds is shortened, with a warning (default: 1GiB, or less when 64 "
                              "full-length sequences need less)")
    options.add_argument("--max-num-seqs", type=positive_int, default=EngineConfig.max_num_seqs, metavar="N",
                         help="the most sequences decoding together in one step (default: %(default)s)")
    options.add_argument("--max-num-batched-tokens", type=positive_int, default=EngineConfig.max_num_batched_tokens,
                         metavar="N",
                         help="tokens per engine step: running decodes first, then prompt chunks in the room "
                              "left; a step that carries a chunk delays every stream's next token by the chunk's "
                              "time, and on a CPU larger steps do not finish prompts sooner (README: Limits) "
                              "(default: %(default)s)")
    options.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                         help="what the KV cache stores keys and values in (default: auto, float16 on a CPU for a "
                              "bfloat16 model, which halves the bytes decoding reads per token; otherwise --dtype)")
    options.add_argument("--chat-template", metavar="FILE",
                         help="Jinja2 chat template to use instead of the model's own")
    options.add_argument("--speculative", metavar="ngram|MODEL",
                         help="speculative decoding: 'ngram' (prompt lookup) or a draft model sharing the "
                              "model's tokenizer; output is unchanged, only faster (default: off)")
    options.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                         help="the most draft tokens per sequence and step (default: %(default)s)")
    options.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                         help="split the model over N processes (gloo on CPUs, NCCL on GPUs), spawned here, or "
                              "started by torchrun for several machines (see README: Scaling out) (default: 1)")
    options.add_argument("--enforce-eager", action="store_true",
                         help="on a GPU, run decode steps eagerly instead of replaying them as CUDA graphs")
    return options


def read_chat_template(args: argparse.Namespace) -> str | None:
    """The --chat-template file's text, read before the (slow) model load so a typo fails fast."""
    if not args.chat_template:
        return None
    try:
        text = Path(args.chat_template).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ChatTemplateError(f"cannot read chat template {args.chat_template}: {exc}") from exc
    if not text.strip():  # not "no template": the model's own would answer instead, unasked
        raise ChatTemplateError(f"chat template {args.chat_template} is empty")
    from quill.tokenizer import check_chat_template

    try:
        return check_chat_template(text)
    except ChatTemplateError as exc:
        raise ChatTemplateError(f"chat template {args.chat_template}: {exc}") from None


def load_llm(args: argparse.Namespace):
    """Build the `LLM` for a command; tests replace this with a fake."""
    from quill import LLM  # torch loads here, so --help, pull and models stay quick

    if args.tensor_parallel_size > 1:
        _serve_as_worker_under_a_launcher(args)
    return LLM(args.model, **llm_options(args))


def llm_options(args: argparse.Namespace) -> dict:
    """The model options (`LLM` keyword arguments), here and in each replica of `serve --replicas`."""
    return dict(dtype=args.dtype, device=args.device, dequantize=args.dequantize, max_model_len=args.max_model_len,
                kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                int8_activations=args.int8_activations, speculative=args.speculative,
                num_speculative_tokens=args.num_speculative_tokens,
                decode_graphs="off" if args.enforce_eager else "auto",
                tensor_parallel_size=args.tensor_parallel_size)


def _serve_as_worker_under_a_launcher(args: argparse.Namespace) -> None:
    """Under torchrun (RANK set), every rank runs the same command; ranks past 0 hold their share
    of the model and run rank 0's steps, then exit here, never reaching the command itself."""
    import torch

    from quill.distributed import serve_as_worker
    from quill.llm import resolve_device
    from quill.weights.hub import resolve_model

    if serve_as_worker(resolve_model(args.model), args.tensor_parallel_size, getattr(torch, args.dtype),
                       resolve_device(args.device), dequantize=args.dequantize):
        raise SystemExit(0)


def dim(text: str) -> str:
    """`text` dimmed where stderr is a terminal (stats and notes beside an answer)."""
    return f"\033[2m{text}\033[0m" if sys.stderr.isatty() else text


def human_size(size: int) -> str:
    """A byte count in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


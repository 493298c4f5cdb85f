"""`quill quantize`, `quill eval`, `quill prune` and `quill distill`: make a model smaller or
cheaper, and measure what that cost (the work is in `quill.optimize`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quill.cli import common
from quill.errors import InvalidRequestError


def add_commands(commands) -> None:
    """Add `quantize`, `eval`, `prune` and `distill` to the `quill` subcommands."""
    _add_quantize_command(commands)
    _add_eval_command(commands)
    _add_prune_distill_commands(commands)


def _add_quantize_command(commands) -> None:
    from quill.optimize import EMBEDDING_TYPES, FLOAT_TYPES, QUANT_TYPES

    quantize = commands.add_parser(
        "quantize",
        help="quantize a float checkpoint into a smaller GGUF file",
        description="Weight-only quantization of a float checkpoint (a Hugging Face directory or an F32/F16/BF16 "
        "GGUF file) into a GGUF file. q8_0, q4_0 and q4_1 are GGML's standard block types (32 weights a block), "
        "which llama.cpp loads too; int8 (one scale per output row) and int4 (a scale and offset per group of "
        "--group-size columns) are Quill's own format, run by its C kernels (PyTorch's where no C compiler is "
        "found). f32, f16 and bf16 "
        "convert without quantizing. Norms and biases stay F32. The file carries the source's tokenizer and chat "
        "template (a Hugging Face tokenizer.json is converted as llama.cpp's converter does), so Quill and "
        "llama.cpp run it by itself; a tokenizer GGUF cannot describe is an error.",
    )
    quantize.add_argument("source", metavar="SRC", help="float checkpoint: a Hugging Face directory or a .gguf file")
    quantize.add_argument("-o", "--output", required=True, metavar="OUT", help="the GGUF file to write")
    quantize.add_argument("--type", required=True, choices=QUANT_TYPES + FLOAT_TYPES, dest="qtype",
                          help="quantization type of the weight matrices")
    quantize.add_argument("--group-size", type=int, metavar="N",
                          help="int4 only: input columns sharing a scale and offset, 32/64/128/256 (default: 32); "
                               "a matrix whose width N does not divide is stored as Q8_0")
    quantize.add_argument("--embeddings", choices=EMBEDDING_TYPES,
                          help="type of the token embedding and an untied LM head; 'same' uses --type "
                               "(default: q8_0 with q8_0/q4_0/q4_1, f16 with int8/int4, same with float types)")
    quantize.add_argument("--allow-requantize", action="store_true",
                          help="accept an already-quantized GGUF source (its rounding errors add up with the new ones)")
    quantize.add_argument("--no-tokenizer", action="store_true",
                          help="write the file without a tokenizer (then neither Quill nor llama.cpp can run it "
                               "by itself), e.g. when the source's tokenizer cannot be converted")
    quantize.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    quantize.set_defaults(func=_cmd_quantize)


def _add_eval_command(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="measure perplexity, and greedy agreement with a reference model",
        description="Perplexity of MODEL over a text corpus (by default the held-out split of the English corpus "
        "shipped with Quill), scored in windows of --window tokens that overlap by half, so that every token after "
        "the first is predicted once with at least half a window of context. With --reference, also the greedy "
        "agreement: the fraction of positions where both models' most likely next token is the same (for a "
        "quantized model, against the float model it came from). Both models must share a tokenizer.",
    )
    evaluate.add_argument("model", help=common.MODEL_HELP)
    evaluate.add_argument("--reference", metavar="MODEL", help="model to compare greedy next tokens with")
    evaluate.add_argument("--corpus", metavar="FILE", help="UTF-8 text file (default: Quill's held-out corpus)")
    evaluate.add_argument("--max-tokens", type=int, metavar="N", help="score only the corpus's first N tokens")
    evaluate.add_argument("--window", type=int, default=512, metavar="N",
                          help="tokens per forward pass (default: %(default)s)")
    evaluate.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                          help="compute precision of both models (default: %(default)s)")
    evaluate.add_argument("--dequantize", action="store_true",
                          help="expand MODEL's quantized weights to --dtype instead of running them natively")
    evaluate.add_argument("--int8-activations", action=argparse.BooleanOptionalAction,
                          help="multiply 4-bit weights by 8-bit activations (default: as quill serve; see its --help)")
    evaluate.set_defaults(func=_cmd_eval)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from quill.optimize.quantize import quantize_checkpoint
    from quill.optimize.gguf_tokenizer import TokenizerConversionError

    try:
        summary = quantize_checkpoint(args.source, args.output, args.qtype, group_size=args.group_size,
                                      embeddings=args.embeddings, allow_requantize=args.allow_requantize,
                                      with_tokenizer=not args.no_tokenizer, progress=not args.quiet)
    except TokenizerConversionError as exc:
        raise TokenizerConversionError(f"{exc}. Nothing was written; pass --no-tokenizer to write the file "
                                       "without a tokenizer") from exc
    print(f"wrote {summary.output}")
    change = f"{summary.ratio:.2f}x smaller" if summary.ratio >= 1 else f"{1 / summary.ratio:.2f}x larger"
    print(f"  size: {common.human_size(summary.source_bytes)} -> {common.human_size(summary.output_bytes)} ({change})")
    print("  tensors: " + ", ".join(f"{n} {kind}" for kind, n in summary.tensor_types.most_common()))
    for change, n in sorted(summary.fallbacks.items()):
        print(f"  {n} matrices {change}: their width is not a multiple of the group")
    for note in summary.tokenizer_notes:
        print(f"  note: {note}", file=sys.stderr)
    if not summary.has_tokenizer:
        print("  warning: no tokenizer in the file (--no-tokenizer): neither `quill run` nor llama.cpp can use "
              "it by itself", file=sys.stderr)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from quill.optimize.evaluate import corpus_path, load_scoring_model, score, tokenize_corpus

    if args.max_tokens is not None and args.max_tokens < 2:
        raise InvalidRequestError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    corpus = Path(args.corpus) if args.corpus else corpus_path()
    results = []  # (model, tokens, scores); one model in memory at a time
    for name, dequantize in [(args.model, args.dequantize)] + ([(args.reference, False)] if args.reference else []):
        scoring = load_scoring_model(name, args.dtype, dequantize)
        tokens = tokenize_corpus(scoring.tokenizer, corpus, args.max_tokens)
        if results and tokens != results[0][1]:
            raise InvalidRequestError(f"{args.model} and {args.reference} tokenize the corpus differently; "
                                      "greedy agreement needs a shared tokenizer")
        results.append((name, tokens, score(scoring.model, scoring.config, tokens, args.window, progress=True,
                                            int8_activations=args.int8_activations)))
        del scoring
    print(f"corpus: {corpus} ({len(results[0][1]):,} tokens, window {args.window})")
    for name, _, scores in results:
        print(f"{name}: perplexity {scores.perplexity:.4f} (mean NLL {scores.mean_nll:.4f} nats "
              f"over {scores.tokens_scored:,} tokens)")
    if args.reference:
        model_scores, reference_scores = results[0][2], results[1][2]
        print(f"greedy agreement with {args.reference}: {model_scores.agreement(reference_scores):.2%} "
              f"of {model_scores.tokens_scored:,} positions")
    return 0


def _add_prune_distill_commands(commands) -> None:
    prune = commands.add_parser(
        "prune", help="remove the least important channels, heads, layers or output tokens of a model",
        description="Structured pruning ranked by activations on a calibration text (default: the dev split of "
        "Quill's corpus): MLP channels, channels of the residual stream (the hidden size), query heads (the same "
        "number from each grouped-query group), whole layers (those whose absence costs the least loss), and the LM "
        "head's vocabulary (the tokens the text uses most, and "
        "the tokens generation needs; generation is then restricted to them, and only Quill loads the result). "
        "--sparsity and --two-four zero weights instead: quality baselines, no faster on a CPU. Writes a Hugging "
        "Face directory, or a float32 GGUF file when OUT ends in .gguf; both carry the tokenizer. Distil "
        "afterwards (`quill distill`) to recover quality.")
    prune.add_argument("model", help=common.MODEL_HELP)
    prune.add_argument("-o", "--output", required=True, metavar="OUT", help="directory, or a .gguf file")
    prune.add_argument("--mlp-keep", type=float, metavar="F", help="fraction of MLP channels kept per layer")
    prune.add_argument("--mlp-width", type=int, metavar="N", help="or the MLP width itself")
    prune.add_argument("--heads-keep", type=float, metavar="F", help="fraction of query heads kept per GQA group")
    prune.add_argument("--hidden-keep", type=float, metavar="F",
                       help="fraction of the residual stream's channels kept (the hidden size: embedding, norms and "
                       "every projection narrow together; not Gemma 3)")
    prune.add_argument("--hidden-width", type=int, metavar="N", help="or the hidden size itself")
    prune.add_argument("--drop-layers", type=int, default=0, metavar="N", help="layers removed (default: 0)")
    prune.add_argument("--layer-ranking", choices=["loss", "change"], default="loss",
                       help="which layers --drop-layers removes: loss = one at a time, the one whose absence raises "
                       "the next-token loss on the first 2,048 calibration tokens least (drop x layers candidates, "
                       "each run from the layer after it: the whole prune of 7 of SmolLM2's 30 took 2.4 minutes on "
                       "2 cores); "
                       "change = those whose output is most like their input (one pass, a worse choice) "
                       "(default: loss)")
    prune.add_argument("--trim-vocab", type=int, metavar="N", help="output tokens the LM head keeps")
    prune.add_argument("--multiple", type=int, default=32, metavar="N",
                       help="widths are multiples of N: 32 for Q8_0/Q4_0/Q4_1/int4, 256 for k-quants (default: 32)")
    prune.add_argument("--sparsity", type=float, metavar="F", help="baseline: zero this fraction of each weight row")
    prune.add_argument("--sparsity-method", choices=["wanda", "magnitude"], default="wanda",
                       help="how --sparsity/--two-four rank weights: |W| * input norm, or |W| (default: wanda)")
    prune.add_argument("--two-four", action="store_true", help="baseline: zero 2 of every 4 consecutive weights")
    prune.add_argument("--calibration", metavar="FILE", help="UTF-8 calibration text (default: the dev split)")
    prune.add_argument("--calibration-tokens", type=int, default=4096, metavar="N",
                       help="tokens of it to run (default: %(default)s)")
    prune.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    prune.set_defaults(func=_cmd_prune)

    distill = commands.add_parser(
        "distill", help="train a student model to imitate a teacher",
        description="Knowledge distillation: the student learns the teacher's next-token distributions (KL at "
        "--temperature over the teacher's top-k tokens, computed once and cached in OUT/checkpoint), optionally "
        "mixed with the next-token loss. AdamW, bfloat16 autocast over float32 weights, a cosine schedule; checkpoints in "
        "OUT/checkpoint (--resume continues them), the loss curve in OUT/loss.png. The student (usually a "
        "`quill prune`d teacher) must share the teacher's tokenizer; OUT is a Hugging Face directory that Quill "
        "runs, `quill quantize` converts and `--speculative` uses as a draft model. Needs transformers (quill[train]).")
    distill.add_argument("--teacher", required=True, metavar="MODEL", help=common.MODEL_HELP)
    distill.add_argument("--student", required=True, metavar="MODEL", help="the model to train (same tokenizer)")
    distill.add_argument("-o", "--output", required=True, metavar="OUT", help="directory for the trained student")
    distill.add_argument("--data", metavar="FILE", help="text or JSONL ('text' or 'prompt'+'completion') file "
                         "(default: the dev split of Quill's corpus)")
    distill.add_argument("--generate", type=int, default=0, metavar="N",
                         help="train on N continuations the teacher writes from prompts taken from the data")
    defaults = _distill_defaults()
    for flag, kind, text in (("temperature", float, "softmax temperature"), ("top-k", int, "teacher logits kept"),
                             ("ce-weight", float, "share of the next-token loss, 0..1"), ("lr", float, "peak rate"),
                             ("weight-decay", float, "AdamW weight decay"), ("batch-size", int, "sequences per batch"),
                             ("grad-accum", int, "batches per step"), ("seq-len", int, "tokens per sequence"),
                             ("epochs", int, "passes over the data"), ("max-tokens", int, "training tokens (overrides --epochs)"),
                             ("max-minutes", float, "stop training and save after this long (the teacher's pass "
                              "before it is not counted; the schedule does not shrink: size --max-tokens to fit)"),
                             ("seed", int, "random seed"),
                             ("checkpoint-every", int, "steps between checkpoints")):
        value = defaults[flag.replace("-", "_")]
        distill.add_argument(f"--{flag}", type=kind, default=value, metavar="X", help=f"{text} (default: {value})")
    distill.add_argument("--teacher-cache", metavar="FILE",
                         help="where the teacher's top-k logits are kept (default: OUT/checkpoint/teacher-topk."
                         "safetensors); students distilled from one teacher on the same text can share it, so the "
                         "teacher runs once; other text or another teacher recomputes and replaces it")
    distill.add_argument("--no-bf16", action="store_true", help="compute the forward pass in float32")
    distill.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
    distill.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    distill.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    distill.set_defaults(func=_cmd_distill)


def _distill_defaults() -> dict:
    from dataclasses import fields

    from quill.optimize.distill_options import DistillOptions

    return {f.name: f.default for f in fields(DistillOptions)}


def _cmd_prune(args: argparse.Namespace) -> int:
    from quill.optimize.prune import PruneOptions, prune_checkpoint

    options = PruneOptions(mlp_keep=args.mlp_keep, mlp_width=args.mlp_width, heads_keep=args.heads_keep,
                           hidden_keep=args.hidden_keep, hidden_width=args.hidden_width,
                           drop_layers=args.drop_layers, layer_ranking=args.layer_ranking, trim_vocab=args.trim_vocab,
                           multiple=args.multiple,
                           sparsity=args.sparsity, sparsity_method=args.sparsity_method, two_four=args.two_four,
                           calibration_tokens=args.calibration_tokens)
    summary = prune_checkpoint(args.model, args.output, options, calibration=args.calibration, progress=not args.quiet)
    c = summary.config
    print(f"wrote {summary.output}")
    print(f"  parameters: {summary.params_before:,} -> {summary.params_after:,} "
          f"({summary.params_after / summary.params_before:.1%})")
    print(f"  layers {c.num_layers}, hidden size {c.hidden_size}, query heads {c.num_heads} (kv {c.num_kv_heads}), "
          f"MLP width {c.intermediate_size}"
          + (f", output vocabulary {len(c.output_token_ids):,} of {c.vocab_size:,}" if c.output_token_ids else ""))
    if summary.zeroed:
        print(f"  {summary.zeroed:,} weights zeroed (a quality baseline: no faster without sparse kernels)")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from quill.optimize.distill import distill
    from quill.optimize.distill_options import DistillOptions

    names = _distill_defaults().keys() - {"bf16", "warmup", "teacher_dtype"}  # device: its own flag above
    options = DistillOptions(bf16=not args.no_bf16, **{name: getattr(args, name) for name in names})
    summary = distill(args.teacher, args.student, args.output, options, data=args.data, generate=args.generate,
                      cache=args.teacher_cache, resume=args.resume, progress=not args.quiet)
    state = "stopped early (--max-minutes)" if summary.stopped_early else "done"
    print(f"wrote {summary.output}: {summary.steps}/{summary.total_steps} steps, {summary.tokens:,} tokens, {state}")
    if summary.losses:
        print(f"  loss {summary.losses[0]:.4f} -> {summary.losses[-1]:.4f} (curve: {summary.output / 'loss.png'})")
    return 0


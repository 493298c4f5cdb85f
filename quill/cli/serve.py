"""`quill serve`: the OpenAI-compatible server, in this process or on Ray Serve replicas."""
from __future__ import annotations

import argparse

from quill.cli import common
from quill.cost import DEFAULT_HOURLY_COST, load_price_file
from quill.errors import InvalidRequestError, QuillError
from quill.server.config import ServerConfig  # plain settings: FastAPI and the engine load with `serve`


def add_commands(commands) -> None:
    """Add `serve` to the `quill` subcommands."""
    serve = commands.add_parser(
        "serve",
        parents=[common.model_options()],
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over HTTP with the OpenAI API (/v1/chat/completions, /v1/completions, "
        "/v1/responses, /v1/models) plus /v1/usage, /tokenize, /detokenize, /health, /version and /metrics, and a "
        "chat page at / (--no-ui "
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
    limits.add_argument("--max-body-bytes", type=common.byte_size, default=ServerConfig.max_body_bytes, metavar="SIZE",
                        help="largest request body, e.g. 4MiB; larger ones get 413 (default: 4MiB)")
    limits.add_argument("--stream-idle-timeout", type=float, default=ServerConfig.stream_idle_timeout,
                        metavar="SECONDS", help="abort a stream (and free its KV cache) when its client has accepted "
                                                "no data for this long; 0: never (default: %(default)s)")
    limits.add_argument("--stream-buffer", type=common.byte_size, default=ServerConfig.stream_buffer_bytes, metavar="SIZE",
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
    cache.add_argument("--response-cache-memory", type=common.byte_size, default=64 << 20, metavar="SIZE",
                       help="memory for answers; least recently used ones go first (default: 64MiB)")
    cache.add_argument("--response-cache-entries", type=int, default=1024, metavar="N",
                       help="most answers kept in memory (default: %(default)s)")
    _add_replica_arguments(serve)
    serve.set_defaults(func=_cmd_serve)


def _add_replica_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "replicas", "Serve the model from several engine replicas behind one endpoint, on Ray Serve "
        "(pip install 'quill[cluster]'). Requests sharing a prompt prefix go to the same replica while it "
        "is not overloaded, so its prefix cache keeps paying.")
    group.add_argument("--replicas", type=common.positive_int, metavar="N",
                       help="engine replicas to run (default: one process, no Ray)")
    group.add_argument("--threads-per-replica", type=common.positive_int, metavar="N",
                       help="torch threads (and Ray CPUs) per replica; replicas x threads should not exceed the "
                            "cores (default: 1)")
    group.add_argument("--stream-interval", type=common.positive_int, metavar="N",
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
    group.add_argument("--max-replicas", type=common.positive_int, metavar="N",
                       help="autoscale up to N replicas (instead of a fixed --replicas)")
    group.add_argument("--min-replicas", type=int, metavar="N", help="autoscaling: fewest replicas (default: 1)")
    group.add_argument("--target-ongoing-requests", type=float, metavar="N",
                       help="autoscaling: requests in flight per replica to aim for (default: 8)")


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
    if args.shutdown_grace < 0:
        raise InvalidRequestError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
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
    template = common.read_chat_template(args)
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
    if replicated(args):
        return _serve_replicas(args, config)
    # The engine runs on its own thread (AsyncEngine). If this thread also ran multi-threaded torch
    # ops (loading does), OpenMP keeps a second, idle thread pool, counts more threads than cores
    # and stops its workers from spin-waiting: the engine thread then decodes ~25% slower. Loading
    # single-threaded leaves the engine thread's pool the only one.
    import torch

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = common.load_llm(args)
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


_REPLICA_OPTIONS = ("threads_per_replica", "gpus_per_replica", "stream_interval", "ray_address", "routing",
                    "min_replicas", "target_ongoing_requests")


def replicated(args: argparse.Namespace) -> bool:
    """Whether `serve` runs replicas; replica options without --replicas or --max-replicas are refused."""
    if args.replicas is not None or args.max_replicas is not None:
        return True
    given = [f"--{name.replace('_', '-')}" for name in _REPLICA_OPTIONS if getattr(args, name) is not None]
    if given:
        autoscaling_only = {"--min-replicas", "--target-ongoing-requests"}.issuperset(given)
        raise InvalidRequestError(f"{', '.join(given)} only apply to replicas: add "
                                  + ("--max-replicas N (they set how replicas autoscale)" if autoscaling_only
                                     else "--replicas N (or --max-replicas N)"))
    return False


def _serve_replicas(args: argparse.Namespace, config) -> int:
    """`serve --replicas N`: the model on N engine replicas behind one ingress, on Ray Serve."""
    settings = cluster_settings(args, config)
    try:
        from quill.deploy.launch import serve_cluster
    except ImportError as exc:
        raise QuillError(f"--replicas needs Ray Serve ({exc}): pip install 'quill[cluster]'") from None
    serve_cluster(settings, host=args.host, port=args.port, ray_address=args.ray_address)
    return 0


def cluster_settings(args: argparse.Namespace, config):
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
        return ClusterSettings(model=args.model, engine=common.llm_options(args), server=config, replicas=args.replicas or 1,
                               autoscaling=autoscaling, routing={"policy": args.routing or "prefix"}, **given)
    except ValidationError as exc:  # the first problem, in one line (pydantic's text adds a URL per error)
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequestError(f"invalid replica options: {where}: {first['msg']}") from None


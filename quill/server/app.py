"""The OpenAI-compatible HTTP server: FastAPI routes that translate HTTP to engine calls and back.

The server never runs the model: every request goes to the `AsyncEngine`, whose one thread owns
the engine, and comes back as a stream of `RequestOutput`s. What happens here is validation
(pydantic models in `protocol.py`, then `SamplingParams`), admission (queue limit, context
window), shaping outputs into OpenAI's JSON and server-sent events, and cleanup: a request whose
client goes away is aborted at once so its KV blocks are freed.

Build an app with `create_app(llm, ServerConfig(...))`; `serve()` runs it with uvicorn (what
`quill serve` does) and `BackgroundServer` runs it on a loopback port in a thread (tests).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from quill import __version__
from quill.engine.async_engine import AsyncEngine, EngineStepError
from quill.errors import ContextLengthError, InvalidRequestError, QuillError
from quill.sampling_params import SamplingParams
from quill.server import protocol
from quill.server.metrics import ServerMetrics, endpoint_label
from quill.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body,
)

log = logging.getLogger("quill.server")
request_log = logging.getLogger("quill.requests")

SYSTEM_FINGERPRINT = f"quill-{__version__}"
# Paths that stay open when an API key is set: probes and scrapers rarely carry keys.
OPEN_PATHS = frozenset({"/health", "/version", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# POST endpoints whose body is JSON whatever Content-Type the client sent (curl -d sends a form type).
JSON_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"})
# Bodies past the limit are read and dropped up to this many bytes before the 413, so the client
# can read the answer instead of a connection reset; beyond it the connection is just closed.
_DRAIN_LIMIT = 64 << 20
# Prompts longer than this (characters) are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 20_000
_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)


@dataclass
class ServerConfig:
    served_model_name: str | None = None  # default: the checkpoint's file or directory name
    api_key: str | None = None  # clients must send `Authorization: Bearer <key>` when set
    max_queue: int = 256  # sequences allowed to wait for their first token; more get 429
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    max_tokens_cap: int | None = None  # per-request max_tokens is clamped to this
    log_prompts: bool = False  # put prompt text into the request log
    chat_template: str | None = None  # Jinja2 source overriding the model's own template
    shutdown_grace: float = 10.0  # seconds in-flight requests get to finish at shutdown
    retry_after: int = 1  # seconds, sent with 429


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


# ---------------------------------------------------------------------------------- app


def create_app(model, config: ServerConfig | None = None) -> FastAPI:
    """`model`: an `LLM`, an `Engine` (with a tokenizer) or an `AsyncEngine`. The app owns (and shuts
    down) the `AsyncEngine` it creates for an `LLM` or `Engine`, not one it is given."""
    server = QuillServer(model, config or ServerConfig())
    app = FastAPI(
        title="Quill", version=__version__, lifespan=server.lifespan,
        description="OpenAI-compatible API of the Quill inference engine.",
    )
    app.state.server = server
    app.state.config = server.config  # read per request: tests may change it on a running app
    app.state.engine = server.engine
    app.add_middleware(_Gate, server=server)
    _add_exception_handlers(app, server)
    _add_routes(app, server)
    return app


def _add_exception_handlers(app: FastAPI, server: QuillServer) -> None:
    def respond(request: Request, error: APIError) -> JSONResponse:
        details = request.scope.get("quill")
        if details is not None:
            details.setdefault("error", error.message)
        return error.response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return respond(request, _validation_error(exc.errors()))

    @app.exception_handler(QuillError)
    async def quill_error(request: Request, exc: QuillError):
        return respond(request, _quill_error(exc, _prompt_param(request.url.path)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return respond(request, APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return respond(request, APIError(500, f"internal server error: {type(exc).__name__}", type="server_error"))


def _add_routes(app: FastAPI, server: QuillServer) -> None:
    errors = {code: {"model": protocol.ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}

    @app.post("/v1/chat/completions", responses={200: {"model": protocol.ChatCompletionResponse}, **errors})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.cancel_on_disconnect(request, server.chat(request, body))

    @app.post("/v1/completions", responses={200: {"model": protocol.CompletionResponse}, **errors})
    async def completions(body: CompletionRequest, request: Request):
        return await server.cancel_on_disconnect(request, server.completions(request, body))

    @app.get("/v1/models", response_model=protocol.ModelList)
    async def list_models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model:path}", response_model=protocol.ModelCard, responses={404: errors[404]})
    async def get_model(model: str):
        server.check_model(model)
        return server.model_card()

    @app.post("/tokenize", response_model=protocol.TokenizeResponse, responses=errors)
    async def tokenize(body: TokenizeRequest):
        return await server.tokenize(body)

    @app.post("/detokenize", response_model=protocol.DetokenizeResponse, responses=errors)
    async def detokenize(body: DetokenizeRequest):
        return server.detokenize(body)

    @app.get("/health", response_model=protocol.HealthResponse, responses={503: errors[503]})
    async def health():
        if server.shutting_down:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        if not server.engine_alive():
            raise APIError(503, "the engine thread has stopped", type="service_unavailable")
        return {"status": "ok"}

    @app.get("/version", response_model=protocol.VersionResponse)
    async def version():
        return {"version": __version__}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)


# ------------------------------------------------------------------------- middleware


class _Gate:
    """Pure ASGI middleware around every request: API key, body size limit, request id, the HTTP
    request counter and the one-line JSON request log."""

    def __init__(self, app, server: QuillServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config = self.server.config
        path, method = scope["path"], scope["method"]
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        details: dict[str, Any] = {}
        scope["quill"] = details
        scope["quill.request_id"] = request_id
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if config.api_key and path not in OPEN_PATHS and not self._authorized(scope, config.api_key):
                error = APIError(401, "Incorrect or missing API key. Send it as `Authorization: Bearer KEY`.",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                details["error"] = error.message
                return await error.response()(scope, receive, send_with_id)
            if method in ("POST", "PUT", "PATCH"):
                body, too_large = await self._read_body(scope, receive, config.max_body_bytes)
                if body is None:  # the client left while sending
                    status = 499
                    return
                if too_large:
                    error = APIError(413, f"The request body is larger than the limit of {config.max_body_bytes} bytes.",
                                     code="request_too_large")
                    details["error"] = error.message
                    return await error.response()(scope, receive, send_with_id)
                if path in JSON_PATHS:
                    _force_json_content_type(scope)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_id)
        finally:
            self.server.metrics.http_requests.labels(endpoint_label(path), str(status)).inc()
            if method == "POST" and path in JSON_PATHS:
                self._log(request_id, path, status, started, details)

    @staticmethod
    def _authorized(scope, api_key: str) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
        return False

    @staticmethod
    async def _read_body(scope, receive, limit: int) -> tuple[bytes | None, bool]:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > _DRAIN_LIMIT:
                    return b"", True  # too big to drain: answer now
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > _DRAIN_LIMIT:
                return b"", True
            if not message.get("more_body", False):
                break
        return (b"", True) if size > limit else (b"".join(chunks), False)

    def _log(self, request_id: str, path: str, status: int, started: float, details: dict) -> None:
        if not request_log.isEnabledFor(logging.INFO):
            return
        record = {"id": details.pop("response_id", request_id), "endpoint": path, "status": status}
        if not self.server.config.log_prompts:
            details.pop("prompt", None)
        record.update(details)
        record["duration"] = round(time.perf_counter() - started, 6)
        request_log.info(json.dumps(record, ensure_ascii=False, default=str))


def _force_json_content_type(scope) -> None:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    scope["headers"] = [*headers, (b"content-type", b"application/json")]


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body read by the gate, then the client's later events
    (the disconnect the routes watch for)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# ------------------------------------------------------------------------------ routes


@dataclass
class _Choice:
    index: int  # in the response: prompt_index * n + the engine's index
    prompt_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    metrics: Any = None  # the engine's RequestMetrics
    started: bool = False  # first token seen
    sent_role: bool = False
    last_output_time: float = 0.0
    text_offset: int = 0  # completions logprobs: characters of output before the next token


class QuillServer:
    def __init__(self, model, config: ServerConfig) -> None:
        self.config = config
        self.owns_engine = not isinstance(model, AsyncEngine)
        if isinstance(model, AsyncEngine):
            self.engine = model
        else:
            self.engine = AsyncEngine(getattr(model, "engine", model))
        core = self.engine.engine
        self.tokenizer = core.tokenizer
        self.max_model_len: int = core.max_model_len
        self.vocab_size: int = core.model_config.vocab_size
        self.kv_capacity_tokens: int = core.kv_cache.num_blocks * core.config.block_size
        self.default_chat_template: str | None = getattr(model, "chat_template", None)
        path = getattr(model, "path", None)
        self.model_name = config.served_model_name or (Path(path).stem if path else "quill")
        self.created = int(time.time())
        self.metrics = ServerMetrics(self.engine, self.model_name)
        self.token_text = _TokenText(self.tokenizer)
        self.waiting = 0  # sequences admitted that have not produced their first token
        self.active_tasks: set[asyncio.Task] = set()
        self.shutting_down = False

    # ---------------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        yield
        await self.shutdown()

    async def shutdown(self) -> None:
        """Refuse new requests, give in-flight ones the grace period, abort the rest, stop the engine.
        (Under uvicorn, `serve()` sets the same grace for open connections, so little is left here.)"""
        self.shutting_down = True
        deadline = time.monotonic() + self.config.shutdown_grace
        while self.active_tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.active_tasks):
            task.cancel()  # their cleanup aborts their engine requests
        await asyncio.sleep(0)
        if self.owns_engine:
            await asyncio.to_thread(self.engine.shutdown, 5.0)

    def engine_alive(self) -> bool:
        thread = getattr(self.engine, "_thread", None)
        return thread is None or thread.is_alive()

    async def cancel_on_disconnect(self, request: Request, handler: Awaitable):
        """Run a route; if the client disconnects first, cancel it (which aborts its engine requests).
        Streaming responses are watched by Starlette once they start; this covers the wait before."""
        task = asyncio.ensure_future(handler)
        self.active_tasks.add(task)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            watcher.cancel()
            raise
        finally:
            self.active_tasks.discard(task)
        if task in done:
            watcher.cancel()
            if task.cancelled():
                raise APIError(503, "the server is shutting down", type="service_unavailable")
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        request.scope["quill"]["client_disconnected"] = True
        return Response(status_code=499)  # nobody is listening; the status is for the log

    # --------------------------------------------------------------- validation
    def check_open(self) -> None:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", type="service_unavailable")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "quill",
                "max_model_len": self.max_model_len}

    def require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompts as token ids", param="prompt")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.require_tokenizer()
        return await _tokenize(len(text), self.tokenizer.encode, text, add_special_tokens)

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        self.require_tokenizer()
        template = self.config.chat_template or self.default_chat_template
        size = sum(len(m["content"]) for m in messages)
        return await _tokenize(size, self.tokenizer.encode_chat, messages, add_generation_prompt,
                               template)

    def sampling_params(self, body, prompts: list[list[int]], requested_max: int | None,
                        logprobs: int | None, prompt_param: str, logprobs_param: str) -> SamplingParams:
        """Turn the request's fields into `SamplingParams`, fitting max_tokens to the context window."""
        longest = max(len(p) for p in prompts)
        context = self.max_model_len
        where = "messages" if prompt_param == "messages" else "prompt"
        if longest >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, your {where} "
                                f"resulted in {longest} tokens. Please reduce the length of the {where}.",
                           param=prompt_param, code="context_length_exceeded")
        cap = self.config.max_tokens_cap
        derived = requested_max is None
        if derived:
            max_tokens = max(1, min(context, self.kv_capacity_tokens) - longest)
        else:
            max_tokens = requested_max
        if cap is not None:
            max_tokens = min(max_tokens, cap)
        if longest + max_tokens > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{longest + max_tokens} tokens ({longest} in the {where}, {max_tokens} in the "
                                f"completion). Please reduce the length of the {where} or completion.",
                           param=prompt_param, code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        top_k = body.top_k or 0
        min_tokens = body.min_tokens or 0
        if derived or cap is not None:
            min_tokens = min(min_tokens, max_tokens)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        fields = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            min_p=body.min_p or 0.0, seed=body.seed, stop=stop, stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=bool(body.ignore_eos), include_stop_str_in_output=bool(body.include_stop_str_in_output),
            skip_special_tokens=body.skip_special_tokens is not False, n=body.n, min_tokens=min_tokens,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=self._logit_bias(body.logit_bias), logprobs=logprobs,
        )
        try:
            return SamplingParams(**fields)
        except InvalidRequestError as exc:
            param = _param_of(str(exc)) or None
            if param == "logprobs":
                param = logprobs_param
            raise APIError(400, str(exc), param=param) from None

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        parsed = {}
        for key, value in (bias or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise APIError(400, f"Invalid key in 'logit_bias': {key!r} is not a token id", param="logit_bias") from None
            if not 0 <= token_id < self.vocab_size:
                raise APIError(400, f"Invalid key in 'logit_bias': token id {token_id} is not in [0, {self.vocab_size})",
                               param="logit_bias")
            if not -100.0 <= value <= 100.0:
                raise APIError(400, f"Invalid value in 'logit_bias' for token {token_id}: {value} is not in [-100, 100]",
                               param="logit_bias")
            parsed[token_id] = value
        return parsed

    def check_prompt_ids(self, prompts: list[list[int]], prompt_param: str) -> None:
        for ids in prompts:
            if not ids:
                raise APIError(400, f"The {prompt_param} is empty.", param=prompt_param)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"Invalid token id {bad} in '{prompt_param}': ids must be in [0, {self.vocab_size})",
                               param=prompt_param)

    def admit(self, num_sequences: int) -> None:
        """Back-pressure: refuse work when too many sequences already wait for their first token."""
        waiting = max(self.waiting, self.engine.stats().num_waiting)
        if waiting + num_sequences > self.config.max_queue:
            raise APIError(429, f"The server is busy ({waiting} requests waiting, the limit is "
                                f"{self.config.max_queue}). Please retry shortly.",
                           type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.config.retry_after)})

    # ----------------------------------------------------------- chat completions
    async def chat(self, request: Request, body: ChatCompletionRequest):
        details = request.scope["quill"]
        self.check_open()
        self.check_model(body.model)
        _check_stream_options(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = [_message_dict(m) for m in body.messages]
        details.update(model=self.model_name, stream=bool(body.stream), n=body.n, user=body.user, prompt=messages)
        prompt_ids = await self.encode_chat(messages, body.add_generation_prompt is not False)
        self.check_prompt_ids([prompt_ids], "messages")
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, [prompt_ids], requested, logprobs, "messages", "top_logprobs")
        response_id = f"chatcmpl-{request.scope['quill.request_id']}"
        details["response_id"] = response_id
        run = _Run(self, response_id, [prompt_ids], params, details)
        if body.stream:
            first = await run.prime()
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._chat_events(run, first, include_usage, top_logprobs=body.top_logprobs or 0)
            return _sse_response(events, run)
        await run.finish()
        choices = [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": ({"content": self._chat_logprobs(c.logprobs, body.top_logprobs or 0, params.skip_special_tokens)}
                         if body.logprobs else None),
            "finish_reason": c.finish_reason,
        } for c in run.choices]
        return JSONResponse({
            "id": response_id, "object": "chat.completion", "created": run.created, "model": self.model_name,
            "choices": choices, "usage": run.usage(), "system_fingerprint": SYSTEM_FINGERPRINT,
        })

    def _chat_events(self, run: _Run, first, include_usage: bool, top_logprobs: int) -> AsyncIterator[str]:
        skip_special = run.params.skip_special_tokens
        head = {"id": run.response_id, "object": "chat.completion.chunk", "created": run.created,
                "model": self.model_name, "system_fingerprint": SYSTEM_FINGERPRINT}
        if include_usage:
            head["usage"] = None

        def chunk(choice: _Choice, delta: dict, logprobs=None, finish_reason=None) -> str:
            return _sse({**head, "choices": [{"index": choice.index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish_reason}]})

        async def events():
            async for choice, output, new_logprobs in run.stream(first):
                if not choice.sent_role:
                    choice.sent_role = True
                    yield chunk(choice, {"role": "assistant", "content": ""})
                finish_reason = choice.finish_reason if output.finished else None
                if output.delta or finish_reason or new_logprobs:
                    delta = {"content": output.delta} if output.delta else {}
                    logprobs = ({"content": self._chat_logprobs(new_logprobs, top_logprobs, skip_special)}
                                if new_logprobs is not None else None)
                    yield chunk(choice, delta, logprobs, finish_reason)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": run.usage()})

        return run.events(events())

    def _chat_logprobs(self, logprobs: list, top: int, skip_special: bool) -> list[dict]:
        text = self.token_text

        def entry(token_id: int, logprob: float) -> dict:
            token_bytes = text.bytes(token_id, skip_special)
            return {"token": token_bytes.decode("utf-8", errors="replace"), "logprob": _finite(logprob),
                    "bytes": list(token_bytes)}

        return [{**entry(item.token_id, item.logprob), "top_logprobs": [entry(t, lp) for t, lp in item.top[:top]]}
                for item in logprobs or []]

    # ----------------------------------------------------------- text completions
    async def completions(self, request: Request, body: CompletionRequest):
        details = request.scope["quill"]
        self.check_open()
        self.check_model(body.model)
        _check_stream_options(body)
        details.update(model=self.model_name, stream=bool(body.stream), n=body.n, user=body.user, prompt=body.prompt)
        raw_prompts = _prompt_list(body.prompt)
        prompts = [await self.encode(p) if isinstance(p, str) else list(p) for p in raw_prompts]
        self.check_prompt_ids(prompts, "prompt")
        params = self.sampling_params(body, prompts, body.max_tokens, body.logprobs, "prompt", "logprobs")
        response_id = f"cmpl-{request.scope['quill.request_id']}"
        details["response_id"] = response_id
        echo = [self._prompt_text(p) if body.echo else "" for p in raw_prompts]
        run = _Run(self, response_id, prompts, params, details)
        if body.stream:
            first = await run.prime()
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse_response(self._completion_events(run, first, include_usage, echo, body.logprobs), run)
        await run.finish()
        choices = []
        for c in run.choices:
            prefix = echo[c.prompt_index]
            logprobs = None
            if body.logprobs is not None:
                c.text_offset = len(prefix)
                logprobs = self._completion_logprobs(c, c.logprobs, body.logprobs, params.skip_special_tokens)
            choices.append({"index": c.index, "text": prefix + c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
        return JSONResponse({
            "id": response_id, "object": "text_completion", "created": run.created, "model": self.model_name,
            "choices": choices, "usage": run.usage(), "system_fingerprint": SYSTEM_FINGERPRINT,
        })

    def _prompt_text(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(prompt) if self.tokenizer is not None else ""

    def _completion_events(self, run: _Run, first, include_usage: bool, echo: list[str],
                           logprobs_k: int | None) -> AsyncIterator[str]:
        skip_special = run.params.skip_special_tokens
        head = {"id": run.response_id, "object": "text_completion", "created": run.created,
                "model": self.model_name, "system_fingerprint": SYSTEM_FINGERPRINT}
        if include_usage:
            head["usage"] = None

        async def events():
            async for choice, output, new_logprobs in run.stream(first):
                text = output.delta
                if not choice.sent_role:  # first output of this choice: echo the prompt
                    choice.sent_role = True
                    text = echo[choice.prompt_index] + text
                    choice.text_offset = len(echo[choice.prompt_index])
                finish_reason = choice.finish_reason if output.finished else None
                if text or finish_reason or new_logprobs:
                    logprobs = (self._completion_logprobs(choice, new_logprobs, logprobs_k, skip_special)
                                if new_logprobs is not None else None)
                    yield _sse({**head, "choices": [{"index": choice.index, "text": text, "logprobs": logprobs,
                                                     "finish_reason": finish_reason}]})
            if include_usage:
                yield _sse({**head, "choices": [], "usage": run.usage()})

        return run.events(events())

    def _completion_logprobs(self, choice: _Choice, logprobs: list, k: int, skip_special: bool) -> dict:
        text = self.token_text
        result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for item in logprobs or []:
            token = text.text(item.token_id, skip_special)
            result["tokens"].append(token)
            result["token_logprobs"].append(_finite(item.logprob))
            top = {text.text(t, skip_special): _finite(lp) for t, lp in item.top[:k]}
            top.setdefault(token, _finite(item.logprob))
            result["top_logprobs"].append(top)
            result["text_offset"].append(choice.text_offset)
            choice.text_offset += len(token)
        return result

    # --------------------------------------------------------------- tokenizer
    async def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "Send exactly one of 'prompt' or 'messages'.", param="prompt")
        if body.prompt is not None:
            ids = await self.encode(body.prompt, body.add_special_tokens)
        else:
            ids = await self.encode_chat([_message_dict(m) for m in body.messages], body.add_generation_prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        self.require_tokenizer()
        bad = next((t for t in body.tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"Invalid token id {bad}: ids must be in [0, {self.vocab_size})", param="tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}


class _Run:
    """One HTTP request's engine requests (one per prompt, each with n completions): submission,
    merged outputs, per-choice state, usage, and cleanup that always aborts what is unfinished."""

    def __init__(self, server: QuillServer, response_id: str, prompts: list[list[int]], params: SamplingParams,
                 details: dict) -> None:
        self.server = server
        self.response_id = response_id
        self.prompts = prompts
        self.params = params
        self.details = details
        self.created = int(time.time())
        n = params.n
        self.choices = [_Choice(index=i * n + j, prompt_index=i) for i in range(len(prompts)) for j in range(n)]
        self.engine_ids = [response_id if len(prompts) == 1 else f"{response_id}-{i}" for i in range(len(prompts))]
        self._unfinished = [n] * len(prompts)
        self._closed = False
        self._outputs: AsyncIterator | None = None
        server.admit(len(self.choices))
        server.waiting += len(self.choices)
        metrics = server.metrics
        for ids in prompts:
            metrics.prompt_tokens.labels(metrics.model_name).inc(len(ids))
            metrics.request_prompt_tokens.labels(metrics.model_name).observe(len(ids))
        details.update(prompt_tokens=sum(len(p) for p in prompts), max_tokens=params.max_tokens)

    async def prime(self):
        """Start and wait for the first output, so that a request the engine refuses is still a
        plain 4xx response rather than an error inside an event stream."""
        self._outputs = self._iterate()
        try:
            return await self._outputs.__anext__()
        except BaseException:
            self.close()
            raise

    async def finish(self) -> None:
        try:
            async for _ in self._iterate():
                pass
        finally:
            self.close()

    async def stream(self, first):
        yield first
        async for item in self._outputs:
            yield item

    async def events(self, source: AsyncIterator[str]) -> AsyncIterator[str]:
        """Wrap a stream's events: errors become an error event, the stream ends with [DONE], and
        whatever way it ends (including cancellation on disconnect), cleanup runs."""
        task = asyncio.current_task()
        self.server.active_tasks.add(task)
        try:
            async for event in source:
                yield event
            yield "data: [DONE]\n\n"
        except Exception as exc:  # engine failure mid-stream: the status line is long gone
            error = _engine_error(exc)
            self.details["error"] = error.message
            self.details["stream_error"] = error.status
            yield _sse(error_body(error.message, error.type, error.param, error.code))
            yield "data: [DONE]\n\n"
        finally:
            self.server.active_tasks.discard(task)
            self.close()

    async def _iterate(self):
        server, metrics = self.server, self.server.metrics
        n = self.params.n
        try:
            async for prompt_index, output in self._merged():
                choice = self.choices[prompt_index * n + output.index]
                now = time.perf_counter()
                if not choice.started:
                    choice.started = True
                    server.waiting -= 1
                else:
                    metrics.inter_token_latency.labels(metrics.model_name).observe(now - choice.last_output_time)
                choice.last_output_time = now
                start = len(choice.token_ids)
                choice.token_ids.extend(output.new_token_ids)
                new_logprobs = None
                if output.logprobs is not None:
                    # The engine's list grows on its own thread: take exactly this output's entries.
                    new_logprobs = output.logprobs[start:len(choice.token_ids)]
                    choice.logprobs.extend(new_logprobs)
                choice.text = output.text
                choice.metrics = output.metrics
                metrics.generation_tokens.labels(metrics.model_name).inc(len(output.new_token_ids))
                if output.finished:
                    choice.finish_reason = output.finish_reason
                    self._unfinished[prompt_index] -= 1
                    metrics.observe_sequence(output.metrics, output.finish_reason, len(choice.token_ids))
                yield choice, output, new_logprobs
        except (InvalidRequestError, EngineStepError) as exc:
            raise _engine_error(exc) from None
        finally:
            self.close()

    async def _merged(self):
        """(prompt index, output) from every prompt's engine stream, as they come."""
        engine = self.server.engine
        if len(self.prompts) == 1:
            async for output in engine.generate(self.prompts[0], self.params, self.engine_ids[0]):
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int) -> None:
            try:
                async for output in engine.generate(self.prompts[index], self.params, self.engine_ids[index]):
                    queue.put_nowait((index, output))
            except Exception as exc:
                queue.put_nowait((index, exc))
            finally:
                queue.put_nowait((index, done))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(self.prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    def close(self) -> None:
        """Abort unfinished engine requests and settle the books. Synchronous on purpose: it runs
        inside cancelled tasks, where awaiting would be cancelled again. Safe to call repeatedly."""
        if self._closed:
            return
        self._closed = True
        server = self.server
        for engine_id, unfinished in zip(self.engine_ids, self._unfinished):
            if unfinished:
                server.engine.abort(engine_id)
        for choice in self.choices:
            if not choice.started:
                server.waiting -= 1
            if choice.finish_reason is None:
                server.metrics.observe_sequence(choice.metrics, "abort", len(choice.token_ids))
        usage = self.usage()
        timings = usage["quill"]
        self.details.update(
            completion_tokens=usage["completion_tokens"], cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
            finish_reasons=[c.finish_reason or "abort" for c in self.choices], queue_time=timings["queue_time"],
            ttft=timings["time_to_first_token"], e2e=timings["e2e_latency"],
        )

    def usage(self) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(len(c.token_ids) for c in self.choices)
        n = self.params.n
        cached = sum(self.choices[i * n].metrics.num_cached_prompt_tokens
                     for i in range(len(self.prompts)) if self.choices[i * n].metrics is not None)
        return {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "quill": _timings([c.metrics for c in self.choices if c.metrics is not None], completion_tokens),
        }


def _timings(all_metrics: list, completion_tokens: int) -> dict:
    """Queue time, TTFT, generation time (first to last token) and decode tokens/second, over all
    choices: for one choice these are exactly its `RequestMetrics` values."""
    def first(values):
        values = [v for v in values if v is not None]
        return min(values) if values else None

    def last(values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    first_token = first(m.first_token_time for m in all_metrics)
    last_token = last(m.last_token_time for m in all_metrics)
    generation_time = None if first_token is None or last_token is None else last_token - first_token
    decoded = completion_tokens - sum(1 for m in all_metrics if m.first_token_time is not None)
    rate = decoded / generation_time if generation_time and decoded > 0 else None
    values = {
        "queue_time": first(m.queue_time for m in all_metrics),
        "time_to_first_token": first(m.ttft for m in all_metrics),
        "generation_time": generation_time,
        "tokens_per_second": rate,
        "e2e_latency": last(m.e2e_latency for m in all_metrics),
    }
    return {k: None if v is None else round(v, 6) for k, v in values.items()}


# ------------------------------------------------------------------------------ helpers


async def _wait_for_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _tokenize(size: int, function, *args):
    try:
        if size > _INLINE_TOKENIZE_CHARS:  # long text: keep the event loop free meanwhile
            return await asyncio.to_thread(function, *args)
        return function(*args)
    except QuillError:
        raise
    except (TypeError, ValueError, UnicodeError) as exc:  # e.g. lone surrogates the tokenizer cannot take
        raise APIError(400, f"The text could not be tokenized (is it valid Unicode?): {exc}") from None


def _prompt_list(prompt) -> list[str | list[int]]:
    """A completion prompt (a string, token ids, or a list of either) as a list of prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _check_stream_options(body) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                       param="stream_options")


def _message_dict(message) -> dict:
    content = message.content
    if content is None:
        content = ""
    elif not isinstance(content, str):
        content = "\n".join(part.text for part in content)
    role = "system" if message.role == "developer" else message.role
    result = {"role": role, "content": content}
    if message.name is not None:
        result["name"] = message.name
    return result


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _sse_response(events: AsyncIterator[str], run: _Run) -> StreamingResponse:
    # The background task runs once the response is over, even when the client left before the
    # stream began (then `events` never ran its own cleanup).
    return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(run.close),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _finite(value: float) -> float:
    """JSON has no infinities; OpenAI reports impossible tokens as -9999."""
    return float(value) if math.isfinite(value) else -9999.0


def _param_of(message: str) -> str | None:
    """The field an engine/sampling error message is about (they start with the field's name)."""
    word = message.split(" ", 1)[0]
    if word in _SAMPLING_FIELDS:
        return word
    if "logit_bias" in message:
        return "logit_bias"
    if "prompt" in message:
        return "prompt"
    return None


def _prompt_param(path: str) -> str:
    return "messages" if path.endswith("chat/completions") else "prompt"


def _quill_error(exc: QuillError, prompt_param: str) -> APIError:
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        param = _param_of(str(exc))
        if param == "prompt":
            param = prompt_param
        return APIError(400, str(exc), param=param)
    return APIError(500, str(exc), type="server_error")


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QuillError):
        return _quill_error(exc, "prompt")
    if isinstance(exc, EngineStepError):
        return APIError(503 if "shutting down" in str(exc) else 500, str(exc), type="server_error")
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error")


_TYPE_TAGS = re.compile(r"^(str|int|float|bool|list|dict|none|function-\w+|union|tagged-union|literal)\b|[\[\]]")


def _validation_error(errors: Sequence[dict]) -> APIError:
    """The first pydantic error as an OpenAI 400: 'Invalid 'max_tokens': ...' with param set."""
    if not errors:
        return APIError(400, "Invalid request body.")
    error = errors[0]
    kind = error.get("type", "")
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"We could not parse the JSON body of your request ({detail}). The body must be valid JSON.",
                        code="invalid_json")
    loc = [part for part in error.get("loc", ()) if part != "body"]
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif not _TYPE_TAGS.search(str(part)):
            parts.append(("." if parts else "") + str(part))
    param = "".join(parts) or None
    if kind == "missing" and param is None:
        return APIError(400, "The request body is missing: send a JSON object.")
    message = error.get("msg", "invalid value")
    if param == "prompt" and len(loc) > 1:  # no branch of the union matched: say what is accepted
        return APIError(400, "Invalid 'prompt': expected a string, a list of strings, a list of token ids "
                             "(integers >= 0) or a list of lists of token ids, none of them empty.",
                        param="prompt", code="invalid_value")
    if param is None:
        return APIError(400, f"Invalid request body: {message}")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    code = "missing_required_parameter" if kind == "missing" else "invalid_value"
    return APIError(400, f"Invalid '{param}': {message}.{more}", param=param, code=code)


_BYTE_DECODER: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte is written as one printable character."""
    if not _BYTE_DECODER:
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        chars = list(printable)
        extra = 0
        for byte in range(256):
            if byte not in printable:
                printable.append(byte)
                chars.append(256 + extra)
                extra += 1
        _BYTE_DECODER.update({chr(c): b for b, c in zip(printable, chars)})
    return _BYTE_DECODER


class _TokenText:
    """Bytes and text of single tokens, for logprobs (cached: the vocabulary is fixed)."""

    _HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = tokenizer is not None and "ByteLevel" in repr(tokenizer.backend.decoder)
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int, skip_special: bool = True) -> bytes:
        """The token's bytes; special tokens (EOS, end of turn) are empty when skipped, as in the text."""
        if skip_special and self.tokenizer is not None and token_id in self.tokenizer.special_token_ids:
            return b""
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._bytes(token_id)
        return cached

    def text(self, token_id: int, skip_special: bool = True) -> str:
        return self.bytes(token_id, skip_special).decode("utf-8", errors="replace")

    def _bytes(self, token_id: int) -> bytes:
        if self.tokenizer is None:  # a token-ids-only engine: name the id, as vLLM does
            return f"token_id:{token_id}".encode()
        piece = self.tokenizer.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self.tokenizer.special_token_ids:
            return piece.encode()
        if self.byte_level:
            decoder = _byte_decoder()
            if all(c in decoder for c in piece):
                return bytes(decoder[c] for c in piece)
            return piece.encode()
        match = self._HEX_BYTE.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


# ------------------------------------------------------------------------------ running


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, shutdown_grace: float = 10.0,
          log_level: str = "info") -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM. On SIGTERM uvicorn stops accepting
    connections, gives open ones `shutdown_grace` seconds, cancels the rest (which aborts their
    engine requests), then the app's shutdown stops the engine; the process then returns normally."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_grace)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op SIGTERM handler (restored
    # by uvicorn after its own) turns that into a normal return, i.e. exit status 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


class BackgroundServer:
    """Run an app with uvicorn on a loopback port in a background thread (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, shutdown_grace: float = 2.0) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=shutdown_grace, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="quill-http", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

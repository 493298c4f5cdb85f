"""The OpenAI-compatible HTTP server: FastAPI routes that translate HTTP to engine calls and back.

The server never runs the model: every request goes to the `AsyncEngine`, whose one thread owns
the engine, and comes back as a stream of `RequestOutput`s. What happens here is validation
(pydantic models in `protocol.py`, then `SamplingParams`), admission (queue limit, context
window) and shaping outputs into OpenAI's JSON and server-sent events. The rest lives beside it:
`middleware.py` (API key, body limit, request log), `errors.py` (OpenAI-shaped errors),
`runs.py` (a request's engine streams, SSE and cleanup: a request whose client goes away is
aborted at once so its KV blocks are freed), `cached.py` (the response cache's hits and opt-outs),
`logprobs.py`, `metrics.py` and `ui.py` (the chat page at `/`). Each request is priced by `quill.cost.CostModel`; `GET /v1/usage`
reports the totals (a cache hit is free and shows what it saved: see `cached.hit_usage`).

Build an app with `create_app(llm, ServerConfig(...))`; `runner.serve()` runs it with uvicorn
(what `quill serve` does) and `runner.BackgroundServer` runs it on a loopback port in a thread (tests).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from quill import __version__
from quill.cache import Lease, cache_key, model_identity
from quill.cost import DEFAULT_HOURLY_COST, CostModel, Price
from quill.engine.async_engine import AsyncEngine
from quill.errors import InvalidRequestError, QuillError
from quill.sampling_params import SamplingParams
from quill.server import protocol
from quill.server.cached import (CACHE_HEADER, build_response_cache, chat_replay, completion_replay, hit_usage,
                                 may_use_cache, replay_events)
from quill.server.errors import APIError, add_exception_handlers, param_of
from quill.server.logprobs import TokenText, chat_logprobs, completion_logprobs
from quill.server.metrics import ServerMetrics
from quill.server.middleware import Gate
from quill.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from quill.server.runs import Run, chat_chunk, completion_chunk, sse, sse_response
from quill.server.ui import add_ui

SYSTEM_FINGERPRINT = f"quill-{__version__}"
# Prompts longer than this (characters) are tokenized off the event loop.
_INLINE_TOKENIZE_CHARS = 20_000


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
    hourly_cost: float = DEFAULT_HOURLY_COST  # dollars per hour of this machine: the self-hosted price
    reference_prices: dict[str, Price] | None = None  # hosted APIs to compare with (default: quill.cost's)
    # The response cache: repeated deterministic requests (greedy or seeded) answered without the engine.
    response_cache: bool = True
    response_cache_path: str | None = None  # also keep answers in this SQLite file, across restarts
    response_cache_entries: int = 1024  # in memory; least recently used answers go first
    response_cache_memory: int = 64 << 20  # bytes of answers (JSON) in memory
    response_cache_ttl: float | None = None  # seconds an answer may be served; None: until evicted
    ui: bool = True  # serve the chat page at / (quill/server/ui.py)


@dataclass
class _Reply:
    """How one endpoint shapes its answers: live, stored, and replayed from the cache."""

    endpoint: str
    object: str  # of the whole response
    chunk_object: str  # of each streamed chunk
    shape: dict  # request fields that change the body beyond the prompt and sampling (part of the cache key)
    choices: Callable[[Run], list[dict]]  # a finished run's choices, as in the response body
    live: Callable[..., AsyncIterator[str]]  # (run, first output, chunk head) -> the choices' chunks
    replay: Callable[[dict, list[dict]], Iterator[str]]  # (chunk head, stored choices) -> chunks


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
    app.add_middleware(Gate, server=server)
    add_exception_handlers(app)
    _add_routes(app, server)
    if server.config.ui:
        add_ui(app, server)
    return app


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

    @app.get("/v1/usage", response_model=protocol.UsageReport, responses={401: errors[401]})
    async def usage():
        return server.costs.report({server.model_name: server.costs.self_hosted_price(server.engine.stats())})

    @app.get("/metrics", response_class=Response)
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)


# ------------------------------------------------------------------------------ routes


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
        self.costs = CostModel(config.hourly_cost, config.reference_prices)
        self.cache = build_response_cache(config)
        # Cache keys include what the answer depends on beyond the request: a model without a file
        # (an engine built in process) gets an identity of its own, so no stored answer matches it.
        self.cache_identity = {"model": self.model_name, "dtype": core.config.dtype, "quill": __version__,
                               "weights": model_identity(path) if path else uuid.uuid4().hex}
        self.metrics = ServerMetrics(self.engine, self.model_name, self.costs, self.cache)
        self.token_text = TokenText(self.tokenizer)
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
        if self.cache is not None:
            self.cache.close()

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
            logit_bias=self._logit_bias(body.logit_bias), logprobs=logprobs, speculative=body.speculative is not False,
        )
        try:
            return SamplingParams(**fields)
        except InvalidRequestError as exc:
            param = param_of(str(exc)) or None
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
        top_logprobs = body.top_logprobs or 0
        reply = _Reply(
            endpoint="chat", object="chat.completion", chunk_object="chat.completion.chunk",
            shape={"logprobs": bool(body.logprobs), "top_logprobs": top_logprobs},
            choices=lambda run: self._chat_choices(run, bool(body.logprobs), top_logprobs),
            live=lambda run, first, head: self._chat_events(run, first, head, top_logprobs),
            replay=chat_replay,
        )
        return await self.respond(request, body, reply, f"chatcmpl-{request.scope['quill.request_id']}",
                                  [prompt_ids], params)

    def _chat_choices(self, run: Run, logprobs: bool, top_logprobs: int) -> list[dict]:
        skip_special = run.params.skip_special_tokens
        return [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": ({"content": chat_logprobs(self.token_text, c.logprobs, top_logprobs, skip_special)}
                         if logprobs else None),
            "finish_reason": c.finish_reason,
        } for c in run.choices]

    async def _chat_events(self, run: Run, first, head: dict, top_logprobs: int) -> AsyncIterator[str]:
        skip_special = run.params.skip_special_tokens
        async for choice, output, new_logprobs in run.stream(first):
            if not choice.sent_role:
                choice.sent_role = True
                yield chat_chunk(head, choice.index, {"role": "assistant", "content": ""})
            finish_reason = choice.finish_reason if output.finished else None
            if output.delta or finish_reason or new_logprobs:
                delta = {"content": output.delta} if output.delta else {}
                logprobs = ({"content": chat_logprobs(self.token_text, new_logprobs, top_logprobs, skip_special)}
                            if new_logprobs is not None else None)
                yield chat_chunk(head, choice.index, delta, logprobs, finish_reason)

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
        echo = [self._prompt_text(p) if body.echo else "" for p in raw_prompts]
        reply = _Reply(
            endpoint="completions", object="text_completion", chunk_object="text_completion",
            shape={"logprobs": body.logprobs, "echo": echo},
            choices=lambda run: self._completion_choices(run, echo, body.logprobs),
            live=lambda run, first, head: self._completion_events(run, first, head, echo, body.logprobs),
            replay=completion_replay,
        )
        return await self.respond(request, body, reply, f"cmpl-{request.scope['quill.request_id']}", prompts, params)

    def _prompt_text(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(prompt) if self.tokenizer is not None else ""

    def _completion_choices(self, run: Run, echo: list[str], logprobs_k: int | None) -> list[dict]:
        choices = []
        for c in run.choices:
            prefix = echo[c.prompt_index]
            logprobs = None
            if logprobs_k is not None:
                c.text_offset = len(prefix)
                logprobs = completion_logprobs(self.token_text, c, c.logprobs, logprobs_k, run.params.skip_special_tokens)
            choices.append({"index": c.index, "text": prefix + c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
        return choices

    async def _completion_events(self, run: Run, first, head: dict, echo: list[str],
                                 logprobs_k: int | None) -> AsyncIterator[str]:
        skip_special = run.params.skip_special_tokens
        async for choice, output, new_logprobs in run.stream(first):
            text = output.delta
            if not choice.sent_role:  # first output of this choice: echo the prompt
                choice.sent_role = True
                text = echo[choice.prompt_index] + text
                choice.text_offset = len(echo[choice.prompt_index])
            finish_reason = choice.finish_reason if output.finished else None
            if text or finish_reason or new_logprobs:
                logprobs = (completion_logprobs(self.token_text, choice, new_logprobs, logprobs_k, skip_special)
                            if new_logprobs is not None else None)
                yield completion_chunk(head, choice.index, text, logprobs, finish_reason)

    # ------------------------------------------------------ responses and the cache
    async def respond(self, request: Request, body, reply: _Reply, response_id: str, prompts: list[list[int]],
                      params: SamplingParams) -> Response:
        """Answer from the response cache when the request may use it and the answer is there;
        otherwise run the engine (storing a deterministic answer for the next identical request)."""
        details = request.scope["quill"]
        details["response_id"] = response_id
        started = time.perf_counter()
        lease = None
        if self.cache is not None and may_use_cache(request, body, params):
            key = cache_key(**self.cache_identity, endpoint=reply.endpoint, prompts=prompts,
                            params=dataclasses.asdict(params), shape=reply.shape)
            found = await self.cache.acquire(key)
            if not isinstance(found, Lease):
                return self._replay(request, body, reply, response_id, found, time.perf_counter() - started)
            lease = found
        details["cache"] = "miss" if lease else "bypass"
        try:
            run = Run(self, response_id, prompts, params, details)
        except BaseException:
            if lease:
                lease.settle(None)
            raise
        if lease:  # however the run ends, the waiters for this key wake up
            run.on_close(lambda: lease.settle(self._cacheable(run, reply) if run.completed else None))
        if body.stream:
            first = await run.prime()
            head = self._chunk_head(reply, response_id, run.created, _include_usage(body))
            events = run.events(self._live_events(run, reply.live(run, first, head), head))
            response = sse_response(events, run.close)
        else:
            await run.finish()
            response = JSONResponse(self._body(reply, response_id, run.created, reply.choices(run), run.usage()))
        response.headers[CACHE_HEADER] = details["cache"]
        return response

    async def _live_events(self, run: Run, events: AsyncIterator[str], head: dict) -> AsyncIterator[str]:
        async for event in events:
            yield event
        if "usage" in head:
            yield sse({**head, "choices": [], "usage": run.usage()})

    def _cacheable(self, run: Run, reply: _Reply) -> dict:
        """What the cache keeps of a finished run: its choices, token counts and self-hosted cost
        (so that a hit reports what it saved at the price this computation actually had)."""
        usage = run.usage()
        return {"choices": reply.choices(run), "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"], "cost_usd": usage["quill"]["cost"]["self_hosted_usd"]}

    def _replay(self, request: Request, body, reply: _Reply, response_id: str, cached: dict,
                elapsed: float) -> Response:
        """A cache hit, with this request's own id and creation time."""
        cost = self._charge_hit(cached)
        request.scope["quill"].update(cache="hit", prompt_tokens=cached["prompt_tokens"],
                                      completion_tokens=cached["completion_tokens"], cost_usd=0.0,
                                      saved_usd=cost["saved_usd"])
        created = int(time.time())
        usage = hit_usage(cached, elapsed, cost)
        if body.stream:
            include_usage = _include_usage(body)
            head = self._chunk_head(reply, response_id, created, include_usage)
            events = replay_events(reply.replay(head, cached["choices"]), head, usage if include_usage else None)
            response = sse_response(events)
        else:
            response = JSONResponse(self._body(reply, response_id, created, cached["choices"], usage))
        response.headers[CACHE_HEADER] = "hit"
        return response

    def _charge_hit(self, cached: dict) -> dict:
        cost = self.costs.charge_hit(self.model_name, self.engine.stats(), cached["prompt_tokens"],
                                     cached["completion_tokens"], cached["cost_usd"])
        self.metrics.observe_cache_hit(cost)
        return cost

    def _body(self, reply: _Reply, response_id: str, created: int, choices: list[dict], usage: dict) -> dict:
        return {"id": response_id, "object": reply.object, "created": created, "model": self.model_name,
                "choices": choices, "usage": usage, "system_fingerprint": SYSTEM_FINGERPRINT}

    def _chunk_head(self, reply: _Reply, response_id: str, created: int, include_usage: bool) -> dict:
        head = {"id": response_id, "object": reply.chunk_object, "created": created, "model": self.model_name,
                "system_fingerprint": SYSTEM_FINGERPRINT}
        if include_usage:
            head["usage"] = None
        return head

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


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


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

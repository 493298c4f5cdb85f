"""Send streaming requests to an OpenAI-compatible server and time them as the client sees them.

TTFT is the time from sending a request to the first chunk with text; the inter-token latencies
are the gaps between later chunks with text (servers send one token a chunk; one that batches
several shows longer, fewer gaps). Output tokens come from the final usage chunk when the server
sends one (`stream_options.include_usage`), else they are the chunks with text.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from quill.bench.workload import RequestSpec
from quill.errors import QuillError


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None  # seconds
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # when the server reports usage
    finish_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Target:
    """Where and how to send: a server's base URL, its model, chat or completions, extra body fields."""

    url: str
    model: str
    api: str = "chat"  # "chat" (/v1/chat/completions) or "completions" (/v1/completions)
    temperature: float = 0.0
    extra_body: dict = field(default_factory=dict)


async def fetch_model(client: httpx.AsyncClient) -> str:
    """The first model the server lists; a QuillError that says why when it lists none."""
    try:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        detail = f"HTTP {exc.response.status_code}" if isinstance(exc, httpx.HTTPStatusError) else str(exc) or repr(exc)
        raise QuillError(f"cannot list the models of {client.base_url} ({detail}); is the server up, and does it "
                         "need --api-key? (--model names the model without asking)") from None


def request_body(target: Target, spec: RequestSpec) -> tuple[str, dict]:
    body = {"model": target.model, "max_tokens": spec.max_tokens, "temperature": target.temperature,
            "stream": True, "stream_options": {"include_usage": True}, **target.extra_body}
    if target.api == "chat":
        return "/v1/chat/completions", {**body, "messages": spec.messages}
    return "/v1/completions", {**body, "prompt": spec.prompt}


async def send_request(client: httpx.AsyncClient, target: Target, spec: RequestSpec) -> RequestResult:
    path, body = request_body(target, spec)
    result = RequestResult(ok=False)
    text_chunks = 0
    started = last = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))[:200]
                    return result
                now = time.perf_counter()
                if event.get("usage"):
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
                    result.prompt_tokens = event["usage"].get("prompt_tokens")
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if target.api == "chat" else choice.get("text")
                    if text:
                        text_chunks += 1
                        if result.ttft is None:
                            result.ttft = now - started
                        else:
                            result.itls.append(now - last)
                        last = now
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - started
    result.output_tokens = result.output_tokens or text_chunks
    result.ok = result.finish_reason is not None
    if not result.ok:
        result.error = "the stream ended without a finish_reason"
    return result


async def run_level(send: Callable[[RequestSpec], Awaitable[RequestResult]], specs: list[RequestSpec], *,
                    concurrency: int | None = None, arrivals: list[float] | None = None,
                    on_done: Callable[[RequestResult], None] = lambda result: None,
                    ) -> tuple[list[RequestResult], float]:
    """Send every request, at most `concurrency` at a time (None: no limit), each no earlier than
    its arrival time (seconds from the start; None: all at once). Returns the results in request
    order and the wall time from the first send to the last response."""
    limiter = asyncio.Semaphore(concurrency) if concurrency else None
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one(spec: RequestSpec, arrival: float) -> RequestResult:
        await asyncio.sleep(max(0.0, started + arrival - loop.time()))
        if limiter is None:
            result = await send(spec)
        else:
            async with limiter:
                result = await send(spec)
        on_done(result)
        return result

    results = await asyncio.gather(*(one(spec, arrival) for spec, arrival in
                                     zip(specs, arrivals or [0.0] * len(specs))))
    return list(results), loop.time() - started

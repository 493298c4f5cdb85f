"""One HTTP request's run through the engine and its delivery: `Run` submits a request's prompts,
merges their output streams into per-choice state (`Choice`), keeps the server's queue and token
metrics, always aborts what is unfinished when the request ends, and settles usage with Quill's
timings (`timings`) and the request's cost; `sse` and `sse_response` turn a run's events into a
server-sent event stream, whose chunks `chat_chunk` and `completion_chunk` shape.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from quill.engine.async_engine import EngineStepError
from quill.errors import InvalidRequestError
from quill.sampling_params import SamplingParams
from quill.server.errors import engine_error
from quill.server.protocol import error_body

if TYPE_CHECKING:
    from quill.server.app import QuillServer


@dataclass
class Choice:
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


class Run:
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
        self.choices = [Choice(index=i * n + j, prompt_index=i) for i in range(len(prompts)) for j in range(n)]
        self.engine_ids = [response_id if len(prompts) == 1 else f"{response_id}-{i}" for i in range(len(prompts))]
        self._unfinished = [n] * len(prompts)
        self._closed = False
        self._usage: dict | None = None
        self._outputs: AsyncIterator | None = None
        self._on_close: list[Callable[[], None]] = []
        server.admit(len(self.choices))
        server.waiting += len(self.choices)
        metrics = server.metrics
        for ids in prompts:
            metrics.prompt_tokens.labels(metrics.model_name).inc(len(ids))
            metrics.request_prompt_tokens.labels(metrics.model_name).observe(len(ids))
        details.update(prompt_tokens=sum(len(p) for p in prompts), max_tokens=params.max_tokens)

    @property
    def completed(self) -> bool:
        """Every choice ran to its natural end (stop or length), so its result is the whole answer."""
        return all(c.finish_reason in ("stop", "length") for c in self.choices)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the run is over, however it ends."""
        self._on_close.append(callback)

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
            error = engine_error(exc)
            self.details["error"] = error.message
            self.details["stream_error"] = error.status
            yield sse(error_body(error.message, error.type, error.param, error.code))
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
            raise engine_error(exc) from None
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
        self._usage = usage = self._settle_usage()
        quill = usage["quill"]
        self.details.update(
            completion_tokens=usage["completion_tokens"], cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
            finish_reasons=[c.finish_reason or "abort" for c in self.choices], queue_time=quill["queue_time"],
            ttft=quill["time_to_first_token"], itl_mean=quill["inter_token_latency_mean"],
            itl_max=quill["inter_token_latency_max"], e2e=quill["e2e_latency"],
            cost_usd=quill["cost"]["self_hosted_usd"],
        )
        for callback in self._on_close:
            callback()

    def usage(self) -> dict:
        """Tokens, timings and cost of the whole request; settled once, when the run closes (which
        it has by the time a response or the final stream chunk is written)."""
        if self._usage is None:
            raise RuntimeError("a run's usage is settled when it closes")
        return self._usage

    def _settle_usage(self) -> dict:
        """Count the request's tokens and charge it (aborted requests too: their tokens were computed)."""
        server = self.server
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(len(c.token_ids) for c in self.choices)
        n = self.params.n
        cached = sum(self.choices[i * n].metrics.num_cached_prompt_tokens
                     for i in range(len(self.prompts)) if self.choices[i * n].metrics is not None)
        cost = server.costs.charge(server.model_name, server.engine.stats(), prompt_tokens, cached, completion_tokens)
        server.metrics.observe_cost(cost)
        quill = timings([c.metrics for c in self.choices if c.metrics is not None], completion_tokens)
        return {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
            "quill": {**quill, "cache_hit": False, "cost": cost},
        }


def timings(all_metrics: list, completion_tokens: int) -> dict:
    """Queue time, TTFT, generation time (first to last token), decode tokens/second, mean and
    longest inter-token latency, over all choices: for one choice these are exactly its
    `RequestMetrics` values."""
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
    # Per choice, not 1 / rate: n choices decode side by side, each at its own pace.
    gaps = [1 / r for r in (m.decode_tokens_per_second for m in all_metrics) if r]
    values = {
        "queue_time": first(m.queue_time for m in all_metrics),
        "time_to_first_token": first(m.ttft for m in all_metrics),
        "generation_time": generation_time,
        "tokens_per_second": rate,
        "inter_token_latency_mean": sum(gaps) / len(gaps) if gaps else None,
        "inter_token_latency_max": last(m.max_inter_token_latency for m in all_metrics),
        "e2e_latency": last(m.e2e_latency for m in all_metrics),
    }
    return {k: None if v is None else round(v, 6) for k, v in values.items()}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def chat_chunk(head: dict, index: int, delta: dict, logprobs=None, finish_reason: str | None = None) -> str:
    return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish_reason}]})


def completion_chunk(head: dict, index: int, text: str, logprobs=None, finish_reason: str | None = None) -> str:
    return sse({**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                      "finish_reason": finish_reason}]})


def sse_response(events: AsyncIterator[str], cleanup: Callable[[], None] | None = None) -> StreamingResponse:
    # The cleanup runs once the response is over, even when the client left before the stream
    # began (then `events` never ran its own cleanup).
    background = BackgroundTask(cleanup) if cleanup else None
    return StreamingResponse(events, media_type="text/event-stream", background=background,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

"""Answering a generation request once its endpoint has its prompts, `SamplingParams` and `Reply`:
from the response cache when the request may use it and the answer is there (a replay), otherwise
from the engine (storing a deterministic answer for the next identical request), as one JSON body
or as a stream of server-sent events. One function per path, each read top to bottom."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from quill.cache import Lease
from quill.sampling_params import SamplingParams
from quill.server.answer import LiveAnswer
from quill.server.cached import CACHE_HEADER, answer_key, may_use_cache, stored_answer
from quill.server.errors import ShuttingDown, api_error
from quill.server.protocol import SamplingFields
from quill.server.replies import Reply, sse_response
from quill.server.request_log import RequestRecord
from quill.server.runs import Run, Update
from quill.server.state import ServerState
from quill.server.streaming import LiveStream, StreamLimits
from quill.server.usage import hit_usage


async def respond(server: ServerState, request: Request, body: SamplingFields, reply: Reply,
                  prompts: list[list[int]], params: SamplingParams) -> Response:
    record = RequestRecord.of(request.scope)
    started = time.perf_counter()
    lease = None
    if server.cache is not None and may_use_cache(request, body, params):
        key = answer_key(server.cache_identity, reply.endpoint, prompts, params, reply.shape)
        found = await server.cache.acquire(key)
        if not isinstance(found, Lease):
            return replay(server, record, body, reply, found, time.perf_counter() - started)
        lease = found
    cache = "miss" if lease else "bypass"
    record.answered_as(reply.head.id, cache)
    try:
        ticket = server.admission.admit(len(prompts) * params.n, "n" if params.n > 1 else "prompt")
    except BaseException:
        if lease:  # the waiters for this key compute it themselves
            lease.settle(None)
        raise
    server.metrics.observe_prompts(prompts)
    record.admitted(sum(len(p) for p in prompts), params.max_tokens)

    def store(answer: LiveAnswer) -> None:  # however the run ends, the waiters for this key wake up
        complete = answer.run.completed
        lease.settle(stored_answer(reply.choices(answer.run), answer.usage) if complete else None)

    answer = LiveAnswer(Run(server.engine, reply.head.id, prompts, params), ticket, server.metrics,
                        server.billing, record, on_close=store if lease else None,
                        deadline=server.config.request_timeout)
    answer.start()
    if body.stream:
        first = await _first_update(answer)
        response = LiveStream(live_events(answer, first, reply, body.field_names), StreamLimits.of(server.config),
                              server.admission, on_stall=answer.cut, cleanup=answer.close)
    else:
        await answer.finish()
        response = JSONResponse(reply.body(reply.choices(answer.run), answer.usage))
    response.headers[CACHE_HEADER] = cache
    return response


async def _first_update(answer: LiveAnswer) -> Update | None:
    """Wait for the first output before the response starts, so that a request the engine refuses
    is still a plain 4xx response rather than an error inside an event stream."""
    try:
        return await answer.next()
    except BaseException:
        answer.close()
        raise


async def live_events(answer: LiveAnswer, first: Update | None, reply: Reply,
                      field_names: Mapping[str, str]) -> AsyncIterator[str]:
    """A live answer's stream, as its `Reply` frames it (chat: its chunks, the usage chunk when asked
    for, then [DONE]). Stopped at shutdown, the reply ends what is unfinished (chat: finish_reason
    "abort") before closing; any other error after the stream began becomes the reply's failure
    events (the status line is long gone). However the stream ends (cancelled on disconnect
    included), the answer is closed."""
    try:
        for event in reply.opening():
            yield event
        update = first
        while update is not None:
            for event in reply.events(update):
                yield event
            update = await answer.next()
    except ShuttingDown:
        answer.close()  # settles the usage the closing events carry
        for event in reply.stopped(answer.run.choices):
            yield event
    except Exception as exc:
        error = api_error(exc, field_names)
        answer.record.failed(error.message, stream_status=error.status)
        for event in reply.failure(error):
            yield event
        return
    finally:
        answer.close()
    for event in reply.closing(answer.usage):
        yield event


def replay(server: ServerState, record: RequestRecord, body: SamplingFields, reply: Reply, stored: dict,
           elapsed: float) -> Response:
    """A cache hit, with this request's own id and creation time, free and counted apart."""
    prompt_tokens, completion_tokens = stored["prompt_tokens"], stored["completion_tokens"]
    cost = server.billing.charge_hit(prompt_tokens, completion_tokens, stored["cost_usd"])
    record.answered_as(reply.head.id, "hit")
    record.replayed(prompt_tokens, completion_tokens, cost["saved_usd"])
    usage = hit_usage(prompt_tokens, completion_tokens, elapsed, cost)
    if body.stream:
        response = sse_response(replayed_events(reply, stored["choices"], usage))
    else:
        response = JSONResponse(reply.body(stored["choices"], usage))
    response.headers[CACHE_HEADER] = "hit"
    return response


async def replayed_events(reply: Reply, choices: list[dict], usage: dict) -> AsyncIterator[str]:
    for event in [*reply.opening(), *reply.replayed(choices), *reply.closing(usage)]:
        yield event

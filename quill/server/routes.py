"""Every route of the server, in one table: each delegates to its endpoint's module. Generation
endpoints run through `answer_request`, which cancels them if the client goes away first and
names the fields in errors as the endpoint does. A new endpoint is a module with its function
and a route here; a new request field is a field of its protocol model (`py`)."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import Response

from quill import __version__
from quill.errors import QuillError
from quill.server.chat import chat_completion
from quill.server.completions import completion
from quill.server.errors import APIError, api_error, shutting_down
from quill.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                                   DetokenizeRequest, DetokenizeResponse, ErrorResponse, HealthResponse, ModelCard,
                                   ModelList, ResponsesRequest, TokenizeRequest, TokenizeResponse, UsageReport,
                                   VersionResponse)
from quill.server.request_log import RequestRecord
from quill.server.responses import create_response, delete_response, get_response
from quill.server.sampling import default_max_tokens
from quill.server.state import ServerState
from quill.server.tokens import detokenize, tokenize

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}


def add_routes(app: FastAPI, server: ServerState) -> None:
    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await answer_request(server, request, chat_completion(server, request, body), body.field_names)

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request):
        return await answer_request(server, request, completion(server, request, body), body.field_names)

    @app.post("/v1/responses", responses=_ERRORS)
    async def responses(body: ResponsesRequest, request: Request):
        return await answer_request(server, request, create_response(server, request, body), body.field_names)

    @app.get("/v1/responses/{response_id}", responses={404: _ERRORS[404]})
    async def stored_response(response_id: str):
        return get_response(server, response_id)

    @app.delete("/v1/responses/{response_id}", responses={404: _ERRORS[404]})
    async def delete_stored_response(response_id: str):
        return delete_response(server, response_id)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return {"object": "list", "data": [server.model.card(default_max_tokens(server.config))]}

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses={404: _ERRORS[404]})
    async def get_model(model: str):
        server.model.check(model)
        return server.model.card(default_max_tokens(server.config))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize_text(body: TokenizeRequest):
        return await tokenize(server, body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize_ids(body: DetokenizeRequest):
        return detokenize(server, body)

    @app.get("/health", response_model=HealthResponse, responses={503: _ERRORS[503]})
    async def health():
        server.admission.check_open()
        if not server.engine.is_alive():
            raise APIError(503, "the engine thread has stopped", type="service_unavailable")
        return {"status": "ok"}

    @app.get("/version", response_model=VersionResponse)
    async def version():
        return {"version": __version__}

    @app.get("/v1/usage", response_model=UsageReport, responses={401: _ERRORS[401]})
    async def usage():
        return server.billing.report()

    @app.get("/metrics", response_class=Response)
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)


async def answer_request(server: ServerState, request: Request, endpoint: Awaitable[Response],
                         field_names: Mapping[str, str]) -> Response:
    """Run a generation endpoint as a task that shutdown can wait for; if the client disconnects
    first, cancel it (which aborts its engine requests). Streaming responses are watched by
    Starlette once they start; this covers the wait before. Typed errors come out in the
    endpoint's field names."""
    task = asyncio.ensure_future(endpoint)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    with server.admission.track(task):
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            watcher.cancel()
            raise
    if task in done:
        watcher.cancel()
        if task.cancelled():  # by shutdown
            raise shutting_down()
        try:
            return task.result()
        except QuillError as exc:
            raise api_error(exc, field_names) from None
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    RequestRecord.of(request.scope).disconnected()
    return Response(status_code=499)  # nobody is listening; the status is for the log


async def _wait_for_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return

"""Errors as OpenAI-shaped HTTP responses. `APIError` is a `QuillError` with an HTTP status (and
OpenAI's `type`, optional headers); `api_error` is the one mapping of everything else that can go
wrong onto one: a typed error keeps its own `param` and `code` (renamed into the endpoint's field
names: a chat request's prompt is its `messages`), an engine that stopped is a 503, and anything
else is a 500 that says nothing of the internals. `validation_error` does the same for pydantic's
errors, and `add_exception_handlers` answers with them, noting the error in the request's log line.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quill.engine.async_engine import EngineShutdownError
from quill.errors import InvalidRequestError, QuillError
from quill.server.protocol import error_body
from quill.server.request_log import RequestRecord

log = logging.getLogger("quill.server")


# The longest error message sent: the messages quote client values through `quill.errors.quoted`;
# this is the backstop for one that does not (a huge model name, a field's text).
MAX_MESSAGE_CHARS = 1000


class APIError(QuillError):
    """An error with an HTTP status and an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "... (cut)"
        super().__init__(message, param=param, code=code)
        self.status, self.type, self.headers = status, type, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ShuttingDown(APIError):
    """The server is shutting down: a request not yet admitted is refused, one in flight past the
    grace period is ended (a stream with finish_reason "abort", see respond.live_events)."""

    def __init__(self) -> None:
        super().__init__(503, "the server is shutting down", type="service_unavailable", code="server_shutting_down")


def shutting_down() -> APIError:
    return ShuttingDown()


def deadline_exceeded(seconds: float) -> APIError:
    """A request that ran past the server's `request_timeout`."""
    return APIError(504, f"The request did not finish within the server's deadline of {seconds:g} seconds "
                         "(--request-timeout). Ask for fewer tokens; a streamed answer shows those that came "
                         "before the deadline.",
                    type="timeout", code="request_timeout")


def api_error(exc: BaseException, field_names: Mapping[str, str] | None = None) -> APIError:
    """`exc` as an HTTP error. `field_names` maps the engine's field names to the endpoint's."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        param = (field_names or {}).get(exc.param, exc.param)
        message = exc.message
        if param != exc.param and message.startswith(f"{exc.param} "):  # "max_tokens must be" in the client's name
            message = param + message[len(exc.param):]
        return APIError(400, message, param=param, code=exc.code)
    if isinstance(exc, EngineShutdownError):
        return APIError(503, exc.message, type="server_error")
    if isinstance(exc, QuillError):  # the engine failed a step, a file went bad: ours, not the client's
        return APIError(500, exc.message, type="server_error")
    log.error("unhandled error", exc_info=exc)  # a bug: keep the traceback, tell the client nothing of it
    return internal_error(exc)


def internal_error(exc: BaseException) -> APIError:
    return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error")


def add_exception_handlers(app: FastAPI) -> None:
    def respond(request: Request, error: APIError) -> JSONResponse:
        record = RequestRecord.of(request.scope)
        if record is not None:
            record.failed(error.message)
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request: Request, exc: RequestValidationError):
        return respond(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return respond(request, APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(QuillError)  # APIError included
    async def quill_error(request: Request, exc: QuillError):
        return respond(request, api_error(exc))

    # Starlette answers with this one outside the middleware, then re-raises: the traceback is logged.
    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return respond(request, internal_error(exc))


_TYPE_TAGS = re.compile(r"^(str|int|float|bool|list|dict|none|function-\w+|union|tagged-union|literal)\b|[\[\]]")


def validation_error(errors: Sequence[dict]) -> APIError:
    """The first pydantic error as an OpenAI 400: 'Invalid 'max_tokens': ...' with param set. A rule
    of the protocol models that raised a typed error (`InvalidRequestError`) keeps its own; a nested
    model's rule names its field relative to itself ('.tool_call_id': messages[1].tool_call_id)."""
    if not errors:
        return APIError(400, "Invalid request body.")
    # A rule that raised its own error says more than the other shapes of a union failing (a list
    # of stop strings with a lone surrogate is not "not a string").
    error = next((e for e in errors if isinstance((e.get("ctx") or {}).get("error"), QuillError)), errors[0])
    kind = error.get("type", "")
    raised = (error.get("ctx") or {}).get("error")
    loc = [part for part in error.get("loc", ()) if part != "body"]
    if isinstance(raised, QuillError):
        if raised.param is None:  # raised by a field's own rule: the field is where pydantic found it
            raised.param = _param(loc)
        elif raised.param.startswith("."):
            raised.param = (_param(loc) or "") + raised.param
        return api_error(raised)
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(400, f"We could not parse the JSON body of your request ({detail}). The body must be valid JSON.",
                        code="invalid_json")
    param = _param(loc)
    if kind == "missing" and param is None:
        return APIError(400, "The request body is missing: send a JSON object.")
    message = error.get("msg", "invalid value")
    if param in _UNIONS and len(loc) > 1:  # no branch of the union matched: say what is accepted
        return APIError(400, f"Invalid '{param}': expected {_UNIONS[param]}.", param=param, code="invalid_value")
    if param is None:
        return APIError(400, f"Invalid request body: {message}")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    code = "missing_required_parameter" if kind == "missing" else "invalid_value"
    return APIError(400, f"Invalid '{param}': {message}.{more}", param=param, code=code)


# Fields that take one of several shapes: when none matches, what they accept (pydantic would list
# each branch's complaint: "Input should be a valid string (and 1 more problems)").
_UNIONS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids, none of them empty",
    "input": "a string, or a non-empty list of input items",
}


def _param(loc: list) -> str | None:
    """A pydantic location as the field's name in the request: messages[0].content."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif not _TYPE_TAGS.search(str(part)):
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or None

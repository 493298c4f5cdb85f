"""Errors as OpenAI-shaped HTTP responses: `APIError` (a status plus OpenAI's error body), the
app's exception handlers, and the mapping of what else can go wrong (pydantic validation errors,
Quill's `InvalidRequestError`/`ContextLengthError`, engine failures) onto an `APIError` whose
`param` names the request field at fault, as OpenAI's API does.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from quill.engine.async_engine import EngineStepError
from quill.errors import ContextLengthError, InvalidRequestError, QuillError
from quill.sampling_params import SamplingParams
from quill.server.protocol import error_body

log = logging.getLogger("quill.server")

_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)


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


def add_exception_handlers(app: FastAPI) -> None:
    def respond(request: Request, error: APIError) -> JSONResponse:
        details = request.scope.get("quill")
        if details is not None:
            details.setdefault("error", error.message)
        return error.response()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request: Request, exc: RequestValidationError):
        return respond(request, validation_error(exc.errors()))

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


def param_of(message: str) -> str | None:
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
        param = param_of(str(exc))
        if param == "prompt":
            param = prompt_param
        return APIError(400, str(exc), param=param)
    return APIError(500, str(exc), type="server_error")


def engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QuillError):
        return _quill_error(exc, "prompt")
    if isinstance(exc, EngineStepError):
        return APIError(503 if "shutting down" in str(exc) else 500, str(exc), type="server_error")
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error")


_TYPE_TAGS = re.compile(r"^(str|int|float|bool|list|dict|none|function-\w+|union|tagged-union|literal)\b|[\[\]]")


def validation_error(errors: Sequence[dict]) -> APIError:
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

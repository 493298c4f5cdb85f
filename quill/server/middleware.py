"""The ASGI middleware in front of every request (`Gate`): the API-key check (and which paths answer
without it: `is_public`), the request body size limit (read and drained before the 413), the
`X-Request-Id` header, the HTTP request counter and the request's log line (`RequestRecord`, opened
here and written once the response is over). It also makes the JSON endpoints read their body as
JSON whatever Content-Type the client sent, and refuses a body that is not UTF-8.
Which paths are endpoints, and which of those take a JSON body, it asks the app's router: a new
route gets its own metric label and, when it takes a JSON body, a log line, without a list here.
"""
from __future__ import annotations

import hmac
import time
import uuid

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Router

from quill.server.config import ServerConfig
from quill.server.errors import APIError
from quill.server.metrics import ServerMetrics
from quill.server.request_log import RequestRecord
from quill.server.ui import PAGE_PATHS

# Paths that stay open when an API key is set: probes rarely carry keys, and the chat page has to
# load before it can ask for the key. Neither holds data.
OPEN_PATHS = frozenset({"/health", "/version", *PAGE_PATHS})
# Open only when the operator says so (--public-metrics, --public-docs): the metrics name the model
# and show its traffic and cost; the docs describe the API to anyone who can reach the port.
METRICS_PATHS = frozenset({"/metrics"})
DOCS_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def is_public(path: str, config: ServerConfig) -> bool:
    """Whether `path` answers without the API key."""
    return (path in OPEN_PATHS or (config.public_metrics and path in METRICS_PATHS)
            or (config.public_docs and path in DOCS_PATHS))
# Bodies past the limit are read and dropped up to this many bytes before the 413, so the client
# can read the answer instead of a connection reset; beyond it the connection is just closed.
_DRAIN_LIMIT = 64 << 20


class Gate:
    """Pure ASGI middleware around every request: API key, body size limit, request id, the HTTP
    request counter and the request log line."""

    def __init__(self, app, config: ServerConfig, metrics: ServerMetrics, router: Router) -> None:
        self.app = app
        self.config = config  # read per request
        self.metrics = metrics
        self.router = router

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config = self.config
        path, method = scope["path"], scope["method"]
        route = self._route(path)
        takes_json = isinstance(route, APIRoute) and route.body_field is not None
        started = time.perf_counter()
        record = RequestRecord(uuid.uuid4().hex, path)
        record.attach(scope)
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", record.request_id.encode())]
            await send(message)

        try:
            if config.api_key and not is_public(path, config) and not self._authorized(scope, config.api_key):
                error = APIError(401, "Incorrect or missing API key. Send it as `Authorization: Bearer KEY`.",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                record.failed(error.message)
                return await error.response()(scope, receive, send_with_id)
            if method in ("POST", "PUT", "PATCH"):
                body, too_large = await self._read_body(scope, receive, config.max_body_bytes)
                if body is None:  # the client left while sending
                    status = 499
                    return
                if too_large:
                    error = APIError(413, f"The request body is larger than the limit of {config.max_body_bytes} bytes.",
                                     code="request_too_large")
                    record.failed(error.message)
                    return await error.response()(scope, receive, send_with_id)
                if takes_json:
                    if (error := _not_utf8(body)) is not None:
                        record.failed(error.message)
                        return await error.response()(scope, receive, send_with_id)
                    _force_json_content_type(scope)
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.http_requests.labels(route.path_format if route else "other", str(status)).inc()
            if method == "POST" and takes_json:
                record.write(status, time.perf_counter() - started, config.log_prompts)

    def _route(self, path: str) -> BaseRoute | None:
        """The route serving `path` (whatever the method), if any: its path is the metric's label."""
        return next((r for r in self.router.routes if getattr(r, "path_regex", None) and r.path_regex.match(path)), None)

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


def _not_utf8(body: bytes) -> APIError | None:
    """JSON bodies are UTF-8 (RFC 8259); anything else gets an error that says where it breaks."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return APIError(400, f"The request body is not valid UTF-8: byte 0x{body[exc.start]:02x} at offset "
                             f"{exc.start} ({exc.reason}). Send JSON encoded as UTF-8.", code="invalid_json")
    return None


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

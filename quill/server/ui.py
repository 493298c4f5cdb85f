"""The chat page `quill serve` shows at `/`: a few static files (quill/server/static) and the
server's sampling defaults for the page's placeholders. The page talks to the public API only
(/v1/models, /v1/chat/completions with streaming, /metrics), with the user's API key when one is set.

The page itself stays open when the server has an API key (it holds no data and asks for the key);
`PAGE_PATHS` is what the API-key gate lets through. Every page response carries a
Content-Security-Policy that allows scripts, styles and connections from this server only and no
inline script: model output is rendered as text nodes by the page, and the policy is the second
line of defence should that ever slip. Files are read once, at app creation, and served with an
ETag so a browser revalidates instead of running an old page after an upgrade.
"""
from __future__ import annotations

import hashlib
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from quill.sampling_params import SamplingParams
from quill.server.errors import APIError
from quill.server.sampling import default_max_tokens
from quill.server.state import ServerState

# name -> media type of every file the page is made of; nothing else under /ui/ is served.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "store.js": "text/javascript; charset=utf-8",
    "view.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "highlight.js": "text/javascript; charset=utf-8",
    "load.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
CONFIG_PATH = "/ui/config.json"
# Paths that need no API key: the page, its files and its settings (none of them holds data).
PAGE_PATHS = frozenset({"/", CONFIG_PATH, *(f"/ui/{name}" for name in ASSETS if name != "index.html")})

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate with the ETag: an upgraded server serves its new page
}


def add_ui(app: FastAPI, server: ServerState) -> None:
    """Serve the chat page at `/` and its files under `/ui/`."""
    files = _load_assets()

    def asset(name: str, request: Request) -> Response:
        body, etag = files[name]
        headers = {**_SECURITY_HEADERS, "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=ASSETS[name], headers=headers)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page(request: Request):
        return asset("index.html", request)

    @app.get(CONFIG_PATH, include_in_schema=False)
    async def page_config():
        return JSONResponse(page_settings(server), headers=_SECURITY_HEADERS)

    @app.api_route("/ui/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def page_file(name: str, request: Request):
        if name not in ASSETS or name == "index.html":
            raise APIError(404, f"No page file named {name!r}.", type="not_found_error")
        return asset(name, request)


def page_settings(server: ServerState) -> dict:
    """What the page shows for the fields a user leaves empty (the page then leaves them out of
    the request): the server's fallbacks, which are `SamplingParams`' defaults (test_ui.py checks
    by sampling that a request without them matches), and for max_tokens the server's default (at
    most the rest of the context window)."""
    return {
        "defaults": {"temperature": SamplingParams.temperature, "top_p": SamplingParams.top_p, "seed": None},
        "default_max_tokens": default_max_tokens(server.config),
        "max_model_len": server.limits.max_model_len,
    }


def _load_assets() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("quill.server") / "static"
    files = {}
    for name in ASSETS:
        body = (folder / name).read_bytes()
        files[name] = (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return files

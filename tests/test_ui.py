"""The chat page's server side (quill/server/ui.py), over HTTP without a browser: the files and their
security headers, --no-ui, the API key gate, the defaults the page shows, and the packaging.
test_chat_page.py drives the page itself in Chromium."""
from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest

from engine_helpers import tiny_text_engine
from quill.cli import build_parser
from quill.server import BackgroundServer, ServerConfig, create_app
from quill.server.ui import ASSETS, CONFIG_PATH, CONTENT_SECURITY_POLICY, PAGE_PATHS

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "quill" / "server" / "static"
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    app = create_app(tiny_text_engine(tiny_model_dir("llama")),
                     ServerConfig(served_model_name="tiny", chat_template=TEMPLATE, response_cache=False))
    with BackgroundServer(app) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield app, client


def test_page_and_files_are_served_with_their_types_and_a_strict_policy(served):
    _, client = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, media_type in ASSETS.items():
        path = "/" if name == "index.html" else f"/ui/{name}"
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == media_type
        assert response.content == (STATIC / name).read_bytes()
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_unknown_page_files_are_404_and_nothing_outside_the_folder_is_reachable(served):
    _, client = served
    for path in ("/ui/nope.js", "/ui/index.html", "/ui/..%2Fui.py", "/ui/%2e%2e/app.py", "/ui/"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert b"import" not in response.content


def test_unchanged_files_revalidate_with_304(served):
    _, client = served
    first = client.get("/ui/chat.js")
    again = client.get("/ui/chat.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    changed = client.get("/ui/chat.js", headers={"If-None-Match": '"something else"'})
    assert changed.status_code == 200 and changed.content == first.content


def test_head_request_for_the_page(served):
    _, client = served
    response = client.head("/")
    assert response.status_code == 200 and response.content == b""


def test_page_loads_nothing_from_elsewhere():
    """Every file the page references is one of ours, under /ui/; no file names another host."""
    html = (STATIC / "index.html").read_text()
    references = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert references and all(ref.startswith("/ui/") and ref[4:] in ASSETS for ref in references), references
    for name in ASSETS:
        text = (STATIC / name).read_text()
        assert not re.search(r"(?:src|href)=[\"']?(?:https?:)?//", text), name
        assert "@import" not in text and "url(http" not in text, name
        imports = re.findall(r'from "\./([^"]+)"', text)
        assert all(module in ASSETS for module in imports), (name, imports)


def test_no_ui_leaves_the_api_alone(tiny_model_dir):
    app = create_app(tiny_text_engine(tiny_model_dir("llama")), ServerConfig(served_model_name="tiny", ui=False))
    with BackgroundServer(app) as server:
        assert httpx.get(f"{server.url}/").status_code == 404
        assert httpx.get(f"{server.url}/ui/chat.js").status_code == 404
        assert httpx.get(f"{server.url}{CONFIG_PATH}").status_code == 404
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "tiny"


def test_cli_no_ui_flag():
    parser = build_parser()
    assert parser.parse_args(["serve", "smollm2", "--no-ui"]).no_ui is True
    assert parser.parse_args(["serve", "smollm2"]).no_ui is False


def test_api_key_guards_the_api_but_not_the_page(served):
    app, client = served
    config = app.state.config
    config.api_key = "sekret"
    try:
        for path in sorted(PAGE_PATHS):
            assert client.get(path).status_code == 200, path
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert client.get("/metrics").status_code == 401  # the page sends the key with every call
        assert client.get("/metrics", headers={"Authorization": "Bearer sekret"}).status_code == 200
    finally:
        config.api_key = None


def test_page_settings_show_the_servers_real_defaults(served):
    """The placeholders the page shows are what a request without the field gets: seeded sampling
    without temperature/top_p equals sampling with the advertised values, and differs from
    another temperature (so the comparison can tell)."""
    app, client = served
    settings = client.get(CONFIG_PATH).json()
    assert settings["max_model_len"] == app.state.server.limits.max_model_len
    assert settings["default_max_tokens"] == app.state.config.default_max_tokens and settings["defaults"]["seed"] is None

    def tokens(**fields) -> list:
        body = {"prompt": [1, 5, 9], "max_tokens": 12, "seed": 1234, "logprobs": 0, "cache": False, **fields}
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        return choice["logprobs"]["tokens"]

    defaults = settings["defaults"]
    plain = tokens()
    assert tokens(temperature=defaults["temperature"], top_p=defaults["top_p"]) == plain
    assert tokens(temperature=0.3) != plain


def test_max_tokens_cap_reaches_the_page(served):
    app, client = served
    app.state.config.max_tokens_cap = 64
    try:
        assert client.get(CONFIG_PATH).json()["default_max_tokens"] == 64
    finally:
        app.state.config.max_tokens_cap = None


def test_static_files_are_package_data():
    """pyproject's package-data ships every file the page is made of (wheels and sdists alike)."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["quill"]
    for name in ASSETS:
        relative = f"server/static/{name}"
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative
    assert sorted(p.name for p in STATIC.iterdir()) == sorted(ASSETS)  # no stray file ships or goes unserved

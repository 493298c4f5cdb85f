"""The OpenAI-compatible HTTP server (`quill serve`): see `app.py`.

The names below load on first use, so that `quill.server.config` (the CLI's defaults) can be
imported without FastAPI and the engine."""
from __future__ import annotations

import importlib

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "serve"]
_HOMES = {"create_app": "quill.server.app", "ServerConfig": "quill.server.config",
          "BackgroundServer": "quill.server.runner", "serve": "quill.server.runner"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'quill.server' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)

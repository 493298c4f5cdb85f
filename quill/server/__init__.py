"""The OpenAI-compatible HTTP server (`quill serve`): see `app.py`."""
from quill.server.app import create_app
from quill.server.config import ServerConfig
from quill.server.runner import BackgroundServer, serve

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "serve"]

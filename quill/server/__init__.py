"""The OpenAI-compatible HTTP server (`quill serve`): see `app.py`."""
from quill.server.app import BackgroundServer, ServerConfig, create_app, serve

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "serve"]

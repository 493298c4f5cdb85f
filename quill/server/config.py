"""The server's settings. Parts that enforce a setting read it from this object on every request,
so a change to a running app's config (tests do this) takes effect at once."""
from __future__ import annotations

from dataclasses import dataclass

from quill.cost import DEFAULT_HOURLY_COST, Price


@dataclass
class ServerConfig:
    served_model_name: str | None = None  # default: the checkpoint's file or directory name
    api_key: str | None = None  # clients must send `Authorization: Bearer <key>` when set
    max_queue: int = 256  # sequences allowed to wait for their first token; more get 429
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    max_tokens_cap: int | None = None  # per-request max_tokens is clamped to this
    log_prompts: bool = False  # put prompt text into the request log
    chat_template: str | None = None  # Jinja2 source overriding the model's own template
    shutdown_grace: float = 10.0  # seconds in-flight requests get to finish at shutdown
    retry_after: int = 1  # seconds, sent with 429
    hourly_cost: float = DEFAULT_HOURLY_COST  # dollars per hour of this machine: the self-hosted price
    reference_prices: dict[str, Price] | None = None  # hosted APIs to compare with (default: quill.cost's)
    # The response cache: repeated deterministic requests (greedy or seeded) answered without the engine.
    response_cache: bool = True
    response_cache_path: str | None = None  # also keep answers in this SQLite file, across restarts
    response_cache_entries: int = 1024  # in memory; least recently used answers go first
    response_cache_memory: int = 64 << 20  # bytes of answers (JSON) in memory
    response_cache_ttl: float | None = None  # seconds an answer may be served; None: until evicted
    ui: bool = True  # serve the chat page at / (quill/server/ui.py)

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
    # max_tokens of a request that sets none: the rest of the context window, at most this. The
    # window can be 8K-128K tokens; a client that forgets max_tokens (or stops reading) should not
    # hold a sequence slot and its KV blocks for that long. OpenAI's default is the model's output
    # limit (a few thousand tokens), vLLM's the whole window; 1024 is a long answer (about 750 words).
    default_max_tokens: int = 1024
    max_tokens_cap: int | None = None  # per-request max_tokens is clamped to this
    log_prompts: bool = False  # put prompt text into the request log
    chat_template: str | None = None  # Jinja2 source overriding the model's own template
    shutdown_grace: float = 10.0  # seconds in-flight requests get to finish at shutdown
    retry_after: int = 1  # seconds, sent with 429
    # A stream whose connection has accepted no data for this long while data waits is aborted and
    # its KV blocks freed (None: never). Small socket buffers (runner.py) make "accepted" close to
    # "read by the client".
    stream_idle_timeout: float | None = 30.0
    # Bytes of a stream's events the server holds for a client that reads slower than the model
    # writes; past this the stream is aborted as stalled. About a thousand token chunks.
    stream_buffer_bytes: int = 256 << 10
    request_timeout: float | None = None  # seconds from admission to the last token; None: no deadline
    # With an API key, these answer without it too: /metrics (scrapers), /docs, /redoc and /openapi.json.
    public_metrics: bool = False
    public_docs: bool = False
    hourly_cost: float = DEFAULT_HOURLY_COST  # dollars per hour of this machine: the self-hosted price
    reference_prices: dict[str, Price] | None = None  # hosted APIs to compare with (default: quill.cost's)
    # The response cache: repeated deterministic requests (greedy or seeded) answered without the engine.
    response_cache: bool = True
    response_cache_path: str | None = None  # also keep answers in this SQLite file, across restarts
    response_cache_entries: int = 1024  # in memory; least recently used answers go first
    response_cache_memory: int = 64 << 20  # bytes of answers (JSON) in memory
    response_cache_ttl: float | None = None  # seconds an answer may be served; None: until evicted
    # The Responses API's stored responses (`store`, `previous_response_id`): the most recent in
    # memory, and in the response cache's file too when it has one.
    responses_store_entries: int = 1024
    responses_store_memory: int = 64 << 20  # bytes of stored responses (JSON) in memory
    ui: bool = True  # serve the chat page at / (quill/server/ui.py)

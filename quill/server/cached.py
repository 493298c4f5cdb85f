"""The server's side of the response cache (`quill.cache`): building it from the config, which
requests may use it, their keys, and what an entry keeps of a finished answer. `respond.py`
replays a hit through the endpoint's `Reply`, shaped like a live response."""
from __future__ import annotations

import dataclasses
import sqlite3

from fastapi import Request

from quill.cache import MemoryStore, ResponseCache, SQLiteStore, cache_key
from quill.errors import QuillError
from quill.sampling_params import SamplingParams
from quill.server.config import ServerConfig
from quill.server.protocol import SamplingFields

# Response header: `hit` (served from the cache), `miss` (computed, then stored) or `bypass`.
CACHE_HEADER = "X-Quill-Cache"


def build_response_cache(config: ServerConfig) -> ResponseCache | None:
    """The cache a `ServerConfig` asks for, or None when it is switched off."""
    if not config.response_cache:
        return None
    memory = MemoryStore(config.response_cache_entries, config.response_cache_memory)
    disk = None
    if config.response_cache_path:
        try:
            disk = SQLiteStore(config.response_cache_path)
        except sqlite3.Error as exc:  # e.g. a directory that does not exist or is not writable
            raise QuillError(f"cannot open the response cache {config.response_cache_path}: {exc}") from None
    return ResponseCache(memory, disk, ttl=config.response_cache_ttl)


def may_use_cache(request: Request, body: SamplingFields, params: SamplingParams) -> bool:
    """Deterministic requests (greedy, or seeded) whose client did not opt out, with the header
    `Cache-Control: no-store` or the body field `"cache": false`."""
    deterministic = params.temperature == 0.0 or params.seed is not None
    no_store = "no-store" in request.headers.get("cache-control", "").lower()
    return deterministic and body.cache is not False and not no_store


def answer_key(identity: dict, endpoint: str, prompts: list[list[int]], params: SamplingParams,
               shape: dict) -> str:
    """Everything a response body depends on: the model (`identity`), the endpoint and the fields
    that shape its body, the prompts' token ids and every sampling parameter."""
    return cache_key(**identity, endpoint=endpoint, prompts=prompts, params=dataclasses.asdict(params), shape=shape)


def stored_answer(choices: list[dict], usage: dict) -> dict:
    """What the cache keeps of a finished answer: its choices, token counts and self-hosted cost
    (so that a hit reports what it saved at the price this computation actually had)."""
    return {"choices": choices, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"], "cost_usd": usage["quill"]["cost"]["self_hosted_usd"]}

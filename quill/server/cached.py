"""The server's side of the response cache (`quill.cache`): which requests may use it, and cache
hits replayed as a JSON body's usage or as a server-sent event stream shaped like a live one (the
role first, the same id on every chunk, each choice's finish reason once, the usage chunk when
asked for, then [DONE]). A hit replays each choice's text in one chunk rather than token by token.
"""
from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterable, Iterator

from fastapi import Request

from quill.cache import MemoryStore, ResponseCache, SQLiteStore
from quill.errors import QuillError
from quill.sampling_params import SamplingParams
from quill.server.runs import chat_chunk, completion_chunk, sse, timings

# Response header: `hit` (served from the cache), `miss` (computed, then stored) or `bypass`.
CACHE_HEADER = "X-Quill-Cache"


def build_response_cache(config) -> ResponseCache | None:
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


def may_use_cache(request: Request, body, params: SamplingParams) -> bool:
    """Deterministic requests (greedy, or seeded) whose client did not opt out, with the header
    `Cache-Control: no-store` or the body field `"cache": false`."""
    deterministic = params.temperature == 0.0 or params.seed is not None
    no_store = "no-store" in request.headers.get("cache-control", "").lower()
    return deterministic and body.cache is not False and not no_store


def hit_usage(response: dict, elapsed: float, cost: dict) -> dict:
    """Usage of a replayed response: the original token counts (what the answer is worth), every
    prompt token counted as cached, no engine timings, `quill.cache_hit`, and its `cost`
    (`CostModel.charge_hit`: nothing self-hosted, and what computing the answer had cost)."""
    prompt, completion = response["prompt_tokens"], response["completion_tokens"]
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": prompt},
        "quill": {**timings([], 0), "e2e_latency": round(elapsed, 6), "cache_hit": True, "cost": cost},
    }


def chat_replay(head: dict, choices: list[dict]) -> Iterator[str]:
    for choice in choices:
        yield chat_chunk(head, choice["index"], {"role": "assistant", "content": ""})
        content = choice["message"]["content"]
        yield chat_chunk(head, choice["index"], {"content": content} if content else {}, choice["logprobs"],
                         choice["finish_reason"])


def completion_replay(head: dict, choices: list[dict]) -> Iterator[str]:
    for choice in choices:
        yield completion_chunk(head, choice["index"], choice["text"], choice["logprobs"], choice["finish_reason"])


async def replay_events(chunks: Iterable[str], head: dict, usage: dict | None) -> AsyncIterator[str]:
    for chunk in chunks:
        yield chunk
    if usage is not None:
        yield sse({**head, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"

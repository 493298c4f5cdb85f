"""Stored Responses API objects (`store: true`, OpenAI's default): what `GET /v1/responses/{id}`
returns and what `previous_response_id` continues from. Each entry is the response object and the
conversation it ended (the chat messages of every turn so far, its output included, without the
`instructions`, which OpenAI does not carry over to the next turn).

Entries live in an LRU `MemoryStore` bounded by count and bytes, and, when the server has a
response cache file, also in a table of that SQLite file, so conversations survive restarts and
are shared by the servers that share the file. Entries are JSON text, never pickle.
"""
from __future__ import annotations

import json
import sqlite3
import time

from quill.cache import MemoryStore, Record, SQLiteStore, TieredStore
from quill.errors import QuillError
from quill.server.config import ServerConfig

TABLE = "stored_responses"  # beside the response cache's own table in its file


class ResponseStore:
    def __init__(self, memory: MemoryStore, disk: SQLiteStore | None = None) -> None:
        self.tiers = TieredStore(memory, disk)

    def put(self, response: dict, conversation: list[dict]) -> None:
        body = json.dumps({"response": response, "conversation": conversation}, separators=(",", ":"))
        self.tiers.put(response["id"], Record(body, time.time()))

    def get(self, response_id: str) -> dict | None:
        """{"response": ..., "conversation": [...]} (a fresh copy), or None when not stored."""
        record = self.tiers.get(response_id)
        return None if record is None else json.loads(record.body)

    def delete(self, response_id: str) -> bool:
        """Whether it was stored."""
        found = self.tiers.get(response_id) is not None
        self.tiers.delete(response_id)
        return found

    def close(self) -> None:
        self.tiers.close()


def build_response_store(config: ServerConfig) -> ResponseStore:
    """In memory (`responses_store_entries`, `responses_store_memory`), and in the response cache's
    SQLite file when the config names one."""
    memory = MemoryStore(config.responses_store_entries, config.responses_store_memory)
    disk = None
    if config.response_cache and config.response_cache_path:
        try:
            disk = SQLiteStore(config.response_cache_path, table=TABLE)
        except sqlite3.Error as exc:
            raise QuillError(f"cannot open the response store {config.response_cache_path}: {exc}") from None
    return ResponseStore(memory, disk)

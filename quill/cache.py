"""The response cache: whole answers to repeated deterministic requests, served without the engine.

The prefix cache reuses computation inside the engine; this cache sits in front of it and reuses
finished responses. A key (`cache_key`) is a hash of everything that determines a response body:
the model and its file's identity (`model_identity`), the prompt token ids after the chat template,
every sampling parameter, and the response's shape (endpoint, logprobs, echo). Only deterministic
requests (greedy, or a fixed seed) belong here; the server decides which those are.

`ResponseCache` keeps entries in an LRU `MemoryStore` bounded by entries and bytes, optionally in
front of a persistent `SQLiteStore` that survives restarts, with an optional TTL. It also
coalesces identical requests: `acquire` gives the first caller a `Lease` to compute the answer and
makes the others wait for it. Entries are JSON text (never pickle): what is read back is data only.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("quill.cache")

# Part of every key: bump it when the stored entries' layout changes, so old entries never match.
# 2: entries carry the self-hosted cost of computing them (`cost_usd`).
KEY_FORMAT = 2


def cache_key(**parts) -> str:
    """A stable hash of JSON-serializable parts (their order does not matter) and `KEY_FORMAT`."""
    text = json.dumps({**parts, "key_format": KEY_FORMAT}, sort_keys=True,
                      separators=(",", ":"))  # ASCII: even lone surrogates encode
    return hashlib.sha256(text.encode()).hexdigest()


def model_identity(path: str | Path) -> str:
    """Identity of a model's file (or directory's files): path, size and modification time, which
    change when the file is replaced. Cheap, unlike hashing gigabytes of weights at start-up."""
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return cache_key(files=stats)


@dataclass(frozen=True)
class Record:
    body: str  # the response's JSON text
    stored_at: float  # time.time() when stored, for the TTL

    @property
    def size(self) -> int:
        return len(self.body.encode())


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    memory_entries: int = 0
    memory_bytes: int = 0
    disk_entries: int = 0
    disk_bytes: int = 0


# ------------------------------------------------------------------------------ stores


class MemoryStore:
    """An LRU map of records, bounded by count and by bytes of JSON text."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._records: OrderedDict[str, Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> Record | None:
        record = self._records.get(key)
        if record is not None:
            self._records.move_to_end(key)
        return record

    def put(self, key: str, record: Record) -> None:
        self.delete(key)
        if record.size > self.max_bytes or self.max_entries < 1:
            return  # would evict everything else and still not fit
        self._records[key] = record
        self.bytes += record.size
        while len(self._records) > self.max_entries or self.bytes > self.max_bytes:
            _, evicted = self._records.popitem(last=False)
            self.bytes -= evicted.size
            self.evictions += 1

    def delete(self, key: str) -> None:
        record = self._records.pop(key, None)
        if record is not None:
            self.bytes -= record.size


class SQLiteStore:
    """Records in an SQLite file that survives restarts and can be shared by several servers.

    WAL mode lets readers run beside a writer; each write is one transaction, and each record
    carries a checksum of its text, so a half-written or damaged entry is never served. A file that
    is not a readable database (garbage, truncated) is moved aside with a warning and replaced by an
    empty one: losing a cache is cheap, refusing to start is not. Oldest entries go beyond
    `max_entries`. One lock serializes the connection, which any thread may use. `table` lets
    another kind of record share the file (the server's stored Responses API objects).
    """

    def __init__(self, path: str | Path, max_entries: int = 100_000, table: str = "responses") -> None:
        if not table.isidentifier():
            raise ValueError(f"not a table name: {table!r}")
        self.path = Path(path)
        self.max_entries = max_entries
        self.table = table
        self.evictions = 0
        self._lock = threading.Lock()
        try:
            self._db: sqlite3.Connection | None = self._open()
        except (sqlite3.Error, _Damaged) as exc:
            if not _is_damage(exc):  # locked, unwritable directory, ...: the file may be fine
                raise
            self._db = self._rebuild(exc)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a lost entry is only a miss
            (status,) = db.execute("PRAGMA quick_check").fetchone()
            if status != "ok":
                raise _Damaged(f"integrity check failed: {status}")
            db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (key TEXT PRIMARY KEY, body TEXT NOT NULL, "
                       "checksum TEXT NOT NULL, stored_at REAL NOT NULL, size INTEGER NOT NULL)")
            db.execute(f"CREATE INDEX IF NOT EXISTS {self.table}_by_age ON {self.table} (stored_at)")
        except BaseException:
            db.close()
            raise
        return db

    def _rebuild(self, error: Exception) -> sqlite3.Connection:
        """Move the unreadable file (and its WAL) aside and start an empty database."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.replace(f"{aside}{suffix}")
        log.warning("response cache %s is damaged (%s): moved it to %s and started an empty one",
                    self.path, error, aside)
        return self._open()

    def get(self, key: str) -> Record | None:
        row = self._run(lambda db: db.execute(
            f"SELECT body, checksum, stored_at FROM {self.table} WHERE key = ?", (key,)).fetchone())
        if row is None:
            return None
        body, checksum, stored_at = row
        if _checksum(body) != checksum:
            log.warning("response cache %s: entry %s fails its checksum; dropped", self.path, key[:12])
            self.delete(key)
            return None
        return Record(body, stored_at)

    def put(self, key: str, record: Record) -> None:
        def write(db: sqlite3.Connection) -> int:
            with _transaction(db):
                db.execute(f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?, ?, ?, ?)",
                           (key, record.body, _checksum(record.body), record.stored_at, record.size))
                (count,) = db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()
                excess = max(0, count - self.max_entries)
                if excess:
                    db.execute(f"DELETE FROM {self.table} WHERE key IN "
                               f"(SELECT key FROM {self.table} ORDER BY stored_at LIMIT ?)", (excess,))
                return excess

        self.evictions += self._run(write) or 0

    def delete(self, key: str) -> None:
        self._run(lambda db: db.execute(f"DELETE FROM {self.table} WHERE key = ?", (key,)))

    def totals(self) -> tuple[int, int]:
        """(entries, bytes of JSON text) in the file, all writers included."""
        row = self._run(lambda db: db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM {self.table}").fetchone())
        return row or (0, 0)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _run(self, operation):
        """Run one operation; a busy or damaged database costs a miss (and a rebuild), never the request."""
        with self._lock:
            if self._db is None:  # closed: the server is shutting down
                return None
            try:
                return operation(self._db)
            except sqlite3.Error as exc:
                if not _is_damage(exc):  # locked past the timeout, disk full, ...
                    log.warning("response cache %s: %s", self.path, exc)
                    return None
                self._db.close()
                self._db = self._rebuild(exc)
                return None


class _Damaged(Exception):
    """The database opens but fails its integrity check."""


def _is_damage(error: Exception) -> bool:
    """Whether the file is damaged or not a database at all (rather than busy, full or closed)."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, _Damaged) or (code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT,
                                                                                   sqlite3.SQLITE_NOTADB))


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error: readers never see half a write."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


class TieredStore:
    """A `MemoryStore` in front of an optional `SQLiteStore`: writes go to both, and a read that
    misses memory falls back to the file and brings what it finds back into memory."""

    def __init__(self, memory: MemoryStore, disk: SQLiteStore | None = None) -> None:
        self.memory = memory
        self.disk = disk

    def get(self, key: str) -> Record | None:
        record = self.memory.get(key)
        if record is None and self.disk is not None:
            record = self.disk.get(key)
            if record is not None:
                self.memory.put(key, record)
        return record

    def put(self, key: str, record: Record) -> None:
        self.memory.put(key, record)
        if self.disk is not None:
            self.disk.put(key, record)

    def delete(self, key: str) -> None:
        self.memory.delete(key)
        if self.disk is not None:
            self.disk.delete(key)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()


# ------------------------------------------------------------------------------- cache


class Lease:
    """The right (and duty) to compute one key's response: `settle` it with the response, or with
    None when there is none to share (failure, abort); either way the waiters wake up."""

    def __init__(self, cache: ResponseCache, key: str, flight: asyncio.Future) -> None:
        self.cache = cache
        self.key = key
        self._flight = flight

    def settle(self, response: dict | None) -> None:
        """Store the response and hand it to the waiters. Only the first call counts."""
        if self._flight.done():
            return
        body = None
        if response is not None:
            body = json.dumps(response, separators=(",", ":"))  # ASCII, as in `cache_key`
            self.cache.put(self.key, body)
        self.cache._in_flight.pop(self.key, None)
        self._flight.set_result(body)


class ResponseCache:
    def __init__(self, memory: MemoryStore, disk: SQLiteStore | None = None, ttl: float | None = None) -> None:
        self.memory = memory
        self.disk = disk
        self._tiers = TieredStore(memory, disk)
        self.ttl = ttl
        self.hits = 0
        self.misses = 0
        self._in_flight: dict[str, asyncio.Future] = {}

    async def acquire(self, key: str) -> dict | Lease:
        """The cached response for `key` (a hit), or a `Lease` to compute it (a miss). Callers that
        come while another computes the same key wait for its answer instead of computing it again;
        if that computation ends without an answer, one of them gets the next lease."""
        while True:
            body = self._get(key)
            if body is None:
                flight = self._in_flight.get(key)
                if flight is None:
                    self.misses += 1
                    flight = self._in_flight[key] = asyncio.get_running_loop().create_future()
                    return Lease(self, key, flight)
                # shield: a waiter whose client leaves must not cancel the shared future.
                body = await asyncio.shield(flight)
            if body is not None:
                self.hits += 1
                return json.loads(body)  # a fresh copy per caller

    def put(self, key: str, body: str) -> None:
        self._tiers.put(key, Record(body, time.time()))

    def _get(self, key: str) -> str | None:
        record = self._tiers.get(key)
        if record is None:
            return None
        if self.ttl is not None and time.time() - record.stored_at > self.ttl:
            self._tiers.delete(key)
            return None
        return record.body

    def stats(self) -> CacheStats:
        disk_entries, disk_bytes = self.disk.totals() if self.disk is not None else (0, 0)
        evictions = self.memory.evictions + (self.disk.evictions if self.disk is not None else 0)
        return CacheStats(hits=self.hits, misses=self.misses, evictions=evictions, memory_entries=len(self.memory),
                          memory_bytes=self.memory.bytes, disk_entries=disk_entries, disk_bytes=disk_bytes)

    def close(self) -> None:
        self._tiers.close()

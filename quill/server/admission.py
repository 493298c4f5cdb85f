"""Admission control and the books of who is in: the one object that decides whether a request
may start (503 while shutting down, 429 with `Retry-After` when too many sequences already wait
for their first token) and keeps count of the admitted sequences (waiting, then running) and of
the request tasks in flight, which shutdown gives a grace period and then cancels.

Each admitted request holds a `Ticket` for its sequences; whatever way the request ends, releasing
the ticket returns its sequences, so the counts go back to zero when the server is idle."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from quill.server.config import ServerConfig
from quill.server.errors import APIError, shutting_down


class Admission:
    def __init__(self, config: ServerConfig, engine_waiting: Callable[[], int]) -> None:
        self.config = config  # max_queue and retry_after, read per request
        self._engine_waiting = engine_waiting  # sequences the engine's scheduler has waiting
        self.waiting = 0  # admitted sequences without their first token yet
        self.running = 0  # admitted sequences generating
        self.active_tasks: set[asyncio.Task] = set()  # request handlers and response streams
        self.closed = False  # shutting down: no new requests

    def check_open(self) -> None:
        if self.closed:
            raise shutting_down()

    def admit(self, num_sequences: int) -> Ticket:
        """Back-pressure: refuse work when too many sequences already wait for their first token."""
        self.check_open()
        waiting = max(self.waiting, self._engine_waiting())
        max_queue = self.config.max_queue
        if waiting + num_sequences > max_queue:
            raise APIError(429, f"The server is busy ({waiting} requests waiting, the limit is {max_queue}). "
                                "Please retry shortly.", type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.config.retry_after)})
        self.waiting += num_sequences
        return Ticket(self, num_sequences)

    @contextmanager
    def track(self, task: asyncio.Task) -> Iterator[None]:
        """Count a task as in flight (shutdown waits for it, then cancels it) while the block runs."""
        self.active_tasks.add(task)
        try:
            yield
        finally:
            self.active_tasks.discard(task)

    async def drain(self, grace: float) -> None:
        """Refuse new requests, give the tasks in flight `grace` seconds, then cancel the rest (their
        cleanup aborts their engine requests)."""
        self.closed = True
        deadline = time.monotonic() + grace
        while self.active_tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.active_tasks):
            task.cancel()
        await asyncio.sleep(0)


class Ticket:
    """One request's sequences in the admission's books."""

    def __init__(self, admission: Admission, num_sequences: int) -> None:
        self._admission = admission
        self._waiting = num_sequences
        self._running = 0

    def started(self) -> None:
        """A sequence produced its first token."""
        if self._waiting:
            self._waiting -= 1
            self._running += 1
            self._admission.waiting -= 1
            self._admission.running += 1

    def finished(self) -> None:
        """A running sequence finished."""
        if self._running:
            self._running -= 1
            self._admission.running -= 1

    def release(self) -> None:
        """The request is over: whatever it still holds goes back (safe to call again)."""
        self._admission.waiting -= self._waiting
        self._admission.running -= self._running
        self._waiting = self._running = 0

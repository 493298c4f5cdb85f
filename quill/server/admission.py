"""Admission control and the books of who is in: the one object that decides whether a request
may start (503 while shutting down; 400 when it asks for more sequences than may ever wait at once,
since retrying cannot help; 429 with `Retry-After` when too many sequences already wait for their
first token) and keeps count of the admitted sequences (waiting, then running) and of the request
tasks in flight, which shutdown gives a grace period and then cancels.

Each admitted request holds a `Ticket` for its sequences; whatever way the request ends, releasing
the ticket returns its sequences, so the counts go back to zero when the server is idle. At
shutdown, once the grace period is over, each open ticket is told to stop (`Ticket.on_stop`: its
answer ends its stream with final events, or its body with a 503) before anything is cancelled."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from quill.errors import InvalidRequestError
from quill.server.config import ServerConfig
from quill.server.errors import APIError, shutting_down

# Seconds stopped requests get to send their final events at shutdown, after the grace period.
FINAL_WORDS = 2.0


class Admission:
    def __init__(self, config: ServerConfig, engine_waiting: Callable[[], int]) -> None:
        self.config = config  # max_queue and retry_after, read per request
        self._engine_waiting = engine_waiting  # sequences the engine's scheduler has waiting
        self.waiting = 0  # admitted sequences without their first token yet
        self.running = 0  # admitted sequences generating
        self.active_tasks: set[asyncio.Task] = set()  # request handlers and response streams
        self.tickets: set[Ticket] = set()  # admitted requests not yet released
        self.closed = False  # shutting down: no new requests

    def check_open(self) -> None:
        if self.closed:
            raise shutting_down()

    def admit(self, num_sequences: int, param: str = "n") -> Ticket:
        """Back-pressure: refuse work when too many sequences already wait for their first token.
        `param`: the request field that sets the number of sequences (for the error that says so)."""
        self.check_open()
        max_queue = self.config.max_queue
        if num_sequences > max_queue:  # would wait forever: "busy, retry" would be a lie
            raise InvalidRequestError(
                f"This request asks for {num_sequences} sequences at once, more than the {max_queue} this server "
                f"admits (--max-queue); retrying will not help. Ask for fewer ('{param}').",
                param=param, code="too_many_sequences")
        waiting = max(self.waiting, self._engine_waiting())
        if waiting + num_sequences > max_queue:
            raise APIError(429, f"The server is busy ({waiting} requests waiting, the limit is {max_queue}). "
                                "Please retry shortly.", type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.config.retry_after)})
        self.waiting += num_sequences
        ticket = Ticket(self, num_sequences)
        self.tickets.add(ticket)
        return ticket

    @contextmanager
    def track(self, task: asyncio.Task) -> Iterator[None]:
        """Count a task as in flight (shutdown waits for it, then cancels it) while the block runs."""
        self.active_tasks.add(task)
        try:
            yield
        finally:
            self.active_tasks.discard(task)

    async def drain(self, grace: float) -> None:
        """Refuse new requests and give the tasks in flight `grace` seconds; then stop every admitted
        request (each ends its response itself) and give them `FINAL_WORDS` seconds to say so;
        cancel what is left (their cleanup aborts their engine requests). Safe to call again."""
        self.closed = True
        await self._wait_for_tasks(grace)
        if self.active_tasks:
            for ticket in list(self.tickets):
                ticket.stop()
            await self._wait_for_tasks(FINAL_WORDS)
        for task in list(self.active_tasks):
            task.cancel()
        await asyncio.sleep(0)

    async def _wait_for_tasks(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.active_tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


class Ticket:
    """One request's sequences in the admission's books."""

    def __init__(self, admission: Admission, num_sequences: int) -> None:
        self._admission = admission
        self._waiting = num_sequences
        self._running = 0
        self.on_stop: Callable[[], None] | None = None  # set by the request's answer: end it now

    def stop(self) -> None:
        """Shutdown: the request must end now."""
        if self.on_stop is not None:
            self.on_stop()

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
        self._admission.tickets.discard(self)

"""A request the engine answers, with its books: `LiveAnswer` drives a `Run` one update at a time,
counts each update as it comes (the admission ticket's first tokens, token and latency metrics)
and, once the run is over however it ended, settles everything exactly once: the engine requests
aborted, the ticket released, aborted sequences counted, the usage and cost worked out, the request
log line filled in, and `on_close` (the response cache's entry) called.

The server may end an answer early (`cut`): at its deadline (`request_timeout`), at shutdown (the
ticket's stop), or when its client stopped reading the stream (streaming.py). The first reason is
counted and logged; with an error, the run's next update raises it, so that the response ends the
way that error says (a 504, a 503, a stream's final events)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from quill.errors import QuillError
from quill.server.admission import Ticket
from quill.server.billing import Billing
from quill.server.errors import deadline_exceeded, shutting_down
from quill.server.metrics import ServerMetrics
from quill.server.request_log import RequestRecord
from quill.server.runs import Run, Update
from quill.server.usage import run_usage


class LiveAnswer:
    def __init__(self, run: Run, ticket: Ticket, metrics: ServerMetrics, billing: Billing, record: RequestRecord,
                 on_close: Callable[[LiveAnswer], None] | None = None, deadline: float | None = None) -> None:
        self.run = run
        self.ticket = ticket
        self.metrics = metrics
        self.billing = billing
        self.record = record
        self.on_close = on_close
        self.deadline = deadline  # seconds from `start` to the last token (None: none)
        self.usage: dict | None = None  # settled when the answer closes
        self.cut_reason: str | None = None  # why the server ended it early, if it did
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Submit the run's prompts to the engine (a refusal comes out of the first `next`)."""
        self.run.start()
        self.ticket.on_stop = lambda: self.cut("shutdown", shutting_down())
        if self.deadline is not None:
            self._timer = asyncio.get_running_loop().call_later(
                self.deadline, lambda: self.cut("deadline", deadline_exceeded(self.deadline)))

    def cut(self, reason: str, error: QuillError | None = None) -> None:
        """End the answer early for `reason`; with `error`, its next update raises it."""
        if self.cut_reason is not None:
            return
        self.cut_reason = reason
        self.metrics.observe_cut(reason)
        self.record.cut_short(reason)
        if error is not None:
            self.run.interrupt(error)

    async def next(self) -> Update | None:
        """The run's next update; None once it is over (and then the books are settled)."""
        update = await self.run.next()
        if update is None:
            self.close()
        else:
            self._count(update)
        return update

    async def finish(self) -> None:
        """Run to the end (a whole, non-streamed response)."""
        try:
            while await self.next() is not None:
                pass
        finally:
            self.close()

    def _count(self, update: Update) -> None:
        choice = update.choice
        if update.first:
            self.ticket.started()
        self.metrics.observe_output(len(update.new_token_ids), update.gap)
        if update.finished:
            self.ticket.finished()
            self.metrics.observe_sequence(choice.metrics, choice.finish_reason, len(choice.token_ids))

    def close(self) -> None:
        """Settle the books. Synchronous (it runs in cancelled tasks too) and safe to call again."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        run = self.run
        run.close()
        self.ticket.release()
        for choice in run.choices:
            if choice.finish_reason is None:
                self.metrics.observe_sequence(choice.metrics, "abort", len(choice.token_ids))
        cost = self.billing.charge(run.prompt_tokens, run.cached_tokens, run.completion_tokens)
        self.usage = run_usage(run, cost)
        self.record.finished(self.usage, run.finish_reasons)
        if self.on_close is not None:
            self.on_close(self)

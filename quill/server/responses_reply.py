"""How a Responses API answer looks on the wire: the response object as the body, and as a stream
OpenAI's semantic events, each named and numbered (`sequence_number`): `response.created` and
`response.in_progress`, then the output items as `OutputItems` builds them (item added, content
part added, text or arguments deltas, done events), then `response.completed` (or
`response.incomplete` when the output was cut off or stopped at shutdown) with the whole response.
A stored answer (response cache) replays as the same events, its text in one delta. The final response object is
handed to `on_final` (the endpoint stores it), streamed or not.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any, Protocol

from quill.server.errors import APIError
from quill.server.logprobs import TokenText
from quill.server.replies import Head, Reply, sse
from quill.server.response_items import OutputItems
from quill.server.runs import Choice, Run, Update


class DeltaParser(Protocol):
    """The model's text -> chat message deltas (`response_items.PlainText`, or a tool-call parser)."""

    def feed(self, text: str) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]: ...


class ResponsesReply(Reply):
    endpoint = "responses"
    object = "response"

    def __init__(self, head: Head, token_text: TokenText, skip_special: bool, request_fields: dict[str, Any],
                 new_parser: Callable[[], DeltaParser], shape: dict[str, Any],
                 on_final: Callable[[dict[str, Any]], None]) -> None:
        super().__init__(head, token_text, skip_special)
        self.request_fields = request_fields  # what every response object repeats of the request
        self.new_parser = new_parser
        self.shape = shape  # what parsing the output depends on (the tool-call format)
        self.on_final = on_final
        self._parser = new_parser()  # a stream's
        self._items = OutputItems()
        self._sequence = 0
        self._finished = False
        self._finish_reason: str | None = None

    # ------------------------------------------------------------------- a whole body
    def choices(self, run: Run) -> list[dict]:
        return [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason} for c in run.choices]

    def body(self, choices: list[dict], usage: dict) -> dict:
        (choice,) = choices
        parser, items = self.new_parser(), OutputItems()
        items.feed(parser.feed(choice["text"]) + parser.finish())
        items.finish(_item_status(choice["finish_reason"]))
        return self._final(items.items, choice["finish_reason"], usage)

    # ---------------------------------------------------------------------- a stream
    def opening(self) -> list[str]:
        snapshot = self.response("in_progress", [])
        return [self._event({"type": "response.created", "response": snapshot}),
                self._event({"type": "response.in_progress", "response": snapshot})]

    def events(self, update: Update) -> list[str]:
        return self._output(update.delta, update.finished, update.choice.finish_reason if update.finished else None)

    def replayed(self, choices: list[dict]) -> list[str]:
        (choice,) = choices
        return self._output(choice["text"], True, choice["finish_reason"])

    def stopped(self, choices: list[Choice]) -> list[str]:
        return []  # stopped at shutdown: `closing` ends the unfinished output as incomplete

    def closing(self, usage: dict) -> list[str]:
        events = [] if self._finished else self._output("", True, None)  # ended without its last output
        response = self._final(self._items.items, self._finish_reason, usage)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return events + [self._event({"type": kind, "response": response})]

    def failure(self, error: APIError) -> list[str]:
        failed = self.response("failed", self._items.items, error={"code": error.code or "server_error",
                                                                   "message": error.message})
        return [self._event({"type": "error", "code": error.code, "message": error.message, "param": error.param}),
                self._event({"type": "response.failed", "response": failed})]

    def _output(self, text: str, finished: bool, finish_reason: str | None) -> list[str]:
        deltas = self._parser.feed(text)
        events = []
        if finished:
            self._finished, self._finish_reason = True, finish_reason
            events = self._items.feed(deltas + self._parser.finish()) + self._items.finish(_item_status(finish_reason))
        else:
            events = self._items.feed(deltas)
        return [self._event(event) for event in events]

    def _event(self, payload: dict) -> str:
        payload = {**payload, "sequence_number": self._sequence}
        self._sequence += 1
        return sse(payload, event=payload["type"])

    # ------------------------------------------------------------------- the object
    def response(self, status: str, output: list[dict], usage: dict | None = None, **details: Any) -> dict:
        head = self.head
        return {"id": head.id, "object": "response", "created_at": head.created, "status": status,
                "error": details.get("error"), "incomplete_details": details.get("incomplete_details"),
                "model": head.model, "output": copy.deepcopy(output), "usage": usage, **self.request_fields}

    def _final(self, output: list[dict], finish_reason: str | None, usage: dict) -> dict:
        complete = _item_status(finish_reason) == "completed"
        incomplete = None if complete else {"reason": "max_output_tokens" if finish_reason == "length" else None}
        response = self.response("completed" if complete else "incomplete", output, response_usage(usage),
                                 incomplete_details=incomplete)
        if complete:
            response["completed_at"] = int(time.time())
        self.on_final(response)
        return response


def _item_status(finish_reason: str | None) -> str:
    return "completed" if finish_reason == "stop" else "incomplete"


def response_usage(usage: dict) -> dict:
    """Chat's usage in the Responses API's names (Quill's `quill` object kept)."""
    return {"input_tokens": usage["prompt_tokens"],
            # Quill writes every prompt into its prefix cache as a matter of course: nothing to report.
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"], "quill": usage["quill"]}

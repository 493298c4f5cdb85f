"""The one-line JSON request log (logger `quill.requests`): `RequestRecord` is the one object that
builds a request's line. The gate opens it and writes it once the response is over; the parts
that learn something about the request say so through its methods, never by writing keys.
Prompt text stays out of the line unless the server was started with `--log-prompts`."""
from __future__ import annotations

import json
import logging
from typing import Any

request_log = logging.getLogger("quill.requests")

_SCOPE_KEY = "quill.record"


class RequestRecord:
    def __init__(self, request_id: str, endpoint: str) -> None:
        self.request_id = request_id  # also the X-Request-Id header, and the tail of the response id
        self.endpoint = endpoint
        self._response_id: str | None = None
        self._fields: dict[str, Any] = {}

    @staticmethod
    def of(scope) -> RequestRecord | None:
        """The record the gate put in a request's ASGI scope (None outside the gate)."""
        return scope.get(_SCOPE_KEY)

    def attach(self, scope) -> None:
        scope[_SCOPE_KEY] = self

    # ------------------------------------------------------------------ what the parts report
    def described(self, *, model: str, stream: bool, n: int, user: str | None, prompt: Any) -> None:
        """What was asked (the prompt is dropped from the line unless prompts are logged)."""
        self._fields.update(model=model, stream=stream, n=n, user=user, prompt=prompt)

    def answered_as(self, response_id: str, cache: str) -> None:
        """The response's id (the line's `id`) and how the response cache took it (hit, miss, bypass)."""
        self._response_id = response_id
        self._fields["cache"] = cache

    def admitted(self, prompt_tokens: int, max_tokens: int) -> None:
        self._fields.update(prompt_tokens=prompt_tokens, max_tokens=max_tokens)

    def finished(self, usage: dict, finish_reasons: list[str]) -> None:
        """A run's outcome: tokens, finish reasons, timeline and cost (`usage` as in the response)."""
        quill = usage["quill"]
        self._fields.update(
            completion_tokens=usage["completion_tokens"], cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
            finish_reasons=finish_reasons, queue_time=quill["queue_time"], ttft=quill["time_to_first_token"],
            itl_mean=quill["inter_token_latency_mean"], itl_max=quill["inter_token_latency_max"],
            e2e=quill["e2e_latency"], cost_usd=quill["cost"]["self_hosted_usd"],
        )

    def replayed(self, prompt_tokens: int, completion_tokens: int, saved_usd: float | None) -> None:
        """A response cache hit: the stored answer's tokens, no cost, and what it saved."""
        self._fields.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_usd=0.0,
                            saved_usd=saved_usd)

    def failed(self, message: str, stream_status: int | None = None) -> None:
        """An error answer; the first one counts. `stream_status`: it ended a stream already begun."""
        self._fields.setdefault("error", message)
        if stream_status is not None:
            self._fields["stream_error"] = stream_status

    def disconnected(self) -> None:
        self._fields["client_disconnected"] = True

    def cut_short(self, reason: str) -> None:
        """The server ended the request early: idle_timeout, buffer_full, deadline or shutdown."""
        self._fields.setdefault("cut_short", reason)

    # --------------------------------------------------------------------------- the line
    def write(self, status: int, duration: float, log_prompts: bool) -> None:
        if not request_log.isEnabledFor(logging.INFO):
            return
        fields = dict(self._fields)
        if not log_prompts:
            fields.pop("prompt", None)
        line = {"id": self._response_id or self.request_id, "endpoint": self.endpoint, "status": status,
                **fields, "duration": round(duration, 6)}
        request_log.info(json.dumps(line, ensure_ascii=False, default=str))

"""What travels between the ingress and the engine replicas: a `Submission` (one engine request,
already tokenized, with the hashes its routing uses), `ReplicaInfo` (what the ingress learns of the
model from a replica at start-up) and, per engine output, an `OutputDelta`: only what is new, so a
long answer costs the same per token to stream across processes as a short one. A replica sends
them in lists, several outputs merged per completion when `stream_interval` > 1 (`merge_deltas`). `OutputAssembler`
turns the deltas back into the `RequestOutput`s the server consumes, as `AsyncEngine` yields them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quill.engine.limits import EngineLimits
from quill.outputs import RequestMetrics, RequestOutput
from quill.sampling_params import SamplingParams


@dataclass(frozen=True)
class Submission:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    prefix_hashes: tuple[bytes, ...] = ()  # the prompt's leading KV blocks (affinity.prefix_hashes)


@dataclass(frozen=True)
class ReplicaInfo:
    limits: EngineLimits
    tokenizer: Any  # quill.tokenizer.Tokenizer, or None for a token-ids-only model
    chat_template: str | None
    path: str  # the model as the replica resolved it (the served name's default)
    weights_identity: str  # quill.cache.model_identity of the replica's files: keys the response cache


@dataclass
class OutputDelta:
    """One engine output of one of a request's n completions, as far as it is new."""

    index: int
    new_token_ids: list[int]
    delta: str
    new_logprobs: list | None
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    prompt_logprobs: list | None = None  # with a completion's first delta only (complete by then)


class DeltaEncoder:
    """Replica side: one request's `RequestOutput`s as `OutputDelta`s."""

    def __init__(self) -> None:
        self._logprobs_sent: dict[int, int] = {}  # completion index -> logprob records sent
        self._started: set[int] = set()  # completions whose first delta went out

    def encode(self, output: RequestOutput) -> OutputDelta:
        new_logprobs = None
        if output.logprobs is not None:
            # The engine's list grows on its own thread: take exactly this output's records.
            start = self._logprobs_sent.get(output.index, 0)
            end = start + len(output.new_token_ids)
            new_logprobs = output.logprobs[start:end]
            self._logprobs_sent[output.index] = end
        prompt_logprobs = None
        if output.index not in self._started:
            self._started.add(output.index)
            prompt_logprobs = output.prompt_logprobs
        return OutputDelta(output.index, list(output.new_token_ids), output.delta, new_logprobs, output.finished,
                           output.finish_reason, output.metrics, prompt_logprobs)


def merge_deltas(deltas: list[OutputDelta]) -> list[OutputDelta]:
    """Consecutive deltas as one per completion (in the order the completions first appear): their
    tokens, text and logprobs joined, the last one's finish and metrics."""
    merged: dict[int, OutputDelta] = {}
    for delta in deltas:
        held = merged.get(delta.index)
        if held is None:
            merged[delta.index] = OutputDelta(delta.index, list(delta.new_token_ids), delta.delta,
                                              None if delta.new_logprobs is None else list(delta.new_logprobs),
                                              delta.finished, delta.finish_reason, delta.metrics, delta.prompt_logprobs)
            continue
        held.new_token_ids += delta.new_token_ids
        held.delta += delta.delta
        if delta.new_logprobs is not None:
            held.new_logprobs = (held.new_logprobs or []) + delta.new_logprobs
        held.finished, held.finish_reason, held.metrics = delta.finished, delta.finish_reason, delta.metrics
    return list(merged.values())


@dataclass
class _Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list | None = None
    prompt_logprobs: list | None = None


class OutputAssembler:
    """Ingress side: one request's deltas back into `RequestOutput`s (text and tokens so far)."""

    def __init__(self, request_id: str, prompt_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self._completions: dict[int, _Completion] = {}

    def add(self, delta: OutputDelta) -> RequestOutput:
        completion = self._completions.setdefault(delta.index, _Completion())
        completion.token_ids.extend(delta.new_token_ids)
        completion.text += delta.delta
        if delta.new_logprobs is not None:
            if completion.logprobs is None:
                completion.logprobs = []
            completion.logprobs.extend(delta.new_logprobs)
        if delta.prompt_logprobs is not None:
            completion.prompt_logprobs = delta.prompt_logprobs
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_ids, token_ids=completion.token_ids,
            text=completion.text, delta=delta.delta, finished=delta.finished, finish_reason=delta.finish_reason,
            metrics=delta.metrics, new_token_ids=delta.new_token_ids, index=delta.index, logprobs=completion.logprobs,
            prompt_logprobs=completion.prompt_logprobs,
        )

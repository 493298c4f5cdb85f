"""What the load generator sends: a built-in synthetic workload or requests from a JSONL file,
and when (Poisson arrivals for a request rate)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from quill.errors import QuillError

_TOPICS = ["a lighthouse keeper", "a dragon who cannot fly", "a lost robot", "the first city on Mars", "a clockmaker",
           "a river that flows uphill", "a chess prodigy", "a haunted library", "a deep-sea explorer",
           "a tiny village baker", "a time-travelling cat", "a mountain rescue team", "an old sailing ship",
           "a desert caravan", "a secret garden", "a jazz musician", "a volcano observatory", "a forgotten king",
           "a polar research station", "a street magician"]
_NOTE_WORDS = " ".join(_TOPICS).split()


class WorkloadError(QuillError):
    """A workload file that cannot be used."""


@dataclass(frozen=True)
class RequestSpec:
    """One request: chat `messages` or a completion `prompt`, and how many tokens to ask for."""

    max_tokens: int
    messages: list[dict] | None = None
    prompt: str | None = None

    @property
    def prompt_words(self) -> int:
        """Words in its messages' contents (or its prompt): what sizes a peer server's context."""
        text = " ".join(str(m.get("content", "")) for m in self.messages) if self.messages else self.prompt or ""
        return len(text.split())


def synthetic_workload(num_requests: int, prompt_words: int, max_tokens: int) -> list[RequestSpec]:
    """Distinct story requests that invite long answers (`story_request` 0, 1, ...)."""
    return [story_request(index, prompt_words, max_tokens) for index in range(num_requests)]


def story_request(index: int, prompt_words: int, max_tokens: int) -> RequestSpec:
    """The `index`th story request. Each starts differently (so no prefix is shared between
    requests) and carries `prompt_words` words of notes: roughly 1.3 tokens a word with the usual
    tokenizers, plus ~20 tokens of request and chat template."""
    text = f"Write a long, detailed story about {_TOPICS[index % len(_TOPICS)]} (story {index})."
    if prompt_words:
        notes = " ".join(_NOTE_WORDS[(index * 7 + i) % len(_NOTE_WORDS)] for i in range(prompt_words))
        text = f"Reader {index} took these notes: {notes}. {text}"
    return RequestSpec(max_tokens=max_tokens, messages=[{"role": "user", "content": text}], prompt=text)


def load_jsonl(path: str | Path, default_max_tokens: int) -> list[RequestSpec]:
    """Requests from a JSONL file, one object a line: {"messages": [...]} or {"prompt": "..."},
    with an optional "max_tokens". A prompt alone is sent to chat servers as one user message."""
    specs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise WorkloadError(f"cannot read workload {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            messages, prompt = entry.get("messages"), entry.get("prompt")
            if not isinstance(prompt, (str, type(None))) or not isinstance(messages, (list, type(None))):
                raise ValueError("'prompt' must be a string and 'messages' a list")
            if prompt is None and not messages:
                raise ValueError("needs 'prompt' or 'messages'")
            max_tokens = int(entry.get("max_tokens", default_max_tokens))
        except (ValueError, AttributeError, TypeError) as exc:
            raise WorkloadError(f"{path}, line {number}: {exc}") from None
        if messages is None:
            messages = [{"role": "user", "content": prompt}]
        specs.append(RequestSpec(max_tokens=max_tokens, messages=messages, prompt=prompt))
    if not specs:
        raise WorkloadError(f"{path} has no requests")
    return specs


def take(specs: list[RequestSpec], start: int, count: int) -> list[RequestSpec]:
    """`count` requests from `start` on, cycling through `specs` when there are fewer."""
    return [specs[(start + i) % len(specs)] for i in range(count)]


def poisson_arrivals(rate: float, count: int, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of `count` requests arriving as a Poisson process of
    `rate` requests/second: exponential gaps, the arrivals of many independent users."""
    generator = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += generator.expovariate(rate)
    return times

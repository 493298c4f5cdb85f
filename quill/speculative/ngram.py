"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the sequence's
last n tokens (in its prompt or its output). No model, so drafts cost next to nothing; strong when
the output copies the input (summaries, rewrites, code edits)."""
from __future__ import annotations

from quill.engine.request import Request
from quill.speculative.drafter import Draft

DEFAULT_MAX_NGRAM = 4
DEFAULT_MIN_NGRAM = 2  # single-token matches are too often wrong to be worth verifying


class _NgramIndex:
    """Where each n-gram of one sequence last ended, kept up to date as tokens are appended, so a
    lookup costs O(new tokens) rather than a scan of the whole sequence."""

    def __init__(self, sizes: range) -> None:
        self.sizes = sizes
        self.last_end: dict[tuple[int, ...], int] = {}
        self.num_indexed = 0  # n-grams ending at positions <= this are in `last_end`

    def lookup(self, token_ids: list[int], max_length: int) -> list[int]:
        # Index every n-gram ending before the current suffix; the suffix itself must not match itself.
        for end in range(max(self.num_indexed + 1, min(self.sizes)), len(token_ids)):
            for n in self.sizes:
                if end >= n:
                    self.last_end[tuple(token_ids[end - n:end])] = end
        self.num_indexed = max(self.num_indexed, len(token_ids) - 1)
        for n in reversed(self.sizes):  # the longest match is the most trustworthy
            end = self.last_end.get(tuple(token_ids[-n:])) if len(token_ids) >= n else None
            if end is not None:
                return token_ids[end:end + max_length]
        return []


class NgramDrafter:
    def __init__(self, max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = DEFAULT_MIN_NGRAM) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.sizes = range(min_ngram, max_ngram + 1)
        self._indexes: dict[str, _NgramIndex] = {}

    def propose(self, requests: list[Request], max_lengths: list[int]) -> list[Draft]:
        drafts = []
        for request, max_length in zip(requests, max_lengths):
            index = self._indexes.setdefault(request.request_id, _NgramIndex(self.sizes))
            drafts.append(Draft(index.lookup(request.token_ids, max_length)))
        return drafts

    def finish(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)

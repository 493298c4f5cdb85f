"""What every drafter offers the engine: up to k proposed next tokens per sequence."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from quill.engine.request import Request


@dataclass
class Draft:
    token_ids: list[int]
    # [len(token_ids), vocab]: the distribution each token was drawn from, for rejection
    # sampling. None: the tokens were chosen deterministically (a one-hot distribution).
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    def propose(self, requests: list[Request], max_lengths: list[int]) -> list[Draft]:
        """One draft per request, of at most max_lengths[i] tokens (possibly none), continuing
        its committed `token_ids`."""

    def finish(self, request_id: str) -> None:
        """Forget a finished or aborted request (release whatever is held for it)."""

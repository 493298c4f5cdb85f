"""Token masks for one step: which logits rows are constrained, and the bits that say which tokens
each may take. Applied before any other processing: a masked token's logit is -inf for greedy and
sampled requests alike, and the logprobs a request gets are those of the masked distribution."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quill.structured.matcher import MASK_WORD_BITS

_BIT_SHIFTS = torch.arange(MASK_WORD_BITS, dtype=torch.int32)


@dataclass
class TokenMasks:
    rows: list[int]  # the logits rows they apply to
    bits: torch.Tensor  # [len(rows), words] int32: bit t % 32 of word t // 32 set = token t allowed

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """[len(rows), vocab_size] bool."""
        unpacked = (self.bits.unsqueeze(-1) >> _BIT_SHIFTS) & 1
        return unpacked.view(len(self.rows), -1)[:, :vocab_size].bool()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of `logits` ([rows, vocab]) with every disallowed token at -inf."""
        if not self.rows:
            return logits
        masked = logits.clone()
        rows = torch.tensor(self.rows)
        masked[rows] = masked[rows].masked_fill(~self.allowed(logits.shape[-1]), float("-inf"))
        return masked

    def select(self, rows: list[int]) -> TokenMasks | None:
        """The masks of some logits rows, renumbered 0.. in the order given (None: none constrained)."""
        where = {row: i for i, row in enumerate(self.rows)}
        picked = [(new, where[row]) for new, row in enumerate(rows) if row in where]
        if not picked:
            return None
        return TokenMasks([new for new, _ in picked], self.bits[[old for _, old in picked]])

"""The layers a rank's share of a model runs in place of whole ones: each ends in the collective
that makes its output the whole model's (the same tensor on every rank).

- `RowParallel` after o and down: each rank multiplies its columns of the weight by its part of
  the input, and the partial products are summed (all-reduce). Summing two partials is not the
  single-process order of additions, so outputs agree within float rounding, not bit for bit;
  every rank gets the same sum, and a row's sum does not depend on the batch around it.
- `VocabParallelEmbedding`: each rank looks up the token ids it holds, zeros elsewhere, and the
  all-reduce sums one row and zeros (exact).
- `ParallelLMHead`: each rank computes its vocabulary's logits, exact near the whole row's maximum
  (the maximum is agreed first, so that each rank refines the same candidates a single process
  would), and every rank gathers the full rows.

Collectives run in float32 (gloo's reductions are float32-complete, and a bf16 sum would round
twice).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from quill.layers.logits import lm_head_logits
from quill.layers.module import InferenceModule


def all_reduce(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    total = x.float() if x.dtype != torch.float32 else x.clone()
    dist.all_reduce(total, op=op)
    return total.to(x.dtype)


class RowParallel(InferenceModule):
    """A linear layer holding some of the input columns; the sum of every rank's product."""

    def __init__(self, local: nn.Module) -> None:
        super().__init__()
        self.local = local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.local(x))


class VocabParallelEmbedding(InferenceModule):
    """Rows `start:start + len(local)` of the table; others look up zeros, summed away."""

    def __init__(self, local: nn.Module, start: int) -> None:
        """`local`: an `nn.Embedding`, or a `RowsEmbedding` over the file's blocks."""
        super().__init__()
        self.local, self.start = local, start
        self.num_rows = local.weight.shape[0]
        self.weight = local.weight  # what readers of `embed_tokens.weight` (a tied head) find

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local_ids = ids - self.start
        inside = (local_ids >= 0) & (local_ids < self.num_rows)
        rows = self.local(torch.where(inside, local_ids, 0))
        return all_reduce(torch.where(inside[:, None], rows, 0))


class ParallelLMHead(InferenceModule):
    """Float32 logits of the whole vocabulary from rank-local slices of the head. No `weight`
    attribute: `lm_head_logits` then takes the gathered logits as they are (each slice was refined)."""

    def __init__(self, local: nn.Module, vocab_sizes: list[int]) -> None:
        super().__init__()
        self.local, self.vocab_sizes = local, vocab_sizes

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head_logits(self.local, hidden, reduce_max=lambda m: all_reduce(m, dist.ReduceOp.MAX))
        widest = max(self.vocab_sizes)
        padded = torch.nn.functional.pad(logits, (0, widest - logits.shape[1]))
        parts = [torch.empty_like(padded) for _ in self.vocab_sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:, :n] for part, n in zip(parts, self.vocab_sizes)], dim=1)

"""The distillation loss, with its gradient written out by hand.

The loss: the KL divergence from the teacher's distribution at temperature T, over its top k
tokens (renormalised), to the student's, times T^2 (Hinton et al.: keeps gradient sizes comparable
across temperatures), optionally mixed with `ce_weight` of the ordinary next-token cross-entropy.

Both parts are weighted negative log-likelihoods of the student's logits: sum over (position, id)
of weight * -log softmax(z / T)[id], the KL's weights being the teacher's probabilities (its
entropy is a constant added on). Written that way, one pass finds each row's log-sum-exp and the
gradient is softmax(z / T) * sum(weights) - weights at their ids, all over T. Autograd's version
of the same loss makes float copies of the [batch, seq, vocab] logits for the division, two
log-softmaxes and their backward passes, and zero-fills two more for the gathers' backward: on
SmolLM2's 49,152-token vocabulary that was 0.27 s of a 2.24 s step forward and about as much
backward (4 x 256 tokens, AMD EPYC family 26, 2 cores). Rows go a chunk at a time so that the float
temporaries stay a few tens of MB.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_ROWS = 256


class _WeightedNLL(torch.autograd.Function):
    """sum over rows r and columns j of weights[r, j] * -log softmax(logits[r] / T)[ids[r, j]];
    logits [rows, vocab] in any float dtype, ids [rows, k] int64, weights [rows, k] float32."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, temperature: float):
        lse = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for rows in _chunks(len(logits)):
            z = _scaled(logits[rows], temperature)
            lse[rows] = torch.logsumexp(z, dim=-1)
            total += (weights[rows] * (lse[rows, None] - z.gather(-1, ids[rows]))).sum()
        ctx.save_for_backward(logits, ids, weights, lse)
        ctx.temperature = temperature
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, ids, weights, lse = ctx.saved_tensors
        scale = grad.float() / ctx.temperature
        out = torch.empty_like(logits)
        for rows in _chunks(len(logits)):
            g = (_scaled(logits[rows], ctx.temperature) - lse[rows, None]).exp_()
            g.mul_(weights[rows].sum(-1, keepdim=True)).scatter_add_(-1, ids[rows], -weights[rows])
            out[rows] = g.mul_(scale)
        return out, None, None, None


def _chunks(rows: int) -> list[slice]:
    return [slice(start, min(start + _CHUNK_ROWS, rows)) for start in range(0, rows, _CHUNK_ROWS)]


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.float()
    return z if temperature == 1 else z / temperature


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_ids: torch.Tensor,
                      tokens: torch.Tensor | None, temperature: float, ce_weight: float = 0.0) -> torch.Tensor:
    """Mean over positions of T^2 * KL(teacher top-k at T || student at T), mixed with `ce_weight`
    of the next-token cross-entropy (over the positions that have a next token).
    Student logits [batch, seq, vocab]; the teacher's top-k logits and ids [batch, seq, k]."""
    batch, seq, vocab = student_logits.shape
    logits = student_logits.reshape(batch * seq, vocab)
    log_p = F.log_softmax(teacher_logits.float().reshape(batch * seq, -1) / temperature, dim=-1)
    kl_scale = (1 - ce_weight) * temperature ** 2 / (batch * seq)
    weights = log_p.exp() * kl_scale
    ids = teacher_ids.reshape(batch * seq, -1).long()
    entropy = (weights * log_p).sum()  # the teacher's part of the KL: no gradient
    if not ce_weight:
        return entropy + _WeightedNLL.apply(logits, ids, weights, temperature)
    next_ids = torch.zeros(batch, seq, dtype=torch.long, device=logits.device)
    next_ids[:, :-1] = tokens[:, 1:]
    ce_weights = torch.zeros(batch, seq, dtype=torch.float32, device=logits.device)
    ce_weights[:, :-1] = ce_weight / (batch * (seq - 1))
    next_ids, ce_weights = next_ids.reshape(-1, 1), ce_weights.reshape(-1, 1)
    if temperature == 1:  # one pass over the logits serves both parts
        return entropy + _WeightedNLL.apply(logits, torch.cat([ids, next_ids], 1),
                                            torch.cat([weights, ce_weights], 1), 1.0)
    return (entropy + _WeightedNLL.apply(logits, ids, weights, temperature)
            + _WeightedNLL.apply(logits, next_ids, ce_weights, 1.0))

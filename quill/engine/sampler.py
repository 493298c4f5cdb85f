"""Turns logits into next tokens with each request's own sampling parameters.

Filtering (temperature, top-k, top-p, min-p) is vectorised over the batch; the draw itself uses
each request's private generator, so a seeded request gets the same tokens whatever else runs.
"""
from __future__ import annotations

import torch

from quill.engine.request import Request


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """logits: [len(requests), vocab] float32. Returns one token id per request."""
    if not requests:
        return []
    greedy = logits.argmax(dim=-1)
    sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if not sampled_rows:
        return greedy.tolist()
    tokens = greedy.tolist()
    params = [requests[i].params for i in sampled_rows]
    probs = filtered_probabilities(
        logits[sampled_rows],
        temperature=torch.tensor([p.temperature for p in params]),
        top_k=torch.tensor([p.top_k for p in params]),
        top_p=torch.tensor([p.top_p for p in params]),
        min_p=torch.tensor([p.min_p for p in params]),
    )
    for row, i in enumerate(sampled_rows):
        tokens[i] = int(torch.multinomial(probs[row], 1, generator=requests[i].generator))
    return tokens


def filtered_probabilities(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor,
                           top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Per-row probabilities after temperature, top-k (0 = off), top-p and min-p filtering."""
    logits = logits / temperature.to(logits)[:, None]
    vocab = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    remove = ranks >= k
    sorted_probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    remove |= mass_before >= top_p.to(logits)[:, None]
    # min-p: drop tokens less likely than min_p times the most likely one.
    remove |= sorted_probs < min_p.to(logits)[:, None] * sorted_probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(-1, sorted_ids, sorted_logits)
    return filtered.softmax(dim=-1)

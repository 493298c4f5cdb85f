"""Turns logits into next tokens with each request's own sampling parameters.

Order, as in vLLM: logit bias and min-tokens masking, then repetition/presence/frequency
penalties, then greedy argmax or temperature + top-k/top-p/min-p filtering and a draw. Filtering is
vectorised over the batch; the draw uses each request's private generator, so a seeded request
gets the same tokens whatever else runs. Logprobs are those of the model's own distribution
(before any processing), as OpenAI reports them.

Structured output: a request's grammar mask (`TokenMasks`) comes first, before bias, penalties,
temperature and the top-k/p filters, for greedy and sampled requests alike. Its logprobs are those of
the masked distribution: the model's own, renormalised over the tokens the grammar allows. A
constrained choice then reports how likely each allowed answer is (e.g. the confidence of a
classification), and no disallowed token shows among the top alternatives. (vLLM reports the raw
distribution by default and the processed one on request; here the mask is part of the question.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quill.engine.request import Request
from quill.sampling_params import SamplingParams
from quill.structured.masks import TokenMasks


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


def sample(logits: torch.Tensor, requests: list[Request], eos_token_ids: frozenset[int] = frozenset(),
           masks: TokenMasks | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [len(requests), vocab] float32; masks: the constrained rows' grammar masks. Returns
    one token id (and logprob record) per request."""
    if not requests:
        return [], []
    raw_logits = logits = masks.apply(logits) if masks is not None else logits
    logits = apply_logit_processors(logits, requests, eos_token_ids)
    tokens = logits.argmax(dim=-1).tolist()
    sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if sampled_rows:
        probs = sampling_probabilities(logits[sampled_rows], [requests[i].params for i in sampled_rows])
        for row, i in enumerate(sampled_rows):
            tokens[i] = int(torch.multinomial(probs[row], 1, generator=requests[i].generator))
    return tokens, logprob_records(raw_logits, requests, tokens)


def sampling_probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row's token is drawn from (processed logits in, one row per params)."""
    return filtered_probabilities(
        logits,
        temperature=torch.tensor([p.temperature for p in params]),
        top_k=torch.tensor([min(p.top_k, logits.shape[-1]) for p in params]),  # huge k: no limit
        top_p=torch.tensor([p.top_p for p in params]),
        min_p=torch.tensor([p.min_p for p in params]),
    )


def apply_logit_processors(logits: torch.Tensor, requests: list[Request], eos_token_ids: frozenset[int]) -> torch.Tensor:
    """Logit bias, min_tokens and penalties, applied only to the rows that ask for them."""
    rows = [i for i, r in enumerate(requests) if _needs_processing(r)]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        request, row = requests[i], logits[i]
        params = request.params
        for token_id, bias in params.logit_bias.items():
            if token_id < vocab:
                row[token_id] += bias
        if request.num_output_tokens < params.min_tokens:
            _ban_ending_tokens(row, params, eos_token_ids)
        if params.has_penalties:
            _apply_penalties(row, request)
    return logits


def _ban_ending_tokens(row: torch.Tensor, params: SamplingParams, eos_token_ids: frozenset[int]) -> None:
    """min_tokens: no EOS or stop token yet. Unless a grammar mask allows nothing else: a complete
    grammar ends the output whatever min_tokens says (and an all -inf row has no token to draw)."""
    vocab = row.shape[0]
    banned = [t for t in (*params.stop_token_ids, *([] if params.ignore_eos else eos_token_ids)) if t < vocab]
    kept = row[banned].clone()
    row[banned] = float("-inf")
    if params.constraint is not None and bool(torch.isneginf(row).all()):
        row[banned] = kept


def _needs_processing(request: Request) -> bool:
    params = request.params
    return bool(params.logit_bias) or params.has_penalties or request.num_output_tokens < params.min_tokens


def _apply_penalties(row: torch.Tensor, request: Request) -> None:
    params = request.params
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.token_ids)), dtype=torch.long)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and request.num_output_tokens:
        counts = torch.bincount(torch.tensor(request.output_token_ids), minlength=row.shape[0])[: row.shape[0]]
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


def filtered_probabilities(logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor,
                           top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Per-row probabilities after temperature, top-k (0 = off), top-p and min-p filtering."""
    logits = logits / temperature.to(logits)[:, None]
    if (top_k == 0).all() and (top_p >= 1.0).all() and (min_p == 0.0).all():
        return logits.softmax(dim=-1)  # nothing to filter: skip sorting the whole vocabulary
    vocab = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).to(logits.device)[:, None]
    remove = ranks >= k
    sorted_probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    remove |= mass_before >= top_p.to(logits)[:, None]
    remove[:, 0] = False  # the most likely token always survives, whatever the filters say
    # min-p: drop tokens less likely than min_p times the most likely one.
    remove |= sorted_probs < min_p.to(logits)[:, None] * sorted_probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter(-1, sorted_ids, sorted_logits)
    return filtered.softmax(dim=-1)


def logprob_records(raw_logits: torch.Tensor, requests: list[Request], tokens: list[int]) -> list[TokenLogprob | None]:
    """The logprob records of the rows that ask for them, on any device: computed there, and only
    the chosen tokens' logprobs and the top k come back to the host (one copy each)."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    records: list[TokenLogprob | None] = [None] * len(requests)
    if rows:
        chosen = token_logprobs(raw_logits[torch.tensor(rows, device=raw_logits.device)], [tokens[i] for i in rows],
                                [requests[i].params.logprobs for i in rows])
        for i, record in zip(rows, chosen):
            records[i] = record
    return records


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Each row's record of `tokens[row]` with its `tops[row]` most likely alternatives, from
    logits [rows, vocab] on any device (only the numbers kept come back to the host)."""
    device = logits.device
    logprobs = torch.log_softmax(logits, dim=-1)
    top_values, top_ids = (t.tolist() for t in logprobs.topk(max(max(tops), 1), dim=-1))
    chosen = logprobs.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0].tolist()
    return [TokenLogprob(token, logprob, list(zip(ids[:k], values[:k])))
            for token, logprob, ids, values, k in zip(tokens, chosen, top_ids, top_values, tops)]

"""The sampler as tensor operations on whatever device the logits are on: what a GPU samples with.

`quill.engine.sampler` processes logits row by row in Python and draws with `torch.multinomial`,
which is fine for a few rows on the CPU but, on a GPU, costs a kernel launch per biased token and
a copy of the logits to the host every step. Here logit bias, min_tokens masking and the
repetition/presence/frequency penalties are a handful of batched tensor operations, the filtering
is the sampler's own (`filtered_probabilities`), and the draw is `torch.multinomial`'s own method
written out: the argmax of probabilities over exponential noise (what PyTorch computes for one
sample; see aten's `multinomial`), with each row's noise drawn from its request's generator, so
that a seeded request draws the same token whatever else is in the batch. Only the chosen token
ids (and the logprob records asked for) come back to the host.

On the CPU, with the request's own CPU generator, it returns exactly the tokens and logprobs of
`quill.engine.sampler.sample` (`tests/test_device_sampler.py` checks it on many random batches,
seeds and settings). On a GPU each request draws from a generator on that device seeded like its
CPU one (`Request.device_generator`): reproducible per seed, but not the CPU's tokens, since the
devices' random streams differ.
"""
from __future__ import annotations

import torch

from quill.engine.request import Request
from quill.engine.sampler import TokenLogprob, _needs_processing, logprob_records, sampling_probabilities
from quill.structured.masks import TokenMasks


def sample_on_device(logits: torch.Tensor, requests: list[Request], eos_token_ids: frozenset[int] = frozenset(),
                     masks: TokenMasks | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [len(requests), vocab] float32 on any device; masks: the constrained rows' grammar
    masks. One token id (and logprob record) per request, as `quill.engine.sampler.sample` returns them."""
    if not requests:
        return [], []
    logits = masks.apply(logits) if masks is not None else logits
    processed = process_logits(logits, requests, eos_token_ids)
    chosen = processed.argmax(dim=-1)
    sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        probs = sampling_probabilities(processed[rows], [requests[i].params for i in sampled])
        noise = torch.empty_like(probs)
        for row, i in enumerate(sampled):
            noise[row].exponential_(1, generator=generator_for(requests[i], logits.device))
        chosen[rows] = (probs / noise).argmax(dim=-1)
    tokens = chosen.tolist()  # the one copy of the step's tokens back to the host
    return tokens, logprob_records(logits, requests, tokens)


def generator_for(request: Request, device: torch.device) -> torch.Generator:
    """The request's generator on `device`: its own CPU one there, its device twin elsewhere."""
    if device.type == "cpu":
        return request.generator
    if request.device_generator is None or request.device_generator.device != device:
        raise ValueError(f"request {request.request_id} has no generator on {device}")
    return request.device_generator


def process_logits(logits: torch.Tensor, requests: list[Request], eos_token_ids: frozenset[int]) -> torch.Tensor:
    """`quill.engine.sampler.apply_logit_processors` as batched tensor operations: the same
    arithmetic on every element (bias added once, banned tokens set to -inf, the penalties'
    expressions elementwise), so the same float32 results."""
    rows = [i for i, r in enumerate(requests) if _needs_processing(r)]
    if not rows:
        return logits
    logits = logits.clone()
    vocab, device = logits.shape[-1], logits.device
    _add_bias(logits, [(i, t, b) for i in rows for t, b in requests[i].params.logit_bias.items() if t < vocab])
    banned = [(i, t) for i in rows for t in _banned_tokens(requests[i], eos_token_ids) if t < vocab]
    if banned:
        index = torch.tensor(banned, device=device).T
        logits[index[0], index[1]] = float("-inf")
    _apply_repetition_penalty(logits, [i for i in rows if requests[i].params.repetition_penalty != 1.0], requests)
    _apply_presence_frequency(logits, [i for i in rows if _has_count_penalty(requests[i])], requests)
    return logits


def _add_bias(logits: torch.Tensor, entries: list[tuple[int, int, float]]) -> None:
    if entries:
        rows, tokens, bias = zip(*entries)
        device = logits.device
        index = (torch.tensor(rows, device=device), torch.tensor(tokens, device=device))
        logits.index_put_(index, torch.tensor(bias, dtype=logits.dtype, device=device), accumulate=True)


def _banned_tokens(request: Request, eos_token_ids: frozenset[int]) -> list[int]:
    params = request.params
    if request.num_output_tokens >= params.min_tokens:
        return []
    return [*params.stop_token_ids, *([] if params.ignore_eos else eos_token_ids)]


def _has_count_penalty(request: Request) -> bool:
    params = request.params
    return bool(params.presence_penalty or params.frequency_penalty) and request.num_output_tokens > 0


def _token_mask(requests: list[Request], rows: list[int], vocab: int, device: torch.device,
                outputs_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index [rows], counts [rows, vocab] int64) of each row's tokens: every token of the
    sequence, or only the generated ones."""
    ids = [requests[i].output_token_ids if outputs_only else requests[i].token_ids for i in rows]
    flat = torch.tensor([t for row in ids for t in row], device=device)
    owner = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                    torch.tensor([len(row) for row in ids], device=device))
    counts = torch.zeros(len(rows), vocab, dtype=torch.long, device=device)
    counts.index_put_((owner, flat), torch.ones_like(flat), accumulate=True)
    return torch.tensor(rows, device=device), counts


def _apply_repetition_penalty(logits: torch.Tensor, rows: list[int], requests: list[Request]) -> None:
    if not rows:
        return
    index, counts = _token_mask(requests, rows, logits.shape[-1], logits.device, outputs_only=False)
    penalty = torch.tensor([requests[i].params.repetition_penalty for i in rows], device=logits.device)[:, None]
    values = logits[index]
    penalised = torch.where(values > 0, values / penalty, values * penalty)
    logits[index] = torch.where(counts > 0, penalised, values)


def _apply_presence_frequency(logits: torch.Tensor, rows: list[int], requests: list[Request]) -> None:
    if not rows:
        return
    index, counts = _token_mask(requests, rows, logits.shape[-1], logits.device, outputs_only=True)
    device = logits.device
    frequency = torch.tensor([requests[i].params.frequency_penalty for i in rows], device=device)[:, None]
    presence = torch.tensor([requests[i].params.presence_penalty for i in rows], device=device)[:, None]
    logits[index] -= frequency * counts + presence * (counts > 0)

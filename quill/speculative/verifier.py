"""Verification: turn the target model's logits over [last token, draft...] into committed tokens.

Row j of a request's logits is the target's prediction after its first j drafts. Every row goes
through the normal sampler's processing (bias, min_tokens, penalties, temperature, top-k/p,
min-p), seen from the sequence as it would stand at that position, so the output distribution is
exactly that of plain decoding:
- greedy: accept drafts while they equal the target's argmax, then add the target's own token;
  with logits bit-identical to one-token decoding (see the runner), the tokens are identical too;
- sampled: standard speculative rejection sampling. Draft token d, drawn from q, is accepted with
  probability min(1, p(d) / q(d)); on rejection the token is drawn from max(0, p - q), normalised,
  and verification stops. If every draft is accepted, one more token is drawn from the last row.
A constrained request's rows are first masked by its grammar as it stands at each position (the
masks come from `quill.structured`), exactly as plain decoding would mask them: a draft the grammar
rejects has probability zero, so it is never accepted and the rows after it are never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quill.engine.request import Request
from quill.engine.sampler import TokenLogprob, apply_logit_processors, logprob_records, sampling_probabilities
from quill.structured.masks import TokenMasks


@dataclass
class Verdict:
    token_ids: list[int]  # the accepted drafts, then one token of the target's own
    logprobs: list[TokenLogprob | None]
    num_accepted: int  # drafts accepted


class _Position:
    """A request as it stands after its first `num_drafts` drafts are accepted: what the logit
    processors and logprob records read (params, tokens, output count)."""

    def __init__(self, request: Request, num_drafts: int) -> None:
        self.request = request
        self.num_drafts = num_drafts
        self.params = request.params

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids + self.request.draft_token_ids[:self.num_drafts]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.request.num_output_tokens + self.num_drafts


def accept_or_resample(p: torch.Tensor, q: torch.Tensor | None, draft_token: int,
                       generator: torch.Generator) -> int | None:
    """One rejection-sampling step. p: the target's distribution; q: the draft's (None: one-hot on
    `draft_token`). Returns None if the draft is accepted, otherwise the replacement token."""
    q_draft = 1.0 if q is None else float(q[draft_token])
    if float(torch.rand((), generator=generator)) * q_draft < float(p[draft_token]):
        return None
    if q is None:
        residual = p.clone()
        residual[draft_token] = 0.0
    else:
        residual = (p - q).clamp_(min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection was rounding noise
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator))


def verify(logits: torch.Tensor, requests: list[Request], draft_probs: list[torch.Tensor | None],
           eos_token_ids: frozenset[int] = frozenset(), masks: TokenMasks | None = None) -> list[Verdict]:
    """logits: 1 + len(request.draft_token_ids) consecutive rows per request (requests without
    drafts are sampled exactly as the plain sampler would). draft_probs: per request, its drafts'
    distributions or None. masks: grammar masks of the constrained rows."""
    if masks is not None:
        logits = masks.apply(logits)
    positions = [_Position(r, j) for r in requests for j in range(1 + len(r.draft_token_ids))]
    processed = apply_logit_processors(logits, positions, eos_token_ids)
    targets = processed.argmax(dim=-1).tolist()
    sampled_rows = [i for i, position in enumerate(positions) if not position.params.greedy]
    probs = None
    if sampled_rows:
        probs = processed.new_zeros(processed.shape)
        probs[sampled_rows] = sampling_probabilities(processed[sampled_rows],
                                                     [positions[i].params for i in sampled_rows])
    verdicts, first_row = [], 0
    for request, q in zip(requests, draft_probs):
        rows = range(first_row, first_row + 1 + len(request.draft_token_ids))
        if request.params.greedy:
            tokens = _verify_greedy(request.draft_token_ids, [targets[r] for r in rows])
        else:
            tokens = _verify_sampled(request.draft_token_ids, probs[rows.start:rows.stop], q, request.generator)
        emitted = list(rows[:len(tokens)])
        records = logprob_records(logits[emitted], [positions[r] for r in emitted], tokens)
        verdicts.append(Verdict(tokens, records, num_accepted=len(tokens) - 1))
        first_row = rows.stop
    return verdicts


def _verify_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return drafts[:accepted] + [targets[accepted]]


def _verify_sampled(drafts: list[int], p: torch.Tensor, q: torch.Tensor | None,
                    generator: torch.Generator) -> list[int]:
    for j, draft_token in enumerate(drafts):
        replacement = accept_or_resample(p[j], None if q is None else q[j], draft_token, generator)
        if replacement is not None:
            return drafts[:j] + [replacement]
    return drafts + [int(torch.multinomial(p[len(drafts)], 1, generator=generator))]

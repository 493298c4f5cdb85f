"""The engine's one handle on speculative decoding: ask the drafter for drafts after each step,
verify them after the next forward, adapt each request's draft length, and count.

Draft length adapts per request, so a workload whose drafts are rarely accepted costs next to
nothing: after a round that accepted a drafts, the next proposes at most a + 1 tokens (growing back
by one per fully accepted round), and after rounds that accepted nothing the request stops
drafting for 1, 2, 4 ... (at most MAX_PAUSE) steps.

Where the model's kernels pay for rows in blocks (`row_block`: 4 for native int4/int8 weights on a
CPU), a draft that opens a new block costs as much as a third of a 4-stream step. So greedy
requests draft into the rows the step pays for anyway (up to the next multiple of the block), and
beyond them only while their drafts are usually accepted (CONFIDENT). Greedy output does not
depend on what is drafted; sampled requests keep their own schedule, which depends on nothing else
in the batch, so that a seeded request gives the same tokens alone or in company.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quill.engine.request import Request
from quill.speculative.drafter import Drafter
from quill.structured.masks import TokenMasks
from quill.speculative.verifier import Verdict, verify

# (request, proposed draft) -> how many of its first tokens the request may take.
DraftFilter = Callable[[Request, list[int]], int]
MAX_PAUSE = 16
# Acceptance rate (moving average over rounds) from which a request's drafts may open new row
# blocks: about twice the break-even rate measured for SmolLM2 with 4 streams, where the 4 rows of
# a new block cost 40% of a step and each accepted draft saves a quarter of one.
CONFIDENT = 0.75
ACCEPTANCE_SMOOTHING = 0.5  # weight of the latest round in the moving average


@dataclass
class SpeculativeStats:
    num_drafts: int = 0  # verification rounds with at least one draft token
    num_draft_tokens: int = 0  # proposed and verified
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verification round: accepted drafts plus the target's own (1 + a/r)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass
class _DraftLength:
    max_length: int
    length: int
    pause: int = 0  # steps left without drafting
    misses: int = 0  # consecutive rounds that accepted nothing
    acceptance: float = 1.0  # moving average of accepted / proposed; optimistic at first

    def next(self) -> int:
        if self.pause:
            self.pause -= 1
            return 0
        return self.length

    def update(self, accepted: int, proposed: int) -> None:
        self.acceptance += ACCEPTANCE_SMOOTHING * (accepted / proposed - self.acceptance)
        self.length = min(self.max_length, accepted + 1)
        self.misses = 0 if accepted else self.misses + 1
        if self.misses:
            self.pause = min(MAX_PAUSE, 2 ** (self.misses - 1))


class Speculator:
    def __init__(self, drafter: Drafter, num_speculative_tokens: int, max_model_len: int,
                 adaptive: bool = True, row_block: int | None = None) -> None:
        self.drafter = drafter
        self.row_block = row_block
        self.num_speculative_tokens = num_speculative_tokens
        self.max_model_len = max_model_len
        self.adaptive = adaptive
        self.stats = SpeculativeStats()
        self._lengths: dict[str, _DraftLength] = {}
        self._draft_probs: dict[str, torch.Tensor] = {}

    def propose(self, requests: list[Request], draft_filter: DraftFilter | None = None) -> None:
        """Set `draft_token_ids` of those decoding requests that speculate next step. `draft_filter`
        says how long a prefix of a draft a request may take (its grammar's verdict): deterministic
        drafts are cut there, since a token the grammar rejects can never be accepted. Drafts drawn
        from a distribution are kept whole: cutting them would skew rejection sampling, which
        rejects the invalid token itself (its target probability is zero)."""
        drafting, max_lengths = [], []
        for request in requests:
            self._draft_probs.pop(request.request_id, None)
            if not request.params.speculative or not request.is_decoding:
                continue
            # Room for the drafts plus the target's own token, within max_tokens and the context.
            params = request.params
            room = min(params.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens) - 1
            length = min(self._length(request).next(), room)
            if length > 0:
                drafting.append(request)
                max_lengths.append(length)
        if self.adaptive and self.row_block:
            max_lengths = self._fit_row_blocks(len(requests), drafting, max_lengths)
            drafting, max_lengths = [r for r, n in zip(drafting, max_lengths) if n], [n for n in max_lengths if n]
        if not drafting:
            return
        for request, draft in zip(drafting, self.drafter.propose(drafting, max_lengths)):
            if draft_filter is not None and draft.probs is None:
                del draft.token_ids[draft_filter(request, draft.token_ids):]
            request.draft_token_ids = draft.token_ids
            if draft.probs is not None:
                self._draft_probs[request.request_id] = draft.probs

    def verify(self, logits: torch.Tensor, requests: list[Request], eos_token_ids: frozenset[int],
               masks: TokenMasks | None = None) -> list[Verdict]:
        """Verdicts for every sampled request (see `verifier.verify`), counted and fed back into
        the draft lengths."""
        draft_probs = [self._draft_probs.pop(r.request_id, None) if r.draft_token_ids else None for r in requests]
        verdicts = verify(logits, requests, draft_probs, eos_token_ids, masks)
        for request, verdict in zip(requests, verdicts):
            proposed = len(request.draft_token_ids)
            if proposed:
                self.stats.num_drafts += 1
                self.stats.num_draft_tokens += proposed
                self.stats.num_accepted_tokens += verdict.num_accepted
                if self.adaptive:
                    self._length(request).update(verdict.num_accepted, proposed)
        return verdicts

    def _fit_row_blocks(self, num_rows: int, drafting: list[Request], lengths: list[int]) -> list[int]:
        """Trim greedy, not-confident requests' draft lengths to the rows left in the last block
        that the step's `num_rows` decode rows and every other draft open anyway; the most often
        accepted get them first."""
        trimmable = [i for i, r in enumerate(drafting)
                     if r.params.greedy and self._length(r).acceptance < CONFIDENT]
        kept = set(range(len(drafting))) - set(trimmable)
        free = -(num_rows + sum(lengths[i] for i in kept)) % self.row_block
        fitted = list(lengths)
        for i in sorted(trimmable, key=lambda i: -self._length(drafting[i]).acceptance):
            fitted[i] = min(lengths[i], free)
            free -= fitted[i]
        return fitted

    def finish(self, request: Request) -> None:
        self.drafter.finish(request.request_id)
        self._lengths.pop(request.request_id, None)
        self._draft_probs.pop(request.request_id, None)

    def _length(self, request: Request) -> _DraftLength:
        length = self._lengths.get(request.request_id)
        if length is None:
            k = self.num_speculative_tokens
            length = self._lengths[request.request_id] = _DraftLength(max_length=k, length=k)
        return length

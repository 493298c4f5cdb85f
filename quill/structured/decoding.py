"""The engine's one handle on constrained decoding: a matcher per sequence, masks per step, counters.

Step order (see `Engine.step`):
1. the scheduler picks the batch; `start` hands the matchers of the constrained requests that
   sample this step to a worker thread, which fills their masks (one row per position: the last
   token and each scheduled draft) while the engine thread runs the forward pass: one call into
   llguidance for the whole batch, which releases the GIL while it computes (the worker runs no
   torch op), so the two overlap;
2. after the forward pass, `collect` waits for the worker (usually long done) and lines the masks
   up with the logits rows; the sampler or verifier applies them before anything else;
3. each committed token advances its matcher (`advance`); a grammar that is complete ends the
   request with finish_reason "stop";
4. new drafts are cut at the first token the grammar rejects (`draft_prefix`, via the speculator).
A matcher is touched by one thread at a time: the worker owns those of a job from `start` until
`collect`, and nothing else mutates a matcher in between (`_settle` waits out a job a failed step
left behind).

Greedy requests without logprobs skip step 1 when no draft is in the batch: `sample` takes their
argmax unmasked and vets it (`GrammarMatcher.vet`, microseconds): where the grammar forces a
token, that token; where the grammar allows the argmax, the argmax (masking only removes candidates,
and bias and penalties act on each token alone, so it is the masked row's argmax too); otherwise the
pick is made again under its mask, computed then. So the tokens are the masked path's. Why: on 2
cores the worker's masks (250 us each at p50, 16 per step at 16 streams) took a core from the
forward pass's two threads. benchmarks/structured.py, 2-core AMD EPYC, same run: constrained 0.84x
unconstrained at 16 streams with every mask on the worker, 0.94-0.96x vetted (89% of picks unmasked).

A matcher's state is the sequence's committed output, so it survives preemption (the tokens are
kept and recomputed, the matcher keeps its place) and prefix caching and chunked prefill (which
change only how the prompt's KV is computed) unchanged.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from quill.errors import StructuredOutputError
from quill.structured.compiler import DEFAULT_CACHE_SIZE, GrammarCompiler
from quill.structured.constraints import Constraint
from quill.structured.masks import TokenMasks
from quill.structured.matcher import GrammarMatcher, fill_masks, mask_words
from quill.structured.stats import Histogram, StructuredStats

log = logging.getLogger("quill.structured")


class Request(Protocol):
    """What this module reads of an engine request (`quill.engine.request.Request`, a layer above)."""

    request_id: str
    params: Any  # SamplingParams: its constraint's kind names the field in errors
    num_tokens: int
    num_computed_tokens: int
    num_output_tokens: int
    draft_token_ids: list[int]


RECENT_MASK_TIMES = 1 << 16  # per-mask seconds kept for exact percentiles (benchmarks read them)


@dataclass
class _Entry:
    matcher: GrammarMatcher
    draft_token_ids: list[int]
    first_row: int  # in the job's bits


@dataclass
class MaskJob:
    entries: dict[str, _Entry]  # by request id: masked up front, by the worker
    bits: torch.Tensor  # [rows, words] int32, filled by the worker
    done: Future | None  # result: seconds per mask (None: nothing for the worker)
    vetted: dict[str, GrammarMatcher]  # by request id: greedy picks made unmasked, then vetted


# sampler(logits rows, their requests, masks=masks or None) -> (token per row, logprob record per row)
Sampler = Callable[..., tuple[list[int], list]]


class StructuredDecoding:
    def __init__(self, tokenizer, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, cache_size)
        self.words = mask_words(self.compiler.vocab_size)
        self._matchers: dict[str, GrammarMatcher] = {}
        self._worker: ThreadPoolExecutor | None = None  # started with the first constrained request
        self._pending: Future | None = None
        self._num_requests = 0
        self._mask_seconds = Histogram()
        self._mask_wait_seconds = 0.0
        self._num_vetted = 0  # greedy picks vetted instead of masked up front
        self._num_vetted_masked = 0  # ... of which the mask decided
        self.recent_mask_seconds: deque[float] = deque(maxlen=RECENT_MASK_TIMES)

    # ------------------------------------------------------------------ requests in and out
    def matchers(self, constraint: Constraint, count: int) -> list[GrammarMatcher]:
        """Fresh matchers for the `count` sequences of one request; raises StructuredOutputError
        if the grammar does not compile for this tokenizer."""
        matchers = self.compiler.matchers(constraint, count)
        self._num_requests += 1
        return matchers

    def attach(self, request_id: str, matcher: GrammarMatcher) -> None:
        self._matchers[request_id] = matcher

    def finish(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)  # an in-flight job keeps its own reference

    # -------------------------------------------------------------------------- the step
    def start(self, requests: list[Request], num_new_tokens: list[int]) -> MaskJob | None:
        """Start filling the masks of the constrained requests this batch samples (greedy ones
        without logprobs are vetted after sampling instead, when no draft is in the batch)."""
        self._settle()
        vetting = not any(request.draft_token_ids for request in requests)  # see `sample`
        entries, vetted, num_rows = {}, {}, 0
        for request, num_new in zip(requests, num_new_tokens):
            matcher = self._matchers.get(request.request_id)
            if matcher is None or request.num_computed_tokens + num_new < request.num_tokens:
                continue
            if vetting and request.params.greedy and request.params.logprobs is None:
                vetted[request.request_id] = matcher
            else:
                entries[request.request_id] = _Entry(matcher, list(request.draft_token_ids), num_rows)
                num_rows += 1 + len(request.draft_token_ids)
        if not entries and not vetted:
            return None
        bits, done = self._all_allowed(num_rows), None
        if entries:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quill-masks")
            done = self._pending = self._worker.submit(_fill_masks, list(entries.values()), bits)
        return MaskJob(entries, bits, done, vetted)

    def collect(self, job: MaskJob | None, to_sample: list[Request],
                unmasked: dict[str, GrammarMatcher] | None = None) -> TokenMasks | None:
        """The masks of the sampled requests' logits rows (each request has 1 + drafts rows), but
        for the requests in `unmasked`."""
        if job is not None and job.done is not None:
            waited = time.perf_counter()
            per_mask = job.done.result()
            self._mask_wait_seconds += time.perf_counter() - waited
            self._pending = None
            self._observe(per_mask, job.bits.shape[0])
        rows, pieces, row = [], [], 0
        for request in to_sample:
            num_rows = 1 + len(request.draft_token_ids)
            bits = None if unmasked and request.request_id in unmasked else self._bits_for(job, request, num_rows)
            if bits is not None:
                rows.extend(range(row, row + num_rows))
                pieces.append(bits)
            row += num_rows
        return TokenMasks(rows, torch.cat(pieces)) if pieces else None

    def sample(self, job: MaskJob | None, requests: list[Request], logits: torch.Tensor,
               sampler: Sampler) -> tuple[list[int], list]:
        """The step's tokens for a batch without drafts (one logits row per request): the requests
        masked up front sample under their masks; each vetted greedy pick becomes the masked pick
        where its grammar can tell that without a mask (`GrammarMatcher.vet`), and the others are
        picked again from their rows under their masks, computed now."""
        vetted = job.vetted if job is not None else {}
        tokens, logprobs = sampler(logits, requests, masks=self.collect(job, requests, unmasked=vetted))
        if not vetted:
            return tokens, logprobs
        started = time.perf_counter()
        undecided = []
        for i, request in enumerate(requests):
            matcher = vetted.get(request.request_id)
            if matcher is not None:
                self._num_vetted += 1
                pick = matcher.vet(tokens[i])
                if pick is None:
                    undecided.append(i)
                else:
                    tokens[i] = pick
        if undecided:  # only the mask can tell: pick these again under it
            bits = self._fill_now([_Entry(vetted[requests[i].request_id], [], row) for row, i in enumerate(undecided)])
            again = sampler(logits[undecided], [requests[i] for i in undecided],
                            masks=TokenMasks(list(range(len(undecided))), bits))
            for i, token, logprob in zip(undecided, *again):
                tokens[i], logprobs[i] = token, logprob
            self._num_vetted_masked += len(undecided)
        self._mask_wait_seconds += time.perf_counter() - started
        return tokens, logprobs

    def _bits_for(self, job: MaskJob | None, request: Request, num_rows: int) -> torch.Tensor | None:
        entry = job.entries.get(request.request_id) if job is not None else None
        if entry is not None:
            return job.bits[entry.first_row:entry.first_row + num_rows]
        matcher = self._matchers.get(request.request_id)
        if matcher is None:
            return None
        # Sampled though `start` did not foresee it: fill its masks here, on the engine thread.
        return self._fill_now([_Entry(matcher, list(request.draft_token_ids), 0)])

    def _fill_now(self, entries: list[_Entry]) -> torch.Tensor:
        """Fill the entries' masks on the calling thread (rows numbered by `first_row`)."""
        bits = self._all_allowed(sum(1 + len(entry.draft_token_ids) for entry in entries))
        self._observe(_fill_masks(entries, bits), bits.shape[0])
        return bits

    def _all_allowed(self, num_rows: int) -> torch.Tensor:
        # Rows past a draft the grammar rejects are never read (see matcher.fill_masks);
        # all-allowed keeps them harmless, and the worker thread never has to run a torch op.
        return torch.full((num_rows, self.words), -1, dtype=torch.int32)

    def advance(self, request: Request, token_id: int) -> bool:
        """Commit a token to the request's matcher. Returns whether its grammar is complete.
        Raises StructuredOutputError if the grammar failed on the way (that request alone fails)."""
        matcher = self._matchers.get(request.request_id)
        if matcher is None:
            return False
        self._settle()
        if matcher.error:
            # The grammar broke while its mask was computed (llguidance stops a parser that
            # exceeds its step limits: "ParserTooComplex"); the mask then allowed only EOS.
            raise _grammar_failed(request, matcher.error)
        if not matcher.advance(token_id):  # masks make this impossible: a bug, not a user error
            raise RuntimeError(f"request {request.request_id}: the grammar rejected committed token {token_id}: "
                               f"{matcher.error}")
        return matcher.is_terminated

    def draft_prefix(self, request: Request, token_ids: list[int]) -> int:
        """How many of the proposed drafts the request's grammar allows in a row."""
        matcher = self._matchers.get(request.request_id)
        if matcher is None:
            return len(token_ids)
        self._settle()
        return matcher.valid_prefix(token_ids)

    def _settle(self) -> None:
        """Wait out a job that a failed step started and never collected."""
        if self._pending is not None:
            self._pending.exception()  # waits; its outcome no longer matters
            self._pending = None

    # ----------------------------------------------------------------------------- stats
    def _observe(self, seconds_per_mask: float, num_masks: int) -> None:
        self._mask_seconds.observe(seconds_per_mask, num_masks)
        self.recent_mask_seconds.extend([seconds_per_mask] * num_masks)

    def stats(self) -> StructuredStats:
        compiler = self.compiler
        return StructuredStats(
            num_constrained_requests=self._num_requests, grammar_cache_hits=compiler.hits,
            grammar_cache_misses=compiler.misses, grammar_compile_seconds=compiler.compile_seconds,
            mask_seconds_buckets=self._mask_seconds.cumulative(), mask_seconds_sum=self._mask_seconds.sum,
            mask_seconds_count=self._mask_seconds.count, mask_wait_seconds=self._mask_wait_seconds,
            vetted_picks=self._num_vetted, vetted_picks_masked=self._num_vetted_masked,
        )


def _grammar_failed(request: Request, detail: str) -> StructuredOutputError:
    """The error for `request`, whose output already holds the token being committed."""
    log.warning("request %s: its grammar failed at output token %d: %s", request.request_id,
                request.num_output_tokens, detail)
    kind = request.params.constraint.kind
    reason = detail.strip().splitlines()[0][:300] if detail.strip() else "unknown error"  # the rest is state dump
    return StructuredOutputError(f"the {kind} constraint failed at output token {request.num_output_tokens} "
                                 f"(the grammar matcher stopped: {reason}); simplify it or allow fewer tokens",
                                 param=kind, code="grammar_failed")


def _fill_masks(entries: list[_Entry], bits: torch.Tensor) -> float:
    """Fill every entry's rows (on the worker thread: one GIL-free call). Returns seconds per mask."""
    started = time.perf_counter()
    fill_masks([(entry.matcher, entry.first_row, entry.draft_token_ids) for entry in entries], bits)
    return (time.perf_counter() - started) / bits.shape[0]

"""Continuous batching: which requests run this step, and how many tokens each.

Every request carries `num_computed_tokens`; a step schedules up to `num_tokens -
num_computed_tokens` more for it. Prefill and decode are the same thing seen this way, which gives
chunked prefill for free: a long prompt takes what is left of the step's token budget and
continues next step, while running requests' decodes go first so they never stall behind it.
When the KV pool runs dry, the most recently admitted request is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed later (nothing is lost).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from quill.engine.kv_cache import KVCacheManager
from quill.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = self._num_new_tokens(request, budget)
            if request.draft_token_ids and not self.kv_cache.allocate(request, num_new):
                request.draft_token_ids = []  # no room for drafts: decode plainly instead
                num_new = 1
            if not self._allocate_or_preempt(request, num_new, batch):  # a no-op if allocated above
                continue
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        if batch.num_preempted:
            return batch  # memory is tight: admit nobody new this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if self._same_prompt_prefilling(request):
                break  # wait one step, then reuse its blocks through the prefix cache
            cached_prefix = self.kv_cache.find_cached_prefix(request)
            num_cached = len(cached_prefix) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv_cache.allocate(request, num_new, cached_prefix):
                break
            self.kv_cache.record_prefix_lookup(request.num_tokens, num_cached)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.perf_counter()
                request.metrics.num_cached_prompt_tokens = num_cached
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return batch

    @staticmethod
    def _num_new_tokens(request: Request, budget: int) -> int:
        if request.draft_token_ids and request.is_decoding:
            del request.draft_token_ids[budget - 1:]
            return 1 + len(request.draft_token_ids)
        request.draft_token_ids = []
        return min(request.num_tokens - request.num_computed_tokens, budget)

    def _same_prompt_prefilling(self, request: Request) -> bool:
        """Whether a running request with the same prompt (e.g. a sibling of an n > 1 request) is
        still computing it; admitting this one now would compute the same blocks twice."""
        return self.kv_cache.enable_prefix_caching and any(
            other.prompt_key == request.prompt_key and other.is_prefilling for other in self.running
        )

    def _allocate_or_preempt(self, request: Request, num_new: int, batch: ScheduledBatch) -> bool:
        """Allocate for a running request, preempting the newest others until it fits.

        Returns False if the request itself had to be preempted.
        """
        while not self.kv_cache.allocate(request, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            batch.num_preempted += 1
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.draft_token_ids = []
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request, wherever it is, and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.FINISHED

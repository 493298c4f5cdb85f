"""Drafting with a smaller model that shares the target's tokenizer.

The draft model has its own paged KV cache (a KVCacheManager and ModelRunner of its own) and a
mirror request per target request. Each round the mirror is re-synced to the target's committed
tokens: its KV stays valid up to the first token where the two differ (the first rejected draft),
everything after is rolled back (blocks released), and the model then runs once over the tokens it
has not seen (usually the accepted drafts' last one and the target's own token) and k - 1 more
times one token at a time, all requests batched together.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from quill.config import ModelConfig
from quill.engine.kv_cache import KVCacheManager
from quill.engine.request import Request
from quill.engine.runner import ModelRunner
from quill.engine.sampler import apply_logit_processors, sampling_probabilities
from quill.errors import ModelLoadError
from quill.speculative.drafter import Draft


class DraftModelDrafter:
    def __init__(self, runner: ModelRunner, kv_cache: KVCacheManager) -> None:
        self.runner = runner
        self.kv_cache = kv_cache
        self._mirrors: dict[str, Request] = {}
        self._num_synced: dict[str, int] = {}  # mirror tokens known equal to the target's

    @classmethod
    def load(cls, model: str | Path, target_config: ModelConfig, target_tokenizer, *, num_blocks: int,
             block_size: int, dtype: torch.dtype, kv_cache_dtype: torch.dtype,
             device: torch.device, int8_activations: bool = False) -> DraftModelDrafter:
        """Load the draft model and check that it speaks the target's vocabulary."""
        from quill.models.loader import load_model_and_tokenizer

        # Weights as the target's: native on a CPU. A token-ids-only target has no vocabulary to compare.
        draft = load_model_and_tokenizer(model, dtype, device, tokenizer=target_tokenizer is not None)
        if draft.config.vocab_size != target_config.vocab_size:
            raise ModelLoadError(f"draft model {model} has a vocabulary of {draft.config.vocab_size} tokens, "
                                 f"the target {target_config.vocab_size}: they must share a tokenizer")
        if target_tokenizer is not None and draft.tokenizer.backend.get_vocab() != target_tokenizer.backend.get_vocab():
            raise ModelLoadError(f"draft model {model} does not use the target model's tokenizer")
        runner = ModelRunner(draft.model, draft.config, num_blocks=num_blocks, block_size=block_size,
                             kv_cache_dtype=kv_cache_dtype, device=device, int8_activations=int8_activations)
        # No prefix caching: mirrors are rolled back and re-synced, never shared.
        return cls(runner, KVCacheManager(num_blocks, block_size, enable_prefix_caching=False))

    def propose(self, requests: list[Request], max_lengths: list[int]) -> list[Draft]:
        drafts = [Draft([]) for _ in requests]
        active: list[tuple[int, Request]] = []
        for i, (request, length) in enumerate(zip(requests, max_lengths)):
            mirror = self._sync(request)
            # KV for every token but the last draft (which is proposed, never fed back in).
            if self.kv_cache.allocate(mirror, mirror.num_tokens - mirror.num_computed_tokens + length - 1):
                active.append((i, mirror))
            else:  # no room in the draft cache: give this one's blocks back, it re-syncs later
                self.finish(request.request_id)
        probs: dict[int, list[torch.Tensor]] = {}
        num_new = [m.num_tokens - m.num_computed_tokens for _, m in active]
        for step in range(max(max_lengths, default=0)):
            active = [(i, m) for i, m in active if len(drafts[i].token_ids) < max_lengths[i]]
            if not active:
                break
            mirrors = [m for _, m in active]
            logits = self.runner.execute(mirrors, num_new if step == 0 else [1] * len(mirrors)).logits
            for mirror in mirrors:
                mirror.num_computed_tokens = mirror.num_tokens
            for (i, mirror), token, row in zip(active, *self._draw(logits, mirrors)):
                mirror.token_ids.append(token)
                drafts[i].token_ids.append(token)
                if row is not None:
                    probs.setdefault(i, []).append(row)
        for i, rows in probs.items():
            drafts[i].probs = torch.stack(rows)
        return drafts

    def finish(self, request_id: str) -> None:
        mirror = self._mirrors.pop(request_id, None)
        self._num_synced.pop(request_id, None)
        if mirror is not None:
            self.kv_cache.free(mirror)

    def _sync(self, request: Request) -> Request:
        """The request's mirror, holding exactly its committed tokens, KV rolled back to the part
        still valid."""
        mirror = self._mirrors.get(request.request_id)
        if mirror is None:
            params = request.params  # the draft scores no prompt: that is the target's answer
            if params.prompt_logprobs is not None:
                params = dataclasses.replace(params, prompt_logprobs=None)
            mirror = Request(request.request_id, request.prompt_token_ids, params, request.generator)
            self._mirrors[request.request_id] = mirror
        valid = self._num_synced.get(request.request_id, 0)
        limit = min(mirror.num_computed_tokens, request.num_tokens - 1)
        while valid < limit and mirror.token_ids[valid] == request.token_ids[valid]:
            valid += 1
        valid = min(valid, limit)
        mirror.token_ids = list(request.token_ids)
        mirror.num_computed_tokens = valid
        self.kv_cache.trim(mirror, valid)
        self._num_synced[request.request_id] = request.num_tokens
        return mirror

    @staticmethod
    def _draw(logits: torch.Tensor, mirrors: list[Request]) -> tuple[list[int], list[torch.Tensor | None]]:
        """Each mirror's next draft token, with the distribution it was drawn from (None: greedy,
        chosen by argmax). The target's sampling settings shape q too: the closer q is to p, the
        more drafts are accepted."""
        logits = apply_logit_processors(logits, mirrors, frozenset())
        tokens = logits.argmax(dim=-1).tolist()
        rows: list[torch.Tensor | None] = [None] * len(mirrors)
        sampled = [i for i, m in enumerate(mirrors) if not m.params.greedy]
        if sampled:
            probs = sampling_probabilities(logits[sampled], [mirrors[i].params for i in sampled])
            for row, i in enumerate(sampled):
                tokens[i] = int(torch.multinomial(probs[row], 1, generator=mirrors[i].generator))
                rows[i] = probs[row]
        return tokens, rows

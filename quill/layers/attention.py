"""Attention over a paged KV cache.

The runner hands every layer the same `AttentionMetadata`: where each new token's key/value goes
(`slot_mapping`) and, per sequence, which cache slots hold its whole context (`context_slots`).
Each sequence is attended separately, so a row's result never depends on what else is in the batch.

A sequence can also ask for its queries to be attended one at a time (`one_query_at_a_time`):
speculative verification does, because PyTorch's attention over several queries with a causal
mask is not bit-identical to the same queries decoded alone (measured: ~1e-7 apart in float32,
enough to flip a greedy token), and verification must reproduce plain decoding exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    query_lens: list[int]  # new tokens per sequence, in batch order
    context_lens: list[int]  # tokens in the cache per sequence once this step's are written
    # Cache slots of every context that must be read from the cache (all sequences except those
    # prefilling from scratch), concatenated in batch order; one gather per layer reads them all.
    cached_context_slots: torch.Tensor
    # Per sequence (empty: none): attend each of its queries alone, exactly as a one-token decode
    # of that position would, rather than all of them in one masked call.
    one_query_at_a_time: list[bool] = field(default_factory=list)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # [num_kv_heads, num_slots, head_dim], head-major so that a gather yields the layout
        # attention wants; bound by the runner once the cache is sized.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]. Returns [tokens, heads * dim],
        in q's dtype; attention itself runs in the cache's dtype."""
        out_dtype = q.dtype
        # [heads, tokens, dim] from here on
        q, k, v = (t.transpose(0, 1).to(self.k_cache.dtype) for t in (q, k, v))
        self.k_cache.index_copy_(1, meta.slot_mapping, k)
        self.v_cache.index_copy_(1, meta.slot_mapping, v)
        cached_k = self.k_cache.index_select(1, meta.cached_context_slots)
        cached_v = self.v_cache.index_select(1, meta.cached_context_slots)
        outputs = []
        start = cached_start = 0
        one_by_one = meta.one_query_at_a_time or repeat(False)
        for query_len, context_len, by_query in zip(meta.query_lens, meta.context_lens, one_by_one):
            if query_len == context_len:  # nothing cached before: use this step's keys directly
                keys, values, first_slot = k, v, start
            else:
                keys, values, first_slot = cached_k, cached_v, cached_start
                cached_start += context_len
            queries = q[:, start:start + query_len]
            if by_query:
                for i in range(query_len):
                    outputs.append(self._attend_slice(queries[:, i:i + 1], keys, values, first_slot,
                                                      context_len - query_len + i + 1))
            else:
                outputs.append(self._attend_slice(queries, keys, values, first_slot, context_len))
            start += query_len
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return out.transpose(0, 1).reshape(-1, self.num_heads * self.head_dim).to(out_dtype)

    def _attend_slice(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_slot: int,
                      context_len: int) -> torch.Tensor:
        """Attend q (the last queries of a context of `context_len` tokens whose keys start at
        `first_slot` in `keys`/`values`)."""
        first_key = self._first_visible_key(q.shape[1], context_len)
        k_seq = keys[:, first_slot + first_key:first_slot + context_len]
        v_seq = values[:, first_slot + first_key:first_slot + context_len]
        return self._attend(q, k_seq, v_seq, first_key)

    def _first_visible_key(self, query_len: int, context_len: int) -> int:
        """Position of the oldest key any of these queries can see: a sliding-window layer never
        needs to look further back than its window."""
        if self.sliding_window is None:
            return 0
        return max(0, context_len - query_len - self.sliding_window + 1)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_key: int) -> torch.Tensor:
        """q: [heads, queries, dim]; k, v: [kv_heads, keys, dim], the keys from position
        `first_key` on. PyTorch's fused CPU kernel takes 4-D inputs (3-D ones fall back to a path
        about 3x slower for long prompts)."""
        context_len = first_key + k.shape[1]
        mask = self._mask(q.shape[1], context_len, first_key, q.device)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=self.scale,
                                             enable_gqa=True)
        return out[0]

    def _mask(self, query_len: int, context_len: int, first_key: int, device: torch.device) -> torch.Tensor | None:
        """Boolean [query, key] mask (True = attend) over keys first_key..context_len-1: causal,
        plus the sliding window if any."""
        window = self.sliding_window
        if query_len == 1 and (window is None or context_len - first_key <= window):
            return None
        query_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
        key_pos = torch.arange(first_key, context_len, device=device)[None, :]
        mask = key_pos <= query_pos
        if window is not None:
            mask &= query_pos - key_pos < window
        return mask

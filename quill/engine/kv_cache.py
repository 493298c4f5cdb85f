"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, reference-counted, with a prefix cache.

The tensors themselves live in the model runner; this class only decides which block ids each
request owns. A full block is identified by a hash chained over its tokens and its parent block's
hash, so equal prefixes map to equal hashes. Blocks nobody references stay in the cache, in LRU
order, until a new allocation needs them.

How many blocks there are is decided once, from a memory budget (`plan_kv_cache`): the operator's
`--kv-cache-memory`, or a default that is never exceeded. A context window longer than the budget
holds is shortened to fit it, so no model file can make the engine ask for more memory than that.
"""
from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from quill.engine.request import Request
from quill.errors import InvalidRequestError

log = logging.getLogger("quill.engine")

# The default budget: the KV cache of 1 GiB holds 46,603 tokens of SmolLM2-135M (float16 keys and
# values) or 58,254 of Gemma 3 270M, several full-length sequences of each; a model with a longer
# window or a larger cache per token gets a shorter usable context, never a larger allocation.
DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class KVCachePlan:
    """How big the KV cache is, and what that leaves of the context window."""

    budget_bytes: int  # what the cache may take (the operator's, or the default)
    default_budget: bool  # the budget was not chosen by the operator
    bytes_per_token: int
    block_size: int
    num_blocks: int
    max_model_len: int  # the usable context window: the model's (or the operator's), at most the cache
    model_max_len: int  # the window asked for, before fitting it to the cache

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        """What the cache's tensors take (at most the budget)."""
        return self.capacity_tokens * self.bytes_per_token

    @property
    def shortened(self) -> bool:
        return self.max_model_len < self.model_max_len

    def describe(self) -> str:
        """One line for the start-up log."""
        budget = f"{_gib(self.budget_bytes)} ({'default' if self.default_budget else '--kv-cache-memory'})"
        line = (f"KV cache: {budget} holds {self.capacity_tokens:,} tokens in {self.num_blocks:,} blocks of "
                f"{self.block_size} ({self.bytes_per_token:,} bytes per token), "
                f"{self.capacity_tokens / self.max_model_len:.1f} sequences of {self.max_model_len:,} tokens")
        if self.shortened:
            line += f"; the context window is shortened from {self.model_max_len:,} tokens to fit"
        return line


def plan_kv_cache(budget_bytes: int | None, bytes_per_token: int, block_size: int, max_model_len: int,
                  max_num_seqs: int, window_chosen: bool = False) -> KVCachePlan:
    """Size the cache from `budget_bytes` (None: the default, which is also never more than every
    sequence slot at full length needs). A window the cache cannot hold one sequence of is
    shortened to the cache, with a warning; when the operator chose that window (`window_chosen`),
    and so would not get what they asked for, it is an error instead."""
    default = budget_bytes is None
    if default:
        budget_bytes = min(DEFAULT_KV_CACHE_BYTES, bytes_per_token * max_model_len * max_num_seqs)
    num_blocks = budget_bytes // (bytes_per_token * block_size)
    if num_blocks < 1:
        raise InvalidRequestError(f"a KV cache of {budget_bytes:,} bytes holds no block of {block_size} tokens "
                                  f"({bytes_per_token * block_size:,} bytes); raise --kv-cache-memory",
                                  param="kv_cache_memory")
    usable = min(max_model_len, num_blocks * block_size)
    if usable < max_model_len and window_chosen:
        raise InvalidRequestError(
            f"a context of {max_model_len:,} tokens needs {_gib(bytes_per_token * max_model_len)} of KV cache, "
            f"more than the {_gib(budget_bytes)} budget; raise --kv-cache-memory or lower --max-model-len",
            param="max_model_len")
    plan = KVCachePlan(budget_bytes, default, bytes_per_token, block_size, num_blocks, usable, max_model_len)
    if plan.shortened:
        log.warning("the model's context window of %s tokens does not fit the KV cache's %s; it is shortened to "
                    "%s tokens (raise --kv-cache-memory for more)", f"{max_model_len:,}", _gib(budget_bytes),
                    f"{usable:,}")
    return plan


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """A collision-resistant hash of a block's tokens and everything before it."""
    digest = hashlib.blake2b(parent_hash or b"root", digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass
class KVCacheStats:
    num_blocks: int
    num_free_blocks: int  # not referenced by any request (cached or empty)
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, tokens found in the cache

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached_blocks: dict[bytes, int] = {}  # hash -> block id
        # Unreferenced blocks, least recently used first; empty blocks are simply the oldest.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids holding the longest cached prefix of the request's tokens.

        At least one token is always left to compute, because the model must run on the last
        token to produce the next one's logits. A request that still needs its prompt's logprobs
        computes every prompt token: it reads nothing from the cache.
        """
        if not self.enable_prefix_caching or request.needs_prompt_logprobs:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[int] = []
        parent = None
        for i in range(max_blocks):
            parent = hash_block(parent, request.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_id = self.cached_blocks.get(parent)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def record_prefix_lookup(self, num_tokens: int, num_cached_tokens: int) -> None:
        """Count one admitted request's lookup (not retries of a request that did not fit)."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_cached_tokens

    def allocate(self, request: Request, num_new_tokens: int, cached_prefix: list[int] = ()) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after its cached prefix, if any).

        Returns False, changing nothing, when the pool cannot supply them.
        """
        num_computed = request.num_computed_tokens + len(cached_prefix) * self.block_size
        needed = self.blocks_needed(num_computed + num_new_tokens) - len(request.block_ids) - len(cached_prefix)
        reusable_free = sum(1 for b in cached_prefix if self.ref_counts[b] == 0)
        if needed > self.num_free_blocks - reusable_free:
            return False
        for block_id in cached_prefix:
            self._reference(block_id)
            request.block_hashes.append(self.block_hash[block_id])
        request.block_ids.extend(cached_prefix)
        request.block_ids.extend(self._take_free_block() for _ in range(max(needed, 0)))
        request.num_computed_tokens = num_computed
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register every block of the request that is now full and computed."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        for i in range(len(request.block_hashes), num_full):
            parent = request.block_hashes[-1] if request.block_hashes else None
            block_hash = hash_block(parent, request.token_ids[i * self.block_size:(i + 1) * self.block_size])
            request.block_hashes.append(block_hash)
            block_id = request.block_ids[i]
            if block_hash not in self.cached_blocks:  # an identical block may already be cached
                self.cached_blocks[block_hash] = block_id
                self.block_hash[block_id] = block_hash

    def trim(self, request: Request, num_tokens: int) -> None:
        """Release the request's blocks past its first `num_tokens` tokens (speculative tokens that
        were rejected). Those blocks hold no committed token, so none of them is in the prefix cache."""
        keep = self.blocks_needed(num_tokens)
        for block_id in request.block_ids[keep:]:
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None
                self.free_blocks.move_to_end(block_id, last=False)
        del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        """Release the request's blocks. Tail blocks become the first eviction candidates."""
        for block_id in reversed(request.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None
                if self.block_hash[block_id] is None:  # holds nothing reusable: hand it out first
                    self.free_blocks.move_to_end(block_id, last=False)
        request.block_ids = []
        request.block_hashes = []
        request.num_computed_tokens = 0

    def stats(self) -> KVCacheStats:
        return KVCacheStats(self.num_blocks, self.num_free_blocks, self.prefix_cache_queries, self.prefix_cache_hits)

    def _reference(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free_blocks[block_id]
        self.ref_counts[block_id] += 1

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        evicted = self.block_hash[block_id]
        if evicted is not None:
            if self.cached_blocks.get(evicted) == block_id:
                del self.cached_blocks[evicted]
            self.block_hash[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

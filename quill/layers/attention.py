"""Attention over a paged KV cache.

The runner hands every layer the same `AttentionMetadata`: where each new token's key/value goes
(`slot_mapping`), and how the step's queries split into two kinds:

- single-query rows (`SingleQueryRows`): a decoding sequence's one new token, or each query of a
  sequence verifying speculative drafts. All of them are attended in one batched call, their
  contexts padded to the longest and masked. A row's result must not depend on the rows beside it
  (greedy output must not change with server load), and PyTorch's fused attention kernel is not
  padding-invariant. Plain matmul / softmax / matmul is, provided every row's keys are gathered in
  whole KV blocks (measured: bit-identical for any extra padding in multiples of 16 keys, and
  `tests/test_attention.py` pins it). Verification rows thereby compute exactly what decoding
  those positions one at a time would. Rows of very different context lengths go in separate
  groups, so that short contexts are not padded to the longest (`group_by_width`). On the CPU, a
  C kernel (`quill/kernels/decode_attention.c`) does the same work in place through the block
  tables, row by row, where it can be built; the PyTorch path is the fallback and its reference.
  With the kernel, the runner sends prompt tokens this way too (`attends_rows_in_kernel`): a
  prompt's logits then do not depend on how it was chunked or how much of it the prefix cache
  held, and the kernel's tiles (consecutive positions of one sequence) prefill faster than
  PyTorch's fused kernel here.
- block-table rows (`BlockTableRows`): a pure decode step padded for CUDA graphs
  (`quill.engine.decode_graphs`), its block tables and context lengths as device tensors; attended
  exactly like single-query rows.
- prompt spans (`PromptSpan`): a prefill chunk, whose queries attend together, causally masked,
  through PyTorch's fused kernel (GPUs, and CPUs without a C compiler).

The cache may hold fewer bits than attention computes with (on the CPU: a float16 cache, float32
arithmetic). Attention then always sees keys and values as the cache holds them, also those of
this step's own tokens, so that a result does not depend on whether a key was read back from the
cache (chunked prefill, prefix caching, decoding) or came straight from this step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quill import kernels
from quill.layers.fixed_order import tree_sum
from quill.layers.module import InferenceModule

# Elements of the [rows, heads, keys, dim] products the PyTorch path builds at a time (64 MB).
FALLBACK_CHUNK_ELEMENTS = 1 << 24


@dataclass
class PromptSpan:
    start: int  # first row of the span among the step's tokens
    num_queries: int
    context_len: int  # tokens in the cache for this sequence once this step's are written
    # Cache slots of the whole context, or None when it is all in this step (nothing cached before).
    context_slots: torch.Tensor | None


def head_major_rows(slots: torch.Tensor, num_kv_heads: int, slots_per_head: int, head_dim: int) -> torch.Tensor:
    """Rows of a [kv_heads, slots, dim] cache viewed as [kv_heads * slots, dim] that hold `slots`
    for every kv head, flattened; the heads vary along `slots`' (size-1) dimension `head_dim`."""
    shape = [1] * slots.dim()
    shape[head_dim] = num_kv_heads
    heads = torch.arange(num_kv_heads, device=slots.device).view(shape) * slots_per_head
    return (heads + slots).flatten()


# What attending one more group of rows costs, in 16-key blocks of one row's context (measured per
# layer: ~30 us of extra gathers and matmuls, against ~1.3 us a row-block).
GROUP_COST_IN_ROW_BLOCKS = 24


def group_by_width(widths: list[int]) -> list[list[int]]:
    """Row indices in groups of similar context width (in blocks). Every row of a group is padded
    to the group's widest; a group is split in two, at its best point, wherever the padding that
    saves outweighs the cost of one more group. Groups list their rows by width."""
    order = sorted(range(len(widths)), key=widths.__getitem__)

    def split(rows: list[int]) -> list[list[int]]:
        widest = widths[rows[-1]]
        best_saving, best_at = GROUP_COST_IN_ROW_BLOCKS, None
        for at in range(1, len(rows)):
            saving = at * (widest - widths[rows[at - 1]])  # the narrower rows' padding
            if saving > best_saving:
                best_saving, best_at = saving, at
        return [rows] if best_at is None else split(rows[:best_at]) + split(rows[best_at:])

    groups = split(order)
    return [list(range(len(widths)))] if len(groups) == 1 else groups


@dataclass
class KeyGroup:
    """Single-query rows attended together: their keys gathered and padded to a common width."""

    rows: torch.Tensor | None  # indices among the single-query rows; None: all of them, in order
    cache_rows: torch.Tensor  # rows of the [kv_heads * slots, dim] cache view, [row, kv_head, key] order
    hidden: torch.Tensor  # [rows, keys]: keys a row must not attend (padding, beyond a window)


@dataclass
class SingleQueryRows:
    """Rows that each attend one query to a context of their own."""

    rows: torch.Tensor | None  # their indices among the step's tokens; None: all rows, in order
    context_lens: list[int]  # keys each row sees, itself included
    block_tables: list[list[int]]  # per row, the KV blocks of its context (at least)
    block_size: int
    device: torch.device
    _groups: dict = field(default_factory=dict, repr=False)
    _tables: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def kernel_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block tables [rows, blocks] int32, each cut to its context and zero-padded; context
        lengths [rows] int32), as the C kernel reads them. Computed once per step."""
        if self._tables is None:
            size = self.block_size
            tables = [table[:-(-n // size)] for table, n in zip(self.block_tables, self.context_lens)]
            width = max(map(len, tables))
            self._tables = (torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                            torch.tensor(self.context_lens, dtype=torch.int32))
        return self._tables

    def key_groups(self, window: int | None, num_kv_heads: int, slots_per_head: int) -> list[KeyGroup]:
        """The rows in groups of similar context width, each with the rows of a head-major cache
        viewed as [kv_heads * slots, dim] to gather, in [row, kv_head, key] order (so that one
        index_select yields the layout the matmuls want). Rows start at the first block they can
        see (a sliding window skips older ones) and are padded with their own last slot, which
        this step has written, so that every gathered value is finite. Computed once per step and
        window: every layer shares them."""
        key = (window, num_kv_heads, slots_per_head)
        if key not in self._groups:
            size = self.block_size
            first_blocks = [0 if window is None else max(0, n - window) // size for n in self.context_lens]
            tables = [table[first:-(-n // size)]
                      for table, first, n in zip(self.block_tables, first_blocks, self.context_lens)]
            groups = group_by_width([len(t) for t in tables])
            self._groups[key] = [self._group(rows, tables, first_blocks, window, num_kv_heads, slots_per_head)
                                 for rows in groups]
        return self._groups[key]

    def _group(self, rows: list[int], tables: list[list[int]], first_blocks: list[int], window: int | None,
               num_kv_heads: int, slots_per_head: int) -> KeyGroup:
        size = self.block_size
        tables = [tables[i] for i in rows]
        width = max(map(len, tables)) * size
        blocks = torch.tensor([t + t[-1:] * (width // size - len(t)) for t in tables])
        slots = (blocks[:, :, None] * size + torch.arange(size)).flatten(1)
        first_positions = torch.tensor([first_blocks[i] for i in rows])[:, None] * size
        positions = first_positions + torch.arange(width)
        context_lens = torch.tensor([self.context_lens[i] for i in rows])[:, None]
        visible = positions < context_lens
        if window is not None:
            visible &= positions >= context_lens - window
        last_slots = slots.gather(1, context_lens - 1 - first_positions)
        slots = torch.where(visible, slots, last_slots).to(self.device)
        in_order = rows == list(range(len(self.context_lens)))
        return KeyGroup(None if in_order else torch.tensor(rows, device=self.device),
                        head_major_rows(slots[:, None, :], num_kv_heads, slots_per_head, head_dim=-2),
                        (~visible).to(self.device))


@dataclass
class BlockTableRows:
    """Every row of a decode step, one query each, described by device tensors alone: block tables
    [rows, blocks] and context lengths [rows]. For one batch size and table width the shapes are
    fixed, so a CUDA graph can capture a step over them (`quill.engine.decode_graphs`); attention
    reads the same kernel tables and `KeyGroup` `SingleQueryRows` gives, built here by tensor
    operations instead of Python (one group, keys from the first block on: with a sliding window
    the fixed-order sums then pair keys differently from `SingleQueryRows`' path, so the bits may
    differ there, not the maths)."""

    block_tables: torch.Tensor  # [rows, blocks] int64; entries past a row's context: any valid block
    context_lens: torch.Tensor  # [rows] int64, keys each row sees (itself included), at least 1
    block_size: int
    rows: None = None  # every row of the step
    _groups: dict = field(default_factory=dict, repr=False)

    def kernel_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.block_tables.to(torch.int32), self.context_lens.to(torch.int32)

    def key_groups(self, window: int | None, num_kv_heads: int, slots_per_head: int) -> list[KeyGroup]:
        """As `SingleQueryRows.key_groups`; computed once per step and window (every layer shares them)."""
        key = (window, num_kv_heads, slots_per_head)
        if key not in self._groups:
            self._groups[key] = [self._group(window, num_kv_heads, slots_per_head)]
        return self._groups[key]

    def _group(self, window: int | None, num_kv_heads: int, slots_per_head: int) -> KeyGroup:
        size, device = self.block_size, self.block_tables.device
        width = self.block_tables.shape[1] * size
        slots = (self.block_tables[:, :, None] * size + torch.arange(size, device=device)).flatten(1)
        positions = torch.arange(width, device=device)[None, :]
        context_lens = self.context_lens[:, None]
        visible = positions < context_lens
        if window is not None:
            visible &= positions >= context_lens - window
        slots = torch.where(visible, slots, slots.gather(1, context_lens - 1))  # finite values only
        return KeyGroup(None, head_major_rows(slots[:, None, :], num_kv_heads, slots_per_head, head_dim=-2), ~visible)


def attention_dtype(cache_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What attention computes in over a cache of `cache_dtype`: float32 on the CPU, whatever the
    cache holds (PyTorch's CPU attention is 3-10x slower on half-size inputs, and the C kernel
    widens as it reads); the cache's dtype elsewhere."""
    return torch.float32 if device.type == "cpu" else cache_dtype


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    single_query: SingleQueryRows | BlockTableRows | None
    prompts: list[PromptSpan]


class PagedAttention(InferenceModule):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache = self.v_cache = torch.empty(0)
        self.dtype = torch.float32  # what queries, keys and values are computed in
        self._kernel = self._store_kernel = None

    def bind_cache(self, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate [kv_heads, num_slots, head_dim] key and value caches of `dtype`. Head-major:
        gathering a context as rows of the [kv_heads * num_slots, head_dim] view gives attention's
        layout with no further copy. Uninitialised on purpose: attention only reads slots already
        written (or masks them), and the untouched pages of a large budget then cost no resident
        memory. Attention computes in `attention_dtype`."""
        shape = (self.num_kv_heads, num_slots, self.head_dim)
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)
        self.dtype = attention_dtype(dtype, device)
        on_cpu = device.type == "cpu"
        self._kernel = _decode_kernel() if on_cpu and dtype in KERNEL_CACHE_TYPES else None
        self._store_kernel = _store_kernel() if on_cpu and dtype in KERNEL_CACHE_TYPES else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim], all in `self.dtype`.
        Returns [tokens, heads * dim]."""
        self._store(k, v, meta.slot_mapping)
        single = meta.single_query
        if single is not None and single.rows is None:  # a pure decode step
            return self._attend_single_queries(q, single)
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        if single is not None:
            out.index_copy_(0, single.rows, self._attend_single_queries(q[single.rows], single))
        if meta.prompts:  # as the cache holds them (see the module docstring)
            k, v = (t.to(self.k_cache.dtype).to(self.dtype) for t in (k, v))
        for span in meta.prompts:
            rows = slice(span.start, span.start + span.num_queries)
            out[rows] = self._attend_prompt(q[rows], k[rows], v[rows], span)
        return out

    @property
    def attends_rows_in_kernel(self) -> bool:
        return self._kernel is not None

    @property
    def runs_in_kernels(self) -> bool:
        """Whether both the cache writes and attention run through the C kernels."""
        return self._kernel is not None and self._store_kernel is not None

    def _store(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Write this step's keys and values into their cache slots, in the cache's dtype."""
        if (self._store_kernel is not None and k.dtype == v.dtype == torch.float32 and slots.dtype == torch.int64
                and k.stride()[1:] == v.stride()[1:] == (self.head_dim, 1) and slots.is_contiguous()):
            self._store_kernel(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr(), k.shape[0],
                               self.num_kv_heads, self.head_dim, self.k_cache.data_ptr(), self.v_cache.data_ptr(),
                               KERNEL_CACHE_TYPES[self.k_cache.dtype], self.k_cache.shape[1])
            return
        self.k_cache.index_copy_(1, slots, k.transpose(0, 1).to(self.k_cache.dtype))
        self.v_cache.index_copy_(1, slots, v.transpose(0, 1).to(self.v_cache.dtype))

    def _gather(self, rows: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `rows` of the caches viewed as [kv_heads * slots, dim], as `shape`,
        in `self.dtype`."""
        return tuple(cache.view(-1, self.head_dim).index_select(0, rows).view(shape).to(self.dtype)
                     for cache in (self.k_cache, self.v_cache))

    def _attend_single_queries(self, q: torch.Tensor, single: SingleQueryRows | BlockTableRows) -> torch.Tensor:
        if self._kernel is not None:
            return self._attend_in_kernel(q, single)
        groups = single.key_groups(self.sliding_window, self.num_kv_heads, self.k_cache.shape[1])
        if len(groups) == 1:
            return self._attend_group(q, groups[0])
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for group in groups:
            out.index_copy_(0, group.rows, self._attend_group(q.index_select(0, group.rows), group))
        return out

    def _attend_in_kernel(self, q: torch.Tensor, single: SingleQueryRows | BlockTableRows) -> torch.Tensor:
        if q.stride(2) != 1 or q.stride(1) != self.head_dim:
            q = q.contiguous()
        tables, context_lens = single.kernel_tables()
        rows = q.shape[0]
        out = q.new_empty(rows, self.num_heads * self.head_dim)
        status = self._kernel(q.data_ptr(), q.stride(0), self.k_cache.data_ptr(), self.v_cache.data_ptr(),
                              KERNEL_CACHE_TYPES[self.k_cache.dtype], out.data_ptr(), tables.data_ptr(),
                              tables.shape[1], context_lens.data_ptr(),
                              rows, self.num_heads, self.num_kv_heads, self.head_dim, self.k_cache.shape[1],
                              single.block_size, self.sliding_window or 0, self.scale)
        if status != 0:
            raise MemoryError("decode attention could not allocate its scratch memory")
        return out

    def _attend_group(self, q: torch.Tensor, group: KeyGroup) -> torch.Tensor:
        """The rows of one group, a chunk at a time. Every sum is a `tree_sum` and everything else
        elementwise, so a row's result depends neither on the rows beside it nor on the group's
        width (padding adds exact zeros); the exponentials run on widths padded to whole vectors,
        so no row's falls to a scalar tail loop that rounds differently."""
        rows, width = group.hidden.shape
        chunk = max(1, FALLBACK_CHUNK_ELEMENTS // (self.num_heads * width * self.head_dim))
        parts = [self._attend_rows(q[i:i + chunk], group.cache_rows.view(rows, -1)[i:i + chunk].flatten(),
                                   group.hidden[i:i + chunk]) for i in range(0, rows, chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _attend_rows(self, q: torch.Tensor, cache_rows: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        rows, width = hidden.shape
        keys, values = self._gather(cache_rows, (rows, self.num_kv_heads, 1, width, self.head_dim))
        queries = (q * self.scale).view(rows, self.num_kv_heads, -1, 1, self.head_dim)
        scores = tree_sum(queries * keys)  # [rows, kv_heads, heads per kv head, width]
        scores = F.pad(scores.masked_fill(hidden[:, None, None, :], float("-inf")), (0, -width % 16),
                       value=float("-inf"))
        weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
        weights = (weights / tree_sum(weights)[..., None])[..., :width]
        out = tree_sum(weights[..., None] * values, dim=-2)  # [rows, kv_heads, heads per kv head, dim]
        return out.reshape(rows, self.num_heads * self.head_dim)

    def _attend_prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: PromptSpan) -> torch.Tensor:
        """The span's queries (the last of its context) together, through the fused kernel, which
        takes 4-D inputs (3-D ones fall back to a path about 3x slower for long prompts)."""
        first_key = self._first_visible_key(span.num_queries, span.context_len)
        if span.context_slots is None:
            k, v = (t[first_key:].transpose(0, 1) for t in (k, v))
        else:
            slots = span.context_slots[first_key:]
            rows = head_major_rows(slots[None, :], self.num_kv_heads, self.k_cache.shape[1], head_dim=0)
            k, v = self._gather(rows, (self.num_kv_heads, len(slots), self.head_dim))
        # A whole prompt within the window is plainly causal: the kernel then needs no mask (same
        # results, measured bit-identical, and no [queries, keys] mask to build in every layer).
        plain_causal = span.context_slots is None and (self.sliding_window is None
                                                      or span.context_len <= self.sliding_window)
        mask = None if plain_causal else self._mask(span.num_queries, span.context_len, first_key, q.device)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                             is_causal=plain_causal, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(span.num_queries, self.num_heads * self.head_dim)

    def _first_visible_key(self, query_len: int, context_len: int) -> int:
        """Position of the oldest key any of these queries can see: a sliding-window layer never
        needs to look further back than its window."""
        if self.sliding_window is None:
            return 0
        return max(0, context_len - query_len - self.sliding_window + 1)

    def _mask(self, query_len: int, context_len: int, first_key: int, device: torch.device) -> torch.Tensor:
        """Boolean [query, key] mask (True = attend) over keys first_key..context_len-1: causal,
        plus the sliding window if any."""
        query_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
        key_pos = torch.arange(first_key, context_len, device=device)[None, :]
        mask = key_pos <= query_pos
        if self.sliding_window is not None:
            mask &= query_pos - key_pos < self.sliding_window
        return mask


# The cache dtypes the C kernel reads, and its code for each (`enum cache_type` in the C source).
KERNEL_CACHE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _store_kernel():
    """The C function that writes keys and values into the cache (see `quill.kernels`), or None."""
    pointer, i32, i64 = kernels.POINTER, kernels.INT32, kernels.INT64
    return kernels.function("store_kv", [pointer, i64, pointer, i64, pointer, i32, i32, i32, pointer, pointer, i32,
                                         i64])


def _decode_kernel():
    """The C decode-attention function (see `quill.kernels`), or None."""
    pointer, i32, i64 = kernels.POINTER, kernels.INT32, kernels.INT64
    return kernels.function("decode_attention", [pointer, i64, pointer, pointer, i32, pointer, pointer, i32,
                                                 pointer, i32, i32, i32, i32, i64, i32, i32, kernels.FLOAT],
                            restype=i32)

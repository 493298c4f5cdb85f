"""The model runner: the one place where scheduler decisions become tensors.

It owns the KV-cache tensors, flattens a scheduled batch into one forward pass (token ids,
positions, cache slots), and returns logits only for the requests whose last known token was
processed this step (a partial prefill chunk has nothing to sample yet). A request with scheduled
draft tokens gets them appended to its input and one logits row per position from its last token
on, for the verifier; its queries are attended one at a time so that every row is bit-identical
to what plain one-token decoding would compute.
"""
from __future__ import annotations

import torch
from torch import nn

from quill.config import ModelConfig
from quill.engine.request import Request
from quill.layers.attention import AttentionMetadata, PagedAttention
from quill.layers.linear import BATCH_INVARIANT_ROW_MULTIPLE, Linear
from quill.layers.quantized import DENSE_MIN_ROWS, QuantizedLinear


def kv_cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """On the CPU the cache (and so attention) stays float32 whatever the weights' dtype:
    PyTorch's CPU attention is 3-10x slower on bfloat16 keys for one-token decode."""
    return torch.float32 if device.type == "cpu" else dtype


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes per token for a cache of `dtype` (see `kv_cache_dtype`)."""
    element_size = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element_size


class ModelRunner:
    def __init__(self, model: nn.Module, config: ModelConfig, *, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, batch_invariant: bool) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        num_slots = num_blocks * block_size
        cache_dtype = kv_cache_dtype(dtype, device)
        for module in model.modules():
            if isinstance(module, PagedAttention):
                shape = (module.num_kv_heads, num_slots, module.head_dim)
                # Uninitialised on purpose: attention only ever reads slots already written, and
                # untouched pages of a large budget then cost no resident memory.
                module.k_cache = torch.empty(shape, dtype=cache_dtype, device=device)
                module.v_cache = torch.empty(shape, dtype=cache_dtype, device=device)
            if isinstance(module, (Linear, QuantizedLinear)):
                module.row_multiple = BATCH_INVARIANT_ROW_MULTIPLE if batch_invariant else 1
            if isinstance(module, QuantizedLinear):  # switching kernels by batch size breaks invariance
                module.dense_min_rows = None if batch_invariant else DENSE_MIN_ROWS
        self._block_offsets = torch.arange(block_size, device=device)
        if device.type == "cuda":
            # cuDNN's attention builds a graph per new shape, and every context length is a new
            # shape: 1.3 ms of CPU time per call on an H100. Flash/memory-efficient kernels need none.
            torch.backends.cuda.enable_cudnn_sdp(False)

    def _context_slots(self, request: Request, num_tokens: int) -> torch.Tensor:
        """Cache slots of the request's first `num_tokens` positions."""
        blocks = torch.tensor(request.block_ids[:-(-num_tokens // self.block_size)], device=self.device)
        return (blocks[:, None] * self.block_size + self._block_offsets).flatten()[:num_tokens]

    @torch.inference_mode()
    def execute(self, requests: list[Request], num_new_tokens: list[int]) -> tuple[list[Request], torch.Tensor]:
        """Run one forward pass. Returns the requests to sample for and their logits: one row each,
        or 1 + len(draft_token_ids) consecutive rows for a request verifying drafts."""
        token_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        cached_context_slots: list[torch.Tensor] = []
        context_lens: list[int] = []
        verifying: list[bool] = []
        sample_rows: list[int] = []
        to_sample: list[Request] = []
        row = 0
        for request, num_new in zip(requests, num_new_tokens):
            start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
            num_drafts = max(0, end - request.num_tokens)  # the scheduler schedules all drafts or none
            token_ids.extend(request.token_ids[start:end])
            if num_drafts:
                token_ids.extend(request.draft_token_ids)
            positions.append(torch.arange(start, end, device=self.device))
            slots = self._context_slots(request, end)
            slot_mapping.append(slots[start:end])
            if start > 0:  # part of the context is already cached: attention reads it all from there
                cached_context_slots.append(slots)
            context_lens.append(end)
            verifying.append(num_drafts > 0)
            row += num_new
            if end >= request.num_tokens:
                sample_rows.extend(range(row - 1 - num_drafts, row))
                to_sample.append(request)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_mapping), query_lens=list(num_new_tokens), context_lens=context_lens,
            cached_context_slots=torch.cat(cached_context_slots) if cached_context_slots
            else torch.empty(0, dtype=torch.long, device=self.device),
            one_query_at_a_time=verifying if any(verifying) else [],
        )
        input_ids = torch.tensor(token_ids, device=self.device)
        hidden = self.model(input_ids, torch.cat(positions), meta)
        if not to_sample:
            return [], hidden.new_empty((0, 0))
        # The sampler works on the CPU: per-request Python logic over a few rows of logits.
        return to_sample, self.model.compute_logits(hidden[sample_rows]).cpu()

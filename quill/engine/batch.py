"""One forward pass, as plain data: what the runner decided from the scheduled requests, before it
becomes tensors.

The runner plans a `StepBatch` from the requests and then runs it. Keeping the two apart lets
tensor parallelism (`quill.distributed`) send rank 0's plan to the other ranks, which hold no
requests and run the same batch on their shards of the model. Plain lists of ints, so that the
wire format needs no pickle.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class PromptPlan:
    """A prompt span attended through PyTorch's attention (see `quill.layers.attention.PromptSpan`)."""

    start: int  # first row among the step's tokens
    num_queries: int
    context_len: int
    context_slots: list[int] | None  # the whole context's cache slots, None when it is all in this step


@dataclass
class StepBatch:
    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)  # cache slot of each new token
    single_rows: list[int] = field(default_factory=list)  # rows that each attend one query alone
    single_context_lens: list[int] = field(default_factory=list)
    single_tables: list[list[int]] = field(default_factory=list)  # per single row, its KV blocks
    prompts: list[PromptPlan] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # rows whose logits come back
    # Rows whose logits score the next prompt token (`SamplingParams.prompt_logprobs`): that token,
    # and how many alternatives to report, per row.
    prompt_logprob_rows: list[int] = field(default_factory=list)
    prompt_logprob_targets: list[int] = field(default_factory=list)
    prompt_logprob_top: list[int] = field(default_factory=list)


class StepChannel(Protocol):
    """Where rank 0 of a tensor-parallel group sends the cache's shape once, then every step
    (implemented by `quill.distributed.channel`)."""

    def open(self, num_blocks: int, block_size: int, cache_dtype: torch.dtype, int8_activations: bool) -> None: ...

    def step(self, batch: StepBatch) -> AbstractContextManager[None]:
        """Send `batch` to the other ranks; rank 0 runs its share of the step inside the block. A
        block that raises leaves them inside the step's collectives, so later steps are refused."""
        ...

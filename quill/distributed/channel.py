"""Rank 0's messages to the other ranks of a tensor-parallel group, as broadcasts of int64
tensors: the KV cache's shape and the activations' format once (OPEN), then each step's batch (STEP), then STOP.

A step that fails on rank 0 after its batch went out (an error in rank 0's share of the forward
pass) leaves the other ranks waiting in one of the step's collectives, which rank 0 will never
join: the channel is then broken. It refuses further steps with the first error's name, and
`TensorParallel.close` ends the other ranks instead of sending them a STOP they cannot read (it
would be taken for the collective they wait in, and both sides would wait for ever).

Every message is a header [command, payload length] and, when the length is not zero, the
payload. A batch travels as lists of ints (`quill.engine.batch.StepBatch`), never pickled: each
list as its length and its values, a list of lists as its count, each length, then the values.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from quill.engine.batch import PromptPlan, StepBatch

OPEN, STEP, STOP = 1, 2, 3
CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def encode(batch: StepBatch) -> list[int]:
    out: list[int] = []
    for values in (batch.token_ids, batch.positions, batch.slot_mapping, batch.single_rows,
                   batch.single_context_lens, batch.sample_rows, batch.prompt_logprob_rows,
                   batch.prompt_logprob_targets, batch.prompt_logprob_top):
        _put(out, values)
    _put_nested(out, batch.single_tables)
    _put(out, [v for p in batch.prompts for v in (p.start, p.num_queries, p.context_len)])
    _put_nested(out, [p.context_slots or [] for p in batch.prompts])  # a context is never empty: [] is None
    return out


def decode(values: list[int]) -> StepBatch:
    reader = _Reader(values)
    token_ids, positions, slot_mapping, single_rows, context_lens, sample_rows = (reader.list() for _ in range(6))
    prompt_logprob_rows, targets, top = (reader.list() for _ in range(3))
    tables = reader.nested()
    spans, slots = reader.list(), reader.nested()
    prompts = [PromptPlan(spans[i], spans[i + 1], spans[i + 2], slots[i // 3] or None) for i in range(0, len(spans), 3)]
    return StepBatch(token_ids, positions, slot_mapping, single_rows, context_lens, tables, prompts, sample_rows,
                     prompt_logprob_rows, targets, top)


def _put(out: list[int], values: list[int]) -> None:
    out.append(len(values))
    out.extend(values)


def _put_nested(out: list[int], lists: list[list[int]]) -> None:
    out.append(len(lists))
    out.extend(len(values) for values in lists)
    for values in lists:
        out.extend(values)


class _Reader:
    def __init__(self, values: list[int]) -> None:
        self.values, self.at = values, 0

    def take(self, n: int) -> list[int]:
        self.at += n
        return self.values[self.at - n:self.at]

    def list(self) -> list[int]:
        return self.take(self.take(1)[0])

    def nested(self) -> list[list[int]]:
        lengths = self.take(self.take(1)[0])
        return [self.take(n) for n in lengths]


class StepChannel:
    """Rank 0's end (the engine's runner holds it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device  # NCCL broadcasts GPU tensors; gloo, CPU ones
        self.broken: str | None = None  # the error that left the other ranks mid-step

    def open(self, num_blocks: int, block_size: int, cache_dtype: torch.dtype, int8_activations: bool) -> None:
        self._send(OPEN, [num_blocks, block_size, CACHE_DTYPES.index(cache_dtype), int(int8_activations)])

    @contextlib.contextmanager
    def step(self, batch: StepBatch) -> Iterator[None]:
        if self.broken is not None:
            raise RuntimeError(f"the tensor-parallel group is out of step since a step failed on rank 0 "
                               f"({self.broken}); restart it")
        try:
            self._send(STEP, encode(batch))
            yield
        except BaseException as exc:
            self.broken = f"{type(exc).__name__}: {exc}"[:300]
            raise

    def stop(self) -> None:
        self._send(STOP, [])

    def _send(self, command: int, payload: list[int]) -> None:
        dist.broadcast(torch.tensor([command, len(payload)], device=self.device), src=0)
        if payload:
            dist.broadcast(torch.tensor(payload, dtype=torch.int64, device=self.device), src=0)


def receive(device: torch.device) -> tuple[int, list[int]]:
    """The other ranks' end: the next (command, payload) from rank 0."""
    header = torch.empty(2, dtype=torch.int64, device=device)
    dist.broadcast(header, src=0)
    command, length = header.tolist()
    if not length:
        return command, []
    payload = torch.empty(length, dtype=torch.int64, device=device)
    dist.broadcast(payload, src=0)
    return command, payload.tolist()

"""Decode steps padded to a few batch sizes, so that a GPU can replay each as a CUDA graph.

A decode step of a small model on a GPU is launch-bound: ~1,300 kernel launches from Python for
SmolLM2, a few microseconds each, against well under a millisecond of memory traffic
(`benchmarks/results/gpu_check_h200.json`: 55 tokens/s single-stream). A CUDA graph records the
launches of one step once and replays them with one call, but it replays fixed shapes and fixed
addresses. So a pure decode step (every request one new token) is padded up to a batch-size
bucket chosen at start-up (`batch_buckets`), its block tables up to a power-of-two width in
blocks (`width_bucket`), and run over `BlockTableRows` metadata, tensors only, which attention
reads without any Python per row. Padding rows decode token 0 at position 0 into a scratch block
that the KV-cache manager never hands out; their outputs are dropped.

Two runners share all of that and differ only in how the padded step runs:
- `PaddedDecodeRunner` runs it eagerly: the graphs' reference, used in tests and by
  `benchmarks/gpu_check.py` (graph against eager on the same inputs). On the CPU, padding rows
  change no real row's output (every matmul and attention row is row-invariant there;
  `tests/test_decode_graphs.py`).
- `CudaGraphDecodeRunner` captures one graph per (bucket, width) on first use and replays it.

Prefill, mixed and speculative steps, and batches above the largest bucket, run as before. What
runs is `EngineConfig.decode_graphs`: "auto" (graphs on CUDA, nothing on the CPU), "off"
(`--enforce-eager`) or "eager" (padded, never captured).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from quill.config import DECODE_GRAPH_MODES
from quill.layers.attention import AttentionMetadata, BlockTableRows

log = logging.getLogger("quill")


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes a decode step is padded to: 1, 2, 4, 8, then every multiple of 8 up to
    `max_num_seqs` (which is always one). Padding wastes at most 7 rows of a large batch, and a
    row costs little next to a step's fixed cost on a GPU."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def width_bucket(num_blocks: int, max_blocks: int) -> int:
    """Block-table width for a step whose longest context spans `num_blocks`: the next power of
    two, at most `max_blocks` (a sequence's whole window). Attention's work grows with the width,
    and powers of two keep the number of graphs logarithmic in the context length."""
    return min(1 << max(0, num_blocks - 1).bit_length(), max_blocks)


@dataclass
class DecodeBatch:
    """A padded decode step's inputs, on the device."""

    input_ids: torch.Tensor  # [bucket]
    positions: torch.Tensor  # [bucket]
    slot_mapping: torch.Tensor  # [bucket]
    block_tables: torch.Tensor  # [bucket, width]
    context_lens: torch.Tensor  # [bucket]

    def copy_(self, other: DecodeBatch) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).copy_(getattr(other, name), non_blocking=True)

    def clone(self) -> DecodeBatch:
        return DecodeBatch(*(getattr(self, name).clone() for name in self.__dataclass_fields__))


class PaddedDecodeRunner:
    """Runs pure decode steps padded to `batch_buckets`, eagerly (see the module docstring)."""

    def __init__(self, model: nn.Module, *, max_num_seqs: int, max_blocks: int, block_size: int, pad_block: int,
                 device: torch.device) -> None:
        self.model = model
        self.buckets = batch_buckets(max_num_seqs)
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.pad_block = pad_block  # scratch block for padding rows: never allocated to a request
        self.device = device

    def takes(self, num_new_tokens: list[int]) -> bool:
        """Whether a step is a pure decode step this runner can pad."""
        return len(num_new_tokens) <= self.buckets[-1] and all(n == 1 for n in num_new_tokens)

    def bucket_for(self, num_rows: int) -> int:
        return next(b for b in self.buckets if b >= num_rows)

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
            context_lens: list[int]) -> torch.Tensor:
        """Hidden states [len(token_ids), hidden] of one decode step (one row per sequence)."""
        batch = self.padded(token_ids, positions, slots, block_tables, context_lens)
        return self._forward(batch)[:len(token_ids)]

    def padded(self, token_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]],
               context_lens: list[int]) -> DecodeBatch:
        rows = len(token_ids)
        pad = self.bucket_for(rows) - rows
        width = width_bucket(max(-(-n // self.block_size) for n in context_lens), self.max_blocks)
        tables = [table[:width] + [self.pad_block] * (width - len(table[:width])) for table in block_tables]
        tables += [[self.pad_block] * width] * pad

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        return DecodeBatch(tensor(token_ids + [0] * pad), tensor(positions + [0] * pad),
                           tensor(slots + [self.pad_block * self.block_size] * pad), tensor(tables),
                           tensor(context_lens + [1] * pad))

    def _forward(self, batch: DecodeBatch) -> torch.Tensor:
        rows = BlockTableRows(batch.block_tables, batch.context_lens, self.block_size)
        return self.model(batch.input_ids, batch.positions, AttentionMetadata(batch.slot_mapping, rows, []))


class CudaGraphDecodeRunner(PaddedDecodeRunner):
    """Replays each padded decode step as a CUDA graph, captured on first use of its shape."""

    def __init__(self, model: nn.Module, **options) -> None:
        super().__init__(model, **options)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, DecodeBatch, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()  # every graph's activations share one pool

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _forward(self, batch: DecodeBatch) -> torch.Tensor:
        shape = tuple(batch.block_tables.shape)
        if shape not in self._graphs:
            self._graphs[shape] = self._capture(batch)
        graph, static, output = self._graphs[shape]
        static.copy_(batch)
        graph.replay()
        return output

    def _capture(self, batch: DecodeBatch) -> tuple[torch.cuda.CUDAGraph, DecodeBatch, torch.Tensor]:
        # Static inputs start as pure padding: capture writes only the scratch block.
        rows, width = batch.block_tables.shape
        static = DecodeBatch(torch.zeros_like(batch.input_ids), torch.zeros_like(batch.positions),
                             torch.full_like(batch.slot_mapping, self.pad_block * self.block_size),
                             torch.full_like(batch.block_tables, self.pad_block), torch.ones_like(batch.context_lens))
        # Warm up on a copy: layers cache per-step values by the identity of their input tensors
        # (RotaryEmbedding's cos/sin), and the capture must compute them inside the graph.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            super()._forward(static.clone())
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = super()._forward(static)
        log.info("captured a CUDA graph for decode steps of %d rows, %d blocks per row", rows, width)
        return graph, static, output


def build_decode_runner(mode: str, model: nn.Module, *, has_experts: bool, **options) -> PaddedDecodeRunner | None:
    """The runner `mode` asks for on `options["device"]`, or None for the plain path."""
    if mode not in DECODE_GRAPH_MODES:
        raise ValueError(f"decode_graphs must be one of {', '.join(DECODE_GRAPH_MODES)}, got {mode!r}")
    device = options["device"]
    if mode == "eager":
        return PaddedDecodeRunner(model, **options)
    if mode == "off" or device.type != "cuda":
        return None
    if has_experts:  # routing sizes each expert's batch on the host: not capturable
        log.info("CUDA graphs are off: mixture-of-experts layers route on the host")
        return None
    return CudaGraphDecodeRunner(model, **options)

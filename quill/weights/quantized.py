"""The quantized-weight format every checkpoint reader produces and every quantized layer runs.

Unsigned integer codes with a scale and an offset per group of consecutive input columns. GGUF's
Q4_0/Q4_1/Q4_K blocks and `quill quantize`'s int4/int8 map onto it exactly (see `gguf_quant.py`);
`quill.layers.quantized.quantized_linear` picks the kernel. Plain data on torch tensors, so that
readers, writers and layers can all import it without importing one another.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
import torch

from quill.errors import ModelLoadError


@dataclass
class QuantizedWeight:
    """w[n, k] = scales[n, k // group_size] * codes[n, k] + offsets[n, k // group_size]."""

    codes: torch.Tensor  # uint8 [out, in], each < 2**bits
    scales: torch.Tensor  # float32 [out, in // group_size]
    offsets: torch.Tensor  # float32 [out, in // group_size]
    bits: int
    group_size: int
    source: str  # the format it came from ("Q4_1", "int8", ...), for load logs

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.codes.shape
        groups = self.codes.view(out, inp // self.group_size, self.group_size).float()
        values = groups * self.scales[..., None] + self.offsets[..., None]
        return values.view(out, inp).to(dtype)

    def select_rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The weight with its output rows reordered (groups run along the input, so rows move whole)."""
        return QuantizedWeight(self.codes[index], self.scales[index], self.offsets[index],
                               self.bits, self.group_size, self.source)

    @staticmethod
    def concat(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
        """Stack along the output dimension (fused q/k/v or gate/up), as codes of the widest part's
        bits; None when the parts' groups differ and so cannot share one kernel."""
        first = parts[0]
        if any(p.group_size != first.group_size for p in parts):
            return None
        sources = sorted({p.source for p in parts})
        return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                               torch.cat([p.offsets for p in parts]), max(p.bits for p in parts), first.group_size,
                               "+".join(sources))


def read_into(f: BinaryIO, offset: int, out: np.ndarray, what: str) -> None:
    """Fill `out` with the bytes of `f` from `offset`; a ModelLoadError naming `what` if the file
    ends first."""
    f.seek(offset)
    if f.readinto(out) != out.nbytes:
        raise ModelLoadError(f"{what} is cut short; the file is truncated")


class DeferredWeight:
    """A quantized weight read from its file but not yet unpacked: `load()` makes the
    `QuantizedWeight`. Unpacked, a weight holds a byte per code and float32 scales and offsets,
    twice a 4-bit file's bytes, so a loader that unpacked every layer before installing the first
    held the model twice over; deferred, a load holds the file's own bytes and one layer unpacked
    at a time (`quill.models.loader`). Row selections (a family's reordering) and fusions
    (`concat`) are deferred with it."""

    def __init__(self, shape: tuple[int, int], make: Callable[[], QuantizedWeight]) -> None:
        self.shape = torch.Size(shape)
        self._make = make

    def load(self) -> QuantizedWeight:
        return self._make()

    def select_rows(self, index: torch.Tensor) -> DeferredWeight:
        return DeferredWeight(self.shape, lambda: self.load().select_rows(index))

    @staticmethod
    def concat(parts: list, combine: Callable[[list], Any]) -> DeferredWeight:
        """`combine` (a fusion of shards along the output dimension) of `parts`, some of them
        deferred, when loaded."""
        rows = sum(p.shape[0] for p in parts)
        return DeferredWeight((rows, parts[0].shape[1]),
                              lambda: combine([p.load() if isinstance(p, DeferredWeight) else p for p in parts]))


class GGMLRows:
    """A matrix kept in the GGML blocks its file stores, each row expanded to `dtype` when read.

    For a token embedding table: a step reads a few of its rows (the tokens looked up, and the LM
    head's candidates recomputed exactly, see `layers/logits.py`), so it needs no float copy.
    Gemma 3's 262,144 x 640 table is 320 MiB in bf16 and 170 MiB as the file's Q8_0 blocks. A row
    expands exactly as the whole table would (gguf-py's dequantizer, then one rounding to `dtype`),
    so outputs do not change. Indexes like a tensor's first dimension: `rows[ids]`, `rows[a:b]`."""

    def __init__(self, blocks: torch.Tensor, qtype: int, columns: int, dtype: torch.dtype) -> None:
        self.blocks = blocks  # uint8 [rows, bytes per row]
        self.qtype, self.dtype = qtype, dtype
        self.shape = torch.Size((blocks.shape[0], columns))
        self.device = blocks.device

    def __getitem__(self, index: torch.Tensor | slice | int) -> torch.Tensor:
        blocks = self.blocks[index]
        values = gguf.quants.dequantize(blocks.reshape(-1, self.blocks.shape[1]).numpy(), self.qtype)
        return torch.from_numpy(values).to(self.dtype).reshape(*blocks.shape[:-1], self.shape[1])

    @property
    def row_bytes(self) -> int:
        return self.blocks.shape[1]

    def read_blocks(self, start: int, stop: int) -> torch.Tensor:
        """The blocks of rows start..stop, uint8 [rows, row_bytes]."""
        return self.blocks[start:stop]


class GGMLFileRows:
    """A `GGMLRows` table still in its file: `read_blocks` reads a run of its rows, `load` all of
    them. A table the loader repacks anyway (a Q8_0 one its LM head is tied to,
    `quill.layers.embedding.Q8Table`) is then read a chunk at a time and never held whole beside
    its packed copy: for Gemma 3, 178 MB less at the load's peak."""

    def __init__(self, path: Path, offset: int, rows: int, row_bytes: int, qtype: int, columns: int,
                 dtype: torch.dtype) -> None:
        self.path, self.offset, self.row_bytes = path, offset, row_bytes
        self.qtype, self.dtype = qtype, dtype
        self.shape = torch.Size((rows, columns))
        self.device = torch.device("cpu")

    def read_blocks(self, start: int, stop: int) -> torch.Tensor:
        stop = min(stop, self.shape[0])
        blocks = np.empty((max(stop - start, 0), self.row_bytes), dtype=np.uint8)
        with open(self.path, "rb") as f:
            read_into(f, self.offset + start * self.row_bytes, blocks, f"{self.path.name}: its token embedding table")
        return torch.from_numpy(blocks)

    def load(self) -> GGMLRows:
        return GGMLRows(self.read_blocks(0, self.shape[0]), self.qtype, self.shape[1], self.dtype)

"""The quantized-weight format every checkpoint reader produces and every quantized layer runs.

Unsigned integer codes with a scale and an offset per group of consecutive input columns. GGUF's
Q4_0/Q4_1/Q4_K blocks and `quill quantize`'s int4/int8 map onto it exactly (see `gguf_quant.py`);
`quill.layers.quantized.quantized_linear` picks the kernel. Plain data on torch tensors, so that
readers, writers and layers can all import it without importing one another.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch


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

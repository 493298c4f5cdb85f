"""The quantized-weight format every checkpoint reader produces and every quantized layer runs.

Unsigned integer codes with a scale and an offset per group of consecutive input columns. GGUF's
Q4_0/Q4_1/Q4_K blocks and `quill quantize`'s int4/int8 map onto it exactly (see `gguf_quant.py`);
`quill.layers.quantized.quantized_linear` picks the kernel. Plain data on torch tensors, so that
readers, writers and layers can all import it without importing one another.
"""
from __future__ import annotations

from dataclasses import dataclass

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

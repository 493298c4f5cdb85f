"""A token embedding read from a table that expands its rows when read (`GGMLRows`), so that a
quantized model's vocabulary is held once, in its file's blocks, instead of as a float copy."""
from __future__ import annotations

import torch
from torch import nn

from quill.weights.quantized import GGMLRows


class RowsEmbedding(nn.Module):
    def __init__(self, weight: GGMLRows) -> None:
        super().__init__()
        self.weight = weight  # `weight` as nn.Embedding names it: callers ask it for dtype and device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[input_ids]

"""Token embeddings: `token_embedding`, the table the checkpoint fills, and `RowsEmbedding`, read
from a table that expands its rows when read (`GGMLRows`), so that a quantized model's vocabulary
is held once, in its file's blocks, instead of as a float copy."""
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


def token_embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """An `nn.Embedding` left uninitialised: the checkpoint fills it. Its own initialisation, run on
    the meta device the models are built on, goes through PyTorch's reference ops, which import
    torch._dynamo and sympy: 80 MB of resident memory for the process's whole life (measured on
    SmolLM2's load, AMD EPYC)."""
    return nn.Embedding(vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size))

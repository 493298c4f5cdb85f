"""Mixture-of-experts feed-forward block: a router picks `top_k` experts per token, and the token's
output is their outputs weighted by the router's softmax probabilities (renormalised over the
chosen ones when `normalize_top_k`).

Experts run batched per expert: the tokens routed to one expert are gathered and go through it in
one matmul per projection, so a step costs one pass over each expert it touches (a decode step of
one sequence touches `top_k` of them) and never a loop over tokens. Each expert is a `GatedMLP` of
plain or quantized linear layers, loaded like any dense MLP.

Each token's result is independent of the batch around it: routing is per row, the expert matmuls
are row-invariant however many rows an expert gets (see `matmul.py`), and a token's expert outputs
are summed in expert order whatever else was routed where.
"""
from __future__ import annotations

import torch
from torch import nn

from quill.layers.linear import Linear
from quill.layers.mlp import GatedMLP
from quill.layers.module import InferenceModule


class SparseMoE(InferenceModule):
    def __init__(self, hidden_size: int, expert_intermediate_size: int, num_experts: int, top_k: int,
                 normalize_top_k: bool, activation: str) -> None:
        super().__init__()
        self.top_k, self.normalize_top_k = top_k, normalize_top_k
        self.gate = Linear(hidden_size, num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(GatedMLP(hidden_size, expert_intermediate_size, activation)
                                     for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype).flatten()
        # (token, slot) pairs grouped by expert, each group in token order.
        order = chosen.flatten().argsort(stable=True)
        counts = chosen.flatten().bincount(minlength=len(self.experts)).tolist()
        tokens = order // self.top_k
        out = torch.zeros_like(x)
        end = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            pairs, rows = order[end:end + count], tokens[end:end + count]
            end += count
            out.index_add_(0, rows, self.experts[expert](x[rows]) * weights[pairs, None])
        return out

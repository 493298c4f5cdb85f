"""Linear layers with an optional batch-invariant mode.

CPU GEMM libraries pick different kernels (and so different reduction orders) by the number of
rows: a row multiplied alone (GEMV) and the same row inside a batch can differ in the last bits,
enough to flip a greedy token. Measured on this machine (PyTorch 2.13, fp32): results for row r
are bit-identical for every row count that is a multiple of 4, and differ otherwise. Padding the
rows up to `row_multiple` therefore makes each row's result independent of the batch around it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quill.layers.module import InferenceModule

BATCH_INVARIANT_ROW_MULTIPLE = 4


class Linear(InferenceModule, nn.Linear):
    row_multiple: int = 1  # set to BATCH_INVARIANT_ROW_MULTIPLE by the runner when invariance is on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        pad = -rows % self.row_multiple
        if not pad:
            return F.linear(x, self.weight, self.bias)
        return F.linear(F.pad(x, (0, 0, 0, pad)), self.weight, self.bias)[:rows]

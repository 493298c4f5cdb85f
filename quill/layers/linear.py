"""Dense linear layers whose rows do not depend on the batch (see `quill.layers.matmul`).

A layer multiplies through `F.linear` until `prepare_linears_for_cpu` gives it a row-invariant
product: the packed kernel where it can be built, otherwise PyTorch's matmul in fixed row blocks.
On a GPU it stays with `F.linear`.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from quill.layers.matmul import PackedMatmul, RowBlockedMatmul, kernel_available
from quill.layers.module import InferenceModule
from quill.layers.quantized import Int4Linear

log = logging.getLogger("quill")


class Linear(InferenceModule, nn.Linear):
    matmul = None  # set by `prepare_for_cpu`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul is None:
            return F.linear(x, self.weight, self.bias)
        return self.matmul(x)

    def prepare_for_cpu(self, *, keep_weight: bool) -> str:
        """Multiply row-invariantly from now on; returns which path it took. Without `keep_weight`
        (nothing else reads the float weight) the packed copy replaces it, and `weight` is None."""
        if kernel_available() and self.in_features % 2 == 0:
            self.matmul = PackedMatmul.dense(self.weight, self.bias)
            if not keep_weight:
                self.weight = None
            return f"{self.matmul.format} kernel"
        weight, bias = self.weight.float(), None if self.bias is None else self.bias.float()
        self.matmul = RowBlockedMatmul(lambda x: F.linear(x, weight, bias), self.in_features,
                                       ("linear", self.out_features, bias is not None))
        return f"PyTorch in blocks of {'/'.join(map(str, self.matmul.blocks))} rows"


def prepare_linears_for_cpu(model: nn.Module, *, int8_activations: bool = False) -> int:
    """Give every dense `Linear` of a CPU model its row-invariant product (once; later calls do
    nothing). Float weights stay where something else reads them: a tied embedding, and the LM
    head's exact recomputation of its top logits (`quill.layers.logits`). With `int8_activations`,
    4-bit layers multiply 8-bit activations from now on (`Int4Linear.use_int8_activations`);
    returns how many do. The load log says which path the layers took."""
    readers = Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))
    paths = Counter()
    switched = 0
    for name, module in model.named_modules():
        if int8_activations and isinstance(module, Int4Linear):
            module.use_int8_activations()
            switched += getattr(module.matmul, "format", None) == "int4_q8"
        if isinstance(module, Linear) and module.matmul is None:
            keep = readers[id(module.weight)] > 1 or name.split(".")[0] == "lm_head"  # or a parallel head's slice
            paths[f"{tuple(module.weight.shape)} {module.weight.dtype}".replace("torch.", "") + " -> "
                  + module.prepare_for_cpu(keep_weight=keep)] += 1
    if paths:
        log.info("dense layers: %s", "; ".join(f"{n} x {path}" for path, n in sorted(paths.items())))
    if switched:
        log.info("4-bit layers: %d multiply 8-bit activations", switched)
    return switched

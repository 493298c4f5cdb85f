"""A rank's share of a model: the checkpoint's slices (`shard.py`) built by the family's own
module at the local sizes, then the layers that end in a collective swapped in (`layers.py`)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from quill.distributed.layers import ParallelLMHead, RowParallel, VocabParallelEmbedding, all_reduce
from quill.distributed.shard import ShardPlan
from quill.layers.mlp import GatedMLP
from quill.layers.quantized import Int8Linear
from quill.layers.self_attention import SelfAttention
from quill.models.loader import build_model, load_checkpoint
from quill.weights.checkpoint import Checkpoint


def read_for_sharding(path, dtype: torch.dtype, device: torch.device, dequantize: bool) -> Checkpoint:
    """The whole checkpoint, quantized weights kept as `load_model` keeps them (natively on a CPU)."""
    return load_checkpoint(path, dtype, keep_quantized=not dequantize and device.type == "cpu")


def build_shard(checkpoint: Checkpoint, plan: ShardPlan, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """This rank's share, on `device`. Every rank of the group must call it (it agrees on the LM
    head's error bound)."""
    plan.check(checkpoint.tensors)
    model = build_model(plan.local_config(), plan.shard(checkpoint.tensors), dtype)
    for module in list(model.modules()):
        if isinstance(module, SelfAttention):
            module.o_proj = RowParallel(module.o_proj)
        elif isinstance(module, GatedMLP):
            module.down_proj = RowParallel(module.down_proj)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, plan.vocab_range()[0])
    head = model.lm_head
    if isinstance(head, Int8Linear):  # the bound on its error is the widest slice's, as for the whole head
        head.max_step = all_reduce(torch.tensor([head.max_step]), dist.ReduceOp.MAX).item()
    model.lm_head = ParallelLMHead(head, [end - start for start, end in map(plan.vocab_range, range(plan.size))])
    return model.to(device)

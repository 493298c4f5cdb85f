"""Which part of each checkpoint tensor a rank of a tensor-parallel group holds (Megatron's layout).

Column-parallel (output rows split): q/k/v by attention heads and KV heads, so that a rank's
queries only need its own keys and values (and its KV cache holds only its KV heads); gate/up by
MLP width; the LM head and the embedding table by vocabulary. Row-parallel (input columns split):
o and down, whose partial products the ranks then sum (`quill.distributed.layers`). Norms and
everything else are whole on every rank.

A rank's share of a model is a smaller model of the same family: the config's head counts, MLP
width and vocabulary divided by the group size, so that the family's own module and the loader
build it unchanged. Quantized weights split the same way: whole rows, or whole groups of input
columns (a per-row int8 scale stays with its row, its group narrowing with the split).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from quill.config import ModelConfig
from quill.errors import UnsupportedModelError
from quill.weights.quantized import GGMLRows, QuantizedWeight

Weight = torch.Tensor | QuantizedWeight | GGMLRows

_HEADS = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv"}
_MLP_COLUMNS = ("gate_proj", "up_proj")
_ROW_PARALLEL = ("o_proj", "down_proj")
_VOCAB = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig  # the whole model's
    rank: int
    size: int

    def vocab_range(self, rank: int | None = None) -> tuple[int, int]:
        """The token ids rank `rank` (default: this one) holds: the first vocab % size ranks one more."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(self.config.vocab_size, self.size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)

    def local_config(self) -> ModelConfig:
        """The config of this rank's share: the family builds it as a model of its own."""
        c, n = self.config, self.size
        start, end = self.vocab_range()
        return dataclasses.replace(c, num_heads=c.num_heads // n, num_kv_heads=c.num_kv_heads // n,
                                   intermediate_size=c.intermediate_size // n, vocab_size=end - start)

    def check(self, tensors: dict[str, Weight]) -> None:
        """Refuse, before anything starts, a model that does not split `size` ways."""
        c, n = self.config, self.size
        if c.num_experts:
            raise UnsupportedModelError("tensor parallelism does not split mixture-of-experts layers yet")
        if c.output_token_ids:  # the head's rows are not the vocabulary's, which the split assumes
            raise UnsupportedModelError("tensor parallelism does not split a trimmed output vocabulary "
                                        "(quill prune --trim-vocab) yet")
        for what, count in (("attention heads", c.num_heads), ("KV heads", c.num_kv_heads),
                            ("MLP width (intermediate_size)", c.intermediate_size)):
            if count % n:
                raise UnsupportedModelError(f"--tensor-parallel-size {n} does not divide the model's {count} {what}; "
                                            f"use a size that does")
        if c.vocab_size < n:
            raise UnsupportedModelError(f"a vocabulary of {c.vocab_size} cannot be split {n} ways")
        for name, weight in tensors.items():
            if isinstance(weight, QuantizedWeight) and _module(name) in _ROW_PARALLEL:
                columns = weight.shape[1] // n
                if weight.group_size != weight.shape[1] and columns % weight.group_size:
                    raise UnsupportedModelError(
                        f"--tensor-parallel-size {n} splits {name}'s {weight.shape[1]} input columns into {columns}, "
                        f"not a multiple of its {weight.source} group size {weight.group_size}; use a size that "
                        "keeps whole groups, or --dequantize")

    def shard(self, tensors: dict[str, Weight]) -> dict[str, Weight]:
        """This rank's part of every checkpoint tensor (Hugging Face names)."""
        return {name: self._part(name, weight) for name, weight in tensors.items()}

    def _part(self, name: str, weight: Weight) -> Weight:
        module = _module(name)
        c, rank = self.config, self.rank
        if module in _HEADS:
            return _rows(weight, [self._head_rows(_HEADS[module])])
        if module == "qkv_proj":  # stored fused (Phi-3): q, k and v rows one after another
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            (qa, qb), (ka, kb) = self._head_rows("q"), self._head_rows("kv")
            return _rows(weight, [(qa, qb), (q + ka, q + kb), (q + kv + ka, q + kv + kb)])
        if module in _MLP_COLUMNS:
            return _rows(weight, [self._mlp_range()])
        if module == "gate_up_proj":  # stored fused (Phi-3)
            (a, b), width = self._mlp_range(), c.intermediate_size
            return _rows(weight, [(a, b), (width + a, width + b)])
        if module in _VOCAB:
            return _rows(weight, [self.vocab_range()])
        if module in _ROW_PARALLEL and name.endswith(".weight"):
            if module == "o_proj":
                return _columns(weight, *self._head_rows("q"))
            return _columns(weight, *self._mlp_range())
        if module in _ROW_PARALLEL:  # a bias: added once, by rank 0, to the summed products
            return weight if rank == 0 else torch.zeros_like(weight)
        return weight

    def _head_rows(self, kind: str) -> tuple[int, int]:
        c = self.config
        per_rank = (c.num_heads if kind == "q" else c.num_kv_heads) // self.size * c.head_dim
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def _mlp_range(self) -> tuple[int, int]:
        width = self.config.intermediate_size // self.size
        return self.rank * width, (self.rank + 1) * width


def _module(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


def _rows(weight: Weight, ranges: list[tuple[int, int]]) -> Weight:
    """Output rows `ranges` (concatenated), copied: a view would keep the whole tensor alive."""
    index = torch.cat([torch.arange(a, b) for a, b in ranges])
    if isinstance(weight, QuantizedWeight):
        return weight.select_rows(index)
    if isinstance(weight, GGMLRows):  # an embedding table in its file's blocks: one row of blocks per token
        return GGMLRows(weight.blocks.index_select(0, index), weight.qtype, weight.shape[1], weight.dtype)
    return weight.index_select(0, index)


def _columns(weight: Weight, start: int, end: int) -> Weight:
    """Input columns start:end. A quantized weight keeps whole groups (`ShardPlan.check`); a
    per-row scale (one group as wide as the row) stays and its group narrows to the split."""
    if not isinstance(weight, QuantizedWeight):
        return weight[:, start:end].contiguous()
    group = weight.group_size
    codes = weight.codes[:, start:end].contiguous()
    if group == weight.shape[1]:
        return QuantizedWeight(codes, weight.scales, weight.offsets, weight.bits, end - start, weight.source)
    groups = slice(start // group, end // group)
    return QuantizedWeight(codes, weight.scales[:, groups].contiguous(), weight.offsets[:, groups].contiguous(),
                           weight.bits, group, weight.source)

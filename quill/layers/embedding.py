"""Token embeddings: `token_embedding`, the table the checkpoint fills, and `RowsEmbedding`, read
from a table that expands its rows when read, so that a quantized model's vocabulary is held once,
in its file's blocks, instead of as a float copy: `GGMLRows` (any GGML format, as the file stores
it) or `Q8Table` (Q8_0 blocks repacked for the matmul kernel, which the LM head tied to the table
multiplies by, so that the head needs no copy of its own either)."""
from __future__ import annotations

import gguf
import torch
from torch import nn

from quill.layers.matmul import LANES, PackedMatmul
from quill.weights.quantized import GGMLRows

Q8_0_BLOCK = 32  # values per GGML Q8_0 block: a float16 scale, then 32 signed bytes
_Q8_0_BLOCK_BYTES = 2 + Q8_0_BLOCK


class RowsEmbedding(nn.Module):
    def __init__(self, weight: GGMLRows | Q8Table) -> None:
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


class Q8Table:
    """A Q8_0 embedding table in the matmul kernel's "q8_0" panels (`matmul`), whose rows expand
    exactly as `GGMLRows` expands the file's blocks: code * scale in float32, one rounding to `dtype`.

    A tied LM head multiplies by the same packed copy (`layers/logits.TableHead`), where it used to
    hold an int8 copy of its own beside the table's blocks: 28 MB more for SmolLM2, 168 MB for Gemma 3.
    Indexes like a tensor's first dimension: `table[ids]`, `table[a:b]`."""

    def __init__(self, rows: GGMLRows) -> None:
        if not self.takes(rows):
            raise ValueError("a Q8Table is made of Q8_0 blocks with a whole number of them per row")
        n, k = rows.shape
        blocks = rows.blocks.view(n, k // Q8_0_BLOCK, _Q8_0_BLOCK_BYTES)
        scales = blocks[..., :2].contiguous().view(torch.float16).view(n, -1)
        self.matmul = PackedMatmul.q8_0(_Q8Codes(blocks), scales)
        self.shape, self.dtype, self.device = rows.shape, rows.dtype, rows.device
        # Each weight is at most 127 scales in size: a bound on every row's length, for the head's error.
        self.max_row_norm = float(127 * (Q8_0_BLOCK * scales.float().square().sum(dim=1).amax()) ** 0.5)

    @staticmethod
    def takes(rows: GGMLRows) -> bool:
        return rows.qtype == gguf.GGMLQuantizationType.Q8_0 and rows.shape[1] % Q8_0_BLOCK == 0 \
            and rows.blocks.shape[1] == rows.shape[1] // Q8_0_BLOCK * _Q8_0_BLOCK_BYTES

    def __getitem__(self, index: torch.Tensor | slice | int) -> torch.Tensor:
        ids = index if isinstance(index, torch.Tensor) else torch.arange(self.shape[0])[index]
        flat = ids.reshape(-1)
        panel, lane = flat // LANES, flat % LANES
        codes = self.matmul.packed[panel, :, lane]  # [ids, k / 2, 2]
        scales = self.matmul.scales[panel, :, lane]  # [ids, k / 32]
        values = codes.float().view(len(flat), scales.shape[-1], Q8_0_BLOCK) * scales.float()[..., None]
        return values.view(*ids.shape, self.shape[1]).to(self.dtype)


class _Q8Codes:
    """The codes of Q8_0 blocks [rows, blocks, 34] as int8 [rows, columns], a slice of rows at a
    time (what `pack_pairs` reads), so that they are never copied whole."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks
        self.shape = (blocks.shape[0], blocks.shape[1] * Q8_0_BLOCK)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.blocks[rows, :, 2:].reshape(-1, self.shape[1]).view(torch.int8)

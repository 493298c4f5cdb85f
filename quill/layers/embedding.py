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
from quill.weights.quantized import GGMLFileRows, GGMLRows

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
    hold an int8 copy of its own beside the table's blocks: 28 MB more for SmolLM2, 168 MB for
    Gemma 3. The blocks are read and packed a chunk of rows at a time, from memory or from the file
    (`GGMLFileRows`). Indexes like a tensor's first dimension: `table[ids]`, `table[a:b]`."""

    def __init__(self, rows: GGMLRows | GGMLFileRows) -> None:
        if not self.takes(rows):
            raise ValueError("a Q8Table is made of Q8_0 blocks with a whole number of them per row")
        codes = _Q8Codes(rows)
        self.matmul = PackedMatmul.q8_0(codes, lambda: codes.scales)
        self.shape, self.dtype, self.device = rows.shape, rows.dtype, rows.device
        # Each weight is at most 127 scales in size: a bound on every row's length, for the head's error.
        self.max_row_norm = 127 * (Q8_0_BLOCK * codes.max_square_scales) ** 0.5

    @staticmethod
    def takes(rows: GGMLRows | GGMLFileRows) -> bool:
        return rows.qtype == gguf.GGMLQuantizationType.Q8_0 and rows.shape[1] % Q8_0_BLOCK == 0 \
            and rows.row_bytes == rows.shape[1] // Q8_0_BLOCK * _Q8_0_BLOCK_BYTES

    def __getitem__(self, index: torch.Tensor | slice | int) -> torch.Tensor:
        ids = index if isinstance(index, torch.Tensor) else torch.arange(self.shape[0])[index]
        flat = ids.reshape(-1)
        panel, lane = flat // LANES, flat % LANES
        codes = self.matmul.packed[panel, :, lane]  # [ids, k / 2, 2]
        scales = self.matmul.scales[panel, :, lane]  # [ids, k / 32]
        values = codes.float().view(len(flat), scales.shape[-1], Q8_0_BLOCK) * scales.float()[..., None]
        return values.view(*ids.shape, self.shape[1]).to(self.dtype)


class _Q8Codes:
    """The codes of a table's Q8_0 blocks as int8 [rows, columns], read a slice of rows at a time
    (as `pack_pairs` asks for them), their scales copied into `scales` as they go by, and the
    largest sum of a row's squared scales kept."""

    def __init__(self, rows: GGMLRows | GGMLFileRows) -> None:
        self.rows = rows
        self.shape = tuple(rows.shape)
        self.scales = torch.empty(rows.shape[0], rows.shape[1] // Q8_0_BLOCK, dtype=torch.float16)
        self.max_square_scales = 0.0

    def __getitem__(self, rows: slice) -> torch.Tensor:
        blocks = self.rows.read_blocks(rows.start, rows.stop)
        blocks = blocks.view(blocks.shape[0], -1, _Q8_0_BLOCK_BYTES)
        scales = self.scales[rows]
        scales.view(torch.uint8).view(*scales.shape, 2).copy_(blocks[..., :2])
        self.max_square_scales = max(self.max_square_scales, scales.float().square().sum(dim=1).max().item())
        return blocks[..., 2:].reshape(blocks.shape[0], -1).view(torch.int8)

"""The attention block of a decoder layer: fused QKV projection, optional per-head norms
(Gemma 3, Qwen3), rotary embeddings (unless the config leaves the layer without), paged attention,
output projection."""
from __future__ import annotations

import torch

from quill.config import ModelConfig
from quill.layers.attention import AttentionMetadata, PagedAttention
from quill.layers.linear import Linear
from quill.layers.module import InferenceModule
from quill.layers.norm import RMSNorm
from quill.layers.rotary import RotaryEmbedding


class SelfAttention(InferenceModule):
    def __init__(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding,
                 *, qk_norm_offset: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        hidden = config.hidden_size
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(self.q_size, hidden, bias=False)
        self.q_norm = self.k_norm = None
        if qk_norm_offset is not None:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, weight_offset=qk_norm_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, weight_offset=qk_norm_offset)
        self.rotary = rotary if config.rope_layers[layer_index] else None
        sliding = config.layer_types[layer_index] == "sliding"
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, config.attention_scale,
            sliding_window=config.sliding_window if sliding else None
        )

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # Attention runs in its own dtype (float32 on the CPU: RoPE's float32 result stays unrounded).
        dtype = self.attn.dtype
        qkv = self.qkv_proj(x).to(dtype)
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if self.q_norm is None and self.rotary is not None:  # q and k are adjacent: rotate them in one pass
            qk = self.rotary(positions, qkv[:, :self.q_size + self.kv_size].view(-1, heads + kv_heads, dim))
            q, k = qk.to(dtype).split([heads, kv_heads], dim=1)
        else:
            q, k = qkv[:, :self.q_size].view(-1, heads, dim), qkv[:, self.q_size:-self.kv_size].view(-1, kv_heads, dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if self.rotary is not None:
                q, k = self.rotary(positions, q), self.rotary(positions, k)
            q, k = q.to(dtype), k.to(dtype)
        v = qkv[:, -self.kv_size:].view(-1, kv_heads, dim)
        return self.o_proj(self.attn(q, k, v, meta).to(x.dtype))

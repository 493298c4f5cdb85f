"""Gemma 3 (text): sandwich norms, q/k norms, scaled embeddings, GELU-tanh MLP, and a mix of
sliding-window (local RoPE base) and global (scaled RoPE) attention layers."""
from __future__ import annotations

import torch
from torch import nn

from quill.config import ModelConfig
from quill.layers.attention import AttentionMetadata
from quill.layers.linear import Linear
from quill.layers.logits import lm_head_logits
from quill.layers.mlp import GatedMLP
from quill.layers.module import InferenceModule
from quill.layers.norm import RMSNorm
from quill.layers.rotary import RotaryEmbedding
from quill.layers.self_attention import SelfAttention

GEMMA_NORM_OFFSET = 1.0  # Gemma norms scale by (1 + weight)


class Gemma3DecoderLayer(InferenceModule):
    def __init__(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps

        def norm() -> RMSNorm:
            return RMSNorm(hidden, eps, weight_offset=GEMMA_NORM_OFFSET)

        self.self_attn = SelfAttention(config, layer_index, rotary, qk_norm_offset=GEMMA_NORM_OFFSET)
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_act)
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        global_rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        local_rotary = RotaryEmbedding(config.head_dim, config.rope_local_theta or config.rope_theta, None)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, local_rotary if kind == "sliding" else global_rotary)
            for i, kind in enumerate(config.layer_types)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_offset=GEMMA_NORM_OFFSET)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # The reference rounds the normalizer to the activation dtype before scaling.
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, positions, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head_logits(self.lm_head, hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

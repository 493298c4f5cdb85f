"""Llama (2, 3, 3.x), and the decoder other families build on: Mistral, Qwen2 and Phi-3 run it as
it is, Qwen3 and Qwen3-MoE replace parts of a layer through `LlamaForCausalLM.decoder_layer`."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quill.config import ModelConfig
from quill.layers.attention import AttentionMetadata
from quill.layers.embedding import token_embedding
from quill.layers.fused_layers import FusedLayers, run_layers
from quill.layers.linear import Linear
from quill.layers.logits import full_vocabulary_logits, lm_head_logits, output_token_ids
from quill.layers.mlp import GatedMLP
from quill.layers.module import InferenceModule
from quill.layers.norm import RMSNorm
from quill.layers.rotary import RotaryEmbedding
from quill.layers.self_attention import SelfAttention
from quill.weights.family import InterleavedRope, ModelFamily, llama_like_tensors


class LlamaDecoderLayer(InferenceModule):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding, mlp: nn.Module, *,
                 qk_norm_offset: float | None = None) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config, layer_index, rotary, qk_norm_offset=qk_norm_offset)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def fused_norms(self) -> tuple[RMSNorm, None, RMSNorm, None]:
        """(attention's input norm, its output norm, the MLP's input norm, its output norm), as
        `quill.layers.fused_layers` describes a layer: Llama has no output norms."""
        return self.input_layernorm, None, self.post_attention_layernorm, None


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.embed_tokens = token_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.decoder_layer(config, i, rotary) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.output_vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.output_token_ids = output_token_ids(config)
        self.fused_layers: FusedLayers | None = None  # see fuse_layers

    def decoder_layer(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding) -> LlamaDecoderLayer:
        """Layer `layer_index`. A family that differs from Llama only inside its layers overrides this."""
        return LlamaDecoderLayer(config, layer_index, rotary,
                                 GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act))

    def fuse_layers(self) -> None:
        """Run every layer of a step in one C call from now on, where the model qualifies
        (`quill.layers.fused_layers`). The CPU runner calls it once the caches are bound and the
        matrices packed."""
        self.fused_layers = FusedLayers.build(self.layers, LlamaDecoderLayer, self.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states after the final norm, [tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        return self.norm(run_layers(self.fused_layers, self.layers, x, positions, meta))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return full_vocabulary_logits(lm_head_logits(self.lm_head, hidden), self.output_token_ids, self.config.vocab_size)


def llama_gguf_metadata(config: ModelConfig) -> dict[str, Any]:
    return {"rope.dimension_count": config.head_dim}  # llama.cpp and transformers read head_dim from it


FAMILY = ModelFamily(
    name="llama",
    module=LlamaForCausalLM,
    tensors=llama_like_tensors,
    hf_architectures=("LlamaForCausalLM",),
    hf_model_types=("llama",),
    gguf_metadata=llama_gguf_metadata,
    gguf_conventions=(InterleavedRope(),),
)

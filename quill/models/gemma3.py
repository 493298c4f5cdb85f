"""Gemma 3 (text): sandwich norms, q/k norms, scaled embeddings, GELU-tanh MLP, and a mix of
sliding-window (local RoPE base) and global (scaled RoPE) attention layers; final-logit
soft-capping where the config sets it.

In GGUF: norms are stored as 1 + w, the layer pattern as one flag per layer (llama.cpp assumes
every sixth layer global without it), and the attention scale cannot be stored at all: llama.cpp
derives it (head_dim ** -0.5, or hidden / heads for the 62-layer 27B), so other values are refused.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quill.config import ModelConfig
from quill.errors import UnsupportedModelError
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
from quill.weights.family import (GGUFKeys, ModelFamily, NormOffset, Tensor, attention_tensors, embedding_tensors,
                                  gated_mlp_tensors, hf_rope, norm_tensors)

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

    def fused_norms(self) -> tuple[RMSNorm, RMSNorm, RMSNorm, RMSNorm]:
        """(attention's input norm, its output norm, the MLP's input norm, its output norm): see
        `quill.layers.fused_layers`."""
        return (self.input_layernorm, self.post_attention_layernorm, self.pre_feedforward_layernorm,
                self.post_feedforward_layernorm)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        global_rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        local_rotary = RotaryEmbedding(config.head_dim, config.rope_local_theta or config.rope_theta, None)
        self.embed_tokens = token_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, local_rotary if kind == "sliding" else global_rotary)
            for i, kind in enumerate(config.layer_types)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, weight_offset=GEMMA_NORM_OFFSET)
        self.lm_head = Linear(config.hidden_size, config.output_vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.output_token_ids = output_token_ids(config)
        self.fused_layers: FusedLayers | None = None  # see fuse_layers

    def fuse_layers(self) -> None:
        """Run every layer of a step in one C call from now on, where the model qualifies
        (`quill.layers.fused_layers`; called by the CPU runner)."""
        self.fused_layers = FusedLayers.build(self.layers, Gemma3DecoderLayer, self.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # The reference rounds the normalizer to the activation dtype before scaling.
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        return self.norm(run_layers(self.fused_layers, self.layers, x, positions, meta))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head_logits(self.lm_head, hidden)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return full_vocabulary_logits(logits, self.output_token_ids, self.config.vocab_size)  # after the cap: -inf stays


# A layer's four norms; llama.cpp calls the one before the MLP ffn_norm, as Llama's second norm.
_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
          "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_GLOBAL_EVERY = 6  # the default pattern (transformers 4 and llama.cpp): five sliding layers, then one global


def gemma3_tensors(c: ModelConfig) -> list[Tensor]:
    return embedding_tensors(c) + [
        t for i in range(c.num_layers)
        for t in attention_tensors(c, i, qk_norm=True) + gated_mlp_tensors(c, i) + norm_tensors(c, i, _NORMS)
    ]


def _hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"rope_local_theta": hf_rope(cfg, "sliding_attention")[0],
            "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar", 256))}


def _hf_sliding_layers(cfg: dict[str, Any], num_layers: int) -> list[bool]:
    """transformers 4: every `sliding_window_pattern`-th layer is global."""
    pattern = cfg.get("sliding_window_pattern", _GLOBAL_EVERY)
    return [(i + 1) % pattern != 0 for i in range(num_layers)]


def _llama_cpp_attention_scalar(num_layers: int, hidden_size: int, num_heads: int, head_dim: int) -> float:
    return float(hidden_size // num_heads if num_layers == 62 else head_dim)


def _gguf_config(keys: GGUFKeys, common: dict[str, Any]) -> dict[str, Any]:
    window = keys("attention.sliding_window", None)
    pattern = keys("attention.sliding_window_pattern", _GLOBAL_EVERY)
    layers = common["num_layers"]
    if isinstance(pattern, list):  # one bool per layer, True = sliding (as llama.cpp's swa_layers)
        sliding = [bool(s) for s in pattern]
    else:  # llama.cpp's set_swa_pattern(n): the last layer of every n is full attention
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "layer_types": tuple("sliding" if is_sliding and window else "full" for is_sliding in sliding),
        "sliding_window": int(window) if window else None,
        "rope_local_theta": float(keys("rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": _llama_cpp_attention_scalar(layers, common["hidden_size"], common["num_heads"],
                                                             common["head_dim"]),
    }


def _gguf_metadata(c: ModelConfig) -> dict[str, Any]:
    if c.query_pre_attn_scalar != _llama_cpp_attention_scalar(c.num_layers, c.hidden_size, c.num_heads, c.head_dim):
        raise UnsupportedModelError(
            f"GGUF cannot store Gemma 3 query_pre_attn_scalar={c.query_pre_attn_scalar}; llama.cpp derives it")
    window = {"attention.sliding_window": c.sliding_window} if c.sliding_window else {}
    return window | {"attention.sliding_window_pattern": [kind == "sliding" for kind in c.layer_types],
                     "rope.freq_base_swa": c.rope_local_theta or 10000.0}


FAMILY = ModelFamily(
    name="gemma3",
    module=Gemma3ForCausalLM,
    tensors=gemma3_tensors,
    # The multimodal checkpoint is read for its text model only.
    hf_architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    hf_model_types=("gemma3_text", "gemma3"),
    hf_config=_hf_config,
    hf_sliding_layers=_hf_sliding_layers,
    tied_by_default=True,
    default_activation="gelu_pytorch_tanh",
    gguf_config=_gguf_config,
    gguf_metadata=_gguf_metadata,
    gguf_conventions=(NormOffset(GEMMA_NORM_OFFSET),),
)

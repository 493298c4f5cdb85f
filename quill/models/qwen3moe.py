"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, and a mixture of experts in
place of every layer's MLP (`quill/layers/moe.py`): softmax over the router's scores, the top
`num_experts_per_tok` experts, their weights renormalised when `norm_topk_prob`.

In GGUF (llama.cpp's "qwen3moe"), a layer's experts are stacked into one tensor per projection
(`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`), the router is `ffn_gate_inp`, and the top-k
weights are always renormalised: llama.cpp's graph hard-codes it, so a config without it is refused.
Layers with a dense MLP among the experts (`mlp_only_layers`, `decoder_sparse_step` > 1) are refused.
"""
from __future__ import annotations

from typing import Any

from quill.config import ModelConfig
from quill.errors import UnsupportedModelError
from quill.layers.moe import SparseMoE
from quill.layers.rotary import RotaryEmbedding
from quill.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from quill.models.qwen2 import qwen2_sliding_layers
from quill.weights.family import (PRE_NORMS, GGUFKeys, ModelFamily, Tensor, attention_tensors, block,
                                  embedding_tensors, norm_tensors, sliding_window_when_used)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    def decoder_layer(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding) -> LlamaDecoderLayer:
        experts = SparseMoE(config.hidden_size, config.moe_intermediate_size, config.num_experts,
                            config.num_experts_per_token, config.norm_topk_prob, config.hidden_act)
        return LlamaDecoderLayer(config, layer_index, rotary, experts, qk_norm_offset=0.0)


def qwen3moe_tensors(c: ModelConfig) -> list[Tensor]:
    hidden, inner, experts = c.hidden_size, c.moe_intermediate_size, c.num_experts
    return embedding_tensors(c) + [
        t for i in range(c.num_layers)
        for t in attention_tensors(c, i, qk_norm=True) + norm_tensors(c, i, PRE_NORMS) + [
            block(i, "mlp.gate.weight", "ffn_gate_inp.weight", (experts, hidden)),
            block(i, "mlp.experts.{expert}.gate_proj.weight", "ffn_gate_exps.weight", (inner, hidden), experts),
            block(i, "mlp.experts.{expert}.up_proj.weight", "ffn_up_exps.weight", (inner, hidden), experts),
            block(i, "mlp.experts.{expert}.down_proj.weight", "ffn_down_exps.weight", (hidden, inner), experts),
        ]
    ]


def _hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError("dense MLP layers among the expert layers (mlp_only_layers, "
                                    "decoder_sparse_step) are not supported")
    return {"num_experts": cfg.get("num_experts") or cfg["num_local_experts"],  # transformers 5 saves the latter
            "num_experts_per_token": cfg["num_experts_per_tok"],
            "moe_intermediate_size": cfg["moe_intermediate_size"],
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False))}


def _gguf_config(keys: GGUFKeys, common: dict[str, Any]) -> dict[str, Any]:
    return {"num_experts": int(keys("expert_count")), "num_experts_per_token": int(keys("expert_used_count")),
            "moe_intermediate_size": int(keys("expert_feed_forward_length")), "norm_topk_prob": True}


def _gguf_metadata(c: ModelConfig) -> dict[str, Any]:
    if not c.norm_topk_prob:
        raise UnsupportedModelError("GGUF cannot store Qwen3-MoE without norm_topk_prob: llama.cpp always "
                                    "renormalises the top-k expert weights")
    return {"expert_count": c.num_experts, "expert_used_count": c.num_experts_per_token,
            "expert_feed_forward_length": c.moe_intermediate_size}


FAMILY = ModelFamily(
    name="qwen3moe",
    module=Qwen3MoeForCausalLM,
    tensors=qwen3moe_tensors,
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_model_types=("qwen3_moe",),
    hf_config=_hf_config,
    hf_sliding_window=sliding_window_when_used,
    hf_sliding_layers=qwen2_sliding_layers,
    gguf_config=_gguf_config,
    gguf_metadata=_gguf_metadata,
)

"""Phi-3 (mini, medium) and Phi-4-mini's layout: Llama's graph with the q/k/v projections and the
MLP's gate and up projections stored fused (`qkv_proj`, `gate_up_proj`, gate rows first), as Quill
runs them, and one sliding window for every layer where the config sets one.

In GGUF, llama.cpp keeps the fused tensors (`attn_qkv`, and `ffn_up` holding gate and up) and
HF's q/k order. Its runtime currently ignores the window it stores; Quill applies it, as
transformers does. Partial rotary embeddings and LongRoPE scaling (the 128k variants) are refused.
"""
from __future__ import annotations

from typing import Any

from quill.config import ModelConfig
from quill.errors import UnsupportedModelError
from quill.models.llama import LlamaForCausalLM
from quill.weights.family import PRE_NORMS, GGUFKeys, ModelFamily, Tensor, block, embedding_tensors, norm_tensors


def phi3_tensors(c: ModelConfig) -> list[Tensor]:
    q, kv, hidden, inner = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    return embedding_tensors(c) + [
        t for i in range(c.num_layers)
        for t in [block(i, "self_attn.qkv_proj.weight", "attn_qkv.weight", (q + 2 * kv, hidden)),
                  block(i, "self_attn.o_proj.weight", "attn_output.weight", (hidden, q)),
                  block(i, "mlp.gate_up_proj.weight", "ffn_up.weight", (2 * inner, hidden)),
                  block(i, "mlp.down_proj.weight", "ffn_down.weight", (hidden, inner))] + norm_tensors(c, i, PRE_NORMS)
    ]


def _hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    partial = cfg.get("partial_rotary_factor") or (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise UnsupportedModelError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
    return {}


def _gguf_config(keys: GGUFKeys, common: dict[str, Any]) -> dict[str, Any]:
    window = keys("attention.sliding_window", 0)  # 0: none (llama.cpp's converter writes 0 for Phi-4)
    return {"sliding_window": int(window) or None}


def _gguf_metadata(config: ModelConfig) -> dict[str, Any]:
    return {"rope.dimension_count": config.head_dim, "attention.sliding_window": config.sliding_window or 0}


FAMILY = ModelFamily(
    name="phi3",
    module=LlamaForCausalLM,
    tensors=phi3_tensors,
    hf_architectures=("Phi3ForCausalLM",),
    hf_model_types=("phi3",),
    hf_config=_hf_config,
    gguf_config=_gguf_config,
    gguf_metadata=_gguf_metadata,
)

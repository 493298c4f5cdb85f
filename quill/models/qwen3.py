"""Qwen3 (dense): Llama's graph with an RMSNorm over each head of q and k before RoPE, and
Qwen2's sliding-window rule. In GGUF, llama.cpp keeps its q/k rows in Hugging Face's order."""
from __future__ import annotations

from quill.config import ModelConfig
from quill.layers.mlp import GatedMLP
from quill.layers.rotary import RotaryEmbedding
from quill.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from quill.models.qwen2 import qwen2_sliding_layers
from quill.weights.family import ModelFamily, Tensor, llama_like_tensors, sliding_window_when_used


class Qwen3ForCausalLM(LlamaForCausalLM):
    def decoder_layer(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding) -> LlamaDecoderLayer:
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        return LlamaDecoderLayer(config, layer_index, rotary, mlp, qk_norm_offset=0.0)


def qwen3_tensors(config: ModelConfig) -> list[Tensor]:
    return llama_like_tensors(config, qk_norm=True)


FAMILY = ModelFamily(
    name="qwen3",
    module=Qwen3ForCausalLM,
    tensors=qwen3_tensors,
    hf_architectures=("Qwen3ForCausalLM",),
    hf_model_types=("qwen3",),
    hf_sliding_window=sliding_window_when_used,
    hf_sliding_layers=qwen2_sliding_layers,
)

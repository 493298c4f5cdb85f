"""Qwen2 (and Qwen2.5): Llama's graph with biases on the q/k/v projections (not on o), and a
sliding window only where `use_sliding_window` turns it on, from layer `max_window_layers` up."""
from __future__ import annotations

from typing import Any

from quill.config import ModelConfig
from quill.models.llama import LlamaForCausalLM
from quill.weights.family import ModelFamily, Tensor, llama_like_tensors, sliding_window_when_used


def qwen2_tensors(config: ModelConfig) -> list[Tensor]:
    return llama_like_tensors(config, output_bias=False)


def qwen2_sliding_layers(cfg: dict[str, Any], num_layers: int) -> list[bool]:
    return [i >= cfg.get("max_window_layers", num_layers) for i in range(num_layers)]


FAMILY = ModelFamily(
    name="qwen2",
    module=LlamaForCausalLM,
    tensors=qwen2_tensors,
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_types=("qwen2",),
    hf_config=lambda cfg: {"attention_bias": True},  # Qwen2 configs do not say so
    hf_sliding_window=sliding_window_when_used,
    hf_sliding_layers=qwen2_sliding_layers,
)

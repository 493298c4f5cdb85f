"""Mistral: Llama's graph with one sliding window for every layer.

llama.cpp's converter writes it as "llama" and drops the window, so a GGUF file of it reads back
as Llama (the same model for contexts within the window)."""
from __future__ import annotations

from quill.models.llama import LlamaForCausalLM, llama_gguf_metadata
from quill.weights.family import InterleavedRope, ModelFamily, llama_like_tensors

FAMILY = ModelFamily(
    name="mistral",
    module=LlamaForCausalLM,
    tensors=llama_like_tensors,
    hf_architectures=("MistralForCausalLM",),
    hf_model_types=("mistral",),
    gguf_architecture="llama",
    gguf_metadata=llama_gguf_metadata,
    gguf_conventions=(InterleavedRope(),),
)

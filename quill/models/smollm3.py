"""SmolLM3: Llama's graph, with RoPE left out of some layers (every fourth, by default: "NoPE"
layers attend by content alone). Its config lists them (`no_rope_layers`, 1 where a layer rotates)
or gives their spacing (`no_rope_layer_interval`).

In GGUF, llama.cpp's converter writes it as Llama (q/k rows permuted) and its runtime hard-codes
every fourth layer without RoPE: no key says otherwise, so other patterns are refused.
"""
from __future__ import annotations

from typing import Any

from quill.config import ModelConfig
from quill.errors import UnsupportedModelError
from quill.models.llama import LlamaForCausalLM, llama_gguf_metadata
from quill.weights.family import GGUFKeys, InterleavedRope, ModelFamily, llama_like_tensors, sliding_window_when_used

_LLAMA_CPP_NO_ROPE_EVERY = 4


def _every_nth_without_rope(num_layers: int, interval: int) -> tuple[bool, ...]:
    return tuple((i + 1) % interval != 0 for i in range(num_layers))


def _hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    flags = cfg.get("no_rope_layers")
    if flags is None:
        return {"rope_layers": _every_nth_without_rope(cfg["num_hidden_layers"],
                                                       cfg.get("no_rope_layer_interval", _LLAMA_CPP_NO_ROPE_EVERY))}
    return {"rope_layers": tuple(bool(flag) for flag in flags)}


def _gguf_config(keys: GGUFKeys, common: dict[str, Any]) -> dict[str, Any]:
    return {"rope_layers": _every_nth_without_rope(common["num_layers"], _LLAMA_CPP_NO_ROPE_EVERY)}


def _gguf_metadata(config: ModelConfig) -> dict[str, Any]:
    if config.rope_layers != _every_nth_without_rope(config.num_layers, _LLAMA_CPP_NO_ROPE_EVERY):
        raise UnsupportedModelError(f"GGUF cannot store SmolLM3's layers without RoPE other than every "
                                    f"{_LLAMA_CPP_NO_ROPE_EVERY}th: llama.cpp assumes that pattern")
    return llama_gguf_metadata(config)


FAMILY = ModelFamily(
    name="smollm3",
    module=LlamaForCausalLM,  # which layers rotate is in the config (`rope_layers`)
    tensors=llama_like_tensors,
    hf_architectures=("SmolLM3ForCausalLM",),
    hf_model_types=("smollm3",),
    hf_config=_hf_config,
    hf_sliding_window=sliding_window_when_used,
    tied_by_default=True,
    gguf_config=_gguf_config,
    gguf_metadata=_gguf_metadata,
    gguf_conventions=(InterleavedRope(),),
)

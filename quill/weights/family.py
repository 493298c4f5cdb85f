"""What a model family declares so that its checkpoints can be read, written and built.

Each file in `quill/models/` fills in one `ModelFamily`: the names Hugging Face and GGUF files give
the family, how their config keys map onto a `ModelConfig`, its tensors in both formats, the
conventions llama.cpp's converter applies to them, and the module that runs it. The readers and
writers in this package, and the loader, consult it and know no family by name.

The pieces families share live here too: tensor tables of the usual decoder parts, the RoPE
keys of both transformers config styles, and the two GGUF conventions (permuted q/k rows,
shifted norms).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from quill.config import ModelConfig
from quill.errors import ModelLoadError, UnsupportedModelError
from quill.weights.quantized import DeferredWeight, QuantizedWeight


@dataclass(frozen=True)
class Tensor:
    """One tensor of a checkpoint: its Hugging Face name and shape, and its name in GGUF files.
    With `experts`, there is one Hugging Face tensor per expert (`{expert}` in `hf`), and GGUF
    stacks them along a new first axis into one tensor, as llama.cpp stores a layer's experts."""

    hf: str
    gguf: str
    shape: tuple[int, ...]
    experts: int = 0

    @property
    def hf_names(self) -> list[str]:
        return [self.hf.format(expert=e) for e in range(self.experts)] if self.experts else [self.hf]

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        return (self.experts, *self.shape) if self.experts else self.shape


def block(layer: int, hf: str, gguf: str, shape: tuple[int, ...], experts: int = 0) -> Tensor:
    """A tensor of decoder layer `layer`: `model.layers.{layer}.{hf}` / `blk.{layer}.{gguf}`."""
    return Tensor(f"model.layers.{layer}.{hf}", f"blk.{layer}.{gguf}", shape, experts)


def embedding_tensors(c: ModelConfig) -> list[Tensor]:
    """The token embedding, the final norm, and the LM head unless it is the embedding."""
    tensors = [Tensor("model.embed_tokens.weight", "token_embd.weight", (c.vocab_size, c.hidden_size)),
               Tensor("model.norm.weight", "output_norm.weight", (c.hidden_size,))]
    if not c.tie_word_embeddings:
        tensors.append(Tensor("lm_head.weight", "output.weight", (c.output_vocab_size, c.hidden_size)))
    return tensors


def attention_tensors(c: ModelConfig, layer: int, *, qk_norm: bool = False,
                      output_bias: bool | None = None) -> list[Tensor]:
    """q/k/v/o projections (biases on q/k/v when `attention_bias`, on o too unless `output_bias`
    says otherwise), and per-head q/k norms when `qk_norm`."""
    q, kv, hidden = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size
    tensors = [block(layer, "self_attn.q_proj.weight", "attn_q.weight", (q, hidden)),
               block(layer, "self_attn.k_proj.weight", "attn_k.weight", (kv, hidden)),
               block(layer, "self_attn.v_proj.weight", "attn_v.weight", (kv, hidden)),
               block(layer, "self_attn.o_proj.weight", "attn_output.weight", (hidden, q))]
    if c.attention_bias:
        tensors += [block(layer, "self_attn.q_proj.bias", "attn_q.bias", (q,)),
                    block(layer, "self_attn.k_proj.bias", "attn_k.bias", (kv,)),
                    block(layer, "self_attn.v_proj.bias", "attn_v.bias", (kv,))]
    if c.attention_bias if output_bias is None else output_bias:
        tensors.append(block(layer, "self_attn.o_proj.bias", "attn_output.bias", (hidden,)))
    if qk_norm:
        tensors += [block(layer, "self_attn.q_norm.weight", "attn_q_norm.weight", (c.head_dim,)),
                    block(layer, "self_attn.k_norm.weight", "attn_k_norm.weight", (c.head_dim,))]
    return tensors


def gated_mlp_tensors(c: ModelConfig, layer: int) -> list[Tensor]:
    hidden, inner = c.hidden_size, c.intermediate_size
    return [block(layer, "mlp.gate_proj.weight", "ffn_gate.weight", (inner, hidden)),
            block(layer, "mlp.up_proj.weight", "ffn_up.weight", (inner, hidden)),
            block(layer, "mlp.down_proj.weight", "ffn_down.weight", (hidden, inner))]


def norm_tensors(c: ModelConfig, layer: int, names: dict[str, str]) -> list[Tensor]:
    """A layer's norms over the hidden state, Hugging Face name -> GGUF name (without `.weight`).
    The same GGUF name can mean different norms: llama.cpp's `ffn_norm` is Llama's
    post_attention_layernorm but Gemma 3's pre_feedforward_layernorm."""
    return [block(layer, f"{hf}.weight", f"{gguf}.weight", (c.hidden_size,)) for hf, gguf in names.items()]


# Llama's two norms per layer, as most families name them.
PRE_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_like_tensors(c: ModelConfig, *, qk_norm: bool = False, output_bias: bool | None = None) -> list[Tensor]:
    """Embeddings and, per layer, attention, a gated MLP and Llama's two norms."""
    return embedding_tensors(c) + [
        t for i in range(c.num_layers)
        for t in (attention_tensors(c, i, qk_norm=qk_norm, output_bias=output_bias) + gated_mlp_tensors(c, i)
                  + norm_tensors(c, i, PRE_NORMS))
    ]


# --- GGUF conventions ----------------------------------------------------------------------------

class InterleavedRope:
    """llama.cpp runs these families' RoPE on adjacent pairs of a head's dimensions, so its
    converter permutes the q and k projection rows (weights and biases) per head from Hugging
    Face's rotate-half order into interleaved order; reading undoes it."""

    def to_gguf(self, hf_name: str, values: np.ndarray, config: ModelConfig) -> np.ndarray:
        heads = self._heads(hf_name, config)
        if heads is None:
            return values
        shape = values.shape  # rows: rotate-half order -> interleaved pairs
        return values.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)

    def from_gguf(self, hf_name: str, tensor: torch.Tensor | QuantizedWeight,
                  config: ModelConfig) -> torch.Tensor | QuantizedWeight:
        heads = self._heads(hf_name, config)
        if heads is None:
            return tensor
        if isinstance(tensor, (QuantizedWeight, DeferredWeight)):  # rows move whole: permute them by index
            return tensor.select_rows(self._unpermute(torch.arange(tensor.shape[0]), heads))
        return self._unpermute(tensor, heads)

    @staticmethod
    def _heads(hf_name: str, config: ModelConfig) -> int | None:
        if ".self_attn.q_proj." in hf_name:
            return config.num_heads
        if ".self_attn.k_proj." in hf_name:
            return config.num_kv_heads
        return None

    @staticmethod
    def _unpermute(tensor: torch.Tensor, heads: int) -> torch.Tensor:
        """Per head, rows 0, d/2, 1, d/2+1, ... back to 0, 1, ..., d-1."""
        shape = tensor.shape
        return tensor.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


@dataclass(frozen=True)
class NormOffset:
    """The family's norms scale by (offset + w); llama.cpp's converter stores offset + w, so that
    its runtime multiplies by the stored weight alone."""

    offset: float

    def to_gguf(self, hf_name: str, values: np.ndarray, config: ModelConfig) -> np.ndarray:
        return values + np.float32(self.offset) if hf_name.endswith("norm.weight") else values

    def from_gguf(self, hf_name: str, tensor: torch.Tensor | QuantizedWeight,
                  config: ModelConfig) -> torch.Tensor | QuantizedWeight:
        return tensor - self.offset if hf_name.endswith("norm.weight") else tensor


# --- config keys ---------------------------------------------------------------------------------

_REQUIRED = object()


class GGUFKeys:
    """A GGUF file's model metadata by key without the `{architecture}.` prefix:
    `keys("block_count")`, or `keys("rope.freq_base", 10000.0)` with a default."""

    def __init__(self, metadata: dict[str, Any], architecture: str, source: str) -> None:
        self.metadata, self.architecture, self.source = metadata, architecture, source

    def __call__(self, name: str, default: Any = _REQUIRED) -> Any:
        key = f"{self.architecture}.{name}"
        if key in self.metadata:
            return self.metadata[key]
        if default is _REQUIRED:
            raise ModelLoadError(f"{self.source}: metadata key {key} is missing")
        return default


def hf_rope(cfg: dict[str, Any], layer_type: str = "full_attention") -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, Hugging Face-style scaling dict or None) of one layer type, from either config
    style: transformers 5 (`rope_parameters`, per layer type where layers differ) or 4
    (`rope_theta`, `rope_scaling`, and Gemma 3's `rope_local_base_freq` for sliding layers)."""
    params = cfg.get("rope_parameters")
    if params and all(isinstance(v, dict) for v in params.values()):  # transformers 5, per layer type
        params = params.get(layer_type) or next(iter(params.values()))
    if params:
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        theta = params.get("rope_theta", 10000.0)
    else:  # transformers 4: sliding layers (Gemma 3) have their own base and no scaling
        local = layer_type == "sliding_attention"
        scaling = None if local else cfg.get("rope_scaling")
        theta = cfg.get("rope_local_base_freq", 10000.0) if local else cfg.get("rope_theta", 10000.0)
    return float(theta), _normalize_rope_scaling(scaling)


def _normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.pop("type", None)  # older configs spell rope_type "type"
    scaling["rope_type"] = scaling.get("rope_type", kind)
    if scaling["rope_type"] in (None, "default"):
        return None
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key in scaling:
            scaling[key] = float(scaling[key])
    if "original_max_position_embeddings" in scaling:
        scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return scaling


def sliding_window_when_used(cfg: dict[str, Any]) -> int | None:
    """For configs (Qwen's, SmolLM3's) that carry a window size even when `use_sliding_window`
    switches it off."""
    return cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None


def every_layer(cfg: dict[str, Any], num_layers: int) -> list[bool]:
    return [True] * num_layers


def no_fields(source: Any) -> dict[str, Any]:
    return {}


# --- the family record ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFamily:
    """Everything Quill knows about one architecture family. Only `name`, `module`, `tensors` and
    `hf_architectures` are always needed; the rest default to what Llama does."""

    name: str  # `ModelConfig.architecture`; for a family GGUF knows, llama.cpp's name for it
    module: Callable[[ModelConfig], Any]  # the nn.Module class that runs it
    tensors: Callable[[ModelConfig], list[Tensor]]  # every tensor the module needs, in both formats
    hf_architectures: tuple[str, ...]  # config.json `architectures` entries
    hf_model_types: tuple[str, ...] = ()  # config.json `model_type`, when `architectures` is absent
    # What GGUF files call it, when llama.cpp's converter writes it under another family's name
    # (Mistral as llama); None: its own name.
    gguf_architecture: str | None = None
    # Hugging Face config.json: family-specific ModelConfig fields, and the attention pattern.
    hf_config: Callable[[dict[str, Any]], dict[str, Any]] = no_fields
    hf_sliding_window: Callable[[dict[str, Any]], int | None] = lambda cfg: cfg.get("sliding_window")
    # Which layers slide when the config has no `layer_types` (and a window is set).
    hf_sliding_layers: Callable[[dict[str, Any], int], list[bool]] = every_layer
    tied_by_default: bool = False  # tie_word_embeddings when config.json does not say
    default_activation: str = "silu"
    # GGUF: family-specific ModelConfig fields read from the file (given its keys and the fields
    # every family shares), and metadata written to it (keys without the architecture prefix).
    # Writing raises UnsupportedModelError for a config GGUF, as llama.cpp reads it, cannot express.
    gguf_config: Callable[[GGUFKeys, dict[str, Any]], dict[str, Any]] = lambda keys, common: {}
    gguf_metadata: Callable[[ModelConfig], dict[str, Any]] = no_fields
    gguf_conventions: tuple[InterleavedRope | NormOffset, ...] = ()

    def __post_init__(self) -> None:
        if self.gguf_architecture is None:
            object.__setattr__(self, "gguf_architecture", self.name)

    def hf_shapes(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Hugging Face name -> shape of every tensor the family's module needs."""
        return {name: t.shape for t in self.tensors(config) for name in t.hf_names}

    def to_gguf(self, hf_name: str, values: np.ndarray, config: ModelConfig) -> np.ndarray:
        for convention in self.gguf_conventions:
            values = convention.to_gguf(hf_name, values, config)
        return values

    def from_gguf(self, hf_name: str, tensor: torch.Tensor | QuantizedWeight,
                  config: ModelConfig) -> torch.Tensor | QuantizedWeight:
        for convention in self.gguf_conventions:
            tensor = convention.from_gguf(hf_name, tensor, config)
        return tensor


@dataclass
class Families:
    """The families Quill runs, found by the names each file format uses."""

    families: list[ModelFamily]
    _by_name: dict[str, ModelFamily] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {family.name: family for family in self.families}
        if len(self._by_name) != len(self.families):
            raise ValueError("two model families share a name")

    def named(self, name: str) -> ModelFamily:
        """The family of a `ModelConfig.architecture`."""
        if name not in self._by_name:
            raise UnsupportedModelError(
                f"architecture {name!r} is not supported (supported: {', '.join(self._by_name)})")
        return self._by_name[name]

    def for_hf(self, raw_config: dict[str, Any]) -> ModelFamily:
        """The family of a config.json: by its `architectures`, else by its `model_type`."""
        names = raw_config.get("architectures") or []
        for name in names:
            for family in self.families:
                if name in family.hf_architectures:
                    return family
        model_type = raw_config.get("model_type")
        if not names and model_type:
            for family in self.families:
                if model_type in family.hf_model_types:
                    return family
        supported = [name for family in self.families for name in family.hf_architectures]
        raise UnsupportedModelError(
            f"architecture {names or model_type!r} is not supported; supported: {', '.join(supported)}")

    def for_gguf(self, architecture: str, source: str) -> ModelFamily:
        """The family a GGUF file of `architecture` loads as: the family of that name. (llama.cpp
        writes some families under another's name, Mistral as llama: those read back as it.)"""
        family = self._by_name.get(architecture)
        if family is None or family.gguf_architecture != architecture:
            raise UnsupportedModelError(f"{source}: GGUF architecture {architecture!r} is not supported; "
                                        f"supported: {', '.join(self.gguf_architectures)}")
        return family

    @property
    def gguf_architectures(self) -> list[str]:
        return [f.name for f in self.families if f.gguf_architecture == f.name]

    def __iter__(self) -> Iterator[ModelFamily]:
        return iter(self.families)

"""Hugging Face directory reader: config.json + *.safetensors -> `Checkpoint`.

Understands both config styles: transformers 4 (`rope_theta`, `rope_scaling`, Gemma's
`rope_local_base_freq` and `sliding_window_pattern`) and transformers 5 (`rope_parameters`, per
layer type for Gemma 3, and `layer_types`). Pickle weights (.bin, .pt) are never loaded: unpickling
runs arbitrary code from the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from quill.config import ModelConfig
from quill.errors import ModelLoadError, UnsupportedModelError
from quill.model_limits import check_model_limits
from quill.weights import Checkpoint
from quill.weights.layout import check_tensors

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # multimodal checkpoint: only its text model is used
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Multimodal Gemma 3 nests the text model under one of these prefixes (transformers 4 / 5 layouts).
_NESTED_PREFIXES = {
    "language_model.model.": "model.", "model.language_model.": "model.", "language_model.lm_head.": "lm_head.",
}


def load_hf_directory(path: str | Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """Load a Hugging Face model directory into float32 (or `dtype`) tensors with their Hugging Face names."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory does not exist: {path}")
    config_file = path / "config.json"
    try:
        raw_config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: config.json is missing; is this a Hugging Face model directory?") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file}: cannot read it as JSON: {exc}") from exc
    try:
        config = config_from_hf(raw_config)
    except KeyError as exc:
        raise ModelLoadError(f"{config_file}: required key {exc} is missing") from exc
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{config_file}: invalid config: {exc}") from exc

    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    tensors[_unnest(name)] = tensor.to(dtype or torch.float32) if tensor.is_floating_point() else tensor
        except (OSError, SafetensorError) as exc:
            raise ModelLoadError(f"{file}: not a readable safetensors file: {exc}") from exc
    tensors = check_tensors(config, tensors, str(path))
    return Checkpoint(config=config, tensors=tensors, path=path, format="safetensors", metadata=raw_config)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Map a transformers config.json (either style) to a `ModelConfig`."""
    arch = _architecture(raw)
    cfg = raw.get("text_config", raw)  # multimodal Gemma 3 keeps the text model's settings here
    layers, heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    check_model_limits({"num_layers": layers})  # before a list per layer is built
    gemma = arch == "gemma3"
    rope_theta, rope_scaling = _rope(cfg, "full_attention")
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg["max_position_embeddings"],
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings", gemma))),
        attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu"),
        **_attention_pattern(arch, cfg, layers),
        rope_local_theta=_rope(cfg, "sliding_attention")[0] if gemma else None,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)) if gemma else None,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
    )


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    for name in names:
        if name in _ARCHITECTURES:
            return _ARCHITECTURES[name]
    if not names and raw.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[raw["model_type"]]
    raise UnsupportedModelError(
        f"architecture {names or raw.get('model_type')!r} is not supported; supported: {', '.join(_ARCHITECTURES)}"
    )


def _rope(cfg: dict[str, Any], layer_type: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, HF-style scaling dict or None) for one layer type."""
    params = cfg.get("rope_parameters")
    if params and all(isinstance(v, dict) for v in params.values()):  # transformers 5, per layer type
        params = params.get(layer_type) or next(iter(params.values()))
    if params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", 10000.0)
    else:  # transformers 4: Gemma 3's sliding layers have their own base and no scaling
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


def _attention_pattern(arch: str, cfg: dict[str, Any], layers: int) -> dict[str, Any]:
    window = cfg.get("sliding_window")
    if arch == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None  # Qwen2 configs carry a window size even when it is switched off
    if cfg.get("layer_types"):
        sliding = [kind == "sliding_attention" for kind in cfg["layer_types"]]
    elif arch == "gemma3":  # transformers 4: every `sliding_window_pattern`-th layer is global
        pattern = cfg.get("sliding_window_pattern", 6)
        sliding = [(i + 1) % pattern != 0 for i in range(layers)]
    elif arch == "qwen2":
        sliding = [i >= cfg.get("max_window_layers", layers) for i in range(layers)]
    else:  # Mistral: one window for every layer
        sliding = [True] * layers
    return {
        "layer_types": tuple("sliding" if is_sliding and window else "full" for is_sliding in sliding),
        "sliding_window": window if any(sliding) else None,
    }


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index: {exc}") from exc
        missing = [name for name in names if not (path / name).exists()]
        if missing:
            raise ModelLoadError(f"{path}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return [path / name for name in names]
    single = path / "model.safetensors"
    files = [single] if single.exists() else sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{path} has only pickle weights ({', '.join(pickles)}); Quill refuses to load pickle checkpoints "
            "because unpickling can run arbitrary code. Convert them to safetensors first "
            "(e.g. load with transformers and save_pretrained(..., safe_serialization=True))."
        )
    raise ModelLoadError(f"{path} has no *.safetensors weight files")


def _unnest(name: str) -> str:
    for prefix, replacement in _NESTED_PREFIXES.items():
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return name

"""Hugging Face directory reader: config.json + *.safetensors -> `Checkpoint`.

Understands both config styles: transformers 4 (`rope_theta`, `rope_scaling`, Gemma's
`rope_local_base_freq` and `sliding_window_pattern`) and transformers 5 (`rope_parameters`, per
layer type for Gemma 3, and `layer_types`). What differs between families comes from their
`ModelFamily`. Pickle weights (.bin, .pt) are never loaded: unpickling runs arbitrary code from the
file.
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
from quill.weights.checkpoint import Checkpoint
from quill.weights.family import Families, hf_rope
from quill.weights.layout import check_tensors

# Quill's own config.json key for a trimmed output vocabulary (`ModelConfig.output_token_ids`);
# transformers knows no such thing and cannot load such a directory.
OUTPUT_TOKEN_IDS_KEY = "quill_output_token_ids"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Multimodal checkpoints (Gemma 3's) nest the text model under one of these prefixes (transformers 4 / 5 layouts).
_NESTED_PREFIXES = {
    "language_model.model.": "model.", "model.language_model.": "model.", "language_model.lm_head.": "lm_head.",
}


def load_hf_directory(path: str | Path, families: Families, dtype: torch.dtype | None = None) -> Checkpoint:
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
        config = config_from_hf(raw_config, families)
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
    tensors = check_tensors(families.named(config.architecture).hf_shapes(config), tensors, str(path))
    return Checkpoint(config=config, tensors=tensors, path=path, format="safetensors", metadata=raw_config)


def config_from_hf(raw: dict[str, Any], families: Families) -> ModelConfig:
    """Map a transformers config.json (either style) to a `ModelConfig`: the keys every family
    shares here, the rest from the family's `hf_config`."""
    family = families.for_hf(raw)
    cfg = raw.get("text_config", raw)  # multimodal checkpoints keep the text model's settings here
    if cfg.get("mlp_bias"):  # the checkpoint would hold biases that no family's tensors include
        raise UnsupportedModelError("MLP biases (mlp_bias) are not supported")
    layers, heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    check_model_limits({"num_layers": layers})  # before a list per layer is built
    rope_theta, rope_scaling = hf_rope(cfg)
    window = family.hf_sliding_window(cfg)
    if cfg.get("layer_types"):
        sliding = [kind == "sliding_attention" for kind in cfg["layer_types"]]
    else:
        sliding = family.hf_sliding_layers(cfg, layers)
    fields = dict(
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
        tie_word_embeddings=bool(raw.get("tie_word_embeddings",
                                         cfg.get("tie_word_embeddings", family.tied_by_default))),
        attention_bias=bool(cfg.get("attention_bias", False)),
        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or family.default_activation,
        layer_types=tuple("sliding" if is_sliding and window else "full" for is_sliding in sliding),
        sliding_window=window if any(sliding) else None,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        output_token_ids=tuple(cfg.get(OUTPUT_TOKEN_IDS_KEY) or ()),
    )
    return ModelConfig(architecture=family.name, **(fields | family.hf_config(cfg)))


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

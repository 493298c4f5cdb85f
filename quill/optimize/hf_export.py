"""Writing a checkpoint that pruning or distillation made as a Hugging Face directory: float
safetensors, a config.json with the new shapes, and the tokenizer of the model it came from.

The config is written from the `ModelConfig` (transformers 4 keys, which transformers 5 reads
too), not copied from the source: a GGUF source has none, and an HF source's keys for layers or
heads would describe the model before pruning. Quill's own reader (`weights/safetensors.py`)
turns it back into the same `ModelConfig`; the tests check both that and transformers' reading.
A trimmed output vocabulary is Quill's own key (`quill_output_token_ids`): transformers cannot
load such a directory, Quill can.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from quill.config import ModelConfig
from quill.errors import UnsupportedModelError
from quill.models.registry import FAMILIES
from quill.tokenizer import load_tokenizer
from quill.weights.layout import check_tensors
from quill.weights.safetensors import OUTPUT_TOKEN_IDS_KEY

# Files of an HF directory's tokenizer; copied as they are from an HF source.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "generation_config.json")


def hf_config_dict(config: ModelConfig, tokenizer_ids: dict[str, int | None] | None = None) -> dict[str, Any]:
    """config.json for `config`, in the keys Quill's reader and transformers both understand."""
    if config.num_experts:
        raise UnsupportedModelError("writing a mixture-of-experts model as a Hugging Face directory is not supported")
    family = FAMILIES.named(config.architecture)
    out: dict[str, Any] = {
        "architectures": [family.hf_architectures[0]], "model_type": family.hf_model_types[0],
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings, "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling, "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias, "hidden_act": config.hidden_act,
        "hidden_activation": config.hidden_act, "torch_dtype": "float32",
    }
    if config.sliding_window:
        out["sliding_window"] = config.sliding_window
        out["use_sliding_window"] = True
        out["layer_types"] = [f"{kind}_attention" for kind in config.layer_types]
    if not all(config.rope_layers):
        out["no_rope_layers"] = [int(flag) for flag in config.rope_layers]
    optional = {"query_pre_attn_scalar": config.query_pre_attn_scalar, "rope_local_base_freq": config.rope_local_theta,
                "final_logit_softcapping": config.final_logit_softcapping}
    # transformers' strict configs want an int where the value is whole (query_pre_attn_scalar).
    out |= {key: int(value) if float(value).is_integer() and key == "query_pre_attn_scalar" else value
            for key, value in optional.items() if value is not None}
    if config.output_token_ids:
        out[OUTPUT_TOKEN_IDS_KEY] = list(config.output_token_ids)
    return out | {k: v for k, v in (tokenizer_ids or {}).items() if v is not None}


def save_hf_directory(output: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor],
                      tokenizer_source: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `tensors` (Hugging Face names, checked against `config`) to `output`/model.safetensors
    with config.json and the tokenizer of `tokenizer_source` (an HF directory or a GGUF file)."""
    output = Path(output)
    family = FAMILIES.named(config.architecture)
    tensors = check_tensors(family.hf_shapes(config), tensors, str(output))
    output.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(Path(tokenizer_source), output)
    (output / "config.json").write_text(json.dumps(hf_config_dict(config, ids), indent=2) + "\n")
    save_file({name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()},
              str(output / "model.safetensors"), metadata={"format": "pt"})
    return output


def _write_tokenizer(source: Path, output: Path) -> dict[str, int | None]:
    """Copy (HF source) or rebuild (GGUF source: tokenizer.json and a tokenizer_config.json with its
    special tokens and chat template) the tokenizer; returns its BOS/EOS ids for config.json."""
    if source.is_dir():
        for name in _TOKENIZER_FILES:
            if (source / name).is_file() and (source / name).resolve() != (output / name).resolve():
                shutil.copyfile(source / name, output / name)
        if not (source / "tokenizer.json").is_file():
            return {}  # no tokenizer to carry (the tests' bare random models)
    tokenizer = load_tokenizer(source)
    if not source.is_dir():
        tokenizer.backend.save(str(output / "tokenizer.json"))
        token_config = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                        "add_bos_token": tokenizer.add_bos_token, "add_eos_token": False}
        if tokenizer.chat_template:
            token_config["chat_template"] = tokenizer.chat_template
        (output / "tokenizer_config.json").write_text(json.dumps(token_config, indent=2) + "\n")
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}

"""Model registry: architecture name -> model class, and loading checkpoint tensors into it."""
from __future__ import annotations

import torch
from torch import nn

from quill.config import ModelConfig
from quill.errors import ModelLoadError, UnsupportedModelError
from quill.models.gemma3 import Gemma3ForCausalLM
from quill.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}

# Hugging Face projections that Quill fuses into one matmul: hf name -> (fused name, shard index).
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Instantiate the architecture and fill it with checkpoint tensors (Hugging Face names)."""
    if config.architecture not in MODEL_CLASSES:
        raise UnsupportedModelError(
            f"architecture {config.architecture!r} is not supported (supported: {', '.join(MODEL_CLASSES)})"
        )
    with torch.device("meta"):
        model = MODEL_CLASSES[config.architecture](config)
    params = _quill_tensors(tensors, config.tie_word_embeddings)
    expected = {name for name, _ in model.named_parameters()}  # tied lm_head appears once, as embed_tokens
    missing = sorted(expected - params.keys())
    unexpected = sorted(params.keys() - expected - {"lm_head.weight"})
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint does not match the {config.architecture} architecture: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in params.items() if k in expected}, strict=False, assign=True)
    if config.tie_word_embeddings:  # assign=True replaced the shared parameter; tie it again
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def _quill_tensors(tensors: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Rename Hugging Face tensors to Quill's module names, fusing q/k/v and gate/up."""
    out: dict[str, torch.Tensor] = {}
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if tied and name == "lm_head.weight":
            continue
        name = name.removeprefix("model.")
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED:
            fused, index = _FUSED[parts[-2]]
            shards.setdefault(".".join(parts[:-2] + [fused, parts[-1]]), {})[index] = tensor
        else:
            out[name] = tensor
    for name, pieces in shards.items():
        out[name] = torch.cat([pieces[i] for i in sorted(pieces)])
    return out


"""The tensor layout every reader must produce: Hugging Face names and shapes for a `ModelConfig`.

Readers check their result against this once, so that a corrupt or mismatched checkpoint fails at
load time with a readable message instead of as a shape error deep inside a forward pass.
"""
from __future__ import annotations

import torch

from quill.config import ModelConfig
from quill.errors import ModelLoadError


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor the architecture needs."""
    c = config
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q_dim, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv_dim, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv_dim, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q_dim),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
        if c.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q_dim,), p + "self_attn.k_proj.bias": (kv_dim,),
                       p + "self_attn.v_proj.bias": (kv_dim,)}
            if c.architecture != "qwen2":  # Qwen2 has biases on q/k/v only; the others on o_proj too
                shapes[p + "self_attn.o_proj.bias"] = (c.hidden_size,)
        if c.architecture == "gemma3":
            shapes |= {
                p + "pre_feedforward_layernorm.weight": (c.hidden_size,),
                p + "post_feedforward_layernorm.weight": (c.hidden_size,),
                p + "self_attn.q_norm.weight": (c.head_dim,),
                p + "self_attn.k_norm.weight": (c.head_dim,),
            }
    return shapes


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise ModelLoadError naming what is missing or misshapen; extra names are fine."""
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{source}: missing tensors {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {tuple(found[name])}, expected {shape} from the config"
            )


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Return exactly the tensors the architecture needs, or raise ModelLoadError. Extra tensors
    (e.g. old `rotary_emb.inv_freq` buffers, a tied `lm_head.weight`) are dropped."""
    expected = expected_shapes(config)
    check_shapes(expected, {name: tuple(tensor.shape) for name, tensor in tensors.items()}, source)
    return {name: tensors[name] for name in expected}

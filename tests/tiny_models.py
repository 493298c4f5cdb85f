"""Tiny random-weight Hugging Face models, built and saved by the tests themselves.

Each builder returns a saved directory (config.json + model.safetensors) that both
`transformers` (the reference) and Quill can load. Sizes are chosen to exercise the
interesting paths (GQA, several layers, Gemma 3's sliding/global mix) while staying fast.
"""
from __future__ import annotations

from pathlib import Path

import torch


def _save(model, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_llama(path: Path, *, seed: int = 0, rope_scaling: dict | None = None, tie: bool = False,
                vocab_size: int = 320) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {**rope, **rope_scaling}
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2,
    )
    return _save(LlamaForCausalLM(config).eval(), path)


def build_qwen2(path: Path, *, seed: int = 0, vocab_size: int = 320) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return _save(model, path)


def build_gemma3(path: Path, *, seed: int = 0, sliding_window: int = 8, softcap: bool = False,
                 vocab_size: int = 320, rope_scaling: dict | None = None) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        rms_norm_eps=1e-6, query_pre_attn_scalar=32, sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            # Gemma 3 4B and up scale the global layers' RoPE (linear, factor 8); local layers never.
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0, **(rope_scaling or {})},
        },
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        # Final-logit soft-capping (a small cap, so that it bites). Gemma 3 configs may also carry
        # attn_logit_softcapping, but the Gemma 3 graph (transformers and llama.cpp) ignores it.
        final_logit_softcapping=0.5 if softcap else None,
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # zero-initialised norms would hide a missing "1 +"
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)
    return _save(model, path)


def _perturb_norms(model, scale: float = 0.3) -> None:
    """Random-init norms are all ones (or zeros): perturb them, so that a norm Quill skipped or
    applied twice changes the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * scale)


def build_qwen3(path: Path, *, seed: int = 0) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # head_dim != hidden / heads, as in Qwen3
        max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    model = Qwen3ForCausalLM(config).eval()
    _perturb_norms(model)  # q/k norms included
    return _save(model, path)


def build_smollm3(path: Path, *, seed: int = 0) -> Path:
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(seed)
    config = SmolLM3Config(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=4,  # layer 3 without RoPE
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    assert config.no_rope_layers == [1, 1, 1, 0]
    model = SmolLM3ForCausalLM(config).eval()
    _perturb_norms(model)
    return _save(model, path)


def build_phi3(path: Path, *, seed: int = 0, sliding_window: int = 16) -> Path:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=sliding_window,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = Phi3ForCausalLM(config).eval()
    _perturb_norms(model)
    return _save(model, path)


def build_qwen3moe(path: Path, *, seed: int = 0, norm_topk_prob: bool = True) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = Qwen3MoeForCausalLM(config).eval()
    _perturb_norms(model)
    with torch.no_grad():  # a router far from uniform: tokens go to different experts, and no top-k ties
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return _save(model, path)


BUILDERS = {
    "llama": build_llama,
    "qwen2": build_qwen2,
    "gemma3": build_gemma3,
    "qwen3": build_qwen3,
    "smollm3": build_smollm3,
    "qwen3moe": build_qwen3moe,  # 8 experts, 2 per token
    "qwen3moe-unnormalized": lambda path: build_qwen3moe(path, norm_topk_prob=False),
    "phi3": build_phi3,  # fused qkv and gate/up; a sliding window shorter than the test prompts
    "gemma3-softcap": lambda path: build_gemma3(path, softcap=True),
    "gemma3-rope-linear": lambda path: build_gemma3(path, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    # max_position_embeddings is 256, so original_max_position_embeddings 64 puts the 24-token
    # test prompt's frequencies in all three llama3 bands (kept, smoothed, scaled).
    "llama-rope-llama3": lambda path: build_llama(path, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "llama-rope-linear": lambda path: build_llama(path, rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


# A chat template for the tiny tokenizer: plain "role: content" lines.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}")


def add_tiny_tokenizer(path: Path) -> Path:
    """Give a tiny model directory the tiny SentencePiece tokenizer (tokenizer_helpers.py) and a chat
    template, so that it loads as a text model from its path alone (e.g. in another process)."""
    import json

    from tokenizer_helpers import tiny_sentencepiece_metadata
    from quill.tokenizer import Tokenizer

    Tokenizer.from_gguf_metadata(tiny_sentencepiece_metadata()).backend.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TINY_CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path

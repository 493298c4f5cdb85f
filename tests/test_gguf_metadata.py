"""Model metadata in the GGUF files Quill writes, for every supported family and the settings that
change its output (context length, RoPE base and scaling, norm epsilon, head counts, sliding window,
soft-capping).

Three readings must agree with the Hugging Face config.json: the llama.cpp keys themselves (expected
values derived here from config.json, as llama.cpp's converter writes them), Quill's reader (the same
`ModelConfig` back), and transformers' GGUF reader. llama.cpp's own reading is checked by running the
files: benchmarks/gguf_llama_cpp_check.py.
"""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

import tiny_models
from quill.models.loader import load_checkpoint
from quill.models.registry import FAMILIES
from quill.weights.gguf import load_gguf, read_gguf_metadata
from quill.weights.gguf_export import write_gguf

VARIANTS = ["llama", "llama-rope-linear", "llama-rope-llama3", "qwen2", "gemma3", "gemma3-softcap", "gemma3-rope-linear"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """variant -> (config.json as a dict, the GGUF file written from its directory)."""
    made = {}

    def get(variant: str):
        if variant not in made:
            folder = tmp_path_factory.mktemp(variant)
            directory = tiny_models.BUILDERS[variant](folder / "hf")
            checkpoint = load_checkpoint(directory)
            write_gguf(folder / "model.gguf", FAMILIES.named(checkpoint.config.architecture), checkpoint.config, checkpoint.tensors)
            made[variant] = json.loads((directory / "config.json").read_text()), folder / "model.gguf"
        return made[variant]

    return get


def _rope(config: dict, layer_type: str = "full_attention") -> dict:
    params = config["rope_parameters"]
    return params.get(layer_type, params)


def expected_keys(config: dict) -> dict:
    """What llama.cpp's converter writes for this config.json (transformers 5 style)."""
    arch = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}[config["model_type"]]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = _rope(config)
    keys = {
        "context_length": config["max_position_embeddings"], "embedding_length": config["hidden_size"],
        "block_count": config["num_hidden_layers"], "feed_forward_length": config["intermediate_size"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"],
        "attention.key_length": head_dim, "attention.value_length": head_dim,
        "attention.layer_norm_rms_epsilon": float(str(np.float32(config["rms_norm_eps"]))),
        "rope.freq_base": rope["rope_theta"],
    }
    if arch == "llama":
        keys["rope.dimension_count"] = head_dim
    if rope.get("rope_type") == "linear":
        keys.update({"rope.scaling.type": "linear", "rope.scaling.factor": rope["factor"]})
    if arch == "gemma3":
        keys.update({
            "attention.sliding_window": config["sliding_window"],
            "attention.sliding_window_pattern": [kind == "sliding_attention" for kind in config["layer_types"]],
            "rope.freq_base_swa": _rope(config, "sliding_attention")["rope_theta"],
        })
        if config.get("final_logit_softcapping") is not None:
            keys["final_logit_softcapping"] = config["final_logit_softcapping"]
    return {f"{arch}.{key}": value for key, value in keys.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_cpp_keys_hold_the_config_values(written, variant):
    config, path = written(variant)
    metadata = read_gguf_metadata(path)
    expected = expected_keys(config)
    assert {key: metadata.get(key) for key in expected} == expected
    arch = metadata["general.architecture"]
    scaling_keys = {key for key in metadata if key.startswith(f"{arch}.rope.scaling.")}
    if variant != "llama-rope-llama3":
        assert scaling_keys <= set(expected)  # no scaling written that the config does not have


def test_llama3_rope_scaling_is_stored_as_llama_cpp_does(written):
    """llama.cpp has no llama3 scaling type: the converter stores each frequency's divisor in
    rope_freqs.weight. Compare with transformers' own llama3 frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config, path = written("llama-rope-llama3")
    hf_config = LlamaConfig(**config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    default = 1.0 / (_rope(config)["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    np.testing.assert_allclose(np.asarray(factors.data), (default / scaled).numpy(), rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_quill_reads_back_the_same_config(written, variant):
    config, path = written(variant)
    assert load_gguf(path, FAMILIES).config == load_checkpoint(path.parent / "hf").config


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_reads_the_config(written, variant):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config, path = written(variant)
    theirs = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    fields = ["max_position_embeddings", "hidden_size", "num_hidden_layers", "intermediate_size",
              "num_attention_heads", "num_key_value_heads"]
    fields += ["sliding_window", "head_dim"] if variant.startswith("gemma3") else []
    assert {f: theirs[f] for f in fields} == {f: config[f] for f in fields}
    assert theirs["rms_norm_eps"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    assert theirs["rope_theta"] == _rope(config)["rope_theta"]

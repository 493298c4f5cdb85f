"""Checkpoint readers and the GGUF writer, against transformers as the reference.

The tiny models are saved by transformers; Quill must read them back exactly, write them as GGUF
the way llama.cpp would (transformers' own GGUF loader is the judge), and read that GGUF back to
the same config and tensors. Damaged files must fail with ModelLoadError, never a raw traceback.
"""
from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import tiny_models
from quill.config import ModelConfig
from quill.errors import ModelLoadError, UnsupportedModelError
from quill.models.loader import load_checkpoint
from quill.models.registry import FAMILIES
from quill.weights.gguf import _read_header, load_gguf, read_gguf_metadata
from quill.weights.gguf_export import write_gguf
from quill.weights.safetensors import config_from_hf, load_hf_directory

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}  # small enough that some frequencies are smoothed
VARIANTS = ["llama", "llama3_rope", "llama_tied", "qwen2", "gemma3", "qwen3", "smollm3", "phi3", "qwen3moe"]
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def hf_dir(tiny_model_dir, tmp_path_factory):
    """variant name -> saved transformers directory."""
    extra = {
        "llama3_rope": lambda p: tiny_models.build_llama(p, rope_scaling=LLAMA3_SCALING),
        "llama_tied": lambda p: tiny_models.build_llama(p, tie=True),
    }
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in extra:
            return tiny_model_dir(variant)
        if variant not in built:
            built[variant] = extra[variant](tmp_path_factory.mktemp(variant))
        return built[variant]

    return get


def reference_state_dict(path: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, model.state_dict()


def assert_same_tensors(actual: dict, expected: dict, tied: bool, gemma: bool) -> None:
    """Exact equality, except Gemma norms: GGUF stores 1 + w in float32, so w comes back only within
    half an ulp of 1 + w (llama.cpp and transformers alike)."""
    names = set(expected) - ({"lm_head.weight"} if tied else set())
    assert set(actual) == names
    for name in names:
        if gemma and name.endswith("norm.weight"):
            torch.testing.assert_close(actual[name], expected[name], atol=1.2e-7, rtol=1.2e-7)
        else:
            assert torch.equal(actual[name], expected[name].float()), name


def as_transformers_runs_them(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 runs a layer's experts as two stacked parameters (`experts.gate_up_proj`, gate
    rows first, and `experts.down_proj`) while checkpoints, and so Quill's readers, hold them per
    expert: stack them the same way to compare. Other tensors pass through."""
    out, experts = {}, {}
    for name, tensor in tensors.items():
        match = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if match:
            experts.setdefault(match[1], {}).setdefault(match[3], {})[int(match[2])] = tensor
        else:
            out[name] = tensor
    for prefix, parts in experts.items():
        ids = sorted(parts["down_proj"])
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in ids])
        out[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in ids])
    return out


def write_variant(hf_dir, variant: str, tmp_path: Path, **kwargs) -> tuple[Path, object]:
    checkpoint = load_hf_directory(hf_dir(variant), FAMILIES)
    path = tmp_path / f"{variant}.gguf"
    write_gguf(path, FAMILIES.named(checkpoint.config.architecture), checkpoint.config, checkpoint.tensors, **kwargs)
    return path, checkpoint


# --- Hugging Face directories -------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_directory_matches_transformers(hf_dir, variant):
    checkpoint = load_hf_directory(hf_dir(variant), FAMILIES)
    _, expected = reference_state_dict(hf_dir(variant))
    config = checkpoint.config
    assert_same_tensors(as_transformers_runs_them(checkpoint.tensors), expected, config.tie_word_embeddings, gemma=False)
    assert all(t.dtype == torch.float32 for t in checkpoint.tensors.values())
    assert config.tie_word_embeddings == (variant in ("llama_tied", "qwen2", "gemma3", "qwen3", "smollm3"))
    assert config.attention_bias == (variant == "qwen2")
    if variant == "llama3_rope":
        assert config.rope_scaling == LLAMA3_SCALING
    if variant == "gemma3":
        assert config.layer_types == ("sliding", "sliding", "full", "sliding")
        assert (config.sliding_window, config.rope_theta, config.rope_local_theta) == (8, 1e6, 1e4)
        assert (config.head_dim, config.query_pre_attn_scalar, config.hidden_act) == (32, 32.0, "gelu_pytorch_tanh")


def test_transformers4_style_gemma3_config_gives_same_config(hf_dir):
    """Old-style keys (rope_theta, rope_local_base_freq, sliding_window_pattern) mean the same."""
    new = load_hf_directory(hf_dir("gemma3"), FAMILIES).metadata
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old |= {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"type": "linear", "factor": 8},
            "sliding_window_pattern": 3}
    config = config_from_hf(old, FAMILIES)
    assert config.layer_types == ("sliding", "sliding", "full", "sliding")
    assert (config.rope_theta, config.rope_local_theta) == (1e6, 1e4)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0}


def test_mistral_config_and_its_gguf_form(tmp_path):
    """Mistral keeps its sliding window from config.json; as GGUF it becomes "llama" without a
    window, exactly as llama.cpp converts it, with the tensors intact."""
    from transformers import MistralConfig

    raw = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, sliding_window=16).to_dict() | {"architectures": ["MistralForCausalLM"]}
    config = config_from_hf(raw, FAMILIES)
    assert (config.architecture, config.layer_types, config.sliding_window) == ("mistral", ("sliding",) * 2, 16)
    tensors = {name: torch.randn(shape) for name, shape in FAMILIES.named("mistral").hf_shapes(config).items()}
    write_gguf(tmp_path / "mistral.gguf", FAMILIES.named("mistral"), config, tensors)
    loaded = load_gguf(tmp_path / "mistral.gguf", FAMILIES)
    assert (loaded.config.architecture, loaded.config.sliding_window) == ("llama", None)
    assert all(torch.equal(loaded.tensors[name], tensor) for name, tensor in tensors.items())


def test_phi3_config_keeps_its_window_and_refuses_partial_rotary(hf_dir):
    raw = load_hf_directory(hf_dir("phi3"), FAMILIES).metadata
    config = config_from_hf(raw, FAMILIES)
    assert (config.architecture, config.sliding_window, config.layer_types) == ("phi3", 16, ("sliding",) * 3)
    partial = raw | {"rope_parameters": {**raw["rope_parameters"], "partial_rotary_factor": 0.75}}
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor=0.75"):
        config_from_hf(partial, FAMILIES)


def test_sharded_safetensors_directory(hf_dir, tmp_path):
    from safetensors.torch import save_file

    source = load_hf_directory(hf_dir("qwen2"), FAMILIES)
    names = list(source.tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: source.tensors[n].to(torch.bfloat16) for n in shard_names}, tmp_path / shard)
        weight_map |= dict.fromkeys(shard_names, shard)
    (tmp_path / "config.json").write_text((hf_dir("qwen2") / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(__import__("json").dumps({"weight_map": weight_map}))
    loaded = load_hf_directory(tmp_path, FAMILIES)
    for name in names:  # bf16 on disk, float32 in memory
        assert loaded.tensors[name].dtype == torch.float32
        assert torch.equal(loaded.tensors[name], source.tensors[name].to(torch.bfloat16).float())


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf_directory(tmp_path / "nope", FAMILIES)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_config_json(hf_dir, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((hf_dir("llama") / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_hf_directory(tmp_path, FAMILIES)


def test_pickle_only_directory_is_refused(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir("llama") / "config.json").read_text())
    marker = tmp_path / "unpickled"
    # A real malicious pickle: loading it would create `marker`.
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (tmp_path / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(ModelLoadError, match="refuses to load pickle"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_unsupported_hf_architecture(hf_dir, tmp_path):
    config = (hf_dir("llama") / "config.json").read_text().replace("LlamaForCausalLM", "MambaForCausalLM")
    (tmp_path / "config.json").write_text(config.replace('"model_type": "llama"', '"model_type": "mamba"'))
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        load_hf_directory(tmp_path, FAMILIES)


def test_hf_tensor_with_wrong_shape(hf_dir, tmp_path):
    from safetensors.torch import save_file

    tensors = load_hf_directory(hf_dir("llama"), FAMILIES).tensors
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((hf_dir("llama") / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"model.layers.1.mlp.up_proj.weight has shape \(3, 3\)"):
        load_hf_directory(tmp_path, FAMILIES)


# --- GGUF round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_names_are_llama_cpps(hf_dir, variant):
    """Every family's GGUF architecture and tensor names are those of llama.cpp's converter: its
    architecture list and its Hugging Face -> GGUF tensor name map, as gguf-py ships them."""
    config = load_hf_directory(hf_dir(variant), FAMILIES).config
    family = FAMILIES.named(config.architecture)
    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[family.gguf_architecture]
    names = gguf.get_tensor_name_map(arch, config.num_layers)
    for tensor in family.tensors(config):
        stacked = tensor.hf.replace(".{expert}.", ".")  # the converter names a layer's stacked experts so
        assert names.get_name(stacked, try_suffixes=(".weight", ".bias")) == tensor.gguf, tensor.hf


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_round_trip(hf_dir, variant, tmp_path):
    path, source = write_variant(hf_dir, variant, tmp_path)
    loaded = load_gguf(path, FAMILIES)
    assert loaded.config == source.config
    assert_same_tensors(loaded.tensors, source.tensors, tied=False, gemma=variant == "gemma3")
    assert ("rope_freqs.weight" in {n for n in _gguf_tensor_names(path)}) == (variant == "llama3_rope")


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "smollm3"])  # transformers reads no SmolLM3 GGUF
def test_transformers_reads_our_gguf(hf_dir, variant, tmp_path):
    """transformers' GGUF loader (undoing llama.cpp's permutation and norm shift its own way) gets
    the original state dict back, so the writer follows llama.cpp's conventions. (`from_pretrained`
    with gguf_file would need `accelerate`; this is the same loader without it.)"""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, source = write_variant(hf_dir, variant, tmp_path)
    model, expected = reference_state_dict(hf_dir(variant))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    assert_same_tensors(parsed["tensors"], expected, source.config.tie_word_embeddings, gemma=variant == "gemma3")
    hf_config, c = parsed["config"], source.config
    assert (hf_config["num_hidden_layers"], hf_config["hidden_size"], hf_config["num_attention_heads"],
            hf_config["num_key_value_heads"], hf_config["vocab_size"], hf_config["tie_word_embeddings"]) == \
        (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size, c.tie_word_embeddings)


def test_smollm3_layers_without_rope_in_gguf(hf_dir, tmp_path):
    """llama.cpp leaves RoPE out of every fourth SmolLM3 layer and reads no key for it: that is the
    pattern a GGUF file gives back, and the writer refuses any other."""
    path, source = write_variant(hf_dir, "smollm3", tmp_path)
    assert load_gguf(path, FAMILIES).config.rope_layers == (True, True, True, False) == source.config.rope_layers
    other = dataclasses.replace(source.config, rope_layers=(True, False, True, True))
    with pytest.raises(UnsupportedModelError, match="every 4th"):
        write_gguf(tmp_path / "other.gguf", FAMILIES.named("smollm3"), other, source.tensors)


def test_gguf_f16_keeps_vectors_in_f32(hf_dir, tmp_path):
    path, source = write_variant(hf_dir, "qwen2", tmp_path, dtype="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == Q.F16 and types["blk.0.attn_q.bias"] == Q.F32
    loaded = load_gguf(path, FAMILIES).tensors
    for name, tensor in source.tensors.items():
        expected = tensor.half().float() if tensor.ndim == 2 else tensor
        assert torch.equal(loaded[name], expected), name


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_tensor_type_hook_and_dequantization(hf_dir, tmp_path, qtype):
    """Every matrix in `qtype` (blocks of 32 fit the tiny widths); each must read back as exactly
    what gguf-py's dequantizer makes of gguf-py's quantization, in the right layout."""
    hook = lambda name, values: qtype if values.ndim == 2 else Q.F32  # noqa: E731
    path, source = write_variant(hf_dir, "qwen2", tmp_path, tensor_type=hook)
    loaded = load_gguf(path, FAMILIES).tensors
    for name, tensor in source.tensors.items():
        values = tensor.numpy()
        expected = gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype) if tensor.ndim == 2 else values
        assert np.array_equal(loaded[name].numpy(), expected.reshape(values.shape)), name
    assert not torch.equal(loaded["model.embed_tokens.weight"], source.tensors["model.embed_tokens.weight"])


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0], ids=lambda q: q.name)
def test_k_quant_layout(tmp_path, qtype):
    """gguf-py cannot quantize K-quants, so store random blocks (rows of 256) and compare with
    gguf-py's dequantization of the same bytes: this checks the row/shape handling."""
    config = ModelConfig(architecture="qwen2", vocab_size=16, hidden_size=256, intermediate_size=512, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=64,
                         rope_theta=1e4, attention_bias=True)
    tensors = {n: torch.randn(s) for n, s in FAMILIES.named("qwen2").hf_shapes(config).items()}
    write_gguf(tmp_path / "f32.gguf", FAMILIES.named("qwen2"), config, tensors)
    rng = np.random.default_rng(0)
    # bytes below 64 keep every float16 scale finite (its exponent bits lie in the high byte)
    raw = rng.integers(0, 64, gguf.quants.quant_shape_to_byte_shape((512, 256), qtype), dtype=np.uint8)
    _rewrite(tmp_path / "f32.gguf", tmp_path / "q.gguf", replace={"blk.0.ffn_up.weight": (raw, qtype)})
    loaded = load_gguf(tmp_path / "q.gguf", FAMILIES).tensors["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_array_equal(loaded.numpy(), gguf.quants.dequantize(raw, qtype))


def test_tokenizer_metadata_is_written_with_llama_cpp_types(hf_dir, tmp_path):
    tokenizer = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "▁hi", "é"],
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.5, -2.25],
        "tokenizer.ggml.token_type": [2, 3, 3, 1, 1],
        "tokenizer.ggml.merges": ["▁ h", "h i"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ messages }}",
    }
    path, _ = write_variant(hf_dir, "llama", tmp_path, tokenizer_metadata=tokenizer)
    metadata = read_gguf_metadata(path)
    assert {k: metadata[k] for k in tokenizer} == tokenizer
    fields = gguf.GGUFReader(path).fields
    V = gguf.GGUFValueType
    assert fields["tokenizer.ggml.token_type"].types == [V.ARRAY, V.INT32]
    assert fields["tokenizer.ggml.scores"].types == [V.ARRAY, V.FLOAT32]
    assert fields["tokenizer.ggml.tokens"].types == [V.ARRAY, V.STRING]
    assert fields["tokenizer.ggml.bos_token_id"].types == [V.UINT32]
    assert fields["tokenizer.ggml.add_bos_token"].types == [V.BOOL]


def test_read_gguf_metadata_matches_gguf_reader(hf_dir, tmp_path):
    path, _ = write_variant(hf_dir, "gemma3", tmp_path)
    ours = read_gguf_metadata(path)
    reference = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, float):  # we return float32 values as their shortest decimal
            assert np.float32(ours[key]) == np.float32(value), key
        else:
            assert ours[key] == value, key
    assert ours["gemma3.attention.layer_norm_rms_epsilon"] == 1e-6


# --- damaged and unsupported GGUF files ---------------------------------------------------------

def test_truncated_gguf(hf_dir, tmp_path):
    path, _ = write_variant(hf_dir, "llama", tmp_path)
    data = path.read_bytes()
    header_end = min(t.data_offset for t in gguf.GGUFReader(path).tensors)
    for cut in (0, 3, 10, 30, 200, header_end // 2, header_end - 1, header_end + 100, len(data) // 2, len(data) - 1):
        damaged = tmp_path / f"cut{cut}.gguf"
        damaged.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=f"cut{cut}.gguf") as info:
            load_gguf(damaged, FAMILIES)
        assert type(info.value) is ModelLoadError, (cut, info.value)
        if cut > header_end:
            assert "truncated" in str(info.value)


def test_random_bytes_are_not_gguf(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "noise.gguf"
    path.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    with pytest.raises(ModelLoadError, match="noise.gguf is not a GGUF file"):
        load_gguf(path, FAMILIES)


def test_corrupted_header_bytes_give_model_load_error(hf_dir, tmp_path):
    """Flip bytes anywhere in the header: the result either loads or raises ModelLoadError."""
    path, _ = write_variant(hf_dir, "llama", tmp_path)
    data = path.read_bytes()
    header_end = min(t.data_offset for t in gguf.GGUFReader(path).tensors)
    rng = random.Random(1)
    damaged = tmp_path / "damaged.gguf"
    for _ in range(150):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(4, header_end)] = rng.randrange(256)
        damaged.write_bytes(corrupt)
        try:
            load_gguf(damaged, FAMILIES)
        except ModelLoadError:
            pass


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(UnsupportedModelError, match=r"'mamba' is not supported; supported: llama, qwen2, gemma3"):
        load_gguf(tmp_path / "mamba.gguf", FAMILIES)


def test_unsupported_tensor_type(hf_dir, tmp_path):
    path, _ = write_variant(hf_dir, "llama", tmp_path)
    _rewrite(path, tmp_path / "i32.gguf", replace={"blk.1.ffn_up.weight": (np.zeros((160, 64), np.int32), Q.I32)})
    with pytest.raises(UnsupportedModelError, match="blk.1.ffn_up.weight has type I32"):
        load_gguf(tmp_path / "i32.gguf", FAMILIES)
    # A type id that GGML does not define at all (patched into the tensor info).
    data = bytearray(path.read_bytes())
    name = b"blk.1.ffn_up.weight"
    type_at = data.index(name) + len(name) + 4 + 2 * 8  # after n_dims and two dims
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    (tmp_path / "type99.gguf").write_bytes(data)
    with pytest.raises(UnsupportedModelError, match="blk.1.ffn_up.weight has unknown GGML type 99"):
        load_gguf(tmp_path / "type99.gguf", FAMILIES)


def test_missing_and_misshapen_gguf_tensors(hf_dir, tmp_path):
    path, _ = write_variant(hf_dir, "llama", tmp_path)
    _rewrite(path, tmp_path / "missing.gguf", drop={"blk.2.attn_v.weight"})
    with pytest.raises(ModelLoadError, match="missing.gguf: missing tensors blk.2.attn_v.weight"):
        load_gguf(tmp_path / "missing.gguf", FAMILIES)
    _rewrite(path, tmp_path / "shape.gguf", replace={"blk.0.ffn_down.weight": (np.zeros((64, 32), np.float32), Q.F32)})
    with pytest.raises(ModelLoadError, match=r"blk.0.ffn_down.weight has shape \(64, 32\), expected \(64, 160\)"):
        load_gguf(tmp_path / "shape.gguf", FAMILIES)


# --- real models --------------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_smollm2(smollm2_gguf):
    checkpoint = load_gguf(smollm2_gguf, FAMILIES)
    c = checkpoint.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == \
        ("llama", 30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and "lm_head.weight" not in checkpoint.tensors
    assert (c.head_dim, c.intermediate_size, c.rope_theta, c.rms_norm_eps) == (64, 1536, 100000.0, 1e-5)
    assert checkpoint.metadata["tokenizer.ggml.model"] == "gpt2"


@pytest.mark.real_model
def test_real_smollm2_matches_transformers_gguf_loader(smollm2_gguf):
    """Q4_1 dequantization plus un-permutation of q/k equal transformers' own GGUF loading."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)["tensors"]
    ours = load_gguf(smollm2_gguf, FAMILIES).tensors
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(ours[name], expected[name], atol=1e-6, rtol=0)
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, _permute_for_llama_cpp(q, 9))  # the (un)permutation is not a no-op here


@pytest.mark.real_model
def test_real_gemma3(gemma3_gguf):
    checkpoint = load_gguf(gemma3_gguf, FAMILIES)
    c = checkpoint.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads) == \
        ("gemma3", 18, 640, 256, 4, 1)
    assert c.sliding_window == 512
    assert [i for i, kind in enumerate(c.layer_types) if kind == "full"] == [5, 11, 17]
    assert (c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
    assert c.vocab_size == 262144 and c.tie_word_embeddings and c.hidden_act == "gelu_pytorch_tanh"
    # Norms come back in HF convention: the file stores 1 + w (read here straight from its bytes).
    info = _read_header(gemma3_gguf)[1]["output_norm.weight"]
    stored = np.fromfile(gemma3_gguf, np.float32, count=640, offset=info.offset)
    assert torch.equal(checkpoint.tensors["model.norm.weight"], torch.from_numpy(stored) - 1)


# --- helpers ------------------------------------------------------------------------------------

def _gguf_tensor_names(path: Path) -> list[str]:
    return [t.name for t in gguf.GGUFReader(path).tensors]


def _permute_for_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def _rewrite(source: Path, target: Path, replace: dict | None = None, drop: set | None = None) -> None:
    """Copy a GGUF file, swapping some tensors for (raw numpy data, GGML type) or dropping them."""
    replace, drop = replace or {}, drop or set()
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name not in drop:
            data, qtype = replace.get(tensor.name, (tensor.data, tensor.tensor_type))
            writer.add_tensor(tensor.name, data, raw_dtype=qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()

"""GGUF writer: the exact inverse of `load_gguf`, following llama.cpp's converter conventions as
the checkpoint's `ModelFamily` declares them (tensor names, stacked experts, permuted q/k rows,
shifted norms, metadata keys), so that llama.cpp and transformers can read what Quill writes. Used
by the tests and by `quill quantize`, whose int4/int8 weights are written in Quill's own tensor
format (see `gguf_quant.py`). A file for users must carry its tokenizer: pass
`quill.optimize.gguf_tokenizer.checkpoint_tokenizer(checkpoint).metadata`.

What GGUF cannot say is dropped where llama.cpp drops it too (Mistral is written as "llama" and
loses its sliding window), and refused by the family's `gguf_metadata` otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch

from quill.config import ModelConfig
from quill.errors import UnsupportedModelError
from quill.weights.family import ModelFamily
from quill.weights.gguf import OUTPUT_TOKEN_IDS_KEY, llama3_rope_factors
from quill.weights.gguf_quant import CODES, OFFSETS, SCALES
from quill.weights.layout import check_tensors
from quill.weights.quantized import QuantizedWeight

# Chooses how one tensor is stored from its GGUF name and float32 values (already in GGUF layout):
# a GGML type (gguf-py quantizes), or the values already quantized in Quill's int4/int8 format.
TensorTypeHook = Callable[[str, np.ndarray], "gguf.GGMLQuantizationType | QuantizedWeight"]

_TOKENIZER_ARRAY_TYPES = {  # what llama.cpp expects; other arrays get their type from their items
    "tokenizer.ggml.token_type": gguf.GGUFValueType.INT32,
    "tokenizer.ggml.scores": gguf.GGUFValueType.FLOAT32,
}


def float_tensor_types(dtype: str) -> TensorTypeHook:
    """llama.cpp's policy for float files: matrices in `dtype`, vectors (norms, biases) in F32."""
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    matrix_type = gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.F32
    return lambda name, values: matrix_type if values.ndim == 2 else gguf.GGMLQuantizationType.F32


def write_gguf(
    path: str | Path,
    family: ModelFamily,
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    tokenizer_metadata: dict[str, Any] | None = None,
    dtype: str = "f32",
    tensor_type: TensorTypeHook | None = None,
) -> None:
    """Write a checkpoint of `family` (Hugging Face names and conventions) as a GGUF file.

    `tokenizer_metadata` holds `tokenizer.*` keys (as `read_gguf_metadata` returns them) to copy
    over. `tensor_type` overrides `dtype` per tensor: any type `gguf.quants.quantize` supports, or
    a `QuantizedWeight` of Quill's int4/int8 format (one format per file, as its metadata says).
    A tensor stacking a layer's experts is shown to it as one matrix of all their rows: rows are
    quantized independently, so that is the same as quantizing each expert.
    """
    if family.name != config.architecture:
        raise ValueError(f"a {config.architecture} config cannot be written as {family.name}")
    tensors = check_tensors(family.hf_shapes(config), tensors, "write_gguf")
    choose_type = tensor_type or float_tensor_types(dtype)

    writer = gguf.GGUFWriter(str(path), family.gguf_architecture)
    _add_model_metadata(writer, family, config)
    for key, value in (tokenizer_metadata or {}).items():
        _add_tokenizer_value(writer, key, value)

    if config.rope_scaling and config.rope_scaling["rope_type"] == "llama3":
        # llama.cpp has no llama3 scaling type: it stores the per-frequency divisors as a tensor.
        factors = llama3_rope_factors(config.head_dim, config.rope_theta, config.rope_scaling)
        writer.add_tensor("rope_freqs.weight", factors, raw_dtype=gguf.GGMLQuantizationType.F32)
    quill_formats = set()
    for spec in family.tensors(config):
        values = np.stack([family.to_gguf(name, tensors[name].detach().to("cpu", torch.float32).numpy(), config)
                           for name in spec.hf_names]) if spec.experts else \
            family.to_gguf(spec.hf, tensors[spec.hf].detach().to("cpu", torch.float32).numpy(), config)
        rows = values.reshape(-1, values.shape[-1]) if values.ndim > 2 else values
        qtype = choose_type(spec.gguf, rows)
        if isinstance(qtype, QuantizedWeight):
            quill_formats.add((qtype.source, qtype.group_size if qtype.bits == 4 else None))
            for suffix, array in _quill_tensor_arrays(qtype).items():
                writer.add_tensor(spec.gguf + suffix, array.reshape(*values.shape[:-1], -1))
        else:
            stored = gguf.quants.quantize(rows, qtype)
            writer.add_tensor(spec.gguf, stored.reshape(*values.shape[:-1], -1), raw_dtype=qtype)
    if quill_formats:
        _add_quill_quantization(writer, quill_formats)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quill_tensor_arrays(weight: QuantizedWeight) -> dict[str, np.ndarray]:
    """The inverse of `gguf_quant.quill_quantized`: codes as I8 (int8: code - 128; int4: two codes a
    byte, low nibble first), scales and offsets as F32."""
    codes = weight.codes.numpy()
    if weight.source == "int8" and weight.bits == 8:
        stored = codes ^ 0x80  # code - 128 in two's complement
    elif weight.source == "int4" and weight.bits == 4:
        stored = codes[:, 0::2] | (codes[:, 1::2] << 4)
    else:
        raise ValueError(f"cannot write a {weight.bits}-bit {weight.source} weight in Quill's format")
    return {CODES: stored.astype(np.uint8).view(np.int8), SCALES: weight.scales.numpy().astype(np.float32),
            OFFSETS: weight.offsets.numpy().astype(np.float32)}


def _add_quill_quantization(writer: gguf.GGUFWriter, formats: set[tuple[str, int | None]]) -> None:
    if len(formats) > 1:
        raise ValueError(f"one GGUF file holds one Quill quantization format, got {sorted(formats, key=str)}")
    (qtype, group_size), = formats
    writer.add_string("quill.quantization.type", qtype)
    if group_size is not None:  # int8 has one group per output row, whatever its width
        writer.add_uint32("quill.quantization.group_size", group_size)


def _add_model_metadata(writer: gguf.GGUFWriter, family: ModelFamily, config: ModelConfig) -> None:
    c = config
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_vocab_size(c.vocab_size)
    for key, value in family.gguf_metadata(config).items():
        _add_model_value(writer, f"{family.gguf_architecture}.{key}", value)
    if c.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    if c.output_token_ids:  # Quill's own key: llama.cpp cannot read an LM head narrower than the vocabulary
        writer.add_array(OUTPUT_TOKEN_IDS_KEY, list(c.output_token_ids))
    _add_rope_scaling(writer, family, config)


# How a family's metadata value is stored, by its Python type (bool before int: a bool is an int),
# as llama.cpp's converter stores such keys.
_MODEL_VALUE_WRITERS = ((bool, "add_bool"), (int, "add_uint32"), (float, "add_float32"), (str, "add_string"),
                        (list, "add_array"))


def _add_model_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    for kind, method in _MODEL_VALUE_WRITERS:
        if isinstance(value, kind):
            getattr(writer, method)(key, value)
            return
    raise ValueError(f"cannot write model metadata {key!r} of type {type(value).__name__}")


def _add_rope_scaling(writer: gguf.GGUFWriter, family: ModelFamily, config: ModelConfig) -> None:
    scaling = config.rope_scaling
    if not scaling:
        return
    kind = scaling["rope_type"]
    if kind == "llama3":
        if (scaling["low_freq_factor"], scaling["high_freq_factor"]) != (1.0, 4.0):
            # the reader recovers these only up to their ratio to the original context (see gguf.py)
            raise UnsupportedModelError("GGUF stores Llama 3 RoPE scaling only with low/high frequency factors 1 and 4")
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    elif kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    else:
        raise UnsupportedModelError(f"cannot write RoPE scaling {kind!r} for {family.name} as GGUF")


def _add_tokenizer_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if not key.startswith("tokenizer."):
        raise ValueError(f"tokenizer metadata key {key!r} does not start with 'tokenizer.'")
    value_type = gguf.GGUFValueType
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            return  # GGUF cannot store an empty array; readers treat an absent key the same way
        first = value[0]
        item_type = _TOKENIZER_ARRAY_TYPES.get(key) or (
            value_type.STRING if isinstance(first, str) else value_type.BOOL if isinstance(first, bool)
            else value_type.INT32 if isinstance(first, int) else value_type.FLOAT32
        )
        writer.add_key_value(key, list(value), value_type.ARRAY, sub_type=item_type)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)  # token ids
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_key_value(key, value, value_type.STRING)  # add_string would drop "" silently
    else:
        raise ValueError(f"cannot write tokenizer metadata {key!r} of type {type(value).__name__}")

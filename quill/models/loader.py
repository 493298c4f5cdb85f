"""From a model name or path to a running network: resolve it, read the checkpoint, build the
family's module with the checkpoint's tensors (quantized ones as native quantized layers), and
load the tokenizer. `load_model_and_tokenizer` is the one call the Python API, the draft model
and `quill eval` make.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from torch import nn

from quill.config import ModelConfig
from quill.errors import ModelLoadError
from quill.hardware import return_freed_memory_to_os
from quill.layers.embedding import Q8Table, RowsEmbedding
from quill.layers.linear import Linear
from quill.layers.logits import TableHead, int8_lm_head
from quill.layers.matmul import kernel_available
from quill.layers.quantized import quantized_linear
from quill.models.registry import FAMILIES
from quill.tokenizer import Tokenizer, load_tokenizer
from quill.weights import read_checkpoint
from quill.weights.checkpoint import Checkpoint
from quill.weights.hub import resolve_model
from quill.weights.quantized import DeferredWeight, GGMLFileRows, GGMLRows, QuantizedWeight

log = logging.getLogger("quill")

# Hugging Face projections that Quill fuses into one matmul: hf name -> (fused name, shard index).
# Checkpoints that store them fused already (Phi-3) use the fused names and pass through.
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


@dataclass
class LoadedModel:
    path: Path  # the checkpoint the name resolved to
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer | None  # None when not asked for


def load_model_and_tokenizer(model: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu", *,
                             dequantize: bool = False, tokenizer: bool = True) -> LoadedModel:
    """`model` (a .gguf file, a Hugging Face directory, or a known name, pulled on first use) on
    `device`, with its tokenizer unless `tokenizer` is False. See `load_model` for `dequantize`.

    The tokenizer comes first: building a large vocabulary (Gemma 3's 262,144 pieces and 515,000
    merges) briefly takes more memory than it keeps, and that peak is lower in a process that does
    not hold the model yet. Gemma 3's `LLM()` peaked at 770 MB for 657 held once it had generated
    with the tokenizer last, and 677 with it first; SmolLM2's peak stays what generating reaches
    (399 MB), its load's rising from 387 to 398. Measured on AMD EPYC."""
    path = resolve_model(model)
    built_tokenizer = load_tokenizer(path) if tokenizer else None
    network, config = load_model(path, dtype, device, dequantize=dequantize)
    return LoadedModel(path, network, config, built_tokenizer)


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, *, keep_quantized: bool = False,
                    defer_unpacking: bool = False) -> Checkpoint:
    """A checkpoint of any family Quill runs (see `quill.weights.read_checkpoint`)."""
    return read_checkpoint(path, FAMILIES, dtype, keep_quantized=keep_quantized, defer_unpacking=defer_unpacking)


def load_model(path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu", *,
               dequantize: bool = False) -> tuple[nn.Module, ModelConfig]:
    """A checkpoint's network on `device`, and its config. Quantized GGUF weights stay quantized
    and run through the CPU kernels, unless `dequantize` expands them to `dtype` (the reference
    path) or the device is a GPU, where bf16 weights are what its matmuls want."""
    device = torch.device(device)
    native = not dequantize and device.type == "cpu"
    checkpoint = load_checkpoint(path, dtype, keep_quantized=native, defer_unpacking=native)
    network = build_model(checkpoint.config, checkpoint.tensors, dtype, consume=True).to(device)
    config = checkpoint.config
    del checkpoint  # the tensors now live in the network; drop the loader's references
    return_freed_memory_to_os()
    return network, config


def build_model(config: ModelConfig, tensors: dict, dtype: torch.dtype = torch.float32, *,
                consume: bool = False) -> nn.Module:
    """Instantiate the family's module and fill it with checkpoint tensors (Hugging Face names).
    `QuantizedWeight`s become native quantized layers where a kernel takes their format.

    With `consume`, `tensors` is emptied as the model takes them, so that each quantized weight's
    codes are freed as soon as its layer has packed them, not at the end. With this, weights
    unpacked one layer at a time (`DeferredWeight`), chunked packing (`layers/matmul.pack_pairs`),
    the embedding table kept in its file's blocks and a tied Q8_0 head multiplying by the table's
    own packed rows (`layers/embedding.Q8Table`), glibc's heap trimmed between the layers and the
    head, and no torch._dynamo import (`layers/embedding.token_embedding`), `LLM("smollm2")` peaks
    at 398 MB for a process that then holds 363 (446 for 392 before the first two, 697 for 490
    before all of them); Gemma 3 270M Q4_K_M's at 677 for 612 (1,018 for 780, and 1,723 for
    1,097 at first). Measured on AMD EPYC."""
    family = FAMILIES.named(config.architecture)
    with torch.device("meta"):
        model = family.module(config)
    params = _quill_tensors(tensors.copy() if not consume else tensors, config.tie_word_embeddings)
    native = _install_quantized_layers(model, params, dtype)
    return_freed_memory_to_os()  # the layers' transient codes, before the head adds its own
    native += _install_embedding_rows(model, params, config)
    expected = {name for name, _ in model.named_parameters()}  # tied lm_head appears once, as embed_tokens
    missing = sorted(expected - params.keys())
    unexpected = sorted(params.keys() - expected - {"lm_head.weight"})
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint does not match the {config.architecture} architecture: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in params.items() if k in expected}, strict=False, assign=True)
    if config.tie_word_embeddings and isinstance(model.lm_head, Linear):
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared parameter
    if native and isinstance(model.lm_head, Linear):
        # A quantized model's biggest matrix is often its float head (the tied embedding table):
        # read it through the int8 kernel too, at half the bytes of bf16 (see layers/logits.py).
        model.lm_head = int8_lm_head(model.lm_head.weight)
        log.info("LM head runs through the int8 kernel (top candidates recomputed from %s)",
                 str(dtype).removeprefix("torch."))
    return model.eval().requires_grad_(False)


def _install_embedding_rows(model: nn.Module, params: dict, config: ModelConfig) -> int:
    """An embedding table kept in its file's blocks (`GGMLRows`, or `GGMLFileRows` still in the
    file) becomes a `RowsEmbedding`. A head tied to a Q8_0 one multiplies by the table's packed rows
    (`Q8Table`); one tied to another format runs through the int8 kernel, its top candidates
    recomputed from those rows.
    Returns the number of layers that run natively."""
    table = params.get("embed_tokens.weight")
    if not isinstance(table, (GGMLRows, GGMLFileRows)):
        return 0
    del params["embed_tokens.weight"]
    tied = config.tie_word_embeddings
    if tied and kernel_available() and Q8Table.takes(table):
        # One packed copy for both: the head multiplies by the table's own rows.
        shared = Q8Table(table)
        model.embed_tokens, model.lm_head = RowsEmbedding(shared), TableHead(shared)
        log.info("LM head runs through the q8_0 kernel on the embedding table's own packed rows")
        return 1
    if isinstance(table, GGMLFileRows):
        table = table.load()
    model.embed_tokens = RowsEmbedding(table)
    if not tied:
        return 0
    model.lm_head = int8_lm_head(table)
    log.info("LM head runs through the int8 kernel (top candidates recomputed from the file's %s rows)",
             gguf.GGMLQuantizationType(table.qtype).name)
    return 1


def _install_quantized_layers(model: nn.Module, params: dict, dtype: torch.dtype) -> int:
    """Swap in a quantized layer for each `QuantizedWeight` (in place of the meta `Linear`); a
    format with no kernel is expanded to `dtype`, and the load log says which and how many.
    Returns the number of layers that run natively."""
    native, expanded = Counter(), Counter()
    for name in [name for name, value in params.items() if isinstance(value, (QuantizedWeight, DeferredWeight))]:
        weight = params[name]
        if isinstance(weight, DeferredWeight):
            weight = params[name] = weight.load()  # one layer unpacked at a time
            if not isinstance(weight, QuantizedWeight):
                continue  # shards of different groups, fused as floats (`_concat`)
        layer_name = name.removesuffix(".weight")
        bias = params.get(layer_name + ".bias")
        layer = quantized_linear(weight, None if bias is None else bias.to(dtype))
        if layer is None:
            params[name] = weight.dequantize(dtype)
            expanded[weight.source] += 1
        else:
            del params[name]
            model.set_submodule(layer_name, layer)
            native[f"{weight.source} as {type(layer).__name__}"] += 1
    if native or expanded:
        log.info("quantized weights: %s run natively; %s have no native kernel and were expanded to %s",
                 _counts(native), _counts(expanded), str(dtype).removeprefix("torch."))
    return sum(native.values())


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {what}" for what, n in sorted(counter.items())) or "none"


def _quill_tensors(tensors: dict, tied: bool) -> dict:
    """Rename Hugging Face tensors to Quill's module names, fusing q/k/v and gate/up. Empties
    `tensors`, and drops each fused layer's shards once fused, so that no weight is held twice."""
    out: dict[str, torch.Tensor] = {}
    shards: dict[str, dict[int, torch.Tensor]] = {}
    while tensors:
        name, tensor = tensors.popitem()
        if tied and name == "lm_head.weight":
            continue
        name = name.removeprefix("model.")
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED:
            fused, index = _FUSED[parts[-2]]
            shards.setdefault(".".join(parts[:-2] + [fused, parts[-1]]), {})[index] = tensor
        else:
            out[name] = tensor
    while shards:
        name, pieces = shards.popitem()
        out[name] = _concat([pieces.pop(i) for i in sorted(pieces)])
    return out


def _concat(parts: list) -> torch.Tensor | QuantizedWeight | DeferredWeight:
    """Fuse shards along the output dimension; quantized shards stay quantized when they share a
    format, and are expanded (then fused as floats) when they do not. Deferred shards are fused
    when loaded."""
    if any(isinstance(p, DeferredWeight) for p in parts):
        return DeferredWeight.concat(parts, _concat)
    if all(isinstance(p, QuantizedWeight) for p in parts):
        fused = QuantizedWeight.concat(parts)
        if fused is not None:
            return fused
    return torch.cat([p.dequantize() if isinstance(p, QuantizedWeight) else p for p in parts])

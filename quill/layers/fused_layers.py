"""A CPU step's decoder layers in one C call (`quill/kernels/decoder.c`).

Between its kernels, a decoding step of SmolLM2 spends about 40 PyTorch operations and ctypes
calls per layer (views, conversions, splits, residual adds): 5-6 ms of a 13 ms step on 2 cores.
`FusedLayers` describes every layer once, as the C structs below, and runs a step's rows
through all of them in one call. It is the same computation, not an approximation: the C file
calls the kernels the modules call and rounds between them as PyTorch does, and
`tests/test_fused_layers.py` checks both paths bit for bit.

A model qualifies (`FusedLayers.build`, called through the model's `fuse_layers`) when every
layer is of the one class decoder.c reproduces (`LlamaDecoderLayer`, `Gemma3DecoderLayer`: each
names its norms in `fused_norms`) with a `GatedMLP`, its matrices run through the packed kernel on
bfloat16 activations, its norms are bfloat16 kernels sharing one epsilon, and its attention reads
the cache through the C kernel. Anything else (experts, tensor-parallel shards, float32 models, no
C compiler) keeps the module path.
A step qualifies (`takes`) when every row is a single-query row, which on the CPU is every step.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from quill import kernels
from quill.layers.attention import KERNEL_CACHE_TYPES, AttentionMetadata, PagedAttention
from quill.layers.matmul import PackedMatmul
from quill.layers.mlp import KERNEL_ACTIVATIONS, GatedMLP
from quill.layers.norm import RMSNorm
from quill.layers.rotary import RotaryEmbedding

_POINTER = ctypes.c_void_p
_MAX_ROTARIES = 2  # `step_t`'s tables: one per distinct RotaryEmbedding
# Rows a step sends through all the layers at once (decoder.c's `decoder_layers`), which bounds
# the workspace a thread keeps: the default step (512 tokens) in two passes. Against one pass
# (AMD EPYC, 512-token prompts, alternating runs): resident memory after a prompt 5 MB less for
# SmolLM2 (383-387 against 388-393 MB) and 10 less for Gemma 3 (632 against 641-643), prefill
# rates within noise (SmolLM2 1,571-1,641 against 1,375-1,604 tokens/s, Gemma 3 1,428-1,442
# against 1,401-1,463). 128 rows saved 5 MB more and cost Gemma 3 5% of its prefill, each pass
# reading its weights again.
ROWS_PER_PASS = 256


class _Layer(ctypes.Structure):
    """decoder.c's `layer_t`."""

    _fields_ = [("attention_norm", _POINTER), ("mlp_norm", _POINTER), ("attention_out_norm", _POINTER),
                ("mlp_out_norm", _POINTER), ("q_norm", _POINTER), ("k_norm", _POINTER),
                ("norm_offset", ctypes.c_float), ("head_norm_offset", ctypes.c_float), ("eps", ctypes.c_float),
                ("qkv", _POINTER), ("o", _POINTER), ("gate_up", _POINTER),
                ("down", _POINTER), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("intermediate", ctypes.c_int), ("activation", ctypes.c_int), ("rope", ctypes.c_int),
                ("k_cache", _POINTER), ("v_cache", _POINTER), ("cache_type", ctypes.c_int), ("window", ctypes.c_int),
                ("num_slots", ctypes.c_int64), ("scale", ctypes.c_float)]


class _Step(ctypes.Structure):
    """decoder.c's `step_t`."""

    _fields_ = [("rows", ctypes.c_int), ("slots", _POINTER), ("block_tables", _POINTER),
                ("max_blocks", ctypes.c_int), ("context_lens", _POINTER), ("block_size", ctypes.c_int),
                ("cos", _POINTER * _MAX_ROTARIES), ("signed_sin", _POINTER * _MAX_ROTARIES),
                ("table_width", ctypes.c_int), ("rows_per_pass", ctypes.c_int)]


def _kernel():
    pointer = kernels.POINTER
    return kernels.function("decoder_layers", [pointer, kernels.INT32, pointer, pointer, kernels.INT32],
                            restype=kernels.INT32, source="decoder")


class FusedLayers:
    """The layers of a qualifying model, described for decoder.c; called with a step's rows."""

    def __init__(self, layers: nn.ModuleList, rotaries: list[RotaryEmbedding], hidden_size: int, kernel) -> None:
        self.rotaries, self.hidden_size, self._kernel = rotaries, hidden_size, kernel
        self.rows_per_pass = ROWS_PER_PASS
        self._layers = (_Layer * len(layers))(*(self._describe(layer) for layer in layers))
        self._modules = layers  # what the structs point into stays alive with them

    @classmethod
    def build(cls, layers: nn.ModuleList, layer_type: type, hidden_size: int) -> FusedLayers | None:
        """The fused form of `layers` (once the caches are bound and the matrices packed), or None
        where they do not qualify (see the module docstring). `layer_type`: the one layer class
        whose forward decoder.c reproduces (the models import the layers, not the reverse)."""
        if not layers or not all(type(layer) is layer_type and _qualifies(layer) for layer in layers):
            return None
        norms = [norm for layer in layers for norm in layer.fused_norms() if norm is not None]
        head_norms = [norm for layer in layers for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm)
                      if norm is not None]
        if (len({(norm.eps, norm.weight_offset) for norm in norms}) != 1
                or len({norm.weight_offset for norm in head_norms}) > 1
                or any(norm.eps != norms[0].eps for norm in head_norms)):
            return None
        rotaries = list(dict.fromkeys(layer.self_attn.rotary for layer in layers if layer.self_attn.rotary))
        kernel = _kernel()
        if len(rotaries) > _MAX_ROTARIES or kernel is None:
            return None
        return cls(layers, rotaries, hidden_size, kernel)

    def takes(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        single = meta.single_query
        return (single is not None and single.rows is None and not meta.prompts and x.dtype == torch.bfloat16
                and x.device.type == "cpu")

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x [rows, hidden] bf16 after the embedding; returns it after the last layer."""
        x = x.clone(memory_format=torch.contiguous_format)  # updated in place
        tables, context_lens = meta.single_query.kernel_tables()
        slots = meta.slot_mapping.contiguous()
        cos_sin = [rotary.tables(positions) for rotary in self.rotaries]
        step = _Step(x.shape[0], slots.data_ptr(), tables.data_ptr(), tables.shape[1], context_lens.data_ptr(),
                     meta.single_query.block_size,
                     (_POINTER * _MAX_ROTARIES)(*(cos.data_ptr() for cos, _ in cos_sin)),
                     (_POINTER * _MAX_ROTARIES)(*(sin.data_ptr() for _, sin in cos_sin)),
                     cos_sin[0][0].shape[-1] if cos_sin else 0, self.rows_per_pass)
        if self._kernel(self._layers, len(self._layers), ctypes.byref(step), x.data_ptr(), self.hidden_size):
            raise MemoryError("the fused decoder layers could not allocate their scratch memory")
        return x

    def _describe(self, layer: nn.Module) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        paged = attention.attn
        rope = self.rotaries.index(attention.rotary) if attention.rotary is not None else -1
        attention_norm, attention_out_norm, mlp_norm, mlp_out_norm = layer.fused_norms()
        head_norm_offset = attention.q_norm.weight_offset if attention.q_norm is not None else 0.0
        return _Layer(*(_weight(norm) for norm in (attention_norm, mlp_norm, attention_out_norm, mlp_out_norm,
                                                   attention.q_norm, attention.k_norm)),
                      attention_norm.weight_offset, head_norm_offset, attention_norm.eps,
                      *(linear.matmul.address for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj,
                                                             mlp.down_proj)),
                      attention.num_heads, attention.num_kv_heads, attention.head_dim, mlp.intermediate_size,
                      KERNEL_ACTIVATIONS[mlp.activation], rope, paged.k_cache.data_ptr(), paged.v_cache.data_ptr(),
                      KERNEL_CACHE_TYPES[paged.k_cache.dtype], paged.sliding_window or 0, paged.k_cache.shape[1],
                      paged.scale)


def run_layers(fused: FusedLayers | None, layers: nn.ModuleList, x: torch.Tensor, positions: torch.Tensor,
               meta: AttentionMetadata) -> torch.Tensor:
    """x through every layer: in one C call where `fused` takes the step, module by module otherwise."""
    if fused is not None and fused.takes(x, meta):
        return fused(x, positions, meta)
    for layer in layers:
        x = layer(x, positions, meta)
    return x


def _weight(norm: RMSNorm | None) -> int | None:
    return None if norm is None else norm.weight.data_ptr()


def _qualifies(layer: nn.Module) -> bool:
    attention, mlp = layer.self_attn, layer.mlp
    matrices = (attention.qkv_proj, attention.o_proj, getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None))
    norms = [norm for norm in layer.fused_norms() if norm is not None]
    head_norms = [norm for norm in (attention.q_norm, attention.k_norm) if norm is not None]
    return (type(mlp) is GatedMLP and mlp.activation in KERNEL_ACTIVATIONS and mlp.activates_in_kernel
            and isinstance(attention.attn, PagedAttention) and attention.attn.runs_in_kernels
            and all(isinstance(getattr(m, "matmul", None), PackedMatmul) and m.matmul.format != "f32" for m in matrices)
            and all(type(n) is RMSNorm and n.runs_in_kernel() for n in norms)
            and all(type(n) is RMSNorm and n.runs_in_kernel(heads=True) for n in head_norms))

"""Plain configuration records, validated once at start-up.

`ModelConfig` describes an architecture in Hugging Face terms, whatever file it came from: every
checkpoint reader (GGUF, safetensors) produces one, and every model file consumes one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quill.errors import InvalidRequestError
from quill.model_limits import MODEL_LIMITS, check_model_limits

KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")
DECODE_GRAPH_MODES = ("auto", "off", "eager")  # EngineConfig.decode_graphs


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a model family's name (quill/models/registry.py)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    # Hugging Face-style rope scaling dict ({"rope_type": "linear"|"llama3"|..., "factor": ...}) or None.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v projections
    hidden_act: str = "silu"  # "silu" or "gelu_pytorch_tanh"
    # Per-layer attention kind, "full" or "sliding"; empty means every layer is "full".
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    # Per layer, whether attention rotates q and k (SmolLM3 leaves some layers without RoPE);
    # empty means every layer does.
    rope_layers: tuple[bool, ...] = ()
    # Mixture of experts (Qwen3-MoE): every layer's MLP is `num_experts` experts of
    # `moe_intermediate_size`, of which each token uses `num_experts_per_token`, weighted by the
    # router's probabilities (renormalised over the chosen ones when `norm_topk_prob`). 0: dense.
    num_experts: int = 0
    num_experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    # Gemma 3: sliding layers use their own RoPE base and no scaling.
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 when set
    final_logit_softcapping: float | None = None
    # A trimmed output vocabulary (`quill prune --trim-vocab`): the LM head has one row per id here,
    # in this (ascending) order, and every other token's logit is -inf, so it is never generated.
    # The input embedding keeps all `vocab_size` rows. Empty: the head covers the whole vocabulary.
    output_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_model_limits({name: getattr(self, name) for name in MODEL_LIMITS})  # before sizing anything
        if not self.layer_types:
            kind = "sliding" if self.sliding_window else "full"
            object.__setattr__(self, "layer_types", (kind,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if not self.rope_layers:
            object.__setattr__(self, "rope_layers", (True,) * self.num_layers)
        if len(self.rope_layers) != self.num_layers:
            raise ValueError(f"rope_layers has {len(self.rope_layers)} entries for {self.num_layers} layers")
        if self.num_experts and not 0 < self.num_experts_per_token <= self.num_experts:
            raise ValueError(f"num_experts_per_token {self.num_experts_per_token} is not in 1..{self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.output_token_ids:
            ids = self.output_token_ids
            if self.tie_word_embeddings:
                raise ValueError("a trimmed output vocabulary needs an LM head of its own (tie_word_embeddings False)")
            if list(ids) != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.vocab_size:
                raise ValueError(f"output_token_ids must be ascending, distinct ids below vocab_size {self.vocab_size}")

    @property
    def output_vocab_size(self) -> int:
        """Rows of the LM head: the kept tokens when the output vocabulary is trimmed."""
        return len(self.output_token_ids) or self.vocab_size

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


@dataclass
class EngineConfig:
    """How the engine runs a model: memory budgets, batching limits, precision, device."""

    max_model_len: int | None = None  # defaults to the model's context window
    # Compute dtype of weights, activations and the KV cache. bfloat16 is 2-4x faster here (AMX,
    # half the bytes per token); float32 is the exact reference.
    dtype: str = "bfloat16"
    device: str = "auto"  # where `LLM` places the model: "cpu", "cuda", "cuda:N", or "auto" (CUDA when present)
    # KV-cache dtype: "auto" (float16 on the CPU for a bf16 model, else `dtype`; see
    # quill/engine/runner.py kv_cache_dtype), "float32", "float16" or "bfloat16".
    kv_cache_dtype: str = "auto"
    # 4-bit weights multiply activations quantized to 8 bits per block of 32 inputs, in integer dot
    # products (quill/kernels/int4_q8.c), as llama.cpp's 4-bit formats do: faster than bfloat16
    # activations, and a little less exact (README: Quantization). None: on the CPU for a bfloat16
    # model where the kernel has AVX-512 VNNI or AVX2 (quill/engine/runner.py int8_activations_for). Other
    # weight formats are not affected.
    int8_activations: bool | None = None
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_memory: int | None = None  # bytes for the KV cache; None: sized from the model
    max_num_seqs: int = 64  # sequences in the running batch
    max_num_batched_tokens: int = 512  # tokens per engine step (prefill chunks + decodes)
    enable_prefix_caching: bool = True
    seed: int = 0
    # Speculative decoding: None (off), "ngram" (prompt lookup) or a draft model sharing the
    # target's tokenizer (a path or known name). See quill/speculative/.
    speculative: str | None = None
    num_speculative_tokens: int = 4  # the most draft tokens per sequence and step
    adaptive_speculation: bool = True  # shorten or pause drafting while drafts are rejected
    # Pure decode steps padded to batch buckets and replayed as CUDA graphs (quill/engine/decode_graphs.py):
    # "auto" (on CUDA; nothing changes on the CPU), "off" (--enforce-eager), "eager" (padded, never captured).
    decode_graphs: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"unsupported dtype {self.dtype!r}; use float32, bfloat16 or float16")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidRequestError(f"unsupported kv_cache_dtype {self.kv_cache_dtype!r}; "
                                      f"use one of {', '.join(KV_CACHE_DTYPES)}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise InvalidRequestError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise InvalidRequestError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.speculative is not None and not self.speculative:
            raise InvalidRequestError("speculative must be None, 'ngram' or a draft model")
        if self.num_speculative_tokens <= 0:
            raise InvalidRequestError(f"num_speculative_tokens must be positive, got {self.num_speculative_tokens}")
        if self.decode_graphs not in DECODE_GRAPH_MODES:
            raise InvalidRequestError(f"decode_graphs must be one of {', '.join(DECODE_GRAPH_MODES)}, "
                                      f"got {self.decode_graphs!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise InvalidRequestError(f"max_model_len must be positive, got {self.max_model_len}")

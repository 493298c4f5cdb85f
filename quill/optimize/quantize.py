"""Weight-only quantization of a float checkpoint into a GGUF file (`quill quantize`).

Types:
- q8_0, q4_0, q4_1: GGML's own block formats (32 weights a block), quantized by gguf-py's
  reference code, so llama.cpp loads the file too.
- int8: one symmetric scale per output row (`Int8Linear`'s kernel); int4: an asymmetric scale and
  offset per group of 32..256 input columns (`Int4Linear`'s kernel). Quill's own tensor format
  (see `weights/gguf_quant.py`); only Quill reads it.
- f32, f16, bf16: no quantization, every matrix in that float type (a Hugging Face directory
  converted to GGUF, as llama.cpp's converter does).

The file carries the source's tokenizer (see `optimize/gguf_tokenizer.py`), so that it runs by
itself; a tokenizer GGUF cannot describe is an error unless the caller asks for a file without one.

What stays unquantized follows llama.cpp's practice: vectors (norms, biases) and MoE routers stay
F32, since they are tiny and errors in them hit every activation (or send tokens to other experts).
A layer's stacked experts are quantized like any matrix, row by row. The token embedding and an untied LM head get
`--embeddings`: by default Q8_0 next to a GGML type (llama.cpp keeps small models' token_embd at
Q8_0 or better; the vocabulary is a large share of their weights), and F16 next to int4/int8
(Quill reads an embedding as floats anyway, so only the file grows); a float type keeps them in
that type, as llama.cpp's converter does. A matrix whose width the type cannot split into groups
keeps a wider type (see `_fallback`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from quill.errors import QuillError
from quill.layers.quantized import INT4_GROUP_SIZES, quantize_per_channel_int8
from quill.models.loader import load_checkpoint
from quill.models.registry import FAMILIES
from quill.optimize import EMBEDDING_TYPES, FLOAT_TYPES, QUANT_TYPES
from quill.paths import unwritable_reason, written_whole
from quill.weights.gguf import read_gguf_tensor_types
from quill.weights.gguf_export import write_gguf
from quill.optimize.gguf_tokenizer import checkpoint_tokenizer
from quill.weights.quantized import QuantizedWeight

Q = gguf.GGMLQuantizationType
GGML_TYPES = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}
_FLOAT_TYPES = {"F32", "F16", "BF16"}
_EMBEDDING_NAMES = ("token_embd.weight", "output.weight")  # the LM head shares the vocabulary's policy
_ROUTER_SUFFIX = ".ffn_gate_inp.weight"  # llama.cpp's name for a MoE layer's router
_GGML_BLOCK = 32  # values per block of every GGML type used here


class QuantizationError(QuillError):
    """A quantization the user asked for cannot be done (bad option, already-quantized source)."""


@dataclass
class QuantizeSummary:
    source: Path
    output: Path
    source_bytes: int
    output_bytes: int
    has_tokenizer: bool  # False only when asked for a file without one
    tensor_types: Counter = field(default_factory=Counter)  # stored type -> number of tensors
    fallbacks: Counter = field(default_factory=Counter)  # "int4 g128 -> Q8_0" -> number of matrices
    tokenizer_notes: list[str] = field(default_factory=list)  # what the file's tokenizer keeps only approximately

    @property
    def ratio(self) -> float:
        return self.source_bytes / self.output_bytes


def quantize_int8(values: np.ndarray) -> QuantizedWeight:
    """Symmetric, one scale per output row: w = scale * (code - 128), |code - 128| <= 127."""
    return quantize_per_channel_int8(torch.from_numpy(values))


def quantize_int4(values: np.ndarray, group_size: int) -> QuantizedWeight:
    """Asymmetric per group of `group_size` input columns: its min and max map to codes 0 and 15."""
    rows, cols = values.shape
    w = torch.from_numpy(values).view(rows, cols // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = (high - low) / 15
    steps = torch.where(scales > 0, scales, 1)[..., None]
    codes = torch.round((w - low[..., None]) / steps).clamp_(0, 15).to(torch.uint8)
    return QuantizedWeight(codes.view(rows, cols), scales, low, bits=4, group_size=group_size, source="int4")


class _TensorPolicy:
    """The `write_gguf` hook: decides (and performs, for int4/int8) each tensor's quantization,
    counting what it chose and advancing the progress bar."""

    def __init__(self, qtype: str, group_size: int, embeddings: str, progress: tqdm) -> None:
        self.qtype, self.group_size, self.embeddings, self.progress = qtype, group_size, embeddings, progress
        self.tensor_types: Counter = Counter()
        self.fallbacks: Counter = Counter()

    def __call__(self, name: str, values: np.ndarray) -> Q | QuantizedWeight:
        self.progress.update()
        if values.ndim != 2 or name.endswith(_ROUTER_SUFFIX):
            return self._record(Q.F32)
        wanted = self.embeddings if name in _EMBEDDING_NAMES and self.embeddings != "same" else self.qtype
        if not self._fits(wanted, values.shape[1]):
            fallback = _fallback(values.shape[1])
            self.fallbacks[f"{self._label(wanted)} -> {fallback.name}"] += 1
            return self._record(fallback)
        if wanted == "int8":
            return self._record(quantize_int8(values))
        if wanted == "int4":
            return self._record(quantize_int4(values, self.group_size))
        return self._record(GGML_TYPES[wanted])

    def _fits(self, qtype: str, width: int) -> bool:
        if qtype == "int4":
            return width % self.group_size == 0
        return qtype == "int8" or qtype in FLOAT_TYPES or width % _GGML_BLOCK == 0

    def _label(self, choice: str | Q | QuantizedWeight) -> str:
        """"Q4_0", "F32", "int8", "int4 g32" for a type name, a GGML type or a quantized weight."""
        name = choice.source if isinstance(choice, QuantizedWeight) else choice
        if isinstance(name, Q):
            return name.name
        if name in GGML_TYPES:
            return GGML_TYPES[name].name
        return f"int4 g{self.group_size}" if name == "int4" else name

    def _record(self, choice: Q | QuantizedWeight) -> Q | QuantizedWeight:
        self.tensor_types[self._label(choice)] += 1
        return choice


def _fallback(width: int) -> Q:
    """For a matrix the chosen type cannot group (width not a multiple of its group): Q8_0 where
    blocks of 32 fit (small error, read by both Quill and llama.cpp), else F16."""
    return Q.Q8_0 if width % _GGML_BLOCK == 0 else Q.F16


def quantize_checkpoint(source: str | Path, output: str | Path, qtype: str, *, group_size: int | None = None,
                        embeddings: str | None = None, allow_requantize: bool = False,
                        with_tokenizer: bool = True, progress: bool = True) -> QuantizeSummary:
    """Quantize a float checkpoint (Hugging Face directory or GGUF file) into the GGUF file `output`,
    with the source's tokenizer unless `with_tokenizer` is False (TokenizerConversionError when the
    source has none that GGUF can carry)."""
    source, output = Path(source), Path(output)
    group_size = _check_options(source, output, qtype, group_size, embeddings, allow_requantize)
    checkpoint = load_checkpoint(source)
    tokenizer = checkpoint_tokenizer(checkpoint) if with_tokenizer else None  # fail before the slow part
    tokenizer_metadata = tokenizer.metadata if tokenizer else {}
    if embeddings is None:
        embeddings = "f16" if qtype in ("int8", "int4") else "same" if qtype in FLOAT_TYPES else "q8_0"
    with tqdm(total=len(checkpoint.tensors), unit="tensor", desc=f"quantizing to {qtype}", disable=not progress,
              leave=False) as bar:
        policy = _TensorPolicy(qtype, group_size, embeddings, bar)
        with written_whole(output) as partial:
            write_gguf(partial, FAMILIES.named(checkpoint.config.architecture), checkpoint.config, checkpoint.tensors,
                       tokenizer_metadata, tensor_type=policy)
    return QuantizeSummary(source, output, _size(source), output.stat().st_size, tokenizer is not None,
                           policy.tensor_types, policy.fallbacks, tokenizer.notes if tokenizer else [])


def _check_options(source: Path, output: Path, qtype: str, group_size: int | None, embeddings: str | None,
                   allow_requantize: bool) -> int:
    """Validate everything before the (slow) load; returns the int4 group size to use."""
    if qtype not in QUANT_TYPES + FLOAT_TYPES:
        raise QuantizationError(f"unknown quantization type {qtype!r}; "
                                f"choose one of {', '.join(QUANT_TYPES + FLOAT_TYPES)}")
    if embeddings is not None and embeddings not in EMBEDDING_TYPES:
        raise QuantizationError(f"--embeddings must be one of {', '.join(EMBEDDING_TYPES)}, got {embeddings!r}")
    if embeddings == "same" and qtype in ("int8", "int4"):
        # The GGUF reader finds the vocabulary (and whether the LM head is tied) by GGML tensor names.
        raise QuantizationError(f"--embeddings same is for GGML types; with {qtype} use f16 or q8_0")
    if group_size is not None and qtype != "int4":
        raise QuantizationError(f"--group-size applies to int4 only ({qtype} has a fixed grouping)")
    group_size = group_size or 32
    if group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                                f"(what every int4 path takes, PyTorch's fallback kernel included), got {group_size}")
    if not source.exists():
        raise QuantizationError(f"source checkpoint does not exist: {source}")
    if output.resolve() == source.resolve():
        raise QuantizationError("the output would overwrite the source checkpoint")
    if (reason := unwritable_reason(output)) is not None:
        raise QuantizationError(f"cannot write the output: {reason}")
    if source.is_file():
        quantized = sorted({t for t in read_gguf_tensor_types(source).values() if t not in _FLOAT_TYPES})
        if quantized and not allow_requantize:
            raise QuantizationError(
                f"{source.name} is already quantized ({', '.join(quantized)}); quantizing it again compounds "
                "both rounding errors. Start from a float checkpoint, or pass --allow-requantize to accept that")
    return group_size


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


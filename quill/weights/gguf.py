"""GGUF reader: metadata, config mapping, and tensors in Hugging Face layout (dequantized to floats,
or kept quantized where Quill has a native kernel: see `gguf_quant.py`).

llama.cpp's converter changes three things on the way from Hugging Face to GGUF, and this reader
undoes each of them, as the file's `ModelFamily` declares them, so that model code sees one
convention whatever the file:
- names (`blk.0.attn_q.weight` <- `model.layers.0.self_attn.q_proj.weight`), and a layer's experts
  stacked into one tensor (`Tensor`);
- for some families, q/k projection rows permuted from rotate-half to interleaved RoPE order;
- for some, norm weights stored as `offset + w` (`ModelFamily.gguf_conventions`).

The header is parsed here rather than with `gguf.GGUFReader`, which reads every element of the
tokenizer arrays separately (about 10 s for Gemma 3's 262,144 tokens) and fails on damaged files
with raw numpy/struct errors. Dequantization uses `gguf.quants`.
"""
from __future__ import annotations

import functools
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
import torch

from quill.config import ModelConfig
from quill.errors import ModelLoadError, UnsupportedModelError
from quill.rope import rope_inverse_frequencies
from quill.weights.checkpoint import Checkpoint
from quill.weights.family import Families, GGUFKeys, ModelFamily
from quill.weights.gguf_quant import CODES, NATIVE_GGML_TYPES, OFFSETS, SCALES, quill_quantized, repack_ggml
from quill.weights.layout import check_shapes
from quill.weights.quantized import DeferredWeight, GGMLFileRows, GGMLRows, QuantizedWeight, read_into

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF metadata value types (gguf.GGUFValueType) with a fixed size, as little-endian struct formats.
_FIXED_TYPES = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9

# Quill's own key for a trimmed output vocabulary (`ModelConfig.output_token_ids`), which llama.cpp cannot run.
OUTPUT_TOKEN_IDS_KEY = "quill.output_token_ids"
_LLAMA3_LOW_FREQ_FACTOR, _LLAMA3_HIGH_FREQ_FACTOR = 1.0, 4.0  # what Llama 3.x use; see _rope_scaling


def llama3_rope_factors(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE scaling, as llama.cpp stores them in `rope_freqs.weight`.
    Derived from the runtime's own RoPE formula, so the file and the model cannot disagree."""
    default = rope_inverse_frequencies(head_dim, rope_theta, None)
    scaled = rope_inverse_frequencies(head_dim, rope_theta, {**rope_scaling, "rope_type": "llama3"})
    return (default / scaled).numpy()


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: ggml's ne[] reversed, so ne[0] (the fastest dim) is last
    type_id: int  # gguf.GGMLQuantizationType value (unknown types are kept as plain ints)
    offset: int  # absolute position of the data in the file
    nbytes: int | None  # None when the type is unknown


class _HeaderParser:
    """Bounds-checked little-endian reader over the mapped file, so damage reads as a clear error."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path.name}: {what} (at byte {self.pos}); the file is corrupt or truncated")

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"header needs {n} more bytes but the file ends at byte {len(self.buf)}")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        start = self.take(self.unpack("<Q"))
        try:
            return self.buf[start:self.pos].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not valid UTF-8") from None

    def value(self, type_id: int) -> Any:
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            return self.array()
        if type_id not in _FIXED_TYPES:
            raise self.fail(f"unknown metadata value type {type_id}")
        value = self.unpack(_FIXED_TYPES[type_id])
        if type_id == _FLOAT32:  # shortest decimal that round-trips in float32, so 1e-5 reads back as 1e-5
            return float(str(np.float32(value)))
        return value

    def array(self) -> list[Any]:
        item_type, count = self.unpack("<I"), self.unpack("<Q")
        if item_type in _FIXED_TYPES:
            dtype = np.dtype(_FIXED_TYPES[item_type])
            start = self.take(count * dtype.itemsize)
            return np.frombuffer(self.buf[start:self.pos], dtype).tolist()
        if count * 8 > len(self.buf) - self.pos:  # every string or array item takes at least 8 bytes
            raise self.fail(f"an array claims {count} items, more than the file can hold")
        if item_type == _STRING:  # the hot loop for tokenizer vocabularies: kept free of method calls
            items, buf, pos, end = [], self.buf, self.pos, len(self.buf)
            for _ in range(count):
                if pos + 8 > end:
                    break
                (length,) = struct.unpack_from("<Q", buf, pos)
                pos += 8
                if pos + length > end:
                    break
                items.append(buf[pos:pos + length])
                pos += length
            self.pos = pos
            if len(items) < count:
                raise self.fail("a string array runs past the end of the file")
            try:
                return [item.decode("utf-8") for item in items]
            except UnicodeDecodeError:
                raise self.fail("a string is not valid UTF-8") from None
        return [self.value(item_type) for _ in range(count)]


def _tensor_nbytes(shape: tuple[int, ...], type_id: int) -> int | None:
    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return None
    if shape[-1] % block_size:
        return None  # a row that is not whole blocks cannot be decoded; reported as unsupported later
    return math.prod(shape) // block_size * type_size  # Python ints: corrupt dims cannot overflow


def _parse_header(buf: mmap.mmap, path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
    p = _HeaderParser(buf, path)
    if len(buf) < 24 or buf[:4] != _MAGIC:
        raise ModelLoadError(f"{path.name} is not a GGUF file (it does not start with the GGUF magic bytes)")
    p.pos = 4
    version = p.unpack("<I")
    if version & 0xFFFF == 0:
        raise UnsupportedModelError(f"{path.name} is a big-endian GGUF file; only little-endian files are supported")
    if version not in (2, 3):
        raise UnsupportedModelError(f"{path.name} is GGUF version {version}; versions 2 and 3 are supported")
    tensor_count, kv_count = p.unpack("<Q"), p.unpack("<Q")

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = p.string()
        if key in metadata:
            raise p.fail(f"metadata key {key} appears twice")
        metadata[key] = p.value(p.unpack("<I"))

    raw_infos = []
    for _ in range(tensor_count):
        name = p.string()
        n_dims = p.unpack("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise p.fail(f"tensor {name} claims {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, p.take(8 * n_dims))
        if 0 in dims:
            raise p.fail(f"tensor {name} has an empty dimension")
        type_id, offset = p.unpack("<I"), p.unpack("<Q")
        raw_infos.append((name, tuple(reversed(dims)), type_id, offset))

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise p.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-p.pos // alignment) * alignment

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, type_id, offset in raw_infos:
        if name in tensors:
            raise p.fail(f"tensor {name} appears twice")
        nbytes = _tensor_nbytes(shape, type_id)
        info = GGUFTensorInfo(name, shape, type_id, data_start + offset, nbytes)
        if nbytes is not None and info.offset + nbytes > len(buf):
            raise ModelLoadError(
                f"{path.name}: data of tensor {name} ends at byte {info.offset + nbytes} but the file has "
                f"only {len(buf)} bytes; the file is truncated (an interrupted download?)"
            )
        tensors[name] = info
    return metadata, tensors


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
    try:
        with open(path, "rb") as f:
            if Path(path).stat().st_size == 0:
                raise ModelLoadError(f"{path.name} is empty, not a GGUF file")
            # Only slices and struct reads touch the map (no numpy views), so it always closes cleanly.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_header(buf, path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from exc


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value pairs of a GGUF file as plain Python values (str, int, float, bool, lists)."""
    return _read_header(Path(path))[0]


def read_gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """The GGML type name of every tensor in a GGUF file ("F16", "Q4_1", ...), from its header."""
    return {name: _type_name(info) for name, info in _read_header(Path(path))[1].items()}


def _read_raw(f: BinaryIO, info: GGUFTensorInfo, path: Path) -> np.ndarray:
    """The tensor's bytes as uint8 [rows, bytes per row]."""
    _check_whole_blocks(info, path)
    raw = np.empty(info.nbytes, dtype=np.uint8)
    read_into(f, info.offset, raw, f"{path.name}: tensor {info.name}")
    return raw.reshape(math.prod(info.shape[:-1]), -1)


def _check_whole_blocks(info: GGUFTensorInfo, path: Path) -> None:
    if info.nbytes is None:
        raise UnsupportedModelError(
            f"{path.name}: tensor {info.name} has shape {info.shape}, which is not whole {_type_name(info)} blocks"
        )


def _ggml_type(info: GGUFTensorInfo, path: Path) -> gguf.GGMLQuantizationType:
    try:
        return gguf.GGMLQuantizationType(info.type_id)
    except ValueError:
        raise UnsupportedModelError(f"{path.name}: tensor {info.name} has unknown GGML type {info.type_id}") from None


def _type_name(info: GGUFTensorInfo) -> str:
    try:
        return gguf.GGMLQuantizationType(info.type_id).name
    except ValueError:
        return str(info.type_id)


def _dequantize(f: BinaryIO, info: GGUFTensorInfo, path: Path, dtype: torch.dtype = torch.float32,
                rows_per_chunk: int = 4096) -> torch.Tensor:
    """The tensor as `dtype`, read and expanded a chunk of rows at a time: gguf-py's dequantizers
    make several float32 copies of what they are given, so a whole embedding table at once would
    cost GBs (Gemma 3's 262,144 x 640 table: the load peaked at 1.7 GB for a model that then
    holds 1.1 GB; 1.2 GB with chunks)."""
    qtype = _ggml_type(info, path)
    raw = _read_raw(f, info, path)  # [rows, bytes per row]
    out = torch.empty(raw.shape[0], info.shape[-1], dtype=dtype)
    for start in range(0, raw.shape[0], rows_per_chunk):
        try:
            values = gguf.quants.dequantize(raw[start:start + rows_per_chunk], qtype)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"{path.name}: tensor {info.name} has type {qtype.name}, which Quill cannot dequantize"
            ) from None
        out[start:start + rows_per_chunk] = torch.from_numpy(values.astype(np.float32, copy=False))
    return out.reshape(info.shape)


def _config(family: ModelFamily, metadata: dict[str, Any], tensors: dict[str, GGUFTensorInfo],
            rope_freqs: np.ndarray | None, path: Path) -> ModelConfig:
    """The keys every family shares here, the rest from the family's `gguf_config`."""
    key = GGUFKeys(metadata, family.name, path.name)
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path.name}: tensor token_embd.weight is missing")
    hidden, heads, layers = int(key("embedding_length")), int(key("attention.head_count")), int(key("block_count"))
    if not 0 < layers <= len(tensors):  # a corrupt count must not make us build billions of layer records
        raise ModelLoadError(f"{path.name}: block_count {layers} does not fit the {len(tensors)} tensors in the file")
    head_dim = int(key("attention.key_length", key("rope.dimension_count", hidden // heads)))
    rope_theta = float(key("rope.freq_base", 10000.0))
    fields = dict(
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(key("context_length")),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(key, head_dim, rope_theta, rope_freqs, path),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,  # llama.cpp's name for a layer's query bias
        final_logit_softcapping=key("final_logit_softcapping", None),
        output_token_ids=tuple(int(i) for i in metadata.get(OUTPUT_TOKEN_IDS_KEY, ())),
    )
    return ModelConfig(architecture=family.name, **(fields | family.gguf_config(key, fields)))


def _rope_scaling(key, head_dim: int, rope_theta: float, rope_freqs: np.ndarray | None, path: Path) -> dict | None:
    original_context = key("rope.scaling.original_context_length", None)
    if rope_freqs is not None:
        # llama.cpp stores Llama 3 scaling only as the resulting per-frequency divisors. Those depend
        # on the low/high frequency factors only through ratios, so assume Llama 3's (1, 4) and check.
        scaling = {
            "rope_type": "llama3",
            "factor": float(str(rope_freqs.max())),
            "low_freq_factor": _LLAMA3_LOW_FREQ_FACTOR,
            "high_freq_factor": _LLAMA3_HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": int(original_context or 8192),  # llama.cpp's default
        }
        if rope_freqs.shape != (head_dim // 2,) or not np.allclose(
            llama3_rope_factors(head_dim, rope_theta, scaling), rope_freqs, rtol=1e-4
        ):
            raise UnsupportedModelError(f"{path.name}: rope_freqs.weight does not follow Llama 3 RoPE scaling")
        return scaling
    kind, factor = key("rope.scaling.type", None), key("rope.scaling.factor", None)
    if kind in (None, "none") and factor in (None, 1.0):
        return None
    if kind in (None, "linear"):  # llama.cpp's default type when only a factor is given
        return {"rope_type": "linear", "factor": float(factor)}
    raise UnsupportedModelError(f"{path.name}: RoPE scaling type {kind!r} is not supported")


def load_gguf(path: str | Path, families: Families, dtype: torch.dtype | None = None, *,
              keep_quantized: bool = False, defer_unpacking: bool = False) -> Checkpoint:
    """Read a GGUF file into float32 (or `dtype`) tensors with Hugging Face names, layout and
    conventions. With `keep_quantized`, weights in a format Quill multiplies natively (see
    `gguf_quant.py`) come back as `QuantizedWeight`s instead (`DeferredWeight`s, with
    `defer_unpacking`: the file's bytes, unpacked when loaded); the embedding table stays in the
    file's blocks (`GGMLRows`; with `defer_unpacking`, in the file until read, `GGMLFileRows`)."""
    path = Path(path)
    metadata, infos = _read_header(path)
    architecture = metadata.get("general.architecture")
    if architecture is None:
        raise ModelLoadError(f"{path.name}: metadata key general.architecture is missing")
    if not isinstance(architecture, str):
        raise ModelLoadError(f"{path.name}: general.architecture is {architecture!r}, not a name")
    family = families.for_gguf(architecture, path.name)
    try:
        with open(path, "rb") as f:
            rope_freqs = infos.get("rope_freqs.weight")
            if rope_freqs is not None:  # needed for the config (Llama 3 RoPE scaling)
                rope_freqs = _dequantize(f, rope_freqs, path).numpy()
            try:
                config = _config(family, metadata, infos, rope_freqs, path)
            except (TypeError, ValueError, ZeroDivisionError) as exc:  # metadata of the wrong type or inconsistent
                raise ModelLoadError(f"{path.name}: invalid model metadata: {exc}") from exc
            # Check names and shapes before reading anything; tensors the model does not use are skipped.
            wanted = family.tensors(config)
            reader = _TensorReader(f, path, metadata, infos, keep_quantized, dtype or torch.float32, defer_unpacking)
            check_shapes({t.gguf: t.gguf_shape for t in wanted}, reader.shapes(), path.name)
            tensors = {}
            for spec in wanted:
                stored = reader.read(spec.gguf)
                if spec.experts and isinstance(stored, DeferredWeight):  # split by expert: unpack once
                    stored = stored.load()
                for hf_name, tensor in zip(spec.hf_names, _unstack(stored, spec.experts)):
                    tensor = family.from_gguf(hf_name, tensor, config)
                    quantized = isinstance(tensor, (QuantizedWeight, DeferredWeight, GGMLRows, GGMLFileRows))
                    tensors[hf_name] = tensor if quantized else tensor.to(dtype or torch.float32)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return Checkpoint(config=config, tensors=tensors, path=path, format="gguf", metadata=metadata)


def _unstack(tensor: torch.Tensor | QuantizedWeight, experts: int) -> list[torch.Tensor | QuantizedWeight]:
    """A GGUF tensor that stacks `experts` matrices along its first axis as those matrices (a
    quantized one is split by rows, which its groups never cross); any other as itself."""
    if not experts:
        return [tensor]
    rows = tensor.shape[0] // experts if isinstance(tensor, QuantizedWeight) else tensor.shape[-2]
    if isinstance(tensor, QuantizedWeight):
        return [tensor.select_rows(torch.arange(e * rows, (e + 1) * rows)) for e in range(experts)]
    return list(tensor.reshape(experts, rows, tensor.shape[-1]).unbind(0))


class _TensorReader:
    """Reads one tensor at a time: GGML tensors, and Quill's own int4/int8 triples (`W.codes`,
    `W.scales`, `W.offsets`), which stand for one weight `W`."""

    def __init__(self, f: BinaryIO, path: Path, metadata: dict[str, Any], infos: dict[str, GGUFTensorInfo],
                 keep_quantized: bool, dtype: torch.dtype, defer_unpacking: bool = False) -> None:
        self.f, self.path, self.infos, self.keep_quantized = f, path, infos, keep_quantized
        self.defer_unpacking = defer_unpacking
        self.dtype = dtype  # for matrices, which a family only permutes (exact in any type)
        self.quill_type = metadata.get("quill.quantization.type")
        self.quill_weights = {name.removesuffix(CODES) for name in infos if name.endswith(CODES)}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {name: info.shape for name, info in self.infos.items()}
        codes_per_byte = 2 if self.quill_type == "int4" else 1
        for name in self.quill_weights:
            # From the codes: int8's group is a whole row, so no one group size gives every width.
            codes = self._info(name + CODES)
            shapes[name] = (*codes.shape[:-1], codes.shape[-1] * codes_per_byte)
        return shapes

    def _info(self, name: str) -> GGUFTensorInfo:
        if name not in self.infos:
            raise ModelLoadError(f"{self.path.name}: tensor {name} is missing")
        return self.infos[name]

    def _floats(self, name: str) -> np.ndarray:
        info = self._info(name)
        if info.type_id != gguf.GGMLQuantizationType.F32:
            raise ModelLoadError(f"{self.path.name}: tensor {name} must be F32, not {_type_name(info)}")
        return _read_raw(self.f, info, self.path).view(np.float32)  # [rows, groups]

    def read(self, name: str) -> torch.Tensor | QuantizedWeight:
        """The tensor; quantized ones as [rows, columns], every axis but the last counted in rows."""
        if name in self.quill_weights:
            codes = self._info(name + CODES)
            try:
                weight = quill_quantized(_read_raw(self.f, codes, self.path), self._floats(name + SCALES),
                                         self._floats(name + OFFSETS), self.quill_type)
            except ValueError as exc:
                raise ModelLoadError(f"{self.path.name}: tensor {name}: {exc}") from exc
            return weight if self.keep_quantized else weight.dequantize()
        info = self.infos[name]
        if self.keep_quantized and info.type_id in NATIVE_GGML_TYPES and len(info.shape) >= 2:
            if name == "token_embd.weight":  # a lookup table, not a matmul: rows expand when read
                if self.defer_unpacking:
                    _check_whole_blocks(info, self.path)
                    rows = math.prod(info.shape[:-1])
                    return GGMLFileRows(self.path, info.offset, rows, info.nbytes // rows, info.type_id,
                                        info.shape[-1], self.dtype)
                return GGMLRows(torch.from_numpy(_read_raw(self.f, info, self.path)), info.type_id, info.shape[-1],
                                self.dtype)
            rows = _read_raw(self.f, info, self.path)
            qtype, shape = gguf.GGMLQuantizationType(info.type_id), (rows.shape[0], info.shape[-1])
            if self.defer_unpacking:
                return DeferredWeight(shape, functools.partial(repack_ggml, rows, qtype, shape))
            return repack_ggml(rows, qtype, shape)
        # Vectors stay float32 until the family has converted them (norm offsets are arithmetic).
        return _dequantize(self.f, info, self.path, self.dtype if len(info.shape) >= 2 else torch.float32)

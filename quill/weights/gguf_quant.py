"""Quantized GGUF tensors kept quantized: GGML blocks and Quill's own int4/int8 tensors, read
into `QuantizedWeight` (codes, per-group scales and offsets) without expanding to floats.

GGML's formats are group-wise affine, so the repacking is exact (the values
`QuantizedWeight.dequantize` gives are bit-identical to `gguf.quants.dequantize`: every product
of a code and a scale fits float32's 24 bits, and so does every weight):
- Q4_0: 32 values per block, one fp16 scale d:    w = d * (q - 8)
- Q4_1: 32 values per block, fp16 d and min m:    w = d * q + m
- Q4_K: 256 values per super-block, eight groups of 32 with 6-bit scale and min
        multipliers of two fp16 super-scales:     w = (d * sc) * q - (dmin * mn)
- Q5_0, Q5_1: as Q4_0 (q - 16) and Q4_1, with a fifth bit per value in a 32-bit mask
- Q5_K: as Q4_K, with a fifth bit per value
- Q6_K: 256 values, sixteen groups of 16 with int8 multipliers of one fp16 scale:
        w = (d * sc) * (q - 32), q of 6 bits
- Q8_0: 32 values per block, one fp16 scale d:    w = d * q, q a signed byte
In every block the first half of the values sits in the low nibbles of the packed bytes and
the second half in the high nibbles (per 32-value half of a K-quant 64-value run).

Quill's own format (`quill quantize --type int4|int8`) stores a weight `W` as three tensors:
`W.codes` (I8: the codes minus 128 for int8; two 4-bit codes per byte, low nibble first, for
int4), `W.scales` and `W.offsets` (F32, one per group), with `quill.quantization.group_size` (int4;
an int8 group is a whole row).
"""
from __future__ import annotations

import gguf
import numpy as np
import torch

from quill.weights.quantized import QuantizedWeight

Q = gguf.GGMLQuantizationType
NATIVE_GGML_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0)
CODES, SCALES, OFFSETS = ".codes", ".scales", ".offsets"  # suffixes of Quill's own quantized tensors


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n] codes: all low nibbles, then all high nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _fifth_bits(mask: np.ndarray) -> np.ndarray:
    """[blocks, 4] bytes of a little-endian 32-bit mask -> [blocks, 32] bits, value i from bit i."""
    return ((mask.copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def repack_ggml(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> QuantizedWeight:
    """GGML blocks of a 2-D tensor (uint8, [rows, bytes per row]) -> `QuantizedWeight`."""
    rows, cols = shape
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    bits, group = 4, 32
    if qtype == Q.Q4_0:
        d = _f16(blocks[:, :2])
        codes, scales, offsets = _nibbles(blocks[:, 2:]), d, -8 * d
    elif qtype == Q.Q4_1:
        codes, scales, offsets = _nibbles(blocks[:, 4:]), _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    elif qtype == Q.Q4_K:
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        codes = _nibbles(blocks[:, 16:].reshape(-1, 4, 32)).reshape(-1, block_size)
        scales, offsets = d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
    elif qtype == Q.Q5_0:
        d, bits = _f16(blocks[:, :2]), 5
        codes = _nibbles(blocks[:, 6:]) | (_fifth_bits(blocks[:, 2:6]) << 4)
        scales, offsets = d, -16 * d
    elif qtype == Q.Q5_1:
        bits = 5
        codes = _nibbles(blocks[:, 8:]) | (_fifth_bits(blocks[:, 4:8]) << 4)
        scales, offsets = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    elif qtype == Q.Q5_K:
        d, dmin, bits = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), 5
        sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        low = _nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
        high = (blocks[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [blocks, 8, 32]
        codes = (low | (high << 4)).reshape(-1, block_size)
        scales, offsets = d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
    elif qtype == Q.Q6_K:
        bits, group = 6, 16
        low = _nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, 4, 32)  # 64-value runs, then halves
        high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
                ) & 3  # [blocks, 2, 4, 32]
        codes = (low.reshape(-1, 2, 4, 32) | (high << 4)).reshape(-1, block_size)
        scales = _f16(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32)
        offsets = -32 * scales
    elif qtype == Q.Q8_0:
        d, bits = _f16(blocks[:, :2]), 8
        codes = blocks[:, 2:] ^ 0x80  # a signed byte + 128
        scales, offsets = d, -128 * d
    else:
        raise ValueError(f"no native repacking for {qtype.name}")
    return QuantizedWeight(
        codes=torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, cols))),
        scales=torch.from_numpy(np.ascontiguousarray(scales.reshape(rows, cols // group))),
        offsets=torch.from_numpy(np.ascontiguousarray(offsets.reshape(rows, cols // group))),
        bits=bits, group_size=group, source=qtype.name,
    )


def quill_quantized(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray, qtype: str) -> QuantizedWeight:
    """Quill's int4/int8 tensors (see the module docstring) -> `QuantizedWeight`."""
    raw = codes.view(np.uint8)
    if qtype == "int4":
        unpacked = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(raw.shape[0], -1)
        bits = 4
    elif qtype == "int8":
        unpacked, bits = raw ^ 0x80, 8  # int8 c -> c + 128, as an unsigned code
    else:
        raise ValueError(f"unknown Quill quantization type {qtype!r}")
    group = unpacked.shape[1] // scales.shape[1]
    return QuantizedWeight(torch.from_numpy(np.ascontiguousarray(unpacked)),
                           torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)),
                           torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.float32)),
                           bits=bits, group_size=group, source=qtype)

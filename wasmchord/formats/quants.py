"""GGML tensor types: block layouts, vectorized NumPy dequantization and (some) quantization.

Block layouts follow ggml/src/ggml-common.h (`block_q4_0` ... `block_q6_K`). Arithmetic is done in
float32 in the same order as gguf-py's `quants.py`, so results are bit-identical to
`gguf.quants.dequantize` / `quantize` (the tests hold us to that).

Each decoder takes `blocks`: uint8 of shape (n_blocks, type_size) and writes float32 of shape
(n_blocks, block_size) into `out`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import UnsupportedError

QK_K = 256

# ---------------------------------------------------------------------------- helpers
# Decoders write into `out` (float32, (n_blocks, block_size)) to avoid a copy per chunk; integer
# unpacking stays in uint8 (cheap) and is converted once, inside the float multiply.

def _f16(col: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32."""
    return np.ascontiguousarray(col).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) uint8: the low nibbles are elements 0..15, the high 16..31."""
    q = np.empty((qs.shape[0], 32), dtype=np.uint8)
    np.bitwise_and(qs, 0xF, out=q[:, :16])
    np.right_shift(qs, 4, out=q[:, 16:])
    return q


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """(n, count/8) uint8 -> (n, count) uint8 of bits, little bit order (bit j of byte i = element 8i+j)."""
    return np.unpackbits(packed, axis=-1, count=count, bitorder="little")


def _roundf(x: np.ndarray) -> np.ndarray:
    """Round half away from zero, as C's roundf (and gguf-py's np_roundf)."""
    a = np.abs(x)
    fl = np.floor(a)
    return np.sign(x) * (fl + np.floor(2 * (a - fl)))


def _scale(d, q, out, m=None, *, sub=False):
    """out = d * q (+ m, or - m when sub), computed in float32 like gguf-py."""
    np.multiply(d, q, out=out, dtype=np.float32)
    if m is not None:
        (np.subtract if sub else np.add)(out, m, out=out)
    return out


# ---------------------------------------------------------------------------- float types

def _deq_f32(b, out):
    out[...] = b.view(np.float32)
    return out


def _deq_f16(b, out):
    out[...] = b.view(np.float16)
    return out


def _deq_bf16(b, out):
    out[...] = (b.view(np.int16).astype(np.int32) << 16).view(np.float32)
    return out


def _q_f32(x):
    return x.astype(np.float32).view(np.uint8)


def _q_f16(x):
    return x.astype(np.float16).view(np.uint8)


# ---------------------------------------------------------------------------- 32-element blocks

def _deq_q4_0(b, out):  # d:f16, qs[16]
    q = _nibbles(b[:, 2:18]).view(np.int8) - np.int8(8)
    return _scale(_f16(b[:, 0:2]), q, out)


def _deq_q4_1(b, out):  # d:f16, m:f16, qs[16]
    return _scale(_f16(b[:, 0:2]), _nibbles(b[:, 4:20]), out, _f16(b[:, 2:4]))


def _q5(qh_bytes, qs):
    """5-bit values (uint8): low nibbles from qs; bit 4 of element j is bit j of the little-endian u32 qh."""
    q = _nibbles(qs)
    q |= _bits(np.ascontiguousarray(qh_bytes), 32) << np.uint8(4)
    return q


def _deq_q5_0(b, out):  # d:f16, qh[4], qs[16]
    q = _q5(b[:, 2:6], b[:, 6:22]).view(np.int8) - np.int8(16)
    return _scale(_f16(b[:, 0:2]), q, out)


def _deq_q5_1(b, out):  # d:f16, m:f16, qh[4], qs[16]
    return _scale(_f16(b[:, 0:2]), _q5(b[:, 4:8], b[:, 8:24]), out, _f16(b[:, 2:4]))


def _deq_q8_0(b, out):  # d:f16, qs:int8[32]
    return _scale(_f16(b[:, 0:2]), np.ascontiguousarray(b[:, 2:34]).view(np.int8), out)


# ---------------------------------------------------------------------------- K-quants (256-element)

def q2_k_values(b):
    """Q2_K blocks -> (2-bit values uint8 [n, 16, 16] in element order, scales d*sc and minimums dmin*m
    [n, 16, 1] per 16). Shared by the NumPy decoder and the GPU repacker."""
    n = b.shape[0]
    scales = b[:, 0:16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).astype(np.float32)).reshape(n, 16, 1)
    # qs: 2 halves of 32 bytes; each byte holds 4 2-bit values for 4 groups of 32 elements.
    q = (b[:, 16:80].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    return q.reshape(n, 16, 16), dl, ml


def _deq_q2_k(b, out):  # scales[16], qs[64], d:f16, dmin:f16
    q, dl, ml = q2_k_values(b)
    return _scale(dl, q, out.reshape(b.shape[0], 16, 16), ml, sub=True)


def _q3_k_ints(b):
    """Q3_K blocks -> (signed 3-bit values as int8 [n, 16, 16] in element order, the 16 6-bit scales
    minus 32 as int8 [n, 16]: low 4 bits from bytes 0..7 (low then high nibble), high 2 bits from bytes
    8..11)."""
    n, hmask, qs, sc = b.shape[0], b[:, 0:32], b[:, 32:96], b[:, 96:108]
    lo = (sc[:, 0:8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16) & 0xF
    hi = (sc[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16) & 3
    ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)).reshape(n, 16, 16) & 3
    qh = (hmask.reshape(n, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)).reshape(n, 16, 16) & 1
    # A clear high bit means "subtract 4" (ggml dequantize_row_q3_K).
    return ql.astype(np.int8) - ((qh ^ 1) << 2).astype(np.int8), (lo | (hi << 4)).astype(np.int8) - np.int8(32)


def q3_k_values(b):
    """Q3_K blocks -> (signed 3-bit values as int8 [n, 16, 16] in element order, scales d*sc [n, 16, 1]).
    Shared by the NumPy decoder and the GPU repacker."""
    q, sc = _q3_k_ints(b)
    return q, (_f16(b[:, 108:110]) * sc.astype(np.float32)).reshape(b.shape[0], 16, 1)


def _deq_q3_k(b, out):  # hmask[32], qs[64], scales[12], d:f16
    q, dl = q3_k_values(b)
    return _scale(dl, q, out.reshape(b.shape[0], 16, 16))


def q3_k_as_q6_k(raw: np.ndarray) -> np.ndarray:
    """Q3_K blocks (uint8 bytes) -> the same values as Q6_K blocks, exactly: Q3_K's 6-bit scales minus 32
    are Q6_K's int8 scales, its values -4..3 plus 32 are 6-bit values, d is kept. 210 bytes per 256 values
    instead of 110, read by the Q6_K kernels (Q3_K has none)."""
    b = raw.reshape(-1, 110)
    n = b.shape[0]
    q, sc = _q3_k_ints(b)
    v = (q.reshape(n, 2, 4, 32) + np.int8(32)).view(np.uint8)    # [block, half, group of 32, l]
    lo, hi = v & 0xF, v >> 4
    out = np.empty((n, 210), np.uint8)
    ql = out[:, 0:128].reshape(n, 2, 2, 32)                     # [half, 32-byte run, l]
    ql[:] = lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)                # groups 0, 1 low nibbles; 2, 3 high nibbles
    out[:, 128:192].reshape(n, 2, 32)[:] = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = b[:, 108:110]
    return out.reshape(-1)


def k_scale_min(sc: np.ndarray):
    """Q4_K/Q5_K: 12 bytes -> 8 6-bit scales and 8 6-bit mins (ggml get_scale_min_k4)."""
    n = sc.shape[0]
    s = sc.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scale.astype(np.float32), mins.astype(np.float32)


def k4_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) -> (n, 8, 32) uint8: chunk c of 32 bytes gives sub-block 2c (low) and 2c+1 (high)."""
    n = qs.shape[0]
    q = np.empty((n, 4, 2, 32), dtype=np.uint8)
    c = qs.reshape(n, 4, 32)
    np.bitwise_and(c, 0xF, out=q[:, :, 0])
    np.right_shift(c, 4, out=q[:, :, 1])
    return q.reshape(n, 8, 32)


def _deq_q4_k(b, out):  # d:f16, dmin:f16, scales[12], qs[128]
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = k_scale_min(b[:, 4:16])
    dl, ml = (d * sc).reshape(n, 8, 1), (dmin * m).reshape(n, 8, 1)
    return _scale(dl, k4_nibbles(b[:, 16:144]), out.reshape(n, 8, 32), ml, sub=True)


def k5_values(b):
    """Q5_K blocks -> (n, 8, 32) uint8 5-bit values: nibbles as Q4_K's, bit 4 of sub-block j's element l
    in bit j of qh[l]. Shared by the NumPy decoder and the GPU repacker."""
    n = b.shape[0]
    q = k4_nibbles(b[:, 48:176])
    q |= ((b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1) << np.uint8(4)
    return q


def _deq_q5_k(b, out):  # d:f16, dmin:f16, scales[12], qh[32], qs[128]
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = k_scale_min(b[:, 4:16])
    dl, ml = (d * sc).reshape(n, 8, 1), (dmin * m).reshape(n, 8, 1)
    return _scale(dl, k5_values(b), out.reshape(n, 8, 32), ml, sub=True)


def q6_k_values(b):
    """Q6_K blocks -> (signed 6-bit values q-32 as int8 [n, 16, 16] in element order, scales d*sc [n, 16, 1]).
    Shared by the NumPy decoder and the GPU repacker."""
    n = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    dl = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
    lo = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)).reshape(n, 8, 32) & 0xF
    hi = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)).reshape(n, 8, 32) & 3
    q = (lo | (hi << 4)).view(np.int8) - np.int8(32)
    return q.reshape(n, 16, 16), dl


def _deq_q6_k(b, out):  # ql[128], qh[64], scales:int8[16], d:f16
    q, dl = q6_k_values(b)
    return _scale(dl, q, out.reshape(b.shape[0], 16, 16))


# ---------------------------------------------------------------------------- non-linear 4-bit (IQ4)

IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)  # kvalues_iq4nl


def iq4_nl_values(b):
    """IQ4_NL blocks (d:f16, qs[16]) -> (int8 table values [n, 32] in element order, d [n, 1])."""
    return IQ4_VALUES[_nibbles(b[:, 2:18])], _f16(b[:, 0:2])


def iq4_xs_values(b):
    """IQ4_XS blocks (d:f16, scales_h:u16, scales_l[4], qs[128]) -> (int8 table values [n, 8, 32] in
    element order, scales d * (ls - 32) [n, 8, 1]); sub-block j's 6-bit ls: low 4 bits from nibble j of
    scales_l, high 2 from bits 2j, 2j+1 of scales_h."""
    n = b.shape[0]
    lo = (b[:, 4:8].reshape(n, 4, 1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2)).reshape(n, 8) & 0xF
    h = np.ascontiguousarray(b[:, 2:4]).view("<u2") >> (2 * np.arange(8, dtype=np.uint16)).reshape(1, 8)
    ls = (lo | ((h & 3).astype(np.uint8) << 4)).astype(np.int8) - np.int8(32)
    dl = (_f16(b[:, 0:2]) * ls.astype(np.float32)).reshape(n, 8, 1)
    return IQ4_VALUES[_nibbles(b[:, 8:136].reshape(n * 8, 16))].reshape(n, 8, 32), dl


def _deq_iq4_nl(b, out):
    q, d = iq4_nl_values(b)
    return _scale(d, q, out)


def _deq_iq4_xs(b, out):
    q, dl = iq4_xs_values(b)
    return _scale(dl, q, out.reshape(b.shape[0], 8, 32))


def iq4_nl_as_q8_0(raw: np.ndarray) -> np.ndarray:
    """IQ4_NL blocks -> the same values as Q8_0 blocks, exactly (d kept, the table's values as int8):
    34 bytes per 32 values instead of 18, read by the Q8_0 kernels."""
    b = raw.reshape(-1, 18)
    out = np.empty((b.shape[0], 34), np.uint8)
    out[:, 0:2] = b[:, 0:2]
    out[:, 2:34] = iq4_nl_values(b)[0].view(np.uint8)
    return out.reshape(-1)


# ---------------------------------------------------------------------------- quantizers (converter)

def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) uint8 values 0..15 -> (n, 16): element j in the low nibble, j+16 in the high one."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _q_q8_0(x):
    d = np.abs(x).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    qs = _roundf(x * inv).astype(np.int8).view(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), qs], axis=1)


def _q_q4_0(x):
    amax = np.take_along_axis(x, np.abs(x).argmax(axis=-1, keepdims=True), axis=-1)  # signed value of max |x|
    d = amax / -8
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    q = np.trunc(x * inv + np.float32(8.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    return np.concatenate([d.astype(np.float16).view(np.uint8), _pack_nibbles(q)], axis=1)


def _q_q4_1(x):
    hi, lo = x.max(axis=-1, keepdims=True), x.min(axis=-1, keepdims=True)
    d = (hi - lo) / 15
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    q = np.trunc((x - lo) * inv + np.float32(0.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    return np.concatenate([d.astype(np.float16).view(np.uint8), lo.astype(np.float16).view(np.uint8),
                           _pack_nibbles(q)], axis=1)


# ---------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class GGMLType:
    """One GGML tensor type: `block_size` elements stored in `type_size` bytes."""

    name: str
    id: int
    block_size: int
    type_size: int
    dequantize_blocks: Callable | None = None
    quantize_blocks: Callable | None = None

    def __repr__(self):
        return self.name


# id, name, elements per block, bytes per block, decoder, encoder. ggml.h `enum ggml_type` and
# gguf-py's GGML_QUANT_SIZES; types without a decoder can be listed and described but not loaded.
_TABLE = [
    (0, "F32", 1, 4, _deq_f32, _q_f32), (1, "F16", 1, 2, _deq_f16, _q_f16),
    (2, "Q4_0", 32, 18, _deq_q4_0, _q_q4_0), (3, "Q4_1", 32, 20, _deq_q4_1, _q_q4_1),
    (6, "Q5_0", 32, 22, _deq_q5_0, None), (7, "Q5_1", 32, 24, _deq_q5_1, None),
    (8, "Q8_0", 32, 34, _deq_q8_0, _q_q8_0), (9, "Q8_1", 32, 36, None, None),
    (10, "Q2_K", 256, 84, _deq_q2_k, None), (11, "Q3_K", 256, 110, _deq_q3_k, None),
    (12, "Q4_K", 256, 144, _deq_q4_k, None), (13, "Q5_K", 256, 176, _deq_q5_k, None),
    (14, "Q6_K", 256, 210, _deq_q6_k, None), (15, "Q8_K", 256, 292, None, None),
    (16, "IQ2_XXS", 256, 66, None, None), (17, "IQ2_XS", 256, 74, None, None),
    (18, "IQ3_XXS", 256, 98, None, None), (19, "IQ1_S", 256, 50, None, None),
    (20, "IQ4_NL", 32, 18, _deq_iq4_nl, None), (21, "IQ3_S", 256, 110, None, None),
    (22, "IQ2_S", 256, 82, None, None), (23, "IQ4_XS", 256, 136, _deq_iq4_xs, None),
    (24, "I8", 1, 1, None, None), (25, "I16", 1, 2, None, None), (26, "I32", 1, 4, None, None),
    (27, "I64", 1, 8, None, None), (28, "F64", 1, 8, None, None), (29, "IQ1_M", 256, 56, None, None),
    (30, "BF16", 1, 2, _deq_bf16, None), (34, "TQ1_0", 256, 54, None, None),
    (35, "TQ2_0", 256, 66, None, None), (39, "MXFP4", 32, 17, None, None),
]
GGML_TYPES: dict[int, GGMLType] = {r[0]: GGMLType(r[1], *r[:1], *r[2:]) for r in _TABLE}
TYPES_BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}


def ggml_type(name_or_id) -> GGMLType:
    """Look a type up by name ("Q4_0", case-insensitive) or id."""
    t = GGML_TYPES.get(name_or_id) if isinstance(name_or_id, int) else TYPES_BY_NAME.get(str(name_or_id).upper())
    if t is None:
        raise UnsupportedError(f"unknown GGML type {name_or_id!r}; known: {', '.join(TYPES_BY_NAME)}")
    return t


# ---------------------------------------------------------------------------- public functions

_CHUNK_BLOCKS = 1 << 15  # bounds the temporaries of one decode step (~a few MB)


def dequantize(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...], *, what: str = "tensor") -> np.ndarray:
    """Decode all of `raw` (uint8 bytes of a tensor) to float32 of `shape`."""
    return dequantize_rows(raw, qtype, shape, None, what=what)


def dequantize_rows(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...], rows: slice | None = None,
                    *, what: str = "tensor", out: np.ndarray | None = None) -> np.ndarray:
    """Decode rows `rows` of a tensor (first axis of `shape`) to float32, touching only their bytes.

    Raises:
        UnsupportedError: the type has no decoder.
        ValueError: the byte count does not match type and shape.
    """
    if qtype.dequantize_blocks is None:
        raise UnsupportedError(f"{what}: dequantizing {qtype.name} is not supported")
    shape = tuple(int(s) for s in shape)
    row_len = shape[-1]
    if row_len % qtype.block_size:
        raise ValueError(f"{what}: row length {row_len} is not a multiple of {qtype.name}'s block size")
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    row_bytes = row_len // qtype.block_size * qtype.type_size
    if raw.size != n_rows * row_bytes:
        raise ValueError(f"{what}: {raw.size} bytes, expected {n_rows * row_bytes} for {qtype.name} {shape}")
    if rows is None:
        r0, r1, out_shape = 0, n_rows, shape
    else:
        r0, r1, step = rows.indices(shape[0])
        if step != 1:
            raise ValueError(f"{what}: row slices must have step 1")
        per = n_rows // shape[0]  # rows of the flattened 2-D view per first-axis index
        r0, r1, out_shape = r0 * per, r1 * per, (max(r1 - r0, 0),) + shape[1:]
    n = max(r1 - r0, 0)
    blocks = raw.reshape(n_rows, row_bytes)[r0:r0 + n].reshape(-1, qtype.type_size)
    res = out if out is not None else np.empty(n * row_len, dtype=np.float32)
    flat = res.reshape(-1, qtype.block_size)
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        qtype.dequantize_blocks(blocks[s:s + _CHUNK_BLOCKS], flat[s:s + _CHUNK_BLOCKS])
    return res.reshape(out_shape)


def quantize(x: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """Encode float32 `x` (last axis a multiple of the block size) as raw blocks: uint8 (..., row_bytes).

    Raises:
        UnsupportedError: the type has no encoder.
        ValueError: the last axis does not divide into blocks.
    """
    if qtype.quantize_blocks is None:
        raise UnsupportedError(f"quantizing to {qtype.name} is not supported "
                               f"(supported: {', '.join(t.name for t in GGML_TYPES.values() if t.quantize_blocks)})")
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % qtype.block_size:
        raise ValueError(f"cannot quantize rows of {x.shape[-1]} values to {qtype.name}: "
                         f"not a multiple of its block size {qtype.block_size}")
    blocks = qtype.quantize_blocks(x.reshape(-1, qtype.block_size))
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // qtype.block_size * qtype.type_size)

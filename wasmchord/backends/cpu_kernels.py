"""Compiled CPU kernels (numba): matrix products computed from GGUF blocks.

Layout. At load the rows of a matrix are taken in groups of R = 64 and each group's blocks are stored
byte-transposed: byte i of block b of row r goes to t[g, (b * type_size + i) * R + r]. The bytes and
the size are the file's (rows padded to a multiple of R); only their order changes. Every field of a
block (a scale, a byte of quants) then comes for the R rows of a group as R consecutive bytes, so the
kernels compute across rows: decode one column's value for R rows as a vector (scales included),
multiply it by that column's activation, accumulate R sums. No horizontal sums and no per-row scalar
work. (llama.cpp's repacked CPU types rest on the same idea.)

`matvec` is one token (decode); `dequantize` writes float32 columns for prefill tiles that BLAS sgemm
multiplies. Value order and arithmetic follow `formats/quants.py` (ggml-common.h block layouts); the
tests hold every type to NumPy dequantization, bit for bit where values are written out.

Dispatch: each block type has a marker, an empty array whose record dtype is named after the type;
`_group` picks the type's decoder from `_GROUPS` at compile time, so one kernel source serves every
type and each (kernel, type) pair compiles on first use only. Compiled code is cached on disk (numba
`cache=True`: beside this file, or in numba's user-wide cache directory when that is read-only).
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

R = 64  # rows per group: 4 AVX-512 (8 AVX2) registers per vector; fewer would let LLVM unroll the row
        # loops before vectorizing them, and it then vectorizes across columns (gathers) instead
# reassoc lets sums vectorize, contract makes multiply-adds FMAs; no nnan/ninf: inf and nan stay
_JIT = dict(cache=True, fastmath={"reassoc", "contract", "nsz"}, nogil=True)


@functools.cache
def marker(name: str) -> np.ndarray:
    """The dispatch marker of block type `name` ("Q4_K", "F16", ...)."""
    return np.empty(0, np.dtype([(name.lower(), np.uint8)]))


# ---------------------------------------------------------------------------- helpers

@intrinsic
def _vector(typingctx):
    """R float32 on the stack: an alloca in the entry block, which LLVM keeps in registers when every
    index into it is a loop counter of a constant range."""
    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=R)
    return types.CPointer(types.float32)(), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of the integer `bits`."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v, i32 = args[0], ir.IntType(32)
        v = builder.trunc(v, i32) if v.type.width > 32 else builder.zext(v, i32) if v.type.width < 32 else v
        return builder.bitcast(v, ir.FloatType())
    return types.float32(bits), codegen


@njit(inline="always")
def _half(h):
    """IEEE half bits -> float32, exactly, without branches: exponent and mantissa moved to float32
    position and scaled by 2^112 (subnormals included); an all-ones exponent becomes float32's, so
    inf and nan stay inf and nan."""
    bits = np.int32((h & 0x7FFF) << 13) + np.int32(((h & 0x7C00) == 0x7C00) * 0x70000000)
    return _f32_from_bits(bits) * np.float32(2.0 ** 112) * np.float32(1 - 2 * ((h >> 15) & 1))


@njit(inline="always")
def _bit4(h, mul):
    """Bit j of byte h moved to bit 4 (16 or 0), with mul = 128 >> j: a multiply and constant shifts.
    (numba computes integers in 64 bits; LLVM narrows a shift back to 32-bit lanes only when its
    amount is a constant, so a shift by a variable would put 8 values in a vector instead of 16.)"""
    return np.int32(np.int32(h) * mul >> 3) & 16


@njit(inline="always")
def _nibble(q, high):
    """The high or low nibble of byte q (high: a loop-invariant bool; constant shifts, see _bit4)."""
    v = np.int32(q)
    return (v >> 4) if high else (v & 15)


@njit(inline="always")
def _field(blk, i):
    """Byte i of the blocks of a group: R bytes, one per row."""
    return blk[i * R:(i + 1) * R]


@njit(inline="always")
def _halves(blk, i, out):
    """out[r] = the f16 at bytes i, i+1 of row r's block, as float32."""
    lo, hi = _field(blk, i), _field(blk, i + 1)
    for r in range(R):
        out[r] = _half(np.int32(lo[r]) | (np.int32(hi[r]) << 8))


def _put(sink, c, r, v):
    """Value v of column c, row r: into a dot product (sink = (acc, x): acc[r] += v * x[c]) or stored
    (sink = out [k, R]: out[c, r] = v). The form is chosen by the sink's type at compile time."""


@overload(_put, inline="always")
def _put_typed(sink, c, r, v):
    if isinstance(sink, types.BaseTuple):
        def dot(sink, c, r, v):
            sink[0][r] += v * sink[1][c]
        return dot

    def store(sink, c, r, v):
        sink[c, r] = v
    return store


# ---------------------------------------------------------------------------- decoders, one per type
# Each decodes every block of one group `blk` (its transposed bytes) for k columns and puts each
# value; they are compiled only inside the kernels, through `_group`. Scales are decoded for R rows
# at once into stack vectors (a = scale, m = offset: value = a * q + m).

def _group_f16(marker, tg, k, sink):
    for c in range(k):
        lo, hi = _field(tg, 2 * c), _field(tg, 2 * c + 1)
        for r in range(R):
            _put(sink, c, r, _half(np.int32(lo[r]) | (np.int32(hi[r]) << 8)))


def _group_bf16(marker, tg, k, sink):
    for c in range(k):
        lo, hi = _field(tg, 2 * c), _field(tg, 2 * c + 1)
        for r in range(R):
            _put(sink, c, r, _f32_from_bits((np.int32(lo[r]) << 16) | (np.int32(hi[r]) << 24)))


@njit(inline="always")
def _nibble_blocks(tg, k, sink, size, has_min, has_high):
    """Q4_0 (d, qs[16]), Q4_1 (d, m, qs[16]), Q5_0 (d, qh[4], qs[16]), Q5_1 (d, m, qh[4], qs[16]):
    32 values, byte i of qs holding value i (low nibble) and i + 16 (high); bit j of the
    little-endian u32 qh is bit 4 of value j. Without m, values are centred: (q - 8) d or (q - 16) d."""
    a, m = carray(_vector(), R), carray(_vector(), R)
    qs = 2 + 2 * has_min + 4 * has_high
    for b in range(k // 32):
        blk = tg[b * size * R:(b + 1) * size * R]
        _halves(blk, 0, a)
        if has_min:
            _halves(blk, 2, m)
        else:
            for r in range(R):
                m[r] = np.float32(-16 if has_high else -8) * a[r]
        for i in range(32):
            q, high = _field(blk, qs + i % 16), i >= 16
            h, mul = _field(blk, qs - 4 + i // 8) if has_high else q, np.int32(128 >> (i % 8))
            for r in range(R):
                v = _nibble(q[r], high)
                if has_high:
                    v |= _bit4(h[r], mul)
                _put(sink, 32 * b + i, r, a[r] * np.float32(np.int32(v)) + m[r])


def _group_q4_0(marker, tg, k, sink):
    _nibble_blocks(tg, k, sink, 18, False, False)


def _group_q4_1(marker, tg, k, sink):
    _nibble_blocks(tg, k, sink, 20, True, False)


def _group_q5_0(marker, tg, k, sink):
    _nibble_blocks(tg, k, sink, 22, False, True)


def _group_q5_1(marker, tg, k, sink):
    _nibble_blocks(tg, k, sink, 24, True, True)


def _group_q8_0(marker, tg, k, sink):  # d, qs:int8[32]
    d = carray(_vector(), R)
    for b in range(k // 32):
        blk = tg[b * 34 * R:(b + 1) * 34 * R]
        _halves(blk, 0, d)
        for i in range(32):
            q = _field(blk, 2 + i)
            for r in range(R):
                _put(sink, 32 * b + i, r, d[r] * np.float32(np.int8(q[r])))


@njit(inline="always")
def _k4_blocks(tg, k, sink, size, five):
    """Q4_K (d, dmin, scales[12], qs[128]) and Q5_K (d, dmin, scales[12], qh[32], qs[128]): value
    d * scale_j * q - dmin * min_j in sub-block j of 32; byte i of qs chunk j // 2 holds value i of
    sub-block j in its low (j even) or high nibble; bit j of qh[i] is bit 4 of that value. The 6-bit
    scales and mins: ggml get_scale_min_k4."""
    d, dmin = carray(_vector(), R), carray(_vector(), R)
    a, m = carray(_vector(), R), carray(_vector(), R)
    qs = 48 if five else 16
    for b in range(k // 256):
        blk = tg[b * size * R:(b + 1) * size * R]
        _halves(blk, 0, d)
        _halves(blk, 2, dmin)
        for j in range(8):
            if j < 4:
                s0, s1 = _field(blk, 4 + j), _field(blk, 8 + j)
                for r in range(R):
                    a[r] = d[r] * np.float32(np.int32(s0[r]) & 63)
                    m[r] = -(dmin[r] * np.float32(np.int32(s1[r]) & 63))
            else:
                s0, s1, s2 = _field(blk, j), _field(blk, 4 + j), _field(blk, 8 + j)
                for r in range(R):
                    a[r] = d[r] * np.float32((np.int32(s2[r]) & 15) | ((np.int32(s0[r]) >> 6) << 4))
                    m[r] = -(dmin[r] * np.float32((np.int32(s2[r]) >> 4) | ((np.int32(s1[r]) >> 6) << 4)))
            high, mul = j % 2 == 1, np.int32(128 >> j)
            for i in range(32):
                q, h = _field(blk, qs + 32 * (j // 2) + i), _field(blk, 16 + i)
                for r in range(R):
                    v = _nibble(q[r], high)
                    if five:
                        v |= _bit4(h[r], mul)
                    _put(sink, 256 * b + 32 * j + i, r, a[r] * np.float32(np.int32(v)) + m[r])


def _group_q4_k(marker, tg, k, sink):
    _k4_blocks(tg, k, sink, 144, False)


def _group_q5_k(marker, tg, k, sink):
    _k4_blocks(tg, k, sink, 176, True)


def _group_q6_k(marker, tg, k, sink):
    """Q6_K (ql[128], qh[64], scales:int8[16], d): value 32u + l of half h (u < 4, l < 32) has its
    low 4 bits in ql[64h + 32(u % 2) + l] >> 4(u // 2), its high 2 in qh[32h + l] >> 2u; minus 32,
    times d * scales[8h + 2u + l // 16] (ggml dequantize_row_q6_K)."""
    d = carray(_vector(), R)
    a0, a1, a2, a3 = carray(_vector(), R), carray(_vector(), R), carray(_vector(), R), carray(_vector(), R)
    for b in range(k // 256):
        blk = tg[b * 210 * R:(b + 1) * 210 * R]
        _halves(blk, 208, d)
        for h in range(2):
            for l0 in range(0, 32, 16):
                s = 192 + 8 * h + l0 // 16
                s0, s1, s2, s3 = _field(blk, s), _field(blk, s + 2), _field(blk, s + 4), _field(blk, s + 6)
                for r in range(R):
                    a0[r] = d[r] * np.float32(np.int8(s0[r]))
                    a1[r] = d[r] * np.float32(np.int8(s1[r]))
                    a2[r] = d[r] * np.float32(np.int8(s2[r]))
                    a3[r] = d[r] * np.float32(np.int8(s3[r]))
                c = 256 * b + 128 * h + l0
                for i in range(16):  # four values (u = 0..3) per column pair of bytes, constant shifts
                    ql, qm = _field(blk, 64 * h + l0 + i), _field(blk, 64 * h + 32 + l0 + i)
                    qh = _field(blk, 128 + 32 * h + l0 + i)
                    for r in range(R):
                        lo, mid, hi = np.int32(ql[r]), np.int32(qm[r]), np.int32(qh[r])
                        _put(sink, c + i, r, a0[r] * np.float32(np.int32(((lo & 15) | ((hi & 3) << 4)) - 32)))
                        _put(sink, c + 32 + i, r, a1[r] * np.float32(np.int32(((mid & 15) | ((hi & 12) << 2)) - 32)))
                        _put(sink, c + 64 + i, r, a2[r] * np.float32(np.int32(((lo >> 4) | (hi & 48)) - 32)))
                        _put(sink, c + 96 + i, r, a3[r] * np.float32(np.int32(((mid >> 4) | ((hi & 192) >> 2)) - 32)))


# The table: marker name -> decoder. Types not here are dequantized at load by the caller.
_GROUPS = {"f16": _group_f16, "bf16": _group_bf16, "q4_0": _group_q4_0, "q4_1": _group_q4_1,
           "q5_0": _group_q5_0, "q5_1": _group_q5_1, "q8_0": _group_q8_0, "q4_k": _group_q4_k,
           "q5_k": _group_q5_k, "q6_k": _group_q6_k}
KERNEL_TYPES = frozenset(name.upper() for name in _GROUPS)


def _group(marker, tg, k, sink):
    """Decode the k columns of group tg for the block type `marker` names (from _GROUPS)."""


@overload(_group, inline="always")
def _group_typed(marker, tg, k, sink):
    return _GROUPS[next(iter(marker.dtype.fields))]


# ---------------------------------------------------------------------------- entry points

@njit(parallel=True, **_JIT)
def matvec(marker, t, x, out):
    """out[r] = W[r] @ x for the rows of W (groups t [G, bytes]); x [k] float32, out [G * R]."""
    for g in prange(t.shape[0]):
        acc = carray(_vector(), R)
        for r in range(R):
            acc[r] = 0
        _group(marker, t[g], x.shape[0], (acc, x))
        for r in range(R):
            out[g * R + r] = acc[r]


@njit(**_JIT)
def dequantize(marker, t, g0, out):
    """out[:, i * R + r] = row r of group g0 + i, as float32 columns: out [k, m * R] for m groups.
    On the calling thread: prefill alternates it with BLAS sgemm, and a parallel region here would
    compete for the cores with BLAS's worker threads, which spin for a while after each product."""
    for i in range(out.shape[1] // R):
        _group(marker, t[g0 + i], out.shape[0], out[:, i * R:(i + 1) * R])


@njit(parallel=True, **_JIT)
def transpose(raw, t):
    """Byte-transpose rows raw [rows, row_bytes] into groups t [G, row_bytes * R] (the layout above);
    rows past the end stay zero (zero scales: the padding rows come out 0). In tiles of 64 x 64 bytes,
    so that reads and writes both stay within cache lines."""
    n = raw.shape[0]
    for g in prange(t.shape[0]):
        tg = t[g]
        for p0 in range(0, raw.shape[1], 64):
            for r in range(min(R, n - g * R)):
                src = raw[g * R + r]
                for p in range(p0, min(p0 + 64, raw.shape[1])):
                    tg[p * R + r] = src[p]

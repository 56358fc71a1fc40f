"""Compiled CPU kernels (numba): matrix products computed straight from GGUF blocks.

A weight matrix stays in its file's blocks. A kernel walks one row's blocks, decodes each value in
registers (block scale applied, minimum subtracted, in float32 as `formats/quants.py` decodes them)
and multiplies it into the activations of up to `G` tokens, accumulating 32 lanes per token that
live in registers: a row costs one horizontal sum at its end, not one per block. Rows run in
parallel. `dequantize` decodes whole rows into float32 (prefill tiles for BLAS sgemm, embedding rows).

Block layouts: ggml/src/ggml-common.h (`block_q4_0` ... `block_q6_K`); value order follows
quants.py, and the tests hold every kernel to NumPy dequantization + matmul on random blocks.

Dispatch: each block type has a marker (an empty array whose record dtype is named after the type);
`_row` picks the type's row walker from `_ROWS` at compile time, so one kernel source serves every
type and each (kernel, type) pair compiles on first use only. Compiled code is cached on disk
(numba `cache=True`: beside this file, or numba's user-wide cache directory when that is read-only).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

G = 4        # tokens per pass over a row: G x 32 float32 lanes (8 AVX-512 registers)
LANES = 32   # every supported block is a whole number of 32-value runs
# reassoc lets the lane sums vectorize, contract makes multiply-adds FMAs; no nnan/ninf: inf and nan stay
_JIT = dict(cache=True, fastmath={"reassoc", "contract", "nsz"}, nogil=True)


def marker(name: str) -> np.ndarray:
    """The dispatch marker of block type `name` ("Q4_K", "F16", ...)."""
    return np.empty(0, np.dtype([(name.lower(), np.uint8)]))


# ---------------------------------------------------------------------------- scalar helpers

@intrinsic
def _stack_lanes(typingctx):
    """G * LANES float32 on the stack: an alloca in the entry block, which LLVM keeps in registers."""
    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=G * LANES)
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
def _u16(w, o):
    return np.int32(w[o]) | (np.int32(w[o + 1]) << 8)


@njit(inline="always")
def _half(h):
    """IEEE half bits -> float32, exactly: exponent and mantissa moved into float32 position and scaled
    by 2^112 (subnormals included); an all-ones exponent stays inf/nan."""
    bits = np.int32((h & 0x7FFF) << 13)
    if (h & 0x7C00) == 0x7C00:
        v = _f32_from_bits(bits | 0x7F800000)
    else:
        v = _f32_from_bits(bits) * np.float32(2.0 ** 112)
    return -v if h & 0x8000 else v


@njit(inline="always")
def _lo(v):
    return np.float32(np.int32(v & 15))


@njit(inline="always")
def _hi(v):
    return np.float32(np.int32(v >> 4))


@njit(inline="always")
def _scale_min_k4(w, o, j):
    """Q4_K/Q5_K: 6-bit scale and minimum of sub-block j from the 12 bytes at w[o] (ggml get_scale_min_k4)."""
    if j < 4:
        return np.float32(w[o + j] & 63), np.float32(w[o + j + 4] & 63)
    return (np.float32((w[o + j + 4] & 15) | ((w[o + j - 4] >> 6) << 4)),
            np.float32((w[o + j + 4] >> 4) | ((w[o + j] >> 6) << 4)))


def _emit(acc, v, x, t0, nt, base, lane):
    """Value `v` of column base + lane (lane < 32) into `acc`: stored (x is None: dequantize into the
    row acc), or multiplied into x (one token [k]) or into tokens t0..t0+nt-1 of x [n, k] (nt <= G),
    in lane `lane` of each token's lanes. The form is chosen by x's type at compile time."""


@overload(_emit, inline="always")
def _emit_typed(acc, v, x, t0, nt, base, lane):
    if isinstance(x, types.NoneType):
        def store(acc, v, x, t0, nt, base, lane):
            acc[base + lane] = v
        return store
    if x.ndim == 1:
        def one(acc, v, x, t0, nt, base, lane):
            acc[lane] += v * x[base + lane]
        return one

    def tokens(acc, v, x, t0, nt, base, lane):
        for t in range(G):
            acc[t * LANES + lane] += v * x[t0 + t, base + lane]
    return tokens


# ---------------------------------------------------------------------------- row walkers, one per type
# Each walks all blocks of row `w` (its bytes) and emits every value with its column. They are compiled
# only inside the kernels, through `_row`.

def _row_f16(marker, w, x, t0, nt, acc):
    k = w.shape[0] // 2
    for c0 in range(0, k - k % LANES, LANES):
        for i in range(LANES):
            _emit(acc, _half(_u16(w, 2 * (c0 + i))), x, t0, nt, c0, i)
    k32 = k - k % LANES
    for i in range(k % LANES):
        _emit(acc, _half(_u16(w, 2 * (k32 + i))), x, t0, nt, k32, i)


def _row_bf16(marker, w, x, t0, nt, acc):
    k = w.shape[0] // 2
    for c0 in range(0, k - k % LANES, LANES):
        for i in range(LANES):
            _emit(acc, _f32_from_bits(_u16(w, 2 * (c0 + i)) << 16), x, t0, nt, c0, i)
    k32 = k - k % LANES
    for i in range(k % LANES):
        _emit(acc, _f32_from_bits(_u16(w, 2 * (k32 + i)) << 16), x, t0, nt, k32, i)


def _row_q4_0(marker, w, x, t0, nt, acc):  # d:f16, qs[16]: value (q - 8) * d
    for b in range(w.shape[0] // 18):
        o, c = 18 * b, 32 * b
        d = _half(_u16(w, o))
        m = np.float32(-8) * d
        for i in range(16):
            v = np.int32(w[o + 2 + i])
            _emit(acc, d * _lo(v) + m, x, t0, nt, c, i)
            _emit(acc, d * _hi(v) + m, x, t0, nt, c, 16 + i)


def _row_q4_1(marker, w, x, t0, nt, acc):  # d:f16, m:f16, qs[16]: value q * d + m
    for b in range(w.shape[0] // 20):
        o, c = 20 * b, 32 * b
        d, m = _half(_u16(w, o)), _half(_u16(w, o + 2))
        for i in range(16):
            v = np.int32(w[o + 4 + i])
            _emit(acc, d * _lo(v) + m, x, t0, nt, c, i)
            _emit(acc, d * _hi(v) + m, x, t0, nt, c, 16 + i)


@njit(inline="always")
def _q5_row(w, x, t0, nt, acc, size, has_min):
    """Q5_0 (d, qh[4], qs[16]: (q - 16) * d) and Q5_1 (d, m, qh[4], qs[16]: q * d + m): bit 4 of value j
    is bit j of the little-endian u32 qh."""
    for b in range(w.shape[0] // size):
        o, c = size * b, 32 * b
        d = _half(_u16(w, o))
        m = _half(_u16(w, o + 2)) if has_min else np.float32(-16) * d
        h = o + 4 if has_min else o + 2
        qh = _u16(w, h) | (_u16(w, h + 2) << 16)
        for i in range(16):
            v = np.int32(w[h + 4 + i])
            lo = np.float32(np.int32((v & 15) | (((qh >> i) & 1) << 4)))
            hi = np.float32(np.int32((v >> 4) | (((qh >> (i + 16)) & 1) << 4)))
            _emit(acc, d * lo + m, x, t0, nt, c, i)
            _emit(acc, d * hi + m, x, t0, nt, c, 16 + i)


def _row_q5_0(marker, w, x, t0, nt, acc):
    _q5_row(w, x, t0, nt, acc, 22, False)


def _row_q5_1(marker, w, x, t0, nt, acc):
    _q5_row(w, x, t0, nt, acc, 24, True)


def _row_q8_0(marker, w, x, t0, nt, acc):  # d:f16, qs:int8[32]: value q * d
    for b in range(w.shape[0] // 34):
        o, c = 34 * b, 32 * b
        d = _half(_u16(w, o))
        for i in range(32):
            _emit(acc, d * np.float32(np.int8(w[o + 2 + i])), x, t0, nt, c, i)


@njit(inline="always")
def _k4_row(w, x, t0, nt, acc, size, five):
    """Q4_K (d, dmin, scales[12], qs[128]) and Q5_K (d, dmin, scales[12], qh[32], qs[128]): value
    d * scale_j * q - dmin * min_j for sub-block j; 32 bytes of qs hold sub-block 2i in their low
    nibbles and 2i+1 in their high ones; bit 4 of value l of sub-block j is bit j of qh[l]."""
    for b in range(w.shape[0] // size):
        o, c0 = size * b, 256 * b
        d, dmin = _half(_u16(w, o)), _half(_u16(w, o + 2))
        qs = o + 48 if five else o + 16
        for j in range(4):
            s0, m0 = _scale_min_k4(w, o + 4, 2 * j)
            s1, m1 = _scale_min_k4(w, o + 4, 2 * j + 1)
            a0, b0, a1, b1 = d * s0, -(dmin * m0), d * s1, -(dmin * m1)
            q, c = qs + 32 * j, c0 + 64 * j
            for i in range(32):
                v = np.int32(w[q + i])
                if five:
                    h = np.int32(w[o + 16 + i]) >> (2 * j)
                    lo = np.float32(np.int32((v & 15) | ((h & 1) << 4)))
                    hi = np.float32(np.int32((v >> 4) | ((h & 2) << 3)))
                else:
                    lo, hi = _lo(v), _hi(v)
                _emit(acc, a0 * lo + b0, x, t0, nt, c, i)
                _emit(acc, a1 * hi + b1, x, t0, nt, c + 32, i)


def _row_q4_k(marker, w, x, t0, nt, acc):
    _k4_row(w, x, t0, nt, acc, 144, False)


def _row_q5_k(marker, w, x, t0, nt, acc):
    _k4_row(w, x, t0, nt, acc, 176, True)


def _row_q6_k(marker, w, x, t0, nt, acc):
    """Q6_K (ql[128], qh[64], scales:int8[16], d): two halves of 128 values; value l + 32u of half h is
    (4-bit part of ql[64h + 32(u % 2) + l] >> 4(u // 2)) | (2 bits of qh[32h + l] >> 2u) << 4, minus 32,
    times d * scales[8h + 2u + l // 16] (ggml dequantize_row_q6_K)."""
    for b in range(w.shape[0] // 210):
        o, c0 = 210 * b, 256 * b
        d = _half(_u16(w, o + 208))
        for h in range(2):
            ql, qh, c = o + 64 * h, o + 128 + 32 * h, c0 + 128 * h
            for l0 in range(0, 32, 16):
                s = o + 192 + 8 * h + l0 // 16
                d0 = d * np.float32(np.int8(w[s]))
                d1 = d * np.float32(np.int8(w[s + 2]))
                d2 = d * np.float32(np.int8(w[s + 4]))
                d3 = d * np.float32(np.int8(w[s + 6]))
                for i in range(16):
                    l = l0 + i
                    a, e, hb = np.int32(w[ql + l]), np.int32(w[ql + 32 + l]), np.int32(w[qh + l])
                    q0 = np.float32(np.int32(((a & 15) | ((hb & 3) << 4)) - 32))
                    q1 = np.float32(np.int32(((e & 15) | ((hb & 12) << 2)) - 32))
                    q2 = np.float32(np.int32(((a >> 4) | (hb & 48)) - 32))
                    q3 = np.float32(np.int32(((e >> 4) | ((hb & 192) >> 2)) - 32))
                    _emit(acc, d0 * q0, x, t0, nt, c, l)
                    _emit(acc, d1 * q1, x, t0, nt, c + 32, l)
                    _emit(acc, d2 * q2, x, t0, nt, c + 64, l)
                    _emit(acc, d3 * q3, x, t0, nt, c + 96, l)


# The table: marker name -> row walker. Types not here are dequantized at load by the caller.
_ROWS = {"f16": _row_f16, "bf16": _row_bf16, "q4_0": _row_q4_0, "q4_1": _row_q4_1, "q5_0": _row_q5_0,
         "q5_1": _row_q5_1, "q8_0": _row_q8_0, "q4_k": _row_q4_k, "q5_k": _row_q5_k, "q6_k": _row_q6_k}
KERNEL_TYPES = frozenset(name.upper() for name in _ROWS)


def _row(marker, w, x, t0, nt, acc):
    """Walk row `w` of the block type that `marker` names (chosen at compile time from _ROWS)."""


@overload(_row, inline="always")
def _row_typed(marker, w, x, t0, nt, acc):
    return _ROWS[next(iter(marker.dtype.fields))]


# ---------------------------------------------------------------------------- entry points

@njit(inline="always")
def _row_bytes(buf, offs, row0, row_bytes, r):
    """Row r of a matrix stacked from parts: part p's rows row0[p].. start at byte offs[p] of buf."""
    p = 0
    while r >= row0[p + 1]:
        p += 1
    s = offs[p] + (r - row0[p]) * row_bytes
    return buf[s:s + row_bytes]


@njit(inline="always")
def _lane_sum(lanes, t):
    s = np.float32(0)
    for i in range(LANES):
        s += lanes[t * LANES + i]
    return s


@njit(parallel=True, **_JIT)
def matvec(marker, buf, offs, row0, row_bytes, x, out):
    """out[r] = W[r] @ x for every row r of W (rows of one block type, see _row_bytes); x [k] float32."""
    for r in prange(row0[-1]):
        lanes = carray(_stack_lanes(), G * LANES)
        for i in range(LANES):
            lanes[i] = 0
        _row(marker, _row_bytes(buf, offs, row0, row_bytes, r), x, 0, 1, lanes)
        out[r] = _lane_sum(lanes, 0)


@njit(parallel=True, **_JIT)
def matmul(marker, buf, offs, row0, row_bytes, x, out):
    """out[:, r] = x @ W[r] for every row r of W; x [n, k] float32 with n a multiple of G (callers pad
    with zero rows: a guard per token keeps LLVM from vectorizing), out [n, rows]. Each pass over a
    row's blocks serves G tokens, so a row is decoded n / G times."""
    for r in prange(row0[-1]):
        w = _row_bytes(buf, offs, row0, row_bytes, r)
        lanes = carray(_stack_lanes(), G * LANES)
        for t0 in range(0, x.shape[0], G):
            for i in range(G * LANES):
                lanes[i] = 0
            _row(marker, w, x, t0, G, lanes)
            for t in range(G):
                out[t0 + t, r] = _lane_sum(lanes, t)


@njit(**_JIT)
def dequantize(marker, buf, offs, row0, row_bytes, rows, out):
    """out[i] = W[rows[i]] as float32 (rows of one block type, see _row_bytes); out [len(rows), k].
    On the calling thread: it alternates with BLAS sgemm in prefill, and a parallel region here would
    compete for the cores with BLAS's worker threads, which spin for a while after each product."""
    for i in range(rows.shape[0]):
        _row(marker, _row_bytes(buf, offs, row0, row_bytes, rows[i]), None, 0, 0, out[i])

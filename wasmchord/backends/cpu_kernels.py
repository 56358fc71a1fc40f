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
`_group` picks the type's decoder from `_DECODERS` at compile time, so one kernel source serves every
type and each (kernel, type) pair compiles on first use only. Compiled code is cached on disk (numba
`cache=True`: beside this file, or in numba's user-wide cache directory when that is read-only).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..formats.quants import IQ4_VALUES

R = 64  # rows per group: 4 AVX-512 (8 AVX2) registers per vector; fewer would let LLVM unroll the row
        # loops before vectorizing them, and it then vectorizes across columns (gathers) instead
# reassoc lets sums vectorize, contract makes multiply-adds FMAs; no nnan/ninf: inf and nan stay
JIT = dict(cache=True, fastmath={"reassoc", "contract", "nsz"}, nogil=True)


@functools.cache
def marker(name: str) -> np.ndarray:
    """The dispatch marker of block type `name` ("Q4_K", "F16", ...)."""
    return np.empty(0, np.dtype([(name.lower(), np.uint8)]))


# ---------------------------------------------------------------------------- helpers

def _stack(n: int, dtype=types.float32):
    """An intrinsic giving n values of `dtype` on the stack: an alloca in the entry block, which LLVM
    keeps in registers when every index into it is a loop counter of a constant range (and n is small)."""
    @intrinsic
    def stack(typingctx):
        def codegen(context, builder, sig, args):
            return cgutils.alloca_once(builder, context.get_value_type(dtype), size=n)
        return types.CPointer(dtype)(), codegen
    return stack


def _target_has(*features: str) -> bool:
    """Whether numba compiles for a CPU with all these features ("avx512f", ...): the host's, or the
    target set by NUMBA_CPU_NAME / NUMBA_CPU_FEATURES (portable caches)."""
    import llvmlite.binding as ll
    from numba.core import config
    if config.CPU_NAME:
        return all(f"+{f}" in (config.CPU_FEATURES or "") for f in features)
    host = ll.get_host_cpu_features()
    return all(bool(host.get(f)) for f in features)


CHUNK = 256   # columns decoded at a time by matvec and the integer kernels (a whole K-quant block)
# columns matmul decodes at a time for types of 32-column blocks and f16/bf16: 64 x R float32 = 16 KiB stays
# in L1 while the tokens' products read it, where CHUNK x R (64 KiB) went through L2 (Zen 3, SmolLM2's Q4_1
# and Q8_0 matrices at 8 and 16 tokens: 0.85-0.97x the time; the same sums in the same order). K-quants keep
# CHUNK: decoded a quarter block at a time they gained nothing
SMALL_CHUNK = 64
TOKENS = 4    # tokens per pass over a decoded chunk
# rows per pass of matmul over a chunk, whose TOKENS x ROWS sums stay in registers: all R with AVX-512
# (16 of its 32 registers); 16 elsewhere (AVX2 has 16 registers of 8 floats: TOKENS x R sums spilled
# to the stack, two moves per FMA; Zen 3, 64 tokens: 37-66 -> 100-119 GFLOP/s, the same sums)
ROWS = R if _target_has("avx512f") else 16  # AVX-512F: 32 registers of 16 floats
_vector = _stack(R)
_chunk = _stack(CHUNK * R)
_token_block = _stack(TOKENS * ROWS)


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


# Integer work in 32 bits. numba computes integers in 64 bits, and LLVM narrows them back to 32-bit
# vector lanes only sometimes; in 64-bit lanes a vector holds 8 values instead of 16. The bit
# fiddling of the decoders is therefore written as two small intrinsics whose LLVM IR is 32-bit.

def _i32(builder, v):
    i32 = ir.IntType(32)
    return builder.trunc(v, i32) if v.type.width > 32 else builder.zext(v, i32) if v.type.width < 32 else v


@intrinsic
def _bits(typingctx, a, sa, b, sb, mb, off):
    """float32(((a >> sa) & 15) | (((b >> sb) & mb) << 4)) + off, in 32-bit integers: a nibble of byte
    a, with high bits from byte b (mb = 0: none) and an offset (Q6_K's -32)."""
    def codegen(context, builder, sig, args):
        a, sa, b, sb, mb, off = args
        lo = builder.and_(builder.lshr(_i32(builder, a), _i32(builder, sa)), ir.Constant(ir.IntType(32), 15))
        hi = builder.and_(builder.lshr(_i32(builder, b), _i32(builder, sb)), _i32(builder, mb))
        v = builder.or_(lo, builder.shl(hi, ir.Constant(ir.IntType(32), 4)))
        return builder.fadd(builder.sitofp(v, ir.FloatType()), off)
    return types.float32(a, sa, b, sb, mb, types.float32), codegen


@intrinsic
def _byte(typingctx, a, sa, b, sb, mb, off):
    """`_bits` as the integer kernel's byte, value + 128, in 8-bit integers (a vector of 64 rows is one
    register, where `_bits`' 32-bit lanes need four and two conversions)."""
    def codegen(context, builder, sig, args):
        a, sa, b, sb, mb, off = args
        i8 = ir.IntType(8)
        lo = builder.and_(builder.lshr(_i8(builder, a), _i8(builder, sa)), ir.Constant(i8, 15))
        hi = builder.and_(builder.lshr(_i8(builder, b), _i8(builder, sb)), _i8(builder, mb))
        v = builder.or_(lo, builder.shl(hi, ir.Constant(i8, 4)))
        bias = builder.add(builder.trunc(builder.fptosi(off, ir.IntType(32)), i8), ir.Constant(i8, 128))
        return builder.add(v, bias)
    return types.uint8(a, sa, b, sb, mb, types.float32), codegen


def _i8(builder, v):
    return builder.trunc(v, ir.IntType(8)) if v.type.width > 8 else v


@intrinsic
def _half(typingctx, lo, hi):
    """The f16 with bytes lo, hi as float32, exactly, without branches: exponent and mantissa moved to
    float32 position and scaled by 2^112 (subnormals included); an all-ones exponent becomes float32's
    (inf and nan stay inf and nan); then the sign bit."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        c = lambda v: ir.Constant(i32, v)  # noqa: E731
        lo, hi = _i32(builder, args[0]), _i32(builder, args[1])
        mag = builder.or_(builder.shl(builder.and_(hi, c(0x7F)), c(21)), builder.shl(lo, c(13)))
        special = builder.icmp_unsigned("==", builder.and_(hi, c(0x7C)), c(0x7C))
        bits = builder.add(mag, builder.select(special, c(0x70000000), c(0)))
        f = builder.fmul(builder.bitcast(bits, ir.FloatType()), ir.Constant(ir.FloatType(), 2.0 ** 112))
        signed = builder.or_(builder.bitcast(f, i32), builder.shl(builder.and_(hi, c(0x80)), c(24)))
        return builder.bitcast(signed, ir.FloatType())
    return types.float32(lo, hi), codegen


AHEAD = 2048  # bytes: how far ahead of the field being decoded the dot products ask for the weights


@intrinsic
def _prefetch(typingctx, blk, i):
    """Ask for the cache line holding byte i of uint8 array blk's data (i may run past the view's end,
    into the next block or group: a prefetch never faults)."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        # the name's pointer suffix follows llvmlite's pointers (typed "p0i8" before, opaque "p0" now)
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        addr = builder.gep(builder.bitcast(data, i8p), [args[1]])
        builder.call(fn, [addr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(blk, i), codegen


@njit(inline="always")
def _prefetch_lines(blk, first, n):
    """Ask for fields first..first+n of blk (a field is R bytes, one line): the integer decoders ask for
    the weights in order a few fields per step, or a whole next chunk as they start a block."""
    for f in range(first, first + n):
        _prefetch(blk, f * R)


@njit(inline="always")
def _field(blk, i):
    """Byte i of the blocks of a group: R bytes, one per row."""
    return blk[i * R:(i + 1) * R]


@njit(inline="always")
def _halves(blk, i, out):
    """out[r] = the f16 at bytes i, i+1 of row r's block, as float32."""
    lo, hi = _field(blk, i), _field(blk, i + 1)
    for r in range(R):
        out[r] = _half(lo[r], hi[r])


def _dot_sink(sink):
    """A dot product's sink (acc, sub, x): float32 arrays."""
    return isinstance(sink, types.BaseTuple) and sink.types[0].dtype == types.float32


def _int_sink(sink):
    """The integer kernel's sink (wc, ab, mb, wq): values as bytes (column-major), scales and offsets per
    scale group, and the bytes interleaved for vpdpbusd (written by the decoders that skip wc)."""
    return isinstance(sink, types.BaseTuple) and sink.types[0].dtype == types.uint8


def _value(sink, a, sa, b, sb, mb, off):
    """A decoded value as the sink takes it: `_bits` (float32), or `_byte` for the integer kernel."""


@overload(_value, inline="always")
def _value_typed(sink, a, sa, b, sb, mb, off):
    if _int_sink(sink):
        return lambda sink, a, sa, b, sb, mb, off: _byte(a, sa, b, sb, mb, off)
    return lambda sink, a, sa, b, sb, mb, off: _bits(a, sa, b, sb, mb, off)


def _value_int8(sink, q):
    """An int8 weight stored as the byte q (Q8_0): float32, or q + 128 (q ^ 0x80) for the integer kernel."""


@overload(_value_int8, inline="always")
def _value_int8_typed(sink, q):
    if _int_sink(sink):
        return lambda sink, q: q ^ np.uint8(128)
    return lambda sink, q: np.float32(np.int8(q))


def _put(sink, c, r, q, a, m):
    """Value q of column c, row r, whose scale group has scales a and offsets m (value = a[r] * q +
    m[r]; a or m None: 1 or 0): into a dot product (sink = (acc, sub, x): sub[r] += q * x[c], scaled
    by _scale once per group) or stored (sink = out [k, R]: out[c, r] = the value). The form is
    chosen by the sink's type at compile time."""


@overload(_put, inline="always")
def _put_typed(sink, c, r, q, a, m):
    scaled, offset = not isinstance(a, types.NoneType), not isinstance(m, types.NoneType)
    if _dot_sink(sink):
        def dot(sink, c, r, q, a, m):
            sink[1][r] += q * sink[2][c]
        return dot
    if _int_sink(sink):
        def byte(sink, c, r, q, a, m):  # q: the byte (`_value`); column-major, `_interleave` follows
            sink[0][np.uint64(c * R + r)] = q
        return byte

    def store(sink, c, r, q, a, m):
        v = a[r] * q if scaled else q
        sink[c, r] = v + m[r] if offset else v
    return store


def _scale(sink, c0, n, a, m):
    """Close the scale group of columns c0..c0+n: a dot product adds a * sub + m * (the sum of those
    columns of x) to acc and clears sub, one multiply per value instead of two."""


@overload(_scale, inline="always")
def _scale_typed(sink, c0, n, a, m):
    scaled, offset = not isinstance(a, types.NoneType), not isinstance(m, types.NoneType)
    if _int_sink(sink):
        def group(sink, c0, n, a, m):
            ab, mb = sink[1], sink[2]
            for r in range(R):
                ab[c0 // n, r] = a[r] if scaled else np.float32(1)
                mb[c0 // n, r] = m[r] if offset else np.float32(0)
        return group
    if _dot_sink(sink):
        def dot(sink, c0, n, a, m):
            acc, sub, x = sink
            s = np.float32(0)
            if offset:
                for c in range(c0, c0 + n):
                    s += x[c]
            for r in range(R):
                v = a[r] * sub[r] if scaled else sub[r]
                acc[r] += v + m[r] * s if offset else v
                sub[r] = 0
        return dot

    def store(sink, c0, n, a, m):
        pass
    return store


# ---------------------------------------------------------------------------- decoders, one per type
# Each decodes every block of one group `blk` (its transposed bytes) for k columns: per scale group
# it decodes the scales for the R rows at once into stack vectors (a = scale, m = minimum), puts
# each column's integer values (offset included) and closes the group.

def _f16_values(tg, k, sink):
    for c in range(k):
        _prefetch(tg, 2 * c * R + AHEAD)
        lo, hi = _field(tg, 2 * c), _field(tg, 2 * c + 1)
        for r in range(R):
            _put(sink, c, r, _half(lo[r], hi[r]), None, None)
        if c % 32 == 31 or c == k - 1:
            _scale(sink, c - c % 32, c % 32 + 1, None, None)


def _bf16_values(tg, k, sink):
    for c in range(k):
        _prefetch(tg, 2 * c * R + AHEAD)
        lo, hi = _field(tg, 2 * c), _field(tg, 2 * c + 1)
        for r in range(R):
            _put(sink, c, r, _f32_from_bits((np.int32(lo[r]) << 16) | (np.int32(hi[r]) << 24)), None, None)
        if c % 32 == 31 or c == k - 1:
            _scale(sink, c - c % 32, c % 32 + 1, None, None)


def _nibble_values(tg, k, sink, size, has_min, has_high):
    """Q4_0 (d, qs[16]), Q4_1 (d, m, qs[16]), Q5_0 (d, qh[4], qs[16]), Q5_1 (d, m, qh[4], qs[16]):
    32 values, byte i of qs holding value i (low nibble) and i + 16 (high); bit j of the
    little-endian u32 qh is bit 4 of value j. Without m, values are centred: (q - 8) d or (q - 16) d.
    Decoded value by value (tiles for prefill, the integer kernel's bytes of Q5_0 and Q5_1)."""
    a, m = carray(_vector(), R), carray(_vector(), R)
    qs = 2 + 2 * has_min + 4 * has_high
    centre = np.float32(0 if has_min else -16 if has_high else -8)
    for b in range(k // 32):
        blk = tg[b * size * R:(b + 1) * size * R]
        _halves(blk, 0, a)
        if has_min:
            _halves(blk, 2, m)
        for i in range(32):
            q = _field(blk, qs + i % 16)
            h = _field(blk, qs - 4 + i // 8) if has_high else q
            sa, hmask = 4 * (i // 16), 1 if has_high else 0
            for r in range(R):
                v = _value(sink, q[r], sa, h[r], i % 8, hmask, centre)
                if has_min:
                    _put(sink, 32 * b + i, r, v, a, m)
                else:
                    _put(sink, 32 * b + i, r, v, a, None)
        if has_min:
            _scale(sink, 32 * b, 32, a, m)
        else:
            _scale(sink, 32 * b, 32, a, None)


def _nibble_dot(tg, k, sink, size, has_min, has_high):
    """The nibble types into a dot product (one token): both nibbles of a byte at one load, the
    centre and the minimum taken out of the sums: d * (sum q x + centre * sum x) + m * sum x."""
    acc, _, x = sink
    a, m, sq = carray(_vector(), R), carray(_vector(), R), carray(_vector(), R)
    qs = 2 + 2 * has_min + 4 * has_high
    centre, zero = np.float32(0 if has_min else -16 if has_high else -8), np.float32(0)
    for b in range(k // 32):
        blk = tg[b * size * R:(b + 1) * size * R]
        _halves(blk, 0, a)
        if has_min:
            _halves(blk, 2, m)
        for r in range(R):
            sq[r] = 0
        c, sx = 32 * b, zero
        for i in range(16):
            _prefetch(blk, (qs + i) * R + AHEAD)
            q = _field(blk, qs + i)
            xa, xb = x[c + i], x[c + i + 16]
            sx += xa + xb
            if has_high:
                h0, h1 = _field(blk, qs - 4 + i // 8), _field(blk, qs - 2 + i // 8)
                for r in range(R):
                    sq[r] += _bits(q[r], 0, h0[r], i % 8, 1, zero) * xa + _bits(q[r], 4, h1[r], i % 8, 1, zero) * xb
            else:
                for r in range(R):  # in 32-bit lanes (_bits): numba's own integers are 64-bit
                    sq[r] += _bits(q[r], 0, q[r], 0, 0, zero) * xa + _bits(q[r], 4, q[r], 0, 0, zero) * xb
        for r in range(R):
            if has_min:
                acc[r] += a[r] * sq[r] + m[r] * sx
            else:
                acc[r] += a[r] * (sq[r] + centre * sx)


def _nibble_bytes(tg, k, sink, size, has_min):
    """Q4_0 and Q4_1 straight into the integer kernel's interleaved bytes: four bytes of qs (values i..i+3
    and i+16..i+19) interleaved once, then split into their two nibbles (`_interleave_nibbles`), where
    decoding each value and interleaving them costs 4x the shuffles."""
    a, m = carray(_vector(), R), carray(_vector(), R)
    wq = sink[3]
    bias = np.uint8(128 if has_min else 120)  # value + 128; Q4_0's values are q - 8
    for b in range(k // 32):
        blk = tg[b * size * R:(b + 1) * size * R]
        _prefetch_lines(blk, k // 32 * size, size)  # the next chunk's block
        _halves(blk, 0, a)
        if has_min:
            _halves(blk, 2, m)
            _scale(sink, 32 * b, 32, a, m)
        else:
            _scale(sink, 32 * b, 32, a, None)
        qs = 2 + 2 * has_min
        for i in range(0, 16, 4):
            _interleave_nibbles(blk, (qs + i) * R, wq, (32 * b + i) * R, (32 * b + 16 + i) * R, bias)


def _q8_0_bytes(tg, k, sink):
    """Q8_0 (d, qs:int8[32]) straight into the integer kernel's interleaved bytes: its values are the
    bytes (`_interleave_flip`)."""
    d, wq = carray(_vector(), R), sink[3]
    for b in range(k // 32):
        blk = tg[b * 34 * R:(b + 1) * 34 * R]
        _prefetch_lines(blk, k // 32 * 34, 34)
        _halves(blk, 0, d)
        _scale(sink, 32 * b, 32, d, None)
        for i in range(0, 32, 4):
            _interleave_flip(blk, (2 + i) * R, wq, (32 * b + i) * R)


def _q8_0_values(tg, k, sink):
    d = carray(_vector(), R)
    for b in range(k // 32):
        blk = tg[b * 34 * R:(b + 1) * 34 * R]
        _halves(blk, 0, d)
        for i in range(32):
            _prefetch(blk, (2 + i) * R + AHEAD)
            q = _field(blk, 2 + i)
            for r in range(R):
                _put(sink, 32 * b + i, r, _value_int8(sink, q[r]), d, None)
        _scale(sink, 32 * b, 32, d, None)


@njit(inline="always")
def _k4_scale(blk, j, d, dmin, a, m):
    """a = d * scale_j, m = -dmin * min_j of sub-block j, for the R rows (get_scale_min_k4)."""
    zero = np.float32(0)
    if j < 4:  # scale: 6 bits of byte j; min: of byte 4 + j
        s0, s1 = _field(blk, 4 + j), _field(blk, 8 + j)
        for r in range(R):
            a[r] = d[r] * _bits(s0[r], 0, s0[r], 4, 3, zero)
            m[r] = -(dmin[r] * _bits(s1[r], 0, s1[r], 4, 3, zero))
    else:      # nibbles of byte 4 + j, with the top 2 bits of bytes j - 4 and j
        s0, s1, s2 = _field(blk, j), _field(blk, 4 + j), _field(blk, 8 + j)
        for r in range(R):
            a[r] = d[r] * _bits(s2[r], 0, s0[r], 6, 3, zero)
            m[r] = -(dmin[r] * _bits(s2[r], 4, s1[r], 6, 3, zero))


def _k4_values(tg, k, sink, size, five):
    """Q4_K (d, dmin, scales[12], qs[128]) and Q5_K (d, dmin, scales[12], qh[32], qs[128]): value
    d * scale_j * q - dmin * min_j in sub-block j of 32; byte i of qs chunk j // 2 holds value i of
    sub-block j in its low (j even) or high nibble; bit j of qh[i] is bit 4 of that value. The 6-bit
    scales and mins: ggml get_scale_min_k4. Decoded value by value (tiles for prefill, the integer
    kernel's bytes of Q5_K)."""
    d, dmin = carray(_vector(), R), carray(_vector(), R)
    a, m = carray(_vector(), R), carray(_vector(), R)
    qs, zero = 48 if five else 16, np.float32(0)
    for b in range(k // 256):
        blk = tg[b * size * R:(b + 1) * size * R]
        _halves(blk, 0, d)
        _halves(blk, 2, dmin)
        for j in range(8):
            _k4_scale(blk, j, d, dmin, a, m)
            sa, hmask = 4 * (j % 2), 1 if five else 0
            for i in range(32):
                q, h = _field(blk, qs + 32 * (j // 2) + i), _field(blk, 16 + i)
                for r in range(R):
                    _put(sink, 256 * b + 32 * j + i, r, _value(sink, q[r], sa, h[r], j, hmask, zero), a, m)
            _scale(sink, 256 * b + 32 * j, 32, a, m)


def _k4_dot(tg, k, sink, size, five):
    """Q4_K and Q5_K into a dot product (one token): sub-blocks 2p and 2p + 1, the two nibbles of
    the same bytes, decoded together into two sums; scales and minimums applied once per sub-block:
    a_j * sum q x + m_j * sum x."""
    acc, _, x = sink
    d, dmin = carray(_vector(), R), carray(_vector(), R)
    a, m = carray(_vector(), R), carray(_vector(), R)
    s0, s1 = carray(_vector(), R), carray(_vector(), R)
    qs, zero = 48 if five else 16, np.float32(0)
    for b in range(k // 256):
        blk = tg[b * size * R:(b + 1) * size * R]
        _halves(blk, 0, d)
        _halves(blk, 2, dmin)
        for p in range(4):
            c0 = 256 * b + 64 * p
            for r in range(R):
                s0[r] = 0
                s1[r] = 0
            x0, x1 = zero, zero
            for i in range(32):
                _prefetch(blk, (qs + 32 * p + i) * R + AHEAD)
                q = _field(blk, qs + 32 * p + i)
                xa, xb = x[c0 + i], x[c0 + 32 + i]
                x0 += xa
                x1 += xb
                if five:
                    h = _field(blk, 16 + i)
                    for r in range(R):
                        s0[r] += _bits(q[r], 0, h[r], 2 * p, 1, zero) * xa
                        s1[r] += _bits(q[r], 4, h[r], 2 * p + 1, 1, zero) * xb
                else:
                    for r in range(R):  # in 32-bit lanes (_bits): numba's own integers are 64-bit
                        s0[r] += _bits(q[r], 0, q[r], 0, 0, zero) * xa
                        s1[r] += _bits(q[r], 4, q[r], 0, 0, zero) * xb
            _k4_scale(blk, 2 * p, d, dmin, a, m)
            for r in range(R):
                acc[r] += a[r] * s0[r] + m[r] * x0
            _k4_scale(blk, 2 * p + 1, d, dmin, a, m)
            for r in range(R):
                acc[r] += a[r] * s1[r] + m[r] * x1


def _q4_k_bytes(tg, k, sink):
    """Q4_K straight into the integer kernel's interleaved bytes (as `_nibble_bytes`): byte i of qs chunk
    p holds value i of sub-blocks 2p (low nibble) and 2p + 1 (high)."""
    d, dmin = carray(_vector(), R), carray(_vector(), R)
    a, m = carray(_vector(), R), carray(_vector(), R)
    wq = sink[3]
    for b in range(k // 256):
        blk = tg[b * 144 * R:(b + 1) * 144 * R]
        _halves(blk, 0, d)
        _halves(blk, 2, dmin)
        for j in range(8):
            _k4_scale(blk, j, d, dmin, a, m)
            _scale(sink, 256 * b + 32 * j, 32, a, m)
        for p in range(4):
            c = 256 * b + 64 * p
            for i in range(0, 32, 4):
                _prefetch_lines(blk, 144 + 5 * (8 * p + i // 4), 5)  # the next block, over 32 steps (a burst stalls)
                _interleave_nibbles(blk, (16 + 32 * p + i) * R, wq, (c + i) * R, (c + 32 + i) * R, np.uint8(128))


def _q6_k_values(tg, k, sink):
    """Q6_K (ql[128], qh[64], scales:int8[16], d): value 32u + l of half h (u < 4, l < 32) has its
    low 4 bits in ql[64h + 32(u % 2) + l] >> 4(u // 2), its high 2 in qh[32h + l] >> 2u; minus 32,
    times d * scales[8h + 2u + l // 16] (ggml dequantize_row_q6_K). Scale groups of 16 values.
    Decoded value by value (tiles for prefill)."""
    d, a = carray(_vector(), R), carray(_vector(), R)
    m32 = np.float32(-32)
    for b in range(k // 256):
        blk = tg[b * 210 * R:(b + 1) * 210 * R]
        _halves(blk, 208, d)
        for h in range(2):
            for u in range(4):
                lshift, hshift = 4 * (u // 2), 2 * u
                for l0 in range(0, 32, 16):
                    s = _field(blk, 192 + 8 * h + 2 * u + l0 // 16)
                    for r in range(R):
                        a[r] = d[r] * np.float32(np.int8(s[r]))
                    c = 256 * b + 128 * h + 32 * u + l0
                    for i in range(16):
                        ql, qh = _field(blk, 64 * h + 32 * (u % 2) + l0 + i), _field(blk, 128 + 32 * h + l0 + i)
                        for r in range(R):
                            _put(sink, c + i, r, _value(sink, ql[r], lshift, qh[r], hshift, 3, m32), a, None)
                    _scale(sink, c, 16, a, None)


def _q6_k_dot(tg, k, sink):
    """Q6_K into a dot product (one token): the values u and u + 2 that share a byte of ql (its two
    nibbles) are decoded together, each into its own sum, and the -32 is taken out of the sums:
    d * scale * (sum q * x - 32 * sum x). Half the loads and one add less per value than
    `_q6_k_values` (Q6_K matvecs ran at half the speed of Q4_K's)."""
    acc, _, x = sink
    d, s0, s1 = carray(_vector(), R), carray(_vector(), R), carray(_vector(), R)
    zero = np.float32(0)
    for b in range(k // 256):
        blk = tg[b * 210 * R:(b + 1) * 210 * R]
        _halves(blk, 208, d)
        for h in range(2):
            for l0 in range(0, 32, 16):
                for u in range(2):  # values u (low nibbles) and u + 2 (high nibbles)
                    c0 = 256 * b + 128 * h + 32 * u + l0
                    c1 = c0 + 64
                    for r in range(R):
                        s0[r] = 0
                        s1[r] = 0
                    x0, x1 = zero, zero
                    for i in range(16):
                        # the next block's lines in order, two per step (128 steps, 210 lines): the fields
                        # are visited out of order, and asking AHEAD of each one ran at 16 GB/s from DRAM
                        # where the same product hot in cache runs at 24 (Qwen2.5's output matrix)
                        line = 2 * (((2 * h + l0 // 16) * 2 + u) * 16 + i)
                        _prefetch(blk, 210 * R + line * 64)
                        _prefetch(blk, 210 * R + line * 64 + 64)
                        ql, qh = _field(blk, 64 * h + 32 * u + l0 + i), _field(blk, 128 + 32 * h + l0 + i)
                        xa, xb = x[c0 + i], x[c1 + i]
                        x0 += xa
                        x1 += xb
                        for r in range(R):
                            s0[r] += _bits(ql[r], 0, qh[r], 2 * u, 3, zero) * xa
                            s1[r] += _bits(ql[r], 4, qh[r], 2 * u + 4, 3, zero) * xb
                    sc0 = _field(blk, 192 + 8 * h + 2 * u + l0 // 16)
                    sc1 = _field(blk, 192 + 8 * h + 2 * u + 4 + l0 // 16)
                    x0 *= np.float32(32)
                    x1 *= np.float32(32)
                    for r in range(R):
                        acc[r] += (d[r] * np.float32(np.int8(sc0[r]))) * (s0[r] - x0) + \
                                  (d[r] * np.float32(np.int8(sc1[r]))) * (s1[r] - x1)


def _q6_k_bytes(tg, k, sink):
    """Q6_K straight into the integer kernel's interleaved bytes: per half h and four consecutive l, the
    ql bytes of values u = 0..3 (two bytes, two nibbles each) and the qh byte holding their high bits,
    interleaved once each (`_interleave_six`); scale group j of 16 values has scales[j]."""
    d, a = carray(_vector(), R), carray(_vector(), R)
    wq = sink[3]
    for b in range(k // 256):
        blk = tg[b * 210 * R:(b + 1) * 210 * R]
        _halves(blk, 208, d)
        for j in range(16):
            s = _field(blk, 192 + j)
            for r in range(R):
                a[r] = d[r] * np.float32(np.int8(s[r]))
            _scale(sink, 256 * b + 16 * j, 16, a, None)
        for h in range(2):
            for l in range(0, 32, 4):
                _prefetch_lines(blk, 210 + 14 * (8 * h + l // 4), 14)  # the next block, over 16 steps
                _interleave_six(blk, (64 * h + l) * R, (128 + 32 * h + l) * R, wq, (256 * b + 128 * h + l) * R)


def _q2_k_values(tg, k, sink):
    """Q2_K (scales[16], qs[64], d, dmin): value l of group s of half h (l < 32) is bits 2s, 2s + 1 of
    qs[32h + l]; its sub-block of 16 is 8h + 2s + l // 16, whose byte of scales holds the scale (low
    nibble, times d) and the minimum (high nibble, times dmin, subtracted) (ggml dequantize_row_q2_K).
    `_bits` gives the 2-bit value as its high field, 16 q, so the scale is taken / 16 (exact)."""
    d, dmin = carray(_vector(), R), carray(_vector(), R)
    a, m = carray(_vector(), R), carray(_vector(), R)
    zero, z8, sixteenth = np.float32(0), np.uint8(0), np.float32(1 / 16)
    for b in range(k // 256):
        blk = tg[b * 84 * R:(b + 1) * 84 * R]
        _halves(blk, 80, d)
        _halves(blk, 82, dmin)
        for h in range(2):
            for s in range(4):
                for l0 in range(0, 32, 16):
                    sc = _field(blk, 8 * h + 2 * s + l0 // 16)
                    for r in range(R):
                        a[r] = d[r] * _bits(sc[r], 0, sc[r], 0, 0, zero) * sixteenth
                        m[r] = -(dmin[r] * _bits(sc[r], 4, sc[r], 0, 0, zero))
                    c = 256 * b + 128 * h + 32 * s + l0
                    for i in range(16):
                        _prefetch(blk, (16 + 32 * h + l0 + i) * R + AHEAD)
                        q = _field(blk, 16 + 32 * h + l0 + i)
                        for r in range(R):
                            _put(sink, c + i, r, _bits(z8, 0, q[r], 2 * s, 3, zero), a, m)
                    _scale(sink, c, 16, a, m)


_IQ4 = IQ4_VALUES.astype(np.float32)  # kvalues_iq4nl


@intrinsic
def _iq4_pshufb(typingctx, src, si, lo, hi):
    """lo[r], hi[r] = kvalues[low nibble], kvalues[high nibble] of byte src[si + r], r < R, as float32:
    the 16-entry table looked up by vpshufb (AVX2, 32 bytes per instruction), where indexing a table
    compiles to gathers (5x Q4_K's matvec time)."""
    assert R in (32, 64), "two 32-byte vpshufb at most"

    def codegen(context, builder, sig, args):
        i8, i32 = ir.IntType(8), ir.IntType(32)
        v32, idx = ir.VectorType(i8, 32), ir.VectorType(i32, 32)
        table = ir.Constant(v32, [int(v) & 0xFF for v in IQ4_VALUES] * 2)
        fn = builder.module.declare_intrinsic("llvm.x86.avx2.pshuf.b", (), ir.FunctionType(v32, [v32, v32]))
        v = builder.load(_pointer(context, builder, sig.args[0], args[0], args[1], ir.VectorType(i8, R)), align=1)
        for nib, out, ai in ((builder.and_(v, ir.Constant(v.type, [15] * R)), lo, 2),
                             (builder.lshr(v, ir.Constant(v.type, [4] * R)), hi, 3)):
            parts = [builder.call(fn, [table, builder.shuffle_vector(nib, nib, ir.Constant(idx, list(range(h, h + 32))))])
                     for h in range(0, R, 32)]
            vals = parts[0] if R == 32 else builder.shuffle_vector(parts[0], parts[1], ir.Constant(
                ir.VectorType(i32, R), list(range(R))))
            f = builder.sitofp(builder.sext(vals, ir.VectorType(i32, R)), ir.VectorType(ir.FloatType(), R))
            builder.store(f, _pointer(context, builder, sig.args[ai], args[ai], ir.Constant(ir.IntType(64), 0),
                                      f.type), align=4)
        return context.get_dummy_value()
    return types.void(src, si, lo, hi), codegen


@njit(inline="always")
def _iq4_gather(src, si, lo, hi):
    """`_iq4_pshufb` without AVX2: the table indexed value by value."""
    for r in range(R):
        lo[r] = _IQ4[src[si + r] & 15]
        hi[r] = _IQ4[src[si + r] >> 4]


_iq4_lookup = _iq4_pshufb if _target_has("avx2") else _iq4_gather


def _iq4_xs_values(tg, k, sink):
    """IQ4_XS (d, scales_h:u16, scales_l[4], qs[128]): value i of sub-block j of 32 is
    d * (ls_j - 32) * kvalues[n], n the low (i < 16) or high nibble of qs[16j + i % 16]; ls_j's low 4
    bits are nibble j % 2 of scales_l[j // 2], its high 2 bits 2j, 2j + 1 of scales_h (ggml
    dequantize_row_iq4_xs). The table's values take no offset or minimum: into a dot product or a tile
    alike, the table's values for a byte's two nibbles at once, the scale once per sub-block."""
    d, a = carray(_vector(), R), carray(_vector(), R)
    lo, hi = carray(_vector(), R), carray(_vector(), R)
    for b in range(k // 256):
        blk = tg[b * 136 * R:(b + 1) * 136 * R]
        _halves(blk, 0, d)
        for j in range(8):
            sl, sh = _field(blk, 4 + j // 2), _field(blk, 2 + j // 4)
            for r in range(R):
                a[r] = d[r] * _bits(sl[r], 4 * (j % 2), sh[r], 2 * (j % 4), 3, np.float32(-32))
            c = 256 * b + 32 * j
            for i in range(16):
                _prefetch(blk, (8 + 16 * j + i) * R + AHEAD)
                _iq4_lookup(blk, (8 + 16 * j + i) * R, lo, hi)
                for r in range(R):
                    _put(sink, c + i, r, lo[r], a, None)
                for r in range(R):
                    _put(sink, c + 16 + i, r, hi[r], a, None)
            _scale(sink, c, 32, a, None)


# The table: marker name -> (its decoder into a dot product, into float32 values, into the integer
# kernel's bytes; the constant arguments, of which each decoder takes the first it names). Types not
# here are dequantized at load by the caller.
_DECODERS = {
    "f16": (_f16_values, _f16_values, _f16_values, ()),
    "bf16": (_bf16_values, _bf16_values, _bf16_values, ()),
    "q4_0": (_nibble_dot, _nibble_values, _nibble_bytes, (18, False, False)),
    "q4_1": (_nibble_dot, _nibble_values, _nibble_bytes, (20, True, False)),
    "q5_0": (_nibble_dot, _nibble_values, _nibble_values, (22, False, True)),
    "q5_1": (_nibble_dot, _nibble_values, _nibble_values, (24, True, True)),
    "q8_0": (_q8_0_values, _q8_0_values, _q8_0_bytes, ()),
    "q4_k": (_k4_dot, _k4_values, _q4_k_bytes, (144, False)),
    "q5_k": (_k4_dot, _k4_values, _k4_values, (176, True)),
    "q6_k": (_q6_k_dot, _q6_k_values, _q6_k_bytes, ()),
    "q2_k": (_q2_k_values, _q2_k_values, None, ()),      # these two are not integer-kernel types (INT_TYPES)
    "iq4_xs": (_iq4_xs_values, _iq4_xs_values, None, ()),
}
KERNEL_TYPES = frozenset(name.upper() for name in _DECODERS)


@functools.cache
def _inlined(decoder):
    """A decoder compiled into its caller (numba inlines its IR at the call)."""
    return njit(inline="always")(decoder)


def _group(marker, tg, k, sink):
    """Decode the k columns of group tg for the block type `marker` names into `sink` (from _DECODERS)."""


@overload(_group, inline="always")
def _group_typed(marker, tg, k, sink):
    """The one overload between a kernel and its decoder, which is inlined as plain code with its
    constants. (Through three levels of inlined overloads, by type, then sink, then constants, the
    first compilation of `matvec` for Q4_1 took 20-27 s on a 2-core Zen 3; with one, 5 s.)"""
    dot, values, as_bytes, consts = _DECODERS[next(iter(marker.dtype.fields))]
    body = dot if _dot_sink(sink) else as_bytes if _int_sink(sink) else values
    decoder, consts = _inlined(body), consts[:len(inspect.signature(body).parameters) - 3]  # those it takes
    if consts == ():
        return lambda marker, tg, k, sink: decoder(tg, k, sink)
    if len(consts) == 2:
        c0, c1 = consts
        return lambda marker, tg, k, sink: decoder(tg, k, sink, c0, c1)
    c0, c1, c2 = consts
    return lambda marker, tg, k, sink: decoder(tg, k, sink, c0, c1, c2)


def _chunk_cols(marker):
    """The columns `matmul` decodes at a time for the block type `marker` names."""


@overload(_chunk_cols, inline="always")
def _chunk_cols_typed(marker):
    cols = CHUNK if next(iter(marker.dtype.fields)) in ("q2_k", "q4_k", "q5_k", "q6_k", "iq4_xs") else SMALL_CHUNK
    return lambda marker: cols


# ---------------------------------------------------------------------------- entry points

@njit(parallel=True, **JIT)
def matvec(marker, t, cols_per_block, x, out):
    """out[r] = W[r] @ x for the rows of W (groups t [G, bytes]); x [k] float32, out [G * R]. CHUNK
    columns at a time, as `matmul` decodes them (Qwen2.5-1.5B decode 12.3 -> 13.3 tok/s against whole
    rows at once; software prefetch of the next chunk made it slower)."""
    k, width = x.shape[0], t.shape[1]
    for g in prange(t.shape[0]):
        tg, acc, sub = t[g], carray(_vector(), R), carray(_vector(), R)
        for r in range(R):
            acc[r] = 0
            sub[r] = 0
        for c0 in range(0, k, CHUNK):
            kc = min(CHUNK, k - c0)
            b0, b1 = c0 * width // k, (c0 + kc) * width // k
            _group(marker, tg[b0:b1], kc, (acc, sub, x[c0:c0 + kc]))
        for r in range(R):
            out[g * R + r] = acc[r]


@intrinsic
def _fma8(typingctx, acc, ai, w, wi, xv):
    """acc[ai:ai + 8] += w[wi:wi + 8] * xv (float32): one 8-lane FMA, written as a vector so that LLVM
    keeps the lanes over rows (left to itself with 16 rows it vectorizes across columns, with gathers)."""
    def codegen(context, builder, sig, args):
        v8 = ir.VectorType(ir.FloatType(), 8)
        pa = _pointer(context, builder, sig.args[0], args[0], args[1], v8)
        pw = _pointer(context, builder, sig.args[2], args[2], args[3], v8)
        xb = builder.insert_element(ir.Constant(v8, ir.Undefined), args[4], ir.Constant(ir.IntType(32), 0))
        xb = builder.shuffle_vector(xb, xb, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
        fma = builder.module.declare_intrinsic("llvm.fma.v8f32", (), ir.FunctionType(v8, [v8] * 3))
        builder.store(builder.call(fma, [builder.load(pw, align=4), xb, builder.load(pa, align=4)]), pa, align=4)
        return context.get_dummy_value()
    return types.void(acc, ai, w, wi, xv), codegen


@njit(parallel=True, **JIT)
def matmul(marker, t, cols_per_block, x, out):
    """out[:, g * R + r] = x @ W[g * R + r] for the groups t of W; x [n, k] float32 with n a multiple of
    TOKENS (callers pad with zero rows), out [n, G * R]. Per group, 64 or 256 columns at a time are decoded
    into a float32 buffer on the stack (in cache) and multiplied into TOKENS tokens x ROWS rows at a
    time, whose accumulators stay in registers for the chunk: a small GEMM, parallel over groups. Each
    sum runs over the columns in order whatever ROWS is: the results do not depend on the CPU."""
    n, k = x.shape
    size = t.shape[1] * cols_per_block // (k * R)  # bytes per block
    for g in prange(t.shape[0]):
        chunk = _chunk()
        tg, w, wf = t[g], carray(chunk, (CHUNK, R)), carray(chunk, CHUNK * R)
        og = np.uint64(g * R)  # unsigned indices and row views: vector loads and stores, no wraparound code
        for i in range(n):
            orow = out[i]
            for r in range(R):
                orow[og + np.uint64(r)] = 0
        cols = _chunk_cols(marker)
        for c0 in range(0, k, cols):
            kc = min(cols, k - c0)
            b0 = c0 // cols_per_block
            _group(marker, tg[b0 * size * R:(b0 + kc // cols_per_block) * size * R], kc, w)
            for t0 in range(0, n, TOKENS):
                for rs in range(0, R, ROWS):
                    acc = carray(_token_block(), TOKENS * ROWS)
                    ors = og + np.uint64(rs)
                    for i in range(TOKENS):
                        orow = out[t0 + i, ors:ors + np.uint64(ROWS)]
                        for r in range(ROWS):
                            acc[i * ROWS + r] = orow[r]
                    for c in range(kc):
                        if ROWS == R:  # compile time: LLVM vectorizes the rows itself
                            wc = w[c]
                            for i in range(TOKENS):
                                xv = x[np.uint64(t0 + i), np.uint64(c0 + c)]
                                for r in range(R):
                                    acc[i * R + r] += wc[r] * xv
                        else:
                            for i in range(TOKENS):
                                xv = x[np.uint64(t0 + i), np.uint64(c0 + c)]
                                for h in range(0, ROWS, 8):
                                    _fma8(acc, i * ROWS + h, wf, c * R + rs + h, xv)
                    for i in range(TOKENS):
                        orow = out[t0 + i, ors:ors + np.uint64(ROWS)]
                        for r in range(ROWS):
                            orow[r] = acc[i * ROWS + r]


# ---------------------------------------------------------------------------- integer kernel (AVX-512 VNNI)
# Activations as two int8 planes per 32 columns, x = s * (q1 + q2 / 256) (the precision of a 16-bit
# integer), weights as bytes u = q + 128, products summed by vpdpbusd (64 byte products per
# instruction): per 16 rows and 4 columns, one instruction per plane and token where float32 needs 4
# FMAs. The sums per scale group are exact integers (started at minus the +128's share); scales and
# offsets applied after.

HAS_VNNI = _target_has("avx512vnni", "avx512bw")  # vpdpbusd on 512-bit vectors
# block type -> log2 of its scale group's columns, for the types the integer kernel takes
INT_TYPES = {"Q4_0": 5, "Q4_1": 5, "Q5_0": 5, "Q5_1": 5, "Q8_0": 5, "Q4_K": 5, "Q5_K": 5, "Q6_K": 4}
SLICE = 32          # rows per pass: two vectors of 16 32-bit sums
TOKENS_INT = 4      # tokens per pass: 2 planes x TOKENS_INT x 2 sums + TOKENS_INT x 2 float sums in registers
_bytes = _stack(CHUNK * R, types.uint8)
_unit_scales = _stack(CHUNK // 16 * R)
_sums = _stack(TOKENS_INT * SLICE, types.int32)
_slice_acc = _stack(TOKENS_INT * SLICE)


def _pointer(context, builder, ty, arr, i, elem):
    data = context.make_array(ty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [i]), elem.as_pointer())


@intrinsic
def _dpbusd(typingctx, acc, ai, w, wi, x, xi):
    """acc[ai:ai+16] (int32) += for each lane r: sum over j < 4 of w[wi + 4r + j] (uint8) * x[xi + j]
    (int8): one vpdpbusd."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v16 = ir.VectorType(i32, 16)
        pa = _pointer(context, builder, sig.args[0], args[0], args[1], v16)
        pw = _pointer(context, builder, sig.args[2], args[2], args[3], v16)
        px = _pointer(context, builder, sig.args[4], args[4], args[5], i32)
        xv = builder.insert_element(ir.Constant(v16, ir.Undefined), builder.load(px, align=1), ir.Constant(i32, 0))
        xv = builder.shuffle_vector(xv, xv, ir.Constant(v16, [0] * 16))
        fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", (), ir.FunctionType(v16, [v16] * 3))
        builder.store(builder.call(fn, [builder.load(pa, align=4), builder.load(pw, align=1), xv]), pa, align=4)
        return context.get_dummy_value()
    return types.void(acc, ai, w, wi, x, xi), codegen


def _interleaved(context, builder, ty, src, si):
    """IR: four columns of R bytes from src[si + j * R] as R lanes of 4 bytes (a vector of 4R bytes)."""
    i8 = ir.IntType(8)
    col = ir.VectorType(i8, R)
    c = [builder.load(_pointer(context, builder, ty, src, builder.add(si, ir.Constant(si.type, j * R)), col), align=1)
         for j in range(4)]
    idx = ir.VectorType(ir.IntType(32), 2 * R)
    lo = builder.shuffle_vector(c[0], c[1], ir.Constant(idx, list(range(2 * R))))
    hi = builder.shuffle_vector(c[2], c[3], ir.Constant(idx, list(range(2 * R))))
    mask = [j * R + r for r in range(R) for j in range(4)]
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(ir.IntType(32), 4 * R), mask))


@intrinsic
def _interleave(typingctx, src, si, dst, di):
    """dst[di + 4r + j] = src[si + j * R + r] for r < R, j < 4: four columns of R bytes into R lanes of
    4 bytes (vpdpbusd's operand), as vector shuffles."""
    def codegen(context, builder, sig, args):
        v = _interleaved(context, builder, sig.args[0], args[0], args[1])
        builder.store(v, _pointer(context, builder, sig.args[2], args[2], args[3], v.type), align=1)
        return context.get_dummy_value()
    return types.void(src, si, dst, di), codegen


@intrinsic
def _interleave_flip(typingctx, src, si, dst, di):
    """`_interleave` of int8 bytes q as q + 128 (q ^ 0x80): Q8_0's values straight from its blocks."""
    def codegen(context, builder, sig, args):
        v = _interleaved(context, builder, sig.args[0], args[0], args[1])
        v = builder.xor(v, ir.Constant(v.type, [0x80] * (4 * R)))
        builder.store(v, _pointer(context, builder, sig.args[2], args[2], args[3], v.type), align=1)
        return context.get_dummy_value()
    return types.void(src, si, dst, di), codegen


@intrinsic
def _interleave_nibbles(typingctx, src, si, dst, lo, hi, bias):
    """`_interleave` of four columns of R bytes, then each byte's low nibble + bias to dst[lo:lo + 4R]
    and its high nibble + bias to dst[hi:hi + 4R]: the interleaved values of 8 columns of a 4-bit type."""
    def codegen(context, builder, sig, args):
        v = _interleaved(context, builder, sig.args[0], args[0], args[1])
        out = v.type
        bias = builder.insert_element(ir.Constant(out, ir.Undefined), _i8(builder, args[5]), ir.Constant(ir.IntType(32), 0))
        bias = builder.shuffle_vector(bias, bias, ir.Constant(ir.VectorType(ir.IntType(32), 4 * R), [0] * (4 * R)))
        low = builder.add(builder.and_(v, ir.Constant(out, [15] * (4 * R))), bias)
        high = builder.add(builder.lshr(v, ir.Constant(out, [4] * (4 * R))), bias)
        builder.store(low, _pointer(context, builder, sig.args[2], args[2], args[3], out), align=1)
        builder.store(high, _pointer(context, builder, sig.args[2], args[2], args[4], out), align=1)
        return context.get_dummy_value()
    return types.void(src, si, dst, lo, hi, bias), codegen


@intrinsic
def _interleave_six(typingctx, src, ql, qh, dst, c):
    """Q6_K's values + 128 for 16 columns: with Q0, Q1 the interleaved ql bytes at ql and ql + 32R (values
    u = 0, 1 in their low nibbles, u = 2, 3 in their high ones) and H the qh bytes at qh (bits 2u, 2u + 1:
    value u's high bits), all `_interleaved`, dst at columns c + 32u gets (low 4 bits | high 2 << 4) + 96
    (the values' -32, + 128). qh is interleaved once for the four values it serves."""
    def codegen(context, builder, sig, args):
        q0 = _interleaved(context, builder, sig.args[0], args[0], args[1])
        q1 = _interleaved(context, builder, sig.args[0], args[0], builder.add(args[1], ir.Constant(args[1].type, 32 * R)))
        h = _interleaved(context, builder, sig.args[0], args[0], args[2])
        out = h.type
        k = lambda v: ir.Constant(out, [v] * (4 * R))  # noqa: E731
        low4 = [builder.and_(q0, k(15)), builder.and_(q1, k(15)), builder.lshr(q0, k(4)), builder.lshr(q1, k(4))]
        for u in range(4):
            high2 = builder.shl(builder.and_(builder.lshr(h, k(2 * u)), k(3)), k(4))
            v = builder.add(builder.or_(low4[u], high2), k(96))
            di = builder.add(args[4], ir.Constant(args[4].type, 32 * u * R))
            builder.store(v, _pointer(context, builder, sig.args[3], args[3], di, out), align=1)
        return context.get_dummy_value()
    return types.void(src, ql, qh, dst, c), codegen


@intrinsic
def _planes(typingctx, a, b):
    """float32((a << 8) + b) in 32-bit integers (the sum is exact; numba's integers are 64-bit)."""
    def codegen(context, builder, sig, args):
        a, b = (_i32(builder, v) for v in args)
        return builder.sitofp(builder.add(builder.shl(a, ir.Constant(ir.IntType(32), 8)), b), ir.FloatType())
    return types.float32(a, b), codegen


FUSED = frozenset({"q4_0", "q4_1", "q4_k", "q8_0", "q6_k"})  # types whose integer decoders write interleaved bytes themselves


def _fused(marker):
    """Whether the block type's integer decoder writes the interleaved bytes itself (compile time)."""


@overload(_fused, inline="always")
def _fused_typed(marker):
    fused = next(iter(marker.dtype.fields)) in FUSED
    return lambda marker: fused


@njit(parallel=True, **JIT)
def matmul_int(marker, t, cols_per_block, gshift, x1, x2, xs, z1, z2, xsum, out):
    """out[:, g * R + r] = x @ W[g * R + r] with x given as planes x1, x2 (int8 [n, k]) and scales xs
    (float32 [n, k / 32], s / 256): x = xs * (256 * x1 + x2); x2 None: one plane, x = 256 xs x1. Per
    scale group of gs = 2^gshift columns (16 or 32: the type's), the +128 of the weight bytes comes
    off as z1 = 128 sum x1 and z2 = 128 (256 sum x1 + sum x2) (int32 [n, k / gs]); xsum is the sum of
    x (the minimums' term). n a multiple of TOKENS_INT; out [n, G * R]. The chunk decoding is
    `matmul`'s, into bytes."""
    n, k = x1.shape
    size = t.shape[1] * cols_per_block // (k * R)  # bytes per block
    for g in prange(t.shape[0]):
        tg, wc, wq = t[g], carray(_bytes(), CHUNK * R), carray(_bytes(), CHUNK * R)
        ab, mb = carray(_unit_scales(), (CHUNK // 16, R)), carray(_unit_scales(), (CHUNK // 16, R))
        og = np.uint64(g * R)  # unsigned indices: no negative-index wraparound code (it cost 12% here)
        for i in range(n):
            orow = out[i]
            for r in range(R):
                orow[og + np.uint64(r)] = 0
        for c0 in range(0, k, CHUNK):
            kc = min(CHUNK, k - c0)
            b0 = c0 // cols_per_block
            _group(marker, tg[b0 * size * R:(b0 + kc // cols_per_block) * size * R], kc, (wc, ab, mb, wq))
            if not _fused(marker):
                for c in range(0, kc, 4):
                    _interleave(wc, c * R, wq, c * R)
            for t0 in range(0, n, TOKENS_INT):
                for rs in range(0, R, SLICE):
                    acc = carray(_slice_acc(), TOKENS_INT * SLICE)
                    for i in range(TOKENS_INT):  # through a row view: vector loads (2-D indexing gave scalar ones)
                        orow = out[t0 + i, og + np.uint64(rs):og + np.uint64(rs + SLICE)]
                        for r in range(SLICE):
                            acc[i * SLICE + r] = orow[r]
                    for j in range(kc >> gshift):
                        u, b = np.uint64((c0 >> gshift) + j), np.uint64((c0 + (j << gshift)) >> 5)
                        s1, s2 = carray(_sums(), TOKENS_INT * SLICE), carray(_sums(), TOKENS_INT * SLICE)
                        for i in range(TOKENS_INT):  # the sums start at minus the +128 offsets' share
                            ti = np.uint64(t0 + i)
                            z = -z2[ti, u] if x2 is not None else 0
                            z8 = 0 if x2 is not None else -z1[ti, u]
                            for r in range(SLICE):
                                s1[i * SLICE + r] = z8
                                s2[i * SLICE + r] = z
                        for c in range(j << gshift, (j + 1) << gshift, 4):
                            wo = ((c >> 2) * R + rs) * 4
                            for i in range(TOKENS_INT):
                                for h in range(0, SLICE, 16):
                                    _dpbusd(s1, i * SLICE + h, wq, wo + 4 * h, x1[t0 + i], c0 + c)
                                    if x2 is not None:
                                        _dpbusd(s2, i * SLICE + h, wq, wo + 4 * h, x2[t0 + i], c0 + c)
                        for i in range(TOKENS_INT):
                            ti = np.uint64(t0 + i)
                            sc, sx = xs[ti, b], xsum[ti, u]
                            if x2 is not None:
                                for r in range(SLICE):
                                    v = _planes(s1[i * SLICE + r], s2[i * SLICE + r])
                                    acc[i * SLICE + r] += ab[j, rs + r] * (v * sc) + mb[j, rs + r] * sx
                            else:
                                sc = sc * np.float32(256)
                                for r in range(SLICE):
                                    v = np.float32(s1[i * SLICE + r])
                                    acc[i * SLICE + r] += ab[j, rs + r] * (v * sc) + mb[j, rs + r] * sx
                    for i in range(TOKENS_INT):
                        orow = out[t0 + i, og + np.uint64(rs):og + np.uint64(rs + SLICE)]
                        for r in range(SLICE):
                            orow[r] = acc[i * SLICE + r]


# ---------------------------------------------------------------------------- several tokens, integer (AVX2)
# Without VNNI, the activations as one 16-bit integer per value (x16 = 256 x1 + x2: the two planes
# joined, exactly) and the weights' values as 16-bit integers, multiplied by vpmaddwd (16 products into
# 8 sums of two per instruction, plus a vpaddd) where float32 does 8 per FMA. Per scale group the 32-bit
# sums are exact (32 columns x 128 x 32,639 < 2^31) and closed as `matmul_int` closes them, with no
# +128 share to take off: the same sums as VNNI's. Zen 3, 2 cores, 1536 x 1536 (tools/bench_cpu_kernels.py
# --tokens N): 8 tokens 1.0-1.15x float32's `matmul` (decoding the chunk weighs as much as the
# products), 64 and 256 tokens 1.15-1.6x. The group's column loop must have a constant trip count
# (unrolled: constant offsets) and the epilogue explicit vectors (`_close8`): otherwise 0.5x float32.
SLICE16 = 16        # rows per pass: two vectors of 8 sums; TOKENS_INT tokens: 8 sum registers
_words = _stack(CHUNK * R, types.int16)
_sums16 = _stack(TOKENS_INT * SLICE16, types.int32)
_slice_acc16 = _stack(TOKENS_INT * SLICE16)


@intrinsic
def _widen_quad(typingctx, wq, qi, w16):
    """The interleaved bytes of four columns (wq[qi:qi + 4R]: value + 128, a row's four columns in a
    lane) as 16-bit values in pairs: w16[qi:qi + 2R] holds each row's columns 0, 1 and w16[qi + 2R:qi + 4R]
    its columns 2, 3 (vpmaddwd's operands, a row per 32-bit lane)."""
    def codegen(context, builder, sig, args):
        wq, qi, w16 = args
        i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
        v = builder.load(_pointer(context, builder, sig.args[0], wq, qi, ir.VectorType(i8, 4 * R)), align=1)
        for half in range(2):
            idx = [4 * r + 2 * half + j for r in range(R) for j in range(2)]
            b = builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(ir.VectorType(i32, 2 * R), idx))
            w = builder.sub(builder.zext(b, ir.VectorType(i16, 2 * R)), ir.Constant(ir.VectorType(i16, 2 * R), [128] * (2 * R)))
            di = builder.add(qi, ir.Constant(qi.type, 2 * R * half))
            builder.store(w, _pointer(context, builder, sig.args[2], w16, di, w.type), align=2)
        return context.get_dummy_value()
    return types.void(wq, qi, w16), codegen


@intrinsic
def _madd8(typingctx, acc, ai, w16, wi, x16, xi):
    """acc[ai:ai + 8] (int32) += for each lane r: w16[wi + 2r] * x16[xi] + w16[wi + 2r + 1] * x16[xi + 1]
    (16-bit values): one vpmaddwd and one vpaddd."""
    def codegen(context, builder, sig, args):
        acc, ai, w16, wi, x16, xi = args
        i16, i32 = ir.IntType(16), ir.IntType(32)
        v8, w16t = ir.VectorType(i32, 8), ir.VectorType(i16, 16)
        madd = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.wd", (), ir.FunctionType(v8, [w16t, w16t]))
        pa = _pointer(context, builder, sig.args[0], acc, ai, v8)
        pw = _pointer(context, builder, sig.args[2], w16, wi, w16t)
        xw = builder.load(_pointer(context, builder, sig.args[4], x16, xi, i32), align=2)
        xv = builder.shuffle_vector(builder.insert_element(ir.Constant(v8, ir.Undefined), xw, ir.Constant(i32, 0)),
                                    ir.Constant(v8, ir.Undefined), ir.Constant(v8, [0] * 8))
        prod = builder.call(madd, [builder.load(pw, align=2), builder.bitcast(xv, w16t)])
        builder.store(builder.add(builder.load(pa, align=4), prod), pa, align=4)
        return context.get_dummy_value()
    return types.void(acc, ai, w16, wi, x16, xi), codegen


@intrinsic
def _close8(typingctx, acc, ai, s, si, ab, mb, bi, sc, sx):
    """acc[ai:ai + 8] += ab[bi:bi + 8] * (float32(s[si:si + 8]) * sc) + mb[bi:bi + 8] * sx: a scale
    group's sums of 8 rows closed (ab, mb: the rows' scales and minimums, flat indices)."""
    def codegen(context, builder, sig, args):
        acc, ai, s, si, ab, mb, bi, sc, sx = args
        f32, i32 = ir.FloatType(), ir.IntType(32)
        f8, v8 = ir.VectorType(f32, 8), ir.VectorType(i32, 8)
        fma = builder.module.declare_intrinsic("llvm.fma.v8f32", (), ir.FunctionType(f8, [f8] * 3))

        def splat(v):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(f8, ir.Undefined), v, ir.Constant(i32, 0)),
                                          ir.Constant(f8, ir.Undefined), ir.Constant(v8, [0] * 8))
        pa = _pointer(context, builder, sig.args[0], acc, ai, f8)
        v = builder.sitofp(builder.load(_pointer(context, builder, sig.args[2], s, si, v8), align=4), f8)
        a = builder.load(_pointer(context, builder, sig.args[4], ab, bi, f8), align=4)
        m = builder.load(_pointer(context, builder, sig.args[5], mb, bi, f8), align=4)
        r = builder.call(fma, [a, builder.fmul(v, splat(sc)), builder.load(pa, align=4)])
        builder.store(builder.call(fma, [m, splat(sx), r]), pa, align=4)
        return context.get_dummy_value()
    return types.void(acc, ai, s, si, ab, mb, bi, types.float32, types.float32), codegen


@njit(inline="always")
def _group_madd(s, w16, wo, x16, t0, xc, cols):
    """s[i * SLICE16 + r] += the 16-bit pairs at w16[wo:] (a quad of columns per 4R values) times token
    t0 + i's columns xc..xc + cols, for SLICE16 rows and TOKENS_INT tokens."""
    for c in range(0, cols, 2):
        w = wo + (c >> 2) * 4 * R + ((c >> 1) & 1) * 2 * R
        for i in range(TOKENS_INT):
            for h in range(0, SLICE16, 8):
                _madd8(s, i * SLICE16 + h, w16, w + 2 * h, x16[t0 + i], xc + c)


@njit(inline="always")
def _join_row(x1, x2, x16):
    for c in range(x1.shape[0]):
        v = np.int16(x1[c]) << 8
        x16[c] = v + np.int16(x2[c]) if x2 is not None else v


@njit(parallel=True, **JIT)
def join_planes(x1, x2, x16):
    """x16 = 256 x1 + x2 (int8 [n, k] each; x2 None: 256 x1), `matmul_int16`'s activations: exact
    (|x16| <= 127 x 256 + 127)."""
    for i in prange(x1.shape[0]):
        _join_row(x1[i], x2[i] if x2 is not None else None, x16[i])


@njit(**JIT)
def join_planes_serial(x1, x2, x16):
    """`join_planes` on the calling thread (a few rows)."""
    for i in range(x1.shape[0]):
        _join_row(x1[i], x2[i] if x2 is not None else None, x16[i])


@njit(parallel=True, **JIT)
def matmul_int16(marker, t, cols_per_block, gshift, x16, xs, xsum, out):
    """`matmul_int` for CPUs without VNNI: x given as x16 (int16 [n, k], 256 x1 + x2) and scales xs
    (float32 [n, k / 32]): x = xs * x16; xsum per scale group of 2^gshift columns (the minimums' term).
    n a multiple of TOKENS_INT; out [n, G * R]. The chunk decoding is `matmul_int`'s, then widened to
    16-bit pairs (`_widen_quad`)."""
    n, k = x16.shape
    size = t.shape[1] * cols_per_block // (k * R)  # bytes per block
    for g in prange(t.shape[0]):
        tg, wc, wq, w16 = t[g], carray(_bytes(), CHUNK * R), carray(_bytes(), CHUNK * R), carray(_words(), CHUNK * R)
        ab, mb = carray(_unit_scales(), (CHUNK // 16, R)), carray(_unit_scales(), (CHUNK // 16, R))
        og = np.uint64(g * R)
        for i in range(n):
            orow = out[i]
            for r in range(R):
                orow[og + np.uint64(r)] = 0
        for c0 in range(0, k, CHUNK):
            kc = min(CHUNK, k - c0)
            b0 = c0 // cols_per_block
            _group(marker, tg[b0 * size * R:(b0 + kc // cols_per_block) * size * R], kc, (wc, ab, mb, wq))
            if not _fused(marker):
                for c in range(0, kc, 4):
                    _interleave(wc, c * R, wq, c * R)
            for c in range(0, kc, 4):
                _widen_quad(wq, c * R, w16)
            for t0 in range(0, n, TOKENS_INT):
                for rs in range(0, R, SLICE16):
                    acc = carray(_slice_acc16(), TOKENS_INT * SLICE16)
                    for i in range(TOKENS_INT):
                        orow = out[t0 + i, og + np.uint64(rs):og + np.uint64(rs + SLICE16)]
                        for r in range(SLICE16):
                            acc[i * SLICE16 + r] = orow[r]
                    for j in range(kc >> gshift):
                        u, b = np.uint64((c0 >> gshift) + j), np.uint64((c0 + (j << gshift)) >> 5)
                        s = carray(_sums16(), TOKENS_INT * SLICE16)
                        for q in range(TOKENS_INT * SLICE16):
                            s[q] = 0
                        cj = j << gshift
                        if gshift == 5:  # constant trip counts: the loop unrolled, its offsets constants
                            _group_madd(s, w16, cj * R + 2 * rs, x16, t0, c0 + cj, 32)
                        else:
                            _group_madd(s, w16, cj * R + 2 * rs, x16, t0, c0 + cj, 16)
                        for i in range(TOKENS_INT):
                            ti = np.uint64(t0 + i)
                            sc, sx = xs[ti, b], xsum[ti, u]
                            for h in range(0, SLICE16, 8):
                                _close8(acc, i * SLICE16 + h, s, i * SLICE16 + h, ab, mb, j * R + rs + h, sc, sx)
                    for i in range(TOKENS_INT):
                        orow = out[t0 + i, og + np.uint64(rs):og + np.uint64(rs + SLICE16)]
                        for r in range(SLICE16):
                            orow[r] = acc[i * SLICE16 + r]


# ---------------------------------------------------------------------------- one token, integer
# `matvec_int`: one token's product through vpdpbusd, decoding each step of four columns into a small
# buffer (in L1) and multiplying it at once, so the weights stream in evenly (decoding a whole chunk
# first, as `matmul_int` does, ran at 19 GB/s from DRAM where this runs at 25-31; float32 `matvec` is
# bound by its conversions at ~22). Q4_1's and Q4_K's unsigned nibbles go in as they are; Q4_0 and Q8_0
# as `matmul_int`'s decoders make them (value + 128, the sums started at minus the offsets' share). Per
# scale group the planes' sums are closed as `matmul_int` closes them. Q6_K is not here: the same
# scheme (four steps of `_interleave_six` per 16 values) ran at 0.73-0.84x its float32 `matvec`.
HAS_AVX2 = _target_has("avx2")
# the types of the one-token integer kernel: VNNI's (vpdpbusd), or AVX2's (vpmaddubsw on nibble pairs)
VECTOR_INT_TYPES = (frozenset({"Q4_0", "Q4_1", "Q8_0", "Q4_K"}) if HAS_VNNI else frozenset({"Q4_K", "Q6_K"})
                    if HAS_AVX2 else frozenset())
_step = _stack(8 * R, types.uint8)
_int_vector = _stack(R, types.int32)


@njit(inline="always")
def _close(acc, a, m, s1, s2, x2, xs, sx):
    """acc += a * (the planes' sum * the token's scale) + m * sx for the R rows: the scale is xs (x2
    None: 256 xs, s1 alone); m None: no minimums' term."""
    sc = xs if x2 is not None else xs * np.float32(256)
    for r in range(R):
        v = a[r] * ((_planes(s1[r], s2[r]) if x2 is not None else np.float32(s1[r])) * sc)
        acc[r] += v + m[r] * sx if m is not None else v


@njit(inline="always")
def _start(s1, s2, x2, z):
    """Clear a scale group's sums, which start at -z (the +128 offsets' share; 0 for values as they are):
    the second plane's, or the first's where there is one plane."""
    for r in range(R):
        s1[r] = 0 if x2 is not None else -z
        s2[r] = -z


@njit(inline="always")
def _dot4(s1, s2, w, wi, x1, x2, c):
    """The sums += four columns' interleaved bytes w[wi:wi + 4R] times the planes' columns c..c+3."""
    for h in range(0, R, 16):
        _dpbusd(s1, h, w, wi + 4 * h, x1, c)
        if x2 is not None:
            _dpbusd(s2, h, w, wi + 4 * h, x2, c)


def _vector_int(marker, tg, k, x1, x2, xs, z1, z2, xsum, acc):
    """acc += the row group's blocks tg times one token's planes, for the block type `marker` names."""


@overload(_vector_int, inline="always")
def _vector_int_typed(marker, tg, k, x1, x2, xs, z1, z2, xsum, acc):
    name = next(iter(marker.dtype.fields))
    if name in ("q4_0", "q4_1"):
        has_min = name == "q4_1"
        return lambda marker, tg, k, x1, x2, xs, z1, z2, xsum, acc: _vector_q4(tg, k, x1, x2, xs, z1, z2, xsum, acc,
                                                                             has_min)
    return {"q8_0": _vector_q8_0, "q4_k": _vector_q4_k if HAS_VNNI else _vector_q4_k_avx2,
            "q6_k": _vector_q6_k_avx2}[name]


@njit(inline="always")
def _vector_q4(tg, k, x1, x2, xs, z1, z2, xsum, acc, has_min):
    """Q4_0 and Q4_1 (`_nibble_values`): a block is one scale group. Q4_0's values q - 8 go in as
    q + 120 (as in `matmul_int`, so that both give the same sums)."""
    size, qs = (20, 4) if has_min else (18, 2)
    a, m, w = carray(_vector(), R), carray(_vector(), R), carray(_step(), 8 * R)
    s1, s2 = carray(_int_vector(), R), carray(_int_vector(), R)
    for b in range(k // 32):
        blk = tg[b * size * R:(b + 1) * size * R]
        _halves(blk, 0, a)
        if has_min:
            _halves(blk, 2, m)
            _start(s1, s2, x2, 0)
        else:
            _start(s1, s2, x2, z2[b] if x2 is not None else z1[b])
        for i in range(0, 16, 4):
            _interleave_nibbles(blk, (qs + i) * R, w, 0, 4 * R, np.uint8(0 if has_min else 120))
            _dot4(s1, s2, w, 0, x1, x2, 32 * b + i)
            _dot4(s1, s2, w, 4 * R, x1, x2, 32 * b + 16 + i)
        if has_min:
            _close(acc, a, m, s1, s2, x2, xs[b], xsum[b])
        else:
            _close(acc, a, None, s1, s2, x2, xs[b], xsum[b])


def _vector_q8_0(marker, tg, k, x1, x2, xs, z1, z2, xsum, acc):
    """Q8_0: int8 values as q + 128, the sums started at minus the offsets' share."""
    d, w = carray(_vector(), R), carray(_step(), 8 * R)
    s1, s2 = carray(_int_vector(), R), carray(_int_vector(), R)
    for b in range(k // 32):
        blk = tg[b * 34 * R:(b + 1) * 34 * R]
        _halves(blk, 0, d)
        _start(s1, s2, x2, z2[b] if x2 is not None else z1[b])
        for i in range(0, 32, 4):
            _interleave_flip(blk, (2 + i) * R, w, 0)
            _dot4(s1, s2, w, 0, x1, x2, 32 * b + i)
        _close(acc, d, None, s1, s2, x2, xs[b], xsum[b])


def _vector_q4_k(marker, tg, k, x1, x2, xs, z1, z2, xsum, acc):
    """Q4_K (`_k4_values`): per qs chunk p, sub-blocks 2p (low nibbles) and 2p + 1 (high) summed side by side."""
    d, dmin, w = carray(_vector(), R), carray(_vector(), R), carray(_step(), 8 * R)
    a, m = carray(_vector(), R), carray(_vector(), R)
    ab, mb = carray(_unit_scales(), (8, R)), carray(_unit_scales(), (8, R))
    s1, s2 = carray(_int_vector(), R), carray(_int_vector(), R)
    t1, t2 = carray(_int_vector(), R), carray(_int_vector(), R)
    for b in range(k // 256):
        blk = tg[b * 144 * R:(b + 1) * 144 * R]
        _halves(blk, 0, d)
        _halves(blk, 2, dmin)
        for j in range(8):  # the scales first: their lines come in with the block's first
            _k4_scale(blk, j, d, dmin, a, m)
            for r in range(R):
                ab[j, r] = a[r]
                mb[j, r] = m[r]
        for p in range(4):
            c = 256 * b + 64 * p
            _start(s1, s2, x2, 0)
            _start(t1, t2, x2, 0)
            for i in range(0, 32, 4):
                _prefetch_lines(blk, 5 * (8 * p + i // 4), 5)  # this block's 144 lines, over its 32 steps
                _interleave_nibbles(blk, (16 + 32 * p + i) * R, w, 0, 4 * R, np.uint8(0))
                _dot4(s1, s2, w, 0, x1, x2, c + i)
                _dot4(t1, t2, w, 4 * R, x1, x2, c + 32 + i)
            u = c >> 5
            _close(acc, ab[2 * p], mb[2 * p], s1, s2, x2, xs[u], xsum[u])
            _close(acc, ab[2 * p + 1], mb[2 * p + 1], t1, t2, x2, xs[u + 1], xsum[u + 1])


# ---------------------------------------------------------------------------- one token without VNNI (AVX2)
# vpmaddubsw multiplies 32 unsigned bytes by 32 signed ones and adds adjacent pairs into 16-bit lanes. With
# rows in lanes (the groups' layout) the pairs must be two columns of one row: two fields unpacked byte by
# byte (in-lane: rows 0-7 and 16-23 from the low unpack, 8-15 and 24-31 from the high), times the two
# columns' activations as one broadcast 16-bit word. A nibble times an int8 plane is at most 15 x 127 per
# product, 3,810 per pair: eight pairs (16 columns) fit 16-bit sums, which are then widened (rows back in
# order) into the 32-bit sums `_close` takes. Per 128 products of two planes: 22 instructions, where
# float32 (each value widened, converted, multiplied) takes about 56 (Qwen2.5's Q4_K matvecs: 30 -> 45-50
# GFLOP/s on a 2-core Zen 3).

def _pair_broadcast(context, builder, ty, x, i):
    """x[i], x[i + 1] (int8) as one 16-bit word, repeated over 32 bytes."""
    i16 = ir.IntType(16)
    w = builder.load(_pointer(context, builder, ty, x, i, i16), align=1)
    v = builder.insert_element(ir.Constant(ir.VectorType(i16, 16), ir.Undefined), w, ir.Constant(ir.IntType(32), 0))
    v = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
    return builder.bitcast(v, ir.VectorType(ir.IntType(8), 32))


@intrinsic
def _nibble_pairs16(typingctx, s1, s2, t1, t2, blk, f, h, x1, x2, c):
    """For rows h..h+31 and fields f..f+15 of blk (R bytes each, a byte per row): the low nibbles times
    the planes' columns c..c+15 into s1, s2 and the high nibbles times columns c+32..c+47 into t1, t2
    (int32 [R]; x2 None: one plane, s2 and t2 untouched)."""
    two = not isinstance(x2, types.NoneType)

    def codegen(context, builder, sig, args):
        s1, s2, t1, t2, blk, f, h, x1, x2, c = args
        i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
        b32, w16, v8 = ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8)
        madd = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", (), ir.FunctionType(w16, [b32, b32]))
        k = lambda v, t=f.type: ir.Constant(t, v)  # noqa: E731
        unpack = [[16 * lane + half + j + 32 * s for lane in range(2) for j in range(8) for s in range(2)]
                  for half in (0, 8)]  # vpunpcklbw, vpunpckhbw
        planes = [(x1, sig.args[7])] + ([(x2, sig.args[8])] if two else [])
        acc = {}  # (plane, nibble, unpack half) -> 16-bit sums
        base = builder.add(builder.mul(f, k(R)), h)
        for j in range(8):
            a, b = (builder.load(_pointer(context, builder, sig.args[4], blk, builder.add(base, k((2 * j + e) * R)), b32),
                                 align=1) for e in (0, 1))
            u = [builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 32), idx)) for idx in unpack]
            nibbles = ([builder.and_(v, ir.Constant(b32, [15] * 32)) for v in u],
                       [builder.lshr(v, ir.Constant(b32, [4] * 32)) for v in u])
            for p, (x, xt) in enumerate(planes):
                for n in range(2):
                    xv = _pair_broadcast(context, builder, xt, x, builder.add(c, k(32 * n + 2 * j, c.type)))
                    for half in range(2):
                        prod = builder.call(madd, [nibbles[n][half], xv])
                        acc[p, n, half] = builder.add(acc[p, n, half], prod) if j else prod
        sums = {(0, 0): (s1, sig.args[0]), (0, 1): (t1, sig.args[2]), (1, 0): (s2, sig.args[1]), (1, 1): (t2, sig.args[3])}
        for (p, n, half), v in acc.items():
            arr, ty = sums[p, n]
            wide = builder.sext(v, ir.VectorType(i32, 16))
            for lane in range(2):  # rows h + 16 lane + 8 half .. + 8
                part = builder.shuffle_vector(wide, wide, ir.Constant(v8, list(range(8 * lane, 8 * lane + 8))))
                ptr = _pointer(context, builder, ty, arr, builder.add(h, k(16 * lane + 8 * half, h.type)), v8)
                builder.store(builder.add(builder.load(ptr, align=4), part), ptr, align=4)
        return context.get_dummy_value()
    return types.void(s1, s2, t1, t2, blk, f, h, x1, x2, c), codegen


@intrinsic
def _six_group16(typingctx, acc, a, blk, ql, qh, lshift, hshift, h, x1, x2, c, off, scale):
    """Q6_K, rows h..h+31, one scale group: the values of fields ql..ql+15 and qh..qh+15 of blk (((ql byte
    >> lshift) & 15) | ((qh byte >> hshift) & 3) << 4: 0..63) times the planes' columns c..c+15, summed in
    32-bit integers, less `off` (the -32's share), then acc[r] += a[r] * (sum * scale) (x2 None: one plane).
    A 6-bit value times an int8 is too large for 16-bit sums over more than two pairs: four fields are
    interleaved instead (bytes, then 16-bit pairs: a row's four columns in one 32-bit lane) and vpmaddwd
    with ones adds each row's two pairs into 32 bits, as vpdpbusd would. The group's sums stay in registers
    (its 16 columns are too few to pay for `_start` and `_close` in memory)."""
    two = not isinstance(x2, types.NoneType)

    def codegen(context, builder, sig, args):
        acc, a, blk, ql, qh, lshift, hshift, h, x1, x2, c, off, scale = args
        i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
        b32, w16, v8, f8 = ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8), ir.VectorType(f32, 8)
        madd = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", (), ir.FunctionType(w16, [b32, b32]))
        widen = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.wd", (), ir.FunctionType(v8, [w16, w16]))
        fma = builder.module.declare_intrinsic("llvm.fma.v8f32", (), ir.FunctionType(f8, [f8] * 3))
        ones = ir.Constant(w16, [1] * 16)
        k = lambda v, t=ql.type: ir.Constant(t, v)  # noqa: E731

        def splat(v, ty):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(ty, ir.Undefined), v, ir.Constant(i32, 0)),
                                          ir.Constant(ty, ir.Undefined), ir.Constant(ir.VectorType(i32, ty.count), [0] * ty.count))

        def shifted(v, n):  # v >> n in 16-bit lanes (one vpsrlw; bytes have no shift by a variable), masked after
            n = builder.trunc(n, i16) if n.type.width > 16 else builder.zext(n, i16)
            return builder.bitcast(builder.lshr(builder.bitcast(v, w16), splat(n, w16)), b32)

        bytes_lo = [16 * lane + j + 32 * e for lane in range(2) for j in range(8) for e in range(2)]
        bytes_hi = [16 * lane + 8 + j + 32 * e for lane in range(2) for j in range(8) for e in range(2)]
        words = lambda half: [8 * lane + half + j + 16 * e for lane in range(2) for j in range(4) for e in range(2)]  # noqa: E731
        planes = [(x1, sig.args[8])] + ([(x2, sig.args[9])] if two else [])
        sums = {}
        for q4 in range(4):  # columns c + 4 q4 .. + 4
            vals = []
            for e in range(4):
                f = k(4 * q4 + e)
                lo = builder.load(_pointer(context, builder, sig.args[2], blk,
                                           builder.add(builder.mul(builder.add(ql, f), k(R)), h), b32), align=1)
                hi = builder.load(_pointer(context, builder, sig.args[2], blk,
                                           builder.add(builder.mul(builder.add(qh, f), k(R)), h), b32), align=1)
                lo = builder.and_(shifted(lo, lshift), ir.Constant(b32, [15] * 32))
                hi = builder.shl(builder.and_(shifted(hi, hshift), ir.Constant(b32, [3] * 32)), ir.Constant(b32, [4] * 32))
                vals.append(builder.or_(lo, hi))
            quads = []  # rows 0-3|16-19, 4-7|20-23, 8-11|24-27, 12-15|28-31 (lanes of 4)
            for idx in (bytes_lo, bytes_hi):
                ab = builder.bitcast(builder.shuffle_vector(vals[0], vals[1], ir.Constant(ir.VectorType(i32, 32), idx)), w16)
                cd = builder.bitcast(builder.shuffle_vector(vals[2], vals[3], ir.Constant(ir.VectorType(i32, 32), idx)), w16)
                for half in (0, 4):
                    quads.append(builder.bitcast(builder.shuffle_vector(ab, cd, ir.Constant(ir.VectorType(i32, 16), words(half))), b32))
            for p, (x, xt) in enumerate(planes):
                xw = builder.load(_pointer(context, builder, xt, x, builder.add(c, k(4 * q4, c.type)), i32), align=1)
                xv = builder.bitcast(splat(xw, v8), b32)
                for n, qv in enumerate(quads):
                    part = builder.call(widen, [builder.call(madd, [qv, xv]), ones])
                    sums[p, n] = builder.add(sums[p, n], part) if q4 else part
        o, sc = splat(_i32(builder, off), v8), splat(scale, f8)
        v = []
        for n in range(4):
            t = builder.add(builder.shl(sums[0, n], ir.Constant(v8, [8] * 8)), sums[1, n]) if two else sums[0, n]
            v.append(builder.fmul(builder.sitofp(builder.sub(t, o), f8), sc))
        for lane in range(2):
            for pair in range(2):  # rows h + 16 lane + 8 pair .. + 8
                rows = builder.shuffle_vector(v[2 * pair], v[2 * pair + 1], ir.Constant(
                    v8, [4 * lane + j for j in range(4)] + [8 + 4 * lane + j for j in range(4)]))
                r = builder.add(h, k(16 * lane + 8 * pair, h.type))
                pa = _pointer(context, builder, sig.args[0], acc, r, f8)
                pw = _pointer(context, builder, sig.args[1], a, r, f8)
                builder.store(builder.call(fma, [builder.load(pw, align=4), rows, builder.load(pa, align=4)]), pa, align=4)
        return context.get_dummy_value()
    return types.void(acc, a, blk, ql, qh, lshift, hshift, h, x1, x2, c, off, scale), codegen


def _vector_q6_k_avx2(marker, tg, k, x1, x2, xs, z1, z2, xsum, acc):
    """Q6_K (`_q6_k_values`) through `_six_group16`, a scale group of 16 columns at a time: the sums less
    the -32's share (32 x the planes' sums: z / 4), times d * scale."""
    d, a = carray(_vector(), R), carray(_vector(), R)
    for b in range(k // 256):
        blk = tg[b * 210 * R:(b + 1) * 210 * R]
        _halves(blk, 208, d)
        for h in range(2):
            for u in range(4):
                for l0 in range(0, 32, 16):
                    c = 256 * b + 128 * h + 32 * u + l0
                    g = c >> 4
                    off = (z2[g] if x2 is not None else z1[g]) // 4
                    scale = xs[c >> 5] if x2 is not None else xs[c >> 5] * np.float32(256)
                    sc = _field(blk, 192 + 8 * h + 2 * u + l0 // 16)
                    for r in range(R):
                        a[r] = d[r] * np.float32(np.int8(sc[r]))
                    for rh in range(0, R, 32):
                        _prefetch_lines(blk, 210 + 7 * (8 * h + 2 * u + l0 // 16) + 3 * (rh // 32), 4)  # the next block
                        _six_group16(acc, a, blk, 64 * h + 32 * (u % 2) + l0, 128 + 32 * h + l0, 4 * (u // 2), 2 * u,
                                     rh, x1, x2, c, off, scale)


def _vector_q4_k_avx2(marker, tg, k, x1, x2, xs, z1, z2, xsum, acc):
    """`_vector_q4_k` through `_nibble_pairs16`: the same integer sums, 32 rows and 16 columns at a time."""
    d, dmin = carray(_vector(), R), carray(_vector(), R)
    a, m = carray(_vector(), R), carray(_vector(), R)
    ab, mb = carray(_unit_scales(), (8, R)), carray(_unit_scales(), (8, R))
    s1, s2 = carray(_int_vector(), R), carray(_int_vector(), R)
    t1, t2 = carray(_int_vector(), R), carray(_int_vector(), R)
    for b in range(k // 256):
        blk = tg[b * 144 * R:(b + 1) * 144 * R]
        _halves(blk, 0, d)
        _halves(blk, 2, dmin)
        for j in range(8):
            _k4_scale(blk, j, d, dmin, a, m)
            for r in range(R):
                ab[j, r] = a[r]
                mb[j, r] = m[r]
        for p in range(4):
            c = 256 * b + 64 * p
            _start(s1, s2, x2, 0)
            _start(t1, t2, x2, 0)
            for h in range(0, R, 32):
                for i in range(0, 32, 16):
                    _prefetch_lines(blk, 144 + 9 * (4 * p + h // 16 + i // 16), 9)  # the next block, over 16 steps
                    _nibble_pairs16(s1, s2, t1, t2, blk, 16 + 32 * p + i, h, x1, x2, c + i)
            u = c >> 5
            _close(acc, ab[2 * p], mb[2 * p], s1, s2, x2, xs[u], xsum[u])
            _close(acc, ab[2 * p + 1], mb[2 * p + 1], t1, t2, x2, xs[u + 1], xsum[u + 1])


@njit(parallel=True, **JIT)
def matvec_int(marker, t, x1, x2, xs, z1, z2, xsum, out):
    """out[g * R + r] = W[g * R + r] @ x for one token x given as `matmul_int` takes a token (planes
    x1, x2 int8 [k], scales xs [k / 32], offsets z1, z2 and sums xsum per scale group; x2 None: one
    plane), for the types in VECTOR_INT_TYPES (scale groups of 32 columns); out [G * R]."""
    k = x1.shape[0]
    for g in prange(t.shape[0]):
        acc = carray(_vector(), R)
        for r in range(R):
            acc[r] = 0
        _vector_int(marker, t[g], k, x1, x2, xs, z1, z2, xsum, acc)
        for r in range(R):
            out[g * R + r] = acc[r]


@intrinsic
def finite(typingctx, v):
    """Whether float32 v is finite, from its exponent bits (a float comparison would be folded away:
    numba compiles parallel loops with fast-math flags that assume no inf or nan)."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        e = builder.and_(builder.bitcast(args[0], i32), ir.Constant(i32, 0x7F800000))
        return builder.icmp_unsigned("!=", e, ir.Constant(i32, 0x7F800000))
    return types.boolean(types.float32), codegen


@njit(**JIT)
def _quantize_row(x, gshift, x1, x2, xs, z1, z2, xsum):
    # Loops of constant length (32, 16) and group sums taken from the rounded floats as they are made:
    # summing the int8 planes back from memory right after storing them cost twice the rest.
    bits = x.view(np.int32)
    for b in range(x.shape[0] // 32):
        o = 32 * b
        mb, total = np.int32(0), np.float32(0)
        for c in range(o, o + 32):  # max |x| on the bits (a float max does not vectorize without no-nans)
            mb = max(mb, bits[c] & np.int32(0x7FFFFFFF))
            total += x[c]
        m = _f32_from_bits(mb)
        s = m / np.float32(127) if m > 0 else np.float32(1)
        inv = np.float32(1) / s
        sb = s / np.float32(256) if finite(total) else np.float32(np.nan)  # inf/nan stay so
        xs[b] = sb
        a1, a2 = np.float32(0), np.float32(0)
        for h in range(2):  # halves of 16: the scale groups of gshift 4
            g1, g2 = np.float32(0), np.float32(0)
            for c in range(o + 16 * h, o + 16 * h + 16):
                y = x[c] * inv
                q1 = np.float32(np.rint(y))
                q2 = min(max(np.float32(np.rint((y - q1) * np.float32(256))), np.float32(-127)), np.float32(127))
                x1[c] = np.int8(q1)
                x2[c] = np.int8(q2)
                g1 += q1  # exact: integers below 2^24
                g2 += q2
            if gshift == 4:
                u = 2 * b + h
            elif h == 0:
                a1, a2 = g1, g2
                continue
            else:
                u, g1, g2 = b, g1 + a1, g2 + a2
            z1[u] = 128 * np.int32(g1)
            z2[u] = 128 * (256 * np.int32(g1) + np.int32(g2))
            xsum[u] = (np.float32(256) * g1 + g2) * sb


@njit(parallel=True, **JIT)
def quantize_planes(x, gshift, x1, x2, xs, z1, z2, xsum):
    """The activations x [n, k] float32 (k a multiple of 32) as `matmul_int` takes them: per 32 columns
    s = max|x| / 127 (1 where all are 0), q1 = round(x / s), q2 = round(256 (x / s - q1)) clamped to +-127;
    xs = s / 256, nan for a block holding an inf or a nan (the products come out nan, as float32's
    would); per scale group of 2^gshift columns z1 = 128 sum q1, z2 = 128 (256 sum q1 + sum q2) and
    xsum = the sum of s (q1 + q2 / 256)."""
    for i in prange(x.shape[0]):
        _quantize_row(x[i], gshift, x1[i], x2[i], xs[i], z1[i], z2[i], xsum[i])


@njit(**JIT)
def quantize_planes_serial(x, gshift, x1, x2, xs, z1, z2, xsum):
    """`quantize_planes` on the calling thread (a few rows: starting threads would cost more)."""
    for i in range(x.shape[0]):
        _quantize_row(x[i], gshift, x1[i], x2[i], xs[i], z1[i], z2[i], xsum[i])


@njit(**dict(JIT, fastmath={"reassoc", "nsz"}))  # no contract: a * q + m rounded twice, as NumPy does
def dequantize(marker, t, g0, out):
    """out[:, i * R + r] = row r of group g0 + i, as float32 columns: out [k, m * R] for m groups.
    On the calling thread: prefill alternates it with BLAS sgemm, and a parallel region here would
    compete for the cores with BLAS's worker threads, which spin for a while after each product."""
    for i in range(out.shape[1] // R):
        _group(marker, t[g0 + i], out.shape[0], out[:, i * R:(i + 1) * R])


@njit(parallel=True, **JIT)
def transpose(raw, t):
    """Byte-transpose rows raw [rows, row_bytes] into groups t [G, row_bytes * R] (the layout above);
    rows past the end stay zero (zero scales: the padding rows come out 0). The inner loop runs down
    a column of R rows so that the writes are consecutive (3.7x faster than consecutive reads here)."""
    n = raw.shape[0]
    for g in prange(t.shape[0]):
        tg, m = t[g], min(R, n - g * R)
        if m == R:
            blk = raw[g * R:(g + 1) * R]
            for p in range(raw.shape[1]):
                for r in range(R):
                    tg[p * R + r] = blk[r, p]
        else:
            for r in range(m):
                src = raw[g * R + r]
                for p in range(raw.shape[1]):
                    tg[p * R + r] = src[p]

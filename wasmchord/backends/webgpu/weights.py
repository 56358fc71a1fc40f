"""Weight matrices on the device: GGUF blocks repacked at load into aligned u32 quant words plus f32
scales (and minimums), in the formats qmatrix.wgsl reads (`override FMT`), split by rows where one
binding would exceed the device's limit."""

from __future__ import annotations

import numpy as np

from ...errors import UnsupportedError
from ...formats.quants import (iq4_nl_values, iq4_xs_values, k4_nibbles, k5_values, k_scale_min, q2_k_values,
                               q3_k_values, q6_k_values)
from ..base import WeightSource

# GPU formats: 0 F32, 1 F16, 2 Q4 sym, 3 Q4 + min, 4 Q5 sym, 5 Q8, 6 Q8 with a scale per 16, 7 Q5 + min,
# 8 Q4 with a scale and a minimum per 16
WORDS = {0: 32, 1: 16, 2: 4, 3: 4, 4: 4, 5: 8, 6: 8, 7: 4, 8: 4}   # u32 words per 32-element block (a multiple of 4)
FMT_NAMES = {0: "f32", 1: "f16", 2: "q4", 3: "q4m", 4: "q5", 5: "q8", 6: "q8/16", 7: "q5m", 8: "q4m/16"}
SCALES_PER_BLOCK = {6: 2, 7: 2, 8: 4}
SUPPORTED = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS"


class Piece:
    """Rows [col0, col0 + rows) of a weight matrix in one GPU format, in buffers within binding limits."""

    __slots__ = ("fmt", "q", "s", "m", "col0", "rows", "nbytes")

    def __init__(self, fmt, q, s, m, col0, rows, nbytes):
        self.fmt, self.q, self.s, self.m, self.col0, self.rows, self.nbytes = fmt, q, s, m, col0, rows, nbytes


class GMatrix:
    """A weight matrix [rows, k] on the device as a list of pieces; `nbytes` = bytes a product reads."""

    def __init__(self, pieces, rows, k, nbytes):
        self.pieces, self.shape, self.nbytes = pieces, (rows, k), nbytes


def _f16col(b, i):
    return np.ascontiguousarray(b[:, i:i + 2]).view(np.float16).astype(np.float32).reshape(-1)


def _u32(a):
    return np.ascontiguousarray(a).view(np.uint32)


def _pack_q4(v):
    """(n, 32) uint8 nibble values -> (n, 4) u32 in GGUF byte order."""
    return _u32((v[:, :16] | (v[:, 16:] << 4)).astype(np.uint8))


def _hi_bits(v):
    """(n, 32) values 0..31 -> (n,) u32 whose bit e is bit 4 of element e."""
    return _u32(np.packbits((v >> 4) & 1, axis=-1, bitorder="little")).reshape(-1)


def _interleave(a, b):
    """Two (n,) f32 arrays -> (2n,) a0 b0 a1 b1 ... (a scale and a minimum per block)."""
    return np.stack([a.reshape(-1), b.reshape(-1)], axis=-1).astype(np.float32).reshape(-1)


def repack(src: WeightSource):
    """A GGUF tensor -> (fmt, quant words [blocks, words], scales, mins) for qmatrix.wgsl."""
    t, raw = src.qtype.name, src.raw
    if t == "F32":
        return 0, _u32(raw).reshape(-1, 32), None, None
    if t == "F16":
        return 1, _u32(raw).reshape(-1, 16), None, None
    if t == "BF16":
        f = (raw.view(np.int16).astype(np.int32) << 16).view(np.float32)
        return 0, _u32(f).reshape(-1, 32), None, None
    b = raw.reshape(-1, src.qtype.type_size)
    if t == "Q4_0":
        return 2, _u32(b[:, 2:18]), _f16col(b, 0), None
    if t == "Q4_1":
        return 3, _u32(b[:, 4:20]), _f16col(b, 0), _f16col(b, 2)
    if t == "Q5_0":  # the 32 high bits (one u32 per block) go where the minimums go
        return 4, _u32(b[:, 6:22]), _f16col(b, 0), _u32(b[:, 2:6]).reshape(-1)
    if t == "Q5_1":  # scale and minimum interleaved in s, the 32 high bits in m
        return 7, _u32(b[:, 8:24]), _interleave(_f16col(b, 0), _f16col(b, 2)), _u32(b[:, 4:8]).reshape(-1)
    if t == "Q8_0":
        return 5, _u32(b[:, 2:34]), _f16col(b, 0), None
    if t in ("Q4_K", "Q5_K"):  # 8 sub-blocks of 32 with scale d*sc and min dmin*m (exact in f32)
        n = b.shape[0]
        d, dmin = _f16col(b, 0)[:, None], _f16col(b, 2)[:, None]
        sc, mn = k_scale_min(b[:, 4:16])
        scale, minimum = d * sc, -(dmin * mn)
        if t == "Q4_K":
            return 3, _pack_q4(k4_nibbles(b[:, 16:144]).reshape(n * 8, 32)), scale.reshape(-1), minimum.reshape(-1)
        v = k5_values(b).reshape(n * 8, 32)  # Q5_K: the high bits in m
        return 7, _pack_q4(v & 15), _interleave(scale, minimum), _hi_bits(v)
    if t == "Q6_K":  # int8 values q-32 in element order, a scale d*sc per 16
        q, dl = q6_k_values(b)
        return 6, _u32(q.reshape(-1, 32)), dl.reshape(-1), None
    if t == "Q3_K":  # int8 values -4..3 in element order, a scale d*sc per 16 (10 bits per weight)
        q, dl = q3_k_values(b)
        return 6, _u32(q.reshape(-1, 32)), dl.reshape(-1), None
    if t == "IQ4_NL":  # the table's values as signed bytes, d per 32
        q, d = iq4_nl_values(b)
        return 5, _u32(q), d.reshape(-1), None
    if t == "IQ4_XS":  # the same, with a scale d * (ls - 32) per 32
        q, dl = iq4_xs_values(b)
        return 5, _u32(q.reshape(-1, 32)), dl.reshape(-1), None
    if t == "Q2_K":  # 2-bit values in 4-bit words; scale, minimum, scale, minimum per 32 (8 bits per weight)
        q, dl, ml = q2_k_values(b)
        s = np.stack([dl[:, 0::2], -ml[:, 0::2], dl[:, 1::2], -ml[:, 1::2]], axis=-1).reshape(-1)
        return 8, _pack_q4(q.reshape(-1, 32)), s.astype(np.float32), None
    raise UnsupportedError(f"{src.name}: the GPU backend does not support {t} weights (supported: {SUPPORTED})")


def upload_matrix(gpu, parts: list[WeightSource], dummy) -> GMatrix:
    """Upload stacked parts; consecutive parts of one GPU format become one piece (so Q|K|V or gate|up
    is a single dispatch), split by rows only where a binding would exceed the device limit. Absent
    scales or minimums are bound to `dummy`."""
    gpu.check()
    k = parts[0].shape[1]
    groups: list[list] = []  # [fmt, q arrays, s arrays, m arrays, rows]
    for p in parts:
        fmt, q, s, m = repack(p)
        if groups and groups[-1][0] == fmt and (groups[-1][3][0] is None) == (m is None):
            g = groups[-1]
        else:
            g = [fmt, [], [], [], 0]
            groups.append(g)
        g[1].append(q)
        g[2].append(s)
        g[3].append(m)
        g[4] += p.shape[0]
    pieces, col0, nbytes = [], 0, 0
    for fmt, qs, ss, ms, rows in groups:
        q = np.concatenate(qs)
        s = None if ss[0] is None else np.concatenate(ss)
        m = None if ms[0] is None else np.concatenate(ms)
        bpr = q.shape[0] // rows  # blocks per row
        row_bytes = bpr * q.shape[1] * 4
        per = max(1, min(rows, gpu.max_binding // row_bytes))
        spb = SCALES_PER_BLOCK.get(fmt, 1)
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            b0, b1 = r0 * bpr, r1 * bpr
            parts_ = [q[b0:b1], None if s is None else s[b0 * spb:b1 * spb], None if m is None else m[b0:b1]]
            qb, sb, mb = (dummy if a is None else gpu.buffer(a.nbytes, a) for a in parts_)
            pieces.append(Piece(fmt, qb, sb, mb, col0 + r0, r1 - r0, sum(a.nbytes for a in parts_ if a is not None)))
        nbytes += q.nbytes + (s.nbytes if s is not None else 0) + (m.nbytes if m is not None else 0)
        col0 += rows
    return GMatrix(pieces, col0, k, nbytes)

"""Compiled CPU kernels (numba) for the small ops of a decode step: attention of one new position per
sequence (RoPE, the KV-cache write and the softmax-weighted sum in one call), RMSNorm, SwiGLU and GeGLU; and
the masked softmax of prefill attention, whose two products stay with BLAS.

A decode step of a small model is mostly fixed costs: in NumPy, the attention of one new position is
a dozen array operations of a few microseconds each per layer, more than its arithmetic. Here it is
one call per layer for all the step's sequences, each sequence and KV head a task.

Every row is computed the same way whatever else is in the call (no sum runs across rows), so a
sequence's numbers do not depend on its batch. Arithmetic is float32, in the order NumPy's reference
takes up to summation order (`reassoc`). Compiled code is cached on disk, as `cpu_kernels`'.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .cpu_kernels import JIT, finite

PARALLEL_ROWS = 64  # rows from which RMSNorm, SwiGLU and GeGLU split across threads (below: thread start-up dominates)


# ---------------------------------------------------------------------------- exp
# numba calls libm's expf one value at a time (no SVML here): a softmax or a SwiGLU row spends most of
# its time there. This exp is plain arithmetic that LLVM vectorizes: Cephes' expf (range reduction
# by ln 2 in two parts, a degree-6 polynomial, 2^n from the exponent bits), within 2 ulp of it.

@intrinsic
def _pow2(typingctx, n):
    """2^n for an integral float32 n in [-126, 127], from the exponent bits."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        e = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(e, ir.Constant(i32, 23)), ir.FloatType())
    return types.float32(types.float32), codegen


@njit(**JIT)
def _exp_nonpositive(x):
    """exp(x) for x <= 0 (0 below -87, where float32's exp leaves the normal range)."""
    y = max(x, np.float32(-87))
    n = np.float32(np.rint(y * np.float32(1.44269504088896341)))
    r = y - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    e = (p * r * r + r + np.float32(1)) * _pow2(n)
    return e if x >= np.float32(-87) else np.float32(0)


# ---------------------------------------------------------------------------- RMSNorm, SwiGLU, GeGLU

@njit(**JIT)
def _rmsnorm_row(x, w, eps, out):
    ss = np.float32(0)
    for i in range(x.shape[0]):
        ss += x[i] * x[i]
    inv = np.float32(1) / np.sqrt(ss / np.float32(x.shape[0]) + eps)
    for i in range(x.shape[0]):
        out[i] = x[i] * inv * w[i]


@njit(**JIT)
def _rmsnorm_serial(x, w, eps, out):
    for i in range(x.shape[0]):
        _rmsnorm_row(x[i], w, eps, out[i])


@njit(parallel=True, **JIT)
def _rmsnorm_parallel(x, w, eps, out):
    for i in prange(x.shape[0]):
        _rmsnorm_row(x[i], w, eps, out[i])


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [n, d] / sqrt(mean(x^2) + eps) * w [d], row by row (float32, contiguous x)."""
    out = np.empty_like(x)
    (_rmsnorm_parallel if x.shape[0] >= PARALLEL_ROWS else _rmsnorm_serial)(x, w, np.float32(eps), out)
    return out


@njit(**JIT)
def _glu_row(gate_up, out, gelu):
    # act(g) = g sigmoid(t): silu t = g; gelu_tanh t = 2u, u = sqrt(2 / pi) (g + 0.044715 g^3), since
    # g (1 + tanh(u)) / 2 = g sigmoid(2u). t has g's sign, so with e = exp(-|t|) <= 1, act(g) = g / (1 + e)
    # for g >= 0 and g e / (1 + e) below. Two passes: LLVM vectorizes neither the exp nor the division in
    # a loop that has both.
    f = out.shape[0]
    if gelu:
        for j in range(f):
            g = gate_up[j]
            u = np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)
            out[j] = _exp_nonpositive(np.float32(-2) * abs(u))
    else:
        for j in range(f):
            out[j] = _exp_nonpositive(-abs(gate_up[j]))
    for j in range(f):
        g, e = gate_up[j], out[j]
        out[j] = (g if g >= 0 else g * e) / (np.float32(1) + e) * gate_up[f + j]


@njit(**JIT)
def _glu_serial(gate_up, out, gelu):
    for i in range(gate_up.shape[0]):
        _glu_row(gate_up[i], out[i], gelu)


@njit(parallel=True, **JIT)
def _glu_parallel(gate_up, out, gelu):
    for i in prange(gate_up.shape[0]):
        _glu_row(gate_up[i], out[i], gelu)


def _glu(gate_up: np.ndarray, gelu: bool) -> np.ndarray:
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
    (_glu_parallel if gate_up.shape[0] >= PARALLEL_ROWS else _glu_serial)(gate_up, out, gelu)
    return out


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """silu(gate) * up [n, f] of gate_up [n, 2f] (gate | up; float32, contiguous)."""
    return _glu(gate_up, False)


def geglu(gate_up: np.ndarray) -> np.ndarray:
    """gelu_tanh(gate) * up [n, f] of gate_up [n, 2f] (gate | up; float32, contiguous)."""
    return _glu(gate_up, True)


# ---------------------------------------------------------------------------- decode attention

@njit(**JIT)
def _norm_rope(x, w, eps, cos, sin, neox):
    """In place on one head x [hd]: RMSNorm with weight w when w is not empty, then RoPE with the
    position's cos/sin [n_rot / 2]: pairs (i, i + n_rot / 2) when neox, else (2i, 2i + 1)."""
    if w.shape[0]:
        _rmsnorm_row(x, w, eps, x)
    half = cos.shape[0]
    for i in range(half):
        a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
        x0, x1 = x[a], x[b]
        x[a] = x0 * cos[i] - x1 * sin[i]
        x[b] = x0 * sin[i] + x1 * cos[i]


@njit(parallel=True, **JIT)
def decode_attention(q, k, v, K, V, slots, pos, cos, sin, neox, qw, kw, eps, scale, window, out):
    """Rows of new positions: row b of q [B, H, hd], k [B, KV, hd], v [B, KV, hd_v] is at position
    pos[b] of cache slot slots[b] (K [slots, KV, ctx, hd], V [slots, KV, ctx, hd_v]): one row each of B
    sequences (batched decode), or consecutive positions of one (a short prefill). q and k are
    RMSNormed per head when qw/kw are not empty (qk-norm), then rotated (RoPE table cos/sin
    [positions, n_rot / 2]); every row's k and v are written to the cache first, then each query head
    attends over positions pos[b] - window + 1 .. pos[b] (from 0 when window is 0) of its KV head
    (H / KV query heads share one). out [B, H * hd_v]. q and k are overwritten. A head whose scores
    hold an inf or a nan gives nan (as float32's softmax would)."""
    B, H, hd = q.shape
    KV, hdv = k.shape[1], v.shape[2]
    rep = H // KV
    for task in prange(B * KV):
        b, g = task // KV, task % KV
        s, p = slots[b], pos[b]
        kr = k[b, g]
        _norm_rope(kr, kw, eps, cos[p], sin[p], neox)
        K[s, g, p, :] = kr
        V[s, g, p, :] = v[b, g]
    for task in prange(B * KV):
        b, g = task // KV, task % KV
        s, p = slots[b], pos[b]
        lo = max(0, p + 1 - window) if window > 0 else 0
        T = p + 1 - lo
        qh = q[b, g * rep:(g + 1) * rep]                                   # [rep, hd]
        for h in range(rep):
            _norm_rope(qh[h], qw, eps, cos[p], sin[p], neox)
            for d in range(hd):
                qh[h, d] *= scale
        sc = np.empty((rep, T), np.float32)
        ok = np.ones(rep, np.bool_)  # the head's scores are finite
        for t in range(T):
            kt = K[s, g, lo + t]
            for h in range(rep):
                acc = np.float32(0)
                for d in range(hd):
                    acc += qh[h, d] * kt[d]
                sc[h, t] = acc
                ok[h] &= finite(acc)
        o = np.zeros((rep, hdv), np.float32)
        total = np.empty(rep, np.float32)
        for h in range(rep):
            m = sc[h, 0]
            for t in range(1, T):
                m = max(m, sc[h, t])
            z = np.float32(0)
            for t in range(T):
                e = _exp_nonpositive(sc[h, t] - m)
                sc[h, t] = e
                z += e
            total[h] = z
        for t in range(T):
            vt = V[s, g, lo + t]
            for h in range(rep):
                e = sc[h, t]
                for d in range(hdv):
                    o[h, d] += e * vt[d]
        for h in range(rep):
            inv, c = np.float32(1) / total[h], (g * rep + h) * hdv
            for d in range(hdv):
                out[b, c + d] = o[h, d] * inv if ok[h] else np.float32(np.nan)


# ---------------------------------------------------------------------------- prefill attention's softmax

@njit(**JIT)
def causal_softmax(s, pos0, t0, window):
    """In place, each row of the scores s [heads, n, T] (row i: query position pos0 + i against key
    positions t0 .. t0 + T - 1) becomes the softmax over the keys that position sees (key <= query,
    and query - key < window when window > 0), 0 elsewhere: the causal mask, max, exp, sum and
    normalization of NumPy's seven passes over s in one. A row whose visible scores hold an inf or a
    nan becomes nan (as float32's softmax would). On the calling thread: prefill attention already runs
    a piece of the rows per core."""
    heads, n, T = s.shape
    for task in range(heads * n):
        row, p = s[task // n, task % n], pos0 + task % n - t0   # p: the query's own key index
        lo = max(0, p - window + 1) if window > 0 else 0
        hi = min(T, p + 1)
        row[:lo] = 0
        row[hi:] = 0
        vis = row[lo:hi]
        m, total = vis[0], np.float32(0)
        for t in range(vis.size):
            m = max(m, vis[t])
        for t in range(vis.size):  # an inf or a nan anywhere makes the sum non-finite
            total += vis[t]
        z = np.float32(0)
        for t in range(vis.size):
            e = _exp_nonpositive(vis[t] - m)
            vis[t] = e
            z += e
        inv = np.float32(1) / z if finite(total) else np.float32(np.nan)
        for t in range(vis.size):
            vis[t] *= inv

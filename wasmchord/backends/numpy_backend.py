"""The NumPy backend: float32 math on the CPU.

Weights: `weights="quantized"` keeps them in their GGUF blocks (the file's size in memory, nothing
expanded at load) and multiplies them with compiled kernels (`quantized.QuantMatrix`).
`weights="f32"` dequantizes them to float32 once at load and multiplies with BLAS sgemm/sgemv: the
exact reference (4 bytes per weight), plain NumPy throughout.

With quantized weights the small ops of a decode step (RMSNorm, SwiGLU, the attention of one new
position per sequence) run compiled as well (`cpu_ops`): in NumPy they cost more in per-call overhead
than in arithmetic. The NumPy forms stay as the f32 backend's, and as the kernels' reference.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import BackendError
from ..formats.quants import dequantize_rows
from ..constrain import apply_mask
from ..sampling import check_finite
from . import blas
from .base import Backend, rope_cos_sin
from .quantized import TILE_BYTES, QuantMatrix

_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))
_NO_NORM = np.empty(0, np.float32)


COMPILED_ATTENTION = 1 << 22  # query x key positions x query heads x head size up to which prefill attention (RoPE,
                               # cache write, scores, softmax, values) runs as compiled loops over rows rather than
                               # NumPy's products and passes: a layer of 32 new tokens, SmolLM2 182 -> 70 us, Gemma-3
                               # 365 -> 116, Qwen2.5 322 -> 136; the crossing near 5e6 (Gemma-3) to 1e7 (SmolLM2)
ATTENTION_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@functools.cache
def _attention_pool() -> ThreadPoolExecutor | None:
    """Threads for prefill attention, one per usable core (None on one core), shared by all models."""
    return ThreadPoolExecutor(ATTENTION_THREADS, "wasmchord-attention") if ATTENTION_THREADS > 1 else None


def _similar_lengths(pos: np.ndarray) -> list[np.ndarray]:
    """Rows of a batched decode step grouped so that none in a group attends over much fewer positions
    than the longest (each group's rows are padded to its longest: at most 1.5x + 64 of each row's)."""
    order = np.argsort(pos, kind="stable")
    groups, i = [], 0
    while i < len(order):
        j, limit = i + 1, pos[order[i]] * 1.5 + 64
        while j < len(order) and pos[order[j]] <= limit:
            j += 1
        groups.append(order[i:j])
        i = j
    return groups


class KVCache:
    """Per layer: k [KV, max_ctx, hd], v [KV, max_ctx, hd_v] of one slot; `slot(i)` gives the others
    (views of [slots, KV, max_ctx, ...] arrays). np.zeros pages are only committed when written, so a
    long context costs memory only as it fills."""

    def __init__(self, n_layers, n_kv, max_ctx, hd, hd_v, slots=1):
        self.k_all = [np.zeros((slots, n_kv, max_ctx, hd), np.float32) for _ in range(n_layers)]
        self.v_all = [np.zeros((slots, n_kv, max_ctx, hd_v), np.float32) for _ in range(n_layers)]
        self.max_ctx, self.slots = max_ctx, slots
        self.index = 0
        self.k, self.v = [a[0] for a in self.k_all], [a[0] for a in self.v_all]

    def slot(self, i: int) -> "KVCache":
        views = self.__dict__.setdefault("_views", {0: self})
        if i not in views:
            view = views[i] = copy.copy(self)
            view.index = i
            view.k, view.v = [a[i] for a in self.k_all], [a[i] for a in self.v_all]
        return views[i]


ACTIVATIONS = ("auto", "f32", "int16", "int8")


def _activations(weights: str, activations: str) -> str:
    """How the products of quantized weights take their activations: "f32"; "int16" (two int8 planes per 32
    columns: the precision of 16-bit integers, logits within a few 1e-4 of float32) or "int8" (one plane,
    llama.cpp's precision). With AVX-512 VNNI the integer kernels take every product of their types; with
    AVX2 alone, products of 32 tokens or more (prompts: the planes joined into 16-bit integers, vpmaddwd) and
    one or two tokens' Q4_K and Q6_K products, the rest staying float32 (batch steps and the other types'
    one or two tokens, where integers save less than they cost). "auto": int16 with VNNI or AVX2, else f32."""
    if activations not in ACTIVATIONS:
        raise BackendError(f"cpu backend: activations={activations!r}, expected one of {', '.join(map(repr, ACTIVATIONS))}")
    if weights == "f32":
        if activations in ("int16", "int8"):
            raise BackendError(f"cpu backend: activations={activations!r} needs weights='quantized' "
                               "(with weights='f32' BLAS multiplies in float32)")
        return "f32"
    if activations == "f32":
        return "f32"
    from . import cpu_kernels  # numba: needed by the quantized weights anyway
    if not (cpu_kernels.HAS_VNNI or cpu_kernels.HAS_AVX2):
        if activations == "auto":
            return "f32"
        raise BackendError(f"cpu backend: activations={activations!r} needs a CPU with AVX2 or AVX-512 VNNI, "
                           "which this one lacks; use 'f32' (or 'auto')")
    return "int16" if activations == "auto" else activations


class NumpyBackend(Backend):
    name = "cpu"

    def __init__(self, *, weights: str = "quantized", activations: str = "auto", attention_chunk: int = 512):
        if weights not in ("f32", "quantized"):
            raise BackendError(f"cpu backend: weights={weights!r}, expected 'f32' or 'quantized'")
        self.weights = weights
        self.activations = _activations(weights, activations)
        self.attention_chunk = attention_chunk
        self._tile = np.empty(TILE_BYTES // 4, np.float32) if weights == "quantized" else None  # prefill tiles
        self._rope_tables: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._rows: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # the last step's (positions, slots)
        self._kernels = False  # a matrix multiplied by the compiled kernels was loaded
        # prefill attention on one thread per core: BLAS is kept to one thread beside the kernels
        self._pool = _attention_pool() if weights == "quantized" else None
        self._ops = None  # compiled small ops (numba, imported with the quantized weights' kernels)
        # a subclass that overrides `attention` (to record or change it) gets every prompt through it
        self._compiled_prompts = type(self).attention is NumpyBackend.attention
        if weights == "quantized":
            from . import cpu_ops
            self._ops = cpu_ops

    def forward_scope(self):
        # one BLAS thread only beside the compiled kernels: a model whose matrices all went to float32
        # (F32 files) keeps BLAS's threads
        return blas.serial() if self._kernels else contextlib.nullcontext()

    def describe(self) -> str:
        if self.weights == "quantized":
            from . import cpu_kernels as K
            acts = self.activations
            if acts != "f32" and not K.HAS_VNNI:  # AVX2: integers for prompts, and one token of a few types
                acts = (f"{acts} for 32 tokens or more and one token of {', '.join(sorted(K.VECTOR_INT_TYPES))}, "
                        "else f32")
            return f"NumPy + compiled kernels (weights in their GGUF blocks, activations {acts})"
        return "NumPy (float32 BLAS, weights f32)"

    # ------------------------------------------------------------------------------------ memory
    def load_matrix(self, parts):
        if self.weights == "quantized":
            m = QuantMatrix(parts)
            m.activations = self.activations
            self._kernels = self._kernels or any(run.t is not None for run in m.runs)
            return m
        k = parts[0].shape[1]
        out = np.empty((sum(p.shape[0] for p in parts), k), np.float32)
        r = 0
        for p in parts:
            dequantize_rows(p.raw, p.qtype, p.shape, out=out[r:r + p.shape[0]].reshape(-1), what=p.name)
            r += p.shape[0]
        return out

    def load_vector(self, array):
        return np.ascontiguousarray(array, dtype=np.float32)

    def alloc_kv_cache(self, n_layers, n_kv_heads, max_ctx, head_dim, head_dim_v, slots=1):
        return KVCache(n_layers, n_kv_heads, max_ctx, head_dim, head_dim_v, slots)

    def copy_kv(self, cache, src, dst, n):
        for a in cache.k_all + cache.v_all:
            a[dst, :, :n] = a[src, :, :n]

    def read(self, x):
        return np.asarray(x)


    # ------------------------------------------------------------------------------------ ops
    def embed(self, table, ids, scale=1.0):
        ids = np.asarray(ids, dtype=np.int64)
        if isinstance(table, QuantMatrix):
            x = table.rows(ids)
        else:
            x = table[ids]
        if scale != 1.0:
            x *= np.float32(scale)
        return x

    def rmsnorm(self, x, w, eps):
        if self._ops is not None:
            rows = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])         # [rows, d]
            return self._ops.rmsnorm(rows, w, eps).reshape(x.shape)
        ms = np.einsum("...i,...i->...", x, x)[..., None] / np.float32(x.shape[-1])
        out = x * (np.float32(1.0) / np.sqrt(ms + np.float32(eps)))
        out *= w
        return out

    def layernorm(self, x, w, b, eps):
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        var = np.mean(np.square(xc), axis=-1, keepdims=True)
        return xc * (1.0 / np.sqrt(var + np.float32(eps))) * w + b

    def matmul(self, x, w, bias=None, *, residual=None, norm=None):
        if norm is not None:
            x = self.rmsnorm(x, *norm)
        y = w.matmul(x, self._tile) if isinstance(w, QuantMatrix) else x @ w.T
        if bias is not None:
            y += bias
        if residual is not None:
            residual += y
            return residual
        return y

    def add(self, a, b):
        a += b
        return a

    def _rope_table(self, base, n_rot, scale, n_pos, factors=None, attn_factor=1.0):
        key = (base, n_rot, scale, factors, attn_factor)
        tab = self._rope_tables.get(key)
        if tab is None or tab[0].shape[0] < n_pos:
            tab = self._rope_tables[key] = rope_cos_sin(base, n_rot, scale, max(n_pos, 4096), factors, attn_factor)
        return tab

    def rope(self, x, pos0, *, base, n_rot, scale, neox, factors=None, attn_factor=1.0):
        """`pos0` is the first row's position (rows consecutive), or an array of each row's position."""
        pos = np.arange(pos0, pos0 + x.shape[0]) if np.isscalar(pos0) else np.asarray(pos0)
        cos, sin = self._rope_table(base, n_rot, scale, int(pos.max()) + 1, factors, attn_factor)
        c = cos[pos, None, :]  # [n, 1, n_rot/2]
        s = sin[pos, None, :]
        if neox:  # pairs (i, i + n_rot/2)
            x0, x1 = x[..., :n_rot // 2], x[..., n_rot // 2:n_rot]
        else:     # GGUF/llama: adjacent pairs (2i, 2i+1)
            x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        r0 = x0 * c - x1 * s
        r1 = x0 * s + x1 * c
        x0[...] = r0
        x1[...] = r1
        return x

    def kv_write(self, cache, layer, k, v, pos0, *, rope=None):
        n = k.shape[0]
        if rope is not None:
            k = self.rope(k, pos0, **rope)
        if pos0 + n > cache.max_ctx:
            raise BackendError(f"KV cache overflow: positions up to {pos0 + n} > context {cache.max_ctx}")
        cache.k[layer][:, pos0:pos0 + n] = k.transpose(1, 0, 2)
        cache.v[layer][:, pos0:pos0 + n] = v.transpose(1, 0, 2)

    def attention(self, q, cache, layer, pos0, *, scale, window=0):
        n, H, hd = q.shape
        K, V = cache.k[layer], cache.v[layer]
        kv = K.shape[0]
        out = np.empty((n, H * V.shape[2]), np.float32)
        size = self.attention_chunk
        if self._pool is not None and n >= 32:  # at least one piece per thread
            size = min(size, -(-n // ATTENTION_THREADS))

        def piece(c0):
            c1 = min(n, c0 + size)
            out[c0:c1] = self._attend(q[c0:c1], K, V, pos0 + c0, scale, window, kv, self._ops)
        if self._pool is not None and n > size:
            list(self._pool.map(piece, range(0, n, size)))  # NumPy releases the GIL in these products
        else:
            for c0 in range(0, n, size):
                piece(c0)
        return out

    @staticmethod
    def _attend(q, K, V, pos0, scale, window, kv, ops=None):
        n, H, hd = q.shape
        rep = H // kv
        t_end = pos0 + n
        t0 = max(0, pos0 + 1 - window) if window else 0
        qg = q.reshape(n, kv, rep, hd).transpose(1, 2, 0, 3) * np.float32(scale)  # [kv, rep, n, hd]
        s = qg @ K[:, None, t0:t_end].transpose(0, 1, 3, 2)                         # [kv, rep, n, T]
        if ops is not None:  # compiled: mask and softmax in one pass
            ops.causal_softmax(s.reshape(kv * rep, n, -1), pos0, t0, window)
        else:
            if n > 1 or window:  # causal (and sliding-window) mask by index, added as 0 / -inf
                qpos = np.arange(pos0, t_end)[:, None]
                kpos = np.arange(t0, t_end)[None, :]
                masked = kpos > qpos
                if window:
                    masked |= qpos - kpos >= window
                s += np.where(masked, np.float32(-np.inf), np.float32(0))
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
        o = s @ V[:, None, t0:t_end]                                                # [kv, rep, n, hd_v]
        return o.transpose(2, 0, 1, 3).reshape(n, -1)

    def attend(self, q, k, v, cache, layer, pos0, *, rope, scale, window=0, qk_norm=None):
        n, H, hd = q.shape
        short = self._compiled_prompts and n * (pos0 + n) * H * hd <= COMPILED_ATTENTION
        if self._ops is not None and (n == 1 or short):  # decode, a short prompt
            rows = self._rows.get((pos0, n, cache.index))
            if rows is None:  # the step's positions and slots, made once for all its layers
                rows = (np.arange(pos0, pos0 + n), np.full(n, cache.index))
                self._rows = {(pos0, n, cache.index): rows}
            return self._decode_attention(q, k, v, cache, layer, *rows, pos0 + n - 1, rope, scale, window, qk_norm)
        return super().attend(q, k, v, cache, layer, pos0, rope=rope, scale=scale, window=window, qk_norm=qk_norm)

    def attend_batch(self, q, k, v, cache, layer, positions, slots, *, rope, scale, window=0, qk_norm=None):
        pos, sl = np.asarray(positions, np.int64), np.asarray(slots, np.int64)
        if self._ops is not None:
            return self._decode_attention(q, k, v, cache, layer, pos, sl, int(pos.max()), rope, scale, window, qk_norm)
        if pos.max() >= cache.max_ctx:
            raise BackendError(f"KV cache overflow: position {pos.max()} >= context {cache.max_ctx}")
        if qk_norm is not None:
            qw, kw, eps = qk_norm
            q, k = self.rmsnorm(q, qw, eps), self.rmsnorm(k, kw, eps)                       # per head
        q = self.rope(q, pos, **rope)                                                        # [B, H, hd]
        k = self.rope(k, pos, **rope)                                                        # [B, KV, hd]
        K, V = cache.k_all[layer], cache.v_all[layer]                                        # [slots, KV, ctx, hd]
        K[sl, :, pos], V[sl, :, pos] = k, v
        out = np.empty((q.shape[0], q.shape[1] * V.shape[3]), np.float32)
        for rows in _similar_lengths(pos):
            out[rows] = self._attend_rows(q[rows], K, V, sl[rows], pos[rows], scale, window)
        return out                                                                           # [B, H*hd_v]

    def _decode_attention(self, q, k, v, cache, layer, pos, sl, top, rope, scale, window, qk_norm):
        """One new position per row (row b at pos[b] of slot sl[b]; top = max(pos)) through
        `cpu_ops.decode_attention`."""
        if top >= cache.max_ctx:
            raise BackendError(f"KV cache overflow: position {top} >= context {cache.max_ctx}")
        cos, sin = self._rope_table(rope["base"], rope["n_rot"], rope["scale"], top + 1, rope.get("factors"),
                                    rope.get("attn_factor", 1.0))                            # [positions, n_rot/2]
        neox = rope["neox"]
        qw, kw, eps = qk_norm if qk_norm is not None else (_NO_NORM, _NO_NORM, 0.0)
        q, k = np.array(q, np.float32), np.array(k, np.float32)                          # rotated in place
        v = np.ascontiguousarray(v, np.float32)
        out = np.empty((q.shape[0], q.shape[1] * v.shape[2]), np.float32)
        self._ops.decode_attention(q, k, v, cache.k_all[layer], cache.v_all[layer], sl, pos, cos, sin, neox,
                                   qw, kw, np.float32(eps), np.float32(scale), int(window), out)
        return out                                                                           # [B, H*hd_v]

    @staticmethod
    def _attend_rows(q, K, V, sl, pos, scale, window):
        """`_attend` of one new position for B rows at once, each in its own slot: the rows' keys
        lo..T gathered side by side [B, KV, T - lo, hd], positions a row has not reached (or has left
        behind its window) masked."""
        B, H, hd = q.shape
        kv = K.shape[1]
        lo = max(0, int(pos.min()) + 1 - window) if window else 0
        T = int(pos.max()) + 1
        qg = q.reshape(B, kv, H // kv, 1, hd) * np.float32(scale)                             # [B, kv, rep, 1, hd]
        s = qg @ K[sl, :, None, lo:T].transpose(0, 1, 2, 4, 3)                                # [B, kv, rep, 1, T']
        kpos = np.arange(lo, T)[None, :]
        masked = kpos > pos[:, None]                                                          # [B, T']
        if window:
            masked |= pos[:, None] - kpos >= window
        Vg = V[sl, :, None, lo:T]                                                             # [B, kv, 1, T', hd_v]
        if masked.any():  # set, not added: a row's masked positions may hold a previous owner's inf/nan
            s[np.broadcast_to(masked[:, None, None, None, :], s.shape)] = -np.inf
            Vg[np.broadcast_to(masked[:, None, None, :, None], Vg.shape)] = 0
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        o = s @ Vg                                                                            # [B, kv, rep, 1, hd_v]
        return o.reshape(B, -1)

    def swiglu(self, gate_up):
        if self._ops is not None:
            return self._ops.swiglu(np.ascontiguousarray(gate_up, np.float32))                # [n, f]
        f = gate_up.shape[-1] // 2
        g, u = gate_up[..., :f], gate_up[..., f:]
        t = np.negative(g)          # silu(g) * u = g / (1 + exp(-g)) * u, one temporary
        with np.errstate(over="ignore"):  # exp(-g) = inf for g < -88: silu(g) = g / inf = 0, as it should
            np.exp(t, out=t)
        t += 1.0
        np.divide(g, t, out=t)
        t *= u
        return t

    def gelu(self, x):
        return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + np.float32(0.044715) * x * x * x)))

    def geglu(self, gate_up):
        if self._ops is not None:
            return self._ops.geglu(np.ascontiguousarray(gate_up, np.float32))                 # [n, f]
        f = gate_up.shape[-1] // 2
        return self.gelu(gate_up[..., :f]) * gate_up[..., f:]

    def argmax(self, logits, *, mask=None):
        if mask is not None:
            logits = apply_mask(logits, mask)
        check_finite(logits)
        return int(np.argmax(logits))

    def split_heads(self, x, sizes, heads):
        out, c = [], 0
        for size, h in zip(sizes, heads):
            out.append(x[:, c:c + size].reshape(x.shape[0], h, size // h))
            c += size
        return out

"""The backend interface: a small set of coarse ops the transformer graph is written against.

Handles (weights, activations, the KV cache) are owned by the backend: NumPy arrays on the CPU,
device buffers on the GPU. Weights arrive as raw GGUF blocks so a backend may keep them quantized.
Shapes: n = positions in this call, d = model width, H = query heads, hd = head size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from ..formats.quants import GGMLType


def rope_cos_sin(base: float, n_rot: int, scale: float, n_pos: int, factors: tuple | None = None,
                 attn_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [n_pos, n_rot/2] of pos / scale * base^(-2i/n_rot) / factors[i], times attn_factor,
    computed in float64 then rounded to float32 (both backends use this table, so they rotate
    identically). `factors` [n_rot/2] are per-dimension frequency divisors (Llama-3's rope_freqs,
    Phi-3's longrope factors), as ggml_rope_ext's freq_factors; attn_factor is its mscale."""
    inv = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if factors is not None:
        inv = inv / np.asarray(factors, np.float64)
    ang = np.outer(np.arange(n_pos, dtype=np.float64) / scale, inv)
    if attn_factor != 1.0:
        return (attn_factor * np.cos(ang)).astype(np.float32), (attn_factor * np.sin(ang)).astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


class OnDevice:
    """Stands for the `n` token ids that the last argmax/sample left on the device (encode-ahead
    decoding: one for a sequence, a batch's rows after argmax_rows)."""

    def __init__(self, n: int = 1):
        self.n = n

    def __len__(self):
        return self.n


ON_DEVICE = OnDevice()


@dataclass(frozen=True)
class WeightSource:
    """A GGUF tensor as stored: raw bytes (a memory-map view), type and NumPy-order shape."""

    name: str
    raw: np.ndarray
    qtype: GGMLType
    shape: tuple[int, ...]


class Backend:
    """Base class: every op raises until a backend implements it (tinygrad's Allocator style)."""

    name = "base"
    encode_ahead = False  # True: argmax/sample(defer=True) and embed(ON_DEVICE) are supported

    # ------------------------------------------------------------------------------------ memory
    def load_matrix(self, parts: list[WeightSource]):
        """A weight matrix [rows, k]: `parts` stacked by rows (e.g. Q, K and V as one matrix)."""
        raise NotImplementedError("need load_matrix")

    def load_vector(self, array: np.ndarray):
        """A small float32 tensor (norm weights, biases)."""
        raise NotImplementedError("need load_vector")

    def alloc_kv_cache(self, n_layers: int, n_kv_heads: int, max_ctx: int, head_dim: int, head_dim_v: int,
                       slots: int = 1):
        """KV caches for `slots` sequences of up to `max_ctx` positions: the object stands for slot 0,
        and `.slot(i)` gives slot i (the same memory); ops take one slot's cache."""
        raise NotImplementedError("need alloc_kv_cache")

    def copy_kv(self, cache, src: int, dst: int, n: int):
        """Positions 0..n-1 of cache slot `src` into slot `dst`, every layer (a shared prompt's prefill)."""
        raise NotImplementedError("need copy_kv")

    def read(self, x) -> np.ndarray:
        """Bring a handle back to the host as a NumPy array."""
        raise NotImplementedError("need read")

    def supports(self, spec) -> str | None:
        """None when this backend runs the architecture variant `spec`, else the reason it cannot."""
        return None

    def release(self):
        """Forget whatever this backend keeps that refers to a model's weights or KV cache (the GPU:
        its recorded decode step, bind groups and scratch buffers), so that closing the model frees them."""

    def begin_forward(self):
        """Called at the start of each forward pass (GPU: start recording a new pass)."""

    def flush(self):
        """Start the work recorded so far (GPU: submit it), so that the host can do other work before
        it reads a result."""

    def forward_scope(self):
        """A context the whole forward pass runs in (the CPU's compiled kernels: one BLAS thread)."""
        return contextlib.nullcontext()

    def decode_step(self, cache, pos0: int, run):
        """One decode step whose input token is already on the device (encode-ahead), writing
        position pos0 of `cache`: returns `run()`'s output. A backend may capture the step the first
        time and replay it at later positions without running the graph (the GPU does)."""
        return run()

    def decode_batch(self, cache, ids: np.ndarray, positions, slots, run):
        """One batched decode step (token ids[b] at positions[b] of cache slot slots[b]): returns
        `run()`'s output. A backend may capture the step of a batch size the first time and replay it
        with later steps' ids, positions and slots (the GPU does)."""
        return run()

    # ------------------------------------------------------------------------------------ ops
    def embed(self, table, ids: np.ndarray, scale: float = 1.0):
        """Rows `ids` of `table` [vocab, d], times `scale` -> [n, d]."""
        raise NotImplementedError("need embed")

    def rmsnorm(self, x, w, eps: float):
        """x / rms(x) * w over the last axis; x [..., m], w [m]."""
        raise NotImplementedError("need rmsnorm")

    def layernorm(self, x, w, b, eps: float):
        raise NotImplementedError("need layernorm")

    def matmul(self, x, w, bias=None, *, residual=None, norm=None):
        """x [n, k] @ w[rows, k].T (+ bias) -> [n, rows]; with `residual` [n, rows], the product is
        added into it (the residual add fused into the matmul) and `residual` is returned.
        With `norm` = (weight [k], eps), x is RMS-normalized first: rmsnorm(x, weight, eps) @ w.T
        (a backend may fold the norm into the matmul's prologue)."""
        raise NotImplementedError("need matmul")

    def logits(self, x, w, bias=None, *, norm=None):
        """The output head: matmul's product [n, vocab], which only `read` (and, for one position,
        argmax and sample) consumes: a backend may hold many positions' logits in pieces."""
        return self.matmul(x, w, bias, norm=norm)

    def matmul_glu(self, x, w, act: str, *, norm=None):
        """The gated feed-forward input: x [n, k] @ w.T with w = gate rows | up rows [2f, k], then
        act ("swiglu" | "geglu") -> [n, f]; `norm` as in matmul. A backend may fuse it into one kernel."""
        up = self.matmul(x, w, norm=norm)                                                    # [n, 2f]
        return self.swiglu(up) if act == "swiglu" else self.geglu(up)                        # [n, f]

    def add(self, a, b):
        """a + b (a may be updated in place and returned)."""
        raise NotImplementedError("need add")

    def rope(self, x, pos0: int, *, base: float, n_rot: int, scale: float, neox: bool, factors=None,
             attn_factor: float = 1.0):
        """Rotate x [n, heads, hd] for positions pos0..pos0+n-1 (first n_rot dims of each head), with
        the table of rope_cos_sin(base, n_rot, scale, n, factors, attn_factor)."""
        raise NotImplementedError("need rope")

    def kv_write(self, cache, layer: int, k, v, pos0: int, *, rope: dict | None = None):
        """Store k [n, KV, hd] (rotated first with `rope` = rope()'s keyword arguments, when given)
        and v [n, KV, hd_v] at positions pos0..pos0+n-1 of `layer`."""
        raise NotImplementedError("need kv_write")

    def attention(self, q, cache, layer: int, pos0: int, *, scale: float, window: int = 0):
        """Causal attention of q [n, H, hd] (positions pos0..) over the cache -> [n, H * hd_v].

        `window` > 0 limits each query to the last `window` positions (sliding-window layers)."""
        raise NotImplementedError("need attention")

    def attend(self, q, k, v, cache, layer: int, pos0: int, *, rope: dict, scale: float, window: int = 0,
               qk_norm=None):
        """Self-attention of n new positions: per-head RMSNorm of q and k when qk_norm = (q weight,
        k weight, eps), RoPE of q and k (`rope` = rope()'s keyword arguments), k [n, KV, hd] and
        v [n, KV, hd_v] stored at pos0.., then causal attention of q [n, H, hd] over the cache
        -> [n, H * hd_v]. A backend may fuse it and return a handle only its own matmul reads."""
        if qk_norm is not None:
            qw, kw, eps = qk_norm
            q = self.rmsnorm(q, qw, eps)                                                      # per head
            k = self.rmsnorm(k, kw, eps)
        q = self.rope(q, pos0, **rope)                                                       # [n, H, hd]
        self.kv_write(cache, layer, k, v, pos0, rope=rope)                                   # k rotated on the way in
        return self.attention(q, cache, layer, pos0, scale=scale, window=window)              # [n, H*hd_v]

    def attend_batch(self, q, k, v, cache, layer: int, positions, slots, *, rope: dict, scale: float,
                     window: int = 0, qk_norm=None):
        """`attend` for B sequences of one new position each: row b of q [B, H, hd], k, v is at
        positions[b] in cache slot slots[b] (`cache.slot(i)`) -> [B, H * hd_v]."""
        raise NotImplementedError("need attend_batch")

    def swiglu(self, gate_up):
        """[n, 2f] (gate | up) -> silu(gate) * up [n, f]."""
        raise NotImplementedError("need swiglu")

    def geglu(self, gate_up):
        """[n, 2f] (gate | up) -> gelu_tanh(gate) * up [n, f]."""
        raise NotImplementedError("need geglu")

    def gelu(self, x):
        raise NotImplementedError("need gelu")

    def argmax(self, logits, *, mask=None) -> int:
        """Index of the largest value of a [vocab] vector; with `mask` (a constraint's bitmask,
        constrain.Matcher.words), among the tokens it allows."""
        raise NotImplementedError("need argmax")

    def sample(self, logits, params, rng, history, step: int, *, mask=None) -> int:
        """Draw a token from [vocab] logits (penalties from `history`; only tokens `mask` allows, when
        given); default: on the host."""
        from ..constrain import apply_mask
        from ..sampling import sample
        host = self.read(logits)
        return sample(host if mask is None else apply_mask(host, mask), params, rng, history)

    def split_heads(self, x, sizes: list[int], heads: list[int]):
        """Split [n, sum(sizes)] into views [n, heads_i, sizes_i / heads_i]."""
        raise NotImplementedError("need split_heads")

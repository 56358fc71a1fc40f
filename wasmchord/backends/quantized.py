"""Weight matrices that stay in their GGUF blocks, for the CPU backend.

A `QuantMatrix` keeps each run of rows of one block type (Q, K and V stacked may mix types) in the
kernels' layout: the file's bytes, transposed within groups of R rows (see `cpu_kernels`), the same
size as in the file; nothing is expanded. The file pages they were read from are then dropped from
the process's resident set. One or two rows (decode, a batch of two) are multiplied by `matvec`, a
row at a time; more (prefill, batches) by the several-token kernel: with float32 activations, or, on
CPUs with AVX-512 VNNI, the integer kernel (`activations`: "int16", two int8 planes per 32 columns,
logits within a few 1e-4 of float32; "int8", one plane, as llama.cpp). One or two rows take the one-token
integer kernel for its types (VNNI's, or AVX2's for Q4_K and Q6_K). `prefill = "sgemm"` instead
decodes tiles of rows into a reused float32 buffer and multiplies them with BLAS sgemm. F32 runs and
a decodable type without a kernel (none today) are float32 arrays multiplied by BLAS (with a warning);
Q3_K and IQ4_NL are rewritten at load as the same values in Q6_K and Q8_0 blocks. Embedding lookups
decode their rows from the file's own blocks.
"""

from __future__ import annotations

import logging
import mmap
import threading
from dataclasses import dataclass

import numpy as np

from ..formats.quants import dequantize, dequantize_rows, ggml_type, iq4_nl_as_q8_0, q3_k_as_q6_k
from .base import WeightSource

log = logging.getLogger(__name__)

MATVEC_ROWS = 2  # up to this many rows, one matvec each: the several-token kernel pads to 4 tokens and
                 # costs ~3 matvecs (SmolLM2, 2 rows: 22-30 ms per step against 2 x 9.4)
QUANTIZE_PARALLEL = 1 << 16  # activations (tokens x columns) from which their quantization splits across threads
TOKEN_TILE = 256  # tokens per call of the several-token kernels: each row group reads the activations of all
                  # the call's tokens, which then stay in L2 (1,024 tokens x 8,960 columns: 189 -> 287 GFLOP/s)
AVX2_INT_TOKENS = 32  # without VNNI, the integer several-token kernel from this many tokens: below it (batch
                      # steps) quantizing the activations costs what vpmaddwd saves (8 tokens: 0.65-0.9x float32's
                      # time through QuantMatrix, 16: 0.9-1.1x, 32 and 64: 1.0-1.25x; Zen 3)
REUSE_TOKENS = 64  # up to this many tokens (decode batches) the integer kernel's activation buffers are kept per
                   # thread and reused: allocating them cost ~10 us of a 40-140 us product
TILE_BYTES = 4 << 20  # float32 bytes of one prefill tile (stays in cache beside sgemm's packed panels)


_K = None
_local = threading.local()


def _kernels():
    """The compiled kernels' module, imported on first use: numba is needed only by this path."""
    global _K
    if _K is None:
        from . import cpu_kernels
        _K = cpu_kernels
    return _K


def _plane_buffers(npad: int, k: int, gshift: int):
    """The integer kernel's activations for npad tokens x k columns (x1, x2, xs, z1, z2, xsum):
    reused by the calling thread up to REUSE_TOKENS tokens, fresh above."""
    def make():
        return (np.empty((npad, k), np.int8), np.empty((npad, k), np.int8), np.empty((npad, k // 32), np.float32),
                np.empty((npad, k >> gshift), np.int32), np.empty((npad, k >> gshift), np.int32),
                np.empty((npad, k >> gshift), np.float32))
    if npad > REUSE_TOKENS:
        return make()
    cache = getattr(_local, "planes", None)
    if cache is None:
        cache = _local.planes = {}
    key = (npad, k, gshift)
    if key not in cache:
        cache[key] = make()
    return cache[key]


@dataclass
class _Run:
    """Rows c0..c0+rows of the matrix, of one block type."""

    qtype: str
    c0: int
    rows: int
    t: np.ndarray | None = None      # the kernels' layout: uint8 [groups, row_bytes * R]
    marker: np.ndarray | None = None
    block: int = 1                   # columns per block
    f32: np.ndarray | None = None    # [rows, k] (F32, and types without a kernel)


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view: file views and arrays built in memory then share one compiled signature."""
    a = a.view()
    a.setflags(write=False)
    return a


def _release(raw: np.ndarray):
    """Drop the pages of a memory-mapped view from this process's resident set (they stay in the page
    cache; a later read maps them again). Where madvise is missing (Windows), the OS trims them."""
    base = raw.base
    if not isinstance(base, mmap.mmap) or not hasattr(base, "madvise") or raw.size == 0:
        return
    start = raw.ctypes.data - np.frombuffer(base, np.uint8, count=1).ctypes.data
    first = start - start % mmap.PAGESIZE
    base.madvise(mmap.MADV_DONTNEED, first, start + raw.size - first)


TRANSCODE = {"Q3_K": ("Q6_K", q3_k_as_q6_k), "IQ4_NL": ("Q8_0", iq4_nl_as_q8_0)}


def _with_kernel(p: WeightSource) -> WeightSource:
    """A type without a kernel whose values another type's blocks hold exactly, as those blocks (Q3_K as
    Q6_K: 6.6 bits per weight; IQ4_NL as Q8_0: 8.5), rather than float32's 32."""
    if p.qtype.name not in TRANSCODE:
        return p
    name, transcode = TRANSCODE[p.qtype.name]
    out = WeightSource(p.name, transcode(p.raw), ggml_type(name), p.shape)
    _release(p.raw)
    return out


class QuantMatrix:
    """A weight matrix [rows, k]: `parts` stacked by rows, kept in their blocks (see the module docstring)."""

    prefill = "kernel"
    # "f32", or integer planes "int16" / "int8" (VNNI: every integer type; AVX2: AVX2_INT_TOKENS tokens or
    # more, and one or two of Q4_K, Q6_K); the backend sets it per matrix
    activations = "f32"

    def __init__(self, parts: list[WeightSource]):
        K = _kernels()
        k = parts[0].shape[1]
        self.shape = (sum(p.shape[0] for p in parts), k)
        self.parts = parts  # the file's blocks, for rows()
        parts = [_with_kernel(p) for p in parts]
        self.nbytes = sum(p.raw.size for p in parts)
        self.runs: list[_Run] = []
        i = c0 = 0
        while i < len(parts):
            j = i + 1
            while j < len(parts) and parts[j].qtype == parts[i].qtype:
                j += 1
            group, name = parts[i:j], parts[i].qtype.name
            run = _Run(name, c0, sum(p.shape[0] for p in group))
            if name in K.KERNEL_TYPES:
                row_bytes = group[0].raw.size // group[0].shape[0]
                run.t = np.zeros((-(-run.rows // K.R), row_bytes * K.R), np.uint8)
                run.marker, run.block = K.marker(name), group[0].qtype.block_size
                views = [_read_only(p.raw.reshape(p.shape[0], row_bytes)) for p in group]
                if all(v.shape[0] % K.R == 0 for v in views[:-1]):  # each part starts a group
                    g = 0
                    for v in views:
                        n = -(-v.shape[0] // K.R)
                        K.transpose(v, run.t[g:g + n])
                        g += n
                else:
                    K.transpose(_read_only(np.concatenate(views)), run.t)
                for p in group:
                    _release(p.raw)
            else:
                run.f32 = np.concatenate([dequantize_rows(p.raw, p.qtype, p.shape, what=p.name) for p in group])
                if name != "F32":
                    log.warning("%s: no %s kernel; dequantized to float32 at load (4 bytes per weight)",
                                group[0].name, name)
            self.runs.append(run)
            i, c0 = j, c0 + run.rows
        # the one run, when it is all the matrix and its groups are whole: decode's path without the loop below
        whole = len(self.runs) == 1 and self.runs[0].t is not None and self.runs[0].rows % K.R == 0
        self._whole = self.runs[0] if whole else None

    def matmul(self, x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """x [n, k] float32 @ self.T -> [n, rows]; `scratch` is a float32 buffer for prefill tiles."""
        K = _K or _kernels()
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        out = np.empty((n, self.shape[0]), np.float32)
        if n == 1 and self._whole is not None:  # decode: one token, one run of whole groups
            run = self._whole
            if self._integer_vector(K, run):
                self._vector_integer(K, run, x, out)
            else:
                K.matvec(run.marker, run.t, run.block, x[0], out[0])
            return out
        for run in self.runs:
            cols = out[:, run.c0:run.c0 + run.rows]
            if run.f32 is not None:
                np.matmul(x, run.f32.T, out=cols)
            elif n > 1 and self.prefill == "sgemm":
                self._tiled(K, run, x, cols, scratch)
            elif (n > MATVEC_ROWS and self.activations != "f32" and run.qtype in K.INT_TYPES
                  and (K.HAS_VNNI or K.HAS_AVX2 and n >= AVX2_INT_TOKENS)):
                self._integer(K, run, x, cols)
            elif n > MATVEC_ROWS:
                xp = x
                if n % K.TOKENS:  # whole blocks of tokens: pad with zero rows
                    xp = np.zeros((n + K.TOKENS - n % K.TOKENS, x.shape[1]), np.float32)
                    xp[:n] = x
                direct = xp is x and cols.flags.c_contiguous and cols.shape[1] == run.t.shape[0] * K.R  # as _integer
                y = cols if direct else np.empty((xp.shape[0], run.t.shape[0] * K.R), np.float32)
                if xp.shape[0] <= TOKEN_TILE:
                    K.matmul(run.marker, run.t, run.block, xp, y)
                else:
                    for t0 in range(0, xp.shape[0], TOKEN_TILE):
                        K.matmul(run.marker, run.t, run.block, xp[t0:t0 + TOKEN_TILE], y[t0:t0 + TOKEN_TILE])
                if not direct:
                    cols[...] = y[:n, :run.rows]
            elif self._integer_vector(K, run):
                self._vector_integer(K, run, x, cols)
            elif run.rows % K.R == 0:
                for i in range(n):
                    K.matvec(run.marker, run.t, run.block, x[i], cols[i])
            else:  # the last group is padded
                y = np.empty(run.t.shape[0] * K.R, np.float32)
                for i in range(n):
                    K.matvec(run.marker, run.t, run.block, x[i], y)
                    cols[i] = y[:run.rows]
        return out

    def _integer_vector(self, K, run: _Run) -> bool:
        """Whether one or two tokens of `run` go through the one-token integer kernel."""
        return self.activations != "f32" and run.qtype in K.VECTOR_INT_TYPES  # the CPU's (VNNI's, or AVX2's)

    def _integer(self, K, run: _Run, x, cols):
        """Several tokens through the integer kernel: x as int8 planes per 32 columns."""
        n, k = x.shape
        npad = -(-n // K.TOKENS_INT) * K.TOKENS_INT
        gshift = K.INT_TYPES[run.qtype]
        x1, x2, xs, z1, z2, xsum = _plane_buffers(npad, k, gshift)
        if npad > n:  # padding rows: zero tokens
            for a in (x1, x2, z1, z2, xsum):
                a[n:] = 0
            xs[n:] = 1
        quantize = K.quantize_planes if n * k >= QUANTIZE_PARALLEL else K.quantize_planes_serial
        planes = (x1, x2, xs, z1, z2, xsum)
        quantize(x, gshift, *(planes if npad == n else [a[:n] for a in planes]))
        direct = npad == n and cols.flags.c_contiguous and cols.shape[1] == run.t.shape[0] * K.R
        y = cols if direct else np.empty((npad, run.t.shape[0] * K.R), np.float32)
        if self.activations != "int16":
            x2 = None
        if not K.HAS_VNNI:  # AVX2: the planes joined into 16-bit integers, multiplied by vpmaddwd
            x16 = np.empty(x1.shape, np.int16)
            (K.join_planes if n * k >= QUANTIZE_PARALLEL else K.join_planes_serial)(x1, x2, x16)
            for t0 in range(0, npad, TOKEN_TILE):
                K.matmul_int16(run.marker, run.t, run.block, gshift, x16[t0:t0 + TOKEN_TILE], xs[t0:t0 + TOKEN_TILE],
                               xsum[t0:t0 + TOKEN_TILE], y[t0:t0 + TOKEN_TILE])
        elif npad <= TOKEN_TILE:  # one call on the whole buffers (no views to make)
            K.matmul_int(run.marker, run.t, run.block, gshift, x1, x2, xs, z1, z2, xsum, y)
        else:
            for t0 in range(0, npad, TOKEN_TILE):
                t1 = t0 + TOKEN_TILE
                K.matmul_int(run.marker, run.t, run.block, gshift, x1[t0:t1], None if x2 is None else x2[t0:t1],
                             xs[t0:t1], z1[t0:t1], z2[t0:t1], xsum[t0:t1], y[t0:t1])
        if not direct:
            cols[...] = y[:n, :run.rows]

    def _vector_integer(self, K, run: _Run, x, cols):
        """One or two tokens through `matvec_int`, a token at a time, as integer planes."""
        n, k = x.shape
        gshift = K.INT_TYPES[run.qtype]
        x1, x2, xs, z1, z2, xsum = _plane_buffers(n, k, gshift)
        K.quantize_planes_serial(x, gshift, x1, x2, xs, z1, z2, xsum)
        two = self.activations == "int16"
        y = None if run.rows % K.R == 0 else np.empty(run.t.shape[0] * K.R, np.float32)
        for i in range(n):
            out = cols[i] if y is None else y
            K.matvec_int(run.marker, run.t, x1[i], x2[i] if two else None, xs[i], z1[i], z2[i], xsum[i], out)
            if y is not None:
                cols[i] = y[:run.rows]

    @staticmethod
    def _tiled(K, run: _Run, x, cols, scratch):
        """Prefill: decode up to a scratch-full of row groups at a time as float32 columns, then sgemm."""
        k = x.shape[1]
        step = max(1, scratch.size // (k * K.R))
        if scratch.size < k * K.R:
            scratch = np.empty(k * K.R, np.float32)
        groups = run.t.shape[0]
        for g in range(0, groups, step):
            m = min(step, groups - g)
            tile = scratch[:k * m * K.R].reshape(k, m * K.R)
            K.dequantize(run.marker, run.t, g, tile)
            r0, r1 = g * K.R, min(run.rows, (g + m) * K.R)
            np.matmul(x, tile[:, :r1 - r0], out=cols[:, r0:r1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as float32 [len(ids), k] (embedding lookups), decoded from the file's blocks:
        only their pages are read."""
        ids = np.asarray(ids, dtype=np.int64)
        (p,) = self.parts  # an embedding table is one tensor
        row_bytes = p.raw.size // p.shape[0]
        return dequantize(p.raw.reshape(p.shape[0], row_bytes)[ids].reshape(-1), p.qtype, (len(ids), p.shape[1]))

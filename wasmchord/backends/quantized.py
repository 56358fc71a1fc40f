"""Weight matrices that stay in their GGUF blocks, for the CPU backend.

A `QuantMatrix` is a view of the memory-mapped file: load copies and expands nothing. Its rows are
grouped into runs of one block type (Q, K and V stacked may mix types); each run is multiplied by
the compiled kernels of `cpu_kernels`: one token (decode) by `matvec`, a few tokens by `matmul`
(G tokens per pass over the blocks), more (prefill) by decoding tiles of rows into a reused float32
buffer and multiplying with BLAS sgemm. F32 runs and types without a kernel (Q2_K, Q3_K, dequantized
at load) are float32 arrays multiplied by BLAS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..formats.quants import dequantize_rows
from .base import WeightSource

log = logging.getLogger(__name__)

SMALL_BATCH = 16          # up to this many tokens: the fused kernel; more: tiles + sgemm
TILE_BYTES = 4 << 20      # float32 bytes of one decoded tile (fits the L2/L3 caches next to sgemm's panels)


def _kernels():
    from . import cpu_kernels  # numba: imported on first use, so `import wasmchord` stays light
    return cpu_kernels


@dataclass
class _Run:
    """Rows c0..c0+rows of the matrix: one block type, parts found at byte offsets of `buf`."""

    qtype: str
    c0: int
    rows: int
    buf: np.ndarray | None = None    # uint8, read-only (kernel types)
    offs: np.ndarray | None = None   # int64 [parts]
    row0: np.ndarray | None = None   # int64 [parts + 1]
    row_bytes: int = 0
    f32: np.ndarray | None = None    # [rows, k] (F32 and dequantized types)

    def args(self):
        return _kernels().marker(self.qtype), self.buf, self.offs, self.row0, self.row_bytes


def _byte_run(parts: list[WeightSource]):
    """One read-only uint8 buffer holding every part, and each part's offset in it: the file's own
    buffer when the parts are views of it (no copy), else a concatenation."""
    if len(parts) == 1:
        buf, offs = parts[0].raw.reshape(-1), [0]
    else:
        base = parts[0].raw.base
        try:
            whole = np.frombuffer(base, np.uint8) if all(p.raw.base is base for p in parts) else None
        except TypeError:  # a base without the buffer protocol
            whole = None
        if whole is not None:
            buf, offs = whole, [p.raw.ctypes.data - whole.ctypes.data for p in parts]
        else:
            buf = np.concatenate([p.raw.reshape(-1) for p in parts])
            offs = np.cumsum([0] + [p.raw.size for p in parts[:-1]]).tolist()
    buf = buf.view()
    buf.setflags(write=False)  # one compiled signature for file views and test arrays alike
    return buf, np.array(offs, np.int64)


class QuantMatrix:
    """A weight matrix [rows, k]: `parts` stacked by rows, kept as stored (see the module docstring)."""

    def __init__(self, parts: list[WeightSource]):
        k = parts[0].shape[1]
        self.shape = (sum(p.shape[0] for p in parts), k)
        self.nbytes = sum(p.raw.size for p in parts)
        self.runs: list[_Run] = []
        kernel_types = _kernels().KERNEL_TYPES
        i = c0 = 0
        while i < len(parts):
            j = i + 1
            while j < len(parts) and parts[j].qtype == parts[i].qtype:
                j += 1
            group, name = parts[i:j], parts[i].qtype.name
            rows = sum(p.shape[0] for p in group)
            run = _Run(name, c0, rows)
            if name in kernel_types:
                run.buf, run.offs = _byte_run(group)
                run.row0 = np.cumsum([0] + [p.shape[0] for p in group]).astype(np.int64)
                run.row_bytes = group[0].raw.size // group[0].shape[0]
            else:
                run.f32 = np.concatenate([dequantize_rows(p.raw, p.qtype, p.shape, what=p.name) for p in group])
                if name != "F32":
                    log.warning("%s: no %s kernel; dequantized to float32 at load (4 bytes per weight)",
                                group[0].name, name)
            self.runs.append(run)
            i, c0 = j, c0 + rows

    def matmul(self, x: np.ndarray, scratch: np.ndarray) -> np.ndarray:
        """x [n, k] float32 @ self.T -> [n, rows]; `scratch` is a float32 buffer for prefill tiles."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        out = np.empty((n, self.shape[0]), np.float32)
        if n > SMALL_BATCH:
            for run in self.runs:
                self._tiled(run, x, out, scratch)
            return out
        K = _kernels()
        xp = x
        if n > 1 and n % K.G:  # the fused kernel takes whole groups of G tokens
            xp = np.zeros((n + K.G - n % K.G, x.shape[1]), np.float32)
            xp[:n] = x
        for run in self.runs:
            cols = out[:, run.c0:run.c0 + run.rows]
            if run.f32 is not None:
                np.matmul(x, run.f32.T, out=cols)
            elif n == 1:
                K.matvec(*run.args(), x[0], out[0, run.c0:run.c0 + run.rows])  # a contiguous row slice
            else:
                o = np.empty((xp.shape[0], run.rows), np.float32)
                K.matmul(*run.args(), xp, o)
                cols[...] = o[:n]
        return out

    def _tiled(self, run: _Run, x, out, scratch):
        if run.f32 is not None:
            np.matmul(x, run.f32.T, out=out[:, run.c0:run.c0 + run.rows])
            return
        K, k = _kernels(), self.shape[1]
        step = max(1, min(run.rows, scratch.size // k))
        for r in range(0, run.rows, step):
            m = min(step, run.rows - r)
            tile = scratch[:m * k].reshape(m, k)
            K.dequantize(*run.args(), np.arange(r, r + m, dtype=np.int64), tile)
            np.matmul(x, tile.T, out=out[:, run.c0 + r:run.c0 + r + m])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as float32 [len(ids), k] (embedding lookups): only their blocks are read."""
        ids = np.asarray(ids, dtype=np.int64)
        (run,) = self.runs  # an embedding table is one tensor
        if run.f32 is not None:
            return run.f32[ids]
        out = np.empty((len(ids), self.shape[1]), np.float32)
        _kernels().dequantize(*run.args(), ids, out)
        return out

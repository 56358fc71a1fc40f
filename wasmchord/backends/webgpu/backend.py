"""The WebGPU backend: weights, activations and the KV cache resident on the device; the backend
interface's ops as dispatches of the WGSL kernels in shaders/.

Each forward pass is recorded as dispatches and submitted once (stream.py). Greedy decoding reads
back 4 bytes: argmax writes the token id into the buffer the next step's embedding reads.
"""

from __future__ import annotations

import math

import numpy as np

from ...errors import BackendError, UnsupportedError
from ...sampling import recent_tokens
from ..base import Backend, OnDevice
from .device import Gpu
from .memory import Arena, GTensor, KVCacheGPU, RopeTables, RowsHandle, TokenRing
from .native import Native
from .programs import Programs
from .stream import CommandStream
from .weights import FMT_NAMES, upload_matrix

MV_WG = 256             # matvec.wgsl: invocations per workgroup
MV_BATCH = 8            # matvec.wgsl matvec_batch for 2..MV_BATCH tokens (decode batches); the tiled matmul beyond,
MV_BATCH_SMALL = 16     # but up to MV_BATCH_SMALL tokens for matrices of at most MV_SMALL weights (see _batch_limit)
MV_SMALL = 4 << 20
MM_TILE = 64            # qmatrix.wgsl: tokens and rows per matmul workgroup
DEC_SPLIT = 128         # key positions per split in decode attention (attention.wgsl, decode_attention.wgsl)
MAX_REP = 8             # decode_attention.wgsl: query heads per workgroup
ARGMAX_PARTS = 132      # argmax.wgsl: workgroups of the first pass (at most)


class AttnPartials:
    """Split-KV partials of one decode step's attention (decode_attention.wgsl), shaped as the
    [1, H * hd_v] output they merge into; the output projection merges them in its prologue."""

    __slots__ = ("buf", "shape", "heads", "hd_v", "ctx", "pos0")

    def __init__(self, buf, heads, hd_v, ctx, pos0):
        self.buf, self.shape, self.heads, self.hd_v, self.ctx, self.pos0 = buf, (1, heads * hd_v), heads, hd_v, ctx, pos0

    @property
    def cols(self):
        return self.shape[1]


class RowBlocks:
    """A [n, cols] product held as consecutive blocks of rows in buffers of their own, where one binding
    could not hold it all (the logits of many positions over a large vocabulary); `read` joins them."""

    __slots__ = ("parts", "shape")

    def __init__(self, parts):
        self.parts, self.shape = parts, (sum(p.shape[0] for p in parts), parts[0].shape[1])


def _rows_per_group(rows: int, k: int) -> int:
    """Rows per lane group for a matvec: each block's activations serve 4 rows on matrices large enough
    to be bandwidth-bound; small ones take 1, so that more workgroups share the latency."""
    return 4 if rows * k >= 1 << 22 else 1


def _batch_limit(rows: int, k: int) -> int:
    """The most tokens matvec_batch takes for a rows x k matrix before the tiled matmul does. It reads
    the weights once per 4 tokens; the tiled matmul once per 64, in only rows / 64 workgroups. On an
    H200 (BENCHMARKS.md, batch profile) SmolLM2's matrices (<= 1.8 M weights) took 11.5 us at 4 tokens
    and 15.6 at 8 in matvec_batch against 49 in the tiled matmul at 16; Qwen2.5's (2.4-27 M) 55 and
    104 against 165: so small matrices stay on matvec_batch up to 16 tokens (~24 us by that slope),
    large ones leave it after 8 (~200 > 165)."""
    return MV_BATCH_SMALL if rows * k <= MV_SMALL else MV_BATCH


def _lanes(rows: int, k: int) -> int:
    """Lanes per row group for a matvec (measured on an H200, tools/gpu_kernel_bench.py): about one
    32-element block per lane for matrices of few rows, where latency rules; two to six for tall ones
    (output heads, FFN inputs of large models), where fewer, fuller workgroups move more bytes."""
    nb = k // 32
    if rows >= 16384:
        return 16 if nb >= 32 else 8
    return 64 if nb >= 32 else 32 if nb >= 16 else 16 if nb >= 8 else 4


class WgpuBackend(Backend):
    name = "gpu"
    encode_ahead = True

    def __init__(self, *, max_binding_size: int | None = None, allow_software: bool = True, raw_encode: bool = True,
                 replay_steps: bool = True, fused_attention: bool = True, shader_checks: str = "none",
                 gpu_backend: str | None = None):
        self.gpu = gpu = Gpu(allow_software=allow_software, max_binding_size=max_binding_size, backend=gpu_backend)
        self.features, self.device_name = gpu.features, gpu.name
        native = Native.load() if raw_encode else None
        sg = "subgroup" in self.features
        parts = {"matvec": ["lanes_subgroup" if sg else "lanes_plain"]}
        self.programs = Programs(gpu, native, lambda shader: parts.get(shader, ()),
                                 checks=shader_checks if native is not None else "all")
        self.stream = CommandStream(gpu, self.programs, native)
        self.arena = Arena(gpu)
        self.rope_tables = RopeTables(gpu)
        self.tokens = TokenRing(gpu, native)
        self.replay_steps = replay_steps
        self.fused_attention = fused_attention  # decode: attend() as one kernel (decode_attention.wgsl)
        self.matvec_lanes: int | None = None    # lanes per row group in matvec.wgsl; None: chosen by the shape
        self.matvec_rows: int | None = None     # rows per lane group (1, 2, 4); None: chosen by the shape
        self.subgroup_size = self._probe_subgroups() if sg else None  # matvec lane sums by subgroup when set
        self._dummy = gpu.buffer(16)
        self._bias_slices: dict = {}
        self._scratch = None
        self._partials = None
        self._seq = None
        self._kv_scratch = None
        self._mask = None
        self._argmax_parts = gpu.buffer(8 * ARGMAX_PARTS)
        self._argmax_rows_parts = None
        self._hist = None

    def _probe_subgroups(self) -> int | None:
        """The subgroup size when subgroups are consecutive runs of one size (8..64) in a workgroup of
        256 (subgroup_probe.wgsl), else None: then matvec lanes are summed in shared memory."""
        out = self.gpu.buffer(8 * 256)
        self.stream.dispatch(self.programs.kernel("subgroup_probe", "probe", dict(out=out)), (1,), {}, dict(out=out))
        self.stream.flush()
        got = np.frombuffer(self.gpu.device.queue.read_buffer(out), np.uint32).reshape(256, 2)
        size = int(got[0, 0])
        ok = size in (8, 16, 32, 64) and (got[:, 0] == size).all() and (got[:, 1] == np.arange(256) % size).all()
        return size if ok else None

    def describe(self) -> str:
        return f"WebGPU on {self.device_name}, features: {', '.join(self.features) or 'none'}"

    # ------------------------------------------------------------------------------------ plumbing
    def _dispatch(self, shader, entry, grid, params, buffers, *, fmt=None, consts=None, **kw):
        label = f"{shader}.{entry}" + (f"[{FMT_NAMES[fmt]}]" if fmt is not None else "")
        consts = dict(consts or {}, **({"FMT": fmt} if fmt is not None else {}))
        self.stream.dispatch(self.programs.kernel(shader, entry, buffers, label, **consts), grid, params, buffers, **kw)

    def _out(self, shape) -> GTensor:
        """The arena buffer for the current dispatch slot, at least big enough for `shape`."""
        return self.arena.out(self.stream.slot, shape)

    def begin_forward(self):
        self.stream.begin()

    def decode_step(self, cache, pos0, run):
        """Replay the captured decode step at pos0, or run the graph (`run`) and capture it."""
        def inputs():  # the input token is the one the last argmax/sample left on the device
            self.tokens.on_device = None
        return self._replay_or_capture(cache, cache, pos0, run, inputs)

    def decode_batch(self, cache, ids, positions, slots, run):
        """Replay the step captured for this many sequences with this step's token ids and (slot,
        position) rows written to their buffers, or run the graph (`run`) and capture it. The attention
        grid is the only part that moves, with the highest position."""
        def inputs():  # written now, they land before the replayed step's submit
            if isinstance(ids, OnDevice):  # encode-ahead: the last argmax_rows left them in the token buffer
                self.tokens.on_device = None
            else:
                self.tokens.write(np.asarray(ids, np.uint32))
            self._write_seq(slots, positions)
        return self._replay_or_capture((cache, len(ids)), cache, max(positions), run, inputs)

    def _replay_or_capture(self, key, cache, pos, run, inputs):
        """The step captured under `key` queued for position `pos` once `inputs()` wrote what it reads,
        or `run()` (the graph) captured under `key`."""
        if not self.replay_steps:
            return run()
        out = self.stream.replay(key, pos)
        if out is not None:
            inputs()
            return out
        self.stream.flush()  # what is pending (a prefill chunk) is not part of the step: a flush in it ends a capture
        self.stream.capture_begin(pos)
        out = run()
        self.stream.capture_end(key, out, min(self.rope_tables.positions, cache.max_ctx))
        return out

    def release(self):
        self.stream.flush()
        self.stream.capture = None
        self.gpu.invalidate()
        self.programs.forget()
        self.arena = Arena(self.gpu)
        self.tokens.on_device = None
        self._bias_slices.clear()
        self._scratch = self._partials = self._seq = self._kv_scratch = self._mask = self._hist = None
        self._argmax_rows_parts = None

    def enable_profiling(self, mode: str | None = "kernels"):
        """Timestamp queries (the `timestamp-query` feature) around every dispatch ("kernels", each in a
        pass of its own) or around each submitted pass ("step"); None turns them off. Results in
        `stream.profile_log`."""
        if mode is not None and "timestamp-query" not in self.features:
            raise BackendError(f"{self.device_name} has no timestamp-query feature: cannot profile kernels")
        if mode not in (None, "kernels", "step"):
            raise BackendError(f"profiling mode {mode!r}: expected 'kernels', 'step' or None")
        self.stream.profile, self.stream.profile_log, self.stream.host_log = mode, [], []

    # ------------------------------------------------------------------------------------ memory
    def load_matrix(self, parts):
        return upload_matrix(self.gpu, parts, self._dummy)

    def load_vector(self, array):
        a = np.ascontiguousarray(array, dtype=np.float32)
        return GTensor(self.gpu.buffer(a.nbytes, a), 0, a.shape)

    def alloc_kv_cache(self, n_layers, n_kv_heads, max_ctx, head_dim, head_dim_v, slots=1):
        return KVCacheGPU(self.gpu, n_layers, n_kv_heads, max_ctx, head_dim, head_dim_v, slots)

    def copy_kv(self, cache, src, dst, n):
        """One command buffer of copies: for each layer and KV head, positions [0, n) of the slot, through
        a scratch buffer (a copy within one buffer is not allowed)."""
        if src == dst:
            return
        self.stream.flush()
        size = 4 * n * max(cache.hd, cache.hd_v)
        if self._kv_scratch is None or self._kv_scratch.size < size:
            self._kv_scratch = self.gpu.buffer(size)
        try:
            enc = self.gpu.device.create_command_encoder()
            for bufs, hd in ((cache.k, cache.hd), (cache.v, cache.hd_v)):
                for buf in bufs:
                    for h in range(cache.n_kv):
                        row = 4 * cache.max_ctx * hd  # bytes per (slot, head)
                        enc.copy_buffer_to_buffer(buf, (src * cache.n_kv + h) * row, self._kv_scratch, 0, 4 * n * hd)
                        enc.copy_buffer_to_buffer(self._kv_scratch, 0, buf, (dst * cache.n_kv + h) * row, 4 * n * hd)
            self.gpu.device.queue.submit([enc.finish()])
        except Exception as e:
            self.gpu.fail("copying KV cache slots", e)

    def flush(self):
        self.stream.flush()

    def read(self, x):
        self.gpu.check()
        if isinstance(x, np.ndarray):
            return x
        if isinstance(x, AttnPartials):
            return self._merge_on_host(x)
        if isinstance(x, RowBlocks):
            return np.concatenate([self.read(p) for p in x.parts])
        rows = x.shape[0] if len(x.shape) > 1 else 1
        cols = x.cols if len(x.shape) > 1 else x.shape[0]
        self.stream.flush()
        span = 4 * ((rows - 1) * x.stride + cols)
        try:
            data = self.gpu.device.queue.read_buffer(x.buf, 4 * x.off, span)
        except Exception as e:
            self.gpu.fail("reading back from the GPU", e)
        a = np.frombuffer(data, np.float32)
        if rows > 1:
            a = np.lib.stride_tricks.as_strided(a, (rows, cols), (4 * x.stride, 4)).copy()
        return a.reshape(x.shape) if len(x.shape) > 1 else a.copy()

    def _merge_on_host(self, a: AttnPartials) -> np.ndarray:
        """Attention partials merged on the host (what the output projection's prologue computes)."""
        smax = math.ceil(a.ctx / DEC_SPLIT)
        raw = self.read(GTensor(a.buf, 0, (a.heads * smax * (a.hd_v + 4),)))
        part = raw.reshape(a.heads, smax, a.hd_v + 4)[:, :a.pos0 // DEC_SPLIT + 1]
        m, l, o = part[..., :1], part[..., 1:2], part[..., 4:]
        w = np.where(m <= -3e38, 0, np.exp(m - m.max(axis=1, keepdims=True)))
        return ((w * o).sum(1) / (w * l).sum(1)).reshape(1, -1).astype(np.float32)

    # ------------------------------------------------------------------------------------ ops
    def embed(self, table, ids, scale=1.0):
        if isinstance(ids, OnDevice):  # encode-ahead: the previous step's sample(s) already in the token buffer
            n = len(ids)
            self.tokens.on_device = None
        else:
            ids = np.asarray(ids, dtype=np.uint32)
            n = len(ids)
            self.tokens.write(ids)
        k = table.shape[1]
        out = self._out((n, k))
        for pc in table.pieces:
            self._dispatch("qmatrix", "embed", (math.ceil(k / 32 / 64), n),
                           dict(n=n, k=k, rows=pc.rows, out_stride=k, row0=pc.col0, scale=scale),
                           dict(ids=self.tokens.ids, q=pc.q, s=pc.s, m=pc.m, out=out.buf), fmt=pc.fmt)
        return out

    def _norm(self, entry, x, w, b, eps):
        if len(x.shape) == 3:
            n, heads, m = x.shape
        else:
            (n, m), heads = x.shape, 1
        rows = n * heads
        out = self._out(x.shape)
        bufs = dict(x=x.buf, w=w.buf, out=out.buf)
        if b is not None:
            bufs["b"] = b.buf
        self._dispatch("norm", entry, (rows,), dict(rows=rows, m=m, heads=heads, x_off=x.off, x_stride=x.stride,
                                                    eps=eps), bufs)
        return out

    def rmsnorm(self, x, w, eps):
        return self._norm("rmsnorm", x, w, None, eps)

    def layernorm(self, x, w, b, eps):
        return self._norm("layernorm", x, w, b, eps)

    def gelu(self, x):
        n, f = x.shape[0], x.cols
        out = self._out((n, f))
        self._dispatch("elementwise", "gelu", (math.ceil(n * f / 64),), dict(count=n * f, f=f, b_off=x.off),
                       dict(a=out.buf, b=x.buf))
        return out

    def matmul(self, x, w, bias=None, *, residual=None, norm=None):
        n, k = x.shape[0], x.cols
        if norm is not None and n > 1:  # prefill: a separate RMSNorm dispatch (the tiled matmul has no prologue)
            x, norm = self.rmsnorm(x, *norm), None
        out = residual if residual is not None else self._out((n, w.shape[0]))
        g, eps = self._norm_binding(norm)
        for pc in w.pieces:
            bufs = dict(x=x.buf, q=pc.q, s=pc.s, m=pc.m, out=out.buf, bias=self._bias_piece(bias, pc))
            if n == 1:
                params = dict(k=k, rows=pc.rows, out_off=out.off, out_col0=pc.col0, has_bias=int(bias is not None),
                              accumulate=int(residual is not None), norm=int(norm is not None), eps=eps)
                self._matvec("matvec", x, params, dict(bufs, g=g), pc, pc.rows)
            elif n <= _batch_limit(pc.rows, k) and x.off % 4 == 0 and x.stride % 4 == 0:
                lanes = self.matvec_lanes or _lanes(pc.rows, k)
                sg = self.subgroup_size if self.subgroup_size and lanes % self.subgroup_size == 0 else 0
                self._dispatch("matvec", "matvec_batch", (math.ceil(pc.rows / (MV_WG // lanes)), math.ceil(n / 4)),
                               dict(k=k, rows=pc.rows, out_off=out.off, out_col0=pc.col0, x_off=x.off,
                                    has_bias=int(bias is not None), accumulate=int(residual is not None), n=n,
                                    x_stride=x.stride, out_stride=out.stride),
                               dict(bufs, g=self._dummy), fmt=pc.fmt, nbytes=pc.nbytes,
                               consts=dict(LANES=lanes, SG=sg, RT=1))
            else:
                self._dispatch("qmatrix", "matmul", (math.ceil(pc.rows / MM_TILE), math.ceil(n / MM_TILE)),
                               dict(n=n, k=k, rows=pc.rows, out_col0=pc.col0, out_stride=out.stride, x_off=x.off,
                                    x_stride=x.stride, out_off=out.off, has_bias=int(bias is not None),
                                    accumulate=int(residual is not None)),
                               bufs, fmt=pc.fmt, nbytes=pc.nbytes)
        return out

    def logits(self, x, w, bias=None, *, norm=None):
        n = x.shape[0]
        per = max(1, self.gpu.max_binding // (4 * w.shape[0]))  # positions whose logits one binding holds
        if n <= per:
            return self.matmul(x, w, bias, norm=norm)
        if norm is not None:
            x = self.rmsnorm(x, *norm)
        return RowBlocks([self.matmul(x[r:r + per], w, bias) for r in range(0, n, per)])

    def _matvec(self, entry, x, params, bufs, pc, rows):
        """A matvec.wgsl dispatch over `rows` output rows; x a tensor, or attention partials merged on
        the way in (their position moves with the step)."""
        lanes = self.matvec_lanes or _lanes(params["rows"], params["k"])
        rt = 4 if entry == "matvec_glu" else self.matvec_rows or _rows_per_group(params["rows"], params["k"])
        grid = (math.ceil(rows / (rt // (2 if entry == "matvec_glu" else 1)) / (MV_WG // lanes)),)
        sg = self.subgroup_size if self.subgroup_size and lanes % self.subgroup_size == 0 else 0
        if isinstance(x, AttnPartials):
            params.update(hd_v=x.hd_v, pos0=x.pos0, ctx=x.ctx)
            self._dispatch("matvec", entry, grid, params, bufs, fmt=pc.fmt, nbytes=pc.nbytes,
                           consts=dict(LANES=lanes, XSRC=1, SG=sg, RT=rt, SPLIT=DEC_SPLIT), moving=dict(pos0=x.pos0))
        else:
            params["x_off"] = x.off
            self._dispatch("matvec", entry, grid, params, bufs, fmt=pc.fmt, nbytes=pc.nbytes,
                           consts=dict(LANES=lanes, SG=sg, RT=rt))

    def matmul_glu(self, x, w, act, *, norm=None):
        pc = w.pieces[0]
        if x.shape[0] != 1 or len(w.pieces) != 1 or act not in ("swiglu", "geglu"):
            return super().matmul_glu(x, w, act, norm=norm)  # prefill, or gate and up in separate pieces
        k, f = x.cols, w.shape[0] // 2
        out = self._out((1, f))
        g, eps = self._norm_binding(norm)
        params = dict(k=k, rows=f, out_off=out.off, norm=int(norm is not None), eps=eps, glu=int(act == "geglu"))
        self._matvec("matvec_glu", x, params, dict(x=x.buf, q=pc.q, s=pc.s, m=pc.m, out=out.buf, g=g), pc, f)
        return out

    def _norm_binding(self, norm):
        """(buffer, eps) of matmul's `norm=` for the `g` binding and the `eps` parameter."""
        return (norm[0].buf, float(norm[1])) if norm is not None else (self._dummy, 0.0)

    def _bias_piece(self, bias, pc):
        if bias is None:
            return self._dummy
        if len(bias.shape) == 1 and pc.col0 == 0 and pc.rows == bias.shape[0]:
            return bias.buf
        key = (bias.buf, pc.col0, pc.rows)
        b = self._bias_slices.get(key)  # a bias split with its matrix's pieces, sliced once
        if b is None:
            host = self.read(bias)[pc.col0:pc.col0 + pc.rows]
            b = self._bias_slices[key] = self.gpu.buffer(host.nbytes, host)
        return b

    def add(self, a, b):
        count = a.shape[0] * a.cols
        self._dispatch("elementwise", "add", (math.ceil(count / 64),), dict(count=count, f=1, a_off=a.off, b_off=b.off),
                       dict(a=a.buf, b=b.buf))
        return a

    def _glu(self, gate_up, entry):
        n, f = gate_up.shape[0], gate_up.cols // 2
        out = self._out((n, f))
        self._dispatch("elementwise", entry, (math.ceil(n * f / 64),), dict(count=n * f, f=f, b_off=gate_up.off),
                       dict(a=out.buf, b=gate_up.buf))
        return out

    def swiglu(self, gate_up):
        return self._glu(gate_up, "swiglu")

    def geglu(self, gate_up):
        return self._glu(gate_up, "geglu")

    def rope(self, x, pos0, *, base, n_rot, scale, neox, factors=None, attn_factor=1.0):
        n, heads, hd = x.shape
        cs = self.rope_tables.get(base, n_rot, scale, pos0 + n, factors, attn_factor)
        self._dispatch("rope", "rope", (math.ceil(n_rot / 2 / 64), heads, n),
                       dict(n=n, heads=heads, hd=hd, n_rot=n_rot, pos0=pos0, neox=int(neox), x_off=x.off,
                            x_stride=x.stride), dict(cs=cs, x=x.buf), moving=dict(pos0=pos0))
        return x

    def kv_write(self, cache, layer, k, v, pos0, *, rope=None):
        n, kvh, hd = k.shape
        hdv = v.shape[2]
        if pos0 + n > cache.max_ctx:
            raise BackendError(f"KV cache overflow: positions up to {pos0 + n} > context {cache.max_ctx}")
        rope = rope or dict(base=10000.0, n_rot=0, scale=1.0, neox=False)
        cs = self.rope_tables.get(rope["base"], max(rope["n_rot"], 2), rope["scale"], pos0 + n, rope.get("factors"),
                                  rope.get("attn_factor", 1.0))
        self._dispatch("rope", "rope_store", (math.ceil(max(hd, hdv) / 64), kvh, n),
                       dict(n=n, heads=kvh, hd=hd, n_rot=rope["n_rot"], pos0=pos0, neox=int(rope["neox"]),
                            x_off=k.off, x_stride=k.stride, v_off=v.off, v_stride=v.stride, hd_v=hdv,
                            ctx=cache.max_ctx, slot=cache.index),
                       dict(cs=cs, v=v.buf, kc=cache.k[layer], vc=cache.v[layer], kin=k.buf), moving=dict(pos0=pos0))

    def attention(self, q, cache, layer, pos0, *, scale, window=0):
        n, H, hd = q.shape
        ctx, hdv = cache.max_ctx, cache.hd_v
        out = self._out((n, H * hdv))
        # Query chunks keep the scores scratch [chunk, H, ctx] within one binding; one query (decode)
        # uses it for split-KV partials [H, splits, 2 + hd_v].
        chunk = max(1, min(n, self.gpu.max_binding // (4 * H * ctx)))
        need = max(4 * chunk * H * ctx, 4 * H * math.ceil(ctx / DEC_SPLIT) * (2 + hdv))
        if self._scratch is None or self._scratch.size < need:
            self.gpu.invalidate()
            self._scratch = self.gpu.buffer(need)
        kv = dict(kc=cache.k[layer], vc=cache.v[layer], sc=self._scratch)
        if n == 1:
            p = dict(n=1, heads=H, kv_heads=cache.n_kv, hd=hd, hd_v=hdv, ctx=ctx, pos0=pos0, window=window,
                     q_off=q.off, q_stride=q.stride, scale=scale, out_off=out.off, slot=cache.index)
            self._dispatch("attention", "decode_split", (math.ceil((pos0 + 1) / DEC_SPLIT), H), p, dict(q=q.buf, **kv),
                           moving=dict(pos0=pos0), moving_grid=(0, DEC_SPLIT, pos0 + 1))
            self._dispatch("attention", "decode_merge", (H,), p, dict(sc=self._scratch, out=out.buf),
                           moving=dict(pos0=pos0))
            return out
        for c0 in range(0, n, chunk):
            c = min(chunk, n - c0)
            p = dict(n=c, heads=H, kv_heads=cache.n_kv, hd=hd, hd_v=hdv, ctx=ctx, pos0=pos0 + c0, window=window,
                     q_off=q.off + c0 * q.stride, q_stride=q.stride, scale=scale, out_off=out.off + c0 * H * hdv,
                     slot=cache.index)
            at = dict(pos0=pos0 + c0)
            self._dispatch("attention", "scores", (math.ceil((pos0 + c0 + c) / 64), H, c), p, dict(q=q.buf, **kv),
                           moving=at, moving_grid=(0, 64, pos0 + c0 + c))
            self._dispatch("attention", "softmax", (c * H,), p, dict(sc=self._scratch), moving=at)
            self._dispatch("attention", "weighted_sum", (math.ceil(hdv / 64), H, c), p, dict(**kv, out=out.buf),
                           moving=at)
        return out

    def _fusable(self, q, k, v) -> bool:
        """decode_attention.wgsl takes these views: q, k, v heads of one buffer, one after the other."""
        H, hd = q.shape[1:]
        kvh, hdv = k.shape[1], v.shape[2]
        return (self.fused_attention and hd % 4 == 0 and hdv % 4 == 0 and max(hd, hdv) <= 256
                and q.buf is k.buf is v.buf and q.stride == k.stride == v.stride and q.off % 4 == 0
                and q.stride % 4 == 0 and k.off == q.off + H * hd and v.off == k.off + kvh * hd)

    def _attention_params(self, q, k, v, cache, rope, scale, window, qk_norm, n_pos):
        """(params, buffers) shared by decode_attention.wgsl's entries; the partials scratch sized for
        `rows` sequences."""
        rows, H, hd = q.shape
        hdv, kvh = v.shape[2], k.shape[1]
        ctx = cache.max_ctx
        need = 4 * rows * H * math.ceil(ctx / DEC_SPLIT) * (hdv + 4)
        if self._partials is None or self._partials.size < need:
            self.gpu.invalidate()
            self._partials = self.gpu.buffer(need)
        cs = self.rope_tables.get(rope["base"], max(rope["n_rot"], 2), rope["scale"], n_pos, rope.get("factors"),
                                  rope.get("attn_factor", 1.0))
        qw, kw, eps = qk_norm if qk_norm is not None else (None, None, 0.0)
        params = dict(heads=H, kv_heads=kvh, hd=hd, hd_v=hdv, ctx=ctx, window=window, scale=scale, q_off=q.off,
                      row_stride=q.stride, n_rot=rope["n_rot"], neox=int(rope["neox"]),
                      qk_norm=int(qk_norm is not None), eps=eps, rows=rows)
        bufs = dict(qkv=q.buf, part=self._partials, cs=cs, qn=qw.buf if qw is not None else self._dummy,
                    kn=kw.buf if kw is not None else self._dummy)
        return params, bufs

    def attend(self, q, k, v, cache, layer, pos0, *, rope, scale, window=0, qk_norm=None):
        """Decode (one position): decode_attention.wgsl in one dispatch, returning partials that the
        output projection merges. Prefill: the base composition (norms, rope, kv_write, attention)."""
        if q.shape[0] > 1 or not self._fusable(q, k, v):
            return super().attend(q, k, v, cache, layer, pos0, rope=rope, scale=scale, window=window,
                                  qk_norm=qk_norm)
        if pos0 + 1 > cache.max_ctx:
            raise BackendError(f"KV cache overflow: positions up to {pos0 + 1} > context {cache.max_ctx}")
        H, kvh, hdv = q.shape[1], k.shape[1], v.shape[2]
        params, bufs = self._attention_params(q, k, v, cache, rope, scale, window, qk_norm, pos0 + 1)
        self._dispatch("decode_attention", "attend", (pos0 // DEC_SPLIT + 1, kvh, math.ceil(H // kvh / MAX_REP)),
                       dict(params, pos0=pos0, slot=cache.index), dict(bufs, kc=cache.k[layer], vc=cache.v[layer]),
                       moving=dict(pos0=pos0), moving_grid=(0, DEC_SPLIT, pos0 + 1))
        return AttnPartials(self._partials, H, hdv, cache.max_ctx, pos0)

    def attend_batch(self, q, k, v, cache, layer, positions, slots, *, rope, scale, window=0, qk_norm=None):
        """B sequences, one new position each, in two dispatches: decode_attention.wgsl's attend_batch
        (per row: its own position and cache slot) and merge_batch into [B, H * hd_v]."""
        B, H, hd = q.shape
        kvh, hdv = k.shape[1], v.shape[2]
        if not self._fusable(q, k, v):
            raise UnsupportedError("batched decoding on the GPU needs head sizes that are multiples of 4, at most 256")
        top = max(positions)
        if top + 1 > cache.max_ctx:
            raise BackendError(f"KV cache overflow: positions up to {top + 1} > context {cache.max_ctx}")
        self._write_seq(slots, positions)
        params, bufs = self._attention_params(q, k, v, cache, rope, scale, window, qk_norm, top + 1)
        out = self._out((B, H * hdv))
        self._dispatch("decode_attention", "attend_batch",
                       (top // DEC_SPLIT + 1, kvh, B * math.ceil(H // kvh / MAX_REP)), params,
                       dict(bufs, kc=cache.k[layer], vc=cache.v[layer], seq=self._seq),
                       moving_grid=(0, DEC_SPLIT, top + 1))
        self._dispatch("decode_attention", "merge_batch", (H, B), params,
                       dict(part=self._partials, seq=self._seq, out=out.buf))
        return out

    def _write_seq(self, slots, positions):
        """Each batch row's (cache slot, position) into the buffer attend_batch and merge_batch read."""
        seq = np.stack([np.asarray(slots, np.uint32), np.asarray(positions, np.uint32)], axis=1)  # [B, 2]
        if self._seq is None or self._seq.size < seq.nbytes:
            self.gpu.invalidate()
            self._seq = self.gpu.buffer(max(256, 2 * seq.nbytes))
        self.gpu.device.queue.write_buffer(self._seq, 0, seq)  # lands before this step's submit

    def _mask_buffer(self, mask) -> object:
        """A constraint's bitmask (int32 words) uploaded for this step's argmax or sample."""
        if mask is None:
            return self._dummy
        words = np.ascontiguousarray(mask, np.int32)
        if self._mask is None or self._mask.size < words.nbytes:
            self.gpu.invalidate()
            self._mask = self.gpu.buffer(words.nbytes)
        self.gpu.device.queue.write_buffer(self._mask, 0, words)  # lands before this step's submit
        return self._mask

    def argmax(self, logits, *, defer=False, mask=None):
        count = logits.cols if len(logits.shape) > 1 else logits.shape[0]
        parts = max(1, min(ARGMAX_PARTS, count // 2048))  # about 8 values per invocation and more
        p = dict(count=count, x_off=logits.off, parts=parts, masked=int(mask is not None))
        bufs = dict(x=logits.buf, ids=self.tokens.ids, part=self._argmax_parts, mask=self._mask_buffer(mask))
        self._dispatch("argmax", "partial", (parts,), p, bufs)
        self._dispatch("argmax", "combine", (1,), p, bufs)
        return self._submit_token(defer)

    def argmax_rows(self, logits):
        """The greedy token of every row of logits [B, vocab] (a GTensor), found on the device into
        ids[0..B) of the token buffer (argmax.wgsl's partial_rows / combine_rows): after the step is
        submitted, `read_tokens(B)` (or `submit_rows` then `collect_rows`) reads them, 4 bytes per row
        instead of the row's logits; a next step's embedding may read them where they are (OnDevice(B))."""
        B, count = logits.shape[0], logits.cols
        parts = max(1, min(ARGMAX_PARTS, count // 2048))
        if self._argmax_rows_parts is None or self._argmax_rows_parts.size < 8 * parts * B:  # no captured step binds it
            self._argmax_rows_parts = self.gpu.buffer(8 * parts * max(B, 16))
        p = dict(count=count, x_off=logits.off, parts=parts, masked=0, row_stride=logits.stride)
        bufs = dict(x=logits.buf, ids=self.tokens.ids, part=self._argmax_rows_parts, mask=self._dummy)
        self._dispatch("argmax", "partial_rows", (parts, B), p, bufs)
        self._dispatch("argmax", "combine_rows", (1, B), p, bufs)
        self.tokens.on_device = None

    def submit_rows(self, n: int) -> RowsHandle:
        """Submit the step, with its argmax_rows tokens ids[0..n) copied into a buffer of their own;
        returns a handle for `collect_rows`. The host may record the next step before collecting."""
        buf = self.tokens.rows_buffer(n)
        h = RowsHandle(buf, None, n)
        h.index = self.stream.flush(copy=(self.tokens.ids, 0, buf, 0, 4 * n))
        self.tokens.rows_on_device = h
        return h

    def rows_on_device(self, handle: RowsHandle) -> bool:
        """The token buffer still holds the tokens of the step `handle` belongs to (nothing wrote it
        since): a next step may embed them where they are (OnDevice)."""
        return self.tokens.rows_on_device is handle

    def collect_rows(self, handle: RowsHandle) -> np.ndarray:
        """The tokens of the step `submit_rows` returned `handle` for, once that step is done (work
        submitted after it may still run). Once per handle."""
        return self.tokens.collect_rows(handle)

    def discard_rows(self, handle: RowsHandle):
        """Tokens of a submitted step that will not be read."""
        self.tokens.discard_rows(handle)

    def read_tokens(self, n: int) -> np.ndarray:
        """ids[0..n) of the token buffer (argmax_rows' tokens), once the work that writes them is done."""
        return self.collect_rows(self.submit_rows(n))

    def sample(self, logits, params, rng, history, step, *, defer=False, mask=None):
        """sample.wgsl: penalties, top-k/top-p/min-p, temperature and a counter-based draw on the GPU.
        The host's RNG only supplies a 32-bit seed per step, so a seeded generation repeats exactly."""
        count = logits.cols if len(logits.shape) > 1 else logits.shape[0]
        hist = self._write_history([self._recent(params, history)])
        self._sample_dispatch(logits.buf, logits.off, count, params, rng, step, hist[0], 0, self._mask_buffer(mask))
        return self._submit_token(defer)

    def sample_rows(self, logits, rows):
        """Each listed row of logits [B, vocab] (a GTensor) drawn as `sample` draws, into ids[b] of the
        token buffer: `rows` holds (b, params, rng, history, step) per row, each with its own
        parameters, recent tokens and generator; one dispatch per row. After `argmax_rows` on the
        same logits, these rows' tokens replace the argmax's. `submit_rows` then reads them."""
        hist = self._write_history([self._recent(params, history) for _, params, _, history, _ in rows])
        for (b, params, rng, _, step), h in zip(rows, hist):
            self._sample_dispatch(logits.buf, logits.off + b * logits.stride, logits.cols, params, rng, step, h, b,
                                  self._dummy)

    @staticmethod
    def _recent(params, history) -> np.ndarray:
        penalize = params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        return np.asarray(recent_tokens(history, params.penalty_last_n) if penalize else [], np.uint32)

    def _write_history(self, hists) -> list[tuple[int, int]]:
        """The draws' recent tokens, one after the other in the history buffer: (offset, count) each."""
        n = sum(h.size for h in hists)
        if self._hist is None or self._hist.size < max(16, 4 * n):
            self._hist = self.gpu.buffer(max(256, 8 * n))
            self.gpu.invalidate()
        if n:
            self.gpu.device.queue.write_buffer(self._hist, 0, np.concatenate(hists))
        offs = np.cumsum([0] + [h.size for h in hists])
        return [(int(o), int(h.size)) for o, h in zip(offs, hists)]

    def _sample_dispatch(self, x, x_off, count, params, rng, step, hist, row, mask):
        if params.greedy:  # penalties then argmax: temperature 0 in the kernel would divide by zero
            params = type(params)(**{**params.__dict__, "temperature": 1e-6, "top_k": 1})
        seed = int(rng.integers(0, 2**32))
        self._dispatch("sample", "sample", (1,),
                       dict(count=count, x_off=x_off, top_k=int(params.top_k), n_hist=hist[1], hist_off=hist[0],
                            temperature=params.temperature, top_p=params.top_p, min_p=params.min_p,
                            repeat=params.repeat_penalty, presence=params.presence_penalty,
                            frequency=params.frequency_penalty, seed=seed, step=int(step),
                            masked=int(mask is not self._dummy), row=int(row)),
                       dict(x=x, ids=self.tokens.ids, hist=self._hist, mask=mask))

    def _submit_token(self, defer: bool):
        """Submit the step, copying the 4-byte token into the next ring buffer. With defer, return the
        ring slot without waiting (collect() reads it later); else wait and return the token."""
        slot = self.tokens.take_slot()
        self.tokens.rows_on_device = None  # ids[0] is this token now
        self.tokens.submitted[slot] = self.stream.flush(copy=(self.tokens.ids, 0, self.tokens.ring[slot], 0, 4))
        return slot if defer else self.collect(slot)

    def collect(self, slot: int) -> int:
        """Wait for the step that filled ring `slot` and return its token."""
        return self.tokens.collect(slot, idle=not self.stream.ops)

    def split_heads(self, x, sizes, heads):
        out, c = [], 0
        for size, h in zip(sizes, heads):
            out.append(GTensor(x.buf, x.off + c, (x.shape[0], h, size // h), x.stride))
            c += size
        return out

"""The WebGPU backend: weights, activations and the KV cache resident on the device.

Each forward pass is recorded as a list of dispatches and submitted once, with all its parameters
written in one `write_buffer`. Activation buffers come from an arena indexed by the dispatch's
position in the pass, so the same buffers (and cached bind groups) serve every decode step.
Greedy decoding reads back 4 bytes: argmax writes the token id into the buffer the next step's
embedding reads.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import BackendError, UnsupportedError
from ..quants import _k4_nibbles, _k_scale_min, q6_k_values
from .base import Backend, OnDevice, WeightSource, rope_cos_sin
from .gpu_device import open_device, shader_dir

log = logging.getLogger(__name__)

MV_ROWS = 8  # weight rows per matvec workgroup (qmatrix.wgsl)
DEC_SPLIT = 128  # key positions per split in decode attention (attention.wgsl)
_PARAM_FORMATS: dict[tuple, str] = {}  # struct format of a dispatch's parameters, by their Python types

# ---------------------------------------------------------------------------- tensors on the device


class GTensor:
    """A 2-D (or per-head 3-D) view of a device buffer: element (i, c) at off + i * stride + c."""

    __slots__ = ("buf", "off", "shape", "stride")

    def __init__(self, buf, off, shape, stride=None):
        self.buf, self.off, self.shape = buf, off, tuple(shape)
        self.stride = self.cols if stride is None and len(self.shape) > 1 else (stride or 0)

    @property
    def cols(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else self.shape[0]

    def __getitem__(self, key):
        n = self.shape[0]
        if isinstance(key, int):  # one row, as a vector
            i = key % n
            return GTensor(self.buf, self.off + i * self.stride, self.shape[1:] or (1,), 0)
        i0, i1, step = key.indices(n)
        assert step == 1
        return GTensor(self.buf, self.off + i0 * self.stride, (i1 - i0,) + self.shape[1:], self.stride)


class _Piece:
    """Rows [col0, col0 + rows) of a weight matrix in one GPU format, in buffers within binding limits."""

    def __init__(self, fmt, q, s, m, col0, rows):
        self.fmt, self.q, self.s, self.m, self.col0, self.rows = fmt, q, s, m, col0, rows


class GMatrix:
    def __init__(self, pieces, rows, k, nbytes):
        self.pieces, self.shape, self.nbytes = pieces, (rows, k), nbytes


# ---------------------------------------------------------------------------- repacking (NumPy, at load)
# GPU formats (override FMT in qmatrix.wgsl): 0 F32, 1 F16, 2 Q4 sym, 3 Q4+min, 4 Q5 sym, 5 Q8, 6 Q8/16
_WORDS = {0: 32, 1: 16, 2: 4, 3: 4, 4: 5, 5: 8, 6: 8}
_FMT_NAMES = {0: "f32", 1: "f16", 2: "q4", 3: "q4m", 4: "q5", 5: "q8", 6: "q8/16"}


def _f16col(b, i):
    return np.ascontiguousarray(b[:, i:i + 2]).view(np.float16).astype(np.float32).reshape(-1)


def _u32(a):
    return np.ascontiguousarray(a).view(np.uint32)


def _pack_q4(v):
    """(n, 32) uint8 nibble values -> (n, 4) u32 in GGUF byte order."""
    return _u32((v[:, :16] | (v[:, 16:] << 4)).astype(np.uint8))


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
    if t == "Q5_0":
        return 4, np.concatenate([_u32(b[:, 6:22]), _u32(b[:, 2:6])], axis=1), _f16col(b, 0), None
    if t == "Q8_0":
        return 5, _u32(b[:, 2:34]), _f16col(b, 0), None
    if t == "Q4_K":  # 8 sub-blocks of 32 with scale d*sc and min dmin*m (exact in f32)
        n = b.shape[0]
        d, dmin = _f16col(b, 0)[:, None], _f16col(b, 2)[:, None]
        sc, mn = _k_scale_min(b[:, 4:16])
        v = _k4_nibbles(b[:, 16:144]).reshape(n * 8, 32)
        return 3, _pack_q4(v), (d * sc).reshape(-1), (-(dmin * mn)).reshape(-1)
    if t == "Q6_K":  # int8 values q-32 in element order, a scale d*sc per 16
        q, dl = q6_k_values(b)
        return 6, _u32(q.reshape(-1, 32)), dl.reshape(-1), None
    raise UnsupportedError(f"{src.name}: the GPU backend does not support {t} weights "
                           f"(supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K)")


# ---------------------------------------------------------------------------- bind group layouts
U, R, W = "uniform", "read-only-storage", "storage"
_QM = [(0, U), (1, R), (2, R), (3, R), (4, R), (5, W), (6, R), (7, R)]
LAYOUTS = {
    ("qmatrix", "matvec"): _QM, ("qmatrix", "matmul"): _QM, ("qmatrix", "embed"): _QM, ("qmatrix", "matvec_glu"): _QM,
    ("qmatrix", "matvec_sg"): _QM, ("qmatrix", "matvec_glu_sg"): _QM,
    ("norm", "rmsnorm"): [(0, U), (1, R), (2, R), (3, W)],
    ("norm", "layernorm"): [(0, U), (1, R), (2, R), (3, W), (4, R)],
    ("elementwise", "gelu"): [(0, U), (1, W), (2, R)],
    ("rope", "rope"): [(0, U), (1, R), (2, W)],
    ("rope", "rope_store"): [(0, U), (1, R), (3, R), (4, W), (5, W), (6, R)],
    ("attention", "scores"): [(0, U), (1, R), (2, R), (3, R), (4, W)],
    ("attention", "softmax"): [(0, U), (4, W)],
    ("attention", "weighted_sum"): [(0, U), (2, R), (3, R), (4, W), (5, W)],
    ("attention", "decode_split"): [(0, U), (1, R), (2, R), (3, R), (4, W)],
    ("attention", "decode_merge"): [(0, U), (4, W), (5, W)],
    ("elementwise", "swiglu"): [(0, U), (1, W), (2, R)], ("elementwise", "geglu"): [(0, U), (1, W), (2, R)],
    ("elementwise", "add"): [(0, U), (1, W), (2, R)],
    ("argmax", "argmax"): [(0, U), (1, R), (2, W)],
    ("sample", "sample"): [(0, U), (1, W), (2, W), (3, R)],
}
PARAM_BYTES = 64  # every shader's parameter struct fits in 16 words
# Shader files appended after a module's own file (WGSL declarations are order-free; appending keeps
# the module's own line numbers).
SHADER_PARTS = {"qmatrix": ["activations"], "elementwise": ["activations"]}


def _shader_source(shader, extra=()) -> tuple[str, list]:
    """A module's WGSL (its file, SHADER_PARTS, then `extra` files) and its parts as (path, first
    line, line count)."""
    texts, parts, line = [], [], 1
    for name in [shader, *SHADER_PARTS.get(shader, []), *extra]:
        path = shader_dir() / f"{name}.wgsl"
        text = path.read_text()
        if not text.endswith("\n"):
            text += "\n"
        texts.append(text)
        parts.append((path, line, text.count("\n")))
        line += text.count("\n")
    return "".join(texts), parts


def _shader_error(parts, e) -> str:
    """naga's multi-line report -> one line: file:line:col: shader compilation failed: reason, with
    the line mapped back to the part it came from."""
    import re
    text = str(e)
    where = re.search(r"wgsl:(\d+):(\d+)", text)
    why = re.search(r"error: (.*)", text)
    loc = str(parts[0][0])
    if where:
        line = int(where.group(1))
        path, first = next(((p, f) for p, f, n in parts if f <= line < f + n), parts[0][:2])
        loc = f"{path}:{line - first + 1}:{where.group(2)}"
    return f"{loc}: shader compilation failed: {why.group(1).strip() if why else text.splitlines()[0]}"


def _raw_encoder():
    """wgpu-native's cffi `lib` and NULL, or None when this wgpu-py does not expose them (then the
    public API is used)."""
    try:
        from wgpu.backends.wgpu_native._ffi import ffi, lib
        lib.wgpuComputePassEncoderSetPipeline, lib.wgpuComputePassEncoderSetBindGroup
        lib.wgpuComputePassEncoderDispatchWorkgroups
    except (ImportError, AttributeError) as e:
        log.info("wgpu-native functions not reachable (%s): encoding through the public API", e)
        return None
    return lib, ffi.NULL


@dataclass(slots=True)
class _Program:
    """A recorded decode step: dispatches, parameter block, and where the position goes."""

    gen: int                # the backend's _gen when recorded
    cache: object           # the KV cache it writes
    ops: list               # (pipeline, bind group, grid, label, weight bytes) per dispatch
    params: np.ndarray      # the parameter block (uint8), slots [0, slots)
    slots: int
    words: np.ndarray       # u32 word indices holding a position ...
    offsets: np.ndarray     # ... equal to pos0 + offset
    grids: list             # (op index, axis, divisor, offset): grid[axis] = ceil((pos0 + offset) / divisor)
    out: object             # the step's output (logits) tensor
    max_pos: int            # replayable while pos0 + 1 <= max_pos (RoPE tables, KV cache)


class KVCacheGPU:
    """Per layer: k [KV, ctx, hd] and v [KV, ctx, hd_v] buffers."""

    def __init__(self, k, v, max_ctx, n_kv, hd_v):
        self.k, self.v, self.max_ctx, self.n_kv, self.hd_v = k, v, max_ctx, n_kv, hd_v


class WgpuBackend(Backend):
    name = "gpu"
    encode_ahead = True
    RING = 3  # persistent mappable buffers for sampled tokens in flight

    def __init__(self, *, max_binding_size: int | None = None, allow_software: bool = True, raw_encode: bool = True,
                 replay_steps: bool = True, subgroups: bool = False):
        import wgpu
        self.wgpu = wgpu
        self.adapter, self.device, self.features = open_device(allow_software=allow_software)
        lim = self.device.limits
        self.max_binding = min(lim["max-storage-buffer-binding-size"], max_binding_size or 2**62)
        self.max_wg = lim["max-compute-workgroups-per-dimension"]
        self.slot_bytes = max(256, lim["min-uniform-buffer-offset-alignment"])
        self._modules, self._pipelines, self._layouts, self._bind_groups = {}, {}, {}, {}
        self._gen = 0  # bumped when buffers that cached bind groups (and recorded programs) refer to change
        self._bias_slices: dict = {}
        self._arena: dict[int, object] = {}
        self._ops: list = []
        self._params = np.zeros(0, np.uint8)
        self._param_buf = None
        self._grow_params(512)
        self._slot = 0
        self._failed: str | None = None
        self._dummy = self._buffer(16)
        self._ids = self._buffer(4 * 4096)
        self._ids_cap = 4096
        self._ids_on_device: int | None = None
        self._ring = [self.device.create_buffer(size=4, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
                      for _ in range(self.RING)]
        self._ring_next = self._last_slot = 0
        self._rope_tables: dict[tuple, object] = {}
        self._scratch = None
        self._hist = None
        self.profile, self.profile_log, self.last_dispatches = False, [], 0
        self._qset, self._qset_count, self._qbuf = None, 0, None
        self._raw = _raw_encoder() if raw_encode else None
        self.replay_steps = replay_steps
        # subgroups=True: matvec sums through subgroup operations (qmatrix_subgroup.wgsl). Off by
        # default: on lavapipe, the one device measured, the shared-memory kernels are faster.
        self.subgroups = bool(subgroups)
        if self.subgroups and "subgroup" not in self.features:
            raise BackendError("subgroups=True, but this device does not offer the 'subgroup' feature")
        self._mv = ("matvec_sg", "matvec_glu_sg") if self.subgroups else ("matvec", "matvec_glu")
        self._program: _Program | None = None
        self._recording: list | None = None
        self.replayed = 0               # decode steps replayed from a recorded program (statistics)
        info = self.adapter.info
        self.device_name = f"{info.get('device')} ({info.get('backend_type')})"

    def describe(self) -> str:
        return f"WebGPU on {self.device_name}, features: {', '.join(self.features) or 'none'}"

    # ------------------------------------------------------------------------------------ plumbing
    def _check(self):
        if self._failed:
            raise BackendError(f"the GPU backend failed earlier and cannot be used: {self._failed}")

    def _fail(self, what, e):
        self._failed = f"{what}: {type(e).__name__}: {e}"
        raise BackendError(self._failed) from None

    def _buffer(self, nbytes, data=None):
        U_ = self.wgpu.BufferUsage
        size = max(16, -(-int(nbytes) // 4) * 4)
        try:
            buf = self.device.create_buffer(size=size, usage=U_.STORAGE | U_.COPY_DST | U_.COPY_SRC)
            if data is not None:
                self.device.queue.write_buffer(buf, 0, np.ascontiguousarray(data))
        except Exception as e:
            self._fail(f"allocating {size} bytes on the GPU", e)
        return buf

    def _grow_params(self, slots):
        U_ = self.wgpu.BufferUsage
        self._params = np.zeros(slots * self.slot_bytes, np.uint8)
        self._param_buf = self.device.create_buffer(size=slots * self.slot_bytes, usage=U_.UNIFORM | U_.COPY_DST)
        self._invalidate()

    def _pipeline(self, shader, entry, fmt=None):
        key = (shader, entry, fmt)
        pl = self._pipelines.get(key)
        if pl is not None:
            return pl
        mod = self._modules.get(shader)
        if mod is None:
            sg = shader == "qmatrix" and "subgroup" in self.features  # compiled in whenever the device can
            code, parts = _shader_source(shader, ["qmatrix_subgroup"] if sg else [])
            try:
                mod = self.device.create_shader_module(label=parts[0][0].name, code=code)
            except Exception as e:
                raise BackendError(_shader_error(parts, e)) from None
            self._modules[shader] = mod
        layout = self._layouts.get((shader, entry))
        if layout is None:
            entries = [{"binding": b, "visibility": self.wgpu.ShaderStage.COMPUTE,
                        "buffer": {"type": t}} for b, t in LAYOUTS[(shader, entry)]]
            bgl = self.device.create_bind_group_layout(entries=entries)
            layout = (bgl, self.device.create_pipeline_layout(bind_group_layouts=[bgl]))
            self._layouts[(shader, entry)] = layout
        compute = {"module": mod, "entry_point": entry}
        if fmt is not None:
            compute["constants"] = {"FMT": fmt}
        try:
            pl = self.device.create_compute_pipeline(layout=layout[1], compute=compute)
        except Exception as e:
            raise BackendError(f"{shader_dir() / (shader + '.wgsl')}: pipeline {entry!r} failed: {e}") from None
        self._pipelines[key] = pl
        return pl

    def _dispatch(self, shader, entry, params: list, buffers: dict, groups, fmt=None, nbytes=0, pos=(), grid=None):
        """Record one dispatch: params (list of int/float), buffers {binding: buffer}, workgroup counts.
        `nbytes`: weight bytes it reads (for the profiler's GB/s). For step replay: `pos` lists
        (param index, value) pairs whose value moves with the position, `grid` = (axis, divisor,
        value) a workgroup count of ceil(value / divisor) that does."""
        self._check()
        slot = self._slot
        self._slot += 1
        if (slot + 1) * self.slot_bytes > self._params.size:
            self._flush()
            self._grow_params(2 * self._params.size // self.slot_bytes)
            slot, self._slot = 0, 1
        # floats as f32, everything else as u32, straight into this slot of the step's parameter block
        kinds = tuple(map(type, params))
        fmt_ = _PARAM_FORMATS.get(kinds)
        if fmt_ is None:
            fmt_ = _PARAM_FORMATS[kinds] = "<" + "".join("f" if issubclass(t, float) else "I" for t in kinds)
        base = slot * self.slot_bytes
        struct.pack_into(fmt_, self._params, base, *params)
        self._params[base + 4 * len(params):base + PARAM_BYTES] = 0
        pipeline = self._pipeline(shader, entry, fmt)
        # Keyed by the buffer objects (not id()): the key keeps them alive, so a freed buffer's id can
        # never alias a new one. Replacing an arena buffer clears the cache. Call sites pass buffers
        # in a fixed order, so no sort is needed.
        key = (shader, entry, fmt, slot, *buffers.items())
        bg = self._bind_groups.get(key)
        if bg is None:
            entries = [{"binding": 0, "resource": {"buffer": self._param_buf, "offset": slot * self.slot_bytes,
                                                   "size": PARAM_BYTES}}]
            entries += [{"binding": b, "resource": {"buffer": buf}} for b, buf in sorted(buffers.items())]
            bg = self.device.create_bind_group(layout=self._layouts[(shader, entry)][0], entries=entries)
            self._bind_groups[key] = bg
        gx, gy, gz = (tuple(groups) + (1, 1))[:3]
        if gx > self.max_wg:  # fold a long 1-D grid into 2-D; kernels rebuild the index from num_workgroups
            gx, gy = self.max_wg, gy * math.ceil(gx / self.max_wg)
        if self._recording is not None:
            if grid is not None and gx != groups[0]:  # a folded grid that moves cannot be patched
                self._recording = None
            elif pos or grid:
                self._recording.append((len(self._ops), slot, pos, grid))
        self._ops.append((pipeline, bg, (int(gx), int(gy), int(gz)), (shader, entry, fmt), nbytes))

    def _flush(self, copy=None):
        """Submit the recorded dispatches (and an optional buffer copy) as one command buffer."""
        if not self._ops and copy is None:
            return
        self._recording = None  # a step split across submits is not replayable
        try:
            if self._ops:
                self.device.queue.write_buffer(self._param_buf, 0, self._params[:self._slot * self.slot_bytes])
            enc = self.device.create_command_encoder()
            self.last_dispatches = len(self._ops)
            if self._ops and self.profile:
                self._encode_profiled(enc)
            elif self._ops:
                cp = enc.begin_compute_pass()
                if self._raw is not None:
                    self._encode_raw(cp)
                else:
                    for pipeline, bg, g, _, _ in self._ops:
                        cp.set_pipeline(pipeline)
                        cp.set_bind_group(0, bg)
                        cp.dispatch_workgroups(*g)
                cp.end()
            if copy is not None:
                enc.copy_buffer_to_buffer(*copy)
            self.device.queue.submit([enc.finish()])
            if self._ops and self.profile:
                self._collect_profile()
        except Exception as e:
            self._fail("submitting GPU work", e)
        finally:
            self._ops = []

    def _invalidate(self):
        """Buffers that cached bind groups (and recorded programs) refer to were replaced."""
        self._bind_groups.clear()
        self._gen += 1

    # ------------------------------------------------------------------------------------ replay
    # A decode step's dispatches are the same at every position except a few parameter words (the
    # position given to RoPE, the KV write and attention) and the attention grid's length. The first
    # step is recorded while the graph runs; later steps patch those words and grid sizes into a copy
    # of the recorded parameter block and re-encode the recorded dispatches, without running the
    # Python graph. Any buffer replacement (_invalidate) discards the program; the graph then runs
    # and records again.
    def replay(self, cache, pos0: int):
        pr = self._program
        if (not self.replay_steps or pr is None or pr.gen != self._gen or pr.cache is not cache or self.profile
                or pos0 + 1 > pr.max_pos):
            return None
        self._flush()
        u32 = pr.params.view(np.uint32)
        u32[pr.words] = pos0 + pr.offsets
        self._params[:pr.params.size] = pr.params
        ops = list(pr.ops)
        for i, axis, div, off in pr.grids:
            pipeline, bg, g, label, nb = ops[i]
            g = list(g)
            g[axis] = -(-(pos0 + off) // div)
            ops[i] = (pipeline, bg, tuple(g), label, nb)
        self._ops, self._slot = ops, pr.slots
        self._ids_on_device = None
        self.replayed += 1
        return pr.out

    def record_begin(self):
        self._recording = [] if self.replay_steps and not self.profile else None

    def record_end(self, cache, out, pos0: int):
        rec, self._recording = self._recording, None
        if rec is None:  # not recording, or a flush cut the step in two
            return
        words, offsets, grids = [], [], []
        for i, slot, dyn, grid in rec:
            for index, off in dyn:
                words.append(slot * self.slot_bytes // 4 + index)
                offsets.append(off - pos0)
            if grid is not None:
                grids.append((i, grid[0], grid[1], grid[2] - pos0))
        max_pos = min([t[1] for t in self._rope_tables.values()] + [cache.max_ctx])
        self._program = _Program(self._gen, cache, list(self._ops), self._params[:self._slot * self.slot_bytes].copy(),
                                 self._slot, np.array(words, np.int64), np.array(offsets, np.int64), grids, out, max_pos)

    def _encode_raw(self, cp):
        """The recorded dispatches through wgpu-native's C functions directly: wgpu-py's wrappers cost
        ~10 us per call, three calls per dispatch. Validation errors still surface: wgpu-core marks the
        encoder invalid and `finish()` (through wgpu-py) raises them."""
        lib, null = self._raw
        set_pipeline, set_bind_group = lib.wgpuComputePassEncoderSetPipeline, lib.wgpuComputePassEncoderSetBindGroup
        dispatch = lib.wgpuComputePassEncoderDispatchWorkgroups
        handle, last = cp._internal, None
        for pipeline, bg, (gx, gy, gz), _, _ in self._ops:
            if pipeline is not last:
                set_pipeline(handle, pipeline._internal)
                last = pipeline
            set_bind_group(handle, 0, bg._internal, 0, null)
            dispatch(handle, gx, gy, gz)

    # ------------------------------------------------------------------------------------ profiling
    def _encode_profiled(self, enc):
        """One compute pass per dispatch, with begin/end timestamps (the `timestamp-query` feature)."""
        n = 2 * len(self._ops)
        U_ = self.wgpu.BufferUsage
        if self._qset is None or self._qset_count < n:
            self._qset = self.device.create_query_set(type="timestamp", count=n)
            self._qset_count = n
            self._qbuf = self.device.create_buffer(size=8 * n, usage=U_.QUERY_RESOLVE | U_.COPY_SRC)
        for j, (pipeline, bg, g, _, _) in enumerate(self._ops):
            cp = enc.begin_compute_pass(timestamp_writes={"query_set": self._qset,
                                                          "beginning_of_pass_write_index": 2 * j,
                                                          "end_of_pass_write_index": 2 * j + 1})
            cp.set_pipeline(pipeline)
            cp.set_bind_group(0, bg)
            cp.dispatch_workgroups(*g)
            cp.end()
        enc.resolve_query_set(self._qset, 0, n, self._qbuf, 0)
        self._profiled_ops = [(f"{sh}.{en}" + (f"[{_FMT_NAMES[f]}]" if f is not None else ""), nb)
                              for _, _, _, (sh, en, f), nb in self._ops]

    def _collect_profile(self):
        n = 2 * len(self._profiled_ops)
        ticks = np.frombuffer(self.device.queue.read_buffer(self._qbuf, 0, 8 * n), np.uint64).reshape(-1, 2)
        for (label, nb), (t0, t1) in zip(self._profiled_ops, ticks):
            self.profile_log.append((label, nb, int(t1) - int(t0)))

    def enable_profiling(self, on: bool = True):
        """Time every dispatch with timestamp queries (needs the `timestamp-query` feature)."""
        if on and "timestamp-query" not in self.features:
            raise BackendError(f"{self.device_name} has no timestamp-query feature: cannot profile kernels")
        self.profile, self.profile_log = on, []

    def copy_bandwidth_gbps(self, nbytes: int = 64 << 20) -> float:
        """Device buffer-to-buffer copy bandwidth (read + write bytes / wall time, best of 3)."""
        import time
        a, b = self._buffer(nbytes), self._buffer(nbytes)
        best = float("inf")
        for _ in range(3):
            enc = self.device.create_command_encoder()
            enc.copy_buffer_to_buffer(a, 0, b, 0, nbytes)
            t = time.perf_counter()
            self.device.queue.submit([enc.finish()])
            self.device.queue.read_buffer(b, 0, 4)  # waits for the copy
            best = min(best, time.perf_counter() - t)
        return 2 * nbytes / best / 1e9

    def _out(self, shape):
        """The arena buffer for the current dispatch slot, at least big enough for `shape`."""
        nbytes = 4 * math.prod(shape)
        slot = self._slot
        buf = self._arena.get(slot)
        if buf is None or buf.size < nbytes:
            if buf is not None:
                self._invalidate()
            buf = self._buffer(nbytes)
            self._arena[slot] = buf
        return GTensor(buf, 0, shape)

    def begin_forward(self):
        self._flush()
        self._slot = 0

    # ------------------------------------------------------------------------------------ memory
    def load_matrix(self, parts):
        """Upload stacked parts; consecutive parts of one GPU format become one piece (so Q|K|V or gate|up
        is a single dispatch), split by rows only where a binding would exceed the device limit."""
        self._check()
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
            per = max(1, min(rows, self.max_binding // row_bytes))
            spb = 2 if fmt == 6 else 1  # scales per block
            for r0 in range(0, rows, per):
                r1 = min(rows, r0 + per)
                b0, b1 = r0 * bpr, r1 * bpr
                qb = self._buffer(q[b0:b1].nbytes, q[b0:b1])
                sb = self._dummy if s is None else self._buffer(s[b0 * spb:b1 * spb].nbytes, s[b0 * spb:b1 * spb])
                mb = self._dummy if m is None else self._buffer(m[b0:b1].nbytes, m[b0:b1])
                pieces.append(_Piece(fmt, qb, sb, mb, col0 + r0, r1 - r0))
            nbytes += q.nbytes + (s.nbytes if s is not None else 0) + (m.nbytes if m is not None else 0)
            col0 += rows
        return GMatrix(pieces, col0, k, nbytes)

    def load_vector(self, array):
        a = np.ascontiguousarray(array, dtype=np.float32)
        return GTensor(self._buffer(a.nbytes, a), 0, a.shape)

    def alloc_kv_cache(self, n_layers, n_kv_heads, max_ctx, head_dim, head_dim_v):
        k = [self._buffer(4 * n_kv_heads * max_ctx * head_dim) for _ in range(n_layers)]
        v = [self._buffer(4 * n_kv_heads * max_ctx * head_dim_v) for _ in range(n_layers)]
        return KVCacheGPU(k, v, max_ctx, n_kv_heads, head_dim_v)

    def read(self, x):
        self._check()
        if isinstance(x, np.ndarray):
            return x
        rows = x.shape[0] if len(x.shape) > 1 else 1
        cols = x.cols if len(x.shape) > 1 else x.shape[0]
        self._flush()
        span = 4 * ((rows - 1) * x.stride + cols)
        try:
            data = self.device.queue.read_buffer(x.buf, 4 * x.off, span)
        except Exception as e:
            self._fail("reading back from the GPU", e)
        a = np.frombuffer(data, np.float32)
        if rows > 1:
            a = np.lib.stride_tricks.as_strided(a, (rows, cols), (4 * x.stride, 4)).copy()
        return a.reshape(x.shape) if len(x.shape) > 1 else a.copy()

    # ------------------------------------------------------------------------------------ ops
    def embed(self, table, ids, scale=1.0):
        if isinstance(ids, OnDevice):  # encode-ahead: the previous step's sample is already in _ids
            n = 1
        else:
            ids = np.asarray(ids, dtype=np.uint32)
            n = len(ids)
            if n > self._ids_cap:
                self._ids_cap = 2 * n
                self._ids = self._buffer(4 * self._ids_cap)
                self._invalidate()
                self._ids_on_device = None
            if not (n == 1 and self._ids_on_device == int(ids[0])):  # argmax left it there already
                self.device.queue.write_buffer(self._ids, 0, ids)
        self._ids_on_device = None
        k = table.shape[1]
        out = self._out((n, k))
        for pc in table.pieces:
            self._dispatch("qmatrix", "embed", [n, k, pc.rows, 0, k, 0, 0, 0, 0, pc.col0, float(scale)],
                           {1: self._ids, 2: pc.q, 3: pc.s, 4: pc.m, 5: out.buf, 6: self._dummy, 7: self._dummy},
                           (math.ceil(k / 64), n), fmt=pc.fmt)
        return out

    def _norm(self, entry, x, w, b, eps):
        if len(x.shape) == 3:
            n, heads, m = x.shape
        else:
            (n, m), heads = x.shape, 1
        rows = n * heads
        out = self._out(x.shape)
        bufs = {1: x.buf, 2: w.buf, 3: out.buf}
        if b is not None:
            bufs[4] = b.buf
        self._dispatch("norm", entry, [rows, m, heads, x.off, x.stride, float(eps)], bufs, (rows,))
        return out

    def rmsnorm(self, x, w, eps):
        return self._norm("rmsnorm", x, w, None, eps)

    def layernorm(self, x, w, b, eps):
        return self._norm("layernorm", x, w, b, eps)

    def gelu(self, x):
        n, f = x.shape[0], x.cols
        out = self._out((n, f))
        self._dispatch("elementwise", "gelu", [n * f, f, 0, x.off], {1: out.buf, 2: x.buf}, (math.ceil(n * f / 64),))
        return out

    def matmul(self, x, w, bias=None, *, residual=None, norm=None):
        n, k = x.shape[0], x.cols
        if norm is not None and n > 1:  # prefill: a separate RMSNorm dispatch (the tiled matmul has no prologue)
            x, norm = self.rmsnorm(x, *norm), None
        rows = w.shape[0]
        out = residual if residual is not None else self._out((n, rows))
        g, eps = self._norm_binding(norm)
        for pc in w.pieces:
            params = [n, k, pc.rows, pc.col0, out.stride, x.off, x.stride, out.off, int(bias is not None), 0, 1.0,
                      int(residual is not None), int(norm is not None), eps]
            bufs = {1: x.buf, 2: pc.q, 3: pc.s, 4: pc.m, 5: out.buf, 6: self._bias_piece(bias, pc), 7: g}
            nb = self._piece_bytes(pc)
            if n == 1:
                self._dispatch("qmatrix", self._mv[0], params, bufs, (math.ceil(pc.rows / MV_ROWS),), fmt=pc.fmt,
                               nbytes=nb)
            else:
                self._dispatch("qmatrix", "matmul", params, bufs, (math.ceil(pc.rows / 16), math.ceil(n / 16)),
                               fmt=pc.fmt, nbytes=nb)
        return out

    def matmul_glu(self, x, w, act, *, norm=None):
        pc = w.pieces[0]
        if x.shape[0] != 1 or len(w.pieces) != 1 or act not in ("swiglu", "geglu"):
            return super().matmul_glu(x, w, act, norm=norm)  # prefill, or gate and up in separate pieces
        k, f = x.cols, w.shape[0] // 2
        out = self._out((1, f))
        g, eps = self._norm_binding(norm)
        params = [1, k, f, 0, f, x.off, x.stride, out.off, 0, 0, 1.0, 0, int(norm is not None), eps,
                  int(act == "geglu")]
        nb = self._piece_bytes(pc)
        self._dispatch("qmatrix", self._mv[1], params,
                       {1: x.buf, 2: pc.q, 3: pc.s, 4: pc.m, 5: out.buf, 6: self._dummy, 7: g},
                       (math.ceil(f / (MV_ROWS // 2)),), fmt=pc.fmt, nbytes=nb)
        return out

    def _piece_bytes(self, pc) -> int:
        """Weight bytes a dispatch over piece `pc` reads (for the profiler's GB/s)."""
        return pc.q.size + sum(b.size for b in (pc.s, pc.m) if b is not self._dummy)

    def _norm_binding(self, norm):
        """(buffer, eps) of matmul's `norm=` for binding 7 and the `eps` parameter."""
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
            b = self._bias_slices[key] = self._buffer(host.nbytes, host)
        return b

    def add(self, a, b):
        count = a.shape[0] * a.cols
        self._dispatch("elementwise", "add", [count, 1, a.off, b.off], {1: a.buf, 2: b.buf}, (math.ceil(count / 64),))
        return a

    def _glu(self, gate_up, entry):
        n, f = gate_up.shape[0], gate_up.cols // 2
        out = self._out((n, f))
        self._dispatch("elementwise", entry, [n * f, f, 0, gate_up.off], {1: out.buf, 2: gate_up.buf},
                       (math.ceil(n * f / 64),))
        return out

    def swiglu(self, gate_up):
        return self._glu(gate_up, "swiglu")

    def geglu(self, gate_up):
        return self._glu(gate_up, "geglu")

    def _rope_table(self, base, n_rot, scale, n_pos):
        key = (base, n_rot, scale)
        t = self._rope_tables.get(key)
        if t is None or t[1] < n_pos:  # the same table as the NumPy backend, (cos, sin) interleaved
            n_pos = max(n_pos, 4096)
            cs = np.stack(rope_cos_sin(base, n_rot, scale, n_pos), axis=-1)
            t = (self._buffer(cs.nbytes, cs), n_pos)
            self._rope_tables[key] = t
            self._invalidate()
        return t[0]

    def rope(self, x, pos0, *, base, n_rot, scale, neox):
        n, heads, hd = x.shape
        cs = self._rope_table(base, n_rot, scale, pos0 + n)
        self._dispatch("rope", "rope", [n, heads, hd, n_rot, pos0, int(neox), x.off, x.stride],
                       {1: cs, 2: x.buf}, (math.ceil(n_rot / 2 / 64), heads, n), pos=((4, pos0),))
        return x

    def kv_write(self, cache, layer, k, v, pos0, *, rope=None):
        n, kvh, hd = k.shape
        hdv = v.shape[2]
        if pos0 + n > cache.max_ctx:
            raise BackendError(f"KV cache overflow: positions up to {pos0 + n} > context {cache.max_ctx}")
        rope = rope or dict(base=10000.0, n_rot=0, scale=1.0, neox=False)
        cs = self._rope_table(rope["base"], max(rope["n_rot"], 2), rope["scale"], pos0 + n)
        self._dispatch("rope", "rope_store",
                       [n, kvh, hd, rope["n_rot"], pos0, int(rope["neox"]), k.off, k.stride, v.off, v.stride, hdv,
                        cache.max_ctx],
                       {1: cs, 3: v.buf, 4: cache.k[layer], 5: cache.v[layer], 6: k.buf},
                       (math.ceil(max(hd, hdv) / 64), kvh, n), pos=((4, pos0),))

    def attention(self, q, cache, layer, pos0, *, scale, window=0):
        n, H, hd = q.shape
        ctx, hdv = cache.max_ctx, cache.hd_v
        out = self._out((n, H * hdv))
        # Query chunks keep the scores scratch [chunk, H, ctx] within one binding; one query (decode)
        # uses it for split-KV partials [H, splits, 2 + hd_v].
        chunk = max(1, min(n, self.max_binding // (4 * H * ctx)))
        need = max(4 * chunk * H * ctx, 4 * H * math.ceil(ctx / DEC_SPLIT) * (2 + hdv))
        if self._scratch is None or self._scratch.size < need:
            self._invalidate()
            self._scratch = self._buffer(need)
        if n == 1:
            p = [1, H, cache.n_kv, hd, hdv, ctx, pos0, window, q.off, q.stride, float(scale), out.off]
            kv, at = {2: cache.k[layer], 3: cache.v[layer], 4: self._scratch}, ((6, pos0),)
            self._dispatch("attention", "decode_split", p, {1: q.buf, **kv}, (math.ceil((pos0 + 1) / DEC_SPLIT), H),
                           pos=at, grid=(0, DEC_SPLIT, pos0 + 1))
            self._dispatch("attention", "decode_merge", p, {4: self._scratch, 5: out.buf}, (H,), pos=at)
            return out
        for c0 in range(0, n, chunk):
            c = min(chunk, n - c0)
            p = [c, H, cache.n_kv, hd, hdv, ctx, pos0 + c0, window, q.off + c0 * q.stride, q.stride, float(scale),
                 out.off + c0 * H * hdv]
            kv = {2: cache.k[layer], 3: cache.v[layer], 4: self._scratch}
            at = ((6, pos0 + c0),)
            self._dispatch("attention", "scores", p, {1: q.buf, **kv}, (math.ceil((pos0 + c0 + c) / 64), H, c),
                           pos=at, grid=(0, 64, pos0 + c0 + c))
            self._dispatch("attention", "softmax", p, {4: self._scratch}, (c * H,), pos=at)
            self._dispatch("attention", "weighted_sum", p, {**kv, 5: out.buf}, (math.ceil(hdv / 64), H, c), pos=at)
        return out

    def argmax(self, logits, *, defer=False):
        count = logits.cols if len(logits.shape) > 1 else logits.shape[0]
        self._dispatch("argmax", "argmax", [count, logits.off], {1: logits.buf, 2: self._ids}, (1,))
        return self._submit_token(defer)

    def sample(self, logits, params, rng, history, step, *, defer=False):
        """sample.wgsl: penalties, top-k/top-p/min-p, temperature and a counter-based draw on the GPU.
        The host's RNG only supplies a 32-bit seed per step, so a seeded generation repeats exactly."""
        if params.greedy:  # penalties then argmax: temperature 0 in the kernel would divide by zero
            params = type(params)(**{**params.__dict__, "temperature": 1e-6, "top_k": 1})
        count = logits.cols if len(logits.shape) > 1 else logits.shape[0]
        penalize = params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        hist = np.asarray(history[-params.penalty_last_n:] if penalize and params.penalty_last_n else [], np.uint32)
        if self._hist is None or self._hist.size < max(16, hist.nbytes):
            self._hist = self._buffer(max(256, hist.nbytes))
            self._invalidate()
        if hist.size:
            self.device.queue.write_buffer(self._hist, 0, hist)
        seed = int(rng.integers(0, 2**32))
        self._dispatch("sample", "sample",
                       [count, logits.off, int(params.top_k), int(hist.size), float(params.temperature),
                        float(params.top_p), float(params.min_p), float(params.repeat_penalty),
                        float(params.presence_penalty), float(params.frequency_penalty), seed, int(step)],
                       {1: logits.buf, 2: self._ids, 3: self._hist}, (1,))
        return self._submit_token(defer)

    def _submit_token(self, defer: bool):
        """Submit the step, copying the 4-byte token into the next ring buffer. With defer, return the
        ring slot without waiting (collect() reads it later); else wait and return the token."""
        slot = self._ring_next
        self._ring_next = (slot + 1) % self.RING
        self._flush(copy=(self._ids, 0, self._ring[slot], 0, 4))
        self._last_slot = slot
        return slot if defer else self.collect(slot)

    def collect(self, slot: int) -> int:
        """Wait for the step that filled ring `slot` and return its token."""
        buf = self._ring[slot]
        try:
            buf.map_sync(self.wgpu.MapMode.READ)
            tok = int(np.frombuffer(buf.read_mapped(), np.uint32)[0])
            buf.unmap()
        except Exception as e:
            self._fail("reading the sampled token", e)
        # The token buffer holds this token only if no later step has been submitted since.
        self._ids_on_device = tok if slot == self._last_slot and not self._ops else None
        return tok

    def split_heads(self, x, sizes, heads):
        out, c = [], 0
        for size, h in zip(sizes, heads):
            out.append(GTensor(x.buf, x.off + c, (x.shape[0], h, size // h), x.stride))
            c += size
        return out

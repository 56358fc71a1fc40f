"""The command stream: dispatches recorded for one submit, their parameter block, encoding through
wgpu-native's C functions, decode-step capture and replay, and per-dispatch profiling.

Each dispatch gets a slot of the step's parameter block; the block goes up in one `write_buffer`
and the dispatches in one compute pass and one submit.

Replay: a decode step's dispatches are the same at every position except a few parameter fields
(named by the dispatch as `moving`) and some grid sizes (`moving_grid`). The first step is captured
while the graph runs; later steps patch those fields and grids into a copy of the captured parameter
block and re-encode the captured dispatches without running the Python graph. Any buffer replacement
(`gpu.gen` moving) discards the capture.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from .shaders import PARAM_BYTES

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Op:
    pipeline: object
    bind_group: object
    grid: tuple           # workgroups (x, y, z)
    label: str
    nbytes: int           # weight bytes read (for the profiler's GB/s)


@dataclass(slots=True)
class Capture:
    """A captured decode step: dispatches, parameter block, and where the position goes."""

    gen: int                # gpu.gen when captured
    key: object             # what the step belongs to (the KV cache it writes)
    ops: list
    params: np.ndarray      # the parameter block (uint8), slots [0, slots)
    slots: int
    words: np.ndarray       # u32 word indices holding a position ...
    offsets: np.ndarray     # ... equal to pos0 + offset
    grids: list             # (op index, axis, divisor, offset): grid[axis] = ceil((pos0 + offset) / divisor)
    out: object             # the step's output
    max_pos: int            # replayable while pos0 + 1 <= max_pos


class CommandStream:
    def __init__(self, gpu, programs, native=None):
        self.gpu, self.programs, self.native = gpu, programs, native
        self.ops: list[Op] = []
        self.slot = 0
        self._params = np.zeros(0, np.uint8)
        self.param_buf = None
        self._grow(512)
        self.last_dispatches = 0
        self.profile = None          # None | "kernels": a timed pass per dispatch | "step": one timed pass per submit
        self.profile_log = []        # "kernels": (label, weight bytes, ticks); "step": (dispatches, ticks)
        self.host_log = []           # "step": host seconds per submit (write + new encoder, encode, finish, submit)
        self._qset, self._qset_count, self._qbuf = None, 0, None
        self._capturing: list | None = None
        self._capture_pos = 0
        self.capture: Capture | None = None
        self.replayed = 0  # decode steps replayed from a capture (statistics)

    @property
    def raw(self) -> bool:
        """Dispatches are encoded and submitted through wgpu-native's C functions."""
        return self.native is not None

    def _grow(self, slots):
        U = self.gpu.wgpu.BufferUsage
        nbytes = slots * self.gpu.slot_bytes
        self._params = np.zeros(nbytes, np.uint8)
        self.param_buf = self.gpu.device.create_buffer(size=nbytes, usage=U.UNIFORM | U.COPY_DST)
        self.gpu.invalidate()

    def begin(self):
        """Start a new pass of the graph: submit what is pending, reuse slots from 0."""
        self.flush()
        self.slot = 0

    # ------------------------------------------------------------------------------------ recording
    def dispatch(self, kernel, grid, params: dict, buffers: dict, *, nbytes: int = 0, moving=None,
                 moving_grid=None):
        """Record one dispatch of `kernel` over `grid` workgroups with named `params` (unset fields
        zero) and `buffers` {binding name: buffer}. For replay, `moving` names the parameter fields
        that hold a position ({field: value}) and `moving_grid` = (axis, divisor, value) a grid size
        ceil(value / divisor) that moves with it."""
        self.gpu.check()
        slot = self.slot
        self.slot += 1
        sb = self.gpu.slot_bytes
        if (slot + 1) * sb > self._params.size:
            self.flush()
            self._grow(2 * self._params.size // sb)
            slot, self.slot = 0, 1
        base = slot * sb
        packed = kernel.source.params.pack(params)
        self._params[base:base + len(packed)] = np.frombuffer(packed, np.uint8)
        self._params[base + len(packed):base + PARAM_BYTES] = 0
        bg = self.programs.bind_group(kernel, self.param_buf, base, buffers)
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        if gx > self.gpu.max_wg:  # fold a long 1-D grid into 2-D; kernels rebuild the index from num_workgroups
            gx, gy = self.gpu.max_wg, gy * math.ceil(gx / self.gpu.max_wg)
        if self._capturing is not None:
            if moving_grid is not None and gx != grid[0]:  # a folded grid that moves cannot be patched
                self._capturing = None
            elif moving or moving_grid:
                words = [(slot * sb // 4 + kernel.source.params.word(f), v) for f, v in (moving or {}).items()]
                self._capturing.append((len(self.ops), words, moving_grid))
        self.ops.append(Op(kernel.pipeline, bg, (int(gx), int(gy), int(gz)), kernel.label, nbytes))

    def flush(self, copy=None) -> int | None:
        """Submit the recorded dispatches (and an optional buffer copy) as one command buffer; its
        submission index when submitted through wgpu-native (else None)."""
        if not self.ops and copy is None:
            return None
        self._capturing = None  # a step split across submits is not replayable
        gpu = self.gpu
        clock = time.perf_counter
        t0 = clock()
        try:
            if self.ops:
                gpu.device.queue.write_buffer(self.param_buf, 0, self._params[:self.slot * gpu.slot_bytes])
            enc = gpu.device.create_command_encoder()
            t1 = clock()
            self.last_dispatches = len(self.ops)
            if self.ops and self.profile == "kernels":
                self._encode_profiled(enc)
            elif self.ops:
                cp = enc.begin_compute_pass(**self._step_timestamps())
                if self.native is not None:
                    self.native.encode(cp, self.ops)
                else:
                    for op in self.ops:
                        cp.set_pipeline(op.pipeline)
                        cp.set_bind_group(0, op.bind_group)
                        cp.dispatch_workgroups(*op.grid)
                cp.end()
            if self.ops and self.profile == "step":
                enc.resolve_query_set(self._qset, 0, 2, self._qbuf, 0)
            if copy is not None:
                enc.copy_buffer_to_buffer(*copy)
            t2 = clock()
            buf = enc.finish()
            t3 = clock()
            index = None
            if self.native is not None:
                index = self.native.submit(gpu.device.queue, buf)
            else:
                gpu.device.queue.submit([buf])
            if self.ops and self.profile == "step":  # host seconds: write + new encoder, encode, finish, submit
                self.host_log.append((t1 - t0, t2 - t1, t3 - t2, clock() - t3))
            if self.ops and self.profile:
                self._collect_profile()
        except Exception as e:
            gpu.fail("submitting GPU work", e)
        finally:
            self.ops = []
        return index

    # ------------------------------------------------------------------------------------ capture and replay
    def capture_begin(self, pos0: int):
        """The decode step about to be recorded (for position pos0) may be captured for replay."""
        self._capturing = [] if self.profile != "kernels" else None
        self._capture_pos = pos0

    def capture_end(self, key, out, max_pos: int):
        """The captured step ended with output `out`; keep it unless a flush cut it in two."""
        rec, self._capturing = self._capturing, None
        if rec is None:
            return
        pos0 = self._capture_pos
        words, offsets, grids = [], [], []
        for i, moved, grid in rec:
            for w, v in moved:
                words.append(w)
                offsets.append(v - pos0)
            if grid is not None:
                grids.append((i, grid[0], grid[1], grid[2] - pos0))
        self.capture = Capture(self.gpu.gen, key, list(self.ops), self._params[:self.slot * self.gpu.slot_bytes].copy(),
                               self.slot, np.array(words, np.int64), np.array(offsets, np.int64), grids, out, max_pos)

    def replay(self, key, pos0: int):
        """The captured step's output with its dispatches queued for position pos0, or None when there
        is no valid capture for `key` at this position."""
        c = self.capture
        if c is None or c.gen != self.gpu.gen or c.key != key or self.profile == "kernels" or pos0 + 1 > c.max_pos:
            return None
        self.flush()
        c.params.view(np.uint32)[c.words] = pos0 + c.offsets
        self._params[:c.params.size] = c.params
        ops = list(c.ops)
        for i, axis, div, off in c.grids:
            op = ops[i]
            g = list(op.grid)
            g[axis] = -(-(pos0 + off) // div)
            ops[i] = Op(op.pipeline, op.bind_group, tuple(g), op.label, op.nbytes)
        self.ops, self.slot = ops, c.slots
        self.replayed += 1
        return c.out

    # ------------------------------------------------------------------------------------ profiling
    def _queries(self, n):
        if self._qset is None or self._qset_count < n:
            U = self.gpu.wgpu.BufferUsage
            self._qset = self.gpu.device.create_query_set(type="timestamp", count=n)
            self._qset_count = n
            self._qbuf = self.gpu.device.create_buffer(size=8 * n, usage=U.QUERY_RESOLVE | U.COPY_SRC)

    def _step_timestamps(self) -> dict:
        """begin_compute_pass arguments: timestamps around the whole pass when profiling steps."""
        if self.profile != "step":
            return {}
        self._queries(2)
        return {"timestamp_writes": {"query_set": self._qset, "beginning_of_pass_write_index": 0,
                                     "end_of_pass_write_index": 1}}

    def _encode_profiled(self, enc):
        """One compute pass per dispatch, with begin/end timestamps (the `timestamp-query` feature)."""
        n = 2 * len(self.ops)
        self._queries(n)
        for j, op in enumerate(self.ops):
            cp = enc.begin_compute_pass(timestamp_writes={"query_set": self._qset,
                                                          "beginning_of_pass_write_index": 2 * j,
                                                          "end_of_pass_write_index": 2 * j + 1})
            cp.set_pipeline(op.pipeline)
            cp.set_bind_group(0, op.bind_group)
            cp.dispatch_workgroups(*op.grid)
            cp.end()
        enc.resolve_query_set(self._qset, 0, n, self._qbuf, 0)

    def _collect_profile(self):
        if self.profile == "step":
            t0, t1 = np.frombuffer(self.gpu.device.queue.read_buffer(self._qbuf, 0, 16), np.uint64)
            self.profile_log.append((len(self.ops), int(t1) - int(t0)))
            return
        n = 2 * len(self.ops)
        ticks = np.frombuffer(self.gpu.device.queue.read_buffer(self._qbuf, 0, 8 * n), np.uint64).reshape(-1, 2)
        for op, (t0, t1) in zip(self.ops, ticks):
            self.profile_log.append((op.label, op.nbytes, int(t1) - int(t0)))

    def read_bandwidth_gbps(self, nbytes: int | None = None, timestamp_period_ns: float = 1.0) -> float:
        """The device's read bandwidth as a WGSL kernel sees it: a grid-stride vec4<u32> read
        (bandwidth.wgsl) of a buffer far larger than the caches, by 8192 workgroups of 256 invocations,
        timed with timestamps (best of 5). The profiler's reference for each kernel's GB/s."""
        gpu = self.gpu
        nbytes = nbytes or min(1 << 30, gpu.max_binding) // 16 * 16
        src, dst = gpu.buffer(nbytes), gpu.buffer(4 * 8192 * 256)
        gpu.device.queue.write_buffer(src, 0, np.arange(1 << 20, dtype=np.uint32))  # not all zeros
        kernel = self.programs.kernel("bandwidth", "sweep", dict(src=src, dst=dst))
        saved, self.profile, self.profile_log = (self.profile, self.profile_log), "step", []
        try:
            for _ in range(6):
                self.begin()
                self.dispatch(kernel, (8192,), dict(n=nbytes // 16), dict(src=src, dst=dst))
                self.flush()
            ticks = min(t for _, t in self.profile_log[1:])
        finally:
            self.profile, self.profile_log = saved
        return nbytes / (ticks * timestamp_period_ns)

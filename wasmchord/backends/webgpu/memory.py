"""Device memory the graph works in: tensor views, the activation arena, the KV cache, RoPE tables,
and the token buffer with its ring of mappable readback buffers."""

from __future__ import annotations

import copy
import math

import numpy as np

from ...errors import BackendError

from ..base import rope_cos_sin


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


class KVCacheGPU:
    """Per layer: k [slots, KV, ctx, hd] and v [slots, KV, ctx, hd_v] buffers; `index` is the slot this
    object stands for (`slot(i)` gives the others: views of the same buffers)."""

    def __init__(self, gpu, n_layers, n_kv, max_ctx, hd, hd_v, slots=1):
        nbytes = 4 * slots * n_kv * max_ctx * max(hd, hd_v)
        if nbytes > gpu.max_binding:
            raise BackendError(f"a KV cache of {slots} slots x {max_ctx} positions takes {nbytes >> 20} MiB per "
                               f"layer, over this device's {gpu.max_binding >> 20} MiB binding limit: lower slots or "
                               f"context_length")
        self.k = [gpu.buffer(4 * slots * n_kv * max_ctx * hd) for _ in range(n_layers)]
        self.v = [gpu.buffer(4 * slots * n_kv * max_ctx * hd_v) for _ in range(n_layers)]
        self.max_ctx, self.n_kv, self.hd, self.hd_v, self.slots, self.index = max_ctx, n_kv, hd, hd_v, slots, 0

    def slot(self, i: int) -> "KVCacheGPU":
        views = self.__dict__.setdefault("_views", {0: self})  # one object per slot: a captured step's key
        if i not in views:
            views[i] = copy.copy(self)
            views[i].index = i
        return views[i]


class Arena:
    """Activation buffers indexed by a dispatch's slot in the pass: the same buffers (and cached bind
    groups) serve every decode step. A buffer that must grow is replaced (gpu.invalidate())."""

    def __init__(self, gpu):
        self.gpu = gpu
        self.buffers: dict[int, object] = {}

    def out(self, slot: int, shape) -> GTensor:
        nbytes = 4 * math.prod(shape)
        buf = self.buffers.get(slot)
        if buf is None or buf.size < nbytes:
            if buf is not None:
                self.gpu.invalidate(buf)
            buf = self.buffers[slot] = self.gpu.buffer(nbytes)
        return GTensor(buf, 0, shape)


class RopeTables:
    """(cos, sin) tables per (base, n_rot, scale, factors, attn_factor), the NumPy backend's values, grown
    as positions need."""

    def __init__(self, gpu):
        self.gpu = gpu
        self._tables: dict[tuple, tuple] = {}

    def get(self, base, n_rot, scale, n_pos, factors=None, attn_factor=1.0):
        key = (base, n_rot, scale, factors, attn_factor)
        t = self._tables.get(key)
        if t is None or t[1] < n_pos:
            n_pos = max(n_pos, 4096)
            cs = np.stack(rope_cos_sin(base, n_rot, scale, n_pos, factors, attn_factor), axis=-1)  # [n_pos, n_rot/2, 2]
            t = self._tables[key] = (self.gpu.buffer(cs.nbytes, cs), n_pos)
            self.gpu.invalidate()
        return t[0]

    @property
    def positions(self) -> int:
        """Positions every table covers (a captured step stays valid below this)."""
        return min((t[1] for t in self._tables.values()), default=2**31)


class TokenRing:
    """The token buffer (ids the embedding reads; argmax/sample write the next one there) and a ring
    of persistent mappable buffers the sampled token is copied into, so the host can encode the next
    step before it reads this one."""

    RING = 3

    def __init__(self, gpu, native=None):
        self.gpu, self.native = gpu, native
        self.cap = 4096
        self.ids = gpu.buffer(4 * self.cap)
        U = gpu.wgpu.BufferUsage
        self.ring = [gpu.device.create_buffer(size=4, usage=U.MAP_READ | U.COPY_DST) for _ in range(self.RING)]
        self.next = self.last = 0
        self.submitted = [None] * self.RING  # submission index of the step that fills each ring slot
        self.on_device: int | None = None  # the token the ids buffer holds, when known
        # a batch's tokens (argmax_rows' ids[0..B)) are copied into mappable buffers of their own, each
        # held by its RowsHandle until collected or discarded; `rows_on_device` is the handle whose
        # tokens ids[0..B) still holds (nothing wrote the token buffer since)
        self._free_rows: list = []
        self.rows_on_device: RowsHandle | None = None

    def write(self, ids: np.ndarray):
        """Put `ids` in the token buffer (unless it holds exactly that one token already)."""
        n = len(ids)
        if n > self.cap:
            self.cap = 2 * n
            self.ids = self.gpu.buffer(4 * self.cap)
            self.gpu.invalidate()
            self.on_device = None
        if not (n == 1 and self.on_device == int(ids[0])):
            self.gpu.device.queue.write_buffer(self.ids, 0, ids)
            self.rows_on_device = None
        self.on_device = None

    def take_slot(self) -> int:
        slot = self.next
        self.next = (slot + 1) % self.RING
        self.last = slot
        return slot

    def collect(self, slot: int, idle: bool) -> int:
        """Wait for the step that filled ring `slot` and return its token. `idle`: nothing was recorded
        after that step, so the token buffer still holds this token."""
        buf = self.ring[slot]
        try:
            if self.native is not None and self.submitted[slot] is not None:  # wait for that step only
                tok = int(self.native.read_u32s(self.gpu.device, buf, self.submitted[slot])[0])
            else:  # wgpu-py's mapping waits for all submitted work
                buf.map_sync(self.gpu.wgpu.MapMode.READ)
                tok = int(np.frombuffer(buf.read_mapped(), np.uint32)[0])
                buf.unmap()
        except Exception as e:
            self.gpu.fail("reading the sampled token", e)
        self.on_device = tok if slot == self.last and idle else None
        return tok

    def rows_buffer(self, n: int):
        """A mappable buffer for `n` tokens that no outstanding handle holds."""
        for i, buf in enumerate(self._free_rows):
            if buf.size >= 4 * n:
                return self._free_rows.pop(i)
        U = self.gpu.wgpu.BufferUsage
        return self.gpu.device.create_buffer(size=4 * max(16, n), usage=U.MAP_READ | U.COPY_DST)

    def collect_rows(self, h: "RowsHandle") -> np.ndarray:
        """Wait for the step `h` belongs to and return its tokens; the buffer goes back to the pool."""
        if h.buffer is None:
            raise BackendError("these tokens were collected or discarded already")
        buf, h.buffer = h.buffer, None
        try:
            if self.native is not None and h.index is not None:  # wait for that step only
                words = self.native.read_u32s(self.gpu.device, buf, h.index, h.n)
            else:  # wgpu-py's mapping waits for all submitted work
                buf.map_sync(self.gpu.wgpu.MapMode.READ, 0, 4 * h.n)
                words = np.frombuffer(buf.read_mapped(0, 4 * h.n), np.uint32).copy()
                buf.unmap()
        except Exception as e:
            self.gpu.fail("reading the sampled tokens", e)
        self._free_rows.append(buf)
        return words

    def discard_rows(self, h: "RowsHandle"):
        """Tokens nobody will read: their buffer goes back to the pool (its copy is ordered before any
        later one into it)."""
        if h.buffer is not None:
            self._free_rows.append(h.buffer)
            h.buffer = None
        if self.rows_on_device is h:
            self.rows_on_device = None


class RowsHandle:
    """The tokens a submitted step copied into `buffer` (submission `index`, when known)."""

    __slots__ = ("buffer", "index", "n")

    def __init__(self, buffer, index, n: int):
        self.buffer, self.index, self.n = buffer, index, n

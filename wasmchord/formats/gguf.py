"""Reading GGUF files: header, metadata, tensor infos, memory-mapped tensor data.

Format: ggml/docs/gguf.md and gguf-py's `gguf_reader.py`. Versions 2 and 3 (little endian) are read;
version 1 used 32-bit counts and is long gone. Every read is bounds-checked so that a corrupt file
raises `GGUFError` naming the file and the problem, never a struct or NumPy exception.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GGUFError
from .quants import GGML_TYPES, GGMLType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Metadata arrays may nest (gguf-py writes them; llama.cpp reads none deeper than one level). Caps on
# the depth and on the Python objects built for all arrays of strings or arrays keep a hostile header
# from exhausting the stack or memory: real vocabularies hold up to a few 100,000 strings.
MAX_ARRAY_DEPTH = 8
MAX_LIST_ITEMS = 1 << 24

# ---------------------------------------------------------------------------- metadata value types
# gguf.md "GGUFValueType": id -> (name, struct format or None for string/array)
_SCALARS = {
    0: ("uint8", "<B", np.uint8), 1: ("int8", "<b", np.int8), 2: ("uint16", "<H", np.uint16),
    3: ("int16", "<h", np.int16), 4: ("uint32", "<I", np.uint32), 5: ("int32", "<i", np.int32),
    6: ("float32", "<f", np.float32), 7: ("bool", "<?", np.bool_), 10: ("uint64", "<Q", np.uint64),
    11: ("int64", "<q", np.int64), 12: ("float64", "<d", np.float64),
}
T_STRING, T_ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. `shape` is in NumPy order (rows first): GGUF's `ne` reversed."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    offset: int  # absolute offset of the data in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reader over a buffer."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)
        self.list_items = 0  # strings and arrays built as Python objects so far

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.end:
            raise GGUFError(self.path, f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                                       f"but the file has {self.end - self.pos} left")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"length of {what}")
        if n > self.end - self.pos:
            raise GGUFError(self.path, f"string length {n} of {what} at offset {self.pos - 8} "
                                       f"exceeds the {self.end - self.pos} bytes left in the file")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(self.path, f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def strings(self, count: int, key: str) -> list[str]:
        """`count` strings of array `key` (a vocabulary: 150k+ of them): `string` in one loop, with the
        same checks, whose messages are built only when one fails."""
        buf, pos, end, out = self.buf, self.pos, self.end, []
        length, append = struct.Struct("<Q").unpack_from, out.append
        try:
            for i in range(count):
                if pos + 8 > end:
                    self.pos = pos
                    self.need(8, f"length of item {i} of {key!r}")
                (n,) = length(buf, pos)
                pos += 8
                if n > end - pos:
                    raise GGUFError(self.path, f"string length {n} of item {i} of {key!r} at offset {pos - 8} "
                                               f"exceeds the {end - pos} bytes left in the file")
                append(bytes(buf[pos:pos + n]).decode("utf-8"))
                pos += n
        except UnicodeDecodeError as e:
            raise GGUFError(self.path, f"item {len(out)} of {key!r} is not valid UTF-8 "
                                       f"({e.reason} at byte {e.start})") from None
        self.pos = pos
        return out

    def _count_items(self, count: int, key: str):
        self.list_items += count
        if self.list_items > MAX_LIST_ITEMS:
            raise GGUFError(self.path, f"array {key!r} brings the metadata to more than {MAX_LIST_ITEMS} "
                                       f"strings and arrays, more than any model needs")

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            v = self.unpack(_SCALARS[vtype][1], f"value of {key!r}")
            return v
        if vtype == T_STRING:
            return self.string(f"value of {key!r}")
        if vtype == T_ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(self.path, f"metadata {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
            etype = self.unpack("<I", f"array type of {key!r}")
            count = self.unpack("<Q", f"array length of {key!r}")
            if etype in _SCALARS:
                dt = np.dtype(_SCALARS[etype][2]).newbyteorder("<")
                nbytes = count * dt.itemsize
                if nbytes > self.end - self.pos:
                    raise GGUFError(self.path, f"array {key!r} of {count} {_SCALARS[etype][0]} runs past "
                                               f"the end of the file")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += nbytes
                return arr
            if etype == T_STRING:
                if count * 8 > self.end - self.pos:
                    raise GGUFError(self.path, f"array {key!r} of {count} strings runs past the end of the file")
                self._count_items(count, key)
                return self.strings(count, key)
            if etype == T_ARRAY:
                if count * 12 > self.end - self.pos:
                    raise GGUFError(self.path, f"array {key!r} of {count} arrays runs past the end of the file")
                self._count_items(count, key)
                return [self.value(T_ARRAY, f"{key}[{i}]", depth + 1) for i in range(count)]
            raise GGUFError(self.path, f"array {key!r} has unknown element type {etype}")
        raise GGUFError(self.path, f"metadata {key!r} has unknown value type {vtype}")


class GGUFFile:
    """An opened GGUF file: `metadata` (dict), `tensors` (name -> TensorInfo), memory-mapped data.

    Tensor data is never copied at open: `tensor_bytes(name)` returns a read-only view into the map.

    Raises:
        GGUFError: the path does not exist, is not a file, or the file is malformed.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        p = self.path
        if not p.exists():
            raise GGUFError(p, "no such file")
        if p.is_dir():
            raise GGUFError(p, "is a directory, expected a .gguf file")
        try:
            size = p.stat().st_size
            if size == 0:
                raise GGUFError(p, "file is empty, expected a GGUF header")
            with open(p, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(p, f"cannot read: {e.strerror}") from None
        self.file_size = size
        self._parse()

    # ------------------------------------------------------------------------------------ parsing
    def _parse(self):
        cur = _Cursor(self._mmap, self.path)
        cur.need(4, "magic")
        magic = bytes(self._mmap[:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(self.path, f"not a GGUF file: magic is {magic!r}, expected b'GGUF'")
        cur.pos = 4
        version = cur.unpack("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            hint = " (the file looks big-endian)" if struct.unpack("<I", struct.pack(">I", version))[0] in (2, 3) else ""
            raise GGUFError(self.path, f"GGUF version {version} is not supported{hint}; "
                                       f"expected one of {SUPPORTED_VERSIONS}")
        self.version = version
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        # Each metadata entry takes at least 8+1+4 bytes, each tensor info at least 8+1+4+8+4+8.
        if n_kv * 13 > cur.end - cur.pos or n_tensors * 33 > cur.end - cur.pos:
            raise GGUFError(self.path, f"header claims {n_kv} metadata entries and {n_tensors} tensors, "
                                       f"more than a {self.file_size}-byte file can hold")
        self.metadata: dict[str, object] = {}
        self.metadata_types: dict[str, int] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.unpack("<I", f"type of {key!r}")
            if key in self.metadata:
                raise GGUFError(self.path, f"duplicate metadata key {key!r}")
            self.metadata[key] = cur.value(vtype, key)
            self.metadata_types[key] = vtype
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise GGUFError(self.path, f"general.alignment is {align!r}, expected a power of two")
        self.alignment = align

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.unpack("<I", f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(self.path, f"tensor {name!r} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
            ne = [cur.unpack("<Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
            type_id = cur.unpack("<I", f"type of tensor {name!r}")
            rel = cur.unpack("<Q", f"offset of tensor {name!r}")
            infos.append((name, ne, type_id, rel))
        data_start = -(-cur.pos // align) * align
        self.data_offset = data_start

        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, rel in infos:
            if name in self.tensors:
                raise GGUFError(self.path, f"duplicate tensor name {name!r}")
            t = GGML_TYPES.get(type_id)
            if t is None:
                raise GGUFError(self.path, f"tensor {name!r} has unknown type id {type_id}")
            if any(d == 0 for d in ne) or any(d > 2**40 for d in ne):
                raise GGUFError(self.path, f"tensor {name!r} has invalid dimensions {ne}")
            if ne[0] % t.block_size:
                raise GGUFError(self.path, f"tensor {name!r}: row length {ne[0]} is not a multiple of "
                                           f"{t.name}'s block size {t.block_size}, so its byte size "
                                           f"does not match its type and shape")
            if rel % align:
                raise GGUFError(self.path, f"tensor {name!r} offset {rel} is not a multiple of the "
                                           f"alignment {align}")
            n_el = 1
            for d in ne:
                n_el *= d
            n_bytes = n_el // t.block_size * t.type_size
            start = data_start + rel
            if start + n_bytes > self.file_size:
                raise GGUFError(self.path, f"tensor {name!r} data ({n_bytes} bytes at offset {start}) "
                                           f"extends past the end of the file ({self.file_size} bytes)")
            self.tensors[name] = TensorInfo(name, t, tuple(reversed(ne)), start, n_bytes)
        # Tensors must not overlap: a size that disagrees with the next tensor's offset means the
        # type or shape recorded in the file is not what was written.
        spans = sorted((ti.offset, ti.offset + ti.n_bytes, ti.name) for ti in self.tensors.values())
        for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
            if e0 > s1:
                raise GGUFError(self.path, f"tensor {n0!r} ({e0 - s0} bytes by its type and shape) "
                                           f"overlaps tensor {n1!r}")

    # ------------------------------------------------------------------------------------ access
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(self.path, "metadata has no string 'general.architecture'")
        return arch

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor as a read-only uint8 view of the memory map (no copy)."""
        ti = self.tensor(name)
        if self._mmap is None:
            raise GGUFError(self.path, f"tensor {name!r}: the file was closed (GGUFFile.close, Model.close)")
        return np.frombuffer(self._mmap, dtype=np.uint8, count=ti.n_bytes, offset=ti.offset)

    def release(self, name: str | None = None):
        """Let the process drop its resident pages of tensor `name` (all tensor data when None): madvise
        DONTNEED on the read-only map, so the data stays valid and is read again from the page cache
        if a view is used later. A loader calls it as tensors are copied out, so a model's file is not
        held in memory beside its converted or uploaded weights."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED") or not self.tensors:
            return
        if name is None:
            start, end = min(t.offset for t in self.tensors.values()), len(self._mmap)
        else:
            ti = self.tensor(name)
            start, end = ti.offset, ti.offset + ti.n_bytes
        start -= start % mmap.PAGESIZE
        self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(self.path, f"has no tensor {name!r}") from None

    def dequantize(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor `name` as float32 in its NumPy shape; `rows` (a slice) selects along the first axis:
        rows of a matrix, elements of a vector.

        Raises:
            GGUFError: no such tensor, or `rows` is not a slice of step 1.
            UnsupportedError: the tensor's type has no decoder.
        """
        from .quants import dequantize_rows
        ti = self.tensor(name)
        if rows is not None and (not isinstance(rows, slice) or rows.step not in (None, 1)):
            raise GGUFError(self.path, f"dequantize({name!r}, rows={rows!r}): rows must be a slice of step 1")
        if rows is not None and len(ti.shape) == 1:  # a vector's blocks span its elements: decode it whole
            return self.dequantize(name)[rows]
        return dequantize_rows(self.tensor_bytes(name), ti.ggml_type, ti.shape, rows, what=f"{self.path}: {name}")

    def close(self):
        # Views handed out keep the map alive; closing it under them would crash, so only drop our ref.
        self._mmap = None

    def __repr__(self):
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

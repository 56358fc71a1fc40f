"""Writing GGUF v3 files: metadata, tensor infos, aligned tensor data.

Used by the converter and by tests that build GGUF bytes. Output goes to a temporary file in the
destination directory and is renamed into place only when complete, so a failure leaves nothing.
"""

from __future__ import annotations

import os
import struct
from typing import Callable, Iterable

import numpy as np

from ..atomic import atomic_write
from .quants import GGMLType, ggml_type

# value type ids (gguf.md)
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_NP_TO_VT = {np.dtype(np.uint8): _U8, np.dtype(np.int8): _I8, np.dtype(np.uint16): _U16,
             np.dtype(np.int16): _I16, np.dtype(np.uint32): _U32, np.dtype(np.int32): _I32,
             np.dtype(np.float32): _F32, np.dtype(np.bool_): _BOOL, np.dtype(np.uint64): _U64,
             np.dtype(np.int64): _I64, np.dtype(np.float64): _F64}
_VT_FMT = {_U8: "<B", _I8: "<b", _U16: "<H", _I16: "<h", _U32: "<I", _I32: "<i", _F32: "<f",
           _BOOL: "<?", _U64: "<Q", _I64: "<q", _F64: "<d"}


class Typed:
    """A metadata value with an explicit GGUF value type, e.g. Typed(7, "uint32")."""

    _NAMES = {"uint8": _U8, "int8": _I8, "uint16": _U16, "int16": _I16, "uint32": _U32, "int32": _I32,
              "float32": _F32, "bool": _BOOL, "string": _STR, "uint64": _U64, "int64": _I64, "float64": _F64}

    def __init__(self, value, vtype: str):
        self.value, self.vtype = value, self._NAMES[vtype]


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _infer_vtype(v) -> int:
    if isinstance(v, Typed):
        return v.vtype
    if isinstance(v, bool):
        return _BOOL
    if isinstance(v, int):
        return _U32 if 0 <= v < 2**32 else _I64
    if isinstance(v, float):
        return _F32
    if isinstance(v, str):
        return _STR
    if isinstance(v, (list, tuple, np.ndarray)):
        return _ARR
    raise TypeError(f"cannot store {type(v).__name__} in GGUF metadata")


def encode_value(v) -> tuple[int, bytes]:
    """Metadata value -> (value type id, bytes)."""
    vt = _infer_vtype(v)
    if isinstance(v, Typed):
        v = v.value
    if vt == _STR:
        return vt, _str(v)
    if vt == _ARR:
        if isinstance(v, np.ndarray):
            et = _NP_TO_VT[v.dtype]
            return vt, struct.pack("<IQ", et, len(v)) + v.astype(v.dtype.newbyteorder("<")).tobytes()
        items = list(v)
        if not items:  # numeric arrays arrive as NumPy arrays; an empty list is a list of strings
            return vt, struct.pack("<IQ", _STR, 0)
        encoded = [encode_value(x) for x in items]
        et = encoded[0][0]
        if any(e[0] != et for e in encoded):
            raise TypeError("GGUF arrays must hold values of one type")
        return vt, struct.pack("<IQ", et, len(items)) + b"".join(e[1] for e in encoded)
    return vt, struct.pack(_VT_FMT[vt], v)


class GGUFWriter:
    """Collect metadata and tensors, then `write(path)`.

    Tensors are given as raw blocks (uint8, already in the GGML type) or as float arrays with a
    target type; a callable may be passed instead of an array to produce data lazily at write time
    (the converter streams tensors this way).
    """

    def __init__(self, arch: str | None = None, *, alignment: int = 32):
        self.metadata: dict[str, object] = {}
        self.tensors: list[tuple[str, tuple[int, ...], GGMLType, Callable[[], np.ndarray]]] = []
        self.alignment = alignment
        if arch:
            self.metadata["general.architecture"] = arch
        if alignment != 32:
            self.metadata["general.alignment"] = Typed(alignment, "uint32")

    def add(self, key: str, value):
        self.metadata[key] = value

    def add_tensor(self, name: str, data, *, qtype: str | GGMLType = "F32", shape: Iterable[int] | None = None):
        """Add a tensor. `data`: float array (quantized to `qtype`), raw uint8 blocks with `shape`, or a callable."""
        t = qtype if isinstance(qtype, GGMLType) else ggml_type(qtype)
        if shape is None:
            shape = np.shape(data)
        shape = tuple(int(s) for s in shape)
        self.tensors.append((name, shape, t, data if callable(data) else (lambda d=data: d)))

    def _tensor_bytes(self, shape, t: GGMLType, data) -> bytes:
        from .quants import quantize
        arr = np.asarray(data)
        if arr.dtype == np.uint8 and t.name not in ("I8",):
            raw = arr
        else:
            raw = quantize(arr.reshape(shape).astype(np.float32), t)
        expect = int(np.prod(shape)) // t.block_size * t.type_size
        if raw.size != expect:
            raise ValueError(f"tensor data has {raw.size} bytes, expected {expect} for {t.name} {shape}")
        return np.ascontiguousarray(raw).tobytes()

    def write(self, path: str | os.PathLike, *, progress: Callable[[str, int, int], None] | None = None):
        """Write the file: it appears at `path` only when complete (atomic.py), mode 0666 less the umask."""
        with atomic_write(path) as f:
            self._write_to(f, progress)

    def _write_to(self, f, progress):
        a = self.alignment
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.metadata)))
        for k, v in self.metadata.items():
            vt, b = encode_value(v)
            f.write(_str(k) + struct.pack("<I", vt) + b)
        offset = 0
        sizes = []
        for name, shape, t, _ in self.tensors:
            n = int(np.prod(shape)) // t.block_size * t.type_size
            ne = list(reversed(shape))
            f.write(_str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
                    + struct.pack("<IQ", t.id, offset))
            sizes.append(n)
            offset += -(-n // a) * a
        f.write(b"\0" * (-f.tell() % a))
        for i, ((name, shape, t, get), n) in enumerate(zip(self.tensors, sizes)):
            if progress:
                progress("write tensors", i, len(self.tensors))
            f.write(self._tensor_bytes(shape, t, get()))
            f.write(b"\0" * (-n % a))
        if progress:
            progress("write tensors", len(self.tensors), len(self.tensors))

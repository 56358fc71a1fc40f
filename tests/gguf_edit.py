"""Copies of a GGUF file with metadata values or tensors changed, for tests of files that parse but
carry bad values (and the model-level fuzz test)."""

import numpy as np

from wasmchord.formats.gguf import GGUFFile
from wasmchord.formats.gguf_writer import GGUFWriter, Typed

VALUE_TYPES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 10: "uint64", 11: "int64", 12: "float64"}
DROP = object()  # a value that removes the key (or tensor)


def rewrite(src, dst, metadata=None, tensors=None):
    """Write `dst`: `src` with `metadata` {key: value or DROP} and `tensors` {name: (array, qtype) or
    (raw uint8 blocks, qtype, NumPy shape) or DROP} changed. Unchanged values keep their GGUF value type; unchanged tensors their raw blocks."""
    gf = GGUFFile(src)
    metadata, tensors = metadata or {}, tensors or {}
    w = GGUFWriter(None)
    for k, v in gf.metadata.items():
        t = gf.metadata_types[k]
        if k not in metadata:
            w.add(k, Typed(v, VALUE_TYPES[t]) if t in VALUE_TYPES else v)
    for k, v in metadata.items():
        if v is not DROP:
            w.add(k, v)
    for name, ti in gf.tensors.items():
        if name not in tensors:
            w.add_tensor(name, np.array(gf.tensor_bytes(name)), qtype=ti.ggml_type, shape=ti.shape)
    for name, v in tensors.items():
        if v is not DROP:
            data, qtype, *shape = v
            w.add_tensor(name, data, qtype=qtype, shape=shape[0] if shape else None)
    w.write(dst)
    return dst

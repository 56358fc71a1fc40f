"""WGSL sources: a module's text with its appended parts, compile errors mapped back to file:line, and
each module's parameter struct and bindings read from the WGSL itself (declared once, there)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ...errors import BackendError
from .device import shader_dir

# Files appended after a module's own file (WGSL declarations are order-free; appending keeps the
# module's own line numbers): shared helpers that several op families use.
SHADER_PARTS = {
    "qmatrix": ["quant"],
    "matvec": ["quant", "activations"],  # + lanes_subgroup or lanes_plain (Programs.extra_parts)
    "elementwise": ["activations"],
    "norm": ["reduce"],
    "attention": ["reduce"],
    "sample": ["reduce"],
    "argmax": ["reduce"],
}
PARAM_BYTES = 64   # every shader's parameter struct (struct P) fits in 16 words
_SCALARS = {"u32": "I", "i32": "i", "f32": "f"}
_ACCESS = {"uniform": "uniform", "storage": "read-only-storage", "storage, read": "read-only-storage",
           "storage, read_write": "storage"}


@dataclass(frozen=True)
class Params:
    """A shader's `struct P` (scalar fields only): names in order and their struct format."""

    names: tuple[str, ...]
    fmt: str  # struct format, e.g. "<IIfI"

    def word(self, name: str) -> int:
        """The 32-bit word index of field `name` (for patching a recorded parameter block)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"struct P has no field {name!r} (fields: {', '.join(self.names)})") from None

    def pack(self, values: dict) -> bytes:
        """The struct's bytes: named fields from `values`, every other field zero."""
        unknown = set(values) - set(self.names)
        if unknown:
            raise KeyError(f"struct P has no field(s) {', '.join(sorted(unknown))} (fields: {', '.join(self.names)})")
        return struct.pack(self.fmt, *(values.get(n, 0) for n in self.names))


@dataclass(frozen=True)
class Source:
    """A shader module's WGSL, its parts as (path, first line, line count), its params and bindings."""

    name: str
    code: str
    parts: tuple
    params: Params | None
    bindings: dict  # name -> (binding index, access: uniform | read-only-storage | storage)

    def error(self, e) -> str:
        """naga's multi-line report -> one line: file:line:col: shader compilation failed: reason, with
        the line mapped back to the part it came from."""
        text = str(e)
        where = re.search(r"wgsl:(\d+):(\d+)", text)
        why = re.search(r"error: (.*)", text)
        loc = str(self.parts[0][0])
        if where:
            line = int(where.group(1))
            path, first = next(((p, f) for p, f, n in self.parts if f <= line < f + n), self.parts[0][:2])
            loc = f"{path}:{line - first + 1}:{where.group(2)}"
        return f"{loc}: shader compilation failed: {why.group(1).strip() if why else text.splitlines()[0]}"


def load(name: str, extra=(), directory: Path | None = None) -> Source:
    """Module `name` (shaders/NAME.wgsl), then its SHADER_PARTS, then `extra` part files."""
    d = directory or shader_dir()
    texts, parts, line = [], [], 1
    for part in [name, *SHADER_PARTS.get(name, []), *extra]:
        path = d / f"{part}.wgsl"
        text = path.read_text()
        if not text.endswith("\n"):
            text += "\n"
        texts.append(text)
        parts.append((path, line, text.count("\n")))
        line += text.count("\n")
    code = "".join(texts)
    return Source(name, code, tuple(parts), parse_params(code), parse_bindings(code))


def _strip_comments(code: str) -> str:
    return re.sub(r"//[^\n]*", "", code)


def parse_params(code: str) -> Params | None:
    """`struct P { name: u32, ... }` -> Params; None when the module declares no struct P."""
    m = re.search(r"\bstruct\s+P\s*\{([^}]*)\}", _strip_comments(code))
    if m is None:
        return None
    names, fmt = [], "<"
    for name, typ in re.findall(r"(\w+)\s*:\s*(\w+)", m.group(1)):
        if typ not in _SCALARS:
            raise BackendError(f"struct P field {name!r} has type {typ}; parameters must be u32, i32 or f32")
        names.append(name)
        fmt += _SCALARS[typ]
    if 4 * len(names) > PARAM_BYTES:
        raise BackendError(f"struct P has {len(names)} fields; at most {PARAM_BYTES // 4} fit a parameter slot")
    return Params(tuple(names), fmt)


def parse_bindings(code: str) -> dict:
    """`@group(0) @binding(N) var<space[, access]> name: type;` -> {name: (N, access)}."""
    out = {}
    for n, space, name in re.findall(r"@group\(0\)\s*@binding\((\d+)\)\s*var<([^>]*)>\s*(\w+)",
                                     _strip_comments(code)):
        space = re.sub(r"\s+", " ", space.strip())
        if space not in _ACCESS:
            raise BackendError(f"binding {name!r}: unsupported address space <{space}>")
        out[name] = (int(n), _ACCESS[space])
    return out

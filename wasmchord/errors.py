"""The exceptions wasmchord raises. Every message names the bad thing: a file, a key, a value.

The CLI turns any `WasmchordError` into one line on stderr and exit code 2.
"""

import numbers


class WasmchordError(Exception):
    """Base class of every error wasmchord raises on purpose."""


class GGUFError(WasmchordError, ValueError):
    """A GGUF file is missing, unreadable or malformed."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedError(WasmchordError, ValueError):
    """A well-formed input uses something wasmchord does not implement (architecture, type, pre-tokenizer)."""


class ConfigError(WasmchordError, ValueError):
    """Model metadata is missing a required key or holds a value of the wrong kind."""


class TokenizerError(WasmchordError, ValueError):
    """The tokenizer metadata is missing or inconsistent."""


class ConvertError(WasmchordError, ValueError):
    """A checkpoint directory cannot be converted to GGUF (the message names the file or tensor)."""


class PullError(WasmchordError, RuntimeError):
    """Downloading or verifying a known model failed."""


class BackendError(WasmchordError, RuntimeError):
    """A compute backend is unavailable, or failed (device lost, out of memory)."""


class GenerationError(WasmchordError, ValueError):
    """Bad generation arguments, or the context is full."""


def is_integer(v) -> bool:
    """An integer argument: int or a NumPy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A real-number argument: int, float or a NumPy scalar of either, not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)

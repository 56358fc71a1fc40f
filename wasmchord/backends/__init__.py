"""Backends by name, imported lazily: `import wasmchord` needs no GPU driver."""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging

from ..errors import BackendError

log = logging.getLogger(__name__)

# name -> "module:class"
BACKENDS = {
    "cpu": "wasmchord.backends.numpy_backend:NumpyBackend",
    "gpu": "wasmchord.backends.webgpu:WgpuBackend",
}


_CPU_OPTIONS = ("weights", "activations", "attention_chunk")  # options of the cpu backend; "auto" passes them only to it


def _load(name: str):
    mod, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def get_backend(device="auto", **options):
    """Instantiate a backend: "cpu", "gpu", or "auto" (a hardware GPU if present, else the CPU).
    A `Backend` instance is returned as it is (e.g. a subclass that records intermediate values).

    Raises:
        BackendError: unknown device name, or the GPU is unavailable (the message says what to install).
    """
    from .base import Backend
    if isinstance(device, Backend):
        return device
    _check_options(device, options)
    if device == "auto":
        if _hardware_gpu_present():
            return _load("gpu")(**{k: v for k, v in options.items() if k not in _CPU_OPTIONS})
        log.info("no hardware GPU adapter: using the cpu backend")
        return _load("cpu")(**{k: v for k, v in options.items() if k in _CPU_OPTIONS})
    if device not in BACKENDS:
        raise BackendError(f"unknown device {device!r}; expected one of: auto, {', '.join(BACKENDS)}")
    try:
        cls = _load(device)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("wasmchord.backends.webgpu"):
            raise BackendError("the GPU backend is not part of this build of wasmchord; use device='cpu'") from None
        raise
    return cls(**options)


def _check_options(device, options: dict):
    """TypeError naming an option no backend takes (and the likely intended one), never a backend
    class's own TypeError, nor an option dropped in silence by "auto"."""
    known = set(_CPU_OPTIONS)
    if set(options) - known and device in ("auto", "gpu"):  # the GPU backend's options (imported only then)
        try:
            known |= set(inspect.signature(_load("gpu").__init__).parameters) - {"self"}
        except ModuleNotFoundError:
            pass
    for name in sorted(set(options) - known):
        hint = {"n_ctx": "context_length", "ctx": "context_length", "n_parallel": "slots",
                "n_gpu_layers": 'device="gpu"'}.get(name) or next(iter(difflib.get_close_matches(name, known, 1)), None)
        raise TypeError(f"Model.load got an unexpected keyword argument {name!r}"
                        + (f" (did you mean {hint}?)" if hint else "")
                        + f"; the {device} backend's options are {', '.join(sorted(known))}")


def _hardware_gpu_present() -> bool:
    try:
        _load("gpu")
        from .webgpu.device import find_adapter
    except ModuleNotFoundError:
        return False
    try:
        return find_adapter(allow_software=False) is not None
    except BackendError:
        return False


def gpu_info(gpu_backend: str | None = None) -> str:
    """Adapters wgpu found; the chosen one's backend, limits and features (for `wasmchord info --gpu`)."""
    try:
        from .webgpu.device import describe_adapter
    except ModuleNotFoundError:
        raise BackendError("the GPU backend is not part of this build of wasmchord") from None
    return describe_adapter(gpu_backend)

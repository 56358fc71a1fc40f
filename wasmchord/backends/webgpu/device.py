"""WebGPU adapter and device setup (wgpu-py), the opened device's limits and failure state, buffers.

`device="gpu"` takes any adapter, including a software one (Mesa's lavapipe); `device="auto"` only
a hardware GPU. Shader sources are found next to the package (installed wheel) or at the checkout's
top-level `shaders/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ...errors import BackendError

log = logging.getLogger(__name__)

OPTIONAL_FEATURES = ("shader-f16", "subgroup", "timestamp-query")
NO_ADAPTER = ("no WebGPU adapter found. Install a GPU driver with Vulkan support (Linux: your vendor's "
              "driver, or Mesa's software driver lavapipe: `apt-get install mesa-vulkan-drivers`); "
              "macOS uses Metal and Windows DX12, which need no install")


def shader_dir() -> Path:
    pkg = Path(__file__).resolve().parents[2]  # wasmchord/
    for d in (pkg / "shaders", pkg.parent / "shaders"):
        if (d / "qmatrix.wgsl").is_file():
            return d
    raise BackendError(f"WGSL shaders not found next to {pkg} (expected wasmchord/shaders or ./shaders)")


def _wgpu():
    try:
        import wgpu
    except ImportError as e:
        raise BackendError(f"the GPU backend needs wgpu-py: pip install wgpu ({e})") from None
    return wgpu


def is_software(adapter) -> bool:
    return str(adapter.info.get("adapter_type", "")).upper() == "CPU"


# What a user may require -> wgpu's `backend_type`; without a requirement, wgpu picks (Vulkan, Metal or
# D3D12 where there is one; OpenGL, which runs fewer of the shaders' features, only where there is not).
GPU_BACKENDS = {"vulkan": "Vulkan", "metal": "Metal", "dx12": "D3D12", "opengl": "OpenGL"}


def _label(adapter) -> str:
    info = adapter.info
    return f"{info.get('device')} ({info.get('backend_type')}{', software' if is_software(adapter) else ''})"


def find_adapter(*, allow_software: bool, backend: str | None = None):
    """The high-performance adapter (hardware preferred), or None; `backend` (a key of `GPU_BACKENDS`)
    requires that wgpu backend.

    Raises:
        BackendError: an unknown `backend`, or no adapter on it.
    """
    wgpu = _wgpu()
    if backend is not None:
        if backend not in GPU_BACKENDS:
            raise BackendError(f"unknown GPU backend {backend!r}; expected one of: {', '.join(GPU_BACKENDS)}")
        found = _enumerate(wgpu)
        fit = [a for a in found if a.info.get("backend_type") == GPU_BACKENDS[backend]
               and (allow_software or not is_software(a))]
        if not fit:
            raise BackendError(f"no WebGPU adapter on the {GPU_BACKENDS[backend]} backend; wgpu found: "
                               f"{', '.join(_label(a) for a in found) or 'none'}")
        return sorted(fit, key=is_software)[0]
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as e:  # wgpu-native raises when no backend at all can be loaded
        log.info("request_adapter failed: %s", e)
        adapter = None
    if adapter is not None and not is_software(adapter):
        return adapter
    hardware = [a for a in _enumerate(wgpu) if not is_software(a)]
    if hardware:
        return hardware[0]
    return adapter if allow_software else None


def _enumerate(wgpu) -> list:
    try:
        return list(wgpu.gpu.enumerate_adapters_sync())
    except Exception:
        return []


def open_device(*, allow_software: bool = True, backend: str | None = None):
    """(adapter, device, granted features) or BackendError naming what to install; `backend` as in
    `find_adapter`."""
    adapter = find_adapter(allow_software=allow_software, backend=backend)
    if adapter is None:
        raise BackendError(NO_ADAPTER)
    log.info("WebGPU adapter: %s", _label(adapter))
    if adapter.info.get("backend_type") == "OpenGL" and backend is None:
        log.warning("the GPU backend runs on %s: wgpu found no Vulkan, Metal or D3D12 adapter. OpenGL is the "
                    "least tested path; install a Vulkan driver, or ask for a backend with gpu_backend= "
                    "(--gpu-backend)", _label(adapter))
    features = [f for f in OPTIONAL_FEATURES if f in adapter.features]
    try:
        # Limits not named default to the adapter's maximum in wgpu-py (GPU_NOTES.md).
        device = adapter.request_device_sync(required_features=features)
    except Exception as e:
        raise BackendError(f"could not open the GPU device {adapter.info.get('device')}: {e}") from None
    return adapter, device, features


LIMITS_SHOWN = ("max-storage-buffer-binding-size", "max-buffer-size", "max-compute-workgroup-storage-size",
                "max-compute-invocations-per-workgroup", "max-compute-workgroups-per-dimension",
                "max-storage-buffers-per-shader-stage", "min-uniform-buffer-offset-alignment")


def describe_adapter(backend: str | None = None) -> str:
    adapter, device, features = open_device(allow_software=True, backend=backend)
    info = adapter.info
    lines = [f"adapters  wgpu found: {', '.join(_label(a) for a in _enumerate(_wgpu()))}",
             f"adapter   {info.get('device')} ({info.get('vendor') or 'unknown vendor'})",
             f"type      {info.get('adapter_type')}{' (software: used only with --backend gpu)' if is_software(adapter) else ''}",
             f"backend   {info.get('backend_type')}  {info.get('description', '')}",
             f"features  requested and granted: {', '.join(features) or 'none'}"]
    for k in LIMITS_SHOWN:
        lines.append(f"limit     {k} = {device.limits[k]}")
    return "\n".join(lines)


class Gpu:
    """The opened device with the limits the backend uses, its failure state and buffer allocation.

    A fault (an allocation, a submit, a readback) sticks: every later use raises `BackendError` naming
    the first failure. `gen` counts buffer replacements that invalidate cached bind groups and recorded
    steps (see `invalidate`)."""

    def __init__(self, *, allow_software: bool = True, max_binding_size: int | None = None, backend: str | None = None):
        self.wgpu = _wgpu()
        self.adapter, self.device, self.features = open_device(allow_software=allow_software, backend=backend)
        lim = self.device.limits
        self.max_binding = min(lim["max-storage-buffer-binding-size"], max_binding_size or 2**62)
        self.max_wg = lim["max-compute-workgroups-per-dimension"]
        self.slot_bytes = max(256, lim["min-uniform-buffer-offset-alignment"])
        self.name = _label(self.adapter)
        self.failed: str | None = None
        self.gen = 0
        self.replaced: set | None = set()  # ids of the buffers replaced since the bind-group cache looked; None: unknown

    def check(self):
        if self.failed:
            raise BackendError(f"the GPU backend failed earlier and cannot be used: {self.failed}")

    def fail(self, what, e):
        self.failed = f"{what}: {type(e).__name__}: {e}"
        raise BackendError(self.failed) from None

    def invalidate(self, *replaced):
        """Buffers that cached bind groups (and recorded steps) refer to were replaced. Naming the
        `replaced` ones lets the bind-group cache drop only the groups that hold them; without
        names it drops them all."""
        self.gen += 1
        if replaced and self.replaced is not None:
            self.replaced.update(id(b) for b in replaced)
        else:
            self.replaced = None

    def buffer(self, nbytes, data=None, usage=None):
        """A storage buffer of at least `nbytes` (rounded up to 4, at least 16), optionally filled."""
        U = self.wgpu.BufferUsage
        size = max(16, -(-int(nbytes) // 4) * 4)
        try:
            buf = self.device.create_buffer(size=size, usage=usage or (U.STORAGE | U.COPY_DST | U.COPY_SRC))
            if data is not None:
                self.device.queue.write_buffer(buf, 0, np.ascontiguousarray(data))
        except Exception as e:
            self.fail(f"allocating {size} bytes on the GPU", e)
        return buf

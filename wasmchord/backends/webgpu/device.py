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


def find_adapter(*, allow_software: bool):
    """The high-performance adapter (hardware preferred), or None."""
    wgpu = _wgpu()
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as e:  # wgpu-native raises when no backend at all can be loaded
        log.info("request_adapter failed: %s", e)
        adapter = None
    if adapter is not None and not is_software(adapter):
        return adapter
    try:
        hardware = [a for a in wgpu.gpu.enumerate_adapters_sync() if not is_software(a)]
    except Exception:
        hardware = []
    if hardware:
        return hardware[0]
    return adapter if allow_software else None


def open_device(*, allow_software: bool = True):
    """(adapter, device, granted features) or BackendError naming what to install."""
    adapter = find_adapter(allow_software=allow_software)
    if adapter is None:
        raise BackendError(NO_ADAPTER)
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


def describe_adapter() -> str:
    adapter, device, features = open_device(allow_software=True)
    info = adapter.info
    lines = [f"adapter   {info.get('device')} ({info.get('vendor') or 'unknown vendor'})",
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

    def __init__(self, *, allow_software: bool = True, max_binding_size: int | None = None):
        self.wgpu = _wgpu()
        self.adapter, self.device, self.features = open_device(allow_software=allow_software)
        lim = self.device.limits
        self.max_binding = min(lim["max-storage-buffer-binding-size"], max_binding_size or 2**62)
        self.max_wg = lim["max-compute-workgroups-per-dimension"]
        self.slot_bytes = max(256, lim["min-uniform-buffer-offset-alignment"])
        info = self.adapter.info
        self.name = f"{info.get('device')} ({info.get('backend_type')})"
        self.failed: str | None = None
        self.gen = 0

    def check(self):
        if self.failed:
            raise BackendError(f"the GPU backend failed earlier and cannot be used: {self.failed}")

    def fail(self, what, e):
        self.failed = f"{what}: {type(e).__name__}: {e}"
        raise BackendError(self.failed) from None

    def invalidate(self):
        """Buffers that cached bind groups (and recorded steps) refer to were replaced."""
        self.gen += 1

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

"""wgpu-native's C functions, reached through wgpu-py's cffi bindings where its Python wrappers cost
too much on the hot path (encoding dispatches), wait too long (its buffer mapping polls until *all*
submitted work is done, which defeats encode-ahead), or lack an option (naga's runtime checks).
Every function here has a fallback through the public API when the bindings are not reachable."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

# naga's runtime checks (WGPUShaderRuntimeChecks): bounds checks on every array access, and a
# counter in every loop ("loop bounding"), which keeps drivers from unrolling loops.
CHECKS = {"all": 0x3, "bounds": 0x1, "none": 0x0}


def _ffi():
    """(ffi, lib, wgpu-py's _api module) or None."""
    try:
        from wgpu.backends.wgpu_native import _api
        from wgpu.backends.wgpu_native._ffi import ffi, lib
        for name in ("wgpuComputePassEncoderSetPipeline", "wgpuComputePassEncoderSetBindGroup",
                     "wgpuComputePassEncoderDispatchWorkgroups", "wgpuQueueSubmitForIndex", "wgpuDevicePoll",
                     "wgpuBufferMapAsync", "wgpuBufferGetConstMappedRange", "wgpuBufferUnmap",
                     "wgpuDeviceCreateShaderModuleTrusted"):
            getattr(lib, name)
        _api.new_struct_p, _api.to_c_string_view, _api.GPUShaderModule, _api.libf
    except (ImportError, AttributeError) as e:
        log.info("wgpu-native functions not reachable (%s): using wgpu-py's public API", e)
        return None
    return ffi, lib, _api


class Native:
    """The C entry points the backend uses, bound once."""

    def __init__(self):
        self.ffi, self.lib, self.api = _ffi()

    @classmethod
    def load(cls) -> "Native | None":
        return cls() if _ffi() is not None else None

    def encode(self, cp, ops):
        """set_pipeline / set_bind_group / dispatch for each op, straight into the compute pass.
        Validation errors still surface: wgpu-core marks the encoder invalid and `finish()` raises."""
        lib, null = self.lib, self.ffi.NULL
        set_pipeline, set_bind_group = lib.wgpuComputePassEncoderSetPipeline, lib.wgpuComputePassEncoderSetBindGroup
        dispatch = lib.wgpuComputePassEncoderDispatchWorkgroups
        handle, last = cp._internal, None
        for op in ops:
            if op.pipeline is not last:
                set_pipeline(handle, op.pipeline._internal)
                last = op.pipeline
            set_bind_group(handle, 0, op.bind_group._internal, 0, null)
            dispatch(handle, *op.grid)

    def submit(self, queue, command_buffer) -> int:
        """Submit one command buffer; its submission index."""
        return int(self.api.libf.wgpuQueueSubmitForIndex(queue._internal, 1,
                                                         self.ffi.new("WGPUCommandBuffer[]", [command_buffer._internal])))

    def read_u32s(self, device, buffer, index: int, n: int = 1) -> np.ndarray:
        """Wait for submission `index` only (not for work submitted after it), then map `buffer`
        (MAP_READ) and return its first `n` u32 words."""
        ffi, lib, libf = self.ffi, self.lib, self.api.libf
        dev = device._internal
        libf.wgpuDevicePoll(dev, True, ffi.new("WGPUSubmissionIndex *", index))
        status = []

        @ffi.callback("void(WGPUMapAsyncStatus, WGPUStringView, void *, void *)")
        def done(st, msg, u1, u2):
            status.append(st)

        info = ffi.new("WGPUBufferMapCallbackInfo *")
        info.mode = lib.WGPUCallbackMode_AllowProcessEvents
        info.callback = done
        libf.wgpuBufferMapAsync(buffer._internal, lib.WGPUMapMode_Read, 0, 4 * n, info[0])
        while not status:  # the copy is done, so the mapping resolves at the next poll
            libf.wgpuDevicePoll(dev, False, ffi.NULL)
        if status[0] != lib.WGPUMapAsyncStatus_Success:
            raise RuntimeError(f"could not map the token buffer (status {status[0]})")
        ptr = lib.wgpuBufferGetConstMappedRange(buffer._internal, 0, 4 * n)
        words = np.frombuffer(ffi.buffer(ptr, 4 * n), np.uint32).copy()
        lib.wgpuBufferUnmap(buffer._internal)
        return words

    def shader_module(self, device, label: str, code: str, checks: str):
        """A WGSL module with naga's runtime checks as `checks` names (wgpuDeviceCreateShaderModuleTrusted)."""
        ffi, lib, api = self.ffi, self.lib, self.api
        src = api.new_struct_p("WGPUShaderSourceWGSL *", code=api.to_c_string_view(code))
        src[0].chain.next = ffi.NULL
        src[0].chain.sType = lib.WGPUSType_ShaderSourceWGSL
        desc = api.new_struct_p("WGPUShaderModuleDescriptor *", nextInChain=ffi.cast("WGPUChainedStruct *", src),
                                label=api.to_c_string_view(label))
        handle = api.libf.wgpuDeviceCreateShaderModuleTrusted(device._internal, desc, CHECKS[checks])
        if handle == ffi.NULL:
            raise RuntimeError("shader module creation failed")
        return api.GPUShaderModule(label, handle, device)

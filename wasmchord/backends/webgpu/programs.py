"""Compute pipelines and bind groups, built once and cached.

A `Kernel` is one entry point of a shader module with its override constants, bound by name: the
parameter struct and binding table come from the WGSL (shaders.py), so a dispatch names its
parameters and buffers instead of listing them by position."""

from __future__ import annotations

from dataclasses import dataclass

import logging

from ...errors import BackendError
from . import shaders
from .shaders import PARAM_BYTES

log = logging.getLogger(__name__)

# naga's runtime checks (wgpu-native WGPUShaderRuntimeChecks): bounds checks on every array access,
# and a counter in every loop ("loop bounding", which keeps drivers from unrolling loops and so
# from keeping small arrays in registers).
CHECKS = {"all": 0x3, "bounds": 0x1, "none": 0x0}


def create_module(device, label: str, code: str, checks: str):
    """A shader module with naga's runtime checks as `checks` names ("all" is wgpu's default), through
    wgpu-native's wgpuDeviceCreateShaderModuleTrusted; the public API ("all") where it is unreachable."""
    if checks == "all":
        return device.create_shader_module(label=label, code=code)
    try:
        from wgpu.backends.wgpu_native import _api
        from wgpu.backends.wgpu_native._ffi import ffi, lib
        trusted = _api.libf.wgpuDeviceCreateShaderModuleTrusted
    except (ImportError, AttributeError) as e:
        log.info("trusted shader modules unavailable (%s): naga's runtime checks stay on", e)
        return device.create_shader_module(label=label, code=code)
    src = _api.new_struct_p("WGPUShaderSourceWGSL *", code=_api.to_c_string_view(code))
    src[0].chain.next = ffi.NULL
    src[0].chain.sType = lib.WGPUSType_ShaderSourceWGSL
    desc = _api.new_struct_p("WGPUShaderModuleDescriptor *", nextInChain=ffi.cast("WGPUChainedStruct *", src),
                             label=_api.to_c_string_view(label))
    handle = trusted(device._internal, desc, CHECKS[checks])
    if handle == ffi.NULL:
        raise RuntimeError("shader module creation failed")
    return _api.GPUShaderModule(label, handle, device)


@dataclass(eq=False)
class Kernel:
    shader: str
    entry: str
    label: str            # shader.entry[variant], for the profiler
    pipeline: object
    bind_layout: object
    source: shaders.Source
    slots: tuple          # binding names in bind-group order (after the uniform `p`)


class Programs:
    """Shader modules, pipelines and bind groups of one device. `extra_parts(shader)` names part files
    appended to a module beyond its SHADER_PARTS (e.g. the subgroup matvec when the device has the
    feature)."""

    def __init__(self, gpu, extra_parts=lambda shader: (), checks: str = "all"):
        if checks not in CHECKS:
            raise BackendError(f"shader_checks={checks!r}: expected one of {', '.join(CHECKS)}")
        self.gpu = gpu
        self.extra_parts = extra_parts
        self.checks = checks
        self._sources: dict = {}
        self._modules: dict = {}
        self._kernels: dict = {}
        self._bind_groups: dict = {}
        self._bg_gen = gpu.gen

    def source(self, shader: str) -> shaders.Source:
        src = self._sources.get(shader)
        if src is None:
            src = self._sources[shader] = shaders.load(shader, self.extra_parts(shader))
        return src

    def kernel(self, shader: str, entry: str, buffers, label: str | None = None, **constants) -> Kernel:
        """The pipeline of `entry` with these override constants, laid out for the binding names in
        `buffers` (plus the uniform `p`)."""
        names = tuple(sorted(buffers))
        key = (shader, entry, names, tuple(sorted(constants.items())))
        k = self._kernels.get(key)
        if k is not None:
            return k
        src = self.source(shader)
        gpu, wgpu = self.gpu, self.gpu.wgpu
        mod = self._modules.get(shader)
        if mod is None:
            try:
                mod = create_module(gpu.device, src.parts[0][0].name, src.code, self.checks)
            except Exception as e:
                raise BackendError(src.error(e)) from None
            self._modules[shader] = mod
        slots = tuple(sorted(names, key=lambda n: self._binding(src, n)[0]))
        entries = [{"binding": self._binding(src, n)[0], "visibility": wgpu.ShaderStage.COMPUTE,
                    "buffer": {"type": self._binding(src, n)[1]}} for n in ("p",) + slots]
        bgl = gpu.device.create_bind_group_layout(entries=entries)
        compute = {"module": mod, "entry_point": entry}
        if constants:
            compute["constants"] = constants
        try:
            pipeline = gpu.device.create_compute_pipeline(layout=gpu.device.create_pipeline_layout(
                bind_group_layouts=[bgl]), compute=compute)
        except Exception as e:
            raise BackendError(f"{src.parts[0][0]}: pipeline {entry!r} failed: {e}") from None
        k = self._kernels[key] = Kernel(shader, entry, label or f"{shader}.{entry}", pipeline, bgl, src, slots)
        return k

    @staticmethod
    def _binding(src, name):
        try:
            return src.bindings[name]
        except KeyError:
            raise BackendError(f"{src.parts[0][0]}: no binding named {name!r} "
                               f"(bindings: {', '.join(src.bindings)})") from None

    def bind_group(self, kernel: Kernel, param_buf, offset: int, buffers: dict):
        """The bind group of `kernel` over these buffers with its parameters at `offset` of
        `param_buf`. Keyed by the buffer objects (not id()): the key keeps them alive, so a freed
        buffer's id can never alias a new one. Dropped whenever `gpu.gen` moves."""
        if self._bg_gen != self.gpu.gen:
            self._bind_groups.clear()
            self._bg_gen = self.gpu.gen
        key = (kernel, param_buf, offset, *(buffers[n] for n in kernel.slots))
        bg = self._bind_groups.get(key)
        if bg is None:
            src = kernel.source
            entries = [{"binding": src.bindings["p"][0],
                        "resource": {"buffer": param_buf, "offset": offset, "size": PARAM_BYTES}}]
            entries += [{"binding": src.bindings[n][0], "resource": {"buffer": buffers[n]}} for n in kernel.slots]
            bg = self._bind_groups[key] = self.gpu.device.create_bind_group(layout=kernel.bind_layout, entries=entries)
        return bg

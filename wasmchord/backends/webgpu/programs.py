"""Compute pipelines and bind groups, built once and cached.

A `Kernel` is one entry point of a shader module with its override constants, bound by name: the
parameter struct and binding table come from the WGSL (shaders.py), so a dispatch names its
parameters and buffers instead of listing them by position."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import BackendError
from . import shaders
from .native import CHECKS
from .shaders import PARAM_BYTES


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
    appended to a module beyond its SHADER_PARTS; `checks` the naga runtime checks compiled in
    (native.CHECKS; needs the `native` functions unless "all")."""

    def __init__(self, gpu, native=None, extra_parts=lambda shader: (), checks: str = "all"):
        if checks not in CHECKS:
            raise BackendError(f"shader_checks={checks!r}: expected one of {', '.join(CHECKS)}")
        self.gpu, self.native = gpu, native
        self.extra_parts = extra_parts
        self.checks = checks
        self._sources: dict = {}
        self._modules: dict = {}
        self._kernels: dict = {}
        self._bind_groups: dict = {}
        self._holding: dict[int, set] = {}  # id of a buffer -> the keys of the cached groups that bind it
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
                if self.checks == "all" or self.native is None:  # naga's runtime checks on (wgpu's default)
                    mod = gpu.device.create_shader_module(label=src.parts[0][0].name, code=src.code)
                else:
                    mod = self.native.shader_module(gpu.device, src.parts[0][0].name, src.code, self.checks)
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

    def forget(self):
        """Drop the cached bind groups (and with them the buffers their keys hold)."""
        self._bind_groups.clear()
        self._holding.clear()

    def _drop(self, key):
        """Forget one cached group, also in the sets of the other buffers it binds."""
        self._bind_groups.pop(key, None)
        for b in key[3:]:
            keys = self._holding.get(id(b))
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._holding[id(b)]

    def bind_group(self, kernel: Kernel, param_buf, offset: int, buffers: dict):
        """The bind group of `kernel` over these buffers with its parameters at `offset` of
        `param_buf`. Keyed by the buffer objects (not id()): the key keeps them alive, so a freed
        buffer's id can never alias a new one. When `gpu.gen` moves, the groups that hold a replaced
        buffer are dropped (all of them when the replaced buffers were not named), so that a pass
        that grows its buffers one by one keeps the groups of the others."""
        if self._bg_gen != self.gpu.gen:
            gone = self.gpu.replaced
            if gone is None:
                self.forget()
            for i in gone or ():
                for key in list(self._holding.get(i, ())):
                    self._drop(key)
            self.gpu.replaced = set()
            self._bg_gen = self.gpu.gen
        key = (kernel, param_buf, offset, *(buffers[n] for n in kernel.slots))
        bg = self._bind_groups.get(key)
        if bg is None:
            src = kernel.source
            entries = [{"binding": src.bindings["p"][0],
                        "resource": {"buffer": param_buf, "offset": offset, "size": PARAM_BYTES}}]
            entries += [{"binding": src.bindings[n][0], "resource": {"buffer": buffers[n]}} for n in kernel.slots]
            bg = self._bind_groups[key] = self.gpu.device.create_bind_group(layout=kernel.bind_layout, entries=entries)
            for b in key[3:]:
                self._holding.setdefault(id(b), set()).add(key)
        return bg

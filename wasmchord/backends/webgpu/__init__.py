"""The WebGPU backend (wgpu-py + the WGSL kernels in shaders/), one module per concept:

device    the adapter, the opened device, its limits and failure state, buffers
shaders   WGSL sources, their parts, parameter structs and bindings read from the WGSL
programs  pipelines and bind groups, built once and cached
stream    the command stream: dispatches, one submit per step, capture and replay, profiling
memory    tensor views, the activation arena, KV cache, RoPE tables, the token buffer and readback ring
weights   GGUF blocks repacked into the GPU formats, split across bindings
backend   the ops of the backend interface as dispatches
"""

from .backend import WgpuBackend
from .memory import GTensor

__all__ = ["WgpuBackend", "GTensor"]

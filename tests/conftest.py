"""Shared fixtures: the real models (pulled through our own pull command, cached)."""

import pytest

from wasmchord import hub


def _model(alias):
    # Idempotent: returns at once when `.ci/run` (or an earlier run) has pulled the model.
    return hub.pull(alias)


@pytest.fixture(scope="session")
def smollm2_path():
    return _model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_path():
    return _model("gemma3-270m")


@pytest.fixture(scope="session")
def qwen_path():
    return _model("qwen2.5-coder-1.5b-instruct")


@pytest.fixture(scope="session")
def gpu_backend():
    """A WebGPU backend (lavapipe in CI). With CI set, a missing adapter is a failure, not a skip."""
    import os

    from wasmchord.errors import BackendError
    try:
        from wasmchord.backends.webgpu import WgpuBackend
        return WgpuBackend()
    except BackendError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no WebGPU adapter is available: {e}")
        pytest.skip(f"no WebGPU adapter: {e}")

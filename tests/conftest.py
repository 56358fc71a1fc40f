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

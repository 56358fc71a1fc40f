"""Both real models on both backends, held bit for bit to outputs recorded by tools/record_golden.py:
changes meant to preserve behaviour (refactors) may not move a single logit."""

import json
from pathlib import Path

import pytest

from tools.record_golden import MODELS, key, record  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden.json").read_text())


@pytest.mark.parametrize("alias", MODELS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_outputs_are_bit_identical_to_the_recording(alias, device, request):
    if device == "gpu":
        request.getfixturevalue("gpu_backend")  # a missing adapter fails under CI
    want = GOLDEN.get(key(alias, device), GOLDEN[f"{alias}/{device}"])
    got = record(alias, device)
    assert got["ids"] == want["ids"]
    assert got["last_top_ids"] == want["last_top_ids"]
    assert got["last_top_values"] == want["last_top_values"]
    assert got["logits_sha256"] == want["logits_sha256"]
    assert got["greedy"] == want["greedy"]
    assert got["sampled_seed7"] == want["sampled_seed7"]


def test_cpu_recordings_of_other_blas_kernels_agree_but_for_low_bits():
    """A BLAS kernel family's own recording differs from the first one in the logits' low bits only."""
    for alias in MODELS:
        first = GOLDEN[f"{alias}/cpu"]
        for k, rec in GOLDEN.items():
            if k.startswith(f"{alias}/cpu/"):
                assert rec["ids"] == first["ids"] and rec["last_top_ids"] == first["last_top_ids"], k
                assert rec["greedy"] == first["greedy"] and rec["sampled_seed7"] == first["sampled_seed7"], k
                assert max(abs(a - b) for a, b in zip(rec["last_top_values"], first["last_top_values"])) < 1e-3, k

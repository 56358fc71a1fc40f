"""Model-level fuzzing in CI: a seeded slice of tools/fuzz_model.py's cases (mutated metadata, tokenizer,
chat template and tensors of two tiny converted LLaMAs through Model.load, generate and chat). None may
end in anything but a clean run or a wasmchord error; none may hang (an alarm per case) or run out of
memory (a child process under an address-space limit). The long run: python tools/fuzz_model.py."""

import pytest

from tools.fuzz_model import build_bases, fuzz

CASES = 1000


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return build_bases(tmp_path_factory.mktemp("fuzz"))


def test_mutated_models_end_in_our_errors_or_run(bases):
    s = fuzz(bases, cases=CASES, seed=0, timeout=20, memory_gb=4)
    assert s["cases"] == CASES and s["bad"] == [], s["bad"][:5]
    assert s["counts"].get("ok", 0) > CASES // 10  # most mutations break the file, but not all
    assert sum(n for k, n in s["counts"].items() if k.startswith("error")) > CASES // 2
    assert s["slowest_s"] < 10

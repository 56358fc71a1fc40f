"""Sampling functions against hand-made distributions; seeded reproducibility."""

import numpy as np
import pytest

from wasmchord.errors import GenerationError
from wasmchord.sampling import SamplingParams, apply_penalties, filter_candidates, make_rng, sample, softmax

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32))


def test_top_k_keeps_the_k_largest():
    assert filter_candidates(LOGITS, top_k=2).tolist() == [0, 1]
    assert filter_candidates(LOGITS, top_k=0).tolist() == [0, 1, 2, 3, 4]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    assert filter_candidates(LOGITS, top_p=0.5).tolist() == [0]
    assert filter_candidates(LOGITS, top_p=0.69).tolist() == [0, 1]
    assert filter_candidates(LOGITS, top_p=0.71).tolist() == [0, 1, 2]


def test_min_p_is_relative_to_the_top_probability():
    assert filter_candidates(LOGITS, min_p=0.29).tolist() == [0, 1, 2]  # p >= 0.145
    assert filter_candidates(LOGITS, min_p=0.5).tolist() == [0]


def test_penalties_follow_llama_cpp():
    lg = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    out = apply_penalties(lg, [0, 1, 0], repeat=2.0, presence=0.1, frequency=0.2)
    # token 0: count 2 -> 2/2 - 2*0.2 - 0.1 ; token 1: count 1 -> -2*2 - 0.2 - 0.1
    np.testing.assert_allclose(out, [1.0 - 0.5, -4.0 - 0.3, 1.0, 0.5], rtol=1e-6)
    assert apply_penalties(lg, [0], repeat=1.0) is lg


def test_penalty_window_is_last_n():
    lg = np.ones(4, np.float32)
    out = apply_penalties(lg, [0, 1, 2], repeat=2.0, last_n=1)
    np.testing.assert_allclose(out, [1, 1, 0.5, 1])


def test_greedy_is_argmax_after_penalties():
    p = SamplingParams(temperature=0, repeat_penalty=100.0)
    assert sample(LOGITS, p, make_rng(0), history=[0]) == 1
    assert sample(LOGITS, SamplingParams(temperature=0), make_rng(0)) == 0


def test_sampled_distribution_matches_softmax_over_survivors():
    p = SamplingParams(temperature=0.7, top_k=3, top_p=1.0, min_p=0.0)
    rng = make_rng(1234)
    draws = np.bincount([sample(LOGITS, p, rng) for _ in range(20000)], minlength=5) / 20000
    want = np.zeros(5)
    want[:3] = softmax(LOGITS[:3].astype(np.float64) / 0.7)
    np.testing.assert_allclose(draws, want, atol=0.015)


def test_same_seed_same_draws():
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    a = [sample(LOGITS, p, r) for r in [make_rng(7)] for _ in range(50)]
    b = [sample(LOGITS, p, r) for r in [make_rng(7)] for _ in range(50)]
    assert a == b and len(set(a)) > 1


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                dict(min_p=2.0), dict(repeat_penalty=0.0), dict(temperature=float("nan")),
                                dict(seed="x")])
def test_bad_parameters_are_named(kw):
    with pytest.raises(GenerationError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_a_temperature_below_1e5_is_greedy_and_a_huge_repeat_penalty_is_refused():
    assert SamplingParams(temperature=9.9e-6).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    with pytest.raises(GenerationError, match=r"repeat_penalty = 1e\+39: expected a value in \(0, 1e30\]"):
        SamplingParams(repeat_penalty=1e39)
    lg = np.array([-1.0, -2.0, 0.0], np.float32)  # a zero logit times the largest penalty stays finite
    assert sample(lg, SamplingParams(temperature=0.5, repeat_penalty=1e30), np.random.default_rng(0), [0, 1, 2]) == 2


@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
def test_non_finite_logits_are_an_error_and_masked_ones_are_not(bad):
    """A nan or a +inf anywhere, or nothing above -inf, fails the draw with GenerationError; -inf on
    some tokens (what a constraint's mask leaves out) is a normal draw among the others."""
    rng = np.random.default_rng()
    logits = rng.standard_normal(5000).astype(np.float32)
    i = int(rng.integers(5000))
    if bad == "all -inf":
        logits[:] = -np.inf
    else:
        logits[i] = float(bad)
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0)):
        with pytest.raises(GenerationError, match="no token is allowed" if bad == "all -inf" else "non-finite logits"):
            sample(logits, params, rng)
    ok = rng.standard_normal(5000).astype(np.float32)
    ok[rng.permutation(5000)[:4000]] = -np.inf
    tok = sample(ok, SamplingParams(temperature=1.0), rng)
    assert np.isfinite(ok[tok])
    assert sample(ok, SamplingParams(temperature=0), rng) == int(np.argmax(ok))

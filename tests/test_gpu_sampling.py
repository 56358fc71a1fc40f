"""GPU sampling (sample.wgsl) against the CPU sampler: distributions over many draws (chi-square),
greedy exactness, penalties, seeded reproducibility; and the model API sampling on the GPU."""

import numpy as np
import pytest

from wasmchord.backends.webgpu import GTensor
from wasmchord.sampling import SamplingParams, apply_penalties, filter_candidates, make_rng, sample, softmax

pytestmark = pytest.mark.gpu


def upload(g, a):
    a = np.ascontiguousarray(a, np.float32)
    return GTensor(g.gpu.buffer(a.nbytes, a), 0, a.shape)


def gpu_draws(g, logits, params, n, history=()):
    rng = make_rng(0)
    out = []
    for step in range(n):
        g.begin_forward()
        out.append(g.sample(upload(g, logits), params, rng, list(history), step))
    return np.array(out)


def expected(logits, params, history=()):
    lg = apply_penalties(logits, list(history), repeat=params.repeat_penalty, presence=params.presence_penalty,
                         frequency=params.frequency_penalty, last_n=params.penalty_last_n)
    keep = filter_candidates(lg, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
    p = np.zeros(len(lg))
    p[keep] = softmax(lg[keep].astype(np.float64) / params.temperature)
    return p


def chi_square_ok(draws, p, n):
    """Pearson's chi-square over the cells with expected count >= 5, at the 0.1% level
    (Wilson-Hilferty approximation of the critical value)."""
    counts = np.bincount(draws, minlength=len(p))
    assert counts[p == 0].sum() == 0, "drew a token the filters exclude"
    cells = p * n >= 5
    stat = (((counts[cells] - p[cells] * n) ** 2) / (p[cells] * n)).sum()
    k = cells.sum() - 1
    crit = k * (1 - 2 / (9 * k) + 3.09 * np.sqrt(2 / (9 * k))) ** 3
    return stat < crit, stat, crit


LOGITS = np.log(np.array([0.3, 0.2, 0.15, 0.12, 0.08, 0.06, 0.04, 0.03, 0.015, 0.005], np.float32))


@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
                                dict(temperature=0.7, top_k=5, top_p=1.0, min_p=0.0),
                                dict(temperature=1.3, top_k=0, top_p=0.8, min_p=0.0),
                                dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25),
                                dict(temperature=0.9, top_k=8, top_p=0.9, min_p=0.05)])
def test_gpu_distribution_matches_cpu_sampler(gpu_backend, kw):
    params, n = SamplingParams(**kw), 3000
    ok, stat, crit = chi_square_ok(gpu_draws(gpu_backend, LOGITS, params, n), expected(LOGITS, params), n)
    assert ok, (stat, crit)


def test_cpu_sampler_passes_the_same_check():
    params, n = SamplingParams(temperature=0.9, top_k=8, top_p=0.9, min_p=0.05), 3000
    rng = make_rng(1)
    draws = np.array([sample(LOGITS, params, rng) for _ in range(n)])
    assert chi_square_ok(draws, expected(LOGITS, params), n)[0]


def test_penalties_change_the_same_tokens(gpu_backend):
    params, n, hist = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=3.0,
                                     presence_penalty=0.5, frequency_penalty=0.2), 3000, [0, 0, 1, 4]
    p = expected(LOGITS, params, hist)
    assert p[0] < 0.1  # the penalties really moved the distribution
    assert chi_square_ok(gpu_draws(gpu_backend, LOGITS, params, n, hist), p, n)[0]


def test_greedy_with_penalties_is_exact(gpu_backend):
    rng = np.random.default_rng()
    lg = rng.standard_normal(49152).astype(np.float32)
    hist = [int(np.argmax(lg))] * 3
    params = SamplingParams(temperature=0, repeat_penalty=1.5)
    want = sample(lg, params, make_rng(0), hist)
    assert gpu_draws(gpu_backend, lg, params, 1, hist)[0] == want


def test_same_seed_same_tokens_on_the_gpu(gpu_backend):
    from wasmchord import Model
    m = Model.load("smollm2-135m-instruct", device="gpu", context_length=64)
    a = m.generate("Once upon a time", max_tokens=6, temperature=1.0, seed=11).tokens
    b = m.generate("Once upon a time", max_tokens=6, temperature=1.0, seed=11).tokens
    assert a == b
    calls = []
    orig = m.backend.read
    m.backend.read = lambda x: calls.append(x) or orig(x)
    try:
        m.generate("Once upon a time", max_tokens=3, temperature=0.8, seed=2)
    finally:
        m.backend.read = orig
    assert calls == []  # sampling ran on the GPU: no logits came back


# Gemma's vocabulary (262144) with a peaked head and a long tail: the candidates above the top-k and
# min-p thresholds are gathered into workgroup memory (a large vocabulary once drew no token at
# all here); then a head above a flat tail of 3000 with neither top-k nor min-p, more candidates
# than fit, which takes the whole-vocabulary path (at SmolLM2's vocabulary that path once crashed the
# process: WGSL's select() read the candidates' array at every index of the vocabulary).
@pytest.mark.parametrize("vocab,head,kw", [
    (262144, 12, dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)),
    (262144, 12, dict(temperature=0.9, top_k=20, top_p=0.95, min_p=0.0)),
    (3000, 6, dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0)),
    (49152, 6, dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)),  # SmolLM2's vocabulary, no filter at all:
    (49152, 6, dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0)),  # once read workgroup memory out of bounds
])
def test_large_vocabularies_match_cpu_sampler(gpu_backend, vocab, head, kw):
    rng = np.random.default_rng()
    lg = (rng.standard_normal(vocab) * 0.5 - 4).astype(np.float32)
    top = rng.choice(vocab, head, replace=False)
    lg[top] = np.linspace(3.0, 1.0, head) + rng.standard_normal(head).astype(np.float32) * 0.1
    params, n = SamplingParams(**kw), 1000  # cells of the head expect >= 5 draws (the test's own rule)
    ok, stat, crit = chi_square_ok(gpu_draws(gpu_backend, lg, params, n), expected(lg, params), n)
    assert ok, (stat, crit)


@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
                                dict(temperature=0.5, top_k=0, top_p=0.9, min_p=0.05)])
def test_a_repeat_penalty_that_overflows_the_logits_still_draws(gpu_backend, kw):
    # A positive logit divided by 1e-39 passes float32's range: capped at the largest float (not +inf,
    # which made the top-p mass and the draw NaN), so the penalized token is the one drawn, on both.
    lg = (LOGITS + 6).astype(np.float32)
    params = SamplingParams(repeat_penalty=1e-39, **kw)
    p = expected(lg, params, [3])
    assert p[3] == 1.0
    assert (gpu_draws(gpu_backend, lg, params, 50, [3]) == 3).all()
    rng = make_rng(1)
    assert all(sample(lg, params, rng, [3]) == 3 for _ in range(20))


def test_a_tiny_temperature_is_argmax_on_the_gpu(gpu_backend):
    # f32(1e-40) is a subnormal or zero: dividing by it in the kernel gave inf and NaN.
    rng = np.random.default_rng()
    for _ in range(5):
        lg = rng.standard_normal(49152).astype(np.float32) * 5
        got = gpu_draws(gpu_backend, lg, SamplingParams(temperature=1e-40, top_k=0, top_p=1.0, min_p=0.0), 3)
        assert (got == int(np.argmax(lg))).all()


def test_a_penalty_never_brings_back_a_masked_token(gpu_backend):
    # A masked token sits at -3.4e38; a repeat penalty of 1e-39 would have made it about -0.34, above
    # every allowed logit here.
    lg = np.full(64, -50.0, np.float32)
    lg[7] = 3.0                                   # the best token, masked out and in the history
    words = np.full(2, -1, np.int32)
    words[0] &= ~np.int32(1 << 7)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1e-39)
    rng = make_rng(0)
    for step in range(20):
        gpu_backend.begin_forward()
        assert gpu_backend.sample(upload(gpu_backend, lg), params, rng, [7], step, mask=words) != 7

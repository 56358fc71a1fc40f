"""The CPU backend's compiled small ops (`cpu_ops`: RMSNorm, SwiGLU, GeGLU, the attention of one new position
per sequence) against NumPy: float64 for the elementwise ops, the f32 backend's NumPy attention (one
sequence at a time, or its batched form) for the attention, with fresh random inputs each run."""

import numpy as np
import pytest
from numba import njit

from wasmchord.backends import cpu_ops
from wasmchord.backends.numpy_backend import NumpyBackend

REF = NumpyBackend(weights="f32")   # plain NumPy
OPS = NumpyBackend(weights="quantized")


def copy_cache(cache):
    out = REF.alloc_kv_cache(len(cache.k_all), cache.k_all[0].shape[1], cache.max_ctx, cache.k_all[0].shape[3],
                             cache.v_all[0].shape[3], slots=cache.slots)
    for a, b in zip(out.k_all + out.v_all, cache.k_all + cache.v_all):
        a[:] = b
    return out


@pytest.mark.parametrize("rows", [1, 3, cpu_ops.PARALLEL_ROWS + 5])
def test_rmsnorm_matches_float64(rows):
    rng = np.random.default_rng()
    x = (rng.standard_normal((rows, 576)) * rng.uniform(0.01, 100)).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    got = OPS.rmsnorm(x, w, 1e-5)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6 * np.abs(want).max())


def test_rmsnorm_of_heads_keeps_the_shape():
    """qk-norm: [n, heads, hd] normalized per head."""
    rng = np.random.default_rng()
    x = rng.standard_normal((5, 4, 32)).astype(np.float32)
    w = rng.standard_normal(32).astype(np.float32)
    np.testing.assert_allclose(OPS.rmsnorm(x[:, 1:3], w, 1e-6), REF.rmsnorm(x[:, 1:3], w, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 8, cpu_ops.PARALLEL_ROWS])
def test_swiglu_matches_float64(rows):
    rng = np.random.default_rng()
    gu = (rng.standard_normal((rows, 2 * 1536)) * 8).astype(np.float32)
    gu[0, :6] = [0, -0.0, 90, -90, 200, -200]                 # exp(-g) past float32's range both ways
    got = OPS.swiglu(gu)
    g, u = gu[:, :1536].astype(np.float64), gu[:, 1536:].astype(np.float64)
    with np.errstate(over="ignore"):
        want = g / (1 + np.exp(-g)) * u
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("rows", [1, 8, cpu_ops.PARALLEL_ROWS])
def test_geglu_matches_float64(rows):
    """GELU (tanh form) of the gate times the up half, against float64 and within float32 rounding of
    NumPy's float32 form (the f32 backend's)."""
    rng = np.random.default_rng()
    gu = (rng.standard_normal((rows, 2 * 2048)) * 4).astype(np.float32)
    gu[0, :8] = [0, -0.0, 12, -12, 90, -90, 1e4, -1e4]       # tanh saturated both ways, g^3 past e^88
    got = OPS.geglu(gu)
    g, u = gu[:, :2048].astype(np.float64), gu[:, 2048:].astype(np.float64)
    with np.errstate(over="ignore"):  # g sigmoid(2u): the tanh form cancels to 0 in the negative tail
        want = g / (1 + np.exp(-2 * np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * u
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)  # u's rounding, times up to 87 in the exponent
    np.testing.assert_allclose(got, REF.geglu(gu), rtol=1e-5, atol=1e-6 * np.abs(want).max())


@njit
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = cpu_ops._exp_nonpositive(x[i])


def test_exp_within_two_ulp_of_float64():
    rng = np.random.default_rng()
    x = np.concatenate([-rng.random(100_000) * 87, [0.0, -1e-30, -87.0, -87.5, -1000.0]]).astype(np.float32)
    got = np.empty_like(x)
    _exp_all(x, got)
    want = np.exp(x.astype(np.float64))
    normal = x >= -87
    np.testing.assert_allclose(got[normal], want[normal], rtol=2 * 2.0 ** -23, atol=0)
    assert (got[~normal] == 0).all()


def attention_case(rng, B, H, kv, hd, ctx, positions=None):
    slots = rng.permutation(B + 2)[:B]                  # rows land in slots out of order; two slots unused
    if positions is None:                                # far apart and close together
        positions = np.where(rng.random(B) < 0.3, rng.integers(0, ctx - 100, B), rng.integers(0, 40, B))
    cache = OPS.alloc_kv_cache(1, kv, ctx, hd, hd, slots=B + 2)
    for a in (cache.k_all[0], cache.v_all[0]):
        a[:] = rng.standard_normal(a.shape, dtype=np.float32)
    for a in (cache.k_all[0], cache.v_all[0]):           # what the step writes: poisoned beforehand
        a[slots, :, positions] = np.nan
    q, k, v = (rng.standard_normal((B, h, hd), dtype=np.float32) * 2 for h in (H, kv, kv))
    return cache, slots, positions, q, k, v


CONFIGS = [dict(H=9, kv=3, hd=64, neox=False, qk=False, window=0),     # SmolLM2
           dict(H=4, kv=1, hd=256, neox=True, qk=True, window=0),      # Gemma-3's global layers
           dict(H=4, kv=1, hd=256, neox=True, qk=True, window=37),     # and its sliding-window ones
           dict(H=12, kv=2, hd=128, neox=True, qk=False, window=0)]    # Qwen2.5 (partial: n_rot 64 below)


@pytest.mark.parametrize("B", [1, 2, 3, 8, 17])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["smollm2", "gemma3", "gemma3-window", "qwen2"])
def test_decode_attention_matches_numpy_one_sequence_at_a_time(B, cfg):
    """The batched step's kernel against the f32 backend's NumPy attention run per row: outputs and
    the K/V rows written (rotated k)."""
    rng = np.random.default_rng()
    H, kv, hd = cfg["H"], cfg["kv"], cfg["hd"]
    rope = dict(base=10000.0, n_rot=hd if cfg["H"] != 12 else 64, scale=1.0, neox=cfg["neox"])
    norm = (rng.standard_normal(hd).astype(np.float32), rng.standard_normal(hd).astype(np.float32), 1e-6) \
        if cfg["qk"] else None
    cache, slots, positions, q, k, v = attention_case(rng, B, H, kv, hd, 1200)
    ref = copy_cache(cache)
    want = np.concatenate([REF.attend(q[b:b + 1].copy(), k[b:b + 1].copy(), v[b:b + 1], ref.slot(int(s)), 0, int(p),
                                      rope=rope, scale=hd ** -0.5, window=cfg["window"], qk_norm=norm)
                           for b, (s, p) in enumerate(zip(slots, positions))])
    got = OPS.attend_batch(q, k, v, cache, 0, positions, slots, rope=rope, scale=hd ** -0.5, window=cfg["window"],
                           qk_norm=norm)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in ((cache.k_all[0], ref.k_all[0]), (cache.v_all[0], ref.v_all[0])):
        assert np.isfinite(a[slots, :, positions]).all()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_decode_attention_of_one_sequence_matches_numpy():
    """`attend` of one new position (a sequence's own decode) takes the kernel too."""
    rng = np.random.default_rng()
    cache, slots, positions, q, k, v = attention_case(rng, 1, 9, 3, 64, 300)
    ref = copy_cache(cache)
    rope = dict(base=10000.0, n_rot=64, scale=1.0, neox=False)
    s, p = int(slots[0]), int(positions[0])
    got = OPS.attend(q.copy(), k.copy(), v, cache.slot(s), 0, p, rope=rope, scale=0.125)
    want = REF.attend(q.copy(), k.copy(), v, ref.slot(s), 0, p, rope=rope, scale=0.125)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.k_all[0], ref.k_all[0], rtol=1e-5, atol=1e-5)


def test_numpy_batched_attention_matches_numpy_one_sequence_at_a_time():
    """The f32 backend's own batched form (rows grouped by length, padded positions masked)."""
    rng = np.random.default_rng()
    cache, slots, positions, q, k, v = attention_case(rng, 17, 4, 2, 64, 1200)
    ref = copy_cache(cache)
    rope = dict(base=10000.0, n_rot=64, scale=1.0, neox=True)
    want = np.concatenate([REF.attend(q[b:b + 1].copy(), k[b:b + 1].copy(), v[b:b + 1], ref.slot(int(s)), 0, int(p),
                                      rope=rope, scale=0.125, window=37)
                           for b, (s, p) in enumerate(zip(slots, positions))])
    got = REF.attend_batch(q.copy(), k.copy(), v, cache, 0, positions, slots, rope=rope, scale=0.125, window=37)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("be", [REF, OPS], ids=["numpy", "compiled"])
def test_a_slot_left_with_non_finite_values_does_not_reach_a_shorter_row(be):
    """A failed request can leave inf/nan K/V past a new owner's position in its slot: no row reads
    them."""
    rng = np.random.default_rng()
    positions = np.array([20, 3])
    cache, slots, _, q, k, v = attention_case(rng, 2, 4, 2, 32, 64, positions=positions)
    cache.k_all[0][slots[1], :, 5:] = np.nan
    cache.v_all[0][slots[1], :, 5:] = np.inf
    got = be.attend_batch(q, k, v, cache, 0, positions, slots,
                          rope=dict(base=10000.0, n_rot=32, scale=1.0, neox=False), scale=32 ** -0.5)
    assert np.isfinite(got).all()


def test_a_non_finite_query_gives_nan_for_its_heads_only():
    """An inf in a query makes its head's scores non-finite: that head's output is nan (as NumPy's
    softmax gives), the other sequences' rows stay finite."""
    rng = np.random.default_rng()
    cache, slots, positions, q, k, v = attention_case(rng, 2, 4, 2, 32, 64, positions=np.array([10, 12]))
    q[0, 1, 3] = np.inf
    got = OPS.attend_batch(q, k, v, cache, 0, positions, slots,
                           rope=dict(base=10000.0, n_rot=32, scale=1.0, neox=False), scale=32 ** -0.5)
    heads = got.reshape(2, 4, 32)
    assert np.isnan(heads[0, 1]).all()
    assert np.isfinite(heads[0, [0, 2, 3]]).all() and np.isfinite(heads[1]).all()


@pytest.mark.parametrize("n, pos0", [(2, 0), (32, 0), (17, 200), (64, 0), (100, 0)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["smollm2", "gemma3", "gemma3-window", "qwen2"])
def test_short_prefill_attend_matches_numpy(n, pos0, cfg):
    """`attend` of several new positions of one sequence: up to COMPILED_ATTENTION (query x key
    positions x heads x head size) through the compiled rows (every row's K/V written first, then each row causal over
    them), above through NumPy's products; both against the f32 backend: outputs and the cache."""
    from wasmchord.backends import numpy_backend
    rng = np.random.default_rng()
    H, kv, hd = cfg["H"], cfg["kv"], cfg["hd"]
    rope = dict(base=10000.0, n_rot=hd if H != 12 else 64, scale=1.0, neox=cfg["neox"])
    norm = (rng.standard_normal(hd).astype(np.float32), rng.standard_normal(hd).astype(np.float32), 1e-6) \
        if cfg["qk"] else None
    cache = OPS.alloc_kv_cache(1, kv, pos0 + n + 5, hd, hd, slots=3)
    for a in (cache.k_all[0], cache.v_all[0]):
        a[:] = rng.standard_normal(a.shape, dtype=np.float32)
        a[1, :, pos0:pos0 + n] = np.nan                   # what the rows write: poisoned beforehand
    ref = copy_cache(cache)
    q, k, v = (rng.standard_normal((n, h, hd), dtype=np.float32) * 2 for h in (H, kv, kv))
    compiled = n * (pos0 + n) * H * hd <= numpy_backend.COMPILED_ATTENTION
    assert compiled if n <= 32 and pos0 == 0 else not compiled if n == 100 else True  # the cases span the threshold
    got = OPS.attend(q.copy(), k.copy(), v, cache.slot(1), 0, pos0, rope=rope, scale=hd ** -0.5,
                     window=cfg["window"], qk_norm=norm)
    want = REF.attend(q.copy(), k.copy(), v, ref.slot(1), 0, pos0, rope=rope, scale=hd ** -0.5,
                      window=cfg["window"], qk_norm=norm)
    assert np.isfinite(got).all()
    # scores reach ~30 here: their float32 rounding (1e-7 relative, summed in another order) moves the
    # softmax by a few 1e-6 relative, of outputs up to ~5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for a, b in ((cache.k_all[0], ref.k_all[0]), (cache.v_all[0], ref.v_all[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_subclass_that_overrides_attention_sees_every_prompt():
    """The compiled short-prompt path bypasses `attention`: a backend subclass that overrides it (to
    record the weights, as examples/04 does) still gets short prompts through it; decode stays compiled."""
    calls = []

    class Recording(NumpyBackend):
        def attention(self, q, cache, layer, pos0, *, scale, window=0):
            calls.append(q.shape[0])
            return super().attention(q, cache, layer, pos0, scale=scale, window=window)
    rng = np.random.default_rng()
    rec = Recording(weights="quantized")
    cache = rec.alloc_kv_cache(1, 3, 64, 64, 64)
    rope = dict(base=10000.0, n_rot=64, scale=1.0, neox=False)
    q, k, v = (rng.standard_normal((5, h, 64), dtype=np.float32) for h in (9, 3, 3))
    got = rec.attend(q.copy(), k.copy(), v, cache.slot(0), 0, 0, rope=rope, scale=0.125)
    assert calls == [5]
    want = OPS.attend(q.copy(), k.copy(), v, OPS.alloc_kv_cache(1, 3, 64, 64, 64).slot(0), 0, 0, rope=rope,
                      scale=0.125)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    rec.attend(q[:1].copy(), k[:1].copy(), v[:1], cache.slot(0), 0, 5, rope=rope, scale=0.125)
    assert calls == [5]


def prefill_case(rng, n, pos0, H=12, kv=2, hd=32):
    cache = OPS.alloc_kv_cache(1, kv, pos0 + n, hd, hd)
    for a in (cache.k[0], cache.v[0]):
        a[:] = rng.standard_normal(a.shape, dtype=np.float32)
    return cache, rng.standard_normal((n, H, hd), dtype=np.float32) * 2


@pytest.mark.parametrize("n, pos0, window", [(1, 0, 0), (1, 40, 0), (7, 0, 0), (37, 15, 0), (300, 20, 0),
                                             (300, 20, 64), (70, 100, 9), (600, 0, 0)])
def test_prefill_attention_with_the_compiled_softmax_matches_numpy(n, pos0, window):
    """Prompt attention (several query rows) with the compiled mask and softmax against the f32 backend's
    NumPy mask, max, exp, sum and division: causal from the first position or after earlier ones,
    sliding windows shorter than the rows, more rows than one chunk."""
    rng = np.random.default_rng()
    cache, q = prefill_case(rng, n, pos0)
    got = OPS.attention(q, cache, 0, pos0, scale=32 ** -0.5, window=window)
    want = REF.attention(q, cache, 0, pos0, scale=32 ** -0.5, window=window)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_causal_softmax_zeroes_what_a_row_may_not_see():
    """Row i (position pos0 + i) keeps keys t0 .. its own position, within the window; the rest is 0 and
    each row sums to 1."""
    rng = np.random.default_rng()
    s = rng.standard_normal((3, 6, 20), dtype=np.float32) * 4
    cpu_ops.causal_softmax(s, 10, 0, 5)              # keys 0..19; queries 10..15, window 5
    for i in range(6):
        p = 10 + i
        seen = np.zeros(20, bool)
        seen[p - 4:p + 1] = True
        assert (s[:, i, ~seen] == 0).all() and (s[:, i, seen] > 0).all()
    np.testing.assert_allclose(s.sum(-1), 1, rtol=1e-6)


def test_a_non_finite_query_row_gives_nan_for_that_row_and_head_only():
    rng = np.random.default_rng()
    cache, q = prefill_case(rng, 9, 4)
    q[3, 5, 0] = np.inf
    got = OPS.attention(q, cache, 0, 4, scale=32 ** -0.5).reshape(9, 12, 32)
    with np.errstate(invalid="ignore"):
        want = REF.attention(q, cache, 0, 4, scale=32 ** -0.5).reshape(9, 12, 32)
    assert np.isnan(got[3, 5]).all() and np.isnan(want[3, 5]).all()
    bad = np.zeros((9, 12), bool)
    bad[3, 5] = True
    assert np.isfinite(got[~bad]).all()
    np.testing.assert_allclose(got[~bad], want[~bad], rtol=1e-5, atol=1e-5)

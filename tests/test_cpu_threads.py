"""The CPU backend's threads: BLAS kept to one thread while the compiled kernels run (their pools
contend), prefill attention split over a thread per core with the serial result."""

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import wasmchord
from wasmchord.backends import blas
from wasmchord.backends.numpy_backend import KVCache, NumpyBackend


def blas_threads() -> list[int]:
    """Thread counts of the BLAS libraries loaded with NumPy (others, such as SciPy's, may load later)."""
    ours = {lib.filepath for lib in blas._blas_libs()}
    return [lib["num_threads"] for lib in threadpool_info() if lib["filepath"] in ours]


@pytest.fixture
def two_blas_threads():
    """BLAS on two threads (as on a 2+ core machine), whatever this machine gives it."""
    libs = blas._blas_libs()
    assert any("numpy" in lib.filepath for lib in libs), "threadpoolctl finds NumPy's BLAS"
    saved = [lib.num_threads for lib in libs]
    for lib in libs:
        lib.set_num_threads(2)
    yield
    for lib, n in zip(libs, saved):
        lib.set_num_threads(n)


def test_serial_sets_one_blas_thread_and_restores_it(two_blas_threads):
    assert set(blas_threads()) == {2}
    with blas.serial():
        assert set(blas_threads()) == {1}
        with blas.serial():  # nested
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {1}
    assert set(blas_threads()) == {2}
    with pytest.raises(KeyError):
        with blas.serial():
            raise KeyError("the body fails")
    assert set(blas_threads()) == {2}


def test_overlapping_users_keep_one_thread_until_the_last_leaves(two_blas_threads):
    inside, leave, left = threading.Event(), threading.Event(), threading.Event()

    def other():
        with blas.serial():
            inside.set()
            leave.wait(10)
        left.set()
    t = threading.Thread(target=other)
    with blas.serial():
        t.start()
        assert inside.wait(10)
        leave.set()
        assert left.wait(10)
        assert set(blas_threads()) == {1}  # the other user left; this one is still inside
    t.join(10)
    assert set(blas_threads()) == {2}


@pytest.mark.parametrize("weights, expected", [("quantized", {1}), ("f32", {2})])
def test_a_forward_pass_runs_with_one_blas_thread_only_beside_the_kernels(smollm2_path, two_blas_threads,
                                                                           monkeypatch, weights, expected):
    seen = []
    attend = NumpyBackend._attend

    def probe(*args):
        seen.append(tuple(blas_threads()))
        return attend(*args)
    monkeypatch.setattr(NumpyBackend, "_attend", staticmethod(probe))
    m = wasmchord.Model.load(smollm2_path, device="cpu", weights=weights, context_length=256)
    m.logits(list(range(1, 161)))  # long enough for NumPy's attention (shorter prompts take the compiled one)
    assert seen and {n for s in seen for n in s} == expected
    assert set(blas_threads()) == {2}


@pytest.mark.parametrize("n, pos0, window", [(1, 40, 0), (37, 0, 0), (300, 20, 0), (300, 20, 64), (700, 0, 0)])
def test_threaded_prefill_attention_equals_one_thread(n, pos0, window):
    """Pieces of query rows on the pool (pieces of a chunk, chunks beyond 512) give the serial result."""
    rng = np.random.default_rng()
    be = NumpyBackend(weights="quantized")
    assert be._pool is not None or pytest.skip("one core: no pool")
    H, kv, hd = 6, 2, 16
    cache = KVCache(1, kv, pos0 + n, hd, hd)
    cache.k[0][:] = rng.standard_normal(cache.k[0].shape, dtype=np.float32)
    cache.v[0][:] = rng.standard_normal(cache.v[0].shape, dtype=np.float32)
    q = rng.standard_normal((n, H, hd), dtype=np.float32)
    threaded = be.attention(q, cache, 0, pos0, scale=0.25, window=window)
    be._pool = None
    serial = be.attention(q, cache, 0, pos0, scale=0.25, window=window)
    assert np.isfinite(threaded).all()
    np.testing.assert_allclose(threaded, serial, rtol=1e-5, atol=1e-6)


def test_only_a_backend_with_kernel_matrices_holds_blas_to_one_thread(two_blas_threads):
    """Float32 matrices (an F32 file) are multiplied by BLAS, which then keeps its threads."""
    from test_cpu_kernels import source
    rng = np.random.default_rng()
    be = NumpyBackend(weights="quantized")
    be.load_matrix([source("F32", 64, 64, rng)])
    with be.forward_scope():
        assert set(blas_threads()) == {2}
    be.load_matrix([source("Q8_0", 64, 64, rng)])
    with be.forward_scope():
        assert set(blas_threads()) == {1}
    assert set(blas_threads()) == {2}

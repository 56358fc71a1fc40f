"""The CPU backend's compiled kernels against NumPy dequantization + matmul, on random valid blocks of
every type, through each path a matrix product takes (one token; several, in tiles), and the
kernels' disk cache from a read-only install."""

import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from test_quants import random_raw
from wasmchord.backends import cpu_kernels as K
from wasmchord.backends.base import WeightSource
from wasmchord.backends.quantized import QuantMatrix
from wasmchord.errors import UnsupportedError
from wasmchord.formats.quants import dequantize, ggml_type

KERNEL_TYPES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
ROOT = Path(__file__).resolve().parent.parent


def source(name, rows, k, rng, label="w"):
    t = ggml_type(name)
    return WeightSource(label, random_raw(t, (rows, k), rng), t, (rows, k))


def reference(parts):
    return np.concatenate([dequantize(p.raw, p.qtype, p.shape) for p in parts])


def close(got, want, tol=2e-6):
    """Float32 sums in another order: relative to the largest output."""
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def test_every_kernel_type_is_tested():
    assert K.KERNEL_TYPES == set(KERNEL_TYPES)


@pytest.mark.parametrize("name", KERNEL_TYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 9])  # one or two tokens (matvec); more (matmul: padded blocks)
def test_matmul_matches_numpy_dequantize_and_matmul(name, n):
    """150 rows: two whole groups of 64 and a padded one; k: three chunks of columns, or 2.25."""
    rng = np.random.default_rng()
    k = 3 * K.CHUNK if ggml_type(name).block_size == 256 else 9 * K.CHUNK // 4
    parts = [source(name, 150, k, rng)]
    x = rng.standard_normal((n, k)).astype(np.float32)
    close(QuantMatrix(parts).matmul(x, np.empty(1, np.float32)), x @ reference(parts).T)


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_float_types_take_rows_of_any_length(name):
    rng = np.random.default_rng()
    parts = [source(name, 5, 32 * 3 + 7, rng)]
    for n in (1, 4):
        x = rng.standard_normal((n, 103)).astype(np.float32)
        close(QuantMatrix(parts).matmul(x, np.empty(1024, np.float32)), x @ reference(parts).T)


def test_stacked_parts_of_mixed_types_share_one_product():
    """Q/K/V-style stacking: runs of one type are multiplied together, each into its own columns;
    parts that start inside a group of rows (40 + 8) and parts that start one (64 + 70)."""
    rng = np.random.default_rng()
    parts = [source("Q4_K", 40, 256, rng), source("Q4_K", 8, 256, rng), source("Q6_K", 64, 256, rng),
             source("Q6_K", 70, 256, rng), source("F32", 3, 256, rng)]
    W = QuantMatrix(parts)
    assert [(r.qtype, r.rows) for r in W.runs] == [("Q4_K", 48), ("Q6_K", 134), ("F32", 3)]
    for n in (1, 6):
        x = rng.standard_normal((n, 256)).astype(np.float32)
        close(W.matmul(x, np.empty(K.R * 256, np.float32)), x @ reference(parts).T)


@pytest.mark.parametrize("name", KERNEL_TYPES)
def test_tiles_decode_exactly_what_numpy_decodes(name):
    """Prefill tiles are float32 columns, bit for bit the values formats/quants.py decodes."""
    rng = np.random.default_rng()
    k = 512 if ggml_type(name).block_size == 256 else 96
    (src,) = parts = [source(name, 130, k, rng)]
    (run,) = QuantMatrix(parts).runs
    tile = np.full((k, 2 * K.R), np.nan, np.float32)
    K.dequantize(K.marker(name), run.t, 1, tile)       # groups 1 and 2: rows 64..129 and padding
    np.testing.assert_array_equal(tile[:, :66].T, reference(parts)[64:])
    assert (tile[:, 66:] == 0).all()


@pytest.mark.parametrize("name", KERNEL_TYPES)
def test_dequantized_rows_are_bit_identical_to_numpy(name):
    """Embedding lookups and prefill tiles decode exactly as formats/quants.py does."""
    rng = np.random.default_rng()
    k = 512 if ggml_type(name).block_size == 256 else 96
    parts = [source(name, 21, k, rng)]
    ids = np.array([3, 0, 20, 3, 11])
    np.testing.assert_array_equal(QuantMatrix(parts).rows(ids), reference(parts)[ids])


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K"])
def test_types_without_a_kernel_are_dequantized_at_load(name, caplog):
    rng = np.random.default_rng()
    parts = [source(name, 9, 256, rng, label="blk.0.ffn_up.weight")]
    with caplog.at_level(logging.WARNING):
        W = QuantMatrix(parts)
    assert f"no {name} kernel" in caplog.text and "blk.0.ffn_up.weight" in caplog.text
    x = rng.standard_normal((2, 256)).astype(np.float32)
    close(W.matmul(x, np.empty(256, np.float32)), x @ reference(parts).T)


def test_type_without_a_decoder_is_a_clear_error():
    t = ggml_type("IQ2_XXS")
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        QuantMatrix([WeightSource("blk.0.attn_q.weight", np.zeros(66, np.uint8), t, (1, 256))])


def test_non_finite_half_scales_stay_non_finite():
    """A block whose f16 scale is inf or nan decodes to inf/nan, as NumPy's decoder does."""
    t = ggml_type("Q8_0")
    raw = np.zeros((2, 34), np.uint8)
    raw[0, :2] = np.array([np.inf], np.float16).view(np.uint8)
    raw[1, :2] = np.array([np.nan], np.float16).view(np.uint8)
    raw[:, 2:] = 3
    (run,) = QuantMatrix([WeightSource("w", raw.reshape(-1), t, (2, 32))]).runs
    tile = np.empty((32, K.R), np.float32)
    K.dequantize(K.marker("Q8_0"), run.t, 0, tile)
    assert np.isposinf(tile[:, 0]).all() and np.isnan(tile[:, 1]).all()


# ---------------------------------------------------------------------------- the disk cache

CACHE_PROBE = textwrap.dedent("""
    import numpy as np, wasmchord.backends.cpu_kernels as K
    t = np.zeros((1, 34 * K.R), np.uint8)
    out = np.empty(K.R, np.float32)
    K.matvec(K.marker("Q8_0"), t, 32, np.ones(32, np.float32), out)
    print(K.__file__, sum(K.matvec.stats.cache_hits.values()), sum(K.matvec.stats.cache_misses.values()))
""")


@contextmanager
def read_only_copy(src: Path, top: Path):
    """A copy of the package directory `src` that this process cannot write: by permissions, or (root
    ignores permissions) through a read-only bind mount."""
    site = top / "site"
    shutil.copytree(src, top / "copy" / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    if os.geteuid() != 0:
        for p in [top / "copy", *(top / "copy").rglob("*")]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield top / "copy"
        finally:
            for p in [top / "copy", *(top / "copy").rglob("*")]:
                p.chmod(p.stat().st_mode | stat.S_IWUSR)
        return
    site.mkdir()
    mount = subprocess.run(["mount", "--bind", str(top / "copy"), str(site)], capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"as root, a read-only location needs a bind mount: {mount.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(site)], check=True)
        yield site
    finally:
        subprocess.run(["umount", str(site)], check=True)


@pytest.mark.slow
def test_kernels_compile_once_and_load_from_cache_when_installed_read_only(tmp_path):
    """A read-only package directory: numba falls back to its user-wide cache directory, and a second
    process loads the compiled kernel from there instead of compiling it again."""
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    with read_only_copy(ROOT / "wasmchord", tmp_path) as site:
        env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(cache))
        runs = [subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=600) for _ in range(2)]
        for r in runs:
            assert r.returncode == 0, r.stderr
        assert not list(site.rglob("*.nbi"))   # nothing written beside the read-only module,
    assert list(cache.rglob("*.nbi"))          # but in the user-wide cache
    (path1, hits1, misses1), (path2, hits2, misses2) = (r.stdout.split() for r in runs)
    assert path1.startswith(str(site)) and (int(hits1), int(misses1)) == (0, 1)
    assert (int(hits2), int(misses2)) == (1, 0)

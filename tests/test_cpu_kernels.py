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

KERNEL_TYPES = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
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
    """150 rows: two whole groups of 64 and a padded one; k: three chunks of 256 columns, or 608 (2.375
    of them; 9.5 of matmul's 64-column chunks of the 32-column block types)."""
    rng = np.random.default_rng()
    k = 3 * K.CHUNK if ggml_type(name).block_size == 256 else 9 * K.CHUNK // 4 + 32
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


def test_a_type_without_a_kernel_is_dequantized_at_load(caplog, monkeypatch):
    """Every type the decoders know has a kernel or another type's blocks today; one that had neither
    (Q2_K with its kernel taken away) would be float32, said in a warning."""
    monkeypatch.setattr(K, "KERNEL_TYPES", K.KERNEL_TYPES - {"Q2_K"})
    rng = np.random.default_rng()
    parts = [source("Q2_K", 9, 256, rng, label="blk.0.ffn_up.weight")]
    with caplog.at_level(logging.WARNING):
        W = QuantMatrix(parts)
    assert "no Q2_K kernel" in caplog.text and "blk.0.ffn_up.weight" in caplog.text
    assert W.runs[0].f32 is not None
    x = rng.standard_normal((2, 256)).astype(np.float32)
    close(W.matmul(x, np.empty(256, np.float32)), x @ reference(parts).T)


@pytest.mark.parametrize("n", [1, 2, 5, 40])
@pytest.mark.parametrize("name,kernel_type", [("Q3_K", "Q6_K"), ("IQ4_NL", "Q8_0")])
def test_types_held_exactly_by_another_kernel_type_run_as_it(name, kernel_type, n, caplog):
    """Q3_K and IQ4_NL have no kernels of their own: their blocks become Q6_K and Q8_0 blocks of the
    same values at load (no float32 copy, no warning), in one run with a neighbouring part of that
    type; rows and products as NumPy's decoding of the file's bytes gives them."""
    rng = np.random.default_rng()
    parts = [source(name, 70, 512, rng), source(kernel_type, 9, 512, rng)]
    with caplog.at_level(logging.WARNING):
        W = QuantMatrix(parts)
    assert "kernel" not in caplog.text
    assert [(r.qtype, r.rows, r.f32) for r in W.runs] == [(kernel_type, 79, None)]
    kt = ggml_type(kernel_type)
    assert W.nbytes == 79 * 512 // kt.block_size * kt.type_size  # what the products read
    ids = np.array([69, 0, 7, 3])
    np.testing.assert_array_equal(QuantMatrix(parts[:1]).rows(ids), reference(parts)[ids])  # an embedding table
    x = rng.standard_normal((n, 512)).astype(np.float32)
    close(W.matmul(x, np.empty(K.R * 512, np.float32)), x @ reference(parts).T)


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


# ---------------------------------------------------------------------------- the integer kernel

INT_TOL = {"int16": 1e-4, "int8": 2e-2}  # of the largest output: planes of 16 and 8 bits per 32 columns


def planes(x, gshift, two=True, quantize=K.quantize_planes):
    n, k = x.shape
    a = [np.full((n, k), 99, np.int8), np.full((n, k), 99, np.int8), np.full((n, k // 32), np.nan, np.float32),
         np.full((n, k >> gshift), -7, np.int32), np.full((n, k >> gshift), -7, np.int32),
         np.full((n, k >> gshift), np.nan, np.float32)]
    quantize(x, gshift, *a)
    if not two:
        a[1] = None
    return a


def through_matrix(W, want, mode, counts, rng):
    """W's products of `counts` random tokens in activations `mode` against NumPy (want: W's float64
    values) within the mode's tolerance."""
    W.activations = mode
    for n in counts:
        x = rng.standard_normal((n, want.shape[1])).astype(np.float32)
        ref = x @ want.T
        got = W.matmul(x, np.empty(1, np.float32))
        np.testing.assert_allclose(got, ref, rtol=0, atol=INT_TOL[mode] * np.abs(ref).max())
        if mode == "int8":  # the precision says which path ran: int8 is far from float32
            assert np.abs(got - ref).max() > 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("quantize", [K.quantize_planes, K.quantize_planes_serial], ids=["parallel", "serial"])
def test_activations_split_into_two_int8_planes_of_16_bit_precision(quantize):
    """Per 32 columns: x = s (q1 + q2 / 256) within s / 512 (s = max|x| / 127; s / 256 where q2 is
    clamped), |q2| <= 127; an all-zero block has s = 1 and zero planes; the group sums are exact
    integer sums (+128 offsets); a block holding an inf or a nan has a nan scale, the others are unaffected."""
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 256)).astype(np.float32) * np.float32(rng.uniform(0.01, 50))
    x[0, 37] = 300.0    # an outlier: only its own block loses precision
    x[1, 64:96] = 0     # an all-zero block
    for gshift in (4, 5):
        bad = np.concatenate([x, x])  # rows 3-5: an inf, a -inf, a nan in block 2
        bad[3, 70], bad[4, 71], bad[5, 72] = np.inf, -np.inf, np.nan
        x1, x2, xs, z1, z2, xsum = planes(bad, gshift, quantize=quantize)
        assert np.isnan(xs[3:, 2]).all() and np.isfinite(np.delete(xs[3:], 2, axis=1)).all()
        assert np.isnan(xsum[3:, 64 >> gshift]).all()
        np.testing.assert_array_equal(np.delete(xs[3:], 2, axis=1), np.delete(xs[:3], 2, axis=1))
        x1, x2, xs, z1, z2, xsum = planes(x, gshift, quantize=quantize)
        s = 256 * xs                                                                   # [3, 8]
        xb = x.reshape(3, 8, 32)
        np.testing.assert_allclose(s, np.where(np.abs(xb).max(-1) > 0, np.abs(xb).max(-1) / 127, 1), rtol=1e-6)
        got = (s[..., None] * (x1.reshape(3, 8, 32) + x2.reshape(3, 8, 32) / np.float32(256))).reshape(3, 256)
        err = np.abs(got - x) / np.repeat(s, 32, axis=1)
        assert (err <= 1 / 256 * 1.001).all()     # q2 clamped to 127 where 256 r rounds to 128
        assert (err > 1 / 512 * 1.001).mean() < 0.02  # else rounding: half a step of s / 256
        assert np.abs(x2.astype(int)).max() <= 127 and (x1[1, 64:96] == 0).all() and (x2[1, 64:96] == 0).all()
        g = 1 << gshift
        g1 = x1.astype(np.int64).reshape(3, -1, g).sum(-1)
        g2 = x2.astype(np.int64).reshape(3, -1, g).sum(-1)
        np.testing.assert_array_equal(z1, 128 * g1)
        np.testing.assert_array_equal(z2, 128 * (256 * g1 + g2))
        np.testing.assert_allclose(xsum, got.reshape(3, -1, g).sum(-1), rtol=1e-5, atol=1e-5 * np.abs(x).max())


@pytest.mark.skipif(not (K.HAS_VNNI or K.HAS_AVX2), reason="the integer kernels need AVX2 or AVX-512 VNNI")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activations_stay_non_finite(bad):
    """A token whose activations hold an inf or a nan gets non-finite outputs (the engine then fails
    that request), as float32 gives; the other tokens are unaffected. Enough tokens for the integer
    several-token kernel on either kind of CPU."""
    from wasmchord.backends.quantized import AVX2_INT_TOKENS
    rng = np.random.default_rng()
    parts = [source("Q4_K", 64, 512, rng)]
    W = QuantMatrix(parts)
    W.activations = "int16"
    x = rng.standard_normal((AVX2_INT_TOKENS + 4, 512)).astype(np.float32)
    x[2, 300] = bad
    got = W.matmul(x, np.empty(1, np.float32))
    assert not np.isfinite(got[2]).any()
    ok = np.arange(len(x)) != 2
    ref = x[ok] @ reference(parts).T
    np.testing.assert_allclose(got[ok], ref, rtol=0, atol=INT_TOL["int16"] * np.abs(ref).max())


def test_every_integer_type_has_a_kernel_type():
    assert set(K.INT_TYPES) <= K.KERNEL_TYPES and {"F16", "BF16"}.isdisjoint(K.INT_TYPES)


@pytest.mark.skipif(not (K.HAS_VNNI or K.HAS_AVX2), reason="the integer kernels need AVX2 or AVX-512 VNNI (see "
                                                          "test_integer_activations_need_vnni_or_avx2 for such CPUs)")
@pytest.mark.parametrize("name", sorted(K.INT_TYPES))
@pytest.mark.parametrize("mode", ["int16", "int8"])
def test_integer_kernel_matches_numpy_dequantize_and_matmul(name, mode):
    """The several-token integer kernels alone (output poisoned with nan; 8 tokens: two passes) against
    NumPy in float64: VNNI's `matmul_int` where the CPU has it, AVX2's `matmul_int16` (the planes joined
    into 16-bit integers) on every AVX2 CPU, and on a VNNI CPU each against the other (the same integer
    sums: float32 rounding apart); then through QuantMatrix (5 and 9 tokens: padded to whole passes;
    150 rows: a padded group; k: several chunks)."""
    rng = np.random.default_rng()
    k = 3 * K.CHUNK if ggml_type(name).block_size == 256 else 9 * K.CHUNK // 4
    parts = [source(name, 150, k, rng)]
    want = reference(parts).astype(np.float64)
    W = QuantMatrix(parts)
    (run,) = W.runs
    gshift = K.INT_TYPES[name]
    x = rng.standard_normal((2 * K.TOKENS_INT, k)).astype(np.float32) * np.float32(rng.uniform(0.1, 10))
    ref = x @ want.T
    x1, x2, xs, z1, z2, xsum = planes(x, gshift, mode == "int16")
    got = {}
    if K.HAS_VNNI:
        got["matmul_int"] = np.full((len(x), run.t.shape[0] * K.R), np.nan, np.float32)
        K.matmul_int(run.marker, run.t, run.block, gshift, x1, x2, xs, z1, z2, xsum, got["matmul_int"])
    if K.HAS_AVX2:
        x16 = np.full(x1.shape, 12345, np.int16)
        K.join_planes(x1, x2, x16)
        np.testing.assert_array_equal(x16, 256 * x1.astype(np.int32) + (0 if x2 is None else x2))
        got["matmul_int16"] = np.full((len(x), run.t.shape[0] * K.R), np.nan, np.float32)
        K.matmul_int16(run.marker, run.t, run.block, gshift, x16, xs, xsum, got["matmul_int16"])
    for kernel, out in got.items():
        np.testing.assert_allclose(out[:, :150], ref, rtol=0, atol=INT_TOL[mode] * np.abs(ref).max(), err_msg=kernel)
        assert (out[:, 150:] == 0).all()  # the padding rows
    if len(got) == 2:
        np.testing.assert_allclose(got["matmul_int16"], got["matmul_int"], rtol=0, atol=2e-6 * np.abs(ref).max())
    from wasmchord.backends.quantized import AVX2_INT_TOKENS  # without VNNI, fewer tokens stay float32
    through_matrix(W, want, mode, (5, 9) if K.HAS_VNNI else (AVX2_INT_TOKENS + 1, AVX2_INT_TOKENS + 9), rng)


@pytest.mark.parametrize("mode", ["f32", "int16"])
def test_more_tokens_than_a_tile_match_numpy_and_each_token_alone(mode):
    """A product of more tokens than one kernel call takes (TOKEN_TILE: calls per tile of tokens) is
    NumPy's within the mode's tolerance, and bit for bit the product of a few of its tokens alone (no
    number depends on the tile a token falls in; compared at the same place in a pass of TOKENS_INT
    tokens, whose unrolled epilogues may round their multiply-adds differently)."""
    from wasmchord.backends.quantized import AVX2_INT_TOKENS, TOKEN_TILE
    if mode == "int16" and not (K.HAS_VNNI or K.HAS_AVX2):
        pytest.skip("the integer kernels need AVX2 or AVX-512 VNNI")
    rng = np.random.default_rng()
    parts = [source("Q4_K", 96, 512, rng)]
    W = QuantMatrix(parts)
    W.activations = mode
    n = 2 * TOKEN_TILE + 7
    x = rng.standard_normal((n, 512)).astype(np.float32)
    got = W.matmul(x, np.empty(1, np.float32))
    ref = x.astype(np.float64) @ reference(parts).astype(np.float64).T
    np.testing.assert_allclose(got, ref, rtol=0, atol=(1e-4 if mode == "int16" else 2e-6) * np.abs(ref).max())
    m = 3 if mode == "f32" or K.HAS_VNNI else AVX2_INT_TOKENS  # few enough tokens for the same kernel
    for i in (0, TOKEN_TILE - 4, TOKEN_TILE, 2 * TOKEN_TILE - (0 if m == 3 else m)):
        np.testing.assert_array_equal(got[i:i + m], W.matmul(x[i:i + m], np.empty(1, np.float32)))


@pytest.mark.skipif(not K.HAS_VNNI, reason="the integer kernel needs AVX-512 VNNI")
def test_integer_paths_by_token_count_and_type(monkeypatch):
    """One or two tokens of a VECTOR_INT_TYPES type go through `matvec_int`, a token per call; three and
    more through `matmul_int`; a type without a one-token integer kernel (Q5_0) stays on float32 `matvec`
    for one or two tokens, and F16 (no integer values) on the float kernels throughout."""
    rng = np.random.default_rng()
    calls = []
    for name in ("matmul_int", "matvec_int", "matvec"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, name=name, real=real: calls.append((name, a[-1].shape)) or real(*a))
    for qtype, want in [("Q4_K", [("matvec_int", (64,)), ("matvec_int", (64,)), ("matvec_int", (64,)),
                                  ("matmul_int", (4, 64)), ("matmul_int", (8, 64))]),
                        ("Q5_0", [("matvec", (64,)), ("matvec", (64,)), ("matvec", (64,)),
                                  ("matmul_int", (4, 64)), ("matmul_int", (8, 64))]),
                        ("F16", [("matvec", (64,)), ("matvec", (64,)), ("matvec", (64,))])]:
        calls.clear()
        W = QuantMatrix([source(qtype, 64, 256, rng)])
        W.activations = "int16"
        for n in (1, 2, 3, 6):
            W.matmul(rng.standard_normal((n, 256)).astype(np.float32), np.empty(1, np.float32))
        assert calls == want, qtype  # several tokens padded to whole passes of TOKENS_INT


@pytest.mark.skipif(K.HAS_VNNI or not K.HAS_AVX2, reason="AVX2 without VNNI (with VNNI: the test above)")
def test_avx2_paths_by_token_count_and_type(monkeypatch):
    """AVX2 without VNNI, int16: one or two tokens of Q4_K go through `matvec_int` (AVX2's kernel), a
    token per call; 3 to AVX2_INT_TOKENS - 1 through the float32 `matmul`, more through `matmul_int16`;
    Q4_1 (no AVX2 one-token kernel) through float32 `matvec` for one or two tokens; F16 (no integer
    values) through the float32 kernels throughout."""
    from wasmchord.backends.quantized import AVX2_INT_TOKENS
    rng = np.random.default_rng()
    calls = []
    for name in ("matmul_int", "matmul_int16", "matvec_int", "matvec", "matmul"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, name=name, real=real: calls.append((name, a[-1].shape)) or real(*a))
    big = AVX2_INT_TOKENS
    for qtype, one, several in [("Q4_K", "matvec_int", "matmul_int16"), ("Q4_1", "matvec", "matmul_int16"),
                                ("F16", "matvec", "matmul")]:
        calls.clear()
        W = QuantMatrix([source(qtype, 64, 256, rng)])
        W.activations = "int16"
        for n in (1, 2, 3, big - 1, big):
            W.matmul(rng.standard_normal((n, 256)).astype(np.float32), np.empty(1, np.float32))
        assert calls == [(one, (64,))] * 3 + [("matmul", (4, 64)), ("matmul", (big, 64)), (several, (big, 64))], qtype


@pytest.mark.skipif(not K.VECTOR_INT_TYPES, reason="the one-token integer kernel needs AVX2 or AVX-512 VNNI")
@pytest.mark.parametrize("name", sorted(K.VECTOR_INT_TYPES))
@pytest.mark.parametrize("mode", ["int16", "int8"])
def test_one_token_integer_kernel_matches_numpy_and_the_several_token_kernel(name, mode):
    """`matvec_int` alone (output poisoned with nan; 150 rows: a padded group; k: several chunks) against
    NumPy in float64 within the mode's tolerance, and, with VNNI, against `matmul_int`'s row for the same
    token (the same integer sums and scale groups: float32 rounding apart); through QuantMatrix, one and
    two tokens. Without VNNI this is AVX2's kernel (vpmaddubsw), for Q4_K."""
    rng = np.random.default_rng()
    k = 3 * K.CHUNK if ggml_type(name).block_size == 256 else 9 * K.CHUNK // 4
    parts = [source(name, 150, k, rng)]
    want = reference(parts).astype(np.float64)
    W = QuantMatrix(parts)
    (run,) = W.runs
    x = np.zeros((K.TOKENS_INT, k), np.float32)
    x[0] = rng.standard_normal(k)
    x1, x2, xs, z1, z2, xsum = planes(x, K.INT_TYPES[name], mode == "int16")
    out = np.full(run.t.shape[0] * K.R, np.nan, np.float32)
    K.matvec_int(run.marker, run.t, x1[0], None if x2 is None else x2[0], xs[0], z1[0], z2[0], xsum[0], out)
    ref = x[0] @ want.T
    np.testing.assert_allclose(out[:150], ref, rtol=0, atol=INT_TOL[mode] * np.abs(ref).max())
    assert (out[150:] == 0).all()  # the padding rows
    if K.HAS_VNNI:
        several = np.full((K.TOKENS_INT, run.t.shape[0] * K.R), np.nan, np.float32)
        K.matmul_int(run.marker, run.t, run.block, K.INT_TYPES[name], x1, x2, xs, z1, z2, xsum, several)
        np.testing.assert_allclose(out, several[0], rtol=0, atol=2e-6 * np.abs(ref).max())
    through_matrix(W, want, mode, (1, 2), rng)


def _avx2_vector_kernel(decoder):
    """A one-token kernel over every row group through `decoder` (K._vector_q4_k_avx2, ...), compiled
    here: `matvec_int` takes the AVX2 forms only where the CPU lacks VNNI, and every VNNI CPU has AVX2."""
    from numba import njit
    body = njit(inline="always")(decoder)

    @njit
    def kernel(t, x1, x2, xs, z1, z2, xsum, out):
        for g in range(t.shape[0]):
            acc = np.zeros(K.R, np.float32)
            body(None, t[g], x1.shape[0], x1, x2, xs, z1, z2, xsum, acc)
            out[g * K.R:(g + 1) * K.R] = acc
    return kernel


@pytest.mark.skipif(not K.HAS_AVX2, reason="the AVX2 kernels need AVX2")
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("mode", ["int16", "int8"])
def test_avx2_one_token_kernels_match_numpy_on_any_avx2_cpu(name, mode):
    """The AVX2 one-token decoders (Q4_K: nibble pairs in 16-bit sums; Q6_K: four columns into 32 bits)
    against NumPy in float64, on every AVX2 CPU, VNNI or not (output poisoned with nan; 150 rows: a padded
    group; three blocks of columns)."""
    rng = np.random.default_rng()
    k = 3 * K.CHUNK
    parts = [source(name, 150, k, rng)]
    want = reference(parts).astype(np.float64)
    (run,) = QuantMatrix(parts).runs
    x = rng.standard_normal((1, k)).astype(np.float32) * np.float32(rng.uniform(0.1, 10))
    x1, x2, xs, z1, z2, xsum = planes(x, K.INT_TYPES[name], mode == "int16")
    out = np.full(run.t.shape[0] * K.R, np.nan, np.float32)
    decoder = {"Q4_K": K._vector_q4_k_avx2, "Q6_K": K._vector_q6_k_avx2}[name]
    _avx2_vector_kernel(decoder)(run.t, x1[0], None if x2 is None else x2[0], xs[0], z1[0], z2[0], xsum[0], out)
    ref = x[0] @ want.T
    np.testing.assert_allclose(out[:150], ref, rtol=0, atol=INT_TOL[mode] * np.abs(ref).max())
    assert (out[150:] == 0).all()  # the padding rows


def test_integer_activations_need_vnni_or_avx2_and_quantized_weights(monkeypatch):
    """auto: int16 where the CPU has VNNI or AVX2, else f32; asking for int16/int8 without either, or with
    float32 weights, or an unknown value: a clear error naming the option."""
    from wasmchord.backends.numpy_backend import NumpyBackend
    from wasmchord.errors import BackendError
    assert NumpyBackend().activations == ("int16" if K.HAS_VNNI or K.HAS_AVX2 else "f32")
    assert NumpyBackend(activations="f32").activations == "f32"
    assert NumpyBackend(weights="f32").activations == "f32"
    with pytest.raises(BackendError, match="activations='int8' needs weights='quantized'"):
        NumpyBackend(weights="f32", activations="int8")
    with pytest.raises(BackendError, match="activations='int4', expected one of"):
        NumpyBackend(activations="int4")
    monkeypatch.setattr(K, "HAS_VNNI", False)
    monkeypatch.setattr(K, "HAS_AVX2", False)
    assert NumpyBackend().activations == "f32"
    with pytest.raises(BackendError, match="activations='int16' needs a CPU with AVX2 or AVX-512 VNNI"):
        NumpyBackend(activations="int16")


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


def test_kernel_benchmark_times_another_checkout_alternately(tmp_path):
    """tools/bench_cpu_kernels.py --against DIR: the other checkout's package (here this one's) imported
    under another name from a copy and timed in turn with this one's, each mode's figures and time ratio
    printed, and nothing compiled under the other name left in this checkout's numba cache (where its
    own import would find it); a path without a package is a one-line error."""
    tool = [sys.executable, str(ROOT / "tools" / "bench_cpu_kernels.py"), "--tokens", "4", "--shape", "64x256",
            "--types", "F16", "--repeats", "2"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # a fresh copy: its kernels compiled in this run
    r = subprocess.run(tool + ["--against", str(ROOT)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr
    (row,) = [line for line in r.stdout.splitlines() if line.startswith("F16")]
    cells = row.split()[1:]
    assert len(cells) >= 4 and cells[1] == "/" and cells[3].startswith("(") and cells[3].endswith("x)"), row
    assert list(tmp_path.glob("wasmchord-against/*/wasmchord_against/backends/__pycache__/cpu_kernels.matmul-*"))
    for f in (ROOT / "wasmchord").rglob("__pycache__/*.nb*"):
        assert b"wasmchord_against" not in f.read_bytes(), f
    r = subprocess.run(tool + ["--against", str(tmp_path / "none")], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "no wasmchord/__init__.py" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("lookup", ["_iq4_gather", "_iq4_pshufb"])
def test_iq4_table_lookups_give_the_table_values(lookup):
    """IQ4_XS's lookup of both nibbles of R bytes: vpshufb where AVX2 is (the kernel's path here), and
    the plain indexed fallback of other CPUs, each against the table indexed by NumPy."""
    from numba import njit
    if lookup == "_iq4_pshufb" and not K.HAS_AVX2:
        pytest.skip("vpshufb needs AVX2")
    f = getattr(K, lookup)

    @njit
    def run(src, si, lo, hi):
        f(src, si, lo, hi)

    rng = np.random.default_rng()
    src = rng.integers(0, 256, 3 * K.R, dtype=np.uint8)
    lo, hi = np.full(K.R, np.nan, np.float32), np.full(K.R, np.nan, np.float32)
    run(src, K.R, lo, hi)
    byte = src[K.R:2 * K.R]
    np.testing.assert_array_equal(lo, K._IQ4[byte & 15])
    np.testing.assert_array_equal(hi, K._IQ4[byte >> 4])

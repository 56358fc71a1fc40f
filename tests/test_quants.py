"""Every GGML type against gguf-py's reference (bit-exact), plus hand-built blocks with known values."""

import gguf
import numpy as np
import pytest

from wasmchord.formats.gguf import GGUFFile
from wasmchord.formats.quants import GGML_TYPES, dequantize, dequantize_rows, ggml_type, quantize
from wasmchord.errors import UnsupportedError

DEQ_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
             "IQ4_NL", "IQ4_XS"]
QUANT_TYPES = ["F16", "Q4_0", "Q4_1", "Q8_0"]
SHAPES = [(1, 256), (3, 512), (7, 768), (2, 3, 256)]

# Byte offsets of the f16 scales inside each block (ggml-common.h): kept finite so that random bytes
# never encode NaN/Inf scales (whose NaN payloads are not part of the format).
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
              "IQ4_NL": [0], "IQ4_XS": [0]}


def random_raw(t, shape, rng):
    n_el = int(np.prod(shape))
    if t.name == "F32":
        return rng.standard_normal(n_el).astype(np.float32).view(np.uint8)
    if t.name == "F16":
        return rng.standard_normal(n_el).astype(np.float16).view(np.uint8)
    if t.name == "BF16":
        return (rng.standard_normal(n_el).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    n_blocks = n_el // t.block_size
    raw = rng.integers(0, 256, size=(n_blocks, t.type_size), dtype=np.uint8)
    for off in F16_FIELDS[t.name]:
        raw[:, off:off + 2] = (rng.standard_normal(n_blocks) * 0.1).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def gguf_ref(raw, t, shape):
    row_bytes = shape[-1] // t.block_size * t.type_size
    ref = gguf.quants.dequantize(raw.reshape(*shape[:-1], row_bytes), gguf.GGMLQuantizationType[t.name])
    return np.asarray(ref, dtype=np.float32).reshape(shape)


@pytest.mark.parametrize("name", DEQ_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_gguf_bit_exact(name, shape):
    t, rng = ggml_type(name), np.random.default_rng()
    raw = random_raw(t, shape, rng)
    ours = dequantize(raw, t, shape)
    ref = gguf_ref(raw, t, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", DEQ_TYPES)
def test_dequantize_rows_equals_slice_of_full(name):
    t, rng = ggml_type(name), np.random.default_rng()
    shape = (11, 512)
    raw = random_raw(t, shape, rng)
    full = dequantize(raw, t, shape)
    for r in [slice(0, 1), slice(3, 7), slice(10, 11), slice(5, None)]:
        np.testing.assert_array_equal(dequantize_rows(raw, t, shape, r), full[r])


@pytest.mark.parametrize("name", QUANT_TYPES)
@pytest.mark.parametrize("shape", [(1, 32), (5, 64), (4, 4096)])
def test_quantize_matches_gguf_bit_exact(name, shape):
    rng = np.random.default_rng()
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0) must not divide by zero
    ours = quantize(x, ggml_type(name))
    ref = np.asarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType[name]))
    np.testing.assert_array_equal(ours, ref.view(np.uint8))  # gguf returns F16 as float16


@pytest.mark.parametrize("name,tol", [("Q4_0", 0.15), ("Q4_1", 0.1), ("Q8_0", 0.01), ("F16", 1e-3)])
def test_quantize_roundtrip_error_is_small(name, tol):
    x = np.random.default_rng().standard_normal((8, 256)).astype(np.float32)
    t = ggml_type(name)
    back = dequantize(quantize(x, t).reshape(-1), t, x.shape)
    assert np.abs(back - x).max() / np.abs(x).max() < tol


def _f16b(v):
    return np.array([v], np.float16).view(np.uint8)


def test_hand_built_q4_0_block():
    # d = 0.5; byte j holds element j (low nibble) and j+16 (high): values (nibble - 8) * d
    qs = np.array([(j % 16) | ((15 - j % 16) << 4) for j in range(16)], np.uint8)
    raw = np.concatenate([_f16b(0.5), qs])
    want = np.array([(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)], np.float32)
    np.testing.assert_array_equal(dequantize(raw, ggml_type("Q4_0"), (32,)), want)


def test_hand_built_q4_1_and_q8_0_blocks():
    qs = np.full(16, 0x31, np.uint8)  # low nibble 1, high nibble 3
    raw = np.concatenate([_f16b(2.0), _f16b(-1.0), qs])
    np.testing.assert_array_equal(dequantize(raw, ggml_type("Q4_1"), (32,)), np.array([1.0] * 16 + [5.0] * 16, np.float32))
    q8 = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    raw = np.concatenate([_f16b(0.25), q8])
    np.testing.assert_array_equal(dequantize(raw, ggml_type("Q8_0"), (32,)), np.arange(-16, 16) * 0.25)


def test_hand_built_q5_0_high_bits():
    # All low nibbles 0; qh bit j set for even j: value = (16 * bit - 16) * d
    qh = np.array([0x55, 0x55, 0x55, 0x55], np.uint8)
    raw = np.concatenate([_f16b(1.0), qh, np.zeros(16, np.uint8)])
    want = np.array([0.0 if j % 2 == 0 else -16.0 for j in range(32)], np.float32)
    np.testing.assert_array_equal(dequantize(raw, ggml_type("Q5_0"), (32,)), want)


def test_hand_built_q4_k_block():
    # d = 1, dmin = 0.5; sub-block scales 1..8 and mins 0 (6-bit packed for the first 4 only: the
    # last four live in bytes 8..11); quants all 2 -> value = scale_i * 2.
    scales = np.zeros(12, np.uint8)
    scales[0:4] = [1, 2, 3, 4]
    scales[8:12] = [5, 6, 7, 8]  # low nibble: scales 4..7; high nibble: mins 4..7 (= 0)
    qs = np.full(128, 0x22, np.uint8)
    raw = np.concatenate([_f16b(1.0), _f16b(0.5), scales, qs])
    want = np.repeat(np.arange(1, 9, dtype=np.float32) * 2, 32)
    np.testing.assert_array_equal(dequantize(raw, ggml_type("Q4_K"), (256,)), want)


def test_unsupported_type_is_named():
    t = ggml_type("IQ2_XXS")
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), t, (256,))
    with pytest.raises(UnsupportedError, match="Q5_K"):
        quantize(np.zeros((1, 256), np.float32), ggml_type("Q5_K"))


def test_quantize_rejects_rows_that_do_not_divide_into_blocks():
    with pytest.raises(ValueError, match="block size 32"):
        quantize(np.zeros((2, 33), np.float32), ggml_type("Q4_0"))


def test_type_table_agrees_with_gguf():
    for t in GGML_TYPES.values():
        g = gguf.GGMLQuantizationType[t.name]
        assert g.value == t.id, t.name
        if t.name == "Q8_1":
            # ggml-common.h static_asserts sizeof(block_q8_1) == 2*sizeof(ggml_half) + 32 = 36;
            # gguf-py still lists an older 40-byte layout. Q8_1 never appears in model files.
            continue
        assert gguf.GGML_QUANT_SIZES[g] == (t.block_size, t.type_size), t.name


@pytest.mark.parametrize("model", ["smollm2_path", "gemma_path"])
def test_every_tensor_of_real_model_matches_gguf(model, request):
    path = request.getfixturevalue(model)
    ours = GGUFFile(path)
    ref = gguf.GGUFReader(path)
    assert len(ref.tensors) == len(ours.tensors)
    for t in ref.tensors:
        a = ours.dequantize(t.name)
        b = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert a.shape == b.shape, t.name
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), t.name


def test_q3_k_as_q6_k_blocks_decode_to_the_same_values():
    """The CPU backend runs Q3_K as Q6_K blocks: the transcoding is exact, block by block."""
    from wasmchord.formats.quants import q3_k_as_q6_k
    rng = np.random.default_rng()
    q3, q6 = ggml_type("Q3_K"), ggml_type("Q6_K")
    raw = random_raw(q3, (6, 768), rng)
    got = q3_k_as_q6_k(raw)
    assert got.size == 6 * 3 * q6.type_size
    np.testing.assert_array_equal(dequantize(got, q6, (6, 768)), dequantize(raw, q3, (6, 768)))

"""GGUF reading: all value types (files written by gguf-py as the oracle), every bad input, fuzzing."""

import struct

import gguf
import numpy as np
import pytest

from wasmchord.errors import GGUFError, WasmchordError
from wasmchord.formats.gguf import GGUFFile
from wasmchord.formats.gguf_writer import GGUFWriter, Typed


def write_with_gguf_py(path, *, version_arrays=True):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**60))
    w.add_float64("t.f64", 2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_str", ["a", "", "ü"])
    w.add_array("t.arr_f32", [0.5, 1.5])
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", np.ones((3, 5), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def small_gguf(path, **extra):
    """A valid little GGUF written by our writer: two tensors, some metadata."""
    w = GGUFWriter("llama")
    w.add("llama.block_count", 1)
    for k, v in extra.items():
        w.add(k, v)
    w.add_tensor("tok", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("q", np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32), qtype="Q8_0")
    w.write(path)
    return path


def test_reads_every_value_type_written_by_gguf_py(tmp_path):
    p = tmp_path / "m.gguf"
    write_with_gguf_py(p)
    gf = GGUFFile(p)
    md = gf.metadata
    assert gf.version == 3
    assert (md["t.u8"], md["t.i8"], md["t.u16"], md["t.i16"]) == (200, -100, 60000, -30000)
    assert (md["t.u32"], md["t.i32"], md["t.u64"], md["t.i64"]) == (4_000_000_000, -2_000_000_000, 2**60, -(2**60))
    assert md["t.f32"] == 1.5 and md["t.f64"] == 2.25 and md["t.bool"] is True
    assert md["t.str"] == "héllo ✓"
    assert list(md["t.arr_i32"]) == [1, -2, 3] and md["t.arr_str"] == ["a", "", "ü"]
    assert list(md["t.arr_f32"]) == [0.5, 1.5]
    assert gf.tensor("a").shape == (2, 32) and gf.tensor("b").shape == (3, 5)
    np.testing.assert_array_equal(gf.dequantize("a"), np.arange(64, dtype=np.float32).reshape(2, 32))
    np.testing.assert_array_equal(gf.dequantize("b"), np.ones((3, 5), np.float32))


def test_our_writer_is_read_by_gguf_py(tmp_path):
    p = small_gguf(tmp_path / "m.gguf", **{"x.str": "s", "x.arr": [1, 2], "x.f": 0.25, "x.big": Typed(7, "uint64")})
    r = gguf.GGUFReader(str(p))
    names = {t.name: t for t in r.tensors}
    assert set(names) == {"tok", "q"}
    np.testing.assert_array_equal(np.asarray(names["tok"].data), np.arange(64, dtype=np.float32).reshape(2, 32))
    assert r.fields["x.str"].contents() == "s"
    assert r.fields["x.big"].types == [gguf.GGUFValueType.UINT64]


def test_version_2_is_read(tmp_path):
    p = small_gguf(tmp_path / "m.gguf")
    b = bytearray(p.read_bytes())
    b[4:8] = struct.pack("<I", 2)
    p.write_bytes(b)
    assert GGUFFile(p).version == 2


def test_custom_alignment_is_honoured(tmp_path):
    w = GGUFWriter("llama", alignment=64)
    w.add_tensor("x", np.arange(32, dtype=np.float32))
    w.add_tensor("y", np.arange(48, dtype=np.float32))
    w.write(tmp_path / "a.gguf")
    gf = GGUFFile(tmp_path / "a.gguf")
    assert gf.alignment == 64 and gf.data_offset % 64 == 0 and gf.tensor("y").offset % 64 == 0
    np.testing.assert_array_equal(gf.dequantize("y"), np.arange(48, dtype=np.float32))


def test_tensor_data_is_memory_mapped_not_copied(tmp_path):
    gf = GGUFFile(small_gguf(tmp_path / "m.gguf"))
    view = gf.tensor_bytes("tok")
    assert not view.flags.owndata and not view.flags.writeable


# ---------------------------------------------------------------------------- bad input

def _err(path):
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    assert str(path) in str(e.value)
    return str(e.value)


def test_nonexistent_path(tmp_path):
    assert "no such file" in _err(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    assert "directory" in _err(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.gguf").write_bytes(b"")
    assert "empty" in _err(tmp_path / "e.gguf")


def test_wrong_magic(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGML" + b"\0" * 60)
    assert "magic" in _err(tmp_path / "m.gguf")


def test_unsupported_version(tmp_path):
    (tmp_path / "v.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 0, 0))
    assert "version 7" in _err(tmp_path / "v.gguf")


def test_truncated_header(tmp_path):
    p = small_gguf(tmp_path / "m.gguf")
    p.write_bytes(p.read_bytes()[:30])
    assert "truncated" in _err(p) or "more than" in _err(p)


def test_string_length_past_end_of_file(tmp_path):
    b = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 10**6) + b"general.architecture"
    (tmp_path / "s.gguf").write_bytes(b)
    assert "exceeds" in _err(tmp_path / "s.gguf")


def _string_array_file(path, items: list[bytes], cut: int = 0):
    """A GGUF whose one metadata value is the string array `t.vocab` of raw items (the last `cut`
    bytes of the file removed)."""
    key = b"t.vocab"
    body = b"".join(struct.pack("<Q", len(it)) + it for it in items)
    b = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
         + struct.pack("<IIQ", 9, 8, len(items)) + body)  # type 9 = array, of type 8 = string
    path.write_bytes(b[:len(b) - cut] if cut else b)
    return path


@pytest.mark.parametrize("items, cut, message", [
    ([b"a", b"bb", b"\xff\xfe", b"c"], 0, "item 2 of 't.vocab' is not valid UTF-8"),
    ([b"a", b"bb", b"ccc", b"dddd"], 3, "string length 4 of item 3 of 't.vocab'"),
    ([b"a", b"bb", b"ccc", b"dddd"], 10, "length of item 3 of 't.vocab'"),
])
def test_a_bad_item_of_a_string_array_is_named(tmp_path, items, cut, message):
    assert message in _err(_string_array_file(tmp_path / "v.gguf", items, cut))


def test_string_arrays_are_read_whole(tmp_path):
    words = ["", "a", "héllo ✓", "x" * 300] + [f"w{i}" for i in range(1000)]
    p = small_gguf(tmp_path / "m.gguf", **{"t.words": words})
    assert GGUFFile(p).metadata["t.words"] == words


def test_tensor_data_past_end_of_file(tmp_path):
    p = small_gguf(tmp_path / "m.gguf")
    p.write_bytes(p.read_bytes()[:-40])
    assert "extends past the end" in _err(p)


def test_unknown_tensor_type(tmp_path):
    p = small_gguf(tmp_path / "m.gguf")
    gf = GGUFFile(p)
    b = bytearray(p.read_bytes())
    # The type id of tensor "tok" sits right after its name and 2 dims.
    i = b.index(b"tok") + 3 + 4 + 16
    assert struct.unpack_from("<I", b, i)[0] == 0 and gf.tensor("tok").ggml_type.name == "F32"
    b[i:i + 4] = struct.pack("<I", 99)
    p.write_bytes(b)
    assert "unknown type id 99" in _err(p)


def test_byte_size_does_not_match_type_and_shape(tmp_path):
    p = small_gguf(tmp_path / "m.gguf")
    b = bytearray(p.read_bytes())
    ne0 = b.index(b"tok") + 3 + 4
    b[ne0:ne0 + 8] = struct.pack("<Q", 31)          # rows of 31 values...
    b[ne0 + 16:ne0 + 20] = struct.pack("<I", 8)     # ...of Q8_0, whose blocks hold 32
    p.write_bytes(b)
    assert "does not match its type and shape" in _err(p)


def test_overlapping_tensors(tmp_path):
    p = small_gguf(tmp_path / "m.gguf")
    b = bytearray(p.read_bytes())
    i = b.index(b"tok") + 3 + 4
    b[i + 8:i + 16] = struct.pack("<Q", 40)  # 40 rows of 32 f32: runs into tensor "q"
    p.write_bytes(b)
    msg = _err(p)
    assert "overlaps" in msg or "extends past" in msg


def test_duplicate_tensor_names(tmp_path):
    w = GGUFWriter("llama")
    w.add_tensor("x", np.zeros(32, np.float32))
    w.add_tensor("x", np.zeros(32, np.float32))
    w.write(tmp_path / "d.gguf")
    assert "duplicate tensor name 'x'" in _err(tmp_path / "d.gguf")


def test_bad_alignment(tmp_path):
    p = small_gguf(tmp_path / "m.gguf", **{"general.alignment": Typed(3, "uint32")})
    assert "alignment" in _err(p)


def test_fuzzed_files_raise_only_our_errors(tmp_path):
    """Seeded random mutations and truncations of a valid file: either it opens, or GGUFError."""
    base = small_gguf(tmp_path / "base.gguf", **{"tokenizer.ggml.tokens": ["a", "b", "c"], "x.f": 1.0}).read_bytes()
    rng = np.random.default_rng()
    p = tmp_path / "f.gguf"
    for trial in range(400):
        b = bytearray(base)
        kind = trial % 3
        if kind == 0:
            b = b[: rng.integers(0, len(b))]
        else:
            for _ in range(rng.integers(1, 8)):
                pos = rng.integers(0, min(len(b), 400))
                b[pos] = rng.integers(0, 256)
        p.write_bytes(bytes(b))
        try:
            gf = GGUFFile(p)
            for name in gf.tensors:
                gf.dequantize(name)
        except WasmchordError:
            pass


def _header(kvs: bytes, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kvs


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_arrays_nested_deeper_than_the_cap_are_an_error_not_a_recursion(tmp_path):
    depth = 600  # Python's recursion limit is 1000: 500 levels of nesting took the reader over it
    value = b"".join(struct.pack("<IQ", 9, 1) for _ in range(depth)) + struct.pack("<IQ", 4, 0)
    p = tmp_path / "deep.gguf"
    p.write_bytes(_header(_key("x.deep") + struct.pack("<I", 9) + value, 1) + b"\0" * 64)
    with pytest.raises(GGUFError, match=r"'x\.deep.*nests arrays more than 8 deep"):
        GGUFFile(p)


def test_the_total_of_strings_and_arrays_in_the_metadata_is_capped(tmp_path, monkeypatch):
    from wasmchord.formats import gguf as reader
    monkeypatch.setattr(reader, "MAX_LIST_ITEMS", 10)
    p = small_gguf(tmp_path / "m.gguf", **{"a.list": ["x"] * 6, "b.list": ["y"] * 6})
    with pytest.raises(GGUFError, match="'b.list' brings the metadata to more than 10 strings"):
        GGUFFile(p)


def test_rows_of_a_vector_are_its_elements(tmp_path):
    w = GGUFWriter("llama")
    v = np.arange(64, dtype=np.float32)
    w.add_tensor("v32", v)
    w.add_tensor("v8", v, qtype="Q8_0")
    w.write(tmp_path / "v.gguf")
    gf = GGUFFile(tmp_path / "v.gguf")
    np.testing.assert_array_equal(gf.dequantize("v32", rows=slice(3, 7)), v[3:7])
    assert gf.dequantize("v8", rows=slice(60, None)).shape == (4,)
    with pytest.raises(GGUFError, match="rows must be a slice"):
        gf.dequantize("v32", rows=3)

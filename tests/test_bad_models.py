"""Files that parse but carry bad values, and bad arguments: each a clear wasmchord error naming the key,
tensor or argument, never a raw Python error (a tiny LLaMA converted from a random checkpoint)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gguf_edit import DROP, rewrite
from tiny_hf import make_llama
from wasmchord import Model
from wasmchord.atomic import temp_path
from wasmchord.convert import convert
from wasmchord.errors import GenerationError, GGUFError, TokenizerError
from wasmchord.formats.gguf import GGUFFile
from wasmchord.formats.gguf_writer import Typed
from wasmchord.info import summarize
from wasmchord.text.tokenizer import BYTE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "hf"
    make_llama(d, tokenizer="spm", hidden=32, layers=1, heads=2, kv_heads=1, ffn=48)
    return d


@pytest.fixture(scope="module")
def tiny(hf_dir):
    """A valid tiny LLaMA (SentencePiece tokenizer with byte tokens, float32)."""
    return convert(hf_dir, hf_dir.parent / "tiny.gguf", quant="f32")


def load(path, **kw):
    return Model.load(path, device="cpu", **kw)


def test_the_tiny_model_is_valid(tiny):
    m = load(tiny)
    assert m.generate("hello", max_tokens=3, temperature=0).completion_tokens >= 0


# ---------------------------------------------------------------------------- tensors against the config

def test_fewer_embedding_rows_than_tokens_is_an_error_at_load(tiny, tmp_path):
    gf = GGUFFile(tiny)
    rows = 300  # the tokenizer has 400 tokens: ids 300..399 indexed past the table before
    p = rewrite(tiny, tmp_path / "m.gguf", {"llama.vocab_size": rows},
                {n: (gf.dequantize(n)[:rows], "F32") for n in ("token_embd.weight", "output.weight")})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens has 400 tokens.*has 300"):
        load(p)


@pytest.mark.parametrize("name", ["output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_down.weight",
                                  "blk.0.attn_k.weight"])
def test_a_tensor_of_the_wrong_shape_is_named(tiny, tmp_path, name):
    a = GGUFFile(tiny).dequantize(name)
    p = rewrite(tiny, tmp_path / "m.gguf", tensors={name: (a[..., :-1], "F32")})
    with pytest.raises(GGUFError, match=f"tensor '{name}' has shape"):
        load(p)


# ---------------------------------------------------------------------------- tokenizer metadata

@pytest.mark.parametrize("key,value", [
    ("tokenizer.ggml.tokens", 5),
    ("tokenizer.ggml.tokens", np.arange(400, dtype=np.int32)),
    ("tokenizer.ggml.token_type", ["a"] * 400),
    ("tokenizer.ggml.token_type", np.ones(400, np.float32)),
    ("tokenizer.ggml.scores", "x"),
    ("tokenizer.ggml.scores", ["1.0"] * 400),
    ("tokenizer.ggml.bos_token_id", "x"),
    ("tokenizer.ggml.bos_token_id", 1.5),
    ("tokenizer.ggml.eos_token_id", np.array([1, 2], np.int32)),
    ("tokenizer.ggml.add_bos_token", np.array([1, 2], np.int32)),
    ("tokenizer.ggml.model", 3),
    ("tokenizer.chat_template", 5),
])
def test_tokenizer_keys_of_the_wrong_kind_are_named(tiny, tmp_path, key, value):
    md = {key: value}
    if key == "tokenizer.ggml.tokens":
        md["llama.vocab_size"] = 400  # else the config reports it first (also by name)
    p = rewrite(tiny, tmp_path / "m.gguf", md)
    with pytest.raises(TokenizerError, match=key.replace(".", r"\.")):
        load(p)


def test_a_byte_token_that_is_not_0xNN_is_named(tiny, tmp_path):
    gf = GGUFFile(tiny)
    types = gf.metadata["tokenizer.ggml.token_type"]
    tokens = list(gf.metadata["tokenizer.ggml.tokens"])
    i = int(np.flatnonzero(types == BYTE)[5])
    tokens[i] = "<0xZZ>"  # int(text[3:5], 16) failed when the token was decoded
    p = rewrite(tiny, tmp_path / "m.gguf", {"tokenizer.ggml.tokens": tokens})
    with pytest.raises(TokenizerError, match=rf"token {i} \('<0xZZ>'\) has type BYTE"):
        load(p)


def test_info_on_a_token_list_that_is_not_an_array(tiny, tmp_path):
    p = rewrite(tiny, tmp_path / "m.gguf", {"tokenizer.ggml.tokens": 7})
    s = summarize(GGUFFile(p))
    assert s["vocab_size"] is None and s["config"]["vocab_size"] == 400  # llama.vocab_size
    r = subprocess.run([sys.executable, "-m", "wasmchord", "info", str(p), "--metadata"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "vocab None" in r.stdout, r.stderr


def test_a_block_count_the_file_does_not_have_is_named_at_once(tiny, tmp_path):
    p = rewrite(tiny, tmp_path / "m.gguf", {"llama.block_count": Typed(2**24, "uint32")})
    t = time.perf_counter()
    with pytest.raises(GGUFError, match="missing tensor 'blk.1.attn_norm.weight'"):
        load(p)
    assert time.perf_counter() - t < 5


def test_a_bad_metadata_value_is_named_with_its_file(tiny, tmp_path):
    from wasmchord.errors import ConfigError
    p = rewrite(tiny, tmp_path / "zero.gguf", {"llama.attention.head_count": Typed(0, "uint32")})
    with pytest.raises(ConfigError, match=r"zero\.gguf: .*llama\.attention\.head_count"):
        load(p)


# ---------------------------------------------------------------------------- arguments

def test_bad_arguments_are_generation_errors(tiny):
    m = load(tiny)
    with pytest.raises(GenerationError, match="seed = -1"):
        m.generate("hi", max_tokens=2, seed=-1)
    with pytest.raises(GenerationError, match="stop = 5"):
        m.generate("hi", max_tokens=2, stop=5)


def test_load_of_none_names_what_it_expects():
    with pytest.raises(TypeError, match="expected a .gguf path or a known model alias"):
        Model.load(None)


def test_cli_seed_and_bench_lengths_are_one_line_errors(tiny):
    for args in (["generate", str(tiny), "hi", "--seed", "-1", "--backend", "cpu"],
                 ["bench", str(tiny), "--prompt-lengths", "a,b"], ["bench", str(tiny), "--gen-tokens", "0"],
                 ["generate", str(tiny), "hi", "--backend", "cpu", "--gpu-backend", "vulkan"]):
        r = subprocess.run([sys.executable, "-m", "wasmchord", *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------- conversions

def test_ctrl_c_in_the_converter_tool_is_one_line(hf_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.3, 0.6, 1.0):  # while the imports load, and later
        p = subprocess.Popen([sys.executable, str(ROOT / "tools" / "convert_model.py"), "--model", str(hf_dir),
                              "--output", str(tmp_path / "c.gguf"), "--force"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        if err.startswith("Fatal Python error: init_import_site") or (p.returncode == -signal.SIGINT and not err):
            continue  # the signal came while Python itself started, before any code of ours ran
        assert "Traceback" not in err, err
        assert (p.returncode, err) in ((0, ""), (130, "wasmchord: interrupted\n")), err
    assert [f.name for f in tmp_path.iterdir()] in ([], ["c.gguf"])


def test_a_killed_conversions_temporary_is_removed_by_the_next(hf_dir, tmp_path):
    out = tmp_path / "m.gguf"
    stale = temp_path(out)
    stale.write_bytes(b"\0" * 4096)  # as a killed writer leaves it: nobody holds its lock
    os.utime(stale, (time.time() - 60, time.time() - 60))
    convert(hf_dir, out, quant="f32")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.gguf"]


def test_a_live_writers_temporary_is_left_alone(hf_dir, tmp_path):
    import fcntl
    out = tmp_path / "m.gguf"
    live = temp_path(out)
    live.write_bytes(b"\0" * 4096)
    os.utime(live, (time.time() - 60, time.time() - 60))
    with open(live, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a writer at work
        convert(hf_dir, out, quant="f32")
        assert live.exists()


def test_converted_files_follow_the_umask(hf_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = convert(hf_dir, tmp_path / "m.gguf", quant="f32")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644  # mkstemp made it 0600 whatever the umask


def test_an_empty_metadata_key_is_dropped_by_the_helper(tiny, tmp_path):
    p = rewrite(tiny, tmp_path / "m.gguf", {"tokenizer.chat_template": DROP})
    assert "tokenizer.chat_template" not in GGUFFile(p).metadata

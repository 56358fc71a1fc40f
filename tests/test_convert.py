"""Conversion (Hugging Face -> GGUF), Phi-2, and the validator: against transformers, llama.cpp
(committed fixtures) and the source tokenizers; every bad input leaves no output file behind."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_hf import make_llama, make_phi2
from wasmchord import Model, Tokenizer
from wasmchord.convert import convert
from wasmchord.errors import ConvertError, GGUFError, UnsupportedError
from wasmchord.formats.gguf_writer import GGUFWriter
from wasmchord.validate import validate

FIXTURES = Path(__file__).parent / "fixtures"
MAKERS = {"llama": make_llama, "phi2": make_phi2}
CORPUS = [r["text"] for r in json.loads((FIXTURES / "tokenizer_gemma3-270m.json").read_text())["strings"]
          if "\x00" not in r["text"]]


def hf_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module", params=["llama", "phi2"])
def arch(request):
    return request.param


@pytest.mark.parametrize("quant,tol", [("f32", 1e-4), ("f16", 1e-2)])
def test_float_conversions_match_transformers(tmp_path, arch, quant, tol):
    # f32 on the widened (sensitive) model; f16 on the calm one, whose logits are not chaotic
    m = MAKERS[arch](tmp_path / "hf", calm=quant == "f16")
    out = convert(tmp_path / "hf", tmp_path / "m.gguf", quant=quant)
    ids = np.random.default_rng().integers(3, 250, size=40).tolist()
    ref, ours = hf_logits(m, ids), Model.load(out, device="cpu", weights="f32").logits(ids)
    assert np.abs(ours - ref).max() < tol * np.abs(ref).max()
    assert validate(out).ok


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1"])
def test_quantized_conversions_keep_the_argmax(tmp_path, arch, quant):
    m = MAKERS[arch](tmp_path / "hf", calm=True)
    out = convert(tmp_path / "hf", tmp_path / "m.gguf", quant=quant)
    seed = int(np.random.default_rng().integers(1 << 31))
    ids = np.random.default_rng(seed).integers(3, 250, size=200).tolist()
    ours, ref = Model.load(out, device="cpu").logits(ids), hf_logits(m, ids)
    # argmax agreement away from near-ties: the tiny model's top two logits are often within the
    # quantization's error (~1% of the logit scale; disagreements measured at margins up to 0.5%)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.01 * np.abs(ref).max()
    agree = ours.argmax(1) == ref.argmax(1)
    assert agree[clear].all() and clear.mean() > 0.5 and agree.mean() >= 0.9, (seed, agree.mean(), clear.mean())
    assert validate(out).ok


def test_converted_files_match_llama_cpp(tmp_path):
    """tools/make_convert_fixtures.py loaded the same (seeded) conversions in llama.cpp."""
    fx = np.load(FIXTURES / "llama_converted.npz")
    ids = fx["ids"].tolist()
    for name, make in (("llama", lambda d: make_llama(d, tokenizer="bytes")), ("phi2", make_phi2)):
        d = tmp_path / name
        make(d)
        for q in ("f32", "q8_0"):
            ours = Model.load(convert(d, d / f"{q}.gguf", quant=q), device="cpu").logits(ids)
            ref = fx[f"{name}_{q}"]
            if q == "f32":  # f32 weights multiply in f32 in llama.cpp, but its KV cache holds float16
                assert np.abs(ours - ref).max() < 1e-2 * np.abs(ref).max(), name
                assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.9999, name
            else:
                assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999, name
            assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.9, (name, q)


def test_sentencepiece_tokenizer_converts(tmp_path):
    import sentencepiece as spm
    make_llama(tmp_path / "hf")
    tok = Tokenizer.from_gguf(convert(tmp_path / "hf", tmp_path / "m.gguf", quant="f32"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model"))
    assert [t for t in CORPUS if tok.encode(t, add_bos=False) != sp.encode(t)] == []


def test_bpe_tokenizer_json_converts(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    make_phi2(tmp_path / "hf")
    tok = Tokenizer.from_gguf(convert(tmp_path / "hf", tmp_path / "m.gguf", quant="f32"))
    hf = HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    # HF matches added special tokens in raw text by default: our parse_special=True
    assert [t for t in CORPUS if tok.encode(t, add_bos=False, parse_special=True) != hf.encode(t).ids] == []


@pytest.mark.parametrize("split,pre", [("qwen2", "qwen2"), ("llama3", "llama-bpe")])
def test_a_split_regex_picks_llama_cpps_pre_tokenizer(tmp_path, split, pre):
    from tokenizers import Tokenizer as HFTokenizer
    from tiny_hf import make_qwen2
    make_qwen2(tmp_path / "hf", tokenizer=split)
    out = convert(tmp_path / "hf", tmp_path / "m.gguf", quant="f32")
    from wasmchord.formats.gguf import GGUFFile
    assert GGUFFile(out).metadata["tokenizer.ggml.pre"] == pre
    tok = Tokenizer.from_gguf(out)
    hf = HFTokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert [t for t in CORPUS if tok.encode(t, add_bos=False, parse_special=True) != hf.encode(t).ids] == []


def test_an_unknown_split_regex_is_named(tmp_path):
    from tiny_hf import make_qwen2
    make_qwen2(tmp_path / "hf", tokenizer="qwen2")
    tj = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+"
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UnsupportedError, match=r"Split regex '\\\\p\{L\}\+"):
        convert(tmp_path / "hf", tmp_path / "o.gguf")


def test_cli_and_tool_convert_and_validate(tmp_path):
    make_llama(tmp_path / "hf", tokenizer="bytes")
    out = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, "tools/convert_model.py", "--model", str(tmp_path / "hf"), "--output", str(out),
                        "--quant", "q8_0"], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "wasmchord", "validate", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and "valid" in r.stdout


# ---------------------------------------------------------------------------- validator

def test_validator_passes_both_real_models(smollm2_path, gemma_path):
    for p in (smollm2_path, gemma_path):
        rep = validate(p)
        assert rep.ok, rep.format()


def _converted(tmp_path):
    make_llama(tmp_path / "hf", tokenizer="bytes")
    return convert(tmp_path / "hf", tmp_path / "m.gguf", quant="f32")


def test_validator_catches_a_truncated_file(tmp_path):
    p = _converted(tmp_path)
    p.write_bytes(p.read_bytes()[:-1000])
    rep = validate(p)
    assert not rep.ok and "structure" in rep.problems[0]
    r = subprocess.run([sys.executable, "tools/validate_gguf.py", str(p)], capture_output=True, text=True,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_validator_catches_wrong_shapes_missing_keys_and_nan(tmp_path):
    from wasmchord.formats.gguf import GGUFFile
    src = GGUFFile(_converted(tmp_path))

    def rewrite(path, *, drop_key=None, shape_of=None, nan_in=None):
        w = GGUFWriter(None)
        for k, v in src.metadata.items():
            if k != drop_key:
                w.add(k, v)
        for name, ti in src.tensors.items():
            a = src.dequantize(name)
            if name == shape_of:
                a = a[:-1]
            if name == nan_in:
                a = a.copy()
                a.flat[3] = np.nan
            w.add_tensor(name, a, qtype="F32")
        w.write(path)
        return validate(path)

    rep = rewrite(tmp_path / "a.gguf", drop_key="llama.block_count")
    assert not rep.ok and any("llama.block_count" in p for p in rep.problems)
    rep = rewrite(tmp_path / "b.gguf", shape_of="blk.1.ffn_up.weight")
    assert not rep.ok and any("blk.1.ffn_up.weight" in p for p in rep.problems)
    with pytest.raises(GGUFError, match="blk.1.ffn_up.weight"):  # the loader holds files to the same shapes
        Model.load(tmp_path / "b.gguf", device="cpu")
    rep = rewrite(tmp_path / "c.gguf", nan_in="blk.0.attn_norm.weight")
    assert not rep.ok and any("blk.0.attn_norm.weight" in p for p in rep.problems)


# ---------------------------------------------------------------------------- bad input

@pytest.fixture
def hf_dir(tmp_path):
    make_llama(tmp_path / "hf", tokenizer="bytes")
    return tmp_path / "hf"


def _no_output(tmp_path):
    return not list(tmp_path.glob("*.gguf*"))


def test_missing_config(tmp_path, hf_dir):
    (hf_dir / "config.json").unlink()
    with pytest.raises(ConvertError, match="config.json"):
        convert(hf_dir, tmp_path / "o.gguf")
    assert _no_output(tmp_path)


def test_missing_weights(tmp_path, hf_dir):
    for f in hf_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConvertError, match="no weights"):
        convert(hf_dir, tmp_path / "o.gguf")
    assert _no_output(tmp_path)


def test_unsupported_model_type_lists_the_supported_ones(tmp_path, hf_dir):
    c = json.loads((hf_dir / "config.json").read_text())
    c["architectures"], c["model_type"] = ["MambaForCausalLM"], "mamba"
    (hf_dir / "config.json").write_text(json.dumps(c))
    with pytest.raises(UnsupportedError, match="'mamba'.*supported model types: llama, mistral, qwen2, qwen3, phi, phi3"):
        convert(hf_dir, tmp_path / "o.gguf")
    assert _no_output(tmp_path)


def _edit_tensors(hf_dir, edit):
    from safetensors.numpy import load_file, save_file
    f = next(hf_dir.glob("*.safetensors"))
    t = load_file(f)
    edit(t)
    save_file(t, f)


def test_missing_tensor(tmp_path, hf_dir):
    _edit_tensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConvertError, match="blk.1.ffn_up.weight"):
        convert(hf_dir, tmp_path / "o.gguf")
    assert _no_output(tmp_path)


def test_extra_tensor(tmp_path, hf_dir):
    _edit_tensors(hf_dir, lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", np.zeros((2, 2), np.float32)))
    with pytest.raises(ConvertError, match="unexpected tensors.*layers.7"):
        convert(hf_dir, tmp_path / "o.gguf")


def test_shape_mismatch(tmp_path, hf_dir):
    _edit_tensors(hf_dir, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", np.zeros((95, 64), np.float32)))
    with pytest.raises(ConvertError, match="up_proj.*does not match config.json"):
        convert(hf_dir, tmp_path / "o.gguf")
    assert _no_output(tmp_path)


def test_unknown_quant_missing_dir_and_existing_output(tmp_path, hf_dir):
    with pytest.raises(UnsupportedError, match="q3_x"):
        convert(hf_dir, tmp_path / "o.gguf", quant="q3_x")
    with pytest.raises(ConvertError, match="does not exist"):
        convert(hf_dir, tmp_path / "nowhere" / "o.gguf")
    (tmp_path / "o.gguf").write_bytes(b"keep me")
    with pytest.raises(ConvertError, match="--force"):
        convert(hf_dir, tmp_path / "o.gguf")
    assert (tmp_path / "o.gguf").read_bytes() == b"keep me"
    convert(hf_dir, tmp_path / "o.gguf", force=True)
    assert validate(tmp_path / "o.gguf").ok


def test_broken_checkpoint_files_are_named(tmp_path, hf_dir):
    """Each is a ConvertError or TokenizerError naming the file and what is wrong, no output left."""
    from wasmchord.errors import TokenizerError
    st = next(hf_dir.glob("*.safetensors"))
    whole = st.read_bytes()
    cases = [
        (lambda: st.write_bytes(whole[:len(whole) * 2 // 3]), ConvertError, "extends past the end of the file"),
        (lambda: _edit_tensors(hf_dir, lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((1, 2), np.nan)),
         ConvertError, "'model.layers.0.mlp.down_proj.weight' holds 1 NaN or Inf values"),
        (lambda: (hf_dir / "config.json").write_text("[1, 2]"), ConvertError, "config.json: expected a JSON object"),
        (lambda: (hf_dir / "tokenizer.json").write_text('{"model": 5}'), TokenizerError,
         'tokenizer.json: expected an object with a "model" object'),
    ]
    for spoil, kind, needle in cases:
        saved = {f: f.read_bytes() for f in hf_dir.iterdir()}
        spoil()
        with pytest.raises(kind, match=needle):
            convert(hf_dir, tmp_path / "o.gguf", quant="q8_0")
        assert _no_output(tmp_path)
        for f, b in saved.items():
            f.write_bytes(b)
    sp = tmp_path / "sp"
    make_llama(sp, tokenizer="spm")
    (sp / "tokenizer.model").write_text("not a model")
    with pytest.raises(TokenizerError, match="tokenizer.model: not a SentencePiece model"):
        convert(sp, tmp_path / "o.gguf")


def test_an_output_that_is_not_a_regular_file_is_never_replaced(tmp_path, hf_dir):
    """--force replaces a file; a device or a pipe there is refused (as root, /dev/null would go); a
    symbolic link is written through, to the file it points to."""
    import os
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ConvertError, match="pipe.gguf exists and is not a regular file"):
        convert(hf_dir, fifo, force=True)
    assert fifo.is_fifo()
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "real.gguf")
    convert(hf_dir, link, force=True)
    assert link.is_symlink() and validate(tmp_path / "real.gguf").ok


def test_failure_while_writing_leaves_no_partial_file(tmp_path, hf_dir, monkeypatch):
    import wasmchord.convert as cv
    calls = {"n": 0}
    orig = cv.permute_qk

    def boom(*a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return orig(*a)
    monkeypatch.setattr(cv, "permute_qk", boom)
    with pytest.raises(RuntimeError):
        convert(hf_dir, tmp_path / "o.gguf")
    assert _no_output(tmp_path)


def test_cli_convert_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "wasmchord", "convert", "--model", str(tmp_path), "--output",
                        str(tmp_path / "o.gguf")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "config.json" in r.stderr
    make_phi2(tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    r = subprocess.run([sys.executable, "-m", "wasmchord", "convert", "--model", str(tmp_path / "hf"), "--output",
                        str(tmp_path / "taken"), "--force"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "taken is a directory" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "taken"]  # nothing written beside it


@pytest.mark.gpu
def test_phi2_on_the_gpu_matches_the_cpu(tmp_path, gpu_backend):
    make_phi2(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "m.gguf", quant="q8_0")
    ids = np.random.default_rng().integers(3, 250, size=9).tolist()
    g, c = Model.load(out, device="gpu"), Model.load(out, device="cpu")
    lg, lc = g.logits(ids), c.logits(ids)
    assert np.abs(lg - lc).max() < 1e-3 * np.abs(lc).max()
    assert g.generate(ids, max_tokens=5, temperature=0).tokens == c.generate(ids, max_tokens=5, temperature=0).tokens

"""Llama-3, Mistral, Qwen2, Qwen3 and Phi-3 through the converter and the graph: tiny random Hugging
Face checkpoints (tests/tiny_hf.py VARIANTS) -> `wasmchord convert` -> logits and greedy tokens equal
transformers float32 on both backends; llama.cpp loads the same files (committed fixture from
tools/make_convert_fixtures.py) and gives transformers' greedy tokens."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_hf import LLAMA3_ROPE, VARIANTS
from wasmchord import Model
from wasmchord.convert import convert
from wasmchord.errors import ConvertError, GGUFError, UnsupportedError
from wasmchord.formats.gguf import GGUFFile
from wasmchord.formats.gguf_writer import GGUFWriter
from wasmchord.hf_models import llama3_rope_factors

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-4  # relative to the largest logit
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


def hf_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(m, ids, n):
    with torch.no_grad():
        return m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def _load(path, device, request, **kw):
    if device == "gpu":
        request.getfixturevalue("gpu_backend")  # a missing adapter fails under CI
    return Model.load(path, device=device, **kw)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (HF model, f32 GGUF path) for the widened variants (sensitive logits), built once."""
    out = {}
    for name, make in VARIANTS.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = make(d / "hf"), convert(d / "hf", d / "m.gguf", quant="f32")
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers(converted, name, device, request):
    hf, path = converted[name]
    m = _load(path, device, request, context_length=64)
    ids = np.random.default_rng(1).integers(3, hf.config.vocab_size, size=23).tolist()  # past mistral_swa's window 8
    ref, ours = hf_logits(hf, ids), m.logits(ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < TOL * np.abs(ref).max()


@pytest.mark.parametrize("device", DEVICES)
def test_phi3_longrope_takes_the_long_factors_past_the_original_context(converted, device, request):
    """transformers uses the long factors once a sequence is longer than the original 64 positions;
    we (as llama.cpp) once the context is: a 256-position context and an 80-token prompt agree."""
    hf, path = converted["phi3_longrope"]
    m = _load(path, device, request, context_length=256)
    assert m.transformer.rope_ext["factors"] == pytest.approx(hf.config.rope_parameters["long_factor"])
    ids = np.random.default_rng(2).integers(3, hf.config.vocab_size, size=80).tolist()
    ref, ours = hf_logits(hf, ids), m.logits(ids)
    assert np.abs(ours - ref).max() < TOL * np.abs(ref).max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_decoding_matches_transformers(converted, name, device, request):
    """The decode path (KV cache; on the GPU fused decode attention and replayed steps), token for token
    (these steps' top-2 margins are at least 0.5% of the logit scale; we differ by about 3e-6)."""
    hf, path = converted[name]
    m = _load(path, device, request, context_length=64)
    ids = np.random.default_rng(3).integers(3, hf.config.vocab_size, size=6).tolist()
    assert m.generate(ids, max_tokens=12, temperature=0).tokens == hf_greedy(hf, ids, 12)


def test_llama3_rope_factors_equal_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rp = {**LLAMA3_ROPE, "rope_theta": 500000.0}
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=rp, max_position_embeddings=256)
    inv_hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    f = llama3_rope_factors(rp, 128)
    inv = 500000.0 ** (-np.arange(0, 128, 2) / 128) / f
    assert len({1.0, 8.0} & set(f.tolist())) == 2 and ((f > 1) & (f < 8)).any()  # all three bands
    np.testing.assert_allclose(inv, inv_hf.numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------- llama.cpp

def test_llama_cpp_loads_the_converted_files_and_agrees(converted):
    """tools/make_convert_fixtures.py converted the same seeded checkpoints, ran them in llama.cpp
    (float32 KV cache) and checked that its greedy tokens equal transformers'. Each file is loaded
    with llama.cpp's context (which decides longrope's factors)."""
    fx = np.load(FIXTURES / "llama_converted.npz")
    meta = json.loads(bytes(fx["meta"]).decode())["variants"]
    ids = fx["ids"].tolist()
    assert set(meta) == set(VARIANTS)
    for name, v in meta.items():
        m = Model.load(converted[name][1], device="cpu", context_length=v["context"])
        ref = fx[f"{name}_f32"][:v["positions"]]  # mistral_swa: llama.cpp ignores a llama file's window
        assert np.abs(m.logits(ids)[:v["positions"]] - ref).max() < TOL * np.abs(ref).max(), name  # measured: <= 4.3e-6
        if v["greedy"]:
            want = fx[f"{name}_greedy"].tolist()  # transformers' (the tool checked), up to its end token
            prompt = (ids * 5)[:v["prompt"]]
            ours = m.generate(prompt, max_tokens=len(want), temperature=0).tokens
            assert ours == want[:len(ours)] and len(ours) >= len(want) - 1, name


# ---------------------------------------------------------------------------- bad input

def _rewrite(src: Path, dst: Path, *, drop=(), md=None) -> Path:
    """A copy of GGUF `src` without the tensors `drop`, with metadata updated by `md`."""
    gf = GGUFFile(src)
    w = GGUFWriter(None)
    for k, v in {**gf.metadata, **(md or {})}.items():
        w.add(k, v)
    for name in gf.tensors:
        if name not in drop:
            w.add_tensor(name, gf.dequantize(name), qtype="F32")
    w.write(dst)
    return dst


@pytest.mark.parametrize("name,tensor", [
    ("qwen3", "blk.1.attn_k_norm.weight"),        # per-head k norm
    ("qwen2", "blk.0.attn_v.bias"),               # one of the q/k/v biases
    ("phi3", "blk.1.ffn_up.weight"),              # the fused gate | up
    ("phi3_longrope", "rope_factors_short.weight"),
])
def test_a_missing_tensor_the_variant_needs_is_named(converted, tmp_path, name, tensor):
    bad = _rewrite(converted[name][1], tmp_path / "bad.gguf", drop=[tensor])
    with pytest.raises(GGUFError, match=tensor.replace(".", r"\.")):
        Model.load(bad, device="cpu")


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_a_rope_scaling_type_we_do_not_implement_is_named(converted, tmp_path, kind):
    bad = _rewrite(converted["qwen2"][1], tmp_path / "bad.gguf",
                   md={"qwen2.rope.scaling.type": kind, "qwen2.rope.scaling.factor": 4.0})
    with pytest.raises(UnsupportedError, match=f"rope.scaling.type = '{kind}'"):
        Model.load(bad, device="cpu")


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "llama3"])
def test_the_converter_names_a_rope_scaling_it_does_not_convert(tmp_path, kind):
    VARIANTS["qwen2"](tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    c["rope_parameters"] = {**c["rope_parameters"], "rope_type": kind, "factor": 4.0,
                            "original_max_position_embeddings": 64}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(c))
    with pytest.raises(UnsupportedError, match=f"RoPE scaling '{kind}'"):
        convert(tmp_path / "hf", tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_the_converter_refuses_qwen_sliding_window_layers(tmp_path):
    VARIANTS["qwen2"](tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    c.update(use_sliding_window=True, sliding_window=16)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(c))
    with pytest.raises(UnsupportedError, match="sliding"):
        convert(tmp_path / "hf", tmp_path / "o.gguf")


def test_wrong_longrope_factor_count_is_named(tmp_path):
    VARIANTS["phi3_longrope"](tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    c["rope_parameters"]["long_factor"] = c["rope_parameters"]["long_factor"][:5]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConvertError, match="long_factor has 5 values, expected 8"):
        convert(tmp_path / "hf", tmp_path / "o.gguf")

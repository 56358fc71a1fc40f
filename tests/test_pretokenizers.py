"""Every BPE pre-tokenizer llama.cpp knows: the same small vocabularies under each `tokenizer.ggml.pre`
name give llama.cpp's ids (fixture by tools/make_pretokenizer_fixtures.py, names read from
llama.cpp's source); an unknown name stays an error naming it."""

import json
from pathlib import Path

import numpy as np
import pytest

from wasmchord.errors import UnsupportedError
from wasmchord.text.pretokenize import NAMES
from wasmchord.text.tokenizer import Tokenizer

FX = json.loads((Path(__file__).parent / "fixtures" / "pretokenizers.json").read_text(encoding="utf-8"))


def tokenizer(name: str) -> Tokenizer:
    v = FX["vocabs"][FX["by_name"][name]["vocab"]]
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name, "tokenizer.ggml.tokens": v["tokens"],
        "tokenizer.ggml.token_type": np.array(v["types"], np.int32), "tokenizer.ggml.merges": v["merges"],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": False})


def test_every_name_llama_cpp_knows_is_in_the_table():
    assert len(FX["names"]) >= 90
    assert [n for n in FX["names"] if n not in NAMES] == []


def test_the_fixture_tells_pre_tokenizers_apart():
    """The vocabularies' merges cross split points, so pre-tokenizers that split differently give
    different ids (a fixture where they all agreed would test nothing)."""
    assert len(FX["outputs"]) >= 20


@pytest.mark.parametrize("name", FX["names"])
def test_ids_equal_llama_cpp(name):
    tok = tokenizer(name)
    want = FX["outputs"][FX["by_name"][name]["output"]]
    bad = [(s, ids) for s, ids in zip(FX["strings"], want) if ids is not None and tok.encode(s, add_bos=False) != ids]
    assert [s for s, _ in bad] == []


@pytest.mark.parametrize("name", ["deepseek-llm", "deepseek-coder", "falcon", "qwen35", "gemma4"])
def test_decode_roundtrips(name):
    """(skip_special=False: merging can spell a control token's text, e.g. "<s>".)"""
    tok = tokenizer(name)
    texts = [s for s in FX["strings"] if s.isprintable()]
    assert [s for s in texts if tok.decode(tok.encode(s, add_bos=False), skip_special=False) != s] == []


def test_unknown_pre_tokenizer_is_named_with_the_known_ones():
    with pytest.raises(UnsupportedError, match="'martian'; supported: .*deepseek-llm"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
                                 "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.pre": "martian"})

"""Tokenizer parity: llama.cpp fixtures on the three real models, sentencepiece on a trained model, streaming."""

import json
from pathlib import Path

import numpy as np
import pytest

from wasmchord.errors import TokenizerError, UnsupportedError
from wasmchord.formats.gguf_writer import GGUFWriter
from wasmchord.text.tokenizer import BYTE, Tokenizer
from wasmchord.text.vocab_export import sentencepiece_metadata

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-1.5b-instruct"]


def fixture(alias):
    return json.loads((FIXTURES / f"tokenizer_{alias}.json").read_text(encoding="utf-8"))["strings"]


@pytest.fixture(scope="module", params=MODELS)
def tok_and_rows(request):
    return Tokenizer.from_gguf(request.param), fixture(request.param)


def test_corpus_is_large_and_diverse():
    rows = fixture("smollm2-135m-instruct")
    assert len(rows) >= 300
    texts = [r["text"] for r in rows]
    assert "" in texts and any(len(t) >= 1000 for t in texts) and any("‍" in t for t in texts)


def test_ids_equal_llama_cpp(tok_and_rows):
    tok, rows = tok_and_rows
    bad = [r["text"] for r in rows if tok.encode(r["text"]) != r["ids"]]
    assert bad == []


def test_ids_with_parse_special_equal_llama_cpp(tok_and_rows):
    tok, rows = tok_and_rows
    bad = [r["text"] for r in rows if tok.encode(r["text"], parse_special=True) != r["ids_special"]]
    assert bad == []


def test_decode_roundtrips_where_llama_cpp_does(tok_and_rows):
    tok, rows = tok_and_rows
    held = [r for r in rows if r["llama_roundtrip"]]
    assert len(held) > 300
    assert [r["text"] for r in held if tok.decode(r["ids"]) != r["text"]] == []


def test_streaming_decoder_concatenation_equals_decode(tok_and_rows):
    tok, rows = tok_and_rows
    for r in rows:
        ids = tok.encode(r["text"], parse_special=True)
        d = tok.stream()
        streamed = "".join(d.add_token(i) for i in ids) + d.flush()
        assert streamed == tok.decode(ids), r["text"]


def test_streaming_holds_back_split_utf8_characters():
    tok = Tokenizer.from_gguf("smollm2-135m-instruct")
    ids = tok.encode("😀")  # byte-level BPE: one emoji, several tokens
    assert len(ids) > 1
    d = tok.stream()
    parts = [d.add_token(i) for i in ids]
    assert parts[:-1] == [""] * (len(ids) - 1) and parts[-1] == "😀" and d.flush() == ""


def test_special_token_properties():
    s = Tokenizer.from_gguf("smollm2-135m-instruct")
    assert (s.bos_id, s.eos_id, s.vocab_size) == (1, 2, 49152)
    assert s.token(1) == "<|im_start|>" and s.tokens.index("<|im_end|>") in s.eot_ids
    g = Tokenizer.from_gguf("gemma3-270m")
    assert (g.bos_id, g.eos_id, g.vocab_size) == (2, 1, 262144)
    assert g.vocab["<end_of_turn>"] in g.eot_ids and 1 in g.eot_ids


def test_qwen_special_tokens():
    q = Tokenizer.from_gguf("qwen2.5-coder-1.5b-instruct")
    assert (q.bos_id, q.eos_id, q.vocab_size) == (151643, 151645, 151936)
    assert q.vocab["<|im_end|>"] in q.eot_ids and q.vocab["<|endoftext|>"] in q.eot_ids
    assert q.encode("hi") == q.encode("hi", add_bos=False)  # add_bos_token is false
    assert q.encode("<|im_start|>user", parse_special=True)[0] == q.vocab["<|im_start|>"]


def test_add_bos_follows_metadata_unless_given():
    g = Tokenizer.from_gguf("gemma3-270m")
    assert g.encode("hi")[0] == 2 and g.encode("hi", add_bos=False)[0] != 2
    s = Tokenizer.from_gguf("smollm2-135m-instruct")
    assert s.encode("hi")[0] != 1 and s.encode("hi", add_bos=True)[0] == 1


def test_decode_skip_special():
    s = Tokenizer.from_gguf("smollm2-135m-instruct")
    ids = s.encode("<|im_start|>user", parse_special=True)
    assert s.decode(ids) == "user" and s.decode(ids, skip_special=False) == "<|im_start|>user"


# ---------------------------------------------------------------------------- bad input

def test_non_string_text_is_a_type_error():
    tok = Tokenizer.from_gguf("smollm2-135m-instruct")
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"bytes")


@pytest.mark.parametrize("bad", [-1, 49152, 10**9])
def test_out_of_range_ids_are_named(bad):
    tok = Tokenizer.from_gguf("smollm2-135m-instruct")
    for use in (lambda: tok.decode([5, bad]), lambda: tok.is_special(bad), lambda: tok.token(bad)):
        with pytest.raises(TokenizerError, match=f"token id {bad} is out of range"):
            use()


def test_lone_surrogates_become_replacement_character():
    tok = Tokenizer.from_gguf("smollm2-135m-instruct")
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


def test_gguf_without_tokenizer(tmp_path):
    w = GGUFWriter("llama")
    w.add_tensor("x", np.zeros(32, np.float32))
    w.write(tmp_path / "n.gguf")
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_gguf(tmp_path / "n.gguf")


def test_unknown_pre_tokenizer_is_named():
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b"],
          "tokenizer.ggml.pre": "martian"}
    with pytest.raises(UnsupportedError, match="martian"):
        Tokenizer.from_metadata(md)


# ---------------------------------------------------------------------------- sentencepiece parity

@pytest.fixture(scope="module")
def trained_spm(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("spm")
    rows = fixture("gemma3-270m")
    text = "\n".join(r["text"] for r in rows if "\n" not in r["text"] and r["text"].strip())
    (d / "train.txt").write_text(text * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "m"), vocab_size=1200, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=False, minloglevel=2, num_threads=1)
    w = GGUFWriter("llama")
    for k, v in sentencepiece_metadata(d / "m.model", add_bos=False).items():
        w.add(k, v)
    w.write(d / "tok.gguf")
    return spm.SentencePieceProcessor(model_file=str(d / "m.model")), Tokenizer.from_gguf(d / "tok.gguf"), rows


def test_sentencepiece_ids_equal_ours(trained_spm):
    sp, tok, rows = trained_spm
    texts = [r["text"] for r in rows if "\x00" not in r["text"]]
    bad = [t for t in texts if tok.encode(t) != sp.encode(t)]
    assert bad == []
    # the corpus reaches byte fallback (characters outside the trained coverage)
    assert any(tok.types[i] == BYTE for t in texts for i in tok.encode(t))


def test_sentencepiece_decode_roundtrip(trained_spm):
    sp, tok, rows = trained_spm
    for r in rows:
        t = r["text"]
        if "\x00" in t:
            continue
        assert tok.decode(tok.encode(t)) == sp.decode(sp.encode(t)), t

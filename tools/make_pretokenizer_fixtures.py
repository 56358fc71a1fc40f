"""llama.cpp's token ids for every BPE pre-tokenizer it knows (needs llama-cpp-python, tokenizers).

Two small vocabularies are trained here on the tokenizer corpus without any pre-splitting, so that
their merges cross the places where pre-tokenizers split (a space and the word after it, a letter
and a digit, punctuation and letters): a GPT-2 byte-level one, and a raw UTF-8 one with <0xXX> byte
tokens and U+2581 for spaces (gemma4-style). For each `tokenizer.ggml.pre` name, a vocabulary-only
GGUF file is written with it and llama.cpp tokenizes every string. Output:
tests/fixtures/pretokenizers.json (the vocabularies, the strings, llama.cpp's ids per name).

The names are read from llama.cpp's own source (src/llama-vocab.cpp: every `tokenizer_pre == "..."`),
the llama.cpp that llama-cpp-python vendors: pass its directory (the sdist's vendor/llama.cpp).

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python tools/make_pretokenizer_fixtures.py llama_cpp_python-0.3.36/vendor/llama.cpp
"""

import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import llama_cpp  # noqa: E402
from tokenizer_corpus import corpus  # noqa: E402

from wasmchord.formats.gguf_writer import GGUFWriter  # noqa: E402
from wasmchord.text.pretokenize import NAMES, RAW_UTF8  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "pretokenizers.json"

# What the regexes of the less common pre-tokenizers single out: digit groups, CJK, Hangul, Kana and
# Han next to Latin (deepseek, kimi-k2, youtu, afmoe), letter cases (tekken, gpt-4o), combining marks
# (qwen35, granite), Chameleon's image and sentinel tokens, non-ASCII whitespace, newlines.
EXTRA = [
    "1234567 12 123456 1,234,567.89 0.5 ٣٤٥ ²³ Ⅻ 一二三", "year2024 v1.2.3 9999999999",
    "IMGIMGAZ IMGIMGABCDZ IMGIMGJZ <sentinel:42> <sentinel:x>",
    "你好世界，这是一个测试。日本語のテキスト、カタカナ。한국어 텍스트입니다. ㄱㄴㄷ ㄅㄆㄇ",
    "Hello世界It'S 123456 the中文words", "ภาษาไทย ភាសាខ្មែរ မြန်မာ ꩠꩡ",
    "e\u0301te\u0301 n\u0303o hindi हिन्दी العَرَبِيَّة", "HTTPServer camelCase XMLHttpRequest ÉCOLE École ÆON",
    "a\u3000b\u00a0c\u3000。x ／：～！ 「引用」", "end  \n  next\u2028line\u0085nel", "I'M HE'LL they'RE We'Ve",
    ".net #hash @user -flag ~/path $HOME", "hello\r\nworld\rx\n\n\n y", "   \t\n\u3000 ", "αβγ ΑΒΓ Ωμέγα",
    "camelCase getHTTPResponseCode parseXmlDocument iPhone eBay McDonald lowerCase upperCase",
    "İstanbul'da Ankara'dan Türkiye'nin Ali'stan it'sthe we'dbe",
]


def names_from_source(llama_cpp_dir: Path) -> list[str]:
    src = (llama_cpp_dir / "src" / "llama-vocab.cpp").read_text()
    return sorted(set(re.findall(r'tokenizer_pre == "([^"]+)"', src)))


def train_vocab(texts, *, raw: bool) -> dict:
    """A BPE vocabulary trained without pre-splitting: tokens, token types and merges (GGUF layout)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from wasmchord.text.tokenizer import BYTE, CONTROL, NORMAL
    tok = Tokenizer(models.BPE())
    specials = ["<s>", "</s>"]
    if raw:  # raw UTF-8, spaces as U+2581, a limited alphabet: the rest falls back to <0xXX> tokens
        texts = [t.replace(" ", "\u2581") for t in texts]
        trainer = trainers.BpeTrainer(vocab_size=1400, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)],
                                      limit_alphabet=120, show_progress=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        trainer = trainers.BpeTrainer(vocab_size=1400, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [CONTROL if t in specials else BYTE if raw and re.fullmatch(r"<0x[0-9A-F]{2}>", t) else NORMAL
             for t in tokens]
    return {"tokens": tokens, "types": types, "merges": merges}


def vocab_file(path: Path, vocab: dict, pre: str) -> Path:
    w = GGUFWriter("llama")
    for k, v in {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                 "tokenizer.ggml.tokens": vocab["tokens"],
                 "tokenizer.ggml.token_type": np.array(vocab["types"], np.int32),
                 "tokenizer.ggml.merges": vocab["merges"], "tokenizer.ggml.bos_token_id": 0,
                 "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.add_bos_token": False}.items():
        w.add(k, v)
    w.write(path)
    return path


def main(llama_cpp_dir: str):
    names = names_from_source(Path(llama_cpp_dir))
    missing = [n for n in names if n not in NAMES]
    if missing:
        print(f"not in wasmchord.text.pretokenize.NAMES: {missing}", file=sys.stderr)
    strings = [s for s in corpus() if "\x00" not in s] + EXTRA
    train = strings + EXTRA * 5  # the targeted strings often enough that merges cross their split points
    vocabs = {"bytes": train_vocab(train, raw=False), "raw": train_vocab(train, raw=True)}
    outputs, by_name = [], {}
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            kind = "raw" if name in NAMES and NAMES[name].splits in RAW_UTF8 else "bytes"
            llm = llama_cpp.Llama(model_path=str(vocab_file(Path(d) / "v.gguf", vocabs[kind], name)),
                                  vocab_only=True, verbose=False)
            # "whitespace" is meant for its own tokenizer model: with a BPE one, llama.cpp aborts on a
            # word holding a space (find_bpe_rank's assert), so it only sees the strings without one.
            ids = [llm.tokenize(s.encode("utf-8"), add_bos=False, special=False)
                   if name != "whitespace" or " " not in s else None for s in strings]
            del llm
            if ids not in outputs:
                outputs.append(ids)
            by_name[name] = {"vocab": kind, "output": outputs.index(ids)}
            print(f"{name:28s} {kind:5s} output {by_name[name]['output']}")
    OUT.write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "names": names, "vocabs": vocabs,
                               "strings": strings, "outputs": outputs, "by_name": by_name},
                              ensure_ascii=False, separators=(",", ":")))
    print(f"{OUT}: {len(names)} names, {len(outputs)} distinct outputs, {OUT.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1])

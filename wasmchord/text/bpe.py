"""Byte-level BPE (GPT-2 style, `tokenizer.ggml.model = gpt2`), as llama.cpp's llm_tokenizer_bpe.

Text is split by the pre-tokenizer regexes chosen by `tokenizer.ggml.pre`, each piece is mapped
byte by byte to printable characters (GPT-2's bytes_to_unicode), then merged by rank.
"""

from __future__ import annotations

import regex

from ..errors import UnsupportedError

# llama.cpp src/llama-vocab.cpp, llm_tokenizer_bpe constructor: each pre-tokenizer is a list of
# regexes applied in turn; each one splits the pieces left by the previous one.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": _DEFAULT,
    "gpt2": [_GPT2], "gpt-2": [_GPT2], "mpt": [_GPT2], "olmo": [_GPT2], "jais": [_GPT2],
    "llama3": [_LLAMA3], "llama-bpe": [_LLAMA3], "llama-v3": [_LLAMA3], "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2], "qwen2.5": [_QWEN2], "deepseek-r1-qwen": [_QWEN2],
    # starcoder-style: every digit on its own first.
    "smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2],
    "command-r": [r"\p{N}", _GPT2], "codeshell": [r"\p{N}", _GPT2],
}
# llama.cpp sets ignore_merges for LLAMA3: a piece that is already a token is not re-merged.
IGNORE_MERGES = {"llama3", "llama-bpe", "llama-v3", "smaug-bpe"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
_BYTE_TABLE = [BYTE_TO_CHAR[b] for b in range(256)]


class BPEModel:
    """Merge-rank BPE over byte-mapped text. `vocab` maps token text to id (last duplicate wins)."""

    def __init__(self, vocab: dict[str, int], merges: list[str], pre: str):
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedError(f"unknown BPE pre-tokenizer tokenizer.ggml.pre = {pre!r}; "
                                   f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
        self.vocab = vocab
        self.pre = pre
        self.patterns = [regex.compile(p) for p in PRE_TOKENIZERS[pre]]
        self.ignore_merges = pre in IGNORE_MERGES
        self.ranks: dict[tuple[str, str], int] = {}
        for i, m in enumerate(merges):
            # llama.cpp splits at the first space after position 0 (a merge may start with a space char).
            pos = m.find(" ", 1)
            if pos > 0:
                self.ranks.setdefault((m[:pos], m[pos + 1:]), i)
        self.cache: dict[str, list[int]] = {}

    def pre_tokenize(self, text: str) -> list[str]:
        pieces = [text]
        for pat in self.patterns:
            out = []
            for piece in pieces:
                start = 0
                for m in pat.finditer(piece):
                    if m.start() > start:
                        out.append(piece[start:m.start()])
                    if m.end() > m.start():
                        out.append(m.group())
                    start = m.end()
                if start < len(piece):
                    out.append(piece[start:])
            pieces = out
        return pieces

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self.cache
        for piece in self.pre_tokenize(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._encode_word("".join([_BYTE_TABLE[b] for b in piece.encode("utf-8")]))
                if len(cache) < 200_000:
                    cache[piece] = ids
            out.extend(ids)
        return out

    def _encode_word(self, word: str) -> list[int]:
        vocab = self.vocab
        if self.ignore_merges and word in vocab:
            return [vocab[word]]
        syms = list(word)
        ranks = self.ranks
        while len(syms) > 1:
            best, best_rank = None, None
            for i in range(len(syms) - 1):
                r = ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            a, b = syms[best], syms[best + 1]
            merged, i = [], 0
            # Merge every non-overlapping occurrence, left to right (llama.cpp pops equal ranks by position).
            while i < len(syms):
                if i < len(syms) - 1 and syms[i] == a and syms[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        out = []
        for s in syms:
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
            else:  # llama.cpp: fall back to single-character tokens, dropping what is not in the vocab
                out.extend(vocab[c] for c in s if c in vocab)
        return out


def decode_piece(text: str) -> bytes:
    """A normal BPE token's text -> the bytes it stands for."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError:  # not byte-mapped (some vocabularies hold raw text): keep it as UTF-8
        return text.encode("utf-8")

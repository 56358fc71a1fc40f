"""Byte-level BPE (GPT-2 style, `tokenizer.ggml.model = gpt2`), as llama.cpp's llm_tokenizer_bpe.

Text is split by the pre-tokenizer regexes chosen by `tokenizer.ggml.pre` (pretokenize.py), each piece
is mapped byte by byte to printable characters (GPT-2's bytes_to_unicode), then merged by rank. A few
pre-tokenizers merge raw UTF-8 instead, with <0xXX> tokens for bytes the vocabulary lacks.
"""

from __future__ import annotations

from .pretokenize import RAW_UTF8, pre_tokenizer

ESCAPED_SPACE = "\u2581"  # SentencePiece-style BPE (gemma4 pre-tokenizer): spaces are written as U+2581


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
        self.vocab = vocab
        self.pre = pre
        flags, self.splitters = pre_tokenizer(pre)
        self.ignore_merges, self.escape_spaces = flags.ignore_merges, flags.escape_spaces
        self.add_bos, self.always_bos = flags.add_bos, flags.gemma4
        self.byte_encode = flags.splits not in RAW_UTF8
        self.newline_words = flags.gemma4  # a word of newlines that is a token stays whole
        self.ranks: dict[tuple[str, str], int] = {}
        for i, m in enumerate(merges):
            # llama.cpp splits at the first space after position 0 (a merge may start with a space char).
            pos = m.find(" ", 1)
            if pos > 0:
                self.ranks.setdefault((m[:pos], m[pos + 1:]), i)
        self.cache: dict[str, list[int]] = {}

    def pre_tokenize(self, text: str) -> list[str]:
        pieces = [text]
        for split in self.splitters:
            pieces = [w for piece in pieces for w in split(piece)]
        return pieces

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self.cache
        if self.escape_spaces:
            text = text.replace(" ", ESCAPED_SPACE)
        for piece in self.pre_tokenize(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._encode_word("".join([_BYTE_TABLE[b] for b in piece.encode("utf-8")])
                                        if self.byte_encode else piece)
                if len(cache) < 200_000:
                    cache[piece] = ids
            out.extend(ids)
        return out

    def _encode_word(self, word: str) -> list[int]:
        vocab = self.vocab
        if (self.ignore_merges or self.newline_words and not word.strip("\n")) and word in vocab:
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
            elif self.byte_encode:  # llama.cpp looks up each byte of the symbol alone: only ASCII ones can be tokens
                out.extend(vocab[c] for c in s if c.isascii() and c in vocab)
            else:  # raw UTF-8: byte tokens <0xXX>
                out.extend(vocab[t] for t in (f"<0x{b:02X}>" for b in s.encode("utf-8")) if t in vocab)
        return out


def decode_piece(text: str) -> bytes:
    """A normal BPE token's text -> the bytes it stands for."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError:  # not byte-mapped (some vocabularies hold raw text): keep it as UTF-8
        return text.encode("utf-8")

"""Tokenizer from GGUF metadata: encode, decode, streaming decode; SentencePiece or byte-level BPE.

Special-token handling follows llama.cpp's `tokenizer_st_partition`: before the text algorithm runs,
the text is cut at occurrences of special tokens, longest token first. User-defined tokens are always
matched; control tokens only with `parse_special=True`.
"""

from __future__ import annotations

import bisect
import codecs
import os
from typing import Iterable

import numpy as np
import regex

from ..errors import TokenizerError
from .bpe import BPEModel, decode_piece
from .spm import SPACE, SPMModel

# tokenizer.ggml.token_type values (llama.h `llama_token_type`)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp llama_vocab::impl::load: tokens found by their text that end generation, and FIM tokens.
# Each is forced to CONTROL type there ("control-looking token ... its type will be overridden"),
# which decides whether the text spelling is matched without parse_special.
EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>",
             "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<|fim_pad|>", "<fim-pad>", "<PAD>",
             "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<|file_sep|>"}
FIM_TEXTS = {"<|fim_prefix|>", "<fim-prefix>", "<｜fim▁begin｜>", "<PRE>", "<|fim_suffix|>", "<fim-suffix>",
             "<｜fim▁hole｜>", "<SUF>", "<|fim_middle|>", "<fim-middle>", "<｜fim▁end｜>", "<MID>"}
_SURROGATES = regex.compile(r"[\ud800-\udfff]")
_BYTE_TOKEN = regex.compile(r"<0x[0-9A-Fa-f]{2}>")


class _MetadataReader:
    """Typed reads of the tokenizer's metadata keys: a value of the wrong kind raises `TokenizerError`
    naming the key (metadata is file content, so any kind may arrive where another is expected)."""

    def __init__(self, md: dict, source: str):
        self.md, self.source = md, source

    def _bad(self, key, v, want):
        shown = f"a {type(v).__name__}" if isinstance(v, (list, np.ndarray)) else repr(v)[:60]
        raise TokenizerError(f"{self.source}: {key} is {shown}, expected {want}")

    def string(self, key, required=True):
        v = self.md.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, str):
            self._bad(key, v, "a string")
        return v

    def strings(self, key, required=True):
        v = self.md.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            self._bad(key, v, "an array of strings")
        return v

    def numbers(self, key, n, *, integer=False):
        """An optional numeric array of exactly n entries (None when absent)."""
        v = self.md.get(key)
        if v is None:
            return None
        want = f"an array of {'integers' if integer else 'numbers'}"
        if not isinstance(v, (list, np.ndarray)):
            self._bad(key, v, want)
        try:
            a = np.asarray(v)
        except (ValueError, TypeError):
            a = None
        if a is None or a.ndim != 1 or a.dtype.kind not in ("iu" if integer else "iuf"):
            self._bad(key, v, want)
        v = a
        if len(v) != n:
            raise TokenizerError(f"{self.source}: {key} has {len(v)} entries, tokenizer.ggml.tokens has {n}")
        return v

    def token_id(self, key, n):
        v = self.md.get(key)
        if v is None:
            return None
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            self._bad(key, v, "a token id (an integer)")
        if not 0 <= v < n:
            raise TokenizerError(f"{self.source}: {key} = {v} is outside the vocabulary (size {n})")
        return int(v)

    def flag(self, key, default: bool) -> bool:
        v = self.md.get(key, default)
        if not isinstance(v, (bool, int, np.bool_, np.integer)):
            self._bad(key, v, "a boolean")
        return bool(v)


class StreamingDecoder:
    """Turns token ids into text incrementally: `add_token(id)` returns newly completed text.

    UTF-8 characters split across tokens are held back until complete; `flush()` returns what is
    left (invalid bytes become U+FFFD). Concatenated output equals `Tokenizer.decode` of all ids.
    """

    def __init__(self, tok: "Tokenizer", *, skip_special: bool = True):
        self.tok, self.skip_special = tok, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True

    def add_token(self, token_id: int) -> str:
        piece = self.tok.token_bytes(token_id, skip_special=self.skip_special)
        if self._first and piece:
            piece = self.tok._strip_prefix_space(piece)
            self._first = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """A GGUF tokenizer. Build with `Tokenizer.from_gguf(path_or_alias)` or `from_metadata(md)`."""

    def __init__(self, md: dict, *, source: str = "metadata"):
        self.source = source
        model = md.get("tokenizer.ggml.model")
        tokens = md.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise TokenizerError(f"{source}: the file has no tokenizer "
                                 f"(missing {'tokenizer.ggml.model' if model is None else 'tokenizer.ggml.tokens'})")
        get = _MetadataReader(md, source)
        model = get.string("tokenizer.ggml.model")
        tokens = get.strings("tokenizer.ggml.tokens")
        n = len(tokens)
        if n == 0:
            raise TokenizerError(f"{source}: tokenizer.ggml.tokens is empty")
        types = get.numbers("tokenizer.ggml.token_type", n, integer=True)
        self.types = types.tolist() if types is not None else [NORMAL] * n
        # llama.cpp replaces empty token texts so that every text maps back to one id.
        self.tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.model = model
        special_id = get.token_id
        self.bos_id = special_id("tokenizer.ggml.bos_token_id", n)
        self.eos_id = special_id("tokenizer.ggml.eos_token_id", n)
        self.unk_id = special_id("tokenizer.ggml.unknown_token_id", n)
        self.add_eos = get.flag("tokenizer.ggml.add_eos_token", False)
        self.add_space_prefix = get.flag("tokenizer.ggml.add_space_prefix", model == "llama")
        self.chat_template = get.string("tokenizer.chat_template", required=False)

        if model == "llama":
            scores = get.numbers("tokenizer.ggml.scores", n)
            if types is not None:  # token_bytes() reads the byte of a BYTE token from its text
                bad = [i for i in np.flatnonzero(types == BYTE) if not _BYTE_TOKEN.fullmatch(self.tokens[i])]
                if bad:
                    raise TokenizerError(f"{source}: token {bad[0]} ({self.tokens[bad[0]][:40]!r}) has type BYTE "
                                         f"in tokenizer.ggml.token_type but is not of the form <0xNN>")
            self._algo = SPMModel(self.vocab, scores, self.unk_id)
        elif model == "gpt2":
            merges = get.strings("tokenizer.ggml.merges", required=False)
            if merges is None:
                raise TokenizerError(f"{source}: BPE tokenizer has no tokenizer.ggml.merges")
            self._algo = BPEModel(self.vocab, merges, get.string("tokenizer.ggml.pre", required=False) or "default")
        else:
            raise TokenizerError(f"{source}: tokenizer.ggml.model = {model!r} is not supported "
                                 f"(supported: 'llama' (SentencePiece), 'gpt2' (byte-level BPE))")

        # Without the key: SentencePiece adds BOS, BPE does where its pre-tokenizer says (llama-3, tekken).
        self.add_bos = (get.flag("tokenizer.ggml.add_bos_token", model == "llama" or getattr(self._algo, "add_bos", False))
                        or getattr(self._algo, "always_bos", False))
        eog = {self.eos_id, special_id("tokenizer.ggml.eot_token_id", n), special_id("tokenizer.ggml.eom_token_id", n)}
        eog |= {self.vocab[t] for t in EOG_TEXTS if t in self.vocab}
        for t in EOG_TEXTS | FIM_TEXTS:
            if t in self.vocab:
                self.types[self.vocab[t]] = CONTROL
        self.eot_ids: frozenset[int] = frozenset(i for i in eog if i is not None)

        # Special tokens, longest first (llama.cpp cache_special_tokens).
        special = [i for i, t in enumerate(self.types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        special.sort(key=lambda i: -len(self.tokens[i]))
        self._user_defined = [(self.tokens[i], i) for i in special if self.types[i] == USER_DEFINED]
        self._all_special = [(self.tokens[i], i) for i in special]
        self._user_defined_ids = frozenset(i for _, i in self._user_defined)
        self._control = [(t, i) for t, i in self._all_special if i not in self._user_defined_ids]

    @classmethod
    def from_gguf(cls, path_or_alias: str | os.PathLike) -> "Tokenizer":
        """Load only the tokenizer of a GGUF file (metadata; no tensor data is read).

        Raises:
            GGUFError: the file is missing or malformed.
            TokenizerError: the file has no tokenizer, or an inconsistent one.
            UnsupportedError: an unknown BPE pre-tokenizer.
        """
        from ..formats.gguf import GGUFFile
        from ..hub import resolve_model
        gf = GGUFFile(resolve_model(path_or_alias))
        return cls(gf.metadata, source=str(gf.path))

    from_metadata = classmethod(lambda cls, md, source="metadata": cls(md, source=source))

    # ------------------------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def special_tokens(self) -> list[tuple[str, int]]:
        """(text, id) of the tokens that only `parse_special=True` turns text into (control and unknown
        tokens; user-defined tokens are always matched), longest first."""
        return self._control

    def token(self, token_id: int) -> str:
        """The vocabulary text of a token."""
        return self.tokens[self.check_id(token_id)]

    def is_special(self, token_id: int) -> bool:
        return self.types[self.check_id(token_id)] in (CONTROL, UNKNOWN, UNUSED)

    def check_id(self, token_id) -> int:
        """`token_id` as an int.

        Raises:
            TypeError: not an integer.
            TokenizerError (a ValueError): not an id of this vocabulary (the message names it).
        """
        if isinstance(token_id, bool) or not isinstance(token_id, (int,)) and not hasattr(token_id, "__index__"):
            raise TypeError(f"token ids must be integers, got {type(token_id).__name__}")
        i = int(token_id)
        if not 0 <= i < len(self.tokens):
            raise TokenizerError(f"token id {i} is out of range: the vocabulary has ids 0..{len(self.tokens) - 1}")
        return i

    # ------------------------------------------------------------------------------------ encode
    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = False,
               plain_spans=()) -> list[int]:
        """Text -> token ids, as llama.cpp's `llama_tokenize`.

        Args:
            text: the text. Lone surrogates (not encodable as UTF-8) are replaced by U+FFFD.
            add_bos: prepend BOS; None follows `tokenizer.ggml.add_bos_token`.
            parse_special: turn control-token spellings in the text (e.g. `<|im_start|>`) into their ids.
            plain_spans: sorted, disjoint (start, end) ranges of `text` where parse_special does not
                apply (a chat message's content inside a rendered template).

        Raises:
            TypeError: `text` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                text = _SURROGATES.sub("\ufffd", text)
        add_bos = self.add_bos if add_bos is None else add_bos
        out: list[int] = []
        if add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        fragments = self._partition(text, self._all_special if parse_special else self._user_defined,
                                    plain_spans, self._user_defined_ids)
        if self.model == "llama":
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        frag = " " + frag
                    out.extend(self._algo.encode(frag.replace(" ", SPACE)))
                    prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out.extend(self._algo.encode(frag))
        if add_bos and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    @staticmethod
    def _partition(text: str, specials: list[tuple[str, int]], plain_spans=(),
                   always: frozenset = frozenset()) -> list[str | int]:
        """Cut text at special tokens, longest token first over all fragments (llama.cpp order). Inside
        `plain_spans` ((start, end) of text) only the tokens in `always` are cut out."""
        frags: list[tuple[int | None, str | int]] = [(0, text)] if text else []  # (offset in text, piece)
        starts = [s for s, _ in plain_spans]  # sorted, not overlapping: the last one starting before a
        ends = [e for _, e in plain_spans]    # match's end is the only one that can overlap it
        for tok_text, tid in specials:
            if tok_text not in text:
                continue
            guarded = bool(plain_spans) and tid not in always
            new: list[tuple[int | None, str | int]] = []
            for off, f in frags:
                if off is None or tok_text not in f:
                    new.append((off, f))
                    continue
                start, pos = 0, f.find(tok_text)
                while pos != -1:
                    a, b = off + pos, off + pos + len(tok_text)
                    if guarded and (j := bisect.bisect_left(starts, b) - 1) >= 0 and ends[j] > a:
                        pos = f.find(tok_text, pos + 1)
                        continue
                    if pos > start:
                        new.append((off + start, f[start:pos]))
                    new.append((None, tid))
                    start = pos + len(tok_text)
                    pos = f.find(tok_text, start)
                if start < len(f):
                    new.append((off + start, f[start:]))
            frags = new
        return [f for _, f in frags]

    # ------------------------------------------------------------------------------------ decode
    def token_bytes(self, token_id: int, *, skip_special: bool = True) -> bytes:
        """The bytes a token stands for (llama.cpp `token_to_piece`, without the leading-space strip)."""
        i = self.check_id(token_id)
        t, text = self.types[i], self.tokens[i]
        if t in (CONTROL, UNKNOWN, UNUSED):
            return b"" if skip_special else text.encode("utf-8")
        if t == USER_DEFINED:
            return text.encode("utf-8")
        if self.model == "llama" or not self._algo.byte_encode:  # SentencePiece, or BPE over raw UTF-8
            if t == BYTE:
                return bytes([int(text[3:5], 16)])
            return text.replace(SPACE, " ").encode("utf-8")
        return decode_piece(text)

    def _strip_prefix_space(self, piece: bytes) -> bytes:
        # The space SentencePiece added in front of the text is not part of it (llama.cpp detokenize).
        if self.model == "llama" and self.add_space_prefix and piece[:1] == b" ":
            return piece[1:]
        return piece

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Token ids -> text. Invalid UTF-8 (a character cut off at the end) becomes U+FFFD.

        Raises:
            ValueError: an id is negative or not in the vocabulary (the message names it).
        """
        d = StreamingDecoder(self, skip_special=skip_special)
        return "".join([d.add_token(i) for i in ids]) + d.flush()

    def stream(self, *, skip_special: bool = True) -> StreamingDecoder:
        """A fresh incremental decoder."""
        return StreamingDecoder(self, skip_special=skip_special)

    def __repr__(self):
        return f"Tokenizer({self.model}, vocab={self.vocab_size}, source={self.source!r})"

"""Constrained decoding: output that follows a JSON schema, a regex or a grammar, through llguidance.

A `Constraint` compiles what the caller asked for once; `matcher()` gives each sequence its own state,
which says before every step which tokens may come next (a bitmask over the vocabulary, applied to the
logits before sampling) and takes the token that came. End of generation is allowed only where the
grammar accepts. The token table llguidance needs is built from the GGUF vocabulary: each token's
bytes, control tokens marked so that they never match text.
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np

from .errors import GenerationError, UnsupportedError

log = logging.getLogger(__name__)
_tables: dict = {}
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_tables_lock = threading.Lock()


def _llg():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError as e:
        raise UnsupportedError(f"constrained decoding needs llguidance: pip install llguidance ({e})") from None
    return llguidance


class _Vocab:
    """What llguidance's TokenizerWrapper reads from a tokenizer object."""

    def __init__(self, tok):
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else next(iter(tok.eot_ids))
        self.bos_token_id = tok.bos_id
        self.special_token_ids = sorted(i for i in range(tok.vocab_size) if tok.is_special(i))
        special = set(self.special_token_ids)
        self.tokens = [(b"\xff" if i in special else b"") + tok.token_bytes(i, skip_special=False)
                       for i in range(tok.vocab_size)]
        self._tok = tok

    def __call__(self, s):
        text = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
        return self._tok.encode(text, add_bos=False)


def token_table(tokenizer):
    """llguidance's LLTokenizer for `tokenizer` (built once per tokenizer: ~0.1-1 s)."""
    llg = _llg()
    with _tables_lock:
        t = _tables.get(id(tokenizer))
        if t is None or t[0] is not tokenizer:
            from llguidance._tokenizer import TokenizerWrapper
            table = llg.LLTokenizer(TokenizerWrapper(_Vocab(tokenizer)), n_vocab=tokenizer.vocab_size,
                                    eos_token=sorted(tokenizer.eot_ids))
            t = _tables[id(tokenizer)] = (tokenizer, table)
        return t[1]


class Constraint:
    """A compiled constraint: exactly one of `json_schema` (a dict or JSON text), `regex`, `grammar`
    (Lark syntax, as llguidance reads it; GBNF is converted).

    Raises:
        GenerationError: more than one given, or the schema/regex/grammar is invalid (the message
            names the problem, never silently dropped)."""

    def __init__(self, tokenizer, *, json_schema=None, regex: str | None = None, grammar: str | None = None):
        given = {k: v for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
                 if v is not None}
        if len(given) != 1:
            raise GenerationError(f"give one of json_schema, regex, grammar (got {', '.join(given) or 'none'})")
        (self.kind, spec), = given.items()
        llg = _llg()
        try:
            if self.kind == "json_schema":
                if isinstance(spec, str):
                    spec = json.loads(spec)
                if spec is True:  # the boolean schema true: any JSON value
                    spec = {}
                if not isinstance(spec, dict):
                    raise ValueError("a JSON schema must be an object or true" + (
                        " (false admits no value)" if spec is False else f", got {type(spec).__name__}"))
                # one form of whitespace (as OpenAI's structured outputs write JSON): at temperature 1
                # a model may otherwise pad the value with whitespace until max_tokens
                self.source = llg.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_STYLE)
            elif self.kind == "regex":
                self.source = llg.LLMatcher.grammar_from_regex(str(spec))
            else:
                self.source = llg.grammar_from("grammar", str(spec))
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            raise GenerationError(f"{self.kind}: {e}") from None
        self.table = token_table(tokenizer)
        self.vocab = tokenizer.vocab_size
        bad, messages = llg.LLMatcher.validate_grammar_with_warnings(self.source, self.table)
        if bad:
            raise GenerationError(f"{self.kind} is invalid: {messages[0]}")
        for w in messages:
            if self.kind == "json_schema":  # an unsupported keyword would otherwise be ignored
                raise GenerationError(f"json_schema: {w}")
            log.warning("%s: %s", self.kind, w)

    @classmethod
    def from_options(cls, tokenizer, options: dict) -> "Constraint | None":
        """Pop json_schema / regex / grammar from `options`; a Constraint, or None when none was given.
        `constraint=` passes one built before (a server builds it off its event loop)."""
        spec = {k: options.pop(k) for k in ("json_schema", "regex", "grammar", "constraint") if k in options}
        spec = {k: v for k, v in spec.items() if v is not None}
        if "constraint" in spec:
            built = spec.pop("constraint")
            if spec or not isinstance(built, Constraint) or built.vocab != tokenizer.vocab_size:
                raise GenerationError("constraint= takes a Constraint built for this model's tokenizer, and no "
                                      "json_schema, regex or grammar besides")
            return built
        return cls(tokenizer, **spec) if spec else None

    def matcher(self) -> "Matcher":
        return Matcher(self)


def allowed(words: np.ndarray, vocab: int) -> np.ndarray:
    """A bitmask of words (see Matcher.words) as a bool [vocab] array."""
    return np.unpackbits(np.ascontiguousarray(words, np.int32).view(np.uint8), bitorder="little")[:vocab].astype(bool)


def apply_mask(logits: np.ndarray, words: np.ndarray) -> np.ndarray:
    """`logits` [vocab] with the tokens the bitmask leaves out at -inf (a copy)."""
    out = np.array(logits, np.float32)
    out[~allowed(words, out.shape[-1])] = -np.inf
    return out


class Matcher:
    """One sequence's place in the constraint."""

    def __init__(self, c: Constraint):
        llg = _llg()
        self.c = c
        self.m = llg.LLMatcher(c.table, c.source, log_level=0)
        if self.m.is_error():
            raise GenerationError(f"{c.kind}: {self.m.get_error().split(chr(10), 1)[0]}")
        self.bitmask = llg.numpy.allocate_token_bitmask(1, c.table.vocab_size)
        self._filled = False  # the bitmask is the current state's

    def words(self) -> np.ndarray:
        """The allowed tokens of the next step as a bitmask: int32 [ceil(vocab / 32)], bit i % 32 of
        word i / 32 set for an allowed token i (what the GPU sampler reads). Computed once per step:
        the batch engine asks for it while the device runs the step, and again to sample."""
        if not self._filled:
            _llg().numpy.fill_next_token_bitmask(self.m, self.bitmask, 0)
            self._filled = True
        return self.bitmask[0]

    def mask(self) -> np.ndarray:
        """The allowed tokens of the next step as a bool [vocab] array."""
        return allowed(self.words(), self.c.vocab)

    def consume(self, tok: int):
        self._filled = False
        if not self.m.consume_token(int(tok)):
            why = self.m.get_error().split("\n", 1)[0]  # the first line: the rest is llguidance's parser state
            raise GenerationError(f"{self.c.kind}: token {tok} does not fit the constraint: {why}")

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing more may follow."""
        return self.m.is_stopped()

"""Generation in three layers (mlx-lm style): token generator -> streaming chunks -> blocking call.

A `Sequence` owns what the KV cache holds: it remembers which tokens are in the cache, so a new prompt
that extends the previous one only evaluates the new tokens (multi-turn chat).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .errors import GenerationError
from .sampling import NON_FINITE, NOTHING_ALLOWED, SamplingParams, make_rng

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 256


@dataclass
class Stats:
    """What one generation cost; complete once the generation has finished."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the KV cache, not evaluated again
    prompt_eval_s: float = 0.0
    completion_tokens: int = 0
    eval_s: float = 0.0
    context_full: bool = False  # generation stopped because the context filled up


@dataclass
class Chunk:
    """One streamed piece: new text (may be empty while a character or stop string is pending).

    The last chunk has `finish_reason` ("stop" | "length") and the generation's `stats`."""

    text: str
    token: int | None
    finish_reason: str | None = None
    stats: Stats | None = None
    logprob: float | None = None          # the token's log-probability (when asked for: the engine's logprobs=)
    top_logprobs: list | None = None      # [(token id, log-probability)] of the most likely tokens


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prompt_eval_s: float
    eval_s: float
    cached_tokens: int = 0
    # with logprobs=k: per generated token, (its log-probability, [(token id, log-probability)] of the
    # k most likely), of the model's distribution before penalties and filters
    logprobs: list | None = None

    @classmethod
    def from_chunks(cls, chunks: Iterable[Chunk]) -> "Completion":
        """Run a stream to its end and gather its text, tokens, finish reason and statistics."""
        parts, tokens, lps, last = [], [], [], None
        for last in chunks:
            parts.append(last.text)
            if last.token is not None:
                tokens.append(last.token)
                if last.logprob is not None:
                    lps.append((last.logprob, last.top_logprobs))
        if last is None or last.stats is None:
            raise GenerationError("the stream ended before its last chunk (the one with finish_reason and stats)")
        s = last.stats
        return cls("".join(parts), tokens, last.finish_reason, s.prompt_tokens, s.completion_tokens,
                   s.prompt_eval_s, s.eval_s, s.cached_tokens, lps if lps else None)

    @property
    def prompt_tok_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_eval_s if self.prompt_eval_s > 0 else float("inf")

    @property
    def tok_per_s(self) -> float:
        return self.completion_tokens / self.eval_s if self.eval_s > 0 else float("inf")


INTERLEAVED = ("this generation's KV cache was used by another generation meanwhile (two streams interleaved on "
               "one sequence, or a slot shared with a running engine): start it again, or give each its own "
               "sequence (Model.start_chat, or sequence=)")


class Sequence:
    """The tokens one sequence holds in a slot of the transformer's KV cache. `reset()` forgets them.

    Several sequences may share a slot; the transformer records which sequence wrote it last, and a
    sequence that finds its slot taken over starts from scratch. One sequence runs one generation at a
    time: `live` marks the current one, and a generation that finds another began on its sequence
    (or its slot taken over) stops with an error rather than continue from someone else's cache."""

    def __init__(self, transformer, slot: int = 0):
        if not 0 <= slot < transformer.slots:
            raise GenerationError(f"slot {slot} does not exist: the model has {transformer.slots} KV cache slots")
        self.transformer, self.slot = transformer, slot
        self.tokens: list[int] = []
        self.live = None  # the generation running on this sequence (see generate_tokens)

    def reset(self):
        self.tokens = []

    @property
    def n_ctx(self) -> int:
        return self.transformer.max_ctx

    def holds_cache(self) -> bool:
        """Whether the slot still holds this sequence's tokens (no other sequence wrote it since)."""
        return self.transformer.owners[self.slot] is self

    def claim(self):
        """Take the slot; the tokens are forgotten if another sequence wrote it since, and a generation
        running on this sequence is over."""
        owners = self.transformer.owners
        if owners[self.slot] is not self:
            self.tokens = []
        owners[self.slot] = self
        self.live = None

    def evaluate(self, ids: list[int], *, hidden: list | None = None) -> np.ndarray:
        """Logits [len(ids), vocab] (float32, on the host) of `ids` from position 0; the cache then holds
        exactly `ids`. `hidden`, when given, receives the residual stream [len(ids), d] after each layer."""
        if len(ids) > self.n_ctx:
            raise GenerationError(f"{len(ids)} tokens exceed the context length {self.n_ctx}")
        self.claim()
        self.tokens = []
        tf = self.transformer
        out = tf.be.read(tf.forward(np.asarray(ids, np.int64), 0, all_logits=True, hidden=hidden, slot=self.slot))
        self.tokens = list(ids)
        return np.asarray(out, dtype=np.float32)

    def prefill(self, ids: list[int]):
        """Make the cache hold exactly `ids`, evaluating only what differs.

        Returns the last position's logits (a backend handle) and how many tokens were already cached."""
        if not ids:
            raise GenerationError("the prompt is empty: there is nothing to continue from")
        if len(ids) >= self.n_ctx:
            raise GenerationError(f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx} "
                                  f"(raise context_length, or shorten the prompt)")
        self.claim()
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always evaluate at least the last token for its logits
        self.tokens = self.tokens[:common]
        logits = self.transformer.forward(np.asarray(ids[common:], np.int64), common, slot=self.slot)
        self.tokens = list(ids)
        return logits, common

    def check(self, live):
        """GenerationError unless the generation `live` still owns this sequence and its slot."""
        if self.transformer.owners[self.slot] is not self or self.live is not live:
            raise GenerationError(INTERLEAVED)

    def step(self, token: int, live=None):
        """Append `token` and return the logits after it (a backend handle); `live`: the generation
        that asks (checked to still own the sequence)."""
        if len(self.tokens) >= self.n_ctx:
            raise GenerationError(f"context full ({self.n_ctx} tokens)")
        self.check(live)
        logits = self.transformer.forward(np.asarray([token], np.int64), len(self.tokens), slot=self.slot)
        self.tokens.append(token)
        return logits


def generate_tokens(seq: Sequence, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int,
                    stop_ids: frozenset[int] = frozenset(), stats: Stats | None = None,
                    encode_ahead: bool | None = None, matcher=None) -> Iterator[int]:
    """Layer 1: yield sampled token ids until a stop id (not yielded) or `max_tokens`.

    `stats`, when given, is filled in as the generation runs. `encode_ahead` (default: when the backend
    supports it and no penalties need the history on the host) submits step t+1 before waiting for
    step t's token. `matcher` (a constrain.Matcher) limits each step to the tokens its constraint allows
    (its bitmask goes to the backend's sampler; one step at a time) and ends where it is complete."""
    stats = stats if stats is not None else Stats()
    rng = make_rng(params.seed)
    t0 = time.perf_counter()
    logits, cached = seq.prefill(prompt_ids)
    live = seq.live = object()  # this generation's; another one on `seq` replaces it
    be, vocab = seq.transformer.be, seq.transformer.cfg.vocab_size
    stats.prompt_tokens, stats.cached_tokens = len(prompt_ids), cached
    stats.prompt_eval_s = time.perf_counter() - t0
    history = list(prompt_ids)
    penalized = params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
    if encode_ahead is None:
        encode_ahead = be.encode_ahead and not penalized and matcher is None
    t1 = time.perf_counter()
    if encode_ahead:
        try:
            yield from _generate_ahead(seq, live, logits, params, rng, max_tokens, stop_ids, stats, vocab)
        finally:
            stats.eval_s = time.perf_counter() - t1
        return
    try:
        for i in range(max_tokens):
            mask = matcher.words() if matcher is not None else None
            if params.greedy and params.repeat_penalty == 1.0 and not params.presence_penalty \
                    and not params.frequency_penalty:
                tok = be.argmax(logits, mask=mask)
            else:
                tok = be.sample(logits, params, rng, history, i, mask=mask)
            check_device_token(tok, vocab)
            if matcher is not None:
                matcher.consume(tok)
            if tok in stop_ids:
                return
            history.append(tok)
            stats.completion_tokens += 1
            yield tok
            if i + 1 == max_tokens or (matcher is not None and matcher.done):
                return
            if len(seq.tokens) >= seq.n_ctx:
                stats.context_full = True
                return
            logits = seq.step(tok, live)
    finally:
        stats.eval_s = time.perf_counter() - t1


NONE_ID = 0xFFFFFFFF  # argmax.wgsl: every allowed logit is -infinity (a constraint and bans leave none)


def check_device_token(tok: int, vocab: int):
    """GenerationError for an id a device argmax or sampler gives instead of a token: NONE_ID (nothing
    allowed, as sample()'s check says) or another past the vocabulary (a NaN or +infinity)."""
    if not 0 <= tok < vocab:
        raise GenerationError(NOTHING_ALLOWED if tok == NONE_ID else NON_FINITE)


def _generate_ahead(seq, live, logits, params, rng, max_tokens, stop_ids, stats, vocab):
    """Encode-ahead decoding: while the device runs step t the host already encodes and submits step
    t+1, which reads its input token from the device buffer step t's argmax/sample wrote; tokens come
    back through a ring of mappable buffers. A step computed past a stop is discarded, and the sequence
    never counts its position, which rolls the KV cache back to the stop."""
    tf, be = seq.transformer, seq.transformer.be

    def select(lg, step):
        if params.greedy:
            return be.argmax(lg, defer=True)
        return be.sample(lg, params, rng, (), step, defer=True)

    pending = select(logits, 0)
    for i in range(max_tokens):
        pos = len(seq.tokens)
        seq.check(live)
        ahead = None
        if i + 1 < max_tokens and pos < seq.n_ctx:
            ahead = select(tf.decode(pos, seq.slot), i + 1)  # submitted before step i is read
        tok = be.collect(pending)
        check_device_token(tok, vocab)
        if tok in stop_ids:
            return
        if ahead is not None:  # its K/V are at `pos` only if the step after it ran
            seq.tokens.append(tok)
        stats.completion_tokens += 1
        yield tok
        if i + 1 == max_tokens:
            return
        if ahead is None:
            stats.context_full = True
            return
        pending = ahead


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """Token ids -> text pieces through the tokenizer's incremental decoder; a stop string ends the text
    and is never emitted, not even in part (text that may begin one is held back)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.dec, self.stop, self.pending = tokenizer.stream(), stop, ""

    def _hit(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None

    def add(self, tok: int) -> tuple[str, bool]:
        """The text that `tok` completes, and whether a stop string ended the text there."""
        self.pending += self.dec.add_token(tok)
        if not self.stop:
            out, self.pending = self.pending, ""
            return out, False
        hit = self._hit(self.pending)
        if hit is not None:
            out, self.pending = self.pending[:hit], ""
            return out, True
        keep = stop_prefix_len(self.pending, self.stop)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, False

    def finish(self) -> tuple[str, bool]:
        """The text held back at the end, and whether a stop string ended it."""
        tail, self.pending = self.pending + self.dec.flush(), ""
        hit = self._hit(tail) if self.stop else None
        return (tail, False) if hit is None else (tail[:hit], True)


def stream_chunks(seq: Sequence, tokenizer, prompt_ids: list[int], params: SamplingParams, *,
                  max_tokens: int, stop: list[str], stop_ids: frozenset[int], matcher=None) -> Iterator[Chunk]:
    """Layer 2: text chunks through the incremental decoder; stop strings never partially emitted.

    The last chunk carries the finish reason and the generation's `Stats`."""
    text = TextStream(tokenizer, stop)
    stats = Stats()
    gen = generate_tokens(seq, prompt_ids, params, max_tokens=max_tokens, stop_ids=stop_ids, stats=stats,
                          matcher=matcher)
    n = 0
    for tok in gen:
        n += 1
        out, hit = text.add(tok)
        if hit:
            gen.close()
            yield Chunk(out, tok, "stop", stats)
            return
        yield Chunk(out, tok)
    tail, hit = text.finish()
    complete = matcher is not None and matcher.done
    length = n >= max_tokens or stats.context_full
    yield Chunk(tail, None, "length" if not hit and length and not complete else "stop", stats)


def check_args(max_tokens, stop) -> list[str]:
    """Validate `max_tokens` (None: until the context is full) and `stop`; returns the stop strings as a list."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                                   or max_tokens < 1):
        raise GenerationError(f"max_tokens = {max_tokens!r}: expected an integer >= 1, or None (until the context "
                              "is full)")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise GenerationError(f"stop = {stop!r}: expected a string or a list of strings")
    stop = list(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise GenerationError(f"stop strings must be non-empty str, got {s!r}")
    return stop

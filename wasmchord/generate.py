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
from .sampling import SamplingParams, make_rng

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


@dataclass
class Chunk:
    """One streamed piece: new text (may be empty while a character or stop string is pending).

    The last chunk has `finish_reason` ("stop" | "length") and the generation's `stats`."""

    text: str
    token: int | None
    finish_reason: str | None = None
    stats: Stats | None = None


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

    @classmethod
    def from_chunks(cls, chunks: Iterable[Chunk]) -> "Completion":
        """Run a stream to its end and gather its text, tokens, finish reason and statistics."""
        parts, tokens, last = [], [], None
        for last in chunks:
            parts.append(last.text)
            if last.token is not None:
                tokens.append(last.token)
        s = last.stats
        return cls("".join(parts), tokens, last.finish_reason, s.prompt_tokens, s.completion_tokens,
                   s.prompt_eval_s, s.eval_s, s.cached_tokens)

    @property
    def prompt_tok_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_eval_s if self.prompt_eval_s > 0 else float("inf")

    @property
    def tok_per_s(self) -> float:
        return self.completion_tokens / self.eval_s if self.eval_s > 0 else float("inf")


class Sequence:
    """The tokens one sequence holds in the transformer's KV cache. `reset()` forgets them.

    Several sequences share one cache (one per transformer); the transformer records which sequence
    wrote it last, and a sequence that finds the cache taken over starts from scratch."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.tokens: list[int] = []

    def reset(self):
        self.tokens = []

    @property
    def n_ctx(self) -> int:
        return self.transformer.max_ctx

    def _claim(self):
        if self.transformer.cache_owner is not self:
            self.tokens = []
        self.transformer.cache_owner = self

    def evaluate(self, ids: list[int], *, hidden: list | None = None) -> np.ndarray:
        """Logits [len(ids), vocab] (float32, on the host) of `ids` from position 0; the cache then holds
        exactly `ids`. `hidden`, when given, receives the residual stream [len(ids), d] after each layer."""
        if len(ids) > self.n_ctx:
            raise GenerationError(f"{len(ids)} tokens exceed the context length {self.n_ctx}")
        self._claim()
        self.tokens = []
        tf = self.transformer
        out = tf.be.read(tf.forward(np.asarray(ids, np.int64), 0, all_logits=True, hidden=hidden))
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
        self._claim()
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # always evaluate at least the last token for its logits
        self.tokens = self.tokens[:common]
        logits = self.transformer.forward(np.asarray(ids[common:], np.int64), common)
        self.tokens = list(ids)
        return logits, common

    def step(self, token: int):
        """Append `token` and return the logits after it (a backend handle)."""
        if len(self.tokens) >= self.n_ctx:
            raise GenerationError(f"context full ({self.n_ctx} tokens)")
        assert self.transformer.cache_owner is self, "step() after another sequence used the cache"
        logits = self.transformer.forward(np.asarray([token], np.int64), len(self.tokens))
        self.tokens.append(token)
        return logits


def generate_tokens(seq: Sequence, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int,
                    stop_ids: frozenset[int] = frozenset(), stats: Stats | None = None,
                    encode_ahead: bool | None = None) -> Iterator[int]:
    """Layer 1: yield sampled token ids until a stop id (not yielded) or `max_tokens`.

    `stats`, when given, is filled in as the generation runs. `encode_ahead` (default: when the backend
    supports it and no penalties need the history on the host) submits step t+1 before waiting for
    step t's token."""
    stats = stats if stats is not None else Stats()
    rng = make_rng(params.seed)
    t0 = time.perf_counter()
    logits, cached = seq.prefill(prompt_ids)
    be = seq.transformer.be
    stats.prompt_tokens, stats.cached_tokens = len(prompt_ids), cached
    stats.prompt_eval_s = time.perf_counter() - t0
    history = list(prompt_ids)
    penalized = params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
    if encode_ahead is None:
        encode_ahead = be.encode_ahead and not penalized
    t1 = time.perf_counter()
    if encode_ahead:
        try:
            yield from _generate_ahead(seq, logits, params, rng, max_tokens, stop_ids, stats)
        finally:
            stats.eval_s = time.perf_counter() - t1
        return
    try:
        for i in range(max_tokens):
            if params.greedy and params.repeat_penalty == 1.0 and not params.presence_penalty \
                    and not params.frequency_penalty:
                tok = be.argmax(logits)
            else:
                tok = be.sample(logits, params, rng, history, i)
            if tok in stop_ids:
                return
            history.append(tok)
            stats.completion_tokens += 1
            yield tok
            if i + 1 == max_tokens:
                return
            if len(seq.tokens) >= seq.n_ctx:
                raise GenerationError(f"context full ({seq.n_ctx} tokens) after {i + 1} generated tokens")
            logits = seq.step(tok)
    finally:
        stats.eval_s = time.perf_counter() - t1


def _generate_ahead(seq, logits, params, rng, max_tokens, stop_ids, stats):
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
        ahead = None
        if i + 1 < max_tokens and pos < seq.n_ctx:
            ahead = select(tf.decode(pos), i + 1)  # submitted before step i is read
        tok = be.collect(pending)
        if tok in stop_ids:
            return
        if ahead is not None:  # its K/V are at `pos` only if the step after it ran
            seq.tokens.append(tok)
        stats.completion_tokens += 1
        yield tok
        if i + 1 == max_tokens:
            return
        if ahead is None:
            raise GenerationError(f"context full ({seq.n_ctx} tokens) after {i + 1} generated tokens")
        pending = ahead


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def stream_chunks(seq: Sequence, tokenizer, prompt_ids: list[int], params: SamplingParams, *,
                  max_tokens: int, stop: list[str], stop_ids: frozenset[int]) -> Iterator[Chunk]:
    """Layer 2: text chunks through the incremental decoder; stop strings never partially emitted.

    The last chunk carries the finish reason and the generation's `Stats`."""
    dec = tokenizer.stream()
    pending = ""  # decoded text held back because it might begin a stop string
    stats = Stats()
    gen = generate_tokens(seq, prompt_ids, params, max_tokens=max_tokens, stop_ids=stop_ids, stats=stats)
    n = 0
    for tok in gen:
        n += 1
        pending += dec.add_token(tok)
        if stop:
            hit = min(((pending.find(s), s) for s in stop if s in pending), default=None)
            if hit:
                gen.close()
                yield Chunk(pending[:hit[0]], tok, "stop", stats)
                return
            keep = _stop_prefix_len(pending, stop)
            out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        else:
            out, pending = pending, ""
        yield Chunk(out, tok)
    tail = pending + dec.flush()
    if stop:
        hit = min(((tail.find(s), s) for s in stop if s in tail), default=None)
        if hit:
            yield Chunk(tail[:hit[0]], None, "stop", stats)
            return
    yield Chunk(tail, None, "length" if n >= max_tokens else "stop", stats)


def check_args(max_tokens, stop) -> list[str]:
    """Validate `max_tokens` and `stop`; returns the stop strings as a list."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise GenerationError(f"max_tokens = {max_tokens!r}: expected an integer >= 1")
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

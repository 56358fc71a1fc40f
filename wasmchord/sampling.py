"""Sampling: pure functions over a logit vector plus an explicit seeded RNG.

Order follows llama.cpp's default sampler chain: penalties -> top-k -> top-p -> min-p -> temperature
-> draw. Temperature 0 is greedy (argmax after penalties). Filters are computed on the softmax of the
untempered logits, as llama.cpp does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from .errors import GenerationError, is_integer, is_number


def _option(default, help: str, kind=None):
    """A sampling option: its default, one line of help and the type of its command-line flag."""
    return field(default=default, metadata={"help": help, "type": kind or type(default)})


GREEDY_BELOW = 1e-5  # a temperature below this decodes greedily
F32_MAX = np.float32(3.0e38)  # penalized logits are capped here (sample.wgsl caps them the same)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. The one definition of each sampling option: every field is a
    keyword argument of `Model.stream`/`generate`/`chat` and a flag of `wasmchord generate`/`chat`
    (`top_k` is `--top-k`), with the default and help text given here."""

    temperature: float = _option(0.8, "divide the logits by this before drawing; 0 (below 1e-5) is greedy (argmax)")
    top_k: int = _option(40, "draw from the k most likely tokens only (0: all)")
    top_p: float = _option(0.95, "draw from the most likely tokens whose probabilities sum to top_p")
    min_p: float = _option(0.05, "drop tokens less likely than min_p times the most likely one")
    repeat_penalty: float = _option(1.0, "divide the positive logits of recent tokens by this (1: off)")
    presence_penalty: float = _option(0.0, "subtract this (-2 to 2) from the logit of every recent token")
    frequency_penalty: float = _option(0.0, "subtract this (-2 to 2) times its count from the logit of every recent token")
    penalty_last_n: int = _option(64, "how many recent tokens the penalties look at (-1: all of them)")
    seed: int | None = _option(None, "random seed for sampling (default: a different draw each run)", int)

    def __post_init__(self):
        def bad(name, want):
            raise GenerationError(f"{name} = {getattr(self, name)!r}: expected {want}")
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_number(v) or not np.isfinite(v):
                bad(name, "a finite number")
        if self.temperature < 0:
            bad("temperature", ">= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "a value in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "a value in [0, 1]")
        if not is_integer(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 disables it)")
        if not 0 < self.repeat_penalty <= 1e30:  # within float32: a zero logit times inf would be NaN
            bad("repeat_penalty", "a value in (0, 1e30] (1.0 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's and vLLM's range
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "a value in [-2, 2]")
        if not is_integer(self.penalty_last_n) or self.penalty_last_n < -1:
            bad("penalty_last_n", "an integer >= 0, or -1 for the whole context")
        if self.seed is not None and (not is_integer(self.seed) or self.seed < 0):
            bad("seed", "an integer >= 0, or None")
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))  # a NumPy scalar as the Python number
        for name in ("top_k", "penalty_last_n", "seed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        """Argmax: temperature 0, or below GREEDY_BELOW, where a draw is argmax but for ties (vLLM's rule)."""
        return self.temperature < GREEDY_BELOW

    @classmethod
    def from_options(cls, options: dict) -> "SamplingParams":
        """Build from keyword arguments, naming any that is not a sampling option.

        Raises:
            TypeError: an unknown option.
            GenerationError: a value out of range.
        """
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"unexpected keyword argument {', '.join(map(repr, unknown))}; "
                            f"the sampling options are {', '.join(OPTIONS)}")
        return cls(**options)


OPTIONS = [f.name for f in fields(SamplingParams)]


def recent_tokens(history, last_n: int):
    """The last `last_n` tokens of `history` (-1: all of it, as llama.cpp's penalty_last_n)."""
    return history if last_n < 0 else history[max(len(history) - last_n, 0):] if last_n else history[:0]


def apply_penalties(logits: np.ndarray, history, *, repeat: float = 1.0, presence: float = 0.0,
                    frequency: float = 0.0, last_n: int = 64) -> np.ndarray:
    """llama.cpp `llama_sampler_penalties_apply`: over the last `last_n` tokens of `history`, divide
    positive logits (multiply negative ones) by `repeat`, subtract count*frequency + presence."""
    if (repeat == 1.0 and presence == 0.0 and frequency == 0.0) or last_n == 0 or len(history) == 0:
        return logits
    recent = np.asarray(recent_tokens(history, last_n), dtype=np.int64)
    ids, counts = np.unique(recent, return_counts=True)
    out = logits.astype(np.float32, copy=True)
    v = out[ids]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # the branch np.where drops may
        v = np.where(v <= 0, v * repeat, v / repeat)
    v -= counts * np.float32(frequency) + np.float32(presence)
    out[ids] = np.minimum(v, F32_MAX)  # a tiny repeat_penalty overflows: the largest float, not +inf
    return out


def logit_bias_of(bias, vocab: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A logit_bias mapping ({token id (int or its decimal text): bias in [-100, 100]}, as OpenAI's API
    takes it) as (ids, biases); a bias of -100 bans the token (-inf), any other is added to its logit.

    Raises:
        GenerationError: not a mapping, an id outside the vocabulary, a bias outside [-100, 100]."""
    if bias is None or (isinstance(bias, dict) and not bias):
        return None
    if not isinstance(bias, dict):
        raise GenerationError(f"logit_bias = {bias!r}: expected a dict of token id -> bias")
    ids, values = [], []
    for key, value in bias.items():
        try:
            i = int(key) if not isinstance(key, (bool, float)) else None
        except ValueError:
            i = None
        if i is None or not 0 <= i < vocab:
            raise GenerationError(f"logit_bias key {key!r}: expected a token id from 0 to {vocab - 1}")
        if not is_number(value) or not -100 <= value <= 100:
            raise GenerationError(f"logit_bias[{key!r}] = {value!r}: expected a number from -100 to 100")
        ids.append(i)
        values.append(-np.inf if value <= -100 else value)
    return np.array(ids, np.int64), np.array(values, np.float32)


def apply_logit_bias(logits: np.ndarray, bias) -> np.ndarray:
    """`logits` [vocab] with `bias` (from logit_bias_of) added: a copy, or `logits` when there is none."""
    if bias is None:
        return logits
    out = np.array(logits, np.float32)
    np.add.at(out, bias[0], bias[1])
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def filter_candidates(logits: np.ndarray, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Candidate ids (sorted by logit, descending) surviving top-k, then top-p, then min-p."""
    n = logits.shape[0]
    k = n if top_k <= 0 or top_k >= n else top_k
    if k < n:
        idx = np.argpartition(-logits, k - 1)[:k]
    else:
        idx = np.arange(n)
    idx = idx[np.argsort(-logits[idx], kind="stable")]
    if top_p < 1.0:
        p = softmax(logits[idx])
        cum = np.cumsum(p)
        keep = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix with mass >= top_p
        idx = idx[:max(1, keep)]
    if min_p > 0.0:
        lg = logits[idx]
        keep = lg >= lg[0] + np.log(min_p)  # p_i >= min_p * p_max
        idx = idx[keep]
    return idx


NON_FINITE = ("the model produced non-finite logits (NaN or infinity): its weights or metadata (for example "
              "rope.freq_base = 0 or a negative RMS epsilon) are likely corrupt")


NOTHING_ALLOWED = ("no token is allowed at this step (every logit is -inf): a constraint (json_schema, regex or "
                   "grammar) and logit_bias's bans leave none, or the model's weights are corrupt")


def check_finite(logits: np.ndarray):
    """Raise GenerationError when `logits` hold a NaN or +infinity (-infinity marks a token a constraint
    leaves out)."""
    top = np.max(logits)  # one pass: the max is nan with any nan, inf with any +inf, -inf with all -inf
    if top == -np.inf:
        raise GenerationError(NOTHING_ALLOWED)
    if not np.isfinite(top):
        raise GenerationError(NON_FINITE)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history=()) -> int:
    """Draw the next token id from a [vocab] logit vector.

    Raises:
        GenerationError: the logits are not all finite."""
    check_finite(logits)
    logits = apply_penalties(np.asarray(logits, dtype=np.float32), history, repeat=params.repeat_penalty,
                             presence=params.presence_penalty, frequency=params.frequency_penalty,
                             last_n=params.penalty_last_n)
    if params.greedy:
        return int(np.argmax(logits))
    idx = filter_candidates(logits, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
    z = logits[idx].astype(np.float64)
    p = softmax((z - z[0]) / params.temperature)  # shifted first: never inf - inf, whatever the temperature
    return int(idx[rng.choice(len(idx), p=p)])


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)

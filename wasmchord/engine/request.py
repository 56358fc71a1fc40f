"""A request to the batch engine: what was asked (prompt, sampling, stops) and where it stands
(its cache slot, the prompt tokens evaluated so far, the tokens generated, the chunks for its reader)."""

from __future__ import annotations

import itertools
import logging
import queue
import time
from dataclasses import dataclass, field

from ..generate import Chunk, Stats, TextStream
from ..sampling import SamplingParams, make_rng

log = logging.getLogger(__name__)
_ids = itertools.count()

WAITING, PREFILL, RUNNING, DONE = "waiting", "prefill", "running", "done"


@dataclass(eq=False)
class Request:
    """One generation in the engine. Read its chunks with `Engine.stream(request)` (or `chunks()` when
    the engine runs on the caller's thread); `cancel` it through the engine."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    text: TextStream
    id: int = field(default_factory=lambda: next(_ids))
    state: str = WAITING
    slot: int | None = None
    evaluated: int = 0                    # prompt tokens in the slot's cache
    tokens: list = field(default_factory=list)   # generated so far (the last is not yet in the cache)
    finish_reason: str | None = None      # "stop" | "length" | "cancelled", once done
    error: BaseException | None = None    # a failure of this request alone
    stats: Stats = field(default_factory=Stats)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None  # when it took a slot
    first_token_at: float | None = None
    finished_at: float | None = None
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # Chunks (the last has finish_reason) or an error
    choice: int = 0                       # which of a prompt's n samples this is
    leader: "Request | None" = None       # choice 0 of the same prompt: whose prefill this one shares
    logprobs: int | None = None           # report each token's log-probability and this many alternatives
    notify: object = None                 # called with each chunk too (from the engine's thread)
    matcher: object = None                # a constrain.Matcher: the tokens its constraint allows
    bias: tuple | None = None             # (token ids, biases) added to the logits (sampling.logit_bias_of)
    last_token_at: float | None = None
    drained: bool = False                 # its last chunk (or its error) has been taken
    prompt_logprobs_k: int | None = None  # score the prompt: each token's log-probability, this many alternatives
    prompt_logprobs: list | None = None   # [(token id, log-probability, [(id, log-probability)])]; None for the first

    def __post_init__(self):
        seed = self.params.seed
        self.rng = make_rng(None if seed is None else [seed, self.choice] if self.choice else seed)
        self.stats.prompt_tokens = len(self.prompt)

    @property
    def done(self) -> bool:
        return self.state == DONE

    def history(self) -> list[int]:
        """The tokens penalties look at: the prompt and what was generated."""
        return self.prompt + self.tokens

    def push(self, item: "Chunk | BaseException"):
        self.out.put(item)
        if self.notify is not None:
            try:
                self.notify(self, item)
            except Exception:  # the reader's callback (a closed event loop): the engine goes on
                log.exception("request %d: notify(%r) failed", self.id, type(item).__name__)

    def take(self, block: bool, timeout: float | None = None) -> "Chunk | BaseException | None":
        """The next chunk (or this request's error), or None when none is ready."""
        try:
            item = self.out.get(block, timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self.drained = True
        return item

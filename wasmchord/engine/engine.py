"""The batch engine: N sequence slots of one model, each with its own KV cache, and a loop of steps.

Each step admits waiting requests to free slots (the slot whose cached tokens share the longest
prefix with the prompt, so only the rest is evaluated), evaluates at most `prefill_chunk` prompt
tokens, and runs one batched decode over every running sequence: every weight matrix is read once
for all of them. Requests arrive from any thread (`submit`, `cancel`); steps run on the caller's
thread (`step`, `run`) or on the engine's own (`start`).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..backends.base import OnDevice
from ..constrain import Constraint, apply_mask
from ..errors import GenerationError, WasmchordError, is_integer
from ..generate import Chunk, Sequence, TextStream, check_args, check_device_token
from ..sampling import SamplingParams, apply_logit_bias, logit_bias_of, sample
from .request import DONE, PREFILL, RUNNING, WAITING, Request

log = logging.getLogger(__name__)


def check_n(n, slots: int) -> int:
    """`n` (samples of one prompt; None: 1) as an int, or GenerationError."""
    if n is None:
        return 1
    if not is_integer(n) or not 1 <= n <= slots:
        raise GenerationError(f"n = {n!r}: expected an integer from 1 to the model's {slots} slots")
    return int(n)


def plain_greedy(req: Request) -> bool:
    """Argmax of the raw logits: no penalty, bias, constraint or logprobs (the device can find it)."""
    p = req.params
    return (p.greedy and p.repeat_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
            and not req.bias and req.matcher is None and req.logprobs is None)


def device_drawn(req: Request) -> bool:
    """Its token can be drawn on the device (argmax or sample.wgsl, penalties included): no bias,
    constraint or logprobs, which need the logits on the host."""
    return not req.bias and req.matcher is None and req.logprobs is None


def penalized(req: Request) -> bool:
    p = req.params
    return p.repeat_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def token_logprobs(logits: np.ndarray, toks, k: int) -> list[tuple[float, list]]:
    """For each row of `logits` [n, vocab] (the model's distribution, before penalties and filters) and
    its token in `toks` [n]: (the token's log-probability, [(token id, log-probability)] of the `k` most
    likely, most likely first)."""
    z = logits - logits.max(-1, keepdims=True)                                             # [n, vocab]
    logz = np.log(np.exp(z).sum(-1))                                                       # [n]
    rows = np.arange(len(z))
    chosen = z[rows, np.asarray(toks)] - logz                                              # [n]
    if k == 0:
        return [(float(c), []) for c in chosen]
    top = np.argpartition(-z, k - 1, axis=-1)[:, :k]                                       # [n, k], unordered
    top_z = np.take_along_axis(z, top, -1)
    order = np.lexsort((top, -top_z))  # by log-probability, then id (as a stable sort of the row)
    top, top_z = np.take_along_axis(top, order, -1), np.take_along_axis(top_z, order, -1) - logz[:, None]
    return [(float(c), [(int(i), float(v)) for i, v in zip(ti, tv)]) for c, ti, tv in zip(chosen, top, top_z)]


COPY_GAIN = 8  # prompt tokens another slot's cache must save before it is copied rather than evaluated


class QueueFull(GenerationError):
    """The engine's waiting queue is full."""


class EngineStopped(GenerationError):
    """The engine was stopped before the request finished (a server shutting down)."""


STOPPED = "the engine was stopped before this request finished"


@dataclass(slots=True)
class Ahead:
    """A batched step submitted before the tokens of the step before it were read (encode-ahead): its
    rows in order, the position each row evaluates, and the backend's handle for its tokens."""

    batch: list
    positions: list
    handle: object


class Engine:
    """Continuous batching over the model's KV cache slots (`Model.load(..., slots=N)`).

    Args:
        model: a loaded `Model`.
        max_queue: requests that may wait for a slot (beyond the free ones) before `submit` refuses more
            (QueueFull); 0: only what free slots take at once.
        prefill_chunk: prompt tokens evaluated per step, so running sequences keep getting tokens.
        encode_ahead: on a GPU, while a step of rows whose tokens the device draws runs (no bias,
            constraint, logprobs or penalty), submit the next one (its input tokens are the ones the
            device just drew) before reading this one's; False: one step at a time.
    """

    def __init__(self, model, *, max_queue: int = 64, prefill_chunk: int = 512, encode_ahead: bool = True):
        if not is_integer(prefill_chunk) or prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk = {prefill_chunk!r}: expected an integer >= 1")
        if not is_integer(max_queue) or max_queue < 0:
            raise GenerationError(f"max_queue = {max_queue!r}: expected an integer >= 0")
        self.model, self.tf = model, model.transformer
        self.tf._check_open()
        self.max_queue, self.prefill_chunk = int(max_queue), int(prefill_chunk)
        self.slots = [Sequence(self.tf, i) for i in range(self.tf.slots)]
        self.busy: list[Request | None] = [None] * self.tf.slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []  # admitted: prefilling or running, in admission order
        self._inbox: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop_lock = threading.Lock()  # one stop() at a time: a second finds nothing left to fail
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False  # stop() ended its thread: submissions would wait for no one
        self.encode_ahead = bool(encode_ahead)
        self._ahead: Ahead | None = None
        self.steps = 0
        self.ahead_steps = 0       # batched steps whose tokens came from a step submitted ahead (statistics)
        self._held: float | None = None  # how long recent requests held their slot (seconds, moving average)
        self.evaluated_tokens = 0  # prompt tokens evaluated (not found in a slot's cache)
        self.generated_tokens = 0
        # observe(name, seconds): "ttft" (submit to first token) and "itl" (between tokens) per request
        self.observe = None

    # ------------------------------------------------------------------------------------ requests
    def submit(self, prompt, *, max_tokens: int = 256, stop=None, n: int = 1, logprobs: int | None = None,
               prompt_logprobs: int | None = None, logit_bias: dict | None = None, notify=None,
               **sampling) -> list[Request]:
        """Queue a prompt (text or token ids) for `n` samples; returns their requests.

        `logprobs` (0-20): each chunk carries its token's log-probability and that many of the most
        likely alternatives. `prompt_logprobs` (0-20): the same for each prompt token after the first
        (`Request.prompt_logprobs`: [(token id, log-probability, alternatives)], None for the first), the
        whole prompt evaluated (its cached prefix is not reused). `max_tokens=0` evaluates the prompt into
        a slot's cache (to score it, or for later prompts that share its prefix) and generates nothing.
        `logit_bias` ({token id: -100..100}) is added to the logits before
        sampling (-100 bans the token). `notify(request, chunk_or_error)` is called from the engine's
        thread as each is produced (a server bridges it to its event loop).

        Raises:
            GenerationError: bad arguments, an empty prompt, or one that does not fit the context.
            QueueFull: more than `max_queue` requests would wait.
        """
        constraint = Constraint.from_options(self.model.tokenizer, sampling)
        params = SamplingParams.from_options(sampling)
        prefill_only = is_integer(max_tokens) and max_tokens == 0  # the prompt evaluated, nothing generated
        stop = check_args(None if prefill_only else max_tokens, stop)
        n = check_n(n, self.tf.slots)
        ids = self.model.prompt_ids(prompt)
        if max_tokens is None:  # until the context is full
            max_tokens = max(self.tf.max_ctx - len(ids) + 1, 1)  # the last token needs no cache slot
        if len(ids) > self.tf.max_ctx or len(ids) == self.tf.max_ctx and not prefill_only:
            raise GenerationError(f"the prompt has {len(ids)} tokens; the context holds {self.tf.max_ctx} "
                                  f"(raise context_length, or shorten the prompt)")
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and (not is_integer(k) or not 0 <= k <= 20):
                raise GenerationError(f"{name} = {k!r}: expected an integer from 0 to 20")
        logprobs, prompt_logprobs = (None if k is None else int(k) for k in (logprobs, prompt_logprobs))
        bias = logit_bias_of(logit_bias, self.tf.cfg.vocab_size)
        reqs = [Request(ids, params, max_tokens, stop, TextStream(self.model.tokenizer, stop), choice=i,
                        logprobs=logprobs, notify=notify, matcher=constraint.matcher() if constraint else None,
                        bias=bias, prompt_logprobs_k=prompt_logprobs)
                for i in range(n)]
        for r in reqs[1:]:
            r.leader = reqs[0]
        with self._wake:
            # under the lock stop() takes: no request lands in an engine stopped or whose thread is stopping
            if self._stopped or self._stopping and self._thread is not None:
                raise EngineStopped("the engine was stopped: start() it again before submitting")
            self.tf._check_open()
            # requests that would find no free slot at the next step: the ones queued, these, less free slots;
            # a cancelled request leaves its place or slot at that step, so it counts as gone. The engine's
            # thread changes these lists without the lock: list() copies them at once (iterating could fail)
            free = sum(r is None or r.cancelled for r in list(self.busy))
            waiting = sum(not r.cancelled for r in list(self.waiting) + self._inbox) - free
            if waiting + n > self.max_queue:
                raise QueueFull(f"the engine's queue is full ({max(waiting, 0)} requests waiting for a slot, "
                                f"max_queue {self.max_queue})")
            self._inbox.extend(reqs)
            self._wake.notify()
        return reqs

    def cancel(self, req: Request):
        """Stop `req` at the next step (its slot frees); a finished request is left as it is."""
        with self._wake:
            req.cancelled = True
            self._wake.notify()

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.active or self._inbox)

    @property
    def running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self.active)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self.waiting) + len(self._inbox)

    def retry_after(self) -> int:
        """Seconds a request turned away by a full queue might wait before it tries again: how long
        recent requests held a slot, times the requests waiting per slot ahead of it; 1 to 60 (1 before
        any request finished)."""
        if self._held is None:
            return 1
        return int(min(60, max(1, math.ceil(self._held * (self.queued + 1) / len(self.slots)))))

    # ------------------------------------------------------------------------------------ the step
    def step(self) -> bool:
        """Run one engine step; False when there was nothing to do."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, "cancelled")
        for req in [r for r in self.active if r.cancelled]:
            self._finish(req, "cancelled")
        if self.idle:
            return False
        self.steps += 1
        with self.model.lock:
            for req in [r for r in self.active if self.tf.owners[r.slot] is not self.slots[r.slot]]:
                self._fail(req, GenerationError(  # its cache holds another generation's tokens now
                    f"request {req.choice}: KV cache slot {req.slot} was used by a generation outside the engine "
                    "(Model.generate, stream or logits on the same model) meanwhile: submit every request to "
                    "the engine"))
            self._admit()
            self._prefill()
            self._decode()
        return True

    def _admit(self):
        """Waiting requests into free slots, in arrival order: each takes the free slot whose cached
        tokens share the longest prefix with its prompt, or copies a longer one from a busy slot
        (`_copy_prefix`). A further sample of a prompt (n > 1) waits while its first sample is
        prefilling: it then copies that prefill (`_fork`)."""
        for req in list(self.waiting):
            if None not in self.busy:
                return
            if req.leader is not None and req.leader.state in (WAITING, PREFILL):
                continue
            self.waiting.remove(req)
            free = [i for i, r in enumerate(self.busy) if r is None]
            shared = {i: self._shared(self.slots[i], req.prompt) for i in free}
            slot = max(free, key=lambda i: (shared[i], -i))
            seq = self.slots[slot]
            seq.claim()
            have = 0  # scoring (prompt_logprobs) needs every position's logits
            if req.prompt_logprobs_k is None:
                have = self._copy_prefix(req.prompt, slot, shared[slot])
            req.evaluated = min(have, len(req.prompt) - 1)  # the last prompt token gives the logits
            req.stats.cached_tokens = req.evaluated
            seq.tokens = seq.tokens[:req.evaluated]
            req.slot, req.state, req.admitted_at = slot, PREFILL, time.perf_counter()
            self.busy[slot] = req
            self.active.append(req)

    def _copy_prefix(self, prompt: list[int], slot: int, have: int) -> int:
        """When a busy slot holds at least COPY_GAIN more tokens of `prompt` than the `have` that `slot`
        holds (another sample of the prompt, admitted after its first had begun decoding; a system prompt
        that a running request shares), its cache is copied into `slot`. Returns the prompt tokens `slot`
        then holds."""
        best, src = have, None
        for i, r in enumerate(self.busy):
            if r is not None and i != slot and (n := self._shared(self.slots[i], prompt)) > best:
                best, src = n, i
        if src is None or best - have < COPY_GAIN:
            return have
        try:
            self.tf.be.copy_kv(self.tf.cache, src, slot, best)
        except Exception:  # the slot may hold part of the copy: it evaluates the whole prompt
            log.warning("copying a cached prefix from slot %d to slot %d failed", src, slot, exc_info=True)
            self.slots[slot].tokens = []
            return 0
        self.slots[slot].tokens = list(prompt[:best])
        return best

    def _shared(self, seq: Sequence, ids: list[int]) -> int:
        if not seq.holds_cache():
            return 0
        n = 0
        for a, b in zip(seq.tokens, ids):
            if a != b:
                break
            n += 1
        return n

    def _prefill(self):
        """At most `prefill_chunk` prompt tokens, oldest admission first; a prompt that completes
        samples its first token."""
        budget = self.prefill_chunk
        for req in [r for r in self.active if r.state == PREFILL]:
            if budget == 0:
                break
            seq = self.slots[req.slot]
            t0 = time.perf_counter()
            c = min(budget, len(req.prompt) - req.evaluated)
            scoring = req.prompt_logprobs_k is not None
            try:
                logits = self.tf.forward(np.asarray(req.prompt[req.evaluated:req.evaluated + c], np.int64),
                                         req.evaluated, slot=req.slot, all_logits=scoring)
                if scoring:
                    logits = self._score_prompt(req, np.asarray(self.tf.be.read(logits), np.float32), req.evaluated)
            except WasmchordError as e:
                self._fail(req, e)
                continue
            budget -= c
            req.evaluated += c
            self.evaluated_tokens += c
            seq.tokens = list(req.prompt[:req.evaluated])
            req.stats.prompt_eval_s += time.perf_counter() - t0
            if req.evaluated == len(req.prompt):
                req.state = RUNNING
                host = np.asarray(self.tf.be.read(logits) if not scoring else logits, np.float32)
                self._first_token(req, host)
                self._fork(req, host)

    def _score_prompt(self, req: Request, logits: np.ndarray, pos0: int) -> np.ndarray:
        """Append the log-probabilities of prompt tokens pos0 + 1 .. pos0 + len(logits) (those the
        chunk's logits [c, vocab] predict) to `req.prompt_logprobs`; returns the last row."""
        if pos0 == 0:
            req.prompt_logprobs = [(req.prompt[0], None, None)]
        toks = req.prompt[pos0 + 1:pos0 + 1 + len(logits)]  # the last row predicts no prompt token
        scored = token_logprobs(logits[:len(toks)], toks, req.prompt_logprobs_k) if toks else []
        req.prompt_logprobs += [(t, lp, top) for t, (lp, top) in zip(toks, scored)]
        return logits[-1]

    def _fork(self, leader: Request, logits: np.ndarray):
        """Further samples of `leader`'s prompt into free slots: its cache copied, their first token
        drawn from its logits with their own RNG."""
        for req in [r for r in self.waiting if r.leader is leader]:
            if None not in self.busy:
                return
            slot = self.busy.index(None)
            self.tf.be.copy_kv(self.tf.cache, leader.slot, slot, len(req.prompt))  # may fail: req still waits
            self.waiting.remove(req)
            seq = self.slots[slot]
            seq.claim()
            seq.tokens = list(req.prompt)
            req.slot, req.state, req.evaluated = slot, RUNNING, len(req.prompt)
            req.admitted_at = time.perf_counter()
            req.prompt_logprobs = leader.prompt_logprobs
            req.stats.cached_tokens = len(req.prompt)
            self.busy[slot] = req
            self.active.append(req)
            self._first_token(req, logits)

    def _decode(self):
        """One batched decode over the running sequences whose last token is not yet in their cache.
        When a step was submitted ahead, its rows still running take their tokens from it (a row that
        started running since waits for the next step)."""
        batch = [r for r in self.active if r.state == RUNNING]
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            rows = [(j, r) for j, r in enumerate(ahead.batch)
                    if r.state == RUNNING and len(self.slots[r.slot].tokens) == ahead.positions[j]]
            if rows:
                return self._decode_ahead(ahead, rows, len(rows) == len(ahead.batch) == len(batch))
            self.tf.be.discard_rows(ahead.handle)
        if not batch:
            return
        t0 = time.perf_counter()
        be = self.tf.be
        positions = [len(self.slots[r.slot].tokens) for r in batch]
        logits = self.tf.forward_batch([r.tokens[-1] for r in batch], positions, [r.slot for r in batch])
        device = hasattr(be, "argmax_rows") and hasattr(logits, "cols")  # the GPU, logits in one binding
        drawn = [device and device_drawn(r) for r in batch]
        handle = None
        if any(drawn):  # their tokens found on the device: B ids read back, not B rows of logits
            self._draw(logits, batch, positions, drawn, [r.history() if penalized(r) else () for r in batch])
            handle = be.submit_rows(len(batch))
        else:
            be.flush()
        if all(drawn) and not any(penalized(r) for r in batch) and self._may_run_ahead(positions):
            self._ahead = self._submit_ahead(batch, [p + 1 for p in positions])
        for r in batch:  # the constrained rows' masks, while the device runs the step
            if r.matcher is not None:
                try:
                    r.matcher.words()
                except Exception:  # raised again when the row samples: it fails that request alone
                    pass
        host = None if all(drawn) else np.asarray(be.read(logits), np.float32).reshape(len(batch), -1)  # [B, vocab]
        toks = be.collect_rows(handle) if handle is not None else None                                 # [B]
        dt = (time.perf_counter() - t0) / len(batch)
        for i, r in enumerate(batch):
            self.slots[r.slot].tokens.append(r.tokens[-1])
            r.stats.eval_s += dt
            if drawn[i]:
                self._sample_and_emit(r, None, device_tok=int(toks[i]))
            else:
                self._sample_and_emit(r, host[i])

    def _draw(self, logits, batch, positions, drawn, histories):
        """The device finds the tokens of the rows marked in `drawn`: plain greedy ones by one batched
        argmax, the others sampled one dispatch each with their own parameters, penalties and
        generator (a seed per step, the position as the draw's counter)."""
        be = self.tf.be
        if any(d and plain_greedy(r) for d, r in zip(drawn, batch)):
            be.argmax_rows(logits)
        rows = [(i, r.params, r.rng, histories[i], positions[i]) for i, r in enumerate(batch)
                if drawn[i] and not plain_greedy(r)]
        if rows:
            be.sample_rows(logits, rows)

    def _may_run_ahead(self, positions: list[int]) -> bool:
        """A step of these rows may be submitted ahead (their tokens drawn on the device, no penalty: the
        step's recent tokens are not known when it is submitted): the backend can, there is room in the context,
        and the next step will run the same rows (no prompt being evaluated, none about to be admitted)."""
        return (self.encode_ahead and hasattr(self.tf.be, "submit_rows") and max(positions) + 2 <= self.tf.max_ctx
                and not any(r.state == PREFILL for r in self.active)
                and not ((self.waiting or self._inbox) and None in self.busy))

    def _submit_ahead(self, batch: list[Request], positions: list[int]) -> Ahead:
        """Submit the step after the one just submitted, for the same rows: its input tokens are the
        ones that step's argmax or sampling leaves on the device. A row that finishes meanwhile wastes its part
        (its cache position past its tokens is written, and never read)."""
        be = self.tf.be
        logits = self.tf.forward_batch(OnDevice(len(batch)), positions, [r.slot for r in batch])
        self._draw(logits, batch, positions, [True] * len(batch), [()] * len(batch))  # no penalties: no history
        return Ahead(batch, positions, be.submit_rows(len(batch)))

    def _decode_ahead(self, ahead: Ahead, rows: list[tuple[int, Request]], whole: bool):
        """The step submitted ahead gives `rows` (index in it, request) their tokens. When it still
        runs every row (`whole`) and its tokens are still where its argmax left them (no prompt was
        evaluated since, nothing else used the model), the step after it is submitted before its
        tokens are read."""
        t0 = time.perf_counter()
        if whole and self.tf.be.rows_on_device(ahead.handle) and self._may_run_ahead(ahead.positions):
            self._ahead = self._submit_ahead(ahead.batch, [p + 1 for p in ahead.positions])
        toks = self.tf.be.collect_rows(ahead.handle)                                                   # [B]
        self.ahead_steps += 1
        dt = (time.perf_counter() - t0) / len(rows)
        for j, r in rows:
            self.slots[r.slot].tokens.append(r.tokens[-1])
            r.stats.eval_s += dt
            self._sample_and_emit(r, None, device_tok=int(toks[j]))

    def _first_token(self, req: Request, logits: np.ndarray):
        """`req`'s prompt is in its cache: its first token, or its end when it generates nothing."""
        if req.max_tokens == 0:
            self._finish(req, "length")
        else:
            self._sample_and_emit(req, logits)

    def _sample_and_emit(self, req: Request, logits: np.ndarray | None, device_tok: int | None = None):
        """Draw `req`'s next token from its logits, or take the one the device found for a plain greedy
        row (`device_tok`), and emit it. Whatever goes wrong here fails this request alone."""
        try:
            if device_tok is not None:  # an id past the vocabulary: the row's logits fail sample()'s check
                check_device_token(device_tok, self.model.config.vocab_size)
                tok, lp = device_tok, None
            else:
                allowed = apply_logit_bias(logits, req.bias)
                allowed = allowed if req.matcher is None else apply_mask(allowed, req.matcher.words())
                tok = sample(allowed, req.params, req.rng, req.history())
                if req.matcher is not None:
                    req.matcher.consume(tok)
                lp = None if req.logprobs is None else token_logprobs(logits[None], [tok], req.logprobs)[0]
            self._emit(req, tok, lp)
        except WasmchordError as e:  # non-finite logits: this request fails, the others go on
            self._fail(req, e)
        except Exception as e:  # a bug in one request's sampling, matcher or text
            log.exception("request %d failed", req.id)
            self._fail(req, e)

    def _emit(self, req: Request, tok: int, lp=None):
        """`tok` was sampled for `req`: stream its text, or finish the request."""
        now = time.perf_counter()
        if req.first_token_at is None:
            req.first_token_at = now
            if self.observe:
                self.observe("ttft", now - req.submitted)
        elif self.observe:
            self.observe("itl", now - req.last_token_at)
        req.last_token_at = now
        if tok in self.model.tokenizer.eot_ids:
            return self._finish(req, "stop")
        req.tokens.append(tok)
        req.stats.completion_tokens += 1
        self.generated_tokens += 1
        text, hit = req.text.add(tok)
        chunk = Chunk(text, tok, logprob=lp[0] if lp else None, top_logprobs=lp[1] if lp else None)
        req.push(chunk)
        if hit or (req.matcher is not None and req.matcher.done):
            return self._finish(req, "stop", flush=not hit)
        if len(req.tokens) >= req.max_tokens or len(self.slots[req.slot].tokens) >= self.tf.max_ctx:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str, *, flush: bool = True):
        tail, hit = req.text.finish() if flush else ("", False)
        req.finish_reason = "stop" if hit else reason
        req.state, req.finished_at = DONE, time.perf_counter()
        if req.admitted_at is not None:
            held = req.finished_at - req.admitted_at
            self._held = held if self._held is None else 0.8 * self._held + 0.2 * held
        if req.slot is not None and self.busy[req.slot] is req:
            self.busy[req.slot] = None
        if req in self.active:
            self.active.remove(req)
        req.push(Chunk(tail, None, req.finish_reason, req.stats))

    def _fail(self, req: Request, e: BaseException):
        req.error, req.state = e, DONE
        if req.slot is not None and self.busy[req.slot] is req:
            self.busy[req.slot] = None
            self.slots[req.slot].reset()
        if req in self.active:
            self.active.remove(req)
        req.push(e)

    # ------------------------------------------------------------------------------------ running
    def run(self, reqs: list[Request]) -> None:
        """Step on this thread until `reqs` are done."""
        while not all(r.done for r in reqs):
            if not self.step():
                break

    def start(self):
        """Run steps on a thread of the engine's own until `stop()`."""
        if self._thread is not None:
            return
        self.tf._check_open()
        if self.model.serving is not None:
            raise GenerationError("another engine already runs on this model: stop it first")
        if not self.model.lock.acquire(blocking=False):  # its thread would wait for the model for good
            raise GenerationError("a generation holds this model (an open stream or Chat turn, or a call on another "
                                  "thread): finish or close it before starting the engine")
        try:
            if self.model.serving is not None:
                raise GenerationError("another engine already runs on this model: stop it first")
            self.model.serving = self  # direct generations on the model are refused until stop()
        finally:
            self.model.lock.release()
        self._stopping = self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="wasmchord-engine", daemon=True)
        self._thread.start()

    def abort(self):
        """Without waiting for the current step: every request still waiting or running gets
        EngineStopped now (its reader ends at once) and the engine's thread ends after that step;
        `stop()` then joins it. For a shutdown whose time is up, when a step may take seconds."""
        with self._wake:
            self._stopping = True
            left = [r for r in list(self.active) + list(self.waiting) + self._inbox if not r.done]
            self._wake.notify()
        for req in left:
            req.push(EngineStopped(STOPPED))

    def stop(self):
        """End the engine's thread after its current step. Requests still waiting or running fail with
        EngineStopped (a GenerationError), which their readers get; the engine can be started again.
        Safe to call from any thread, and more than once."""
        with self._stop_lock:
            with self._wake:
                self._stopping = True
                self._wake.notify()
            thread = self._thread
            if thread is not None:
                thread.join()
                self._thread = None
                if self.model.serving is self:
                    self.model.serving = None
            with self._lock:
                self._stopped = self._stopped or thread is not None
                left = self.active + list(self.waiting) + self._inbox
                self.waiting.clear()
                self._inbox.clear()
            for req in left:
                self._fail(req, EngineStopped(STOPPED))

    def _loop(self):
        while True:
            with self._wake:
                while not self._stopping and self.idle:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a failure of the whole step: every admitted request learns of it
                log.exception("engine step failed")
                for req in list(self.active):
                    self._fail(req, e)

    def stream(self, req: Request, timeout: float | None = None):
        """Yield `req`'s chunks as the engine thread produces them (after `start`); the last has
        finish_reason. Raises the request's error, if it failed. A request read to its end before
        yields nothing more (or raises its error again). Closing the generator before the end (a `break`
        out of the loop) cancels the request."""
        try:
            yield from self._chunks(req, timeout)
        except GeneratorExit:
            if not req.done:
                self.cancel(req)
            raise

    def _chunks(self, req: Request, timeout: float | None):
        while True:
            if req.drained:
                if req.error is not None:
                    raise req.error
                return
            item = req.take(block=True, timeout=timeout)
            if item is None:
                raise GenerationError(f"no output from the engine within {timeout} s")
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

"""The public `Model`: load a GGUF model on a backend, then logits / generate / stream / chat."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .backends import get_backend
from .config import ModelConfig
from .constrain import Constraint
from .errors import ConfigError, GenerationError, TokenizerError, UnsupportedError, WasmchordError, is_integer
from .formats.gguf import GGUFFile
from .generate import DEFAULT_MAX_TOKENS, Chunk, Completion, Sequence, check_args, stream_chunks
from .hub import resolve_model
from .sampling import SamplingParams
from .text.chat_template import encode_chat
from .text.tokenizer import Tokenizer
from .transformer import Transformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadStats:
    seconds: float
    backend: str
    context_length: int
    slots: int = 1
    kv_cache_bytes: int = 0


class ModelLock:
    """Serializes generations on one model across threads: a generation holds it from its first token
    to its last, a second thread's call waits for it. The thread that holds it may enter again (its
    interleaved streams are told apart by their cache slot's owner). Release is allowed from any
    thread (a generator may be closed by the garbage collector elsewhere)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._guard = threading.Lock()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (again, on the thread that holds it); `blocking=False`: only when no thread, this
        one included, holds it (False otherwise)."""
        me = threading.get_ident()
        with self._guard:
            if self._owner == me and blocking:
                self._depth += 1
                return True
        if not self._lock.acquire(blocking):
            return False
        with self._guard:
            self._owner, self._depth = me, 1
        return True

    def release(self):
        with self._guard:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def on_engine_path(logprobs, logit_bias) -> bool:
    """logprobs= and logit_bias= need the logits on the host every step: one stream then runs through
    an engine stepped on the caller's thread, in a slot of the engine's choosing."""
    return logprobs is not None or bool(logit_bias)


class Model:
    """A loaded model. Build with `Model.load(path_or_alias, device=...)`.

    `transformer` is the graph with its weights and KV cache; `Sequence(model.transformer)` gives a
    sequence of one's own for the token-level API in `wasmchord.generate`."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, tokenizer: Tokenizer, transformer: Transformer,
                 load_stats: LoadStats):
        self.gguf, self.config, self.tokenizer = gf, cfg, tokenizer
        self.transformer = transformer
        self.backend = transformer.be
        self.load_stats = load_stats
        self.lock = ModelLock()
        self._sequence = Sequence(transformer)  # what logits/stream/generate use unless given another
        self.serving = None  # the engine running on its own thread over this model's slots, if any

    @classmethod
    def load(cls, path_or_alias: str | os.PathLike, *, device: str = "auto", context_length: int | None = None,
             slots: int = 1, progress=None, **backend_options) -> "Model":
        """Load a GGUF model.

        Args:
            path_or_alias: a .gguf path or a known alias (pulled on first use).
            device: "cpu", "gpu", "auto" (a hardware GPU when present, else the CPU), or a Backend instance.
            context_length: cap on the context (default: the model's, at most 4096).
            slots: sequences the KV cache holds at once (batched generation, `engine()`); the cache takes
                slots x context_length x the per-token KV size (`load_stats.kv_cache_bytes`).
            progress: called as progress(stage, done, total) while pulling and loading.
            backend_options: passed to the backend (cpu: weights="quantized" | "f32", activations="auto" |
                "f32" | "int16" | "int8").

        Raises:
            GGUFError, ConfigError, UnsupportedError, TokenizerError: bad or unsupported file.
            BackendError: the device is unavailable (the message says what to install).
        """
        t0 = time.perf_counter()
        gf = GGUFFile(resolve_model(path_or_alias, progress=progress))
        try:
            cfg = ModelConfig.from_gguf(gf.metadata)
        except (ConfigError, UnsupportedError) as e:  # the key is named; the file too
            raise type(e)(f"{gf.path}: {e}") from None
        tok = Tokenizer(gf.metadata, source=str(gf.path))
        if tok.vocab_size != cfg.vocab_size:  # llama.cpp: the embedding has a row per token, no more, no less
            raise TokenizerError(f"{gf.path}: tokenizer.ggml.tokens has {tok.vocab_size} tokens, but the model's "
                                 f"vocabulary ({cfg.arch}.vocab_size, token_embd.weight) has {cfg.vocab_size}")
        if context_length is None:
            ctx = min(cfg.context_length, 4096)
        else:
            if not is_integer(context_length) or context_length < 2:
                raise GenerationError(f"context_length = {context_length!r}: expected an integer >= 2")
            ctx = min(int(context_length), cfg.context_length)
        if not is_integer(slots) or not 1 <= slots <= 256:
            raise GenerationError(f"slots = {slots!r}: expected an integer from 1 to 256")
        slots = int(slots)
        backend = get_backend(device, **backend_options)
        tf = Transformer(gf, cfg, backend, ctx, progress=progress, slots=slots)
        kv = 4 * cfg.n_layers * cfg.n_kv_heads * (cfg.head_dim + cfg.head_dim_v) * ctx * slots
        stats = LoadStats(time.perf_counter() - t0, backend.name, ctx, slots, kv)
        log.info("loaded %s (%s) on %s in %.2f s; KV cache %d slot(s) x %d positions = %.1f MiB", gf.path.name,
                 cfg.arch, backend.name, stats.seconds, slots, ctx, kv / 2**20)
        return cls(gf, cfg, tok, tf, stats)

    # ------------------------------------------------------------------------------------ evaluation
    def logits(self, ids, *, hidden: list | None = None) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) for `ids` evaluated in a fresh context.

        `hidden`, when given, receives the residual stream [len(ids), d] after each layer."""
        ids = self.prompt_ids(ids)
        self._check_not_serving()
        with self.lock:
            self._check_not_serving()  # again under the lock: an engine may have started meanwhile
            return self._sequence.evaluate(ids, hidden=hidden)

    def close(self):
        """Free the weights and the KV cache now, rather than when the model is garbage-collected: a
        running engine is stopped, a generation on another thread is waited for. Later calls (and
        generations, `Chat`s and engines left open on it) raise `GenerationError`. Calling it again does
        nothing; `with Model.load(...) as model:` closes on leaving the block."""
        if self.serving is not None:
            self.serving.stop()
        with self.lock:
            if self.transformer.closed:
                return
            self.transformer.close()
            self.backend.release()
            self.gguf.close()
        log.info("closed %s", self.gguf.path.name)

    @property
    def closed(self) -> bool:
        return self.transformer.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_not_serving(self):
        self.transformer._check_open()
        if self.serving is not None:
            raise GenerationError("this model's KV cache slots belong to a running engine (Model.engine()."
                                  "start()): submit to the engine, or stop it first")

    def prompt_ids(self, prompt) -> list[int]:
        """Token ids of a prompt given as text or as ids (checked against the vocabulary).

        Raises:
            GenerationError: the prompt is empty.
            TypeError: it is neither text nor a list of ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            if isinstance(prompt, np.ndarray) and prompt.ndim != 1:
                raise TypeError(f"prompt token ids must be 1-D, got an array of shape {prompt.shape}")
            ids = [self.tokenizer.check_id(i) for i in prompt]
        else:
            raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise GenerationError("the prompt is empty: give text, or token ids (e.g. [model.tokenizer.bos_id])")
        return ids

    # ------------------------------------------------------------------------------------ generation
    def stream(self, prompt, *, max_tokens: int = DEFAULT_MAX_TOKENS, stop=None, sequence: Sequence | None = None,
               logprobs: int | None = None, logit_bias: dict | None = None, **sampling) -> Iterator[Chunk]:
        """Yield `Chunk`s of generated text; the last has `finish_reason` ("stop" or "length") and `stats`.

        Args:
            prompt: text, or a list of token ids.
            max_tokens: generate at most this many tokens (None: until the context is full).
            stop: a string or strings that end the text (never emitted, not even in part).
            sequence: whose cached tokens the prompt may reuse (default: the model's own).
            sampling: the fields of `SamplingParams` (temperature, top_k, top_p, min_p, repeat_penalty,
                presence_penalty, frequency_penalty, penalty_last_n, seed) with their defaults, and at
                most one constraint on the output: `json_schema` (a dict or JSON text), `regex`, or
                `grammar` (Lark syntax; see `wasmchord.constrain`).
            logprobs: 0-20: each chunk with a token carries its log-probability and that many of the
                most likely alternatives (`Chunk.logprob`, `Chunk.top_logprobs`; `Completion.logprobs`).
                The logits then come back to the host every step (the engine's path), as in a batch.
            logit_bias: {token id: bias from -100 to 100} added to the logits before sampling (-100
                bans the token), as OpenAI's API takes it; also on the engine's path.

        Raises:
            GenerationError: bad arguments, an empty prompt, or a prompt longer than the context.
            TypeError: an unknown keyword argument.
        """
        if on_engine_path(logprobs, logit_bias):  # the engine checks the arguments, constraints included
            if sequence is not None:
                raise GenerationError("logprobs= and logit_bias= cannot be combined with sequence=: they take the "
                                      "engine's path, which uses the model's own slots")
            yield from self._engine_stream(prompt, max_tokens=max_tokens, stop=stop, logprobs=logprobs,
                                           logit_bias=logit_bias, **sampling)
            return
        constraint = Constraint.from_options(self.tokenizer, sampling)
        params = SamplingParams.from_options(sampling)
        stop = check_args(max_tokens, stop)
        ids = self.prompt_ids(prompt)
        self._check_not_serving()
        if max_tokens is None:
            max_tokens = max(self.transformer.max_ctx - len(ids) + 1, 1)  # the last token needs no cache slot
        with self.lock:  # held until this stream ends or is closed
            self._check_not_serving()  # again under the lock: an engine may have started meanwhile
            yield from stream_chunks(sequence or self._sequence, self.tokenizer, ids, params,
                                     max_tokens=max_tokens, stop=stop, stop_ids=self.tokenizer.eot_ids,
                                     matcher=constraint.matcher() if constraint else None)

    def _engine_stream(self, prompt, **kw) -> Iterator[Chunk]:
        """One request through an engine stepped on this thread, its chunks as they come."""
        from .engine import Engine
        self._check_not_serving()
        engine = Engine(self, max_queue=1)
        req = engine.submit(prompt, **kw)[0]
        with self.lock:
            self._check_not_serving()  # again under the lock: an engine may have started meanwhile
            while True:
                item = req.take(block=False)
                if item is None:
                    engine.step()
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return

    def generate(self, prompt, *, n: int = 1, **kw) -> "Completion | list[Completion]":
        """Blocking generation: the whole `Completion` (text, tokens, finish_reason, timings).

        A list of prompts (texts, or lists of token ids) runs as one batch through the engine and
        returns a list of Completions in the same order; `n` > 1 samples a prompt n times sharing its
        prefill (a list of n Completions). Batches use the model's KV cache slots
        (`Model.load(..., slots=N)`); prompts beyond the free slots wait for one.
        Takes the keyword arguments of `stream`."""
        batch = isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], (str, list, tuple,
                                                                                          np.ndarray))
        from .engine.engine import Engine, check_n
        n = check_n(n, self.transformer.slots)
        if not batch and n == 1:
            return Completion.from_chunks(self.stream(prompt, **kw))
        prompts = list(prompt) if batch else [prompt]
        for i, p in enumerate(prompts):
            if not isinstance(p, (str, list, tuple, np.ndarray)):
                raise TypeError(f"prompt {i} of the batch is a {type(p).__name__}: expected text or a list of token ids")
            if len(p) == 0:
                raise GenerationError(f"prompt {i} of the batch is empty")
        self._check_not_serving()
        if kw.pop("sequence", None) is not None:
            raise GenerationError("sequence= applies to one prompt, not to a batch")
        engine = Engine(self, max_queue=len(prompts) * n)
        reqs = []
        for i, p in enumerate(prompts):
            try:
                reqs += engine.submit(p, n=n, **kw)
            except (WasmchordError, TypeError) as e:
                if not batch:
                    raise
                raise (TypeError if isinstance(e, TypeError) else GenerationError)(f"prompt {i} of the batch: {e}") from None
        with self.lock:  # the batch holds the model from its first step to its last, as one generation does
            self._check_not_serving()  # again under the lock: an engine may have started meanwhile
            engine.run(reqs)
        out = []
        for r in reqs:
            items = []
            while (item := r.take(block=False)) is not None:
                items.append(item)
            if items and isinstance(items[-1], BaseException):
                raise items[-1]
            out.append(Completion.from_chunks(items))
        return out if batch or n > 1 else out[0]

    def engine(self, **options):
        """A batch engine over this model's KV cache slots (see `wasmchord.engine.Engine`)."""
        from .engine import Engine
        return Engine(self, **options)

    def chat_ids(self, messages, *, tools: list | None = None, parse_special: bool = False,
                 continue_final_message: bool = False) -> list[int]:
        """The prompt for `messages` (and function `tools`, for a template that takes them): rendered with
        the model's chat template and tokenized. Special-token text in the messages' content
        (`<|im_start|>`...) stays text unless `parse_special` (trusted content only); the template's own
        markers are special tokens. `continue_final_message`: the last message is the assistant's reply
        begun, which the model continues (the prompt ends with its content)."""
        try:
            return encode_chat(self.tokenizer, messages, tools=tools, parse_special=parse_special,
                               continue_final_message=continue_final_message)
        except GenerationError as e:  # the template is the file's: say which
            if str(e).startswith("chat template"):
                raise GenerationError(f"{self.gguf.path.name}: {e}") from None
            raise

    def chat_stream(self, messages, *, parse_special: bool = False, continue_final_message: bool = False,
                    **kw) -> Iterator[Chunk]:
        """Stream the assistant's reply to `messages` ([{"role", "content"}, ...])."""
        return self.stream(self.chat_ids(messages, parse_special=parse_special,
                                         continue_final_message=continue_final_message), **kw)

    def chat(self, messages, *, parse_special: bool = False, continue_final_message: bool = False,
             **kw) -> Completion:
        """The assistant's reply to `messages` as a `Completion` (`parse_special`, `continue_final_message`
        as in `chat_ids`)."""
        return self.generate(self.chat_ids(messages, parse_special=parse_special,
                                           continue_final_message=continue_final_message), **kw)

    def start_chat(self, system: str | None = None, *, parse_special: bool = False) -> "Chat":
        """A multi-turn conversation (with an optional system prompt) that keeps its KV cache between turns."""
        return Chat(self, system=system, parse_special=parse_special)

    def __repr__(self):
        closed = ", closed" if self.closed else ""
        return f"Model({self.gguf.path.name!r}, arch={self.config.arch}, backend={self.backend.name}{closed})"


class Chat:
    """A multi-turn conversation: its messages and its own `Sequence`, so each turn evaluates only the
    tokens not already in the cache."""

    def __init__(self, model: Model, system: str | None = None, *, parse_special: bool = False):
        self.model, self.parse_special = model, parse_special
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.sequence = Sequence(model.transformer)

    def reset(self):
        """Forget the conversation (a system prompt stays)."""
        self.messages = [m for m in self.messages if m["role"] == "system"][:1]
        self.sequence.reset()

    def send_stream(self, text: str, **kw) -> Iterator[Chunk]:
        """Add a user message and stream the reply, which joins `messages` once complete.

        Takes the keyword arguments of `Model.stream`."""
        self.messages.append({"role": "user", "content": text})
        reply = []
        try:
            ids = self.model.chat_ids(self.messages, parse_special=self.parse_special)
            # logprobs / logit_bias run through the engine, on a slot of its own choosing: the
            # conversation's cache is then evaluated again on the next turn
            engine_path = on_engine_path(kw.get("logprobs"), kw.get("logit_bias"))
            for ch in self.model.stream(ids, sequence=None if engine_path else self.sequence, **kw):
                reply.append(ch.text)
                yield ch
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def send(self, text: str, **kw) -> Completion:
        """Add a user message, generate the reply (kept in `messages`), return it as a Completion."""
        return Completion.from_chunks(self.send_stream(text, **kw))

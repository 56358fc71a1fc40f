"""`wasmchord.Model`: load a GGUF model on a backend, then logits / generate / stream / chat."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .backends import get_backend
from .text.chat_template import encode_chat
from .config import ModelConfig
from .errors import GenerationError
from .generate import Chunk, Completion, Session, _Stats, check_args, stream_chunks
from .formats.gguf import GGUFFile
from .hub import resolve_model
from .transformer import Transformer
from .sampling import SamplingParams
from .text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadStats:
    seconds: float
    backend: str
    context_length: int


class Model:
    """A loaded model. Build with `Model.load(path_or_alias, device=...)`."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, tokenizer: Tokenizer, transformer: Transformer,
                 load_stats: LoadStats):
        self.gguf, self.config, self.tokenizer = gf, cfg, tokenizer
        self._tf = transformer
        self.backend = transformer.be
        self.load_stats = load_stats
        self._session = Session(transformer)

    @classmethod
    def load(cls, path_or_alias: str | os.PathLike, *, device: str = "auto", context_length: int | None = None,
             progress=None, **backend_options) -> "Model":
        """Load a GGUF model.

        Args:
            path_or_alias: a .gguf path or a known alias (pulled on first use).
            device: "cpu", "gpu", "auto" (a hardware GPU when present, else the CPU), or a Backend instance.
            context_length: cap on the context (default: the model's, at most 4096).
            progress: called as progress(stage, done, total) while pulling and loading.
            backend_options: passed to the backend (cpu: weights="f32" | "quantized").

        Raises:
            GGUFError, ConfigError, UnsupportedError, TokenizerError: bad or unsupported file.
            BackendError: the device is unavailable (the message says what to install).
        """
        t0 = time.perf_counter()
        gf = GGUFFile(resolve_model(path_or_alias, progress=progress))
        cfg = ModelConfig.from_gguf(gf.metadata)
        tok = Tokenizer(gf.metadata, source=str(gf.path))
        if context_length is None:
            ctx = min(cfg.context_length, 4096)
        else:
            if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
                raise GenerationError(f"context_length = {context_length!r}: expected an integer >= 2")
            ctx = min(context_length, cfg.context_length)
        backend = get_backend(device, **backend_options)
        tf = Transformer(gf, cfg, backend, ctx, progress=progress)
        stats = LoadStats(time.perf_counter() - t0, backend.name, ctx)
        log.info("loaded %s (%s) on %s in %.2f s", gf.path.name, cfg.arch, backend.name, stats.seconds)
        return cls(gf, cfg, tok, tf, stats)

    # ------------------------------------------------------------------------------------ evaluation
    def logits(self, ids, *, hidden: list | None = None) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) for `ids` evaluated in a fresh context.

        `hidden`, when given, receives the residual stream [len(ids), d] after each layer."""
        ids = self._ids(ids)
        if len(ids) > self._tf.max_ctx:
            raise GenerationError(f"{len(ids)} tokens exceed the context length {self._tf.max_ctx}")
        self._session.reset()
        self._tf.cache_owner = self._session
        out = self.backend.read(self._tf.forward(np.asarray(ids, np.int64), 0, all_logits=True, hidden=hidden))
        self._session.tokens = list(ids)
        return np.asarray(out, dtype=np.float32)

    def _ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [self.tokenizer._check_id(i) for i in prompt]
        else:
            raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise GenerationError("the prompt is empty: give text, or token ids (e.g. [model.tokenizer.bos_id])")
        return ids

    # ------------------------------------------------------------------------------------ generation
    def stream(self, prompt, *, max_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int | None = None,
               stop=None, session: Session | None = None) -> Iterator[Chunk]:
        """Yield `Chunk`s of generated text; the last has `finish_reason` ("stop" or "length").

        Raises:
            GenerationError: bad arguments, an empty prompt, or a prompt longer than the context.
        """
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
                                frequency_penalty, seed=seed)
        stop = check_args(max_tokens, stop)
        ids = self._ids(prompt)
        self._last_stats = stats = _Stats()
        yield from stream_chunks(session or self._session, self.tokenizer, ids, params, max_tokens=max_tokens,
                                 stop=stop, stop_ids=self.tokenizer.eot_ids, stats=stats)

    def generate(self, prompt, **kw) -> Completion:
        """Blocking generation: the whole `Completion` (text, tokens, finish_reason, timings).

        Takes the same keyword arguments as `stream`."""
        parts, reason = [], "length"
        for ch in self.stream(prompt, **kw):
            parts.append(ch.text)
            reason = ch.finish_reason or reason
        s = self._last_stats
        return Completion("".join(parts), list(s.tokens), reason, s.prompt_tokens, len(s.tokens),
                          s.prompt_eval_s, s.eval_s, s.cached_tokens)

    def chat_ids(self, messages) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def chat_stream(self, messages, **kw) -> Iterator[Chunk]:
        """Stream the assistant's reply to `messages` ([{"role", "content"}, ...])."""
        return self.stream(self.chat_ids(messages), **kw)

    def chat(self, messages, **kw) -> Completion:
        """The assistant's reply to `messages` as a `Completion`."""
        return self.generate(self.chat_ids(messages), **kw)

    def session(self) -> "ChatSession":
        """A multi-turn conversation that keeps its KV cache between turns."""
        return ChatSession(self)

    @property
    def last_stats(self) -> _Stats:
        return self._last_stats

    def __repr__(self):
        return f"Model({self.gguf.path.name!r}, arch={self.config.arch}, backend={self.backend.name})"


class ChatSession:
    """Multi-turn chat: each turn only evaluates tokens not already in the cache."""

    def __init__(self, model: Model, system: str | None = None):
        self.model = model
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._session = Session(model._tf)
        self._finish = "length"

    def reset(self):
        self.messages = [m for m in self.messages if m["role"] == "system"][:1]
        self._session.reset()

    def send_stream(self, text: str, **kw) -> Iterator[Chunk]:
        self.messages.append({"role": "user", "content": text})
        ids = self.model.chat_ids(self.messages)
        reply = []
        try:
            for ch in self.model.stream(ids, session=self._session, **kw):
                reply.append(ch.text)
                self._finish = ch.finish_reason or self._finish
                yield ch
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def send(self, text: str, **kw) -> Completion:
        """Add a user message, generate the reply (kept in `messages`), return it as a Completion."""
        self._finish = "length"
        for _ in self.send_stream(text, **kw):
            pass
        s = self.model.last_stats
        return Completion(self.messages[-1]["content"], list(s.tokens), self._finish, s.prompt_tokens, len(s.tokens),
                          s.prompt_eval_s, s.eval_s, s.cached_tokens)

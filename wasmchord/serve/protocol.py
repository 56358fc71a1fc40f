"""The OpenAI API's request bodies (validated with pydantic), their mapping to engine arguments, and
the response objects and error shape the server returns."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..generate import Chunk

ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system


class ApiError(Exception):
    """An error answered with OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


STRICT = ConfigDict(strict=True)  # a value of the wrong JSON type is a 400 (no "0.5" for 0.5, no "yes" for true)


class _Body(BaseModel):
    # unknown fields are ignored, as OpenAI's API does; NaN and infinities are never a parameter's value
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str | None = None
    stream: bool = False
    stream_options: dict | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off (vLLM's and llama.cpp's -1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=16)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stream", "n", "logprobs", "echo", "continue_final_message", mode="before",
                     check_fields=False)  # logprobs: the chat's bool
    @classmethod
    def _null_is_the_default(cls, v, info):  # clients send null for a parameter left at its default
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        if len(stops) > 8:
            raise ValueError(f"{len(stops)} stop strings: at most 8")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def check_unsupported(self):
        """Parameters this server does not implement are refused, never accepted and ignored."""
        extra = self.model_extra or {}
        for name in ("suffix", "functions", "function_call"):
            if extra.get(name) not in (None, {}, [], False):
                raise ApiError(400, f"{name} is not supported by this server", param=name)
        if extra.get("echo"):
            raise ApiError(400, "echo is not supported by this server", param="echo")
        if extra.get("best_of") not in (None, 1):
            raise ApiError(400, "best_of is not supported by this server (use n)", param="best_of")

    def constraint(self) -> dict:
        """response_format as the engine's json_schema= (json_object: any object; json_schema: its
        schema, enforced whether or not `strict` is set)."""
        rf = self.response_format
        if rf is None or rf.get("type", "text") == "text":
            return {}
        if rf.get("type") == "json_object":
            return {"json_schema": {"type": "object"}}
        if rf.get("type") == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ApiError(400, "response_format.json_schema must be {\"name\": ..., \"schema\": {...}}",
                               param="response_format.json_schema")
            return {"json_schema": spec.get("schema", {})}
        raise ApiError(400, f"response_format.type = {rf.get('type')!r}: expected text, json_object or json_schema",
                       param="response_format.type")

    def engine_args(self, max_tokens: int) -> dict:
        """Keyword arguments of Engine.submit (sampling options left out keep the library defaults)."""
        args = {"max_tokens": max_tokens, "n": self.n,
                "stop": [self.stop] if isinstance(self.stop, str) else self.stop}
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repeat_penalty", "seed", "logit_bias"):
            if getattr(self, name) is not None:
                args[name] = getattr(self, name)
        if args.get("top_k") == -1:
            args["top_k"] = 0
        return args


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        for part in v if isinstance(v, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in (None, "text"):
                raise ValueError(f"a content part of type {kind!r}: this server reads text parts only")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates read it: arguments of earlier tool calls as objects."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                fn = dict(c.get("function") or {})
                if fn.get("arguments") == "":  # a call without arguments
                    fn["arguments"] = {}
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        raise ApiError(400, "a tool call's arguments must be a JSON object",
                                       param="messages.tool_calls") from None
                calls.append({**c, "function": fn})
            out["tool_calls"] = calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    continue_final_message: bool = False  # the last message is the assistant's reply begun (vLLM's option)
    parallel_tool_calls: bool | None = None  # False: at most one call comes back

    def check_unsupported(self):
        super().check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tool_choice not in (None, "auto", "none") and not self.tools:
            raise ApiError(400, f"tool_choice = {self.tool_choice!r} needs tools", param="tool_choice")

    def chat_messages(self) -> list[dict]:
        return template_messages(self.messages)


def template_messages(messages: list[Message]) -> list[dict]:
    """Messages as the chat template takes them (the assistant's tool calls, arguments as objects)."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role = {m.role!r}: expected one of {', '.join(ROLES)}",
                           param=f"messages[{i}].role")
        msg = m.for_template()
        if msg["role"] == "developer":  # chat templates know it as system
            msg["role"] = "system"
        out.append(msg)
    return out


class CompletionRequest(_Body):
    prompt: Union[str, list[int], list[str], list[list[int]]]  # one prompt, or a batch (a choice per prompt x n)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt's too)
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt, generate nothing

    def prompts(self) -> list:
        """The prompts: texts or lists of token ids."""
        p = self.prompt
        if isinstance(p, str) or p and isinstance(p[0], int):
            return [p]
        if not p:
            raise ApiError(400, "prompt is empty", param="prompt")
        if len(p) > 64:
            raise ApiError(400, f"prompt: {len(p)} prompts in one request, at most 64", param="prompt")
        return list(p)

    def check_unsupported(self):
        super().check_unsupported()
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens = 0 generates nothing: it goes with echo (to score the prompt)",
                           param="max_tokens")


class TokenizeRequest(BaseModel):
    model_config = STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    tools: list | None = None             # with messages: counted as the chat endpoint renders them
    continue_final_message: bool = False  # with messages: as the chat endpoint takes it
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    model: str | None = None
    tokens: list[int]


_BRANCH = re.compile(r"str|int|float|bool|none|dict|list\[.*\]|function-\w+\[.*\]")


def parse(kind: type[BaseModel], raw: Any):
    """A request body, or ApiError(400) naming the first bad field."""
    if not isinstance(raw, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]  # its location without pydantic's union branches ("stop.str", "content.list[...]")
        where = ".".join(str(x) for x in err["loc"] if not _BRANCH.fullmatch(str(x)))
        raise ApiError(400, f"{where}: {err['msg']}", param=where) from None


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def envelope(kind: str, rid: str, model: str, choices: list, use: dict | None = None, *,
             null_usage: bool = False) -> dict:
    """A response or chunk; `null_usage`: a stream chunk before the usage chunk ("usage": null, as OpenAI
    sends when stream_options.include_usage is set)."""
    out = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None or null_usage:
        out["usage"] = use
    return out


def chat_logprobs(tokenizer, chunks) -> dict:
    """OpenAI's chat `logprobs.content` for the chunks that carry a token."""
    def entry(tok, lp):
        b = tokenizer.token_bytes(tok, skip_special=False)
        return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}
    return {"content": [dict(entry(c.token, c.logprob), top_logprobs=[entry(t, p) for t, p in c.top_logprobs or []])
                        for c in chunks if c.token is not None and c.logprob is not None]}


def prompt_chunks(tokenizer, scored: list | None, ids: list[int], *, skip_special: bool) -> list[Chunk]:
    """An echoed prompt as chunks: each token's text piece and, when `scored` (the engine's
    `Request.prompt_logprobs`), its log-probability and alternatives. `skip_special`: control tokens
    (a BOS the tokenizer added to a text prompt) have no text; else theirs."""
    stream, out = tokenizer.stream(skip_special=skip_special), []
    for k, tok in enumerate(ids):
        _, lp, top = scored[k] if scored else (tok, None, None)
        out.append(Chunk(stream.add_token(tok), tok, logprob=lp, top_logprobs=top))
    if out:
        out[-1].text += stream.flush()
    return out


def completion_logprobs(tokenizer, chunks, offset: int = 0) -> dict:
    """OpenAI's (legacy) completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    toks, lps, tops, offs = [], [], [], []
    for c in chunks:
        if c.token is None:
            continue
        text = tokenizer.token_bytes(c.token, skip_special=False).decode("utf-8", "replace")
        toks.append(text)
        lps.append(c.logprob)  # None for an echoed prompt's first token (nothing predicts it)
        top = None  # the most likely tokens and the token itself (OpenAI's "up to logprobs + 1")
        if c.logprob is not None:
            top = {tokenizer.token_bytes(t, skip_special=False).decode("utf-8", "replace"): p
                   for t, p in c.top_logprobs or []}
            top.setdefault(text, c.logprob)
        tops.append(top)
        offs.append(offset)
        offset += len(c.text)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

"""Chat prompts: the GGUF's `tokenizer.chat_template` in a sandboxed Jinja2 environment, or a fallback.

Fallbacks when the file has no template: Gemma's turn format when the vocabulary has
`<start_of_turn>`, ChatML when it has `<|im_start|>`, else Llama-2's `[INST]`.
"""

from __future__ import annotations

import json

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import GenerationError

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Gemma has no system role: the system text opens the first user turn (as Gemma's HF template does).
GEMMA = ("{{ bos_token }}{% set sys = '' %}{% for m in messages %}"
         "{% if m['role'] == 'system' %}{% set sys = m['content'] + '\n\n' %}{% else %}"
         "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + (sys if loop.index0 <= 1 else '') + m['content'] | trim + '<end_of_turn>\n' }}"
         "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
LLAMA2 = ("{{ bos_token }}{% set sys = '' %}{% for m in messages %}"
          "{% if m['role'] == 'system' %}{% set sys = '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' %}"
          "{% elif m['role'] == 'user' %}{{ '[INST] ' + sys + m['content'] + ' [/INST]' }}{% set sys = '' %}"
          "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


def _raise(msg):
    raise GenerationError(f"chat template: {msg}")


def fallback_template(tokenizer) -> str:
    if "<start_of_turn>" in tokenizer.vocab:
        return GEMMA
    if "<|im_start|>" in tokenizer.vocab:
        return CHATML
    return LLAMA2


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise GenerationError(f"message {i} is a {type(m).__name__}, expected a dict with 'role' and 'content'")
        if not isinstance(m.get("role"), str):
            raise GenerationError(f"message {i} has no string 'role'")
        calls = m.get("tool_calls")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise GenerationError(f"message {i} has no string 'content'")
        m = {k: m[k] for k in ("role", "content", "tool_calls", "tool_call_id", "name") if k in m}
        if calls:
            m["tool_calls"] = [_template_call(i, c) for c in calls]
        out.append(m)
    return out


def _template_call(i: int, call) -> dict:
    """An OpenAI tool call as templates read it: `arguments` a mapping, not the JSON text the API
    carries (templates write `arguments | tojson`)."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise GenerationError(f"message {i} has a tool call that is not a dict with a 'function'")
    fn = dict(call["function"])
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise GenerationError(f"message {i}: tool call arguments are not JSON ({e.msg})") from None
    return {**call, "function": fn}


def render(tokenizer, messages, *, add_generation_prompt: bool = True, template: str | None = None,
           tools: list | None = None) -> str:
    """Render `messages` (and the function `tools` a template may take) with the model's template (or
    `template`). Messages are {"role", "content"}, an assistant's may carry "tool_calls" instead of
    content, a "tool" message its "tool_call_id".

    Raises:
        GenerationError: malformed messages, or the template failed (its own message included).
    """
    messages = check_messages(messages)
    src = template or tokenizer.chat_template or fallback_template(tokenizer)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    bos = tokenizer.tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else ""
    eos = tokenizer.tokens[tokenizer.eos_id] if tokenizer.eos_id is not None else ""
    try:
        return env.from_string(src).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           bos_token=bos, eos_token=eos, tools=tools or None)
    except GenerationError:
        raise
    except TemplateError as e:
        raise GenerationError(f"chat template failed: {e}") from None
    except Exception as e:  # a template is user data: any error inside it is reported, not propagated raw
        raise GenerationError(f"chat template raised {type(e).__name__}: {e}") from None


def encode_chat(tokenizer, messages, **kw) -> list[int]:
    """Rendered, tokenized prompt with special tokens parsed; never two BOS tokens."""
    text = render(tokenizer, messages, **kw)
    ids = tokenizer.encode(text, parse_special=True)
    if len(ids) >= 2 and ids[0] == ids[1] == tokenizer.bos_id:
        ids = ids[1:]
    return ids


def takes_tools(tokenizer) -> bool:
    """Whether the model's chat template renders function tools (it reads a `tools` variable)."""
    return bool(tokenizer.chat_template) and "tools" in tokenizer.chat_template

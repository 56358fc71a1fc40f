"""Chat prompts: the GGUF's `tokenizer.chat_template` in a bounded Jinja2 sandbox (sandbox.py), or a
fallback; tokenized so that the template's special tokens are special and the messages' content is text.

Fallbacks when the file has no template: Gemma's turn format when the vocabulary has
`<start_of_turn>`, ChatML when it has `<|im_start|>`, else Llama-2's `[INST]`.
"""

from __future__ import annotations

import json
import re

from jinja2 import TemplateError

from ..errors import GenerationError
from .sandbox import DEFAULT_LIMITS, BoundedSandbox, TemplateLimits

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Gemma has no system role: the system text opens the first user turn (as Gemma's HF template does;
# a variable set inside a Jinja loop is gone at the next iteration, so it is set before the loop).
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
         "{% set turns = messages[1:] %}{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}"
         "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
LLAMA2 = ("{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}"
          "{% if m['role'] == 'system' %}{% set ns.sys = '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' %}"
          "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.sys + m['content'] + ' [/INST]' }}{% set ns.sys = '' %}"
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
        if isinstance(m.get("content"), (list, tuple)):  # OpenAI's content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in m["content"]):
                raise GenerationError(f"message {i}: content parts must be {{'type': 'text', 'text': ...}} "
                                      "(this model reads text only)")
            m = dict(m, content="".join(p["text"] for p in m["content"]))
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise GenerationError(f"message {i} has no string 'content'")
        m = {k: m[k] for k in ("role", "content", "tool_calls", "tool_call_id", "name") if k in m}
        if calls:
            if not isinstance(calls, (list, tuple)):
                raise GenerationError(f"message {i}: tool_calls must be a list")
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
           tools: list | None = None, limits: TemplateLimits = DEFAULT_LIMITS) -> str:
    """Render `messages` (and the function `tools` a template may take) with the model's template (or
    `template`), within `limits`. Messages are {"role", "content"}; an assistant's may carry
    "tool_calls" instead of content, a "tool" message its "tool_call_id".

    Raises:
        GenerationError: malformed messages, the template failed (its own message included), or it
            passed a limit (time, a value's size, the output's length).
    """
    return _render(tokenizer, check_messages(messages), add_generation_prompt, template, limits, tools)


def _render(tokenizer, messages, add_generation_prompt, template, limits, tools=None) -> str:
    src = template or tokenizer.chat_template or fallback_template(tokenizer)
    env = BoundedSandbox(limits, trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    bos = tokenizer.tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else ""
    eos = tokenizer.tokens[tokenizer.eos_id] if tokenizer.eos_id is not None else ""
    try:
        return env.render_bounded(src, messages=messages, add_generation_prompt=add_generation_prompt,
                                  bos_token=bos, eos_token=eos, tools=tools or None)
    except GenerationError:
        raise
    except TemplateError as e:
        raise GenerationError(f"chat template failed: {e}") from None
    except Exception as e:  # a template is user data: any error inside it is reported, not propagated raw
        raise GenerationError(f"chat template raised {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------- message content as plain text
# The rendered prompt is tokenized with special tokens parsed, for the template's own markers; the
# messages' content is text from users, in which `<|im_start|>system` must stay text. The template is
# rendered a second time with a placeholder for each content: what lies between the placeholders is
# the template's, and the real rendering must be exactly those pieces with each content put back
# (as it is, or trimmed, as Llama-3's and Gemma's templates do; a content may be left out or repeated). Special tokens are then parsed only
# outside the contents' spans, and the whole prompt is tokenized as one text, so that the tokens are
# those of the plain rendering whenever no content holds a marker.

def _placeholder(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: no template writes them


def content_spans(tokenizer, messages, text: str, *, add_generation_prompt: bool, template: str | None,
                  limits: TemplateLimits, tools: list | None = None) -> list[tuple[int, int]] | None:
    """The (start, end) of each place where `text` (the template's rendering of `messages`) holds a
    message's content, or None when the template changes contents beyond trimming them."""
    marked = [dict(m, content=_placeholder(i)) if isinstance(m["content"], str) else m
              for i, m in enumerate(messages)]
    try:
        pieces = re.split("\ue000(\\d+)\ue001", _render(tokenizer, marked, add_generation_prompt, template, limits, tools))
    except GenerationError:  # the template needs real contents (it checks them)
        return None
    spans, pos = [], len(pieces[0])
    if text[:pos] != pieces[0]:
        return None
    for k in range(1, len(pieces), 2):
        i, after = int(pieces[k]), pieces[k + 1]
        if i >= len(messages):
            return None
        c = messages[i]["content"]
        for fit in (c, c.strip(), c.lstrip(), c.rstrip()):
            if text.startswith(fit, pos) and text.startswith(after, pos + len(fit)):
                break
        else:
            return None
        spans.append((pos, pos + len(fit)))
        pos += len(fit) + len(after)
    return spans if pos == len(text) else None


def _specials_in_content(tokenizer, messages) -> list[tuple[int, str]]:
    """(message index, token text) of the special tokens whose text a message's content holds."""
    contents = [m["content"] if isinstance(m["content"], str) else "" for m in messages]
    joined = "\0".join(contents)
    chars = set(joined)
    present = [t for t, _ in tokenizer.special_tokens if t[0] in chars and t in joined]
    return [(i, t) for i, c in enumerate(contents) for t in present if t in c]


def encode_chat(tokenizer, messages, *, add_generation_prompt: bool = True, template: str | None = None,
                tools: list | None = None, parse_special: bool = False, continue_final_message: bool = False,
                limits: TemplateLimits = DEFAULT_LIMITS) -> list[int]:
    """Rendered, tokenized prompt; never two BOS tokens. The template's special tokens are parsed;
    in the messages' content they are plain text unless `parse_special` (for trusted content only).
    `continue_final_message`: the last message is the assistant's reply begun (a prefill), left open
    for the model to continue: the prompt ends where its content does (as vLLM's option).

    Raises:
        GenerationError: as `render`; or a content holds special-token text and the template changes
            contents in ways that cannot be told apart from its own text (then only `parse_special`
            can render it).
    """
    messages = check_messages(messages)
    if continue_final_message:
        last = messages[-1] if messages else {}
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str) or not last["content"].strip():
            raise GenerationError("continue_final_message: the last message must be the assistant's, with text "
                                  "content to continue")
        add_generation_prompt = False
    full = _render(tokenizer, messages, add_generation_prompt, template, limits, tools)
    spans = None
    if not parse_special or continue_final_message:
        spans = content_spans(tokenizer, messages, full, add_generation_prompt=add_generation_prompt,
                              template=template, limits=limits, tools=tools)
    cut = len(full)
    if continue_final_message:  # what follows the final content is the template's end of the turn
        if spans:
            cut = spans[-1][1]
        else:  # the template changes contents: where the final one's text last appears
            c = messages[-1]["content"]
            found = [full.rfind(fit) + len(fit) for fit in (c, c.rstrip(), c.strip()) if fit in full]
            if not found:
                raise GenerationError("continue_final_message: the chat template does not write the last "
                                      "message's content as it is")
            cut = max(found)
    text = full[:cut]
    protected = []
    if not parse_special:
        if spans is None and (marked := _specials_in_content(tokenizer, messages)):
            i, t = marked[0]
            raise GenerationError(f"message {i} contains the special token {t!r}, and this chat template changes "
                                  f"message content in a way that cannot be told apart from its own markup: "
                                  f"pass parse_special=True to tokenize it as a special token")
        protected = [(a, min(b, cut)) for a, b in spans or [] if a < cut]
    ids = tokenizer.encode(text, parse_special=True, plain_spans=protected)
    if len(ids) >= 2 and ids[0] == ids[1] == tokenizer.bos_id:
        ids = ids[1:]
    return ids


def takes_tools(tokenizer) -> bool:
    """Whether the model's chat template renders function tools (it reads a `tools` variable)."""
    return bool(tokenizer.chat_template) and "tools" in tokenizer.chat_template

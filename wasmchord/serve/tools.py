"""Function tools in the chat API: which templates take them, the constraint that makes the model call
one (tool_choice "required" or a named function), and the parser of the calls it writes.

Tool calls are written as the Hermes/Qwen2.5 templates ask: `<tool_call>\n{"name": ..., "arguments":
{...}}\n</tool_call>`, one block per call; text before the first block is the message's content.
"""

from __future__ import annotations

import json
import re
import uuid

from ..constrain import JSON_STYLE
from ..errors import GenerationError
from ..generate import stop_prefix_len
from .protocol import ApiError

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def function_of(tool) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str):
        raise ApiError(400, 'each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}',
                       param="tools")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise ApiError(400, f"tool {fn['name']!r}: parameters must be a JSON schema object, got "
                            f"{type(fn['parameters']).__name__}", param="tools")
    return tool["function"]


def check_tools(tools: list, choice):
    """ApiError(400) for a malformed tool or tool_choice, whatever the choice (a tool the model may call
    must be well formed even when it is not made to)."""
    names = [function_of(t)["name"] for t in tools]
    if choice in (None, "auto", "none", "required"):
        return
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, f'tool_choice = {choice!r}: expected "auto", "none", "required" or '
                            '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    if fn["name"] not in names:
        raise ApiError(400, f"tool_choice names {fn['name']!r}, which is not among the tools ({', '.join(names)})",
                       param="tool_choice")


def call_grammar(tools: list, choice) -> str | None:
    """A Lark grammar (llguidance) for one call of any of `tools` ("required") or of the named one;
    None when the model chooses (auto) or must not call (none)."""
    if choice in (None, "auto", "none"):
        return None
    functions = [f for _, f in callable_functions(tools, choice)]
    rules = [f"call{i}: %json {json.dumps(call_schema(f))}" for i, f in enumerate(functions)]
    return "\n".join([f'start: "{OPEN}\\n" call "\\n{CLOSE}"',
                      "call: " + " | ".join(f"call{i}" for i in range(len(functions)))] + rules)


def callable_functions(tools: list, choice) -> list[tuple[int, dict]]:
    """(index in tools, function) of the functions a forced `choice` lets the model call: all of them
    ("required"), or the named one."""
    functions = [(i, function_of(t)) for i, t in enumerate(tools)]
    if choice == "required":
        return functions
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    functions = [(i, f) for i, f in functions if f["name"] == name]
    if not functions:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return functions


def explain_call_grammar(tokenizer, tools: list, choice, error: Exception) -> str:
    """Why the grammar of `call_grammar(tools, choice)` did not compile, naming the tool (of those it
    holds) whose parameters fail on their own (the grammar's text is ours, not the user's)."""
    from ..constrain import Constraint
    for i, f in callable_functions(tools, choice):
        try:
            Constraint(tokenizer, json_schema=call_schema(f))
        except GenerationError as e:
            return f"tools[{i}] ({f['name']!r}): its parameters schema: {str(e).removeprefix('json_schema: ')}"
    return str(error)


def call_schema(function: dict) -> dict:
    """The JSON schema of one call {"name": ..., "arguments": {...}} of `function`. The parameters sit
    under /properties/arguments, so their local `$ref`s ("#/$defs/X", "#/properties/a", "#") are
    rebased there (each function's call is a grammar rule of its own: two functions' definitions of
    one name do not meet)."""
    params = _rebase_refs(function.get("parameters") or {"type": "object"}, "#/properties/arguments")
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_STYLE}


_DATA = ("const", "enum", "default", "examples")  # values, not schemas: a "$ref" key there is data


def _rebase_refs(node, base: str):
    if isinstance(node, list):
        return [_rebase_refs(x, base) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
            out[k] = base + v[1:]
        elif k in _DATA:
            out[k] = v
        else:
            out[k] = _rebase_refs(v, base)
    return out


def new_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def parse_calls(text: str, names=None) -> tuple[str | None, list[dict]]:
    """(content before the calls or None, calls) of a reply; text with no call block is all content,
    unless the whole reply is one JSON object {"name": one of `names`, "arguments": {...}} (bare or in a
    ``` fence), which small models write instead of the block."""
    if OPEN not in text:
        bare = _bare_call(text, names)
        return (None, bare) if bare else (text, [])
    content, rest = text.split(OPEN, 1)
    calls = []
    for block in (OPEN + rest).split(OPEN)[1:]:
        body = block.split(CLOSE, 1)[0].strip()
        try:
            obj = json.loads(body)
            name, args = obj["name"], obj.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # not a well-formed call: left out of tool_calls (the text stays below)
        calls.append(new_call(str(name), args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    if not calls:
        return text, []
    return (content.strip() or None), calls


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")(\s*,\s*"arguments"\s*:\s*)?')


def cut_call(text: str, names: list[str]) -> list[dict]:
    """The call a forced reply (`names`: the functions it may call) was writing when max_tokens cut it:
    [call] with the arguments written so far, as OpenAI answers a call cut by length (finish_reason
    "length"); [] while its function is not known (several to choose from, the name unfinished)."""
    body = text.split(OPEN, 1)[1] if OPEN in text else ""
    m = _CALL_HEAD.match(body)
    if m:
        name, args = json.loads(m.group(1)), (body[m.end():] if m.group(2) else "")
    elif len(names) == 1:
        name, args = names[0], ""
    else:
        return []
    if name not in names:
        return []
    try:  # arguments complete, the object or the block's end cut
        args = args[:json.JSONDecoder().raw_decode(args)[1]]
    except ValueError:
        pass
    return [new_call(name, args.rstrip())]


def _bare_call(text: str, names) -> list[dict]:
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.rsplit("```", 1)[0]
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return []
    if not (isinstance(obj, dict) and set(obj) <= {"name", "arguments"} and obj.get("name") in (names or ())
            and isinstance(obj.get("arguments", {}), dict)):
        return []
    return [new_call(obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False))]


class CallStream:
    """Streamed text split into content (sent at once) and the call blocks (held back until complete):
    text that may begin `<tool_call>` is held back like a stop string."""

    def __init__(self, names=()):
        self.pending, self.calls_text, self.in_calls, self.names = "", "", False, names
        self.sent = ""  # content already streamed
        self.text = ""  # all of the reply so far

    def add(self, text: str) -> str:
        """The content that can be sent now."""
        self.text += text
        if self.in_calls:
            self.calls_text += text
            return ""
        self.pending += text
        if OPEN in self.pending:
            content, rest = self.pending.split(OPEN, 1)
            self.in_calls, self.calls_text, self.pending = True, OPEN + rest, ""
            return content
        head = (self.sent + self.pending).lstrip()
        if not head or head.startswith(("{", "`")):  # leading blanks, or maybe a bare call: held (to the end)
            return ""
        keep = stop_prefix_len(self.pending, [OPEN])
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        self.sent += out
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content still held back, calls) at the end of the reply."""
        if not self.in_calls:
            out, self.pending = self.pending, ""
            calls = [] if self.sent else _bare_call(out, self.names)
            return ("" if calls else out), calls
        _, calls = parse_calls(self.calls_text, self.names)
        return ("" if calls else self.calls_text), calls

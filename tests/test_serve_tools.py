"""Tool calls through the `openai` client on Qwen2.5-Coder-1.5B-Instruct, whose chat template takes
tools: a required or named call is constrained to the tool's schema, an automatic one is parsed from
the model's `<tool_call>` blocks; streamed as tool-call deltas; tool results go back in the chat."""

import json

import jsonschema
import openai
import pytest

from test_serve import start

from wasmchord.hub import resolve_model
from wasmchord.text.chat_template import encode_chat, render
from wasmchord.text.tokenizer import Tokenizer

MODEL = "qwen2.5-coder-1.5b-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
TOKENIZER = Tokenizer.from_gguf(resolve_model(MODEL))
ASK = [{"role": "user", "content": "What is the weather like in Paris right now, in celsius?"}]


@pytest.fixture(scope="module")
def client():
    proc, url = start("--slots", "2", "--context-length", "1024", key=None, model=MODEL)
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    proc.terminate()
    proc.wait(timeout=60)


def check_call(call, tool):
    assert call.type == "function" and call.id and call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_required_and_named_calls_follow_the_schema(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=80, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    check_call(c.message.tool_calls[0], WEATHER)
    named = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=80,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           temperature=0)
    check_call(named.choices[0].message.tool_calls[0], TIME)


def test_streamed_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 max_tokens=80, temperature=0, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    args = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
    # a forced call streams its arguments as they are written (as OpenAI's and vLLM's do), not at the end
    assert len([d for d in deltas if d.function.arguments]) > 3
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=80, temperature=0).choices[0].message.tool_calls[0]
    assert args == whole.function.arguments
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_cut_by_max_tokens_is_a_call_with_the_arguments_so_far(client, choice):
    # As OpenAI answers: finish_reason "length", the call with its arguments cut where the tokens ran
    # out; the grammar's own text (`<tool_call>`, the name's key) is never content.
    args = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, temperature=0)
    whole = client.chat.completions.create(max_tokens=80, **args)
    full, n = whole.choices[0].message.tool_calls[0].function, whole.usage.completion_tokens
    for max_tokens in (n - 1, n - 2):  # the arguments written, the block's end not: still "length"
        c = client.chat.completions.create(max_tokens=max_tokens, **args).choices[0]
        assert c.finish_reason == "length" and full.arguments.startswith(c.message.tool_calls[0].function.arguments)
    for max_tokens in (3, 17):
        c = client.chat.completions.create(max_tokens=max_tokens, **args).choices[0]
        assert c.finish_reason == "length" and c.message.content is None
        chunks = list(client.chat.completions.create(max_tokens=max_tokens, stream=True, **args))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert not "".join(d.content or "" for d in deltas) and deltas[-1].model_dump()["content"] is None
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
        if max_tokens == 3 and choice == "required":  # `<tool_call>\n{"`: which function is not known yet
            assert c.message.tool_calls is None and not streamed
            continue
        call = c.message.tool_calls[0].function
        assert call.name == full.name == "get_weather" and streamed[0].function.name == call.name
        assert full.arguments.startswith(call.arguments) and len(call.arguments) < len(full.arguments)
        assert "".join(tc.function.arguments or "" for tc in streamed) == call.arguments
        assert call.arguments if max_tokens == 17 else not call.arguments


def test_cut_call_reads_the_name_and_the_arguments_written_so_far():
    from wasmchord.serve.tools import cut_call
    head = '<tool_call>\n{"name": "get_time", "arguments": '
    for text, one, two in (('<tool_', ("get_time", ""), None), (head[:20], ("get_time", ""), None),
                           (head[:-14], ("get_time", ""), ("get_time", "")),
                           (head + '{"zone": "Europe/Pa', *[("get_time", '{"zone": "Europe/Pa')] * 2),
                           (head + '{"zone": "UTC"}}\n</tool', *[("get_time", '{"zone": "UTC"}')] * 2),
                           (head.replace("get_time", "other"), None, None)):
        for names, want in ((["get_time"], one), (["get_weather", "get_time"], two)):
            got = [(c["function"]["name"], c["function"]["arguments"]) for c in cut_call(text, names)]
            assert got == ([want] if want else []), (text, names)


def test_automatic_call_then_the_tool_result(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=80, temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"  # this model calls the tool for this question
    check_call(msg.tool_calls[0], WEATHER)
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump() for tc in msg.tool_calls]},
                    {"role": "tool", "tool_call_id": msg.tool_calls[0].id,
                     "content": json.dumps({"temperature": 18, "unit": "celsius", "sky": "clear"})}]
    answer = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=40,
                                            temperature=0)
    # what the model makes of the result is the model's business; the prompt it saw is ours: the call
    # with its arguments as an object, then the tool's result, as the template writes them
    prompt = render(TOKENIZER, follow, tools=[WEATHER])
    assert '"arguments": {"city": "Paris", "unit": "celsius"}' in prompt
    assert '<tool_response>\n{"temperature": 18, "unit": "celsius", "sky": "clear"}\n</tool_response>' in prompt
    assert answer.usage.prompt_tokens == len(encode_chat(TOKENIZER, follow, tools=[WEATHER]))
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=10, temperature=0)
    assert none.choices[0].message.tool_calls is None


def test_tools_and_tool_choice_are_checked_whatever_the_choice():
    from wasmchord.serve.protocol import ApiError
    from wasmchord.serve.tools import check_tools
    check_tools([WEATHER, TIME], "auto")
    check_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}})
    for tools, choice, message in (([{"type": "function"}], "auto", "each tool must be"),
                                   ([WEATHER], "sometimes", "tool_choice = 'sometimes': expected"),
                                   ([WEATHER], {"type": "function", "function": {"name": "get_time"}},
                                    "names 'get_time', which is not among the tools .get_weather.")):
        with pytest.raises(ApiError, match=message):
            check_tools(tools, choice)


@pytest.mark.parametrize("reply", ['\n{"name": "get_weather", "arguments": {"city": "Paris"}}',
                                   ' \n {"name": "get_weather", "arguments": {}}',
                                   'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
                                   '\n\nThe weather is fine.', '{"not": "a call"}'])
def test_a_streamed_reply_splits_into_content_and_calls_as_the_whole_reply_does(reply):
    # Streamed text comes a token at a time: a blank token of its own first must not make a bare
    # JSON call content (models often begin with a newline).
    from wasmchord.serve.tools import CallStream, parse_calls
    names = ["get_weather", "get_time"]
    whole_content, whole_calls = parse_calls(reply, names)
    for cuts in ([1], [1, 2, 5], list(range(1, len(reply)))):
        stream, sent = CallStream(names), []
        for a, b in zip([0] + cuts, cuts + [len(reply)]):
            sent.append(stream.add(reply[a:b]))
        tail, calls = stream.finish()
        content = "".join(sent) + tail
        assert [c["function"] for c in calls] == [c["function"] for c in whole_calls], cuts
        assert (content.strip() or None) == (whole_content.strip() if whole_content else None), cuts


ADDRESS = {"type": "function", "function": {  # as openai.pydantic_function_tool writes a nested model
    "name": "ship", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Address"}, "express": {"type": "boolean"}},
        "required": ["to", "express"], "additionalProperties": False,
        "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                              "required": ["city", "zip"], "additionalProperties": False}}}}}


def test_the_call_grammar_keeps_each_tools_definitions():
    # $ref points at the root's $defs: each tool's call is a rule of its own with its definitions at
    # its root, and two tools may define one name differently.
    from wasmchord.constrain import Constraint
    from wasmchord.serve.tools import call_grammar
    other = {"type": "function", "function": {"name": "count", "parameters": {
        "type": "object", "properties": {"n": {"$ref": "#/$defs/Address"}, "m": {"$ref": "#/properties/n"}},
        "required": ["n", "m"], "$defs": {"Address": {"type": "integer"}}, "default": {"$ref": "#/data"}}}}
    c = Constraint(TOKENIZER, grammar=call_grammar([ADDRESS, other], "required"))

    def accepts(text):
        m = c.matcher()
        for t in TOKENIZER.encode(text, add_bos=False):
            if not m.mask()[t]:
                return False
            m.consume(t)
        return m.m.is_accepting()
    ok = '<tool_call>\n{"name": "ship", "arguments": {"to": {"city": "Paris", "zip": "75001"}, "express": true}}\n</tool_call>'
    assert accepts(ok)
    assert accepts('<tool_call>\n{"name": "count", "arguments": {"n": 3, "m": 4}}\n</tool_call>')
    assert not accepts('<tool_call>\n{"name": "count", "arguments": {"n": "3", "m": 4}}\n</tool_call>')
    assert not accepts('<tool_call>\n{"name": "count", "arguments": {"n": 3, "m": "4"}}\n</tool_call>')
    assert not accepts(ok.replace("75001", "7500"))


def test_nested_parameters_and_bad_ones_through_the_server(client):
    r = client.chat.completions.create(model=MODEL, tools=[ADDRESS], tool_choice="required", max_tokens=60,
                                       temperature=0, messages=[{"role": "user", "content": "Ship it to Paris."}])
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "ship" and r.choices[0].finish_reason == "tool_calls"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, ADDRESS["function"]["parameters"])
    bad = {"type": "function", "function": {"name": "broken", "parameters": {"type": "frobnicate"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, tools=[WEATHER, bad], tool_choice="required", max_tokens=4,
                                       messages=ASK)
    err = e.value.body
    assert err["param"] == "tools" and err["message"].startswith("tools[1] ('broken')") and "frobnicate" in \
        err["message"] and "%json" not in err["message"], err
    with pytest.raises(openai.BadRequestError, match="parameters must be a JSON schema object"):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, tools=[
            {"type": "function", "function": {"name": "f", "parameters": "oops"}}])


def test_tokenize_counts_what_the_chat_endpoint_evaluates(client):
    import httpx
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=1, temperature=0)
    url = str(client.base_url).removesuffix("/v1/")
    t = httpx.post(url + "/tokenize", json={"messages": history, "tools": [WEATHER]}, timeout=60).json()
    assert t["count"] == r.usage.prompt_tokens
    plain = httpx.post(url + "/tokenize", json={"messages": history}, timeout=60).json()
    assert plain["count"] < t["count"]  # the tools are part of the prompt


def test_a_schema_error_names_the_tool_the_choice_compiles():
    from wasmchord.serve.tools import explain_call_grammar
    broken = [{"type": "function", "function": {"name": name, "parameters": {"type": kind}}}
              for name, kind in (("first", "frobnicate"), ("second", "wobble"))]
    named = {"type": "function", "function": {"name": "second"}}
    assert explain_call_grammar(TOKENIZER, broken, named, ValueError("x")).startswith("tools[1] ('second')")
    assert explain_call_grammar(TOKENIZER, broken, "required", ValueError("x")).startswith("tools[0] ('first')")

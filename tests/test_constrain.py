"""Constrained decoding (llguidance): output follows a JSON schema, a regex or a grammar on both
backends and in batches; every finished output validates (jsonschema is the judge); bad constraints
are clear errors."""

import json
import re

import jsonschema
import pytest

from wasmchord import Model
from wasmchord.constrain import Constraint
from wasmchord.errors import GenerationError

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"], "additionalProperties": False},
        "label": {"type": ["string", "null"], "maxLength": 8}}, "required": ["point", "label"],
     "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer"}}, "required": ["id"], "additionalProperties": False}, "maxItems": 2}},
     "required": ["items"], "additionalProperties": False},
]
PROMPT = [{"role": "user", "content": "Answer with a JSON value."}]


@pytest.fixture(scope="module")
def cpu():
    return Model.load("smollm2-135m-instruct", device="cpu", context_length=256, slots=4)


def valid(text: str, schema: dict):
    jsonschema.validate(json.loads(text), schema)


def test_sampled_outputs_follow_the_schema(cpu):
    """Every schema of the corpus, two seeds at temperature 1: each finished output parses and validates;
    an unbounded value (an integer with no maximum) may run to max_tokens, most must finish."""
    finished = 0
    for schema in SCHEMAS:
        for seed in (1, 2):
            c = cpu.chat(PROMPT, json_schema=schema, max_tokens=120, temperature=1.0, seed=seed)
            if c.finish_reason == "stop":
                valid(c.text, schema)
                finished += 1
            else:
                assert c.finish_reason == "length" and c.completion_tokens == 120
    assert finished >= len(SCHEMAS)


def test_batched_outputs_follow_their_schemas(cpu):
    """Four sequences, each with its own matcher, in one batch (and a fifth waiting for a slot)."""
    batch = cpu.generate([f"Example {k}:" for k in range(5)], json_schema=SCHEMAS[0], max_tokens=100,
                         temperature=1.0, seed=9)
    for c in batch:
        assert c.finish_reason == "stop", c.text
        valid(c.text, SCHEMAS[0])


def test_batched_masks_are_computed_while_the_step_runs_and_once(cpu, monkeypatch):
    """The engine starts the step (flush), asks every constrained row for its mask, then reads the
    logits: on the GPU the masks are computed while the device works. Each mask is filled once per
    step (sampling reuses it) and again after the next token."""
    import llguidance.numpy
    from wasmchord.constrain import Matcher
    events, fill = [], llguidance.numpy.fill_next_token_bitmask
    be = cpu.transformer.be
    monkeypatch.setattr(llguidance.numpy, "fill_next_token_bitmask",
                        lambda *a: (events.append("fill"), fill(*a))[1])
    monkeypatch.setattr(type(be), "flush", lambda self: events.append("flush"), raising=False)
    read = type(be).read
    monkeypatch.setattr(type(be), "read", lambda self, x: (events.append("read"), read(self, x))[1])
    consumed = []
    consume = Matcher.consume
    monkeypatch.setattr(Matcher, "consume", lambda self, t: (consumed.append(t), consume(self, t))[1])
    batch = cpu.generate(["Example 1:", "Example 2:"], json_schema=SCHEMAS[1], max_tokens=30, temperature=0)
    steps = [i for i, e in enumerate(events) if e == "flush"]
    assert len(steps) >= 5
    for i in steps:  # each batched step: flush, a fill per running constrained row, then the read
        rest = events[i + 1:]
        fills = rest[:rest.index("read")]
        assert fills and set(fills) == {"fill"} and len(fills) <= 2
    assert events.count("fill") == len(consumed)  # one fill per sampled token, none again to sample
    assert all(c.text for c in batch)


def test_regex_and_grammar(cpu):
    r = cpu.generate("Call me at ", regex=r"\(\d{3}\) \d{3}-\d{4}", max_tokens=20, temperature=1.0, seed=4)
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.text) and r.finish_reason == "stop"
    g = cpu.generate("Is water wet? Answer:", grammar='start: " yes" | " no"', max_tokens=5, temperature=1.0)
    assert g.text in (" yes", " no")
    n = cpu.generate(["Pick:", "Choose:"], grammar='start: "A" | "B" | "C"', max_tokens=5, temperature=1.0, seed=2)
    assert all(c.text in ("A", "B", "C") for c in n)


def test_a_constraint_that_cannot_finish_ends_with_length(cpu):
    c = cpu.generate("Code:", regex="[a-z]{50}", max_tokens=4, temperature=0)
    assert c.finish_reason == "length" and re.fullmatch("[a-z]*", c.text)


def test_bad_constraints_are_named(cpu):
    with pytest.raises(GenerationError, match="dependentSchemas"):
        cpu.generate("x", json_schema={"type": "object", "dependentSchemas": {"a": {}}})
    with pytest.raises(GenerationError, match="Invalid type: strin"):
        cpu.generate("x", json_schema={"type": "strin"})
    with pytest.raises(GenerationError, match="json_schema"):
        cpu.generate("x", json_schema="{not json")
    with pytest.raises(GenerationError, match="regex is invalid"):
        cpu.generate("x", regex="[a-")
    with pytest.raises(GenerationError, match='unknown name: "foo"'):
        cpu.generate("x", grammar="start: foo")
    with pytest.raises(GenerationError, match="give one of json_schema, regex, grammar"):
        Constraint(cpu.tokenizer, regex="a", grammar='start: "a"')
    with pytest.raises(GenerationError, match=r"an object or true \(false admits no value\)"):
        cpu.generate("x", json_schema=False)
    with pytest.raises(GenerationError, match="an object or true, got list"):
        cpu.generate("x", json_schema="[1]")


def test_the_boolean_schema_true_takes_any_json_value(cpu):
    texts = [cpu.chat(PROMPT, json_schema=spec, max_tokens=60, temperature=1.0, seed=seed)
             for spec in (True, "true", {"type": "object", "properties": {"a": True}}) for seed in (1, 2)]
    assert any(c.finish_reason == "stop" for c in texts)
    for c in texts:
        if c.finish_reason == "stop":
            json.loads(c.text)


def test_the_mask_allows_end_of_text_only_where_the_grammar_accepts(cpu):
    m = Constraint(cpu.tokenizer, regex="ab").matcher()
    eot = sorted(cpu.tokenizer.eot_ids)
    assert not m.mask()[eot].any()
    for t in cpu.tokenizer.encode("ab", add_bos=False):
        m.consume(t)
    assert m.mask()[eot].any() or m.done


@pytest.mark.gpu
def test_gpu_sampler_applies_the_mask(gpu_backend):
    g = Model.load("smollm2-135m-instruct", device="gpu", context_length=128, slots=2)
    c = g.chat(PROMPT, json_schema=SCHEMAS[1], max_tokens=40, temperature=1.0, seed=5)
    assert c.finish_reason == "stop"
    valid(c.text, SCHEMAS[1])
    greedy = g.generate("Colour:", grammar='start: " red" | " green" | " blue"', max_tokens=4, temperature=0)
    assert greedy.text in (" red", " green", " blue")
    batch = g.generate(["A:", "B:"], json_schema=SCHEMAS[2], max_tokens=30, temperature=1.0, seed=1)
    for b in batch:
        assert b.finish_reason == "stop"
        valid(b.text, SCHEMAS[2])


def test_constraints_hold_with_logprobs_and_logit_bias(cpu):
    # Those two take the engine's path for one prompt; the constraint must go along with them.
    pattern = r" [XYZ]{5}"
    for kw in (dict(logprobs=1), dict(logit_bias={cpu.tokenizer.encode(" X")[-1]: 5}), dict()):
        c = cpu.generate("A date:", regex=pattern, max_tokens=10, temperature=0, **kw)
        assert re.fullmatch(pattern, c.text), (kw, c.text)
        chunks = list(cpu.stream("A date:", regex=pattern, max_tokens=10, temperature=0, **kw))
        assert re.fullmatch(pattern, "".join(ch.text for ch in chunks)), kw

"""Encode-ahead decoding on the GPU equals the step-by-step path token for token, with stop strings,
stop tokens, max_tokens, sampling, and a context that fills; the session's cache stays consistent."""

import pytest

from wasmchord import Model
from wasmchord.errors import GenerationError
from wasmchord.generate import Session, generate_tokens
from wasmchord.sampling import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def g(gpu_backend):
    return Model.load("smollm2-135m-instruct", device="gpu", context_length=48)


def run(m, ids, params, n, ahead, stop_ids=frozenset()):
    s = Session(m._tf)
    toks = list(generate_tokens(s, ids, params, max_tokens=n, stop_ids=stop_ids, encode_ahead=ahead))
    return toks, list(s.tokens)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.9, seed=4)])
def test_same_tokens_and_cache_state_as_step_by_step(g, params):
    ids = g.tokenizer.encode("Once upon a time")
    a, sa = run(g, ids, params, 7, ahead=True)
    b, sb = run(g, ids, params, 7, ahead=False)
    assert a == b and sa == sb and len(a) == 7


def test_stop_token_discards_the_step_computed_past_it(g):
    ids = g.tokenizer.encode("Once upon a time")
    full, _ = run(g, ids, SamplingParams(temperature=0), 6, ahead=False)
    stop = frozenset([full[3]])
    a, sa = run(g, ids, SamplingParams(temperature=0), 6, ahead=True, stop_ids=stop)
    b, sb = run(g, ids, SamplingParams(temperature=0), 6, ahead=False, stop_ids=stop)
    assert a == b == full[:full.index(full[3])] and sa == sb


def test_stop_strings_and_chat_through_the_public_api(g):
    full = g.generate("Once upon a time", max_tokens=10, temperature=0).text
    stop = full[5:8]
    c = g.generate("Once upon a time", max_tokens=10, temperature=0, stop=[stop])
    assert c.text == full[:full.index(stop)] and c.finish_reason == "stop"
    # the next call reuses the cache: still consistent with a fresh evaluation
    again = g.generate("Once upon a time", max_tokens=10, temperature=0)
    assert again.text == full


def test_context_fills(g):
    ids = g.tokenizer.encode("a")[:1] * 44
    with pytest.raises(GenerationError, match="context full"):
        run(g, ids, SamplingParams(temperature=0), 10, ahead=True)

"""Encode-ahead decoding on the GPU equals the step-by-step path token for token, with stop strings,
stop tokens, max_tokens, sampling, and a context that fills; the sequence's cache stays consistent."""

import numpy as np
import pytest

from wasmchord import Model
from wasmchord.generate import Sequence, generate_tokens
from wasmchord.sampling import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def g(gpu_backend):
    return Model.load("smollm2-135m-instruct", device="gpu", context_length=48)


def run(m, ids, params, n, ahead, stop_ids=frozenset()):
    s = Sequence(m.transformer)
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
    """A context that fills ends generation (no error) with every position used, the same ahead or not."""
    ids = g.tokenizer.encode("a")[:1] * 44
    a, sa = run(g, ids, SamplingParams(temperature=0), 10, ahead=True)
    b, sb = run(g, ids, SamplingParams(temperature=0), 10, ahead=False)
    assert a == b and sa == sb
    assert len(a) == 48 - 44 + 1  # the last token is sampled from position 47's logits, never stored
    c = g.generate(ids, max_tokens=10, temperature=0)
    assert c.finish_reason == "length" and c.tokens == a


def test_replayed_steps_equal_the_graph(gpu_backend):
    """Decode steps replayed from the recorded program (position words and the attention grid
    patched) give bit-identical logits to running the graph, across the 64-position boundary where the
    attention grid grows; generation through the public path equals the step-by-step one."""
    m = Model.load("smollm2-135m-instruct", device="gpu", context_length=96)
    be, tf = m.backend, m.transformer
    ids = m.tokenizer.encode("The rain in Spain stays mainly in the plain. " * 9)[:60]
    assert len(ids) == 60  # decode positions 60..67 cross 64

    def steps(replay):
        be.replay_steps = replay
        be.argmax(tf.forward(ids, 0))  # the first token, left on the device for the next step
        out, before = [], be.stream.replayed
        for pos in range(len(ids), len(ids) + 8):
            logits = tf.decode(pos)
            out.append(be.read(logits).copy())
            be.argmax(logits)
        return out, be.stream.replayed - before

    replayed, n = steps(True)
    graph, n0 = steps(False)
    assert n >= 6 and n0 == 0
    for a, b in zip(replayed, graph):
        assert np.array_equal(a, b)
    be.replay_steps = True
    a, sa = run(m, ids, SamplingParams(temperature=0.8, seed=11), 5, ahead=True)  # across 64 too
    b, sb = run(m, ids, SamplingParams(temperature=0.8, seed=11), 5, ahead=False)
    assert a == b and sa == sb


def test_replay_program_is_dropped_when_buffers_change(g):
    run(g, g.tokenizer.encode("Once upon a time"), SamplingParams(temperature=0), 4, ahead=True)
    be, cache = g.backend, g.transformer.cache
    c = be.stream.capture
    assert c is not None and c.gen == be.gpu.gen and c.key is cache
    assert be.stream.replay(object(), 11) is None  # another model's cache
    be.gpu.invalidate()  # e.g. an arena buffer grew: captured bind groups point at the old one
    assert be.stream.replay(cache, 11) is None and not be.stream.ops

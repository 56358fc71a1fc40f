"""Generation API on the CPU backend with SmolLM2: stream/generate/chat, stops, multi-turn chats, bad input."""

import pytest

from wasmchord import Model
from wasmchord.errors import BackendError, GenerationError
from wasmchord.sampling import recent_tokens


@pytest.fixture(scope="module")
def m():
    return Model.load("smollm2-135m-instruct", device="cpu", context_length=256)


def test_generate_greedy_knows_paris(m):
    c = m.generate("The capital of France is", max_tokens=4, temperature=0)
    assert c.text.startswith(" Paris") and c.finish_reason == "length" and c.completion_tokens == 4
    assert c.prompt_tokens == 5 and c.tok_per_s > 0


def test_prompt_as_token_ids(m):
    ids = m.tokenizer.encode("The capital of France is")
    assert m.generate(ids, max_tokens=3, temperature=0).tokens == \
        m.generate("The capital of France is", max_tokens=3, temperature=0).tokens


def test_stream_concatenation_equals_generate(m):
    chunks = list(m.stream("Once upon a time", max_tokens=20, temperature=0))
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].stats.completion_tokens == 20 and all(c.stats is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == m.generate("Once upon a time", max_tokens=20, temperature=0).text


def test_stop_string_is_never_partially_emitted(m):
    full = m.generate("Once upon a time", max_tokens=30, temperature=0).text
    stop = full[10:14]
    assert stop and stop not in full[:10]
    chunks = list(m.stream("Once upon a time", max_tokens=30, temperature=0, stop=[stop, "zzzz"]))
    text = "".join(c.text for c in chunks)
    assert text == full[:full.index(stop)] and chunks[-1].finish_reason == "stop"
    seen = ""
    for c in chunks:  # no prefix of the stop string ever leaked into emitted text beyond the final cut
        seen += c.text
        assert stop not in seen


def test_seeded_sampling_is_reproducible(m):
    a = m.generate("Tell me a story", max_tokens=16, temperature=1.0, seed=42).tokens
    b = m.generate("Tell me a story", max_tokens=16, temperature=1.0, seed=42).tokens
    c = m.generate("Tell me a story", max_tokens=16, temperature=1.0, seed=43).tokens
    assert a == b and a != c


def test_chat_stops_at_end_of_turn(m):
    c = m.chat([{"role": "user", "content": "What is 2+2? Answer with one number."}], max_tokens=40, temperature=0)
    assert c.finish_reason == "stop" and "4" in c.text and "<|im_end|>" not in c.text


def test_chat_reuses_the_cache(m):
    s = m.start_chat()
    first = s.send("Hi! My name is Ada.", max_tokens=20, temperature=0)
    second = s.send("What is my name?", max_tokens=20, temperature=0)
    assert second.cached_tokens > first.prompt_tokens  # the earlier turns were not re-evaluated
    fresh = m.chat(s.messages[:-1], max_tokens=20, temperature=0)
    assert fresh.text == second.text
    s.reset()
    assert s.messages == []


def test_a_failed_turn_leaves_the_chat_as_it_was(m, monkeypatch):
    s = m.start_chat(system="Be brief.")
    monkeypatch.setattr(m.tokenizer, "chat_template", "{{ raise_exception('no') }}")
    with pytest.raises(GenerationError, match="no"):
        s.send("hi")
    assert s.messages == [{"role": "system", "content": "Be brief."}]


def test_interleaved_chats_do_not_share_stale_cache(m):
    s = m.start_chat()
    s.send("Hi! My name is Ada.", max_tokens=10, temperature=0)
    m.generate("Completely unrelated text about boats", max_tokens=5, temperature=0)  # overwrites the cache
    second = s.send("What is my name?", max_tokens=15, temperature=0)
    assert second.cached_tokens == 0  # the chat's sequence noticed and re-evaluated
    assert second.text == m.chat(s.messages[:-1], max_tokens=15, temperature=0).text


@pytest.mark.parametrize("kw,match", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(stop=[1]), "stop"), (dict(stop=[""]), "stop"),
])
def test_bad_arguments_are_clear_errors(m, kw, match):
    with pytest.raises(GenerationError, match=match):
        m.generate("hi", **kw)
    assert m.generate("The capital of France is", max_tokens=2, temperature=0).text.startswith(" Paris")


def test_unknown_keyword_is_named(m):
    with pytest.raises(TypeError, match="'top_q'.*top_p"):
        m.generate("hi", top_q=0.5)


def test_empty_prompt(m):
    with pytest.raises(GenerationError, match="empty"):
        m.generate("")


def test_prompt_longer_than_context(m):
    with pytest.raises(GenerationError, match="context"):
        m.generate("word " * 400, max_tokens=2)
    assert m.generate("The capital of France is", max_tokens=2, temperature=0).text.startswith(" Paris")


def test_context_fills_during_generation(m):
    """Generation stops when the context fills, keeping its text, with finish_reason "length"."""
    ids = m.tokenizer.encode("a")[:1] * 250
    c = m.generate(ids, max_tokens=50, temperature=0)
    assert c.finish_reason == "length" and len(c.tokens) == 256 - 250 + 1
    assert c.text == m.tokenizer.decode(c.tokens)


BAD_CALL = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}


@pytest.mark.parametrize("msgs", [[], [{"role": "user"}], [{"content": "x"}], ["hello"], "hello", [BAD_CALL],
                                  [{"role": "assistant", "content": None, "tool_calls": ["f()"]}]])
def test_malformed_chat_messages(m, msgs):
    with pytest.raises(GenerationError):
        m.chat(msgs)


def test_chat_template_that_raises(m, monkeypatch):
    monkeypatch.setattr(m.tokenizer, "chat_template", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(GenerationError, match="roles must alternate"):
        m.chat([{"role": "user", "content": "x"}])
    monkeypatch.setattr(m.tokenizer, "chat_template", "{{ messages[0].nope() }}")
    with pytest.raises(GenerationError, match="chat template"):
        m.chat([{"role": "user", "content": "x"}])


def test_out_of_range_prompt_ids(m):
    with pytest.raises(ValueError, match="99999"):
        m.generate([1, 99999])


def test_unknown_device():
    with pytest.raises(BackendError, match="tpu"):
        Model.load("smollm2-135m-instruct", device="tpu")


def test_f32_weights_mode_gives_the_same_logits(m):
    """weights="f32" (float32 BLAS) against the default blocks: float32 sums in another order (within
    5e-5 of the logit scale), or int16 activations for several tokens (within 5e-4: two int8 planes)."""
    f = Model.load("smollm2-135m-instruct", device="cpu", weights="f32", context_length=64)
    ids = m.tokenizer.encode("The capital of France is")
    import numpy as np
    ref, got = f.logits(ids), m.logits(ids)
    tol = {"f32": 5e-5, "int16": 5e-4}[m.backend.activations]
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()


def test_logprobs_are_the_models_log_softmax(m):
    """generate/stream/chat with logprobs=k: each token's log-probability and the k most likely, equal
    to the log-softmax of the logits of the whole text evaluated at once; the tokens those of a run
    without logprobs (same seed)."""
    import numpy as np
    c = m.generate("Once upon a time", max_tokens=6, temperature=1.0, seed=4, logprobs=3)
    assert c.tokens == m.generate("Once upon a time", max_tokens=6, temperature=1.0, seed=4).tokens
    ids = m.prompt_ids("Once upon a time")
    lg = m.logits(ids + c.tokens[:-1])[len(ids) - 1:].astype(np.float64)            # [6, vocab]
    ref = lg - lg.max(1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(1, keepdims=True))
    assert len(c.logprobs) == 6
    for row, tok, (lp, top) in zip(ref, c.tokens, c.logprobs):
        assert abs(lp - row[tok]) < 1e-4 * np.abs(row).max()
        assert [t for t, _ in top] == list(np.argsort(-row, kind="stable")[:3])
        assert np.allclose([p for _, p in top], row[[t for t, _ in top]], atol=1e-4 * np.abs(row).max())
    chunks = list(m.stream("Once upon a time", max_tokens=6, temperature=1.0, seed=4, logprobs=3))
    assert [ch.logprob for ch in chunks if ch.token is not None] == [lp for lp, _ in c.logprobs]
    assert m.generate("Once upon a time", max_tokens=2).logprobs is None
    with pytest.raises(GenerationError, match="logprobs = 21"):
        m.generate("Hi", logprobs=21)


def test_what_llama_cpp_python_users_write(m):
    """max_tokens=None runs to the end of the context; OpenAI-style content parts are text; a misnamed
    option or a prompt of floats is a TypeError that says what was meant."""
    ids = m.prompt_ids("Once upon a time")
    c = m.generate(ids, max_tokens=None, temperature=0, seed=1)
    assert c.finish_reason == "length" and c.completion_tokens == 256 - len(ids) + 1  # the last needs no slot
    assert c.tokens == m.generate(ids, max_tokens=10**6, temperature=0, seed=1).tokens
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}]
    assert m.chat(parts, max_tokens=5, temperature=0).text == \
        m.chat([{"role": "user", "content": "What is 2+2?"}], max_tokens=5, temperature=0).text
    with pytest.raises(GenerationError, match="content parts must be"):
        m.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    with pytest.raises(TypeError, match="'n_ctx' .did you mean context_length"):
        Model.load("smollm2-135m-instruct", device="cpu", n_ctx=128)
    with pytest.raises(TypeError, match="token ids must be integers, got float"):
        m.generate([1.0, 2.0], max_tokens=2)


def test_logit_bias_bans_and_forces_tokens(m):
    """-100 bans a token: greedy then takes the runner-up of the same logits; +100 on a token makes it
    the greedy choice at every step; bad keys and values are named."""
    import numpy as np
    prompt = "The capital of France is"
    lg = m.logits(m.prompt_ids(prompt))[-1]
    best, second = np.argsort(-lg, kind="stable")[:2]
    assert m.generate(prompt, max_tokens=1, temperature=0).tokens == [best]
    assert m.generate(prompt, max_tokens=1, temperature=0, logit_bias={int(best): -100}).tokens == [second]
    assert m.generate(prompt, max_tokens=1, temperature=0, logit_bias={str(best): -100}).tokens == [second]  # OpenAI's keys
    forced = m.tokenizer.encode(" banana", add_bos=False)[0]
    assert m.generate(prompt, max_tokens=3, temperature=0, logit_bias={forced: 100}).tokens == [forced] * 3
    batch = m.generate([prompt, "Hello"], max_tokens=1, temperature=0, logit_bias={int(best): -100})
    assert batch[0].tokens == [second]
    for bias, message in (({10**9: 1}, "logit_bias key 1000000000"), ({"x": 1}, "logit_bias key 'x'"),
                          ({5: 101}, r"logit_bias\[5\] = 101")):
        with pytest.raises(GenerationError, match=message):
            m.generate(prompt, max_tokens=1, logit_bias=bias)


def test_the_edges_a_user_found(m):
    """A Chat takes logprobs= and logit_bias= (its next turn is still right); a stopped engine refuses
    submissions, and a request read to its end reads as ended; a batch's bad prompt is named by its
    index; max_tokens=None equals a large max_tokens; penalty_last_n=-1 is the whole context;
    logit_bias banning every token a constraint allows says so (not "corrupt weights"); a grammar
    without a finite sentence fails with one line."""
    chat = m.start_chat()
    first = chat.send("My name is Ada.", max_tokens=6, temperature=0, logprobs=2)
    assert len(first.logprobs) == first.completion_tokens > 0
    second = chat.send("What is my name?", max_tokens=6, temperature=0)
    assert second.text == m.chat(chat.messages[:-1], max_tokens=6, temperature=0).text
    engine = m.engine()
    engine.start()
    try:
        req = engine.submit("Hi", max_tokens=2, temperature=0)[0]
        assert list(engine.stream(req, timeout=60))[-1].finish_reason == "length"
        assert list(engine.stream(req, timeout=1)) == []  # read to its end: nothing more, no wait
    finally:
        engine.stop()
    with pytest.raises(GenerationError, match="engine was stopped: start"):
        engine.submit("Hi", max_tokens=2)
    with pytest.raises(TypeError, match="prompt 1 of the batch is a int"):
        m.generate(["Hi", 5], max_tokens=2)
    with pytest.raises(GenerationError, match="prompt 1 of the batch: the prompt has 300 tokens"):
        m.generate(["Hi", [1] * 300], max_tokens=2)
    assert recent_tokens(list(range(100)), -1) == list(range(100))
    assert recent_tokens(list(range(10)), 12) == list(range(10)) and recent_tokens(list(range(10)), 3) == [7, 8, 9]
    penalized = [m.generate("Once upon a time", max_tokens=12, temperature=0, repeat_penalty=1.5, penalty_last_n=n,
                            logprobs=0 if path else None).tokens for n in (-1, 256) for path in (0, 1)]
    assert penalized[0] == penalized[1] == penalized[2] == penalized[3]
    q = m.tokenizer.encode("q", add_bos=False)[-1]
    with pytest.raises(GenerationError, match="no token is allowed at this step"):
        m.generate("Say q:", grammar='start: "q"', logit_bias={q: -100}, max_tokens=3, temperature=0)
    with pytest.raises(GenerationError) as e:
        m.generate("Hi", grammar='start: "a" start', max_tokens=4, temperature=0)
    assert "\n" not in str(e.value)

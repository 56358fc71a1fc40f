"""The batch engine against one-by-one generation on both backends: batched greedy equals one-by-one
greedy, prefix reuse evaluates only the new tokens, chunked prefill equals one-shot prefill, seeded
sampling does not depend on what shares the batch, cancellation frees the slot; bad input; threads."""

import math
import re
import threading
import time

import numpy as np
import pytest

from wasmchord import Model
from wasmchord.engine import Engine, EngineStopped, QueueFull
from wasmchord.errors import GenerationError
from wasmchord.generate import Sequence

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
           "The three laws of robotics are"]


@pytest.fixture(scope="module")
def cpu():
    return Model.load("smollm2-135m-instruct", device="cpu", context_length=160, slots=4)


def test_batched_greedy_equals_one_by_one(cpu):
    """Five prompts through four slots (one waits for a slot) in one batch give the tokens each gives
    alone; with the margins of the batch's last logits."""
    alone = [cpu.generate(p, max_tokens=16, temperature=0).tokens for p in PROMPTS]
    batch = cpu.generate(PROMPTS, max_tokens=16, temperature=0)
    assert [c.tokens for c in batch] == alone
    assert all(c.finish_reason in ("length", "stop") for c in batch)
    assert [c.text for c in batch] == [cpu.tokenizer.decode(t) for t in alone]


def test_seeded_samples_do_not_depend_on_the_batch(cpu):
    kw = dict(max_tokens=10, temperature=0.9, top_k=30, seed=42)
    alone = cpu.generate([PROMPTS[1]], **kw)[0].tokens
    together = cpu.generate(PROMPTS[:3], **kw)[1].tokens
    again = cpu.generate(PROMPTS[::-1][:4] + [PROMPTS[1]], **kw)[4].tokens
    assert alone == together == again


def test_n_samples_share_the_prefill(cpu):
    eng = Engine(cpu)
    reqs = eng.submit(PROMPTS[0], n=3, max_tokens=6, temperature=1.0, seed=3)
    before = eng.evaluated_tokens
    eng.run(reqs)
    assert eng.evaluated_tokens - before == len(reqs[0].prompt)  # evaluated once for the three
    assert [r.stats.cached_tokens for r in reqs[1:]] == [len(reqs[0].prompt)] * 2
    texts = {tuple(r.tokens) for r in reqs}
    assert len(texts) > 1  # different samples of one prompt
    greedy = cpu.generate(PROMPTS[0], n=2, max_tokens=6, temperature=0)
    assert greedy[0].tokens == greedy[1].tokens == cpu.generate(PROMPTS[0], max_tokens=6, temperature=0).tokens


def test_prefix_reuse_evaluates_only_the_new_tokens(cpu):
    eng = Engine(cpu)
    system = "You are a helpful assistant who answers briefly and precisely. "
    first = eng.submit(system + "What is the boiling point of water?", max_tokens=4, temperature=0)[0]
    eng.run([first])
    n0 = eng.evaluated_tokens
    second = eng.submit(system + "Name a prime number.", max_tokens=4, temperature=0)[0]
    eng.run([second])
    shared = len(cpu.tokenizer.encode(system)) - 1
    assert second.slot == first.slot and second.stats.cached_tokens >= shared
    assert eng.evaluated_tokens - n0 == len(second.prompt) - second.stats.cached_tokens
    assert second.tokens == cpu.generate(second.prompt, max_tokens=4, temperature=0).tokens


def test_a_prefix_held_by_a_busy_slot_is_copied_not_evaluated(cpu):
    """A request admitted while another one runs on a prompt with the same head (a shared system prompt;
    a further sample of the prompt that found no free slot when its first was prefilled) copies that
    slot's cache and evaluates only the rest; its tokens are the ones it gets alone."""
    system = "You are a helpful assistant who answers briefly and precisely, in plain words. "
    ban = {t: -100 for t in cpu.tokenizer.eot_ids}  # nothing ends early: slots free when cancelled
    eng = Engine(cpu)
    busy = [eng.submit(p, max_tokens=60, temperature=0, logit_bias=ban)[0] for p in PROMPTS[:2]]
    first = eng.submit(system + "What is the boiling point of water?", max_tokens=60, temperature=0,
                       logit_bias=ban)[0]
    other = eng.submit(PROMPTS[2], max_tokens=60, temperature=0, logit_bias=ban)[0]
    eng.step()                                      # all four slots busy
    leader, follower = eng.submit(system + "Name a prime number.", max_tokens=4, temperature=0, n=2,
                                  logit_bias=ban)
    eng.cancel(busy[0])
    eng.step()                                      # the leader takes that slot, copying `first`'s head
    shared = len(cpu.tokenizer.encode(system)) - 1
    assert leader.stats.cached_tokens >= shared and leader.slot != first.slot
    assert follower.slot is None                    # no free slot to fork the leader's prefill to
    eng.cancel(busy[1])
    eng.step()                                      # the follower copies the leader's running slot
    assert follower.stats.cached_tokens == len(follower.prompt) - 1 and not leader.done
    eng.run([leader, follower])
    alone = cpu.generate(leader.prompt, max_tokens=4, temperature=0, logit_bias=ban).tokens
    assert leader.tokens == follower.tokens == alone
    for r in (first, other):
        eng.cancel(r)
    eng.step()


def test_chunked_prefill_equals_one_shot(cpu):
    """A prompt evaluated 7 tokens per step, while another sequence decodes, gives the tokens it gives
    evaluated at once, and its last position's logits agree to the precision of the path: float32
    rounding with float32 activations (kernels sum a 7-row product in another order than a 40-row
    one); with integer activations (int16) a last chunk of one or two tokens goes through the float32
    matrix-vector kernel, so the two agree to int16's ~1e-4 of the logit scale."""
    long = "In the beginning the universe was created. This has made a lot of people very angry. " * 2
    eng = Engine(cpu, prefill_chunk=7)
    a = eng.submit(PROMPTS[0], max_tokens=20, temperature=0)[0]
    eng.step()
    b = eng.submit(long, max_tokens=5, temperature=0)[0]
    steps = 0
    while not b.done:
        eng.step()
        steps += 1
    assert steps >= len(b.prompt) // 7
    eng.run([a])
    assert b.tokens == cpu.generate(long, max_tokens=5, temperature=0).tokens
    assert a.tokens == cpu.generate(PROMPTS[0], max_tokens=20, temperature=0).tokens
    ids = cpu.prompt_ids(long)
    one = cpu.transformer.forward(np.asarray(ids), 0, slot=1)
    chunks = [cpu.transformer.forward(np.asarray(ids[i:i + 7]), i, slot=2) for i in range(0, len(ids), 7)]
    tol = {"f32": 1e-5, "int16": 2e-4}[cpu.backend.activations]
    assert np.abs(one - chunks[-1]).max() <= tol * np.abs(one).max()


def test_prompt_logprobs_score_every_prompt_token(cpu):
    """prompt_logprobs: each prompt token's log-probability under the logits of the position before it
    (log-softmax of Model.logits), whatever the chunking, with a cached prefix not reused; a second
    sample of the prompt that finds no free slot scores it itself, the same; max_tokens = 0 scores and
    generates nothing."""
    long = "In the beginning the universe was created. This has made a lot of people very angry."
    ids = cpu.prompt_ids(long)
    z = cpu.logits(ids).astype(np.float64)                                                 # [n, vocab]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    eng = Engine(cpu, prefill_chunk=7)
    warm = eng.submit(ids[:10], max_tokens=1, temperature=0)[0]  # a slot caching the prompt's head
    eng.run([warm])
    busy = [eng.submit(p, max_tokens=40, temperature=0)[0] for p in PROMPTS[:2]]  # 2 of the 4 slots
    a, b = eng.submit(ids, max_tokens=4, temperature=0, n=2, prompt_logprobs=3)
    scored = eng.submit(ids, max_tokens=0, prompt_logprobs=0)[0]
    eng.run([a, b, scored, *busy])
    assert b.stats.cached_tokens == 0 and b.prompt_logprobs is not a.prompt_logprobs  # it found no slot to fork to
    assert a.stats.cached_tokens == 0 and a.tokens == b.tokens == cpu.generate(ids, max_tokens=4, temperature=0).tokens
    assert scored.tokens == [] and scored.finish_reason == "length"
    for r, k in ((a, 3), (b, 3), (scored, 0)):
        assert [t for t, _, _ in r.prompt_logprobs] == ids and r.prompt_logprobs[0][1:] == (None, None)
        got = np.array([lp for _, lp, _ in r.prompt_logprobs[1:]])
        assert np.abs(got - logp[np.arange(len(ids) - 1), ids[1:]]).max() < 1e-3
        for i, (_, _, top) in enumerate(r.prompt_logprobs[1:]):  # the k most likely (up to rounding's ties)
            assert len(top) == k and all(abs(lp - logp[i, t]) < 1e-3 for t, lp in top)
            assert k == 0 or min(lp for _, lp in top) >= np.sort(logp[i])[-k] - 1e-3
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    with pytest.raises(GenerationError, match="prompt_logprobs = 21"):
        eng.submit(ids, prompt_logprobs=21)
    for bad in (False, 0.0):
        with pytest.raises(GenerationError, match="max_tokens = "):
            eng.submit(ids, max_tokens=bad, prompt_logprobs=0)


def test_max_tokens_0_evaluates_the_prompt_into_a_cache_even_one_that_fills_the_context(cpu):
    eng = Engine(cpu)
    full = (cpu.prompt_ids("The rain in Spain stays mainly in the plain. ") * 40)[:cpu.transformer.max_ctx]
    scored, warm = eng.submit(full, max_tokens=0, prompt_logprobs=1)[0], eng.submit(PROMPTS[3], max_tokens=0)[0]
    eng.run([scored, warm])
    assert len(scored.prompt_logprobs) == len(full) and scored.finish_reason == warm.finish_reason == "length"
    again = eng.submit(PROMPTS[3] + " 100 degrees", max_tokens=2, temperature=0)[0]
    eng.run([again])
    assert again.stats.cached_tokens == len(warm.prompt) and again.slot == warm.slot
    with pytest.raises(GenerationError, match="the prompt has 160 tokens; the context holds 160"):
        eng.submit(full, max_tokens=1)


def test_start_is_refused_while_a_generation_holds_the_model(cpu):
    """Its thread would wait for the model's lock for good (and stop(), close() with it)."""
    it = cpu.stream("Once upon a time", max_tokens=20, temperature=0)
    next(it)
    eng = Engine(cpu)
    with pytest.raises(GenerationError, match="a generation holds this model"):
        eng.start()
    it.close()
    eng.start()
    try:
        r = eng.submit("Once", max_tokens=3, temperature=0)[0]
        assert "".join(c.text for c in eng.stream(r, timeout=60)) == cpu.tokenizer.decode(r.tokens)
    finally:
        eng.stop()


def test_closing_a_stream_early_cancels_its_request(cpu):
    eng = Engine(cpu)
    eng.start()
    try:
        r = eng.submit("Once upon a time", max_tokens=100, temperature=0)[0]
        for i, _ in enumerate(eng.stream(r, timeout=60)):
            if i == 1:
                break
        deadline = time.time() + 30
        while not r.done and time.time() < deadline:
            time.sleep(0.05)
        assert r.finish_reason == "cancelled" and len(r.tokens) < 100 and eng.running == 0
    finally:
        eng.stop()


def test_numpy_scalars_are_numbers_and_n_is_checked_first(cpu):
    kw = dict(max_tokens=3, temperature=0.7, top_p=0.9, top_k=20, penalty_last_n=4, seed=3, logit_bias={42: 5.0})
    as_numpy = {k: (np.float32(v) if isinstance(v, float) else np.int64(v)) for k, v in kw.items() if k != "logit_bias"}
    want = cpu.generate("Hi", **kw).tokens
    assert cpu.generate("Hi", **as_numpy, logit_bias={42: np.float32(5)}).tokens == want
    assert len(cpu.generate("Hi", n=np.int64(2), max_tokens=2)) == 2 and cpu.generate("Hi", n=None, max_tokens=1).tokens
    for n in (2.0, "2", -1, True, 5):
        for prompt in ("Hi", ["Hi", "Ho"]):
            with pytest.raises(GenerationError, match=rf"^n = {re.escape(repr(n))}: expected an integer from 1 to the model's 4"):
                cpu.generate(prompt, n=n, max_tokens=2)
    with pytest.raises(GenerationError, match="prompt 1 of the batch: token id 1000000 is out of range"):
        cpu.generate(["Hi", [10**6]], max_tokens=2)
    with pytest.raises(TypeError, match=r"1-D, got an array of shape \(2, 2\)"):
        cpu.logits(np.array([[1, 2], [3, 4]]))


def test_cancellation_frees_the_slot(cpu):
    eng = Engine(cpu)
    reqs = eng.submit(PROMPTS[0], max_tokens=50, temperature=0) + eng.submit(PROMPTS[1], max_tokens=3,
                                                                             temperature=0)
    eng.step()
    eng.step()
    eng.cancel(reqs[0])
    eng.step()
    assert reqs[0].done and reqs[0].finish_reason == "cancelled" and reqs[0] not in eng.busy
    eng.run(reqs)
    assert reqs[1].finish_reason == "length"
    eng.cancel(reqs[1])  # a finished request: nothing happens
    eng.step()
    assert reqs[1].finish_reason == "length"


def test_bad_input_is_named(cpu):
    eng = Engine(cpu, max_queue=2)
    with pytest.raises(GenerationError, match="prompt 1 of the batch is empty"):
        cpu.generate(["hello", ""], max_tokens=2)
    with pytest.raises(GenerationError, match=r"the prompt has 300 tokens; the context holds 160"):
        eng.submit([1] * 300, max_tokens=2)
    with pytest.raises(GenerationError, match="temperature"):
        eng.submit("hi", temperature=-1)
    with pytest.raises(GenerationError, match="max_queue = -1"):
        Engine(cpu, max_queue=-1)


def test_the_queue_holds_what_the_free_slots_do_not_take(cpu):
    """max_queue counts the requests that would wait for a slot: four free slots take four at once (a
    request's n samples included), then max_queue more wait, then QueueFull."""
    eng = Engine(cpu, max_queue=2)  # not started: nothing is admitted, every slot stays free
    for p in "abcdef":
        eng.submit(p, max_tokens=1)
    with pytest.raises(QueueFull, match="queue is full"):
        eng.submit("g", max_tokens=1)
    none = Engine(cpu, max_queue=0)
    none.submit("a", max_tokens=1, n=4)
    with pytest.raises(QueueFull, match="queue is full"):
        none.submit("b", max_tokens=1)


def test_retry_after_follows_how_long_requests_hold_a_slot(cpu):
    """A full queue's Retry-After: 1 s before any request finished; then the time recent requests held
    their slot (a moving average) times the requests waiting per slot ahead of the caller, 1 to 60."""
    eng = Engine(cpu, max_queue=8)
    assert eng.retry_after() == 1
    reqs = [r for p in PROMPTS[:2] for r in eng.submit(p, max_tokens=6, temperature=0)]
    eng.run(reqs)
    held = [r.finished_at - r.admitted_at for r in sorted(reqs, key=lambda r: r.finished_at)]
    assert all(h > 0 for h in held) and eng._held == pytest.approx(0.8 * held[0] + 0.2 * held[1])
    eng._held = 3.2  # as if requests held their slot 3.2 s
    for p in "abcdefg":  # 4 take the slots at the next step; all 7 wait now
        eng.submit(p, max_tokens=1)
    assert eng.queued == 7 and eng.retry_after() == math.ceil(3.2 * 8 / 4)
    eng._held = 100.0
    assert eng.retry_after() == 60


def test_a_cancelled_request_leaves_its_place_at_once(cpu):
    """A client that disconnects and retries at once finds the place its cancelled request held, in
    the queue or in a slot, though that request leaves only at the next step."""
    eng = Engine(cpu, max_queue=0)
    held = eng.submit("a", max_tokens=50, n=4)
    eng.step()                                      # admitted: all four slots busy
    assert all(r.slot is not None for r in held)
    with pytest.raises(QueueFull):
        eng.submit("b", max_tokens=1)
    eng.cancel(held[2])
    (b,) = eng.submit("b", max_tokens=1)            # takes held[2]'s slot at the next step
    with pytest.raises(QueueFull):
        eng.submit("c", max_tokens=1)
    eng.cancel(b)                                   # cancelled while still queued
    eng.submit("c", max_tokens=1)
    eng.step()
    assert held[2].finish_reason == "cancelled" and b.finish_reason == "cancelled"
    for r in held:
        eng.cancel(r)
    eng.step()


def test_a_request_that_fails_does_not_stop_the_others(cpu, monkeypatch):
    """Non-finite logits in one row: that request fails with a GenerationError naming the cause, the
    rest of the batch completes."""
    eng = Engine(cpu)
    bad, good = eng.submit("Poison", max_tokens=3, temperature=0) + eng.submit(PROMPTS[0], max_tokens=3,
                                                                               temperature=0)
    real = cpu.transformer.forward_batch

    def poisoned(ids, positions, slots):
        out = np.array(real(ids, positions, slots))
        out[[s == bad.slot for s in slots]] = np.nan
        return out
    monkeypatch.setattr(cpu.transformer, "forward_batch", poisoned)
    eng.run([bad, good])
    err = bad.take(block=False)
    while not isinstance(err, BaseException):
        err = bad.take(block=False)
    assert isinstance(err, GenerationError) and "non-finite logits" in str(err)
    assert good.finish_reason == "length" and len(good.tokens) == 3


def test_engine_thread_serves_concurrent_clients(cpu):
    """Four client threads submit to the engine's own thread and stream at once; each gets what it
    gets alone."""
    want = {p: cpu.generate(p, max_tokens=8, temperature=0).text for p in PROMPTS[:4]}
    eng = cpu.engine()
    eng.start()
    got = {}
    try:
        def client(p):
            req = eng.submit(p, max_tokens=8, temperature=0)[0]
            got[p] = "".join(ch.text for ch in eng.stream(req, timeout=120))
        threads = [threading.Thread(target=client, args=(p,)) for p in want]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        eng.stop()
    assert got == want


def test_two_threads_on_one_model_do_not_mix(cpu):
    """Direct generate calls from several threads are served one at a time, each correct."""
    want = {p: cpu.generate(p, max_tokens=8, temperature=0).tokens for p in PROMPTS[:3]}
    got = {}

    def run(p):
        got[p] = cpu.generate(p, max_tokens=8, temperature=0).tokens
    threads = [threading.Thread(target=run, args=(p,)) for p in want for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == want


def test_interleaved_streams_in_one_thread_are_refused_not_mixed(cpu):
    chat_a, chat_b = cpu.start_chat(), cpu.start_chat()
    a = chat_a.send_stream("Hello, who are you?", max_tokens=6, temperature=0, seed=1)
    next(a)
    cpu.start_chat().send("Say something.", max_tokens=3, temperature=0)  # takes the cache slot
    with pytest.raises(GenerationError, match="used by another generation meanwhile"):
        list(a)
    assert chat_b.send("Hi!", max_tokens=3, temperature=0).completion_tokens >= 1


def test_interleaved_generations_on_the_model_itself_are_refused_not_mixed(cpu):
    """Two generations on the model's own sequence (stream then generate, stream then stream, stream
    then logits): the first raises rather than continue from the other's cache."""
    want = cpu.generate("Once upon a time", max_tokens=8, temperature=0).text
    for other in (lambda: cpu.generate("The capital of France is", max_tokens=3, temperature=0),
                  lambda: next(cpu.stream("The capital of France is", max_tokens=3, temperature=0)),
                  lambda: cpu.logits("The capital of France is")):
        it = cpu.stream("Once upon a time", max_tokens=8, temperature=0)
        first = next(it).text
        other()
        with pytest.raises(GenerationError, match="used by another generation meanwhile"):
            list(it)
        assert want.startswith(first)
    assert cpu.generate("Once upon a time", max_tokens=8, temperature=0).text == want  # and it runs again


def test_a_running_engine_owns_the_slots(cpu):
    """While an engine runs on its thread, direct generations are refused (they would write its slots);
    an engine stepped by hand finds a slot written behind its back and fails that request."""
    eng = cpu.engine()
    eng.start()
    try:
        req = eng.submit("Once upon a time", max_tokens=40, temperature=0)[0]
        for call in (lambda: cpu.generate("Hi", max_tokens=2), lambda: cpu.logits("Hi"),
                     lambda: cpu.generate(["Hi", "Yo"], max_tokens=2)):
            with pytest.raises(GenerationError, match="belong to a running engine"):
                call()
        with pytest.raises(GenerationError, match="already runs"):
            cpu.engine().start()
        assert list(eng.stream(req))[-1].finish_reason == "length"
    finally:
        eng.stop()
    assert cpu.generate("Hi", max_tokens=2, temperature=0).completion_tokens >= 1  # the model's again
    manual = cpu.engine()
    req = manual.submit("Once upon a time", max_tokens=40, temperature=0)[0]
    manual.step()
    manual.step()
    assert req.slot == 0 and req.tokens  # running, in the slot the model's own sequence uses
    cpu.generate("The capital of France is", max_tokens=3, temperature=0)
    manual.run([req])
    items = []
    while (item := req.take(block=False)) is not None:
        items.append(item)
    assert isinstance(items[-1], GenerationError) and "used by a generation outside the engine" in str(items[-1])


def test_context_full_ends_with_length_and_keeps_the_text():
    m = Model.load("smollm2-135m-instruct", device="cpu", context_length=24)
    ids = m.prompt_ids("Tell me a long story about dragons and")
    c = m.generate(ids, max_tokens=100, temperature=0)
    assert c.finish_reason == "length" and c.completion_tokens == 24 - len(ids) + 1 and c.text  # the last needs no slot
    batch = m.generate([ids, ids[:5]], max_tokens=100, temperature=0)
    assert [b.finish_reason for b in batch] == ["length", "length"]
    assert batch[0].tokens == c.tokens


@pytest.mark.gpu
def test_gpu_batch_equals_one_by_one_and_the_cpu(gpu_backend):
    g = Model.load("smollm2-135m-instruct", device="gpu", context_length=64, slots=3)
    prompts = PROMPTS[:3]
    alone = [g.generate(p, max_tokens=5, temperature=0).tokens for p in prompts]
    replayed = g.backend.stream.replayed
    batch = g.generate(prompts, max_tokens=5, temperature=0)
    assert [c.tokens for c in batch] == alone
    assert g.backend.stream.replayed > replayed  # batched steps after the first replayed its capture
    c = Model.load("smollm2-135m-instruct", device="cpu", context_length=64)
    assert alone == [c.generate(p, max_tokens=5, temperature=0).tokens for p in prompts]
    shared = g.generate(prompts[0], n=2, max_tokens=4, temperature=0)
    assert shared[0].tokens == shared[1].tokens == alone[0][:4]
    # a prefix copied from a busy slot on the device (copy_kv), then the rest evaluated
    head = "The long history of the printing press, as historians tell it, begins in"
    eng = Engine(g)
    first = eng.submit(head + " China", max_tokens=12, temperature=0,
                       logit_bias={t: -100 for t in g.tokenizer.eot_ids})[0]
    eng.step()
    second = eng.submit(head + " Europe", max_tokens=5, temperature=0)[0]
    eng.run([second])
    assert second.stats.cached_tokens >= len(g.tokenizer.encode(head)) - 1 and not first.done
    assert second.tokens == g.generate(head + " Europe", max_tokens=5, temperature=0).tokens
    eng.run([first])


@pytest.mark.gpu
def test_gpu_batch_replay_follows_positions_and_slots(gpu_backend, tmp_path):
    """A replayed batched step takes each step's tokens, positions and slots: a sequence crossing an
    attention split (128 positions) beside a shorter one that started first, in slot 0, gets the
    log-probabilities that the whole text's logits give (Model.logits: the prompt path)."""
    from tiny_hf import make_llama
    from wasmchord.convert import convert
    make_llama(tmp_path / "hf", tokenizer="bytes", calm=True, max_pos=256)
    g = Model.load(convert(tmp_path / "hf", tmp_path / "tiny.gguf", quant="f32"), device="gpu", context_length=144,
                   slots=2)
    rng = np.random.default_rng()
    short, long = ([int(t) for t in rng.integers(3, 200, n)] for n in (9, 123))
    ban = {t: -100 for t in g.tokenizer.eot_ids}
    eng = Engine(g, prefill_chunk=16)
    first = eng.submit(short, max_tokens=20, temperature=0, logit_bias=ban, logprobs=0)[0]
    eng.step()
    second = eng.submit(long, max_tokens=12, temperature=0, logit_bias=ban, logprobs=0)[0]
    replayed = g.backend.stream.replayed
    eng.run([first, second])
    # first decodes alone while second's prompt is read in 8 chunks (replayed too), then beside it
    assert g.backend.stream.replayed - replayed >= 15
    for prompt, req in ((short, first), (long, second)):
        chunks = [c for c in iter(lambda: req.take(False), None) if c.token is not None]
        n = len(req.tokens)
        assert len(chunks) == n == (20 if req is first else 12)
        lg = g.logits(prompt + req.tokens[:-1])[len(prompt) - 1:]                           # [n, vocab]
        want = (lg - np.logaddexp.reduce(lg, axis=1, keepdims=True))[np.arange(n), req.tokens]
        np.testing.assert_allclose([c.logprob for c in chunks], want, atol=1e-4)


@pytest.mark.gpu
def test_gpu_steps_submitted_ahead_give_the_tokens_of_one_by_one(gpu_backend, tmp_path):
    """Greedy rows on the GPU: the next step is submitted (reading the tokens the device just found)
    before this step's are read. Rows that finish at different steps, one cancelled midway, one that
    arrives while the others run (the step in flight then serves only its own rows), a prompt
    evaluated and finished within one step while a step is in flight (it writes the token buffer
    that step's successor would read), and a generation outside the engine between two steps (on a
    slot the engine does not use) all leave the tokens they get alone and with encode-ahead off."""
    from tiny_hf import make_llama
    from wasmchord.convert import convert
    make_llama(tmp_path / "hf", tokenizer="bytes")  # not calm: a token depends on the whole context
    g = Model.load(convert(tmp_path / "hf", tmp_path / "tiny.gguf", quant="f32"), device="gpu", context_length=64,
                   slots=4)
    rng = np.random.default_rng()
    prompts = [[int(t) for t in rng.integers(3, 200, n)] for n in (5, 9, 7, 11)]
    lengths = (14, 6, 20, 9)
    alone = [g.generate(p, max_tokens=n, temperature=0).tokens for p, n in zip(prompts, lengths)]

    def run(encode_ahead):
        eng = Engine(g, encode_ahead=encode_ahead)
        reqs = [eng.submit(p, max_tokens=n, temperature=0)[0] for p, n in zip(prompts[:3], lengths[:3])]
        for _ in range(2):
            eng.step()
        assert (eng._ahead is not None) == encode_ahead
        brief = eng.submit(prompts[3][:6], max_tokens=1, temperature=0)[0]  # admitted, evaluated, done in one step
        eng.step()
        assert len(brief.tokens) <= 1
        eng.step()
        g.generate(prompts[1][:4], max_tokens=3, temperature=0, sequence=Sequence(g.transformer, slot=3))  # a free slot
        late = eng.submit(prompts[3], max_tokens=lengths[3], temperature=0)[0]
        victim = eng.submit(prompts[0], max_tokens=30, temperature=0)[0]  # only the 4th slot is free: it waits
        for _ in range(3):
            eng.step()
        eng.run([late])
        eng.cancel(victim)
        eng.run(reqs + [victim])
        assert victim.finish_reason in ("cancelled", "stop") and victim.tokens == alone[0][:len(victim.tokens)]
        return eng, [r.tokens for r in reqs + [late]]

    eng, got = run(True)
    assert got == alone
    assert eng.ahead_steps >= 8
    plain, got_plain = run(False)
    assert got_plain == alone and plain.ahead_steps == 0
    # a step in flight whose rows are gone is dropped: the model serves a new request as before
    assert g.generate(prompts[1], max_tokens=lengths[1], temperature=0).tokens == alone[1]


@pytest.mark.gpu
def test_gpu_sampled_rows_are_drawn_on_the_device_whatever_shares_the_batch(gpu_backend, tmp_path, monkeypatch):
    """Sampled rows of a GPU batch draw their tokens on the device (no logits read back after the
    prompt's), each with its own parameters, penalties and seed: a seeded request gets the same
    tokens alone and beside others; steps without penalties are submitted ahead."""
    from tiny_hf import make_llama
    from wasmchord.convert import convert
    make_llama(tmp_path / "hf", tokenizer="bytes")
    g = Model.load(convert(tmp_path / "hf", tmp_path / "tiny.gguf", quant="f32"), device="gpu", context_length=48,
                   slots=3)
    rng = np.random.default_rng()
    prompts = [[int(t) for t in rng.integers(3, 200, n)] for n in (6, 9, 4)]
    kws = [dict(temperature=0.9, top_k=30, seed=5), dict(temperature=1.1, top_p=0.9, repeat_penalty=1.2, seed=6),
           dict(temperature=0)]
    reads = []
    orig = g.backend.read
    monkeypatch.setattr(g.backend, "read", lambda x: reads.append(x) or orig(x))

    def run(idx):
        eng = Engine(g)
        reqs = [eng.submit(prompts[i], max_tokens=12, **kws[i])[0] for i in idx]
        eng.run(reqs)
        return eng, [r.tokens for r in reqs]

    alone = [run([i])[1][0] for i in range(3)]
    assert len(reads) == 3  # each prompt's last logits (its first token), nothing per step
    eng, together = run([0, 1, 2])
    assert together == alone
    eng, pair = run([0, 2])  # no penalty: submitted ahead
    assert pair == [alone[0], alone[2]] and eng.ahead_steps >= 5
    assert len(alone[0]) == 12 and len(set(alone[0])) > 3  # sampled, not stuck


def test_extreme_sampling_values_that_are_accepted_do_not_fail_the_batch(cpu):
    """A temperature that divides the logits past float range, a repeat penalty that overflows them:
    accepted values, so each request gets tokens, and the others in its batch are untouched."""
    want = cpu.generate(PROMPTS[0], max_tokens=6, temperature=0).tokens
    eng = Engine(cpu)
    reqs = [eng.submit(PROMPTS[0], max_tokens=6, temperature=1e-320)[0],   # below 1e-5: greedy
            eng.submit(PROMPTS[1], max_tokens=6, temperature=1.0, repeat_penalty=1e-39, seed=1)[0],
            eng.submit(PROMPTS[2], max_tokens=6, temperature=1e-30, repeat_penalty=1e-39, top_k=0, seed=2)[0],
            eng.submit(PROMPTS[0], max_tokens=6, temperature=0)[0]]
    eng.run(reqs)
    assert [r.error for r in reqs] == [None] * 4
    assert [r.finish_reason for r in reqs] == ["length"] * 4
    assert reqs[0].tokens == reqs[3].tokens == want
    with pytest.raises(GenerationError, match="presence_penalty = 3: expected a value in .-2, 2."):
        eng.submit(PROMPTS[0], presence_penalty=3)


def test_a_failure_in_one_requests_sampling_fails_it_alone(cpu, monkeypatch):
    eng = Engine(cpu)
    bad, good = eng.submit(PROMPTS[0], max_tokens=4, temperature=0) + eng.submit(PROMPTS[1], max_tokens=4,
                                                                                 temperature=0)

    def broken(tok):
        raise ValueError("a bug in this request's text")
    monkeypatch.setattr(bad.text, "add", broken)  # this request's own TextStream
    eng.run([bad, good])
    assert isinstance(bad.error, ValueError) and good.error is None and good.finish_reason == "length"


def test_a_batch_holds_the_model_from_its_first_step_to_its_last(cpu, monkeypatch):
    """Another thread's direct call would take slot 0 between two steps of a batch and fail it; the
    batch holds the model's lock throughout, as one generation does."""
    owners = []
    real = Engine.step

    def step(self):
        owners.append(cpu.lock._owner)
        return real(self)
    monkeypatch.setattr(Engine, "step", step)
    cpu.generate(PROMPTS[:2], max_tokens=3, temperature=0)
    assert owners and set(owners) == {threading.get_ident()}


def test_stop_fails_the_requests_left_and_the_engine_starts_again(cpu):
    eng = cpu.engine()
    eng.start()
    reqs = [eng.submit(p, max_tokens=120, temperature=0)[0] for p in PROMPTS]  # 5 prompts, 4 slots
    next(eng.stream(reqs[0], timeout=120))
    eng.stop()
    assert (eng.running, eng.queued) == (0, 0)
    for r in reqs:
        with pytest.raises(GenerationError, match="engine was stopped"):
            list(eng.stream(r, timeout=5))  # not a wait without end
    eng.start()
    try:
        again = eng.submit(PROMPTS[0], max_tokens=4, temperature=0)[0]
        assert list(eng.stream(again, timeout=120))[-1].finish_reason == "length"
    finally:
        eng.stop()


def test_a_callback_that_raises_does_not_stop_the_engine(cpu):
    eng = cpu.engine()
    eng.start()
    try:
        def notify(req, item):
            raise RuntimeError("Event loop is closed")
        broken = eng.submit(PROMPTS[0], max_tokens=4, temperature=0, notify=notify)[0]
        other = eng.submit(PROMPTS[1], max_tokens=4, temperature=0)[0]
        assert list(eng.stream(broken, timeout=120))[-1].finish_reason == "length"  # its queue still has it all
        assert list(eng.stream(other, timeout=120))[-1].finish_reason == "length"
        later = eng.submit(PROMPTS[2], max_tokens=2, temperature=0)[0]
        assert list(eng.stream(later, timeout=120))[-1].finish_reason == "length"
    finally:
        eng.stop()


def test_abort_ends_every_request_without_waiting_for_the_step(cpu, monkeypatch):
    """A shutdown whose time is up: abort() gives each running and waiting request EngineStopped at once,
    though the engine's step in progress takes seconds; nothing more is accepted; stop() then joins."""
    real, entered = cpu.transformer.forward_batch, threading.Event()

    def slow(*a, **k):
        entered.set()
        time.sleep(3)
        return real(*a, **k)
    eng = Engine(cpu, max_queue=8)
    reqs = [eng.submit(p, max_tokens=50, temperature=0)[0] for p in PROMPTS] + \
        eng.submit(PROMPTS[0], max_tokens=50, temperature=0, n=4)   # four more than the slots: waiting
    monkeypatch.setattr(cpu.transformer, "forward_batch", slow)
    eng.start()
    try:
        assert entered.wait(30)                     # a decode step is under way
        t0 = time.perf_counter()
        eng.abort()
        got = [r.take(block=True, timeout=5) for r in reqs]
        assert time.perf_counter() - t0 < 1.5       # not the step's 3 s
        while any(not isinstance(g, BaseException) for g in got):  # chunks already out come first
            got = [g if isinstance(g, BaseException) else r.take(block=True, timeout=5) for r, g in zip(reqs, got)]
        assert all(isinstance(g, EngineStopped) for g in got)
        with pytest.raises(EngineStopped):
            eng.submit("late", max_tokens=1)
    finally:
        eng.stop()
    assert (eng.running, eng.queued) == (0, 0)


def test_a_failed_copy_of_a_prefill_loses_no_sample(cpu, monkeypatch):
    """n = 2: the second sample copies the first's prefill; if the copy fails (a device fault), the
    step fails the first and the second still ends, never left out of both queues."""
    from wasmchord.errors import BackendError

    def broken_copy(*a, **k):
        raise BackendError("copying KV cache slots: device lost (simulated)")
    monkeypatch.setattr(cpu.transformer.be, "copy_kv", broken_copy)
    eng = cpu.engine()
    eng.start()
    try:
        leader, follower = eng.submit(PROMPTS[0], n=2, max_tokens=4, temperature=0)
        ends = []
        for r in (leader, follower):
            try:
                ends.append(list(eng.stream(r, timeout=60))[-1].finish_reason)
            except BackendError as e:
                ends.append(type(e).__name__)
        assert ends == ["BackendError", "length"]
        assert (eng.running, eng.queued) == (0, 0)
    finally:
        eng.stop()


def test_a_submission_that_meets_a_stop_midway_is_refused(cpu, monkeypatch):
    """stop() between submit's first check and the queueing (while the prompt is tokenized): the
    request must not wait in an engine that has no thread left."""
    eng = cpu.engine()
    eng.start()
    real = cpu.prompt_ids

    def stop_meanwhile(prompt):
        eng.stop()
        return real(prompt)
    monkeypatch.setattr(cpu, "prompt_ids", stop_meanwhile)
    with pytest.raises(GenerationError, match="engine was stopped"):
        eng.submit("Hi", max_tokens=2)
    assert eng.queued == 0

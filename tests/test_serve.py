"""`wasmchord serve` as users meet it: a server started on a free port, called with the real `openai`
client and raw HTTP; its answers checked against the library's own."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from wasmchord import Model, Tokenizer

openai = pytest.importorskip("openai") if not os.environ.get("CI") else __import__("openai")
ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test"
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*extra, key=KEY, model=MODEL):
    port = free_port()
    ctx = [] if "--context-length" in extra else ["--context-length", "256"]
    cmd = [sys.executable, "-m", "wasmchord", "serve", model, "--backend", "cpu", "--port", str(port), *ctx,
           *extra] + (["--api-key", key] if key else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready")


@pytest.fixture(scope="module")
def server():
    proc, url = start("--slots", "4", "--max-queue", "32")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def lib():
    return Model.load(MODEL, device="cpu", context_length=256)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_chat_equals_the_library(client, lib):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    want = lib.chat(msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == want.completion_tokens
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=[msgs[0], {"role": "user", "content": parts}],
                                        max_tokens=12, temperature=0)
    assert r2.choices[0].message.content == want.text


def test_continue_final_message_continues_the_assistants_reply(client, lib):
    """vLLM's option: the reply continues the assistant's begun message (the prompt ends with it), and
    /tokenize counts the same prompt; without a begun reply it is a 400 naming messages."""
    msgs = [{"role": "user", "content": "Write a sentence about the sea."}, {"role": "assistant", "content": "The sea"}]
    extra = {"continue_final_message": True}
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, extra_body=extra)
    ids = lib.chat_ids(msgs, continue_final_message=True)
    assert lib.tokenizer.decode(ids).endswith("assistant\nThe sea")
    assert r.choices[0].message.content == lib.generate(ids, max_tokens=8, temperature=0).text
    assert r.usage.prompt_tokens == len(ids) == httpx.post(
        client.base_url.join("/tokenize").__str__(), json={"messages": msgs, **extra},
        headers={"Authorization": f"Bearer {KEY}"}).json()["count"]
    with pytest.raises(openai.BadRequestError, match="the last message must be the assistant's") as e:
        client.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="continue_final_message and response_format cannot"):
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, extra_body=extra,
                                       response_format={"type": "json_object"})
    r = httpx.post(client.base_url.join("/tokenize").__str__(), json={"prompt": "hi", **extra},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_completion_stream_with_usage(client, lib):
    s = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10, temperature=0,
                                  stream=True, stream_options={"include_usage": True})
    chunks = list(s)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == lib.generate("The capital of France is", max_tokens=10, temperature=0).text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_stream(client, lib):
    msgs = [{"role": "user", "content": "Name a color."}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == lib.chat(msgs, max_tokens=8, temperature=0).text


def test_logprobs(client, lib):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy: the top one
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) == 2 for t in lp.top_logprobs)
    zero = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0, logprobs=0).choices[0]
    assert [list(t) for t in zero.logprobs.top_logprobs] == [[tok] for tok in zero.logprobs.tokens]  # the token itself


def lib_logprobs(lib, ids):
    """Each token's log-probability after the ones before it: log-softmax of the library's logits."""
    z = lib.logits(ids).astype(np.float64)                                                  # [n, vocab]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return [logp[i, ids[i + 1]] for i in range(len(ids) - 1)]


def test_echo_scores_the_prompt(client, lib):
    """echo with logprobs (as lm-eval-harness and perplexity scripts call it): the prompt's text and its
    tokens' log-probabilities (null for the first) equal log-softmax of the library's logits for every
    position, then the completion's; max_tokens = 0 scores the prompt alone. Streamed: the same."""
    prompt = "The capital of France is Paris, and the capital of Italy is"
    ids = lib.tokenizer.encode(prompt)
    want = lib_logprobs(lib, ids)
    for max_tokens in (0, 3):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, echo=True,
                                      logprobs=2)
        c = r.choices[0]
        lp = c.logprobs
        gen = lib.generate(prompt, max_tokens=3, temperature=0).text if max_tokens else ""
        assert c.text == prompt + gen and r.usage.completion_tokens == max_tokens
        assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert np.allclose(lp.token_logprobs[1:len(ids)], want, atol=1e-4)
        for tok, t, p in zip(lp.tokens[1:], lp.top_logprobs[1:], lp.token_logprobs[1:]):  # top 2 and the token
            assert t[tok] == p and len(t) == (2 if p >= sorted(t.values())[-2] else 3) and max(t.values()) >= p
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(ids):] == [
            len(prompt) + o for o in np.cumsum([0] + [len(t) for t in lp.tokens[len(ids):-1]])][:max_tokens]
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                echo=True, logprobs=2, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == c.text
        streamed = [x for ch in chunks if ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
        assert streamed == lp.token_logprobs
    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True)
    assert plain.choices[0].text == lib.tokenizer.decode(ids) + lib.generate(ids, max_tokens=2, temperature=0).text
    full = (ids * 30)[:256]  # a prompt that fills the server's context can be scored (and only scored)
    assert client.completions.create(model=MODEL, prompt=full, max_tokens=0, echo=True, logprobs=0).choices[
        0].logprobs.token_logprobs[1:] == pytest.approx(lib_logprobs(lib, full), abs=1e-3)
    with pytest.raises(openai.BadRequestError, match="the prompt has 256 tokens; the context holds 256 and no room"):
        client.completions.create(model=MODEL, prompt=full, max_tokens=1, echo=True)
    chat_ids = lib.chat_ids([{"role": "user", "content": "Hi"}])  # its control tokens are echoed as text too
    echoed = client.completions.create(model=MODEL, prompt=chat_ids, max_tokens=0, echo=True).choices[0].text
    assert echoed == lib.tokenizer.decode(chat_ids, skip_special=False) and echoed.startswith("<|im_start|>")


def test_an_echoed_prompts_offsets_index_its_text():
    """A text prompt's BOS (Gemma's tokenizer adds one) has no text, so every token's text_offset points
    into the echoed text; token ids are echoed with their control tokens' text."""
    from wasmchord.serve.protocol import completion_logprobs, prompt_chunks
    tok = Tokenizer.from_gguf("gemma3-270m")
    ids = tok.encode("Hello world, again")
    assert ids[0] == tok.bos_id
    for skip in (True, False):
        pieces = prompt_chunks(tok, None, ids, skip_special=skip)
        text = "".join(p.text for p in pieces)
        lp = completion_logprobs(tok, pieces)
        assert text == ("" if skip else "<bos>") + "Hello world, again"
        assert [text[o:o + len(p.text)] for o, p in zip(lp["text_offset"], pieces)] == [p.text for p in pieces]
        assert lp["tokens"][0] == "<bos>" and lp["token_logprobs"] == [None] * len(ids)


def test_a_batch_of_prompts_numbers_its_choices_across_them(client, lib):
    """OpenAI's prompt lists (of texts or of token ids, as lm-evaluation-harness sends `[[ids]]`): a
    choice per prompt and sample, numbered prompt by prompt, each equal to the prompt alone; usage
    counts each prompt once."""
    texts = ["The capital of France is", "Water boils at", "Once upon a time"]
    want = [lib.generate(t, max_tokens=3, temperature=0).text for t in texts]
    for prompt in (texts, [lib.tokenizer.encode(t) for t in texts]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, n=2)
        assert [c.index for c in r.choices] == list(range(6))
        assert [c.text for c in r.choices] == [w for w in want for _ in range(2)]
        assert r.usage.prompt_tokens == sum(len(lib.tokenizer.encode(t)) for t in texts)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, n=2,
                                                stream=True))
        streamed = {}
        for ch in chunks:
            for c in ch.choices:
                streamed[c.index] = streamed.get(c.index, "") + c.text
        assert [streamed[i] for i in range(6)] == [w for w in want for _ in range(2)]
    ids = lib.tokenizer.encode(texts[0])
    r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert r.choices[0].logprobs.token_logprobs[0] is None and len(r.choices[0].logprobs.tokens) == len(ids) + 1
    for bad, needle in (([[1, 2], [10**9]], "prompt 1: token id 1000000000 is out of range"), ([], "empty"),
                        ([texts[0], [1]], "prompt")):
        e = httpx.post(client.base_url.join("completions").__str__(), json={"prompt": bad, "max_tokens": 1},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert e.status_code == 400 and needle in e.json()["error"]["message"]
    r = httpx.post(client.base_url.join("completions").__str__(), json={"prompt": "a", "max_tokens": 0},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(client.base_url.join("completions").__str__(), json={"prompt": ["a"] * 40, "n": 2, "max_tokens": 1},
                   headers={"Authorization": f"Bearer {KEY}"})  # 80 sequences > 4 slots + 32 waiting: never fits
    assert r.status_code == 400 and "make 80 sequences; this server holds at most 36" in r.json()["error"]["message"]


def test_logit_bias(client, lib):
    """OpenAI's logit_bias: +100 makes a token the greedy choice, -100 bans the one greedy would take."""
    forced = lib.tokenizer.encode(" banana", add_bos=False)[0]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == lib.tokenizer.decode([forced] * 3)
    first = lib.generate("The capital of France is", max_tokens=1, temperature=0).tokens[0]
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100}, logprobs=1)
    assert banned.choices[0].text != lib.tokenizer.decode([first])


def test_stop_string_across_tokens_is_never_emitted(client, lib):
    full = lib.generate("The capital of France is", max_tokens=12, temperature=0)
    pieces = [lib.tokenizer.decode([t]) for t in full.tokens]
    i = next(j for j in range(1, len(pieces)) if len(pieces[j - 1]) >= 2 and pieces[j])
    stop = pieces[i - 1][-2:] + pieces[i][:1]  # spans two tokens
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == full.text[:full.text.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_seed_reproducibility_and_n(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a word."}], max_tokens=8,
              temperature=1.0)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == client.chat.completions.create(seed=7, **kw).choices[0].message.content
    r = client.chat.completions.create(seed=7, n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.choices[0].message.content == a
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens == client.chat.completions.create(
        seed=7, **kw).usage.prompt_tokens


def test_concurrent_greedy_requests_equal_one_by_one(client):
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]

    def ask(p):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=10,
                                              temperature=0).choices[0].message.content
    one_by_one = [ask(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == one_by_one


def running(url) -> int:
    m = httpx.get(url + "/metrics").text
    return int(next(line.split()[1] for line in m.splitlines() if line.startswith("wasmchord_requests_running ")))


def test_a_disconnect_frees_the_slot(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert running(server) == 1
    deadline = time.time() + 30
    while running(server) and time.time() < deadline:
        time.sleep(0.2)
    assert running(server) == 0


def test_a_disconnect_before_a_whole_reply_cancels_it(server, lib):
    """A client that gives up on a non-streamed reply: its generation stops too (the tokens generated
    stay well under max_tokens, which would take several seconds here)."""
    assert lib.generate("Once upon a time", max_tokens=240, temperature=0).finish_reason == "length"
    def generated():
        m = httpx.get(server + "/metrics").text
        return int(next(line.split()[1] for line in m.splitlines()
                        if line.startswith("wasmchord_generation_tokens_total ")))
    before = generated()
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 240, "temperature": 0}).encode()
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        deadline = time.time() + 60
        while running(server) == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert running(server) == 1
    deadline = time.time() + 30
    while running(server) and time.time() < deadline:
        time.sleep(0.1)
    assert running(server) == 0
    assert generated() - before < 200


def test_more_of_the_openai_protocol(server, client):
    h = {"Authorization": f"Bearer {KEY}"}
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(server + "/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    # the developer role is the system role under OpenAI's newer name
    sys_msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
    dev = client.chat.completions.create(model=MODEL, messages=[dict(sys_msgs[0], role="developer"), sys_msgs[1]],
                                         max_tokens=6, temperature=0)
    assert dev.choices[0].message.content == client.chat.completions.create(
        model=MODEL, messages=sys_msgs, max_tokens=6, temperature=0).choices[0].message.content
    assert dev.usage.prompt_tokens == httpx.post(server + "/tokenize", json={"messages": sys_msgs},
                                                 headers=h).json()["count"]
    # a stream with include_usage: "usage": null on every chunk but the last; text_offset runs on
    raw = httpx.post(server + "/v1/completions", headers=h, timeout=60, json={
        "model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0, "logprobs": 1, "stream": True,
        "stream_options": {"include_usage": True}}).text
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert all("usage" in c for c in chunks) and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])
    offsets, text = [], ""
    for c in chunks:
        for ch in c["choices"]:
            if ch["logprobs"]:
                offsets += ch["logprobs"]["text_offset"]
                assert ch["logprobs"]["text_offset"] == [len(text)]
            text += ch["text"]
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=1)
    assert offsets == whole.choices[0].logprobs.text_offset and len(offsets) == 6


def test_an_internal_error_keeps_the_connection(lib, monkeypatch):
    """A bug answers 500 in OpenAI's shape, and the client's keep-alive connection keeps serving."""
    import http.client

    import uvicorn

    from wasmchord.serve import create_app

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(lib.tokenizer, "encode", boom)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(lambda: lib, name=MODEL), port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not srv.started and time.time() < deadline:
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(3):
            conn.request("POST", "/tokenize", body=json.dumps({"prompt": "hi"}),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            err = json.loads(r.read())["error"]
            assert r.status == 500 and err["type"] == "server_error" and "a bug" in err["message"]
            time.sleep(0.2)  # a server that closes the connection after the answer has done so by now
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    finally:
        srv.should_exit = True
        thread.join(30)


def test_error_answers_carry_cors_headers():
    from fastapi.testclient import TestClient

    from wasmchord.serve import create_app
    gate = threading.Event()

    def load():
        gate.wait(60)
        raise RuntimeError("not loaded in this test")
    try:
        with TestClient(create_app(load, name=MODEL, api_key=KEY, cors_origins=["http://app.example"])) as c:
            r = c.get("/v1/models", headers={"Origin": "http://app.example"})
            assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://app.example"
            r = c.post("/v1/completions", content=b"x" * (33 * 2**20), headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 503  # still loading: a big body is not read before that
    finally:
        gate.set()


def test_bad_requests_get_openai_errors(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server + "/v1/models").status_code == 401
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/chat/completions", content="{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="the context holds 256"):
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role = 'wizard'"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5)
    with pytest.raises(openai.BadRequestError, match="chat template does not take tools"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="Invalid type: strin"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "strin"}}})
    with pytest.raises(openai.BadRequestError, match="logit_bias key '99999999'"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       logit_bias={"99999999": 10})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(server + "/v2/nothing", headers=h).status_code == 404
    with pytest.raises(openai.BadRequestError, match="token id -1"):
        client.completions.create(model=MODEL, prompt=[-1], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="tool_choice = 'required' needs tools"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    r = httpx.post(server + "/v1/completions", headers=h, json={"prompt": "Hi", "n": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "4 sequences at once" in r.text
    r = httpx.post(server + "/v1/completions", headers=h, json={"prompt": "Hi", "stop": ["a", ""]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop" and "empty" in r.text
    for field, value in (("temperature", "0.5"), ("stream", "yes"), ("max_tokens", True), ("prompt", [True])):
        r = httpx.post(server + "/v1/completions", headers=h, json={"prompt": "Hi", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    for field, value in (("temperature", "NaN"), ("repeat_penalty", "Infinity"), ("top_p", "-Infinity")):
        r = httpx.post(server + "/v1/completions", headers=h, content=f'{{"prompt": "Hi", "{field}": {value}}}')
        assert r.status_code == 400 and r.json()["error"]["param"] == field and "finite" in r.text, r.text
    r = httpx.post(server + "/v1/chat/completions", headers=h, json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert r.status_code == 400 and "type 'image_url'" in r.text and "text parts only" in r.text, r.text
    r = httpx.post(server + "/v1/completions", content=b" " * (33 * 2**20), headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server + "/v1/completions", content="[" * 100_000 + "]" * 100_000, headers=h)
    assert r.status_code == 400 and "nested too deeply" in r.text
    r = httpx.post(server + "/v1/completions", headers=h, timeout=120,
                   content='{"prompt": "Hi", "max_tokens": 1, "extra": ' + "[" * 900 + "]" * 900 + "}")
    assert r.status_code == 200, r.text  # an unknown field, deep but within the parser's depth: ignored
    r = httpx.delete(server + "/v1/chat/completions", headers=h)
    assert r.status_code == 405 and "POST" in r.headers.get("allow", "") and r.json()["error"]["message"]
    for path in ("/health", "/metrics", "/v1/models", f"/v1/models/{MODEL}"):  # as load balancers probe
        assert httpx.head(server + path, headers=h).status_code == 200, path
    # the server still serves everyone after all of that
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None


def test_top_k_minus_one_means_off(client):
    """vLLM's and llama.cpp's clients send top_k = -1 for "no top-k": the library's 0, the same draws."""
    from wasmchord.serve.protocol import CompletionRequest
    assert CompletionRequest.model_validate({"prompt": "x", "top_k": -1}).engine_args(4)["top_k"] == 0
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1, seed=7)
    off = [client.completions.create(**kw, extra_body={"top_k": k}).choices[0].text for k in (-1, 0)]
    assert off[0] == off[1]
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.completions.create(**kw, extra_body={"top_k": -2})


def test_null_means_the_default(server, lib):
    # Some clients send null for every parameter they leave alone.
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server + "/v1/chat/completions", headers=h, timeout=120, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "n": None,
        "stream": None, "logprobs": None, "top_logprobs": None, "stop": None, "seed": None})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None


def test_response_format_is_enforced(client):
    import jsonschema
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Give me a city as JSON."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60, temperature=1.0, seed=2,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "city", "schema": schema,
                                                                        "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60, temperature=1.0,
                                                 seed=3, stream=True, response_format={"type": "json_object"}))
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), dict)


def test_tokenize_round_trip(server, lib):
    h = {"Authorization": f"Bearer {KEY}"}
    t = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    assert t["tokens"] == lib.tokenizer.encode("Hello world")
    d = httpx.post(server + "/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert d["prompt"] == "Hello world"
    assert httpx.post(server + "/detokenize", json={"tokens": [10**9]}, headers=h).status_code == 400
    for bad, param, needle in (({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "prompt", "not both"),
                               ({"prompt": "a", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
                                "with messages"), ({}, "prompt", "give prompt or messages")):
        r = httpx.post(server + "/tokenize", json=bad, headers=h)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and needle in r.json()["error"]["message"]


def test_a_full_queue_answers_503_with_retry_after():
    """One slot, a queue of one: while a request runs, one more waits and is served; the rest get 503."""
    proc, url = start("--slots", "1", "--max-queue", "1", key=None)
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json={**body, "max_tokens": 200, "stream": True},
                          timeout=300) as running:
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it holds the slot now
            with ThreadPoolExecutor(3) as pool:
                rs = list(pool.map(lambda _: httpx.post(url + "/v1/completions", json=body, timeout=300), range(3)))
            assert any(line == "data: [DONE]" for line in lines)
        codes = sorted(r.status_code for r in rs)
        assert codes == [200, 503, 503], codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "queue_full"
        assert httpx.post(url + "/v1/completions", json=body, timeout=300).status_code == 200  # and serves again
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_health_is_503_while_loading():
    from fastapi.testclient import TestClient

    from wasmchord.serve import create_app
    gate = threading.Event()

    def load():
        gate.wait(60)
        return Model.load(MODEL, device="cpu", context_length=64)
    with TestClient(create_app(load, name=MODEL)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert c.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
        gate.set()
        deadline = time.time() + 120
        while c.get("/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.2)
        assert c.get("/health").status_code == 200
        assert json.loads(c.get("/v1/models").text)["data"][0]["id"] == MODEL


def test_cli_generate_applies_the_chat_template():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "wasmchord", "generate", "Explain why the sky is blue in two sentences.", "-n", "12",
            "--temperature", "0", "--backend", "cpu"]
    chat = subprocess.run(args, capture_output=True, text=True, env=env)
    raw = subprocess.run(args + ["--raw"], capture_output=True, text=True, env=env)
    assert chat.returncode == raw.returncode == 0, chat.stderr + raw.stderr
    assert chat.stdout.strip() and chat.stdout != raw.stdout


def wait_metrics(url: str, *lines: str, timeout: float = 120):
    """Poll /metrics until it holds all of these lines (or the timeout passes)."""
    deadline = time.time() + timeout
    while not set(lines) <= set(httpx.get(url + "/metrics").text.splitlines()) and time.time() < deadline:
        time.sleep(0.05)


def post_whole(url: str, ask: dict, got: list):
    """A whole completion: (status, error code or None) to `got`, or the exception's name."""
    try:
        r = httpx.post(url + "/v1/completions", timeout=120, json=ask)
        got.append((r.status_code, r.json()["error"]["code"] if r.status_code != 200 else None))
    except (httpx.HTTPError, ValueError, KeyError) as e:
        got.append(type(e).__name__)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_shutdown_waits_at_most_its_timeout_then_answers_what_is_left(lib, sig):
    """Ctrl-C or SIGTERM with 8 requests of 1,000 tokens on 2 slots: the server gives them the timeout,
    then each client gets OpenAI's error shape (a 503 whole reply, or a stream's error event), not a cut
    connection, and the process ends soon after."""
    proc, url = start("--slots", "2", "--context-length", "1024", "--shutdown-timeout", "1", key=None)
    ban = {str(i): -100 for i in lib.tokenizer.eot_ids}  # every request runs its 1,000 tokens: 8,000 in all
    ask = {"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 1, "seed": 1, "logit_bias": ban}
    got = []

    def whole():
        post_whole(url, ask, got)

    def streamed():
        try:
            with httpx.stream("POST", url + "/v1/completions", timeout=120, json=dict(ask, stream=True)) as r:
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
            last = json.loads(events[-1][6:])
            got.append(("stream", last["error"]["code"] if "error" in last else events[-1]))
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            got.append(type(e).__name__)
    clients = [threading.Thread(target=whole if i % 2 else streamed) for i in range(8)]
    for c in clients:
        c.start()
    wait_metrics(url, "wasmchord_requests_running 2", "wasmchord_requests_waiting 6")
    t0 = time.time()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    took = time.time() - t0
    for c in clients:
        c.join(timeout=60)
    assert took < 15, took  # not the minute the requests would take
    err = proc.stderr.read()
    assert "shutting down: 2 requests running and 6 waiting get up to 1 s" in err
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err
    assert sorted(got, key=str) == [("stream", "shutting_down")] * 4 + [(503, "shutting_down")] * 4, got


def test_a_second_signal_stops_at_once(lib):
    """SIGTERM, then SIGTERM again (as Ctrl-C twice): the requests left get shutting_down at once and
    the server ends, without waiting out the 60 s shutdown timeout."""
    proc, url = start("--slots", "2", "--shutdown-timeout", "60", key=None)
    ban = {str(i): -100 for i in lib.tokenizer.eot_ids}
    ask = {"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 1, "seed": 1, "logit_bias": ban}
    got = []

    def whole():
        post_whole(url, ask, got)
    clients = [threading.Thread(target=whole) for _ in range(2)]
    for c in clients:
        c.start()
    wait_metrics(url, "wasmchord_requests_running 2")
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert proc.poll() is None  # the first signal waits for the requests
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    for c in clients:
        c.join(timeout=60)
    assert time.time() - t0 < 20
    err = proc.stderr.read()
    assert "second signal: stopping now" in err and "Traceback" not in err, err
    assert got == [(503, "shutting_down")] * 2, got


def test_requests_that_finish_within_the_shutdown_timeout_complete_and_the_server_ends_then(lib):
    proc, url = start("--shutdown-timeout", "60", key=None)
    ban = {str(i): -100 for i in lib.tokenizer.eot_ids}
    got = []
    client = threading.Thread(target=lambda: got.append(httpx.post(url + "/v1/completions", timeout=120, json={
        "prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "logit_bias": ban})))
    client.start()
    wait_metrics(url, "wasmchord_requests_running 1")
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=90)
    client.join(timeout=60)
    assert time.time() - t0 < 30  # the request's own time, not the 60 s timeout
    assert got[0].status_code == 200 and got[0].json()["usage"]["completion_tokens"] == 60


def test_a_tool_call_without_arguments_in_the_history_reads_as_an_empty_object():
    from wasmchord.serve.protocol import Message
    m = Message(role="assistant", content=None,
                tool_calls=[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}])
    assert m.for_template()["tool_calls"][0]["function"]["arguments"] == {}

"""Scale-out on Ray Serve: a local Ray instance with one replica of the wasmchord deployment, called
with the real `openai` client; /health and /metrics pass through."""

import socket
import time

import httpx
import openai

import ray  # a test dependency (ray[serve] in the test extra): never skipped


def test_ray_serve_replica_answers_the_openai_client():
    from ray import serve

    from wasmchord import Model
    from wasmchord.serve.ray import deployment
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment("smollm2-135m-instruct", device="cpu", slots=2, context_length=128,
                             max_ongoing_requests=8), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while httpx.get(url + "/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.5)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        got = c.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=8, temperature=0)
        want = Model.load("smollm2-135m-instruct", device="cpu", context_length=128).chat(msgs, max_tokens=8,
                                                                                           temperature=0)
        assert got.choices[0].message.content == want.text
        assert "wasmchord_requests_running 0" in httpx.get(url + "/metrics").text
    finally:
        serve.shutdown()
        ray.shutdown()

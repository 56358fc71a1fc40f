"""Load an OpenAI-compatible server with C concurrent streaming clients and report time to first token
(p50/p99), inter-token latency (p50/p99) and aggregate tok/s at each C; wasmchord's server and, when
llama-cpp-python is installed, its `llama_cpp.server` under the same load in the same run.

    python tools/serve_bench.py [--model smollm2-135m-instruct] [--backend cpu] [--clients 1,4,8,16]
                                [--requests 2] [--max-tokens 64] [--json out.json]

Each client sends `--requests` chat requests one after another (different prompts, greedy,
max_tokens each); a request's first streamed token gives its TTFT, the gaps between its streamed
tokens its inter-token latencies. A stream that breaks off (llama-cpp-python's server, as installed,
ends a running stream when another request arrives) counts as broken; its tokens still count.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, url, timeout=600):
    """Start a server (its output to a file: llama.cpp's is verbose enough to fill a pipe and block it)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{cmd[2]} exited: {log.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not become ready")


def one_request(url, model, prompt, max_tokens):
    """(ttft, [inter-token gaps], tokens, complete) of one streamed greedy chat request; `complete`
    is False when the stream broke off or failed (a server that drops a stream for a newer request)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    times, complete = [], False
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    complete = True
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if d.get("choices") and d["choices"][0].get("delta", {}).get("content"):
                    times.append(time.perf_counter())
    except httpx.HTTPError:
        complete = False
    if not times:
        return None, [], 0, complete
    return times[0] - t0, list(np.diff(times)), len(times), complete


def load(url, model, clients, requests, max_tokens):
    prompts = [f"Write a short paragraph about topic number {i}: the history of " + w
               for i, w in enumerate(["bridges", "tea", "maps", "clocks", "paper", "glass", "salt", "ships"] * 8)]

    def client(c):
        return [one_request(url, model, prompts[(c * requests + j) % len(prompts)], max_tokens)
                for j in range(requests)]
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        res = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t
    ttft = [r[0] for r in res if r[0] is not None]
    itl = [g for r in res for g in r[1]]
    tokens = sum(r[2] for r in res)
    pct = lambda a, q: float(np.percentile(a, q)) * 1e3 if a else None  # noqa: E731
    return {"clients": clients, "requests": len(res), "broken": sum(not r[3] for r in res), "tokens": tokens,
            "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50),
            "itl_p99_ms": pct(itl, 99)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--context-length", type=int, default=512)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    from wasmchord import hub
    path = hub.resolve_model(a.model)
    cs = [int(x) for x in a.clients.split(",")]
    threads = os.cpu_count() or 1
    servers = {"wasmchord": [sys.executable, "-m", "wasmchord", "serve", a.model, "--backend", a.backend,
                             "--slots", str(max(cs)), "--context-length", str(a.context_length),
                             "--max-queue", str(4 * max(cs))]}
    if not a.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
            llama = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_ctx", str(a.context_length),
                     "--n_threads", str(threads), "--n_threads_batch", str(threads)]
            # as installed (a new request ends the running stream), and set to queue requests instead
            servers["llama-cpp-python server"] = llama
            servers["llama-cpp-python server, interrupt_requests off"] = llama + ["--interrupt_requests", "false"]
        except ImportError:
            print("llama-cpp-python is not installed: wasmchord only", file=sys.stderr)
    out = {"model": a.model, "backend": a.backend, "machine_cores": threads, "max_tokens": a.max_tokens,
           "requests_per_client": a.requests, "servers": {}}
    for name, cmd in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = cmd + (["--port", str(port)] if name == "wasmchord" else ["--port", str(port), "--host", "127.0.0.1"])
        proc = start(cmd, url)
        try:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            one_request(url, model, "Warm up.", 4)
            rows = [load(url, model, c, a.requests, a.max_tokens) for c in cs]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        out["servers"][name] = rows
        print(f"\n{name} ({a.model}, {a.backend}, {threads} cores)")
        print(f"{'clients':>8}{'tokens':>8}{'wall s':>8}{'tok/s':>8}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}"
              f"{'broken':>8}")
        for r in rows:
            print(f"{r['clients']:>8}{r['tokens']:>8}{r['wall_s']:>8.1f}{r['tok_s']:>8.1f}{r['ttft_p50_ms']:>10.0f}"
                  f"{r['ttft_p99_ms']:>8.0f}{r['itl_p50_ms']:>9.0f}{r['itl_p99_ms']:>8.0f}"
                  f"{r['broken']:>5}/{r['requests']}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

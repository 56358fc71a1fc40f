"""`wasmchord bench`: load time, prefill and decode tok/s, peak RSS, the memory-bandwidth roofline,
and llama.cpp's figures in the same run when llama-cpp-python is importable."""

from __future__ import annotations

import logging
import os
import platform
import resource
import time

import numpy as np

log = logging.getLogger(__name__)

TEXT = ("The history of science is the study of the development of science and scientific knowledge, "
        "including both the natural and social sciences. Science is a body of empirical, theoretical, and "
        "practical knowledge about the natural world, produced by scientists who emphasize the observation, "
        "explanation, and prediction of real-world phenomena. ")


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(TEXT * (n // 40 + 2), add_bos=False)
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids[:n - 1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_bandwidth_gbps(nbytes: int = 512_000_000) -> float:
    """Memory read bandwidth as decode sees it: best of 5 BLAS float32 matrix-vector products over a
    matrix far larger than the caches (all threads, like the decode step)."""
    w = np.ones((nbytes // 4 // 1024, 1024), np.float32)
    x = np.ones(1024, np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        w @ x
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _timed(f):
    t = time.perf_counter()
    r = f()
    return time.perf_counter() - t, r


def bench_wasmchord(model_path, device, prompt_lengths, n_gen, progress=None, **backend_options) -> dict:
    from .generate import Sequence, generate_tokens
    from .model import Model
    from .sampling import SamplingParams
    load_s, m = _timed(lambda: Model.load(model_path, device=device, context_length=max(prompt_lengths) + n_gen + 8,
                                         progress=progress, **backend_options))
    s = Sequence(m.transformer)
    # warm-up: a short prompt and two decode steps compile (or load from the disk cache) the kernels
    # of both paths, so that neither a first prefill nor the timed decode pays for it
    list(generate_tokens(s, prompt_ids(m.tokenizer, 8), SamplingParams(temperature=0), max_tokens=3))
    prefill = {}
    for n in prompt_lengths:
        ids = prompt_ids(m.tokenizer, n)
        best = float("inf")
        for _ in range(2):
            s.reset()
            dt, lg = _timed(lambda: m.backend.read(s.prefill(ids)[0]))
            best = min(best, dt)
        prefill[n] = n / best
    ids = prompt_ids(m.tokenizer, min(256, max(prompt_lengths)))
    s.reset()
    stats_gen = generate_tokens(s, ids, SamplingParams(temperature=0), max_tokens=n_gen + 1)
    next(stats_gen)  # prefill and first token
    dt, toks = _timed(lambda: list(stats_gen))
    decode = len(toks) / dt
    out = {"engine": "wasmchord", "backend": m.backend.name, "backend_detail": getattr(m.backend, "describe", str)(),
           "load_s": load_s, "prefill_tok_s": prefill, "decode_tok_s": decode, "peak_rss_mb": peak_rss_mb()}
    wb = weight_bytes_per_token(m)
    if wb:
        out["weight_bytes_per_token"] = wb
    return out


def weight_bytes_per_token(m) -> int | None:
    """Bytes of weights one decode step reads in this backend's representation."""
    tf = m.transformer
    mats = [tf.output] + [w for L in tf.layers for w in (L.wqkv, L.wo, L.w_up, L.w_down)]
    total = 0
    for w in mats:
        nb = getattr(w, "nbytes", None)
        if nb is None:
            return None
        total += nb
    return total


def bench_llama_cpp(model_path, prompt_lengths, n_gen, threads) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    load_s, llm = _timed(lambda: llama_cpp.Llama(model_path=str(model_path), n_ctx=max(prompt_lengths) + n_gen + 8,
                                                n_batch=max(prompt_lengths), n_ubatch=max(prompt_lengths),
                                                n_threads=threads, n_threads_batch=threads, verbose=False))
    from .text.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(model_path)
    prefill = {}
    for n in prompt_lengths:
        ids = prompt_ids(tok, n)
        best = float("inf")
        for _ in range(2):
            llm.reset()
            dt, _ = _timed(lambda: llm.eval(ids))
            best = min(best, dt)
        prefill[n] = n / best
    ids = prompt_ids(tok, min(256, max(prompt_lengths)))
    llm.reset()
    llm.eval(ids)

    n_vocab = llm.n_vocab()

    def decode():  # greedy, reading the last logits straight from llama.cpp's context
        for _ in range(n_gen):
            last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            llm.eval([int(np.argmax(last))])
    dt, _ = _timed(decode)
    return {"engine": "llama.cpp", "version": llama_cpp.__version__, "threads": threads, "load_s": load_s,
            "prefill_tok_s": prefill, "decode_tok_s": n_gen / dt}


def profile_gpu(model_path, *, n_steps=16, timestamp_period_ns=1.0, context=256, **backend_options) -> dict:
    """Where a GPU decode step's time goes: host time to encode and submit a step, wall time per step
    (encode-ahead, as generation runs), the GPU's time for the step's pass (timestamps around it) and
    the idle rest, dispatches per step, and each kernel's time with its GB/s against the device's
    read bandwidth (a saturating WGSL read). `backend_options` go to the GPU backend."""
    from collections import defaultdict

    from .generate import Sequence
    from .model import Model
    m = Model.load(model_path, device="gpu", context_length=context, **backend_options)
    be, s, tf = m.backend, Sequence(m.transformer), m.transformer
    ids = prompt_ids(m.tokenizer, 32)

    def decode(n):  # n encode-ahead steps: (host encode seconds per step, wall seconds per step)
        s.reset()
        logits, _ = s.prefill(ids)
        pos = len(ids)
        pending = be.argmax(logits, defer=True)
        be.collect(pending)
        pending = be.argmax(tf.decode(pos), defer=True)  # the first step: the graph runs and is captured
        enc, t0 = [], time.perf_counter()
        for i in range(1, n + 1):
            t = time.perf_counter()
            ahead = be.argmax(tf.decode(pos + i), defer=True)
            enc.append(time.perf_counter() - t)
            be.collect(pending)
            pending = ahead
        be.collect(pending)
        return enc, (time.perf_counter() - t0) / n

    decode(min(4, n_steps))  # warm-up: pipelines and buffers of the decode path
    enc, wall = decode(n_steps)
    be.enable_profiling("step")
    decode(n_steps)
    steps = be.stream.profile_log[3:]  # after the prefill and the captured step
    host = np.median(np.array(be.stream.host_log[3:]), axis=0) * 1e3
    be.enable_profiling("kernels")
    decode(2)
    log = be.stream.profile_log
    be.enable_profiling(None)
    kernel_steps = 3  # the 2 timed steps and the captured one, each a graph run
    dispatches = max(d for d, _ in steps)
    gpu_step = float(np.median([t for _, t in steps])) * timestamp_period_ns / 1e6
    agg = defaultdict(lambda: [0, 0, 0])
    for label, nb, ticks in log[-dispatches * kernel_steps:]:
        a = agg[label]
        a[0] += ticks * timestamp_period_ns / kernel_steps
        a[1] += nb / kernel_steps
        a[2] += 1 / kernel_steps
    bw = be.stream.read_bandwidth_gbps(timestamp_period_ns=timestamp_period_ns)
    kernels = [{"kernel": k, "calls_per_step": round(c), "ms_per_step": t / 1e6, "weight_MB_per_step": b / 1e6,
                "GBps": (b / t if t and b else None), "fraction_of_read_bw": (b / t / bw if t and b else None)}
               for k, (t, b, c) in sorted(agg.items(), key=lambda kv: -kv[1][0])]
    wb = weight_bytes_per_token(m)
    return {"device": be.device_name, "dispatches_per_step": dispatches,
            "host_encode_ms_per_step": 1e3 * float(np.median(enc)), "wall_ms_per_step": 1e3 * wall,
            "host_ms_parts": dict(zip(("write_and_encoder", "encode", "finish", "submit"), map(float, host))),
            "gpu_ms_per_step": gpu_step, "idle_ms_per_step": max(0.0, 1e3 * wall - gpu_step),
            "kernel_sum_ms_per_step": sum(k["ms_per_step"] for k in kernels), "read_GBps": bw,
            "weight_MB_per_token": wb / 1e6, "roofline_tok_s": bw * 1e9 / wb,
            "timestamp_period_ns": timestamp_period_ns, "kernels": kernels}


def format_profile(p: dict) -> str:
    lines = [f"profile on {p['device']}: {p['dispatches_per_step']} dispatches per decode step; per step: wall "
             f"{p['wall_ms_per_step']:.3f} ms, GPU pass {p['gpu_ms_per_step']:.3f} ms, GPU idle "
             f"{p['idle_ms_per_step']:.3f} ms, host encode {p['host_encode_ms_per_step']:.3f} ms ("
             + ", ".join(f"{k} {v:.3f}" for k, v in p["host_ms_parts"].items()) + ")",
             f"read bandwidth (WGSL read kernel) {p['read_GBps']:.0f} GB/s; {p['weight_MB_per_token']:.1f} MB of "
             f"weights per token -> roofline {p['roofline_tok_s']:.0f} tok/s (timestamps at "
             f"{p['timestamp_period_ns']:g} ns/tick)",
             f"kernels, each in a timed pass of its own (sum {p['kernel_sum_ms_per_step']:.3f} ms per step):",
             f"  {'kernel':<34}{'calls':>6}{'ms/step':>10}{'us/call':>9}{'weight MB':>11}{'GB/s':>8}{'of read':>9}"]
    for k in p["kernels"]:
        gb = f"{k['GBps']:.1f}" if k["GBps"] else ""
        fr = f"{100 * k['fraction_of_read_bw']:.0f}%" if k["fraction_of_read_bw"] else ""
        lines.append(f"  {k['kernel']:<34}{k['calls_per_step']:>6}{k['ms_per_step']:>10.3f}"
                     f"{1e3 * k['ms_per_step'] / max(k['calls_per_step'], 1):>9.1f}"
                     f"{k['weight_MB_per_step']:>11.1f}{gb:>8}{fr:>9}")
    return "\n".join(lines)


def batch_sweep(model_path, *, device="cpu", batches=(1, 2, 4, 8, 16), n_gen=48, prompt_len=32, progress=None,
                temperature=0.0, **backend_options) -> dict:
    """The batch engine at each batch size B: B different prompts generating `n_gen` tokens each
    (greedy) as one batch, against the same prompts run one by one in the same run: aggregate tok/s,
    the speedup, each sequence's inter-token latency, and the KV cache the slots take. Every batch
    size runs a few tokens first, untimed (kernels compiled, GPU steps captured). `temperature` > 0
    samples instead (prompt i with seed i, both ways); "same tokens" then compares nothing (None): a
    single sequence and the engine may draw differently (README, sampling on the GPU)."""
    from .engine import Engine
    from .model import Model
    top = max(batches)
    m = Model.load(model_path, device=device, context_length=prompt_len + n_gen + 8, slots=top, progress=progress,
                   **backend_options)
    words = m.tokenizer.encode(TEXT * (top // 4 + prompt_len // 40 + 2), add_bos=False)
    bos = [m.tokenizer.bos_id] if m.tokenizer.bos_id is not None else []
    prompts = [bos + words[5 * i:5 * i + prompt_len - len(bos)] for i in range(top)]  # all different
    m.generate(prompts[0], max_tokens=3, temperature=temperature)  # warm-up: kernels compiled, steps captured
    for b in batches:
        eng = Engine(m, max_queue=b)
        eng.run([r for p in prompts[:b] for r in eng.submit(p, max_tokens=3, temperature=temperature)])
    rows = []
    for b in batches:
        ps = prompts[:b]
        t = time.perf_counter()
        alone = [m.generate(p, max_tokens=n_gen, temperature=temperature, seed=i) for i, p in enumerate(ps)]
        one_s = time.perf_counter() - t
        eng = Engine(m, max_queue=b)
        reqs = [r for i, p in enumerate(ps) for r in eng.submit(p, max_tokens=n_gen, temperature=temperature, seed=i)]
        t = time.perf_counter()
        eng.run(reqs)
        batch_s = time.perf_counter() - t
        n = sum(len(r.tokens) for r in reqs)
        itl = [(r.finished_at - r.first_token_at) / (len(r.tokens) - 1) for r in reqs if len(r.tokens) > 1]
        rows.append({"batch": b, "tokens": n, "batch_s": batch_s, "one_by_one_s": one_s,
                     "aggregate_tok_s": n / batch_s, "one_by_one_tok_s": sum(c.completion_tokens for c in alone) / one_s,
                     "speedup": one_s / batch_s, "inter_token_ms": 1e3 * float(np.median(itl)) if itl else None,
                     "same_tokens": [r.tokens for r in reqs] == [c.tokens for c in alone] if not temperature else None})
    return {"model": str(model_path), "backend": m.backend.name, "backend_detail": m.backend.describe(),
            "temperature": temperature, "slots": top, "kv_cache_MB": m.load_stats.kv_cache_bytes / 1e6,
            "n_gen": n_gen, "prompt_len": prompt_len, "peak_rss_mb": peak_rss_mb(), "rows": rows}


def format_sweep(res: dict) -> str:
    lines = [f"model: {res['model']}", f"backend: {res['backend_detail']}",
             f"batch engine, {res['prompt_len']}-token prompts, {res['n_gen']} new tokens each ("
             + (f"temperature {res['temperature']:g}" if res.get("temperature") else "greedy") + "); KV cache "
             f"{res['slots']} slots = {res['kv_cache_MB']:.1f} MB; peak RSS {res['peak_rss_mb']:.0f} MB",
             f"{'B':>4}{'tokens':>8}{'batch s':>9}{'1-by-1 s':>10}{'agg tok/s':>11}{'speedup':>9}{'ITL ms':>8}"
             f"{'same tokens':>13}"]
    for r in res["rows"]:
        itl = f"{r['inter_token_ms']:.1f}" if r["inter_token_ms"] else ""
        lines.append(f"{r['batch']:>4}{r['tokens']:>8}{r['batch_s']:>9.2f}{r['one_by_one_s']:>10.2f}"
                     f"{r['aggregate_tok_s']:>11.1f}{r['speedup']:>8.2f}x{itl:>8}"
                     f"{'-' if r['same_tokens'] is None else str(r['same_tokens']):>13}")
    return "\n".join(lines)


def run(model_path, *, device="cpu", prompt_lengths=(64, 256, 1024), n_gen=128, llama_cpp="auto",
        progress=None, profile=False, profile_steps=16, timestamp_period_ns=1.0, **backend_options) -> dict:
    """Benchmark wasmchord (and llama.cpp when available and not disabled) on one model."""
    threads = os.cpu_count() or 1
    ours = bench_wasmchord(model_path, device, prompt_lengths, n_gen, progress=progress, **backend_options)
    res = {"model": str(model_path), "machine": {"cpu": platform.processor() or platform.machine(),
                                                 "cores": threads, "python": platform.python_version()},
           "wasmchord": ours}
    if ours.get("weight_bytes_per_token") and ours["backend"] == "cpu":
        bw = read_bandwidth_gbps()
        roof = bw * 1e9 / ours["weight_bytes_per_token"]
        res["roofline"] = {"read_bandwidth_GBps": bw, "weight_MB_per_token": ours["weight_bytes_per_token"] / 1e6,
                           "decode_roofline_tok_s": roof, "decode_fraction_of_roofline": ours["decode_tok_s"] / roof}
    if profile:
        if device != "gpu":
            from .errors import BackendError
            raise BackendError("--profile times GPU kernels: use it with --backend gpu")
        res["profile"] = profile_gpu(model_path, n_steps=profile_steps, timestamp_period_ns=timestamp_period_ns,
                                     **backend_options)
    ref = bench_llama_cpp(model_path, prompt_lengths, n_gen, threads) if llama_cpp != "off" else None
    if ref:
        res["llama_cpp"] = ref
        res["ratios"] = {"load": ref["load_s"] / ours["load_s"],
                         "decode": ours["decode_tok_s"] / ref["decode_tok_s"],
                         **{f"prefill_{n}": ours["prefill_tok_s"][n] / ref["prefill_tok_s"][n] for n in prompt_lengths}}
    return res


def format_result(res: dict) -> str:
    o = res["wasmchord"]
    lines = [f"model: {res['model']}", f"backend: {o['backend_detail']}",
             f"{'':<22}{'wasmchord':>12}" + (f"{'llama.cpp':>12}{'ratio':>8}" if "llama_cpp" in res else "")]
    ref, r = res.get("llama_cpp"), res.get("ratios", {})

    def row(name, ours, theirs=None, ratio=None, fmt="{:.1f}"):
        s = f"{name:<22}{fmt.format(ours):>12}"
        if theirs is not None:
            s += f"{fmt.format(theirs):>12}{ratio:>7.2f}x"
        return s
    lines.append(row("load (s)", o["load_s"], ref and ref["load_s"], r.get("load"), "{:.2f}"))
    for n, v in o["prefill_tok_s"].items():
        lines.append(row(f"prefill {n} (tok/s)", v, ref and ref["prefill_tok_s"][n], r.get(f"prefill_{n}")))
    lines.append(row("decode (tok/s)", o["decode_tok_s"], ref and ref["decode_tok_s"], r.get("decode")))
    lines.append(f"{'peak RSS (MB)':<22}{o['peak_rss_mb']:>12.0f}")
    if "profile" in res:
        lines.append(format_profile(res["profile"]))
    if "roofline" in res:
        rf = res["roofline"]
        lines.append(f"roofline: {rf['weight_MB_per_token']:.0f} MB of weights per token / {rf['read_bandwidth_GBps']:.1f} GB/s "
                     f"read = {rf['decode_roofline_tok_s']:.0f} tok/s; decode reaches {100 * rf['decode_fraction_of_roofline']:.0f}%")
    return "\n".join(lines)

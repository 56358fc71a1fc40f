"""Benchmark the CPU backend's compiled kernels on random blocks of every type: one-token matrix-vector
products (GB/s of weights read) on 1 and all threads, the float32 tile decoding of prefill, and the
memory read bandwidth of a BLAS float32 matrix-vector product measured in the same run. With
--tokens N: instead the several-token products of N tokens (GFLOP/s, the activations' quantization
included) with float32 activations and, where the CPU has AVX-512 VNNI or AVX2, int16 and int8 ones
(`matmul_int`, or `matmul_int16` without VNNI).

    python tools/bench_cpu_kernels.py [--types Q4_K,Q6_K] [--shape 8960x1536] [--repeats 30] [--json FILE]
    python tools/bench_cpu_kernels.py --tokens 256 --shape 1536x1536 [--threads 1]
    python tools/bench_cpu_kernels.py --tokens 8 --shape 3072x576 --types Q4_1 --against /path/to/other/checkout

--against DIR (with --tokens) also times another checkout's kernels on the same blocks and activations,
its package imported under another name from a copy of its sources (in the temporary directory, kept per
content: the first run compiles its kernels), a call of each in turn (this machine's noise moves both
together): each mode's GFLOP/s for both, and this checkout's time over the other's.

Kernels compile on first use (cached on disk afterwards); the first call of each is not timed.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def best(f, repeats):
    f()
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - t0)
    return t


def alternate(f, g, repeats):
    """Best seconds of f and of g, called in turn."""
    f(), g()
    tf = tg = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        t1 = time.perf_counter()
        g()
        tf, tg = min(tf, t1 - t0), min(tg, time.perf_counter() - t1)
    return tf, tg


def other_package(root: Path):
    """The `wasmchord` package of the checkout at `root`, imported as `wasmchord_against` from a copy of
    its sources (it imports its own modules relatively). A copy, not the checkout itself: numba caches a
    kernel beside its source file, and an entry compiled under the other name would be loaded later by
    the checkout's own `wasmchord`, which could not resolve that name. The copy is kept per content (a
    temporary directory named by a hash of the sources), so its compiled kernels are reused next time."""
    import hashlib
    import importlib.util
    import shutil
    import tempfile
    src = root / "wasmchord"
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"--against {root}: no wasmchord/__init__.py there (expected a checkout's root)")
    digest = hashlib.sha256()
    for f in sorted(src.rglob("*.py")):
        digest.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())
    copy = Path(tempfile.gettempdir()) / "wasmchord-against" / digest.hexdigest()[:16] / "wasmchord_against"
    if not copy.is_dir():
        tmp = copy.with_name(f"partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        try:
            tmp.rename(copy)
        except OSError:  # another run made it first
            shutil.rmtree(tmp, ignore_errors=True)
    spec = importlib.util.spec_from_file_location("wasmchord_against", copy / "__init__.py",
                                                  submodule_search_locations=[str(copy)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["wasmchord_against"] = module
    spec.loader.exec_module(module)
    return (importlib.import_module("wasmchord_against.backends.base"),
            importlib.import_module("wasmchord_against.backends.quantized"))


def main():
    import numba

    from test_quants import random_raw
    from wasmchord.backends import cpu_kernels as K
    from wasmchord.backends.base import WeightSource
    from wasmchord.backends.quantized import QuantMatrix
    from wasmchord.bench import read_bandwidth_gbps
    from wasmchord.formats.quants import ggml_type

    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=",".join(sorted(K.KERNEL_TYPES)))
    ap.add_argument("--shape", default="8960x1536", help="rows x k")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tokens", type=int, help="time several-token products of this many tokens instead")
    ap.add_argument("--threads", type=int, help="numba threads for --tokens (default: all)")
    ap.add_argument("--against", type=Path, help="with --tokens: also time the checkout at this path, alternating")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.against and not a.tokens:
        ap.error("--against needs --tokens")
    rows, k = map(int, a.shape.split("x"))
    threads = numba.config.NUMBA_NUM_THREADS
    rng, results = np.random.default_rng(0), []
    if a.tokens:
        numba.set_num_threads(a.threads or threads)
        modes = ["f32", "int16", "int8"] if K.HAS_VNNI or K.HAS_AVX2 else ["f32"]
        print(f"{rows} x {k}, {a.tokens} tokens, {a.threads or threads} threads; GFLOP/s, min of {a.repeats} runs")
        against = other_package(a.against) if a.against else None
        if against:
            print(f"against {a.against}: each mode as this checkout / that one's GFLOP/s (this one's time / "
                  "that one's)")
        print(f"{'type':<6}" + "".join(f"{m:>9}" if not against else f"{m:>26}" for m in modes))
        flop = 2 * rows * k * a.tokens
        for name in a.types.split(","):
            t = ggml_type(name)
            raw = random_raw(t, (rows, k), rng)
            W = QuantMatrix([WeightSource("w", raw, t, (rows, k))])
            V = against[1].QuantMatrix([against[0].WeightSource("w", raw, t, (rows, k))]) if against else None
            x = rng.standard_normal((a.tokens, k)).astype(np.float32)
            speeds, cells = {}, {}
            for mode in modes:
                if mode != "f32" and name not in K.INT_TYPES:
                    continue
                W.activations = mode
                if V is None:
                    speeds[mode] = flop / best(lambda: W.matmul(x, np.empty(1, np.float32)), a.repeats) / 1e9
                    cells[mode] = f"{speeds[mode]:>9.0f}"
                    continue
                V.activations = mode
                tw, tv = alternate(lambda: W.matmul(x, np.empty(1, np.float32)),
                                   lambda: V.matmul(x, np.empty(1, np.float32)), a.repeats)
                speeds[mode], speeds[f"{mode}_against"] = flop / tw / 1e9, flop / tv / 1e9
                cells[mode] = f"{f'{flop / tw / 1e9:.0f} / {flop / tv / 1e9:.0f} ({tw / tv:.2f}x)':>26}"
            results.append({"type": name, **{f"GFLOPs_{m}": v for m, v in speeds.items()}})
            print(f"{name:<6}" + "".join(cells.get(m, f"{'-':>{26 if against else 9}}") for m in modes))
        if a.json:
            Path(a.json).write_text(json.dumps({"shape": [rows, k], "tokens": a.tokens, "threads": a.threads or threads,
                                                "kernels": results}, indent=1))
        return
    print(f"{rows} x {k}, {os.cpu_count()} cores; matvec GB/s of weights read, min of {a.repeats} runs")
    print(f"{'type':<6}{'MB':>7}{'1 thread':>10}{f'{threads} threads':>11}{'tile f32 GB/s':>15}")
    for name in a.types.split(","):
        t = ggml_type(name)
        raw = random_raw(t, (rows, k), rng)
        (run,) = QuantMatrix([WeightSource("w", raw, t, (rows, k))]).runs
        x = rng.standard_normal(k).astype(np.float32)
        out = np.empty(run.t.shape[0] * K.R, np.float32)
        tile = np.empty((k, 16 * K.R), np.float32)
        speeds = {}
        for n in (1, threads):
            numba.set_num_threads(n)
            speeds[n] = raw.nbytes / best(lambda: K.matvec(run.marker, run.t, run.block, x, out), a.repeats) / 1e9
        tile_gbps = tile.nbytes / best(lambda: K.dequantize(run.marker, run.t, 0, tile), a.repeats) / 1e9
        results.append({"type": name, "MB": raw.nbytes / 1e6, "matvec_GBps_1": speeds[1],
                        f"matvec_GBps_{threads}": speeds[threads], "tile_f32_GBps": tile_gbps})
        print(f"{name:<6}{raw.nbytes / 1e6:>7.1f}{speeds[1]:>10.1f}{speeds[threads]:>11.1f}{tile_gbps:>15.1f}")
    bw = read_bandwidth_gbps()
    print(f"read bandwidth (BLAS float32 matrix-vector product over 512 MB): {bw:.1f} GB/s")
    if a.json:
        Path(a.json).write_text(json.dumps({"shape": [rows, k], "threads": threads, "read_GBps": bw,
                                            "kernels": results}, indent=1))


if __name__ == "__main__":
    main()

"""Where the GPU's time goes in a prompt (prefill of n tokens) and in a batched decode step (B
sequences, the batch engine's step): the GPU time of the whole pass (timestamps around it, median of
`--repeats`), then each kernel's total time and calls with every dispatch in a timed pass of its own
(which adds a few us per dispatch). For a real GPU; on lavapipe the figures are not GPU speeds.

    python tools/gpu_forward_profile.py MODEL [--prefill 64,512] [--batch 4,16] [--repeats 3]
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wasmchord import Model  # noqa: E402
from wasmchord.hub import resolve_model  # noqa: E402


def profile(be, run, repeats: int):
    """(median GPU ms of the pass, [(label, calls, total ms)] with each dispatch timed alone)."""
    run()  # warm-up: pipelines compiled, buffers sized
    be.enable_profiling("step")
    for _ in range(repeats):
        run()
    passes = [t for _, t in be.stream.profile_log]
    be.enable_profiling("kernels")
    run()
    per = defaultdict(lambda: [0, 0])
    for label, _, t in be.stream.profile_log:
        per[label][0] += 1
        per[label][1] += t
    be.enable_profiling(None)
    kernels = sorted(((k, c, t * 1e-6) for k, (c, t) in per.items()), key=lambda r: -r[2])
    return float(np.median(passes)) * 1e-6, kernels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prefill", default="64,512")
    ap.add_argument("--batch", default="4,16")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    prefill = [int(n) for n in a.prefill.split(",") if n]
    batch = [int(b) for b in a.batch.split(",") if b]
    m = Model.load(resolve_model(a.model), device="gpu", context_length=max(prefill + [64]) + 8,
                   slots=max(batch + [1]))
    be, tf = m.backend, m.transformer
    print(f"{a.model} on {be.describe()}")
    rng = np.random.default_rng(0)
    cases = []
    for n in prefill:
        ids = rng.integers(100, 1000, n)
        cases.append((f"prefill {n} tokens", lambda ids=ids: be.read(tf.forward(ids, 0))))
    for b in batch:
        cases.append((f"batched decode step, B = {b}",
                      lambda b=b: be.read(tf.forward_batch([100 + i for i in range(b)], [40] * b, list(range(b))))))
    for name, run in cases:
        gpu_ms, kernels = profile(be, run, a.repeats)
        total = sum(t for _, _, t in kernels)
        print(f"\n{name}: GPU pass {gpu_ms:.2f} ms; {sum(c for _, c, _ in kernels)} dispatches, "
              f"{total:.2f} ms timed one by one")
        for label, calls, t in kernels[:12]:
            print(f"  {label:<34}{calls:>6}{t:>10.3f} ms{1e3 * t / calls:>10.1f} us/call")


if __name__ == "__main__":
    main()

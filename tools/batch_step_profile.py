"""Where a batched decode step goes on the CPU: the engine's step time for one sequence and for B, the time of
the several-token kernel inside the B step (`cpu_kernels.matmul`, `matmul_int` or `matmul_int16`: the one the
activations and the CPU choose), and OpenBLAS's sgemm peak on
2048 x 2048 float32 matrices measured in the same process, alternating, so that a noisy machine moves all
of them together.

    python tools/batch_step_profile.py [MODEL] [--batch 8] [--repeats 3] [--steps 30]

Prints one line per repeat.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def main():
    import wasmchord
    from wasmchord.backends import cpu_kernels as K
    from wasmchord.engine import Engine

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()

    kernel = [0.0, 0]  # seconds, floating-point operations (padding tokens included)

    def timed(real, xi):
        def run(*args):
            t0 = time.perf_counter()
            real(*args)
            kernel[0] += time.perf_counter() - t0
            x, out = args[xi], args[-1]
            kernel[1] += 2 * x.shape[0] * x.shape[1] * out.shape[1]
        return run
    # the several-token kernels (QuantMatrix looks them up on the module at each call), their activations' place
    for name, xi in (("matmul", 3), ("matmul_int", 4), ("matmul_int16", 4)):
        setattr(K, name, timed(getattr(K, name), xi))

    m = wasmchord.Model.load(a.model, device="cpu", slots=a.batch, context_length=256)
    words = m.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40, add_bos=False)
    print(f"model {a.model}; B = {a.batch}; {a.steps} steps per figure; 32-token prompts, greedy")
    for rep in range(a.repeats):
        steps = {}
        for b in (1, a.batch):
            eng = Engine(m, max_queue=b)
            for i in range(b):
                eng.submit(words[5 * i:5 * i + 32], max_tokens=a.steps + 2 * b + 8, temperature=0)
            for _ in range(2 * b + 3):  # the prompts, and a few steps
                eng.step()
            kernel[:] = [0.0, 0]
            t0 = time.perf_counter()
            for _ in range(a.steps):
                eng.step()
            step_ms = (time.perf_counter() - t0) / a.steps * 1e3
            steps[b] = (step_ms, kernel[0] / a.steps * 1e3, kernel[1] / max(kernel[0], 1e-9))
        peak = sgemm_gflops()
        s1, sb, (kb, rate) = steps[1][0], steps[a.batch][0], steps[a.batch][1:]
        print(f"repeat {rep + 1}: step B = 1 {s1:.1f} ms, B = {a.batch} {sb:.1f} ms, of which the several-token "
              f"kernels {kb:.1f} ms ({rate / 1e9:.0f} GFLOP/s); sgemm 2048^3 {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()

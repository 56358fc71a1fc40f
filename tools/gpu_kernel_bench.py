"""Time the GPU's matrix kernels alone on the shapes of the real models: the decode matvec with each
lanes-per-row choice, and the prefill matmul at 512 tokens (TFLOP/s), against the device's read
bandwidth measured in the same run. Random weights of the real types (speed depends on shapes and
types, not values). Prints a table; writes JSON with --json.

    python tools/gpu_kernel_bench.py [--reps 20] [--json out.json]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wasmchord.backends.base import WeightSource  # noqa: E402
from wasmchord.backends.webgpu import GTensor, WgpuBackend  # noqa: E402
from wasmchord.formats.quants import ggml_type  # noqa: E402

# (model, matrix, rows, k, GGUF type)
SHAPES = [
    ("smollm2", "attn_qkv", 960, 576, "Q4_1"), ("smollm2", "attn_output", 576, 576, "Q4_1"),
    ("smollm2", "ffn_gate_up", 3072, 576, "Q4_1"), ("smollm2", "ffn_down", 576, 1536, "Q4_1"),
    ("smollm2", "output", 49152, 576, "Q8_0"),
    ("qwen2.5-1.5b", "attn_qkv", 2048, 1536, "Q4_K"), ("qwen2.5-1.5b", "attn_output", 1536, 1536, "Q4_K"),
    ("qwen2.5-1.5b", "ffn_gate_up", 17920, 1536, "Q4_K"), ("qwen2.5-1.5b", "ffn_down", 1536, 8960, "Q6_K"),
    ("qwen2.5-1.5b", "output", 151936, 1536, "Q6_K"),
]
# Every other weight type on Qwen2.5's largest layer matrix (`--shapes types`)
TYPES = ["Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q5_K", "IQ4_NL", "IQ4_XS"]
TYPE_SHAPES = [("types", "ffn_gate_up", 17920, 1536, t) for t in TYPES]
# float16 scale fields (offset, value) set to sane values; the other bytes stay random
SCALES = {"Q8_0": [(0, 0.004)], "Q4_0": [(0, 0.008)], "Q4_1": [(0, 0.008), (2, -0.06)], "Q5_0": [(0, 0.004)],
          "Q5_1": [(0, 0.004), (2, -0.06)], "Q4_K": [(0, 0.0004), (2, 0.0004)], "Q5_K": [(0, 0.0004), (2, 0.0004)],
          "Q2_K": [(80, 0.0004), (82, 0.0004)], "Q3_K": [(108, 0.0004)], "Q6_K": [(208, 0.0004)],
          "IQ4_NL": [(0, 0.004)], "IQ4_XS": [(0, 0.004)]}
IN_PASS = 50  # matvecs recorded back to back in one timed pass (each depends on the one before)


def random_weight(name, rows, k, rng) -> WeightSource:
    t = ggml_type(name)
    nb = k // t.block_size
    raw = rng.integers(0, 256, size=(rows, nb, t.type_size), dtype=np.uint8)
    for off, val in SCALES.get(name, []):
        raw[:, :, off:off + 2] = np.frombuffer(np.float16(val).tobytes(), np.uint8)
    return WeightSource(name, raw.reshape(-1), t, (rows, k))


def time_op(be, f, reps) -> float:
    """Median seconds of the dispatches `f` records, each in a timed pass."""
    be.enable_profiling("kernels")
    for _ in range(reps):
        be.begin_forward()
        f()
        be.stream.flush()
    ticks = [t for _, _, t in be.stream.profile_log]
    be.enable_profiling(None)
    per = len(ticks) // reps
    return float(np.median([sum(ticks[i * per:(i + 1) * per]) for i in range(1, reps)])) * 1e-9


def time_in_pass(be, f, reps) -> float:
    """Median seconds per call of `f` with IN_PASS calls in one timed compute pass: what a call costs
    inside a decode step, where the dispatches share one pass (no pass of its own around each). The
    calls must depend on each other (as a step's do), or the GPU may overlap them."""
    be.enable_profiling("step")
    for _ in range(reps):
        be.begin_forward()
        for _ in range(IN_PASS):
            f()
        be.stream.flush()
    ticks = [t for _, t in be.stream.profile_log[1:]]
    be.enable_profiling(None)
    return float(np.median(ticks)) * 1e-9 / IN_PASS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--shader-checks", default="none", help="naga runtime checks: all, bounds or none (the backend default: none)")
    ap.add_argument("--shapes", default="models", choices=["models", "types", "all"],
                    help="the real models' matrices, every other weight type on one shape, or both")
    ap.add_argument("--types", help="comma-separated weight types for --shapes types, in this order (default: all)")
    a = ap.parse_args()
    types = [("types", "ffn_gate_up", 17920, 1536, t) for t in a.types.split(",")] if a.types else TYPE_SHAPES
    shapes = {"models": SHAPES, "types": types, "all": SHAPES + types}[a.shapes]
    be, rng = WgpuBackend(shader_checks=a.shader_checks), np.random.default_rng(0)
    bw = be.stream.read_bandwidth_gbps()
    print(f"{be.describe()}, shader checks: {a.shader_checks}\nread bandwidth (WGSL read kernel): {bw:.0f} GB/s")
    rows_out = []
    print(f"{'model':<14}{'matrix':<13}{'shape':>14}{'type':>6}{'MB':>7}  matvec us (lanes 8/16/32/64, auto)"
          f"   best GB/s  of read   in one pass us   matmul n=512 TFLOP/s")
    for model, mat, rows, k, t in shapes:
        W = be.load_matrix([random_weight(t, rows, k, rng)])
        x1 = be.load_vector(rng.standard_normal((1, k)).astype(np.float32))
        x1 = GTensor(x1.buf, 0, (1, k))
        xn = be.load_vector(rng.standard_normal((512, k)).astype(np.float32))
        xn = GTensor(xn.buf, 0, (512, k))
        times = {}
        for lanes in (8, 16, 32, 64, None):
            be.matvec_lanes = lanes
            times[lanes or "auto"] = time_op(be, lambda: be.matmul(x1, W), a.reps)
        be.matvec_lanes = None
        sweep = {}
        for rt in (1, 2, 4):  # rows per lane group, each with lanes 16/32/64
            for lanes in (16, 32, 64):
                be.matvec_rows, be.matvec_lanes = rt, lanes
                sweep[f"rt{rt}/l{lanes}"] = time_op(be, lambda: be.matmul(x1, W), a.reps) * 1e6
        be.matvec_rows = be.matvec_lanes = None
        acc = be.load_vector(rng.standard_normal((1, rows)).astype(np.float32))
        acc = GTensor(acc.buf, 0, (1, rows))  # each call adds into it: the calls depend on each other
        in_pass = time_in_pass(be, lambda: be.matmul(x1, W, residual=acc), max(3, a.reps // 4))
        mm = time_op(be, lambda: be.matmul(xn, W), max(3, a.reps // 4))
        best = min(times.values())
        r = dict(model=model, matrix=mat, rows=rows, k=k, type=t, MB=W.nbytes / 1e6,
                 matvec_us={str(kk): v * 1e6 for kk, v in times.items()}, best_GBps=W.nbytes / best / 1e9,
                 sweep_us=sweep, in_pass_us=in_pass * 1e6,
                 matmul512_TFLOPs=2 * 512 * rows * k / mm / 1e12)
        rows_out.append(r)
        us = "/".join(f"{v * 1e6:.1f}" for v in times.values())
        print(f"{model:<14}{mat:<13}{f'{rows}x{k}':>14}{t:>6}{r['MB']:>7.1f}  {us:<40}{r['best_GBps']:>8.0f}"
              f"{100 * r['best_GBps'] / bw:>8.0f}%{in_pass * 1e6:>12.1f}{r['matmul512_TFLOPs']:>14.2f}", flush=True)
        print("    rows x lanes sweep (us): " + "  ".join(f"{k} {v:.1f}" for k, v in sweep.items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": be.describe(), "shader_checks": a.shader_checks, "read_GBps": bw,
                                            "shapes": rows_out}, indent=1))


if __name__ == "__main__":
    main()

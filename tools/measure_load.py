"""Load time and host memory of loading a model, per backend: how much the process holds once a model
is loaded (peak RSS during the load, RSS after it, the model file's pages still resident) and the
weights' size on the backend. Each backend loads in a process of its own, so the peaks do not mix.

    python tools/measure_load.py qwen2.5-coder-1.5b-instruct --backends cpu,gpu
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _status_gb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1e6
    return float("nan")


def measure(model: str, device: str) -> dict:
    import wasmchord
    from test_loading import mapped_rss
    t0 = time.perf_counter()
    m = wasmchord.Model.load(model, device=device, context_length=256)
    load_s = time.perf_counter() - t0
    tf = m.transformer
    mats = [tf.tok_embd] + ([] if tf.tied else [tf.output]) + [w for L in tf.layers
                                                               for w in (L.wqkv, L.wo, L.w_up, L.w_down)]
    nbytes = sum(getattr(w, "nbytes", 0) for w in mats)  # NumPy arrays; GPU matrices: quant words + scales
    return {"device": device, "backend": m.backend.describe(), "load_s": round(load_s, 1),
            "file_gb": round(m.gguf.path.stat().st_size / 1e9, 2), "weights_on_backend_gb": round(nbytes / 1e9, 2),
            "peak_rss_gb": round(_status_gb("VmHWM"), 2), "rss_after_load_gb": round(_status_gb("VmRSS"), 2),
            "file_pages_resident_mb": round(mapped_rss(m.gguf.path) / 1e6, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--backends", default="cpu,gpu")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(measure(a.model, a.worker)))
        return
    for dev in a.backends.split(","):
        r = subprocess.run([sys.executable, __file__, a.model, "--worker", dev], capture_output=True, text=True)
        print(r.stdout.strip().splitlines()[-1] if r.returncode == 0 else f"{dev}: failed: {r.stderr[-2000:]}")


if __name__ == "__main__":
    main()

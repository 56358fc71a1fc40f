"""Benchmark: dequantize every tensor of a model to float32 (wasmchord vs gguf-py), seconds and GB/s.

    python tools/bench_dequant.py [MODEL ...]      (paths or aliases; default: both known models)
"""

import argparse
import json
import time

import numpy as np

from wasmchord.formats.gguf import GGUFFile
from wasmchord.hub import KNOWN_MODELS, resolve_model


def bench(path, repeats=3):
    gf = GGUFFile(path)
    names = list(gf.tensors)
    for n in names:  # warm the page cache
        gf.tensor_bytes(n).sum()
    ours = []
    for _ in range(repeats):
        t = time.perf_counter()
        out_bytes = sum(gf.dequantize(n).nbytes for n in names)
        ours.append(time.perf_counter() - t)
    import gguf
    reader = gguf.GGUFReader(str(path))
    t = time.perf_counter()
    for ti in reader.tensors:
        np.asarray(gguf.quants.dequantize(ti.data, ti.tensor_type), dtype=np.float32)
    ref = time.perf_counter() - t
    return {"model": str(path), "tensors": len(names), "f32_bytes": out_bytes,
            "wasmchord_s": min(ours), "gguf_py_s": ref, "speedup": ref / min(ours),
            "output_GBps": out_bytes / min(ours) / 1e9}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=list(KNOWN_MODELS))
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    rows = [bench(resolve_model(m)) for m in a.models]
    for r in rows:
        print(f"{r['model']}: {r['tensors']} tensors, {r['f32_bytes'] / 1e6:.0f} MB f32 in {r['wasmchord_s']:.3f} s "
              f"({r['output_GBps']:.2f} GB/s); gguf-py {r['gguf_py_s']:.2f} s ({r['speedup']:.1f}x slower)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""GPU against the exact NumPy backend on one model, and a GPU batch against its prompts one by one:
for a real GPU's driver (tools/gpu_device_run.sh), where a model may have random weights of the real
shapes (then the prompts are token ids, not text). Prints one line per check and exits non-zero when
one fails.

    python tools/gpu_parity.py MODEL.gguf [--gen 16] [--batch 4]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import wasmchord  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    rng = np.random.default_rng()
    t = time.time()
    gpu = wasmchord.Model.load(a.model, device="gpu", context_length=512, slots=a.batch)
    ref = wasmchord.Model.load(a.model, device="cpu", weights="f32", context_length=512)
    vocab = gpu.config.vocab_size
    print(f"{Path(a.model).name}: loaded both in {time.time() - t:.1f} s on {gpu.backend.describe()}")
    ids = [int(i) for i in rng.integers(100, min(vocab, 30000), 32)]
    lg, lr = gpu.logits(ids), ref.logits(ids)  # [32, vocab]
    err = float(np.abs(lg - lr).max() / np.abs(lr).max())
    agree = float((lg.argmax(1) == lr.argmax(1)).mean())
    g, r = (m.generate(ids, max_tokens=a.gen, temperature=0).tokens for m in (gpu, ref))
    ok_logits = err < 1e-4 and np.isfinite(lg).all()
    print(f"  logits vs exact NumPy: max error {err:.2e} of the scale, argmax agree {agree:.3f}, "
          f"greedy {len(g)} tokens identical {g == r}")
    prompts = [[int(i) for i in rng.integers(100, min(vocab, 30000), n)] for n in (5, 17, 40, 9, 23, 31, 12, 8)[:a.batch]]
    batch = [c.tokens for c in gpu.generate(prompts, max_tokens=a.gen, temperature=0)]
    alone = [gpu.generate(p, max_tokens=a.gen, temperature=0).tokens for p in prompts]
    same = sum(b == s for b, s in zip(batch, alone))
    print(f"  GPU batch of {len(prompts)} greedy = one by one: {same}/{len(prompts)}")
    sys.exit(0 if ok_logits and g == r and same == len(prompts) else 1)


if __name__ == "__main__":
    main()

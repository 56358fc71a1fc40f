"""Record golden outputs of both real models on both backends: logits digests and greedy/seeded tokens.

tests/test_golden.py holds later code to them bit for bit, so a change meant to preserve behaviour
(a refactor) cannot move a single logit. A change that is meant to move them (a kernel that sums in
another order) re-records the backend it changes and says so in its commit.

    python tools/record_golden.py [--backends cpu,gpu] [--out tests/fixtures/golden.json]
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = ("smollm2-135m-instruct", "gemma3-270m")
PROMPT = "The history of the printing press begins"


def key(alias: str, device: str) -> str:
    """The recording's key. CPU recordings (weights="f32": NumPy's BLAS) also name OpenBLAS's kernel
    family (Haswell, SkylakeX, ...), whose sgemm sums in its own order; the key without it holds the
    first recording, made on an AVX-512 machine, and is used where no family's own recording exists."""
    if device != "cpu":
        return f"{alias}/{device}"
    from threadpoolctl import threadpool_info
    arch = next((i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"), None)
    return f"{alias}/cpu/{arch}" if arch else f"{alias}/cpu"


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def record(alias: str, device: str) -> dict:
    """What the golden test compares: every logit of a prompt (as a digest, plus the last row's top 8 for
    a readable failure), a greedy continuation (decode path: encode-ahead, replay on the GPU) and a
    seeded sampled one (the backend's sampler)."""
    import wasmchord
    options = {"weights": "f32"} if device == "cpu" else {}  # the exact float32 reference
    m = wasmchord.Model.load(alias, device=device, context_length=96, **options)
    ids = m.tokenizer.encode(PROMPT)
    lg = m.logits(ids)                                                   # [n, vocab]
    top = np.argsort(-lg[-1], kind="stable")[:8]
    greedy = m.generate(ids, max_tokens=10, temperature=0).tokens
    sampled = m.generate(ids, max_tokens=6, temperature=0.9, top_k=20, top_p=1.0, seed=7).tokens
    return {"ids": ids, "logits_sha256": digest(lg), "last_top_ids": top.tolist(),
            "last_top_values": [float(v) for v in lg[-1][top]], "greedy": greedy, "sampled_seed7": sampled}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="cpu,gpu")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "golden.json"))
    a = ap.parse_args()
    out = Path(a.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    for dev in a.backends.split(","):
        for alias in MODELS:
            k = key(alias, dev)
            data[k] = record(alias, dev)
            print(f"{k}: {data[k]['logits_sha256'][:16]}", file=sys.stderr)
    out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""What constrained decoding costs per token: decode with and without a JSON schema, one sequence and a
batch, in the same run on the same model.

    python tools/bench_constrain.py [MODEL] [--backend cpu|gpu] [--batches 1,8] [--tokens 64] [--repeats 3]

Each case generates `--tokens` tokens per sequence through the batch engine (temperature 1, seeded;
the schema forces output that long, an array of many strings); the figure is the median inter-token
time per sequence (prefill excluded) over `--repeats` runs, with its spread. The mask itself (the
llguidance matcher's time per token) is timed apart.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 200}
PROMPTS = ["List some fruit names as JSON:", "Write a JSON array of city names:", "Colours, as a JSON list:",
           "Animals (JSON array):", "Some first names in JSON:", "Planets as JSON:", "Tools, JSON array:",
           "Rivers, as a JSON list of strings:"]


def decode_ms(model, batch: int, tokens: int, constrained: bool, seed: int) -> float:
    """Median per-token decode time (ms) of `batch` sequences generated together."""
    eng = model.engine(max_queue=batch)
    extra = {"json_schema": SCHEMA} if constrained else {}
    reqs = [r for i in range(batch)
            for r in eng.submit(PROMPTS[i % len(PROMPTS)], max_tokens=tokens, temperature=1.0, seed=seed + i, **extra)]
    eng.run(reqs)
    itl = [(r.finished_at - r.first_token_at) / (len(r.tokens) - 1) for r in reqs if len(r.tokens) > 1]
    return 1e3 * statistics.median(itl)


def mask_ms(model, tokens: int) -> float:
    """Matcher time per token (compute the mask, take the token) along a constrained greedy output."""
    from wasmchord.constrain import Constraint
    out = model.generate(PROMPTS[0], json_schema=SCHEMA, max_tokens=tokens, temperature=0).tokens
    m = Constraint(model.tokenizer, json_schema=SCHEMA).matcher()
    t = time.perf_counter()
    for tok in out:
        m.words()
        m.consume(tok)
    return 1e3 * (time.perf_counter() - t) / len(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    import wasmchord
    batches = [int(b) for b in a.batches.split(",")]
    model = wasmchord.Model.load(a.model, device=a.backend, context_length=256, slots=max(batches))
    decode_ms(model, 1, 4, True, 0)  # warm up: kernels compiled, token table built
    rows = []
    for b in batches:
        free, held = [], []
        for r in range(a.repeats):  # interleaved, so that the machine's drift hits both alike
            free.append(decode_ms(model, b, a.tokens, False, 100 * r))
            held.append(decode_ms(model, b, a.tokens, True, 100 * r))
        rows.append({"batch": b, "free_ms": free, "constrained_ms": held})
    mk = [mask_ms(model, a.tokens) for _ in range(a.repeats)]
    res = {"model": a.model, "backend": model.backend.describe(), "tokens": a.tokens, "rows": rows, "mask_ms": mk}
    print(f"{a.model} on {res['backend']}: {a.tokens} tokens per sequence, median inter-token ms "
          f"(min-max over {a.repeats} runs)")
    print(f"{'B':>3} {'unconstrained':>20} {'json_schema':>20} {'overhead':>10}")
    for r in rows:
        f, c = statistics.median(r["free_ms"]), statistics.median(r["constrained_ms"])
        print(f"{r['batch']:>3} {f:>8.2f} ({min(r['free_ms']):.2f}-{max(r['free_ms']):.2f}) "
              f"{c:>8.2f} ({min(r['constrained_ms']):.2f}-{max(r['constrained_ms']):.2f}) {100 * (c / f - 1):>9.0f}%")
    print(f"matcher alone: {statistics.median(mk):.3f} ms per token ({min(mk):.3f}-{max(mk):.3f})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""How each CPU `activations` mode agrees with float32 and with llama.cpp, on the llama.cpp fixtures.

For every prompt of tests/fixtures/llama_<model>.npz (llama.cpp's argmax and top-2 margin at each
position, written by tools/make_llama_fixtures.py) the logits at every position are computed with
weights="f32" (float32 BLAS: the float32 reference, held to transformers by the tests) and with the
quantized weights under each activations mode. Reported per mode: the largest logit difference from
float32 relative to the logit scale, the argmax agreement with float32, and with llama.cpp everywhere
and where llama.cpp's own margin is at least 0.5 (away from its near-ties).

    python tools/activation_agreement.py smollm2-135m-instruct gemma3-270m qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numpy as np

from wasmchord import Model, hub

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
NEAR_TIE = 0.5  # tests/test_model_cpu.py LLAMA_CPP_NOISE


def agreement(alias: str, modes: list[str]) -> dict:
    fx = np.load(FIXTURES / f"llama_{alias}.npz")
    n_prompts = len(json.loads(bytes(fx["meta"]).decode())["prompts"])
    prompts = [fx[f"p{i}_ids"].tolist() for i in range(n_prompts)]
    path = hub.pull(alias)
    ctx = max(len(p) for p in prompts) + 8
    ref = Model.load(path, device="cpu", weights="f32", context_length=ctx)
    f32 = [ref.logits(ids) for ids in prompts]
    del ref
    gc.collect()
    out = {"model": alias, "prompts": n_prompts, "positions": sum(len(p) for p in prompts), "modes": {}}
    for mode in modes:
        m = Model.load(path, device="cpu", activations=mode, context_length=ctx)
        dev = same_f32 = same_llama = clear = clear_same = 0
        for i, ids in enumerate(prompts):
            lg = m.logits(ids)
            dev = max(dev, float(np.abs(lg - f32[i]).max() / np.abs(f32[i]).max()))
            top = lg.argmax(1)
            sure = fx[f"p{i}_margin"] >= NEAR_TIE
            same_f32 += int((top == f32[i].argmax(1)).sum())
            same_llama += int((top == fx[f"p{i}_argmax"]).sum())
            clear += int(sure.sum())
            clear_same += int(((top == fx[f"p{i}_argmax"]) & sure).sum())
        n = out["positions"]
        out["modes"][mode] = {"backend": m.backend.describe(), "max_logit_dev_vs_f32": dev,
                              "argmax_vs_f32": same_f32 / n, "argmax_vs_llama_cpp": same_llama / n,
                              "argmax_vs_llama_cpp_clear": clear_same / clear, "clear_positions": clear}
        del m
        gc.collect()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--modes", default="f32,int16,int8", help="activations modes (comma-separated)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    results = [agreement(alias, a.modes.split(",")) for alias in a.models]
    print(f"{'model':<30}{'activations':<13}{'max dev':>9}{'= f32':>8}{'= llama.cpp':>13}{'(clear)':>9}")
    for r in results:
        for mode, v in r["modes"].items():
            print(f"{r['model']:<30}{mode:<13}{v['max_logit_dev_vs_f32']:>9.1e}{v['argmax_vs_f32']:>8.1%}"
                  f"{v['argmax_vs_llama_cpp']:>13.1%}{v['argmax_vs_llama_cpp_clear']:>9.1%}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())

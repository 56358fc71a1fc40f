"""Benchmark: tokenizer encode speed (MB/s) on 1 MB English and 1 MB mixed-script text, and vocab load
time, for both real models; llama.cpp's tokenizer in the same run when llama-cpp-python is installed.

    python tools/bench_tokenizer.py [--json out.json]
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_corpus import SCRIPTS, corpus  # noqa: E402

from wasmchord.hub import resolve_model  # noqa: E402
from wasmchord.text.tokenizer import Tokenizer  # noqa: E402

MB = 1_000_000


def english_text(n=MB):
    """Real English prose: docstrings and docs of installed Python packages (deterministic order)."""
    import pydoc
    parts, size = [], 0
    for mod in ["numpy", "json", "argparse", "collections", "email", "http", "logging", "unittest", "typing",
                "pathlib", "subprocess", "asyncio", "threading", "decimal", "datetime", "re", "os"]:
        doc = pydoc.render_doc(__import__(mod), renderer=pydoc.plaintext)
        parts.append(doc)
        size += len(doc.encode())
        if size >= n:
            break
    return "".join(parts).encode()[:n].decode(errors="ignore")


def mixed_text(n=MB):
    rng = random.Random(0)
    pool = corpus() + SCRIPTS * 5
    out, size = [], 0
    while size < n:
        s = rng.choice(pool)
        out.append(s + rng.choice([" ", "\n", ". "]))
        size += len(out[-1].encode())
    return "".join(out).encode()[:n].decode(errors="ignore")


def timed(f, repeats=2):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        r = f()
        best = min(best, time.perf_counter() - t)
    return best, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    texts = {"english": english_text(), "mixed": mixed_text()}
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    rows = []
    for alias in ["smollm2-135m-instruct", "gemma3-270m"]:
        path = resolve_model(alias)
        load_s, _ = timed(lambda: Tokenizer.from_gguf(path), 1)
        ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False) if llama_cpp else None
        for name, text in texts.items():
            mb = len(text.encode()) / MB
            tok = Tokenizer.from_gguf(path)  # a fresh one per text: BPE's piece cache starts empty
            s, ids = timed(lambda: tok.encode(text, add_bos=False), 1)
            row = {"model": alias, "text": name, "MB": round(mb, 3), "tokens": len(ids), "load_s": load_s,
                   "wasmchord_MBps": mb / s}
            if ref is not None:
                rs, rids = timed(lambda: ref.tokenize(text.encode(), add_bos=False, special=False), 2)
                row.update(llama_cpp_MBps=mb / rs, ratio=(mb / s) / (mb / rs), same_ids=rids == ids)
            rows.append(row)
            print(json.dumps(row))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

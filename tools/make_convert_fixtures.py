"""llama.cpp's logits on files our converter writes (needs llama-cpp-python, transformers, torch).

Deterministic tiny LLaMA and Phi-2 checkpoints (seeded; the LLaMA one with a bytes-only BPE
tokenizer) are converted at f32 and q8_0; llama.cpp loads each file and its logits for fixed token
ids go to tests/fixtures/llama_converted.npz. tests/test_convert.py rebuilds the same files and
compares our logits with these.

    python tools/make_convert_fixtures.py
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny_hf import make_llama, make_phi2  # noqa: E402

import llama_cpp  # noqa: E402

from wasmchord.convert import convert  # noqa: E402

IDS = [5, 17, 42, 99, 100, 7, 250, 3, 64, 128, 200, 11, 33, 77, 150, 9]
CASES = {"llama": lambda d: make_llama(d, tokenizer="bytes"), "phi2": lambda d: make_phi2(d)}


def main():
    data = {}
    for name, make in CASES.items():
        with tempfile.TemporaryDirectory() as d:
            make(d)
            for q in ("f32", "q8_0"):
                path = convert(d, f"{d}/{q}.gguf", quant=q)
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
                llm.eval(IDS)
                data[f"{name}_{q}"] = np.array(llm.scores[:len(IDS)], dtype=np.float32)
                print(name, q, data[f"{name}_{q}"].shape)
    data["ids"] = np.array(IDS, np.int32)
    np.savez_compressed(ROOT / "tests" / "fixtures" / "llama_converted.npz", **data)


if __name__ == "__main__":
    main()

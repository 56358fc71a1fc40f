"""llama.cpp's logits on files our converter writes (needs llama-cpp-python, transformers, torch).

Deterministic tiny checkpoints (seeded; tests/tiny_hf.py) are converted and loaded in llama.cpp; its
logits for fixed token ids go to tests/fixtures/llama_converted.npz, and tests/test_convert.py and
tests/test_architectures.py rebuild the same files and compare. Two sets:
  - LLaMA (bytes-only BPE) and Phi-2 at f32 and q8_0 (widened weights: sensitive logits);
  - the architecture variants (Llama-3, Mistral with and without a sliding window, Qwen2, Qwen3,
    Phi-3 with and without longrope) at f32 with a float32 KV cache: besides the logits, llama.cpp's
    greedy continuation of the first PROMPT ids, checked here to equal transformers' (the tool fails
    otherwise; the widened weights keep top-2 margins above 0.5% of the logit scale on these steps).
llama.cpp does not apply a sliding window to llama-architecture files (Mistral): that variant is
compared on the positions inside its window only, and its greedy tokens are not checked.

    python tools/make_convert_fixtures.py
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny_hf import VARIANTS, make_llama, make_phi2  # noqa: E402

import llama_cpp  # noqa: E402

from wasmchord.convert import convert  # noqa: E402

IDS = [5, 17, 42, 99, 100, 7, 250, 3, 64, 128, 200, 11, 33, 77, 150, 9]
PROMPT, N_GREEDY = 6, 10
PROMPT_LONG = (IDS * 5)[:70]
CASES = {"llama": lambda d: make_llama(d, tokenizer="bytes"), "phi2": lambda d: make_phi2(d)}
F32 = 0  # GGML_TYPE_F32, for type_k / type_v


def llama_logits(path, ids, **kw):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, **kw)
    llm.eval(ids)
    return llm, np.array(llm.scores[:len(ids)], dtype=np.float32)


def llama_greedy(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def hf_greedy(hf, prompt, n):
    import torch
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


def main():
    data, variants = {}, {}
    for name, make in CASES.items():
        with tempfile.TemporaryDirectory() as d:
            make(d)
            for q in ("f32", "q8_0"):
                _, data[f"{name}_{q}"] = llama_logits(convert(d, f"{d}/{q}.gguf", quant=q), IDS)
                print(name, q, data[f"{name}_{q}"].shape)
    for name, make in VARIANTS.items():
        with tempfile.TemporaryDirectory() as d:
            hf = make(d)
            llm, data[f"{name}_f32"] = llama_logits(convert(d, f"{d}/m.gguf", quant="f32"), IDS,
                                                          type_k=F32, type_v=F32)
            window = hf.config.to_dict().get("sliding_window") if name.startswith("mistral") else None
            # llama.cpp rounds its context up (to 256): longrope takes the long factors there, and
            # transformers does once a sequence is longer than the original 64 positions.
            prompt = PROMPT_LONG if name == "phi3_longrope" else IDS[:PROMPT]
            greedy = llama_greedy(llm, prompt, N_GREEDY)
            check = not window or window >= len(prompt) + N_GREEDY
            if check:
                ref = hf_greedy(hf, prompt, N_GREEDY)  # up to and with the end-of-sequence token
                if greedy[:len(ref)] != ref:
                    raise SystemExit(f"{name}: llama.cpp's greedy tokens {greedy} differ from transformers' {ref}")
                greedy = ref
            data[f"{name}_greedy"] = np.array(greedy, np.int32)
            variants[name] = {"positions": min(window or len(IDS), len(IDS)), "greedy": check, "prompt": len(prompt),
                              "context": llm.n_ctx()}
            print(name, "greedy", greedy, "checked against transformers" if check else "(window: not checked)")
    data["ids"] = np.array(IDS, np.int32)
    data["meta"] = np.frombuffer(json.dumps({"llama_cpp_python": llama_cpp.__version__, "variants": variants}).encode(),
                                 dtype=np.uint8)
    np.savez_compressed(ROOT / "tests" / "fixtures" / "llama_converted.npz", **data)


if __name__ == "__main__":
    main()

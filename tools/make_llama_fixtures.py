"""Write llama.cpp reference fixtures for whole-model tests (needs llama-cpp-python).

For each prompt: llama.cpp's token ids, per-position argmax and top-2 margin of its logits, the full
last-position logits (float32), and a 32-token greedy continuation with each step's logit margin.
Output: tests/fixtures/llama_<alias>.npz

    pip install llama-cpp-python && python tools/make_llama_fixtures.py [alias ...]
"""

import json
import sys
from pathlib import Path

import numpy as np

import llama_cpp

from wasmchord.hub import resolve_model

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
N_GREEDY = 32

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: What is the boiling point of water at sea level?\nA:",
    "List three primary colors:\n1.",
    "The mitochondria is the powerhouse of the cell. It produces energy in the form of",
    "Translate to French: 'Good morning, how are you?'\nFrench:",
    "In 1969, Neil Armstrong became the first person to",
    ("The history of computing spans many centuries. Early devices such as the abacus helped people "
     "perform arithmetic. In the 19th century, Charles Babbage designed the Analytical Engine, a mechanical "
     "general-purpose computer, and Ada Lovelace wrote what is considered the first algorithm intended for "
     "such a machine. In the 20th century, electronic computers emerged: the ENIAC, built during the Second "
     "World War, used vacuum tubes, and later machines used transistors and integrated circuits. The "
     "invention of the microprocessor in the 1970s made personal computers possible, and the rise of the "
     "internet in the 1990s connected them across the globe. Today, computers are everywhere, from phones "
     "to cars, and the field continues to evolve with"),
    "Here is a short poem about the moon:\n",
    "import numpy as np\n\nx = np.arange(10)\ny = x ** 2\nprint(",
]
LONG = (" ".join([
    "Chapter {i}. The traveller walked along the river, counting the stones and listening to the birds. "
    "Each morning the fog lifted a little later, and each evening the lamps in the distant town were lit "
    "a little earlier.".format(i=i) for i in range(1, 18)]) + " At the end of the journey the traveller")


def chat_prompt(alias):
    if alias.startswith("gemma"):
        return "<start_of_turn>user\nWrite one sentence about cats.<end_of_turn>\n<start_of_turn>model\n"
    return "<|im_start|>user\nWrite one sentence about cats.<|im_end|>\n<|im_start|>assistant\n"


def main(aliases):
    OUT.mkdir(parents=True, exist_ok=True)
    for alias in aliases:
        prompts = PROMPTS + [chat_prompt(alias)] + ([LONG] if alias.startswith("gemma") else [])
        llm = llama_cpp.Llama(model_path=str(resolve_model(alias)), n_ctx=2048, n_batch=2048, n_ubatch=2048,
                              logits_all=True, n_threads=2, verbose=False, seed=0)
        data, meta = {}, []
        for i, p in enumerate(prompts):
            ids = llm.tokenize(p.encode(), add_bos=True, special=True)
            llm.reset()
            llm.eval(ids)
            lg = np.array(llm.scores[:len(ids)], dtype=np.float32)            # [n, vocab]
            top2 = np.sort(lg, axis=1)[:, -2:]
            data[f"p{i}_ids"] = np.array(ids, np.int32)
            data[f"p{i}_argmax"] = lg.argmax(1).astype(np.int32)
            data[f"p{i}_margin"] = (top2[:, 1] - top2[:, 0]).astype(np.float32)
            data[f"p{i}_last"] = lg[-1]
            gen, margins = [], []
            for _ in range(N_GREEDY):
                last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
                t2 = np.sort(last)[-2:]
                tok = int(last.argmax())
                gen.append(tok)
                margins.append(float(t2[1] - t2[0]))
                llm.eval([tok])
            data[f"p{i}_greedy"] = np.array(gen, np.int32)
            data[f"p{i}_greedy_margin"] = np.array(margins, np.float32)
            meta.append({"prompt": p, "n_tokens": len(ids)})
            print(alias, i, len(ids), "tokens", flush=True)
        data["meta"] = np.frombuffer(json.dumps({"model": alias, "llama_cpp_python": llama_cpp.__version__,
                                                 "prompts": meta}).encode(), dtype=np.uint8)
        np.savez_compressed(OUT / f"llama_{alias}.npz", **data)


if __name__ == "__main__":
    main(sys.argv[1:] or ["smollm2-135m-instruct", "gemma3-270m"])

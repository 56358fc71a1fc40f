"""Write llama.cpp tokenizer fixtures (needs llama-cpp-python): tests/fixtures/tokenizer_<alias>.json.

For every corpus string: ids from llama.cpp's tokenizer with add_special=True, once with special=False
and once with special=True (control tokens parsed), and whether llama.cpp's own detokenize round-trips.

    pip install llama-cpp-python && python tools/make_tokenizer_fixtures.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_corpus import corpus  # noqa: E402

import llama_cpp  # noqa: E402

from wasmchord.hub import resolve_model  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def main(aliases=("smollm2-135m-instruct", "gemma3-270m")):
    strings = corpus()
    for alias in aliases:
        llm = llama_cpp.Llama(model_path=str(resolve_model(alias)), vocab_only=True, verbose=False)
        rows = []
        for s in strings:
            b = s.encode("utf-8")
            ids = llm.tokenize(b, add_bos=True, special=False)
            ids_special = llm.tokenize(b, add_bos=True, special=True)
            back = llm.detokenize(ids)
            rows.append({"text": s, "ids": ids, "ids_special": ids_special, "llama_roundtrip": back == b})
        out = {"model": alias, "llama_cpp_python": llama_cpp.__version__, "strings": rows}
        path = OUT / f"tokenizer_{alias}.json"
        path.write_text(json.dumps(out, ensure_ascii=False, indent=0))
        print(f"{path}: {len(rows)} strings, {sum(r['llama_roundtrip'] for r in rows)} round-trip in llama.cpp")


if __name__ == "__main__":
    main(*(sys.argv[1:2] and [sys.argv[1:]]))

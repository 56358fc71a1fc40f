"""Tokenizer metadata for GGUF from source tokenizers (SentencePiece `.model`, HF `tokenizer.json`).

Keys as llama.cpp's convert_hf_to_gguf.py writes them; used by the converter and by tests.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import TokenizerError
from .tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED


def sentencepiece_metadata(model_file: str | os.PathLike, *, add_bos: bool = True,
                           add_space_prefix: bool = True) -> dict:
    """`tokenizer.ggml.*` keys for a SentencePiece model (the `llama` tokenizer)."""
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{model_file}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    n = sp.get_piece_size()
    tokens, scores, types = [], np.zeros(n, np.float32), np.zeros(n, np.int32)
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores[i] = sp.get_score(i)
        types[i] = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                    UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.add_bos_token": add_bos, "tokenizer.ggml.add_eos_token": False,
          "tokenizer.ggml.add_space_prefix": add_space_prefix}
    for key, i in [("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id()), ("padding", sp.pad_id())]:
        if i >= 0:
            md[f"tokenizer.ggml.{key}_token_id"] = int(i)
    return md


def bpe_metadata(tokenizer_json: str | os.PathLike, *, pre: str = "gpt-2", add_bos: bool = False) -> dict:
    """`tokenizer.ggml.*` keys for a byte-level BPE `tokenizer.json` (the `gpt2` tokenizer)."""
    with open(tokenizer_json, encoding="utf-8") as f:
        try:
            tj = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{tokenizer_json}: not valid JSON ({e})") from None
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{tokenizer_json}: expected an object with a \"model\" object holding a \"vocab\"")
    if model.get("type") != "BPE":
        raise TokenizerError(f"{tokenizer_json}: model.type is {model.get('type')!r}, expected 'BPE'")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    for text, a in added.items():
        vocab.setdefault(text, a["id"])
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = np.full(n, NORMAL, np.int32)
    for text, i in vocab.items():
        tokens[i] = text
    for i, t in enumerate(tokens):
        if t.startswith("[PAD") and t not in vocab:
            types[i] = UNUSED
    for text, a in added.items():
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": add_bos}

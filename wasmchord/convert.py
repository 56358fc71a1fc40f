"""Hugging Face checkpoint directory -> one GGUF file (Llama, Mistral, Qwen2, Qwen3, Phi-2, Phi-3).

Tensors are read one at a time from memory-mapped safetensors (or torch .bin files when torch is
installed), transformed, quantized and written; the output appears only when complete. What each
model_type maps to (names, keys, RoPE scaling) is in hf_models.py, after llama.cpp's converter.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from . import atomic
from .config import ModelConfig
from .errors import ConvertError, UnsupportedError, WasmchordError
from .formats.gguf_writer import GGUFWriter
from .formats.quants import ggml_type
from .hf_models import IGNORED, extra_tensors, hf_model, metadata, permute_qk

log = logging.getLogger(__name__)
QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1")
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # llama_ftype


# ---------------------------------------------------------------------------- reading checkpoints

def _read_json(path: Path, default=None) -> dict:
    """A JSON object file of the checkpoint (`default` when it is absent and a default is given)."""
    if default is not None and not path.exists():
        return default
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a JSON object, got a {type(obj).__name__}")
    return obj


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bf16", "F64": np.float64, "I64": np.int64}


class _SafeTensors:
    """A memory-mapped .safetensors file: 8-byte header length, JSON header, raw data."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > path.stat().st_size:
                raise ConvertError(f"{path}: corrupt safetensors header")
            try:
                self.header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConvertError(f"{path}: corrupt safetensors header") from None
        if not isinstance(self.header, dict):
            raise ConvertError(f"{path}: corrupt safetensors header")
        self.header.pop("__metadata__", None)
        self.base = 8 + n
        size = path.stat().st_size
        for name, h in self.header.items():  # each tensor's bytes within the file, of its shape's size
            try:
                a, b = h["data_offsets"]
                dt = _ST_DTYPES.get(h["dtype"])
                width = 2 if dt == "bf16" else np.dtype(dt).itemsize if dt is not None else None
                count = int(np.prod(h["shape"], dtype=np.int64))
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"{path}: tensor {name!r}: corrupt header entry") from None
            if not 0 <= a <= b or self.base + b > size:
                raise ConvertError(f"{path}: tensor {name!r} data (bytes {a}..{b}) extends past the end of the file "
                                   f"({size - self.base} data bytes): the file is truncated")
            if width is not None and b - a != count * width:
                raise ConvertError(f"{path}: tensor {name!r} holds {b - a} bytes, its shape {h['shape']} of "
                                   f"{h['dtype']} needs {count * width}")
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")

    def shape(self, name):
        return tuple(self.header[name]["shape"])

    def get(self, name) -> np.ndarray:
        h = self.header[name]
        dt = _ST_DTYPES.get(h["dtype"])
        if dt is None:
            raise ConvertError(f"{self.path}: tensor {name!r} has unsupported dtype {h['dtype']}")
        a, b = h["data_offsets"]
        raw = self.mm[self.base + a:self.base + b]
        if dt == "bf16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(h["shape"])
        return raw.view(dt).astype(np.float32).reshape(h["shape"])


class Checkpoint:
    """name -> (shape, loader) over all weight files of a directory."""

    def __init__(self, d: Path):
        self.tensors: dict[str, tuple[tuple, Callable[[], np.ndarray]]] = {}
        st = sorted(d.glob("*.safetensors"))
        if st:
            for p in st:
                f = _SafeTensors(p)
                for name in f.header:
                    self.tensors[name] = (f.shape(name), lambda f=f, name=name: f.get(name))
            return
        bins = sorted(d.glob("pytorch_model*.bin"))
        if not bins:
            raise ConvertError(f"{d}: no weights found (expected *.safetensors or pytorch_model*.bin)")
        try:
            import torch
        except ImportError:
            raise ConvertError(f"{d}: reading pytorch_model*.bin needs torch; convert to safetensors or install torch") from None
        for p in bins:
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            for name, t in sd.items():
                self.tensors[name] = (tuple(t.shape), lambda t=t: t.float().numpy())


# ---------------------------------------------------------------------------- tokenizer

def _tokenizer_metadata(d: Path, c: dict) -> dict:
    from .text.vocab_export import bpe_metadata, sentencepiece_metadata
    tc = _read_json(d / "tokenizer_config.json", {})
    gc = _read_json(d / "generation_config.json", {})
    if (d / "tokenizer.model").exists():
        md = sentencepiece_metadata(d / "tokenizer.model", add_bos=tc.get("add_bos_token", True))
    elif (d / "tokenizer.json").exists():
        md = bpe_metadata(d / "tokenizer.json", pre=_bpe_pre(d / "tokenizer.json"), add_bos=tc.get("add_bos_token", False))
        tj = _read_json(d / "tokenizer.json")
        ids = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
        for key, name in (("bos", tc.get("bos_token")), ("eos", tc.get("eos_token")), ("unknown", tc.get("unk_token"))):
            name = name.get("content") if isinstance(name, dict) else name
            if name in ids:
                md[f"tokenizer.ggml.{key}_token_id"] = ids[name]
    else:
        raise ConvertError(f"{d}: no tokenizer (expected tokenizer.model or tokenizer.json)")
    for key, src in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        v = gc.get(src, c.get(src))
        if isinstance(v, list):
            v = v[0]
        if isinstance(v, int):
            md[f"tokenizer.ggml.{key}_token_id"] = v
    if isinstance(tc.get("chat_template"), str):
        md["tokenizer.chat_template"] = tc["chat_template"]
    return md


def _pad_vocab(md: dict, vocab_size):
    """Models pad their embedding beyond the tokenizer (llama.cpp adds [PAD{i}] tokens, type UNUSED)."""
    from .text.tokenizer import UNUSED
    toks = md["tokenizer.ggml.tokens"]
    if isinstance(vocab_size, int) and vocab_size > len(toks):
        extra = vocab_size - len(toks)
        md["tokenizer.ggml.tokens"] = list(toks) + [f"[PAD{len(toks) + i}]" for i in range(extra)]
        md["tokenizer.ggml.token_type"] = np.concatenate([md["tokenizer.ggml.token_type"],
                                                          np.full(extra, UNUSED, np.int32)])
        if "tokenizer.ggml.scores" in md:
            md["tokenizer.ggml.scores"] = np.concatenate([md["tokenizer.ggml.scores"], np.zeros(extra, np.float32)])


# tokenizer.json Split regexes -> llama.cpp's pre-tokenizer name (the "original regex from
# tokenizer.json" that llama.cpp src/llama-vocab.cpp notes beside each adapted one).
_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
SPLIT_REGEXES = {
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
                    r"|\s+(?!\S)|\s+": "qwen35",
}


def _bpe_pre(path: Path) -> str:
    """Pick llama.cpp's pre-tokenizer name from tokenizer.json's pre_tokenizer.

    Raises:
        UnsupportedError: a Split regex we do not know (a wrong guess would tokenize silently wrong).
    """
    pt = _read_json(path).get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", [pt]) if pt.get("type") == "Sequence" else [pt]
    for step in steps:
        if step.get("type") == "Split" and "Regex" in (step.get("pattern") or {}):
            regex = step["pattern"]["Regex"]
            if regex not in SPLIT_REGEXES:
                raise UnsupportedError(f"{path}: pre-tokenizer Split regex {regex!r} is not one we know "
                                       f"(llama.cpp names: {', '.join(sorted(set(SPLIT_REGEXES.values())))})")
            return SPLIT_REGEXES[regex]
    text = json.dumps(pt)
    if "individual_digits\": true" in text:
        return "smollm"
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    return "gpt-2"  # llama.cpp spelling


# ---------------------------------------------------------------------------- conversion

def convert(model_dir, output, *, quant: str = "f16", force: bool = False, progress=None) -> Path:
    """Convert a Hugging Face model directory to GGUF. Returns the output path.

    Raises:
        ConvertError: missing or inconsistent inputs; an existing output without `force`.
        UnsupportedError: an architecture or quantization we do not convert.
    """
    d, out = Path(model_dir), Path(output)
    if quant not in QUANTS:
        raise UnsupportedError(f"unknown --quant {quant!r}; expected one of {', '.join(QUANTS)}")
    if not d.is_dir():
        raise ConvertError(f"{d}: not a directory")
    if not (d / "config.json").exists():
        raise ConvertError(f"{d}: missing config.json")
    if not out.parent.is_dir():
        raise ConvertError(f"{out}: the output directory {out.parent} does not exist")
    if out.is_dir():
        raise ConvertError(f"{out} is a directory: give the output .gguf file's path")
    try:
        atomic.target(out)  # a device, a pipe or a socket there is refused, whatever `force` says
        if out.exists() and not force:
            raise ConvertError(f"{out} exists (use --force to overwrite)")
        atomic.check_writable(out)  # before the conversion, not after
    except OSError as e:
        raise ConvertError(str(e)) from None
    c = _read_json(d / "config.json")
    m = hf_model(c, d / "config.json")
    arch, names = m.arch, m.names
    md = {"general.architecture": arch, "general.name": c.get("_name_or_path") or d.name,
          "general.file_type": FILE_TYPE[quant], **metadata(m, c, d / "config.json")}
    extra_t = extra_tensors(m, c, d / "config.json")
    ckpt = Checkpoint(d)
    md.update(_tokenizer_metadata(d, c))
    _pad_vocab(md, c.get("vocab_size"))
    try:
        cfg = ModelConfig.from_gguf(md)
    except WasmchordError as e:
        raise ConvertError(f"{d / 'config.json'}: {e}") from None
    n_layers = cfg.n_layers

    mapping: dict[str, str] = {}
    for pat, target in names.items():
        for i in range(n_layers) if "{i}" in pat else [None]:
            src = pat.format(i=i) if i is not None else pat
            if src in ckpt.tensors:
                mapping[src] = target.format(i=i) if i is not None else target
    extra = sorted(n for n in ckpt.tensors if n not in mapping and not n.endswith(IGNORED))
    if extra:
        raise ConvertError(f"{d}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                           f"for model_type {c['model_type']!r} with {n_layers} layers")
    missing, wrong = cfg.check_tensors({**{dst: ckpt.tensors[src][0] for src, dst in mapping.items()},
                                        **{name: a.shape for name, a in extra_t.items()}})
    if missing:
        raise ConvertError(f"{d}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for src, dst in mapping.items():
        if dst in wrong:
            raise ConvertError(f"{src}: shape {list(ckpt.tensors[src][0])} does not match config.json "
                               f"(expected {list(wrong[dst])})")

    w = GGUFWriter(arch)
    for k, v in md.items():
        w.add(k, v)
    for src, dst in mapping.items():
        shape, load = ckpt.tensors[src]
        qtype = _qtype(dst, shape, quant)
        perm = cfg.n_heads if dst.endswith("attn_q.weight") else cfg.n_kv_heads if dst.endswith("attn_k.weight") else None
        if not m.permute_qk:
            perm = None

        def data(load=load, perm=perm, src=src):
            a = load()
            if not np.isfinite(a).all():  # written, it would only fail later, as NaN logits
                raise ConvertError(f"{d}: tensor {src!r} holds {int((~np.isfinite(a)).sum())} NaN or Inf values")
            return permute_qk(a, perm) if perm else a
        w.add_tensor(dst, data, qtype=qtype, shape=shape)
    for name, a in extra_t.items():
        w.add_tensor(name, a, qtype="F32")
    w.write(out, progress=progress)
    log.info("wrote %s (%s, %d tensors)", out, quant, len(mapping) + len(extra_t))
    return out


def _qtype(name: str, shape, quant: str) -> str:
    """Norms, biases and 1-D tensors stay F32; rows that do not divide into blocks stay F16. With 4-bit
    types the embedding and output head are Q8_0, as llama.cpp's quantizer keeps them higher (Q6_K)."""
    if len(shape) == 1 or name.endswith(".bias") or "norm" in name:
        return "F32"
    if quant in ("f32", "f16"):
        return quant.upper()
    if quant in ("q4_0", "q4_1") and name in ("token_embd.weight", "output.weight"):
        quant = "q8_0"
    return quant.upper() if shape[-1] % ggml_type(quant).block_size == 0 else "F16"


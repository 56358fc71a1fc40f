"""A readable summary of a GGUF file (what `gguf-dump` shows, organised): `wasmchord info`."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .config import ModelConfig
from .errors import WasmchordError
from .formats.gguf import GGUFFile


def plain(v, items: int | None = None):
    """A metadata value as JSON takes it (arrays: their first `items`, all when None)."""
    if isinstance(v, np.ndarray):
        v = v[:items].tolist()
    elif isinstance(v, list):
        v = [plain(x) for x in v[:items]]
    return v.item() if isinstance(v, np.generic) else v


def summarize(gf: GGUFFile, *, tensors: bool = False, metadata: bool = False) -> dict:
    """Architecture, sizes, tokenizer and tensor statistics of an opened GGUF file, as a dict; with
    `tensors`, each tensor's name, type, shape, bytes and offset; with `metadata`, every key (arrays
    as their length and first 16 items)."""
    md = gf.metadata
    counts, nbytes = Counter(), Counter()
    params = 0
    for ti in gf.tensors.values():
        counts[ti.ggml_type.name] += 1
        nbytes[ti.ggml_type.name] += ti.n_bytes
        params += ti.n_elements
    out = {
        "file": str(gf.path), "file_size": gf.file_size, "gguf_version": gf.version,
        "name": md.get("general.name"), "architecture": md.get("general.architecture"),
        "tensor_count": len(gf.tensors), "parameters": params,
        "tensor_types": {k: {"count": counts[k], "bytes": nbytes[k]} for k in sorted(counts)},
        "tokenizer": md.get("tokenizer.ggml.model"), "tokenizer_pre": md.get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens) if isinstance(tokens := md.get("tokenizer.ggml.tokens"), list) and tokens else None,
        "chat_template": "tokenizer.chat_template" in md,
    }
    try:
        cfg = ModelConfig.from_gguf(md)
        out["config"] = {k: v for k, v in cfg.__dict__.items() if k != "spec"}
        # float32 K and V of every layer, per position of one sequence (a slot of the batch engine)
        out["kv_bytes_per_token"] = 4 * cfg.n_layers * cfg.n_kv_heads * (cfg.head_dim + cfg.head_dim_v)
    except WasmchordError as e:
        out["config_error"] = str(e)
    if metadata:
        out["metadata"] = {k: ({"items": len(v), "head": plain(v, 16)} if isinstance(v, (list, np.ndarray))
                               else plain(v)) for k, v in md.items()}
    if tensors:
        out["tensors"] = [{"name": ti.name, "type": ti.ggml_type.name, "shape": list(ti.shape), "bytes": ti.n_bytes,
                           "offset": ti.offset} for ti in gf.tensors.values()]
    return out


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_summary(gf: GGUFFile, *, tensors: bool = False, metadata: bool = False) -> str:
    s = summarize(gf)
    lines = [f"file           {s['file']} ({_human(s['file_size'])}, GGUF v{s['gguf_version']})",
             f"name           {s['name']}", f"architecture   {s['architecture']}"]
    cfg = s.get("config")
    if cfg:
        lines += [f"layers         {cfg['n_layers']}",
                  f"hidden         {cfg['d_model']} (FFN {cfg['ffn_dim']})",
                  f"heads          {cfg['n_heads']} query, {cfg['n_kv_heads']} key/value, "
                  f"head size {cfg['head_dim']}",
                  f"context        {cfg['context_length']}",
                  f"rope           base {cfg['rope_base']:g}, {cfg['rope_dim']} dims, scale {cfg['rope_scale']:g}",
                  f"norm eps       {cfg['norm_eps']:g}"]
        if cfg["sliding_window"]:
            lines.append(f"sliding window {cfg['sliding_window']}")
        per = s["kv_bytes_per_token"]
        ctx = min(cfg["context_length"], 4096)
        lines.append(f"KV cache       {_human(per)} per token: {_human(per * ctx)} per slot at {ctx} positions "
                     f"(Model.load(slots=N) takes N of them)")
    else:
        lines.append(f"config         unavailable: {s.get('config_error')}")
    lines += [f"tokenizer      {s['tokenizer']} (pre: {s['tokenizer_pre']}), vocab {s['vocab_size']}, "
              f"chat template: {'yes' if s['chat_template'] else 'no'}",
              f"parameters     {s['parameters']:,} in {s['tensor_count']} tensors",
              "tensor types   " + ", ".join(f"{k} x{v['count']} ({_human(v['bytes'])})"
                                            for k, v in s["tensor_types"].items())]
    if metadata:
        lines.append("")
        lines.append("metadata:")
        for k, v in gf.metadata.items():
            if isinstance(v, (list, np.ndarray)):
                head = [x.item() if isinstance(x, np.generic) else x for x in v[:4]]  # 0.0, not np.float32(0.0)
                lines.append(f"  {k:<44} [{len(v)} items] {head}{' ...' if len(v) > 4 else ''}")
            else:
                sv = repr(v)
                lines.append(f"  {k:<44} {sv[:100]}{' ...' if len(sv) > 100 else ''}")
    if tensors:
        lines.append("")
        lines.append(f"  {'#':>4}  {'name':<32} {'type':<6} {'shape':<20} {'bytes':>12}  offset")
        for i, ti in enumerate(gf.tensors.values()):
            lines.append(f"  {i:>4}  {ti.name:<32} {ti.ggml_type.name:<6} {str(list(ti.shape)):<20} "
                         f"{ti.n_bytes:>12,}  {ti.offset}")
    return "\n".join(lines)

"""How a Hugging Face checkpoint of each supported `model_type` becomes GGUF: tensor names, metadata
keys, RoPE scaling, and the tensors the converter generates.

One table entry per model_type, as llama.cpp's convert_hf_to_gguf.py writes them (conversion/llama.py
LlamaModel, qwen.py Qwen2Model and Qwen3Model, phi.py Phi2Model and Phi3MiniModel, base.py
TextModel.set_gguf_parameters), so that llama.cpp loads the files we write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConvertError, UnsupportedError

# ---------------------------------------------------------------------------- tensor names
# HF name pattern -> GGUF name. {i} is the layer.
LLAMA_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
QWEN2_NAMES = {**LLAMA_NAMES, **{f"model.layers.{{i}}.self_attn.{x}_proj.bias": f"blk.{{i}}.attn_{x}.bias"
                                 for x in "qkv"}}
QWEN3_NAMES = {**LLAMA_NAMES, **{f"model.layers.{{i}}.self_attn.{x}_norm.weight": f"blk.{{i}}.attn_{x}_norm.weight"
                                 for x in "qk"}}
# Phi-3 keeps q|k|v and gate|up fused, and so does llama.cpp (attn_qkv; ffn_up of 2f rows, gate first).
PHI3_NAMES = {k: v for k, v in LLAMA_NAMES.items() if "_proj" not in k or "o_proj" in k or "down_proj" in k}
PHI3_NAMES.update({"model.layers.{i}.self_attn.qkv_proj.weight": "blk.{i}.attn_qkv.weight",
                   "model.layers.{i}.mlp.gate_up_proj.weight": "blk.{i}.ffn_up.weight"})
PHI2_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.final_layernorm.weight": "output_norm.weight", "model.final_layernorm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight", "lm_head.bias": "output.bias",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.input_layernorm.bias": "blk.{i}.attn_norm.bias",
    **{f"model.layers.{{i}}.self_attn.{x}_proj.{w}": f"blk.{{i}}.attn_{x}.{w}" for x in "qkv" for w in ("weight", "bias")},
    "model.layers.{i}.self_attn.dense.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.dense.bias": "blk.{i}.attn_output.bias",
    "model.layers.{i}.mlp.fc1.weight": "blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.fc1.bias": "blk.{i}.ffn_up.bias",
    "model.layers.{i}.mlp.fc2.weight": "blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.fc2.bias": "blk.{i}.ffn_down.bias",
}

IGNORED = ("rotary_emb.inv_freq",)  # buffers some checkpoints save; recomputed from the config


@dataclass(frozen=True)
class HFModel:
    """How one HF model_type converts."""

    arch: str                    # GGUF general.architecture
    names: dict[str, str]        # HF tensor name pattern -> GGUF name
    permute_qk: bool = False     # HF rotate-half rows -> GGUF adjacent pairs (llama's RoPE style)
    layer_norm: bool = False     # LayerNorm (layer_norm_eps) instead of RMSNorm (rms_norm_eps)
    rope_scalings: tuple = ("linear",)  # HF rope_type values we convert besides "default"
    sliding_window: str = "none"  # "key": written as attention.sliding_window; "none": refused when in use


MODEL_TYPES: dict[str, HFModel] = {
    "llama": HFModel("llama", LLAMA_NAMES, permute_qk=True, rope_scalings=("linear", "llama3")),
    # Mistral is LLaMA to llama.cpp; its sliding window (every layer) is kept for our graph.
    "mistral": HFModel("llama", LLAMA_NAMES, permute_qk=True, sliding_window="key"),
    "qwen2": HFModel("qwen2", QWEN2_NAMES),
    "qwen3": HFModel("qwen3", QWEN3_NAMES),
    "phi": HFModel("phi2", PHI2_NAMES, layer_norm=True),
    "phi3": HFModel("phi3", PHI3_NAMES, rope_scalings=("longrope", "su"), sliding_window="key"),
}


def hf_model(c: dict, where) -> HFModel:
    """The table entry for config.json `c` (read from `where`), by its model_type.

    Raises:
        UnsupportedError: a model_type without an entry, naming the supported ones.
    """
    mt = c.get("model_type")
    if mt not in MODEL_TYPES:
        arch = (c.get("architectures") or [None])[0]
        raise UnsupportedError(f"{where}: model_type {mt!r}{f' ({arch})' if arch else ''} is not supported; "
                               "supported model types: "
                               f"{', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[mt]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> GGUF's adjacent pairs (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------- metadata

def _rope_parameters(c: dict) -> dict:
    """RoPE settings in one dict: transformers 5 writes `rope_parameters`, older files `rope_scaling`
    beside a top-level `rope_theta` (and Phi-3 a top-level original_max_position_embeddings)."""
    p = {k: c[k] for k in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings") if k in c}
    p.update(c.get("rope_scaling") or {})
    p.update(c.get("rope_parameters") or {})
    return p


def metadata(m: HFModel, c: dict, where) -> dict:
    """GGUF model metadata (`{arch}.*` keys) for config.json `c`.

    Raises:
        ConvertError: a required config.json key is missing.
        UnsupportedError: a RoPE scaling type or sliding-window setup this model_type does not convert.
    """
    arch = m.arch

    def need(key):
        if key not in c:
            raise ConvertError(f"{where}: no {key!r}, required for {c.get('model_type')}")
        return c[key]
    d, H = need("hidden_size"), need("num_attention_heads")
    hd = c.get("head_dim") or d // H
    rp = _rope_parameters(c)
    md = {f"{arch}.context_length": need("max_position_embeddings"), f"{arch}.embedding_length": d,
          f"{arch}.block_count": need("num_hidden_layers"), f"{arch}.feed_forward_length": need("intermediate_size"),
          f"{arch}.attention.head_count": H, f"{arch}.attention.head_count_kv": c.get("num_key_value_heads") or H,
          f"{arch}.rope.freq_base": float(rp.get("rope_theta", 10000.0))}
    if m.layer_norm:  # phi2: partial rotary of half the head by default
        md[f"{arch}.attention.layer_norm_epsilon"] = float(need("layer_norm_eps"))
        md[f"{arch}.rope.dimension_count"] = int(rp.get("partial_rotary_factor", 0.5) * hd)
        return md
    md[f"{arch}.attention.layer_norm_rms_epsilon"] = float(need("rms_norm_eps"))
    md[f"{arch}.rope.dimension_count"] = int(rp.get("partial_rotary_factor", 1.0) * hd)
    md[f"{arch}.vocab_size"] = need("vocab_size")
    if c.get("head_dim"):  # as TextModel.set_gguf_parameters: explicit whenever config.json has it
        md[f"{arch}.attention.key_length"] = md[f"{arch}.attention.value_length"] = c["head_dim"]
    if m.sliding_window == "key":
        md[f"{arch}.attention.sliding_window"] = int(c.get("sliding_window") or 0)
    elif c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or []):
        # Qwen2/Qwen3 keep a sliding_window value that only use_sliding_window turns on
        raise UnsupportedError(f"{where}: sliding-window layers (sliding_window = {c.get('sliding_window')}) are "
                               f"not supported for model_type {c.get('model_type')!r}")
    md.update(_rope_scaling_metadata(m, rp, c, where))
    return md


def rope_scaling_type(m: HFModel, rp: dict, where) -> str:
    """The HF rope_type, checked against the ones this model_type converts (never silently dropped)."""
    kind = str(rp.get("rope_type", rp.get("type")) or "default").lower()
    if kind != "default" and kind not in m.rope_scalings:
        raise UnsupportedError(f"{where}: RoPE scaling {kind!r} is not supported for {m.arch} "
                               f"(supported: default, {', '.join(m.rope_scalings)})")
    return kind


def _rope_scaling_metadata(m: HFModel, rp: dict, c: dict, where) -> dict:
    kind, arch = rope_scaling_type(m, rp, where), m.arch
    if kind == "linear":
        return {f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": float(rp["factor"])}
    if kind in ("longrope", "su"):  # phi.py Phi3MiniModel: factor tensors, attn_factor from the extension
        orig, ctx = int(rp["original_max_position_embeddings"]), int(c["max_position_embeddings"])
        scale = ctx / orig
        attn = rp.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        return {f"{arch}.rope.scaling.type": "longrope", f"{arch}.rope.scaling.attn_factor": float(attn),
                f"{arch}.rope.scaling.original_context_length": orig}
    return {}  # default; llama3 goes into the rope_freqs tensor


# ---------------------------------------------------------------------------- generated tensors

def extra_tensors(m: HFModel, c: dict, where) -> dict[str, np.ndarray]:
    """Tensors the converter computes from config.json: Llama-3's per-dimension RoPE frequency divisors
    (`rope_freqs`, llama.py LlamaModel.generate_extra_tensors) and Phi-3's longrope factors."""
    rp = _rope_parameters(c)
    kind = rope_scaling_type(m, rp, where)
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    n_rot = int(rp.get("partial_rotary_factor", 1.0) * hd)
    if kind == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(rp, hd)}
    if kind in ("longrope", "su"):
        out = {}
        for which in ("long", "short"):
            f = np.asarray(rp.get(f"{which}_factor") or [], np.float32)
            if f.shape != (n_rot // 2,):
                raise ConvertError(f"{where}: rope {which}_factor has {f.size} values, expected {n_rot // 2}")
            out[f"rope_factors_{which}.weight"] = f
        return out
    return {}


def llama3_rope_factors(rp: dict, head_dim: int) -> np.ndarray:
    """Llama-3's RoPE scaling as frequency divisors [head_dim/2]: long wavelengths divided by `factor`,
    short ones kept, a smooth blend between (transformers _compute_llama3_parameters)."""
    base = float(rp.get("rope_theta", 10000.0))
    factor = float(rp.get("factor", 8.0))
    low, high = float(rp.get("low_freq_factor", 1.0)), float(rp.get("high_freq_factor", 4.0))
    old_ctx = float(rp.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi * base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (old_ctx / wavelen - low) / (high - low)
    f = np.where(wavelen < old_ctx / high, 1.0,
                 np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return f.astype(np.float32)

"""Model configuration from GGUF metadata: one frozen dataclass, architectures as table entries.

Keys are llama.cpp's (src/llama-arch.cpp `LLM_KV_NAMES`), prefixed by `general.architecture`.
Every key read is named here; a missing required key raises `ConfigError` naming it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import ConfigError, UnsupportedError


@dataclass(frozen=True)
class ArchSpec:
    """How an architecture differs from plain LLaMA. The graph reads these, never the arch name."""

    norm: str = "rms"                 # "rms" | "layer" (LayerNorm with bias)
    ffn: str = "swiglu"               # "swiglu" | "geglu" (tanh GELU) | "gelu" (plain MLP)
    rope_style: str = "norm"          # "norm": adjacent pairs (GGUF/llama); "neox": halves
    parallel_block: bool = False      # attention and MLP from one normalized input (phi2)
    qk_norm: bool = False             # per-head RMSNorm on q and k (gemma3, qwen3)
    qkv_bias: bool = False            # q, k and v projections carry biases (qwen2)
    fused_gate_up: bool = False       # ffn_up holds gate | up rows [2f, d], no ffn_gate (phi3)
    post_norms: bool = False          # post-attention / post-ffn norms (gemma3)
    embed_scale_sqrt_d: bool = False  # multiply embeddings by sqrt(d_model) (gemma)
    eps_key: str = "attention.layer_norm_rms_epsilon"
    # llama.cpp llama_hparams::set_swa_pattern: with a sliding window, every Nth layer is global and
    # the rest local (gemma3: 6); 0: every layer is local (Mistral, Phi-3, as transformers runs them).
    sliding_window_pattern: int = 0
    rope_base_local: float | None = None


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    # llama.cpp llama_model_rope_type(): qwen2, phi2 and gemma3 rotate halves (NEOX), llama adjacent pairs.
    "qwen2": ArchSpec(rope_style="neox", qkv_bias=True),
    "qwen3": ArchSpec(rope_style="neox", qk_norm=True),
    "phi3": ArchSpec(rope_style="neox", fused_gate_up=True),
    "phi2": ArchSpec(norm="layer", ffn="gelu", rope_style="neox", parallel_block=True,
                     eps_key="attention.layer_norm_epsilon"),
    # llama.cpp src/llama-model.cpp, LLM_ARCH_GEMMA3: swa pattern 6, local rope base 10000.
    "gemma3": ArchSpec(ffn="geglu", rope_style="neox", qk_norm=True, post_norms=True,
                       embed_scale_sqrt_d=True, sliding_window_pattern=6, rope_base_local=10000.0),
}


# RoPE scaling types we implement (GGUF `{arch}.rope.scaling.type`; llama.cpp also knows yarn).
# Llama-3's scaling has no type: its per-dimension factors come as the `rope_freqs` tensor.
ROPE_SCALINGS = ("none", "linear", "longrope")


class TensorShape(NamedTuple):
    shape: tuple[int, ...]  # NumPy order: rows first
    required: bool


_QKV = ("attn_q.weight", "attn_k.weight", "attn_v.weight")
_QKV_B = ("attn_q.bias", "attn_k.bias", "attn_v.bias")
_BLOCK = re.compile(r"blk\.(\d+)\.")
# Larger than any model's width, head count, vocabulary or layer count: a bound checked before any
# size derived from the metadata is used (tensor tables, buffers).
MAX_DIM = 1 << 24


def _get(md: dict, key: str, kind, required: bool = True, default=None):
    if key not in md:
        if required:
            raise ConfigError(f"model metadata is missing required key {key!r}")
        return default
    v = md[key]
    if kind is int:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"metadata key {key!r} is {v!r}, expected an integer")
        return int(v)
    if kind is float:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ConfigError(f"metadata key {key!r} is {v!r}, expected a number")
        return float(v)
    if kind is str and not isinstance(v, str):
        raise ConfigError(f"metadata key {key!r} is {v!r}, expected a string")
    return v


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int        # key length per head
    head_dim_v: int      # value length per head
    ffn_dim: int
    vocab_size: int
    context_length: int  # as trained (metadata)
    norm_eps: float
    rope_base: float
    rope_dim: int        # rotated dimensions per head (partial rotary when < head_dim)
    rope_scale: float    # linear scaling: positions are divided by this
    sliding_window: int = 0
    spec: ArchSpec = field(default_factory=ArchSpec)
    rope_scaling: str = "none"      # "none" | "linear" | "longrope" (per-dimension factors from tensors)
    rope_orig_context: int = 0      # longrope: context trained before the extension (long factors past it)
    rope_attn_factor: float = 1.0   # longrope: cos and sin are multiplied by this (llama.cpp attn_factor)

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def tensor_shapes(self, n_layers: int | None = None) -> dict[str, TensorShape]:
        """Every tensor the graph reads, by GGUF name, with its shape and whether this architecture
        requires it. Optional: biases, `output.weight` (absent: tied to the embeddings) and a fused
        `attn_qkv` (present: it stands for attn_q, attn_k and attn_v). `n_layers` lists only the
        first layers' tensors."""
        d, H, KV, hd, hdv, f, V = (self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.head_dim_v,
                                   self.ffn_dim, self.vocab_size)
        spec, qkv = self.spec, H * hd + KV * hd + KV * hdv
        T = TensorShape
        out = {"token_embd.weight": T((V, d), True), "output.weight": T((V, d), False), "output.bias": T((V,), False),
               "output_norm.weight": T((d,), True), "output_norm.bias": T((d,), False),
               # per-dimension RoPE frequency divisors: llama3 scaling (rope_freqs), longrope (long/short)
               "rope_freqs.weight": T((self.rope_dim // 2,), False)}
        longrope = self.rope_scaling == "longrope"
        out.update({f"rope_factors_{x}.weight": T((self.rope_dim // 2,), longrope) for x in ("long", "short")})
        for i in range(self.n_layers if n_layers is None else min(n_layers, self.n_layers)):
            layer = {"attn_norm.weight": T((d,), True), "attn_norm.bias": T((d,), False),
                     "attn_q.weight": T((H * hd, d), True), "attn_q.bias": T((H * hd,), spec.qkv_bias),
                     "attn_k.weight": T((KV * hd, d), True), "attn_k.bias": T((KV * hd,), spec.qkv_bias),
                     "attn_v.weight": T((KV * hdv, d), True), "attn_v.bias": T((KV * hdv,), spec.qkv_bias),
                     "attn_qkv.weight": T((qkv, d), False), "attn_qkv.bias": T((qkv,), False),
                     "attn_output.weight": T((d, H * hdv), True), "attn_output.bias": T((d,), False),
                     "ffn_up.weight": T((f, d), True), "ffn_up.bias": T((f,), False),
                     "ffn_down.weight": T((d, f), True), "ffn_down.bias": T((d,), False)}
            if not spec.parallel_block:  # phi2's MLP reads the attention's normalized input
                layer["ffn_norm.weight"] = T((d,), True)
            if spec.fused_gate_up:
                layer["ffn_up.weight"] = T((2 * f, d), True)
            elif spec.ffn != "gelu":
                layer["ffn_gate.weight"] = T((f, d), True)
            if spec.qk_norm:
                layer.update({"attn_q_norm.weight": T((hd,), True), "attn_k_norm.weight": T((hd,), True)})
            if spec.post_norms:
                layer.update({"post_attention_norm.weight": T((d,), True), "post_ffw_norm.weight": T((d,), True)})
            out.update({f"blk.{i}.{name}": t for name, t in layer.items()})
        return out

    def check_tensors(self, shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        """Compare a file's tensors (name -> shape) with `tensor_shapes()`.

        Returns the required tensors that are missing, and the tensors whose shape differs from the
        config's, each with the shape the config gives."""
        # A block count beyond the file's layers is reported at the first absent layer, without listing
        # the tensors of every layer the metadata claims.
        in_file = max((int(m.group(1)) for n in shapes if (m := _BLOCK.match(n))), default=-1)
        want = self.tensor_shapes(n_layers=in_file + 2)
        missing = [n for n, t in want.items() if t.required and n not in shapes
                   and not (n.endswith(_QKV) and n[:n.index("attn_")] + "attn_qkv.weight" in shapes)
                   and not (n.endswith(_QKV_B) and n[:n.index("attn_")] + "attn_qkv.bias" in shapes)]
        wrong = {n: want[n].shape for n, s in shapes.items() if n in want and tuple(s) != want[n].shape}
        return missing, wrong

    def is_local_layer(self, i: int) -> bool:
        """Sliding-window layer? llama.cpp `llama_hparams::set_swa_pattern`: every Nth layer is global
        (N = 0: none is)."""
        p = self.spec.sliding_window_pattern
        return bool(self.sliding_window and (p == 0 or (i + 1) % p != 0))

    @classmethod
    def from_gguf(cls, md: dict) -> "ModelConfig":
        """Build the config from a GGUF metadata dict.

        Raises:
            UnsupportedError: `general.architecture` is not in `ARCHITECTURES`.
            ConfigError: a required key is missing or has the wrong kind of value.
        """
        arch = _get(md, "general.architecture", str)
        if arch not in ARCHITECTURES:
            raise UnsupportedError(f"unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        spec = ARCHITECTURES[arch]
        k = lambda name: f"{arch}.{name}"  # noqa: E731
        d_model = _get(md, k("embedding_length"), int)
        n_heads = _get(md, k("attention.head_count"), int)
        n_kv = _get(md, k("attention.head_count_kv"), int, False, n_heads)
        head_dim = _get(md, k("attention.key_length"), int, False, d_model // max(n_heads, 1))
        vocab = _get(md, k("vocab_size"), int, False)
        if vocab is None:
            tokens = md.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ConfigError(f"model metadata has neither {k('vocab_size')!r} nor 'tokenizer.ggml.tokens'")
            if not isinstance(tokens, list):
                raise ConfigError(f"metadata key 'tokenizer.ggml.tokens' is a {type(tokens).__name__}, "
                                  f"expected an array of strings")
            vocab = len(tokens)
        # llama.cpp llama_model::load_hparams: the type defaults to linear, the factor to 1 (no scaling).
        scaling = _get(md, k("rope.scaling.type"), str, False, "linear")
        factor = _get(md, k("rope.scaling.factor"), float, False, 1.0)
        if scaling not in ROPE_SCALINGS:
            raise UnsupportedError(f"{k('rope.scaling.type')} = {scaling!r} is not supported "
                                   f"(supported: {', '.join(ROPE_SCALINGS)})")
        context_length = _get(md, k("context_length"), int)
        cfg = cls(
            arch=arch,
            n_layers=_get(md, k("block_count"), int),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            head_dim_v=_get(md, k("attention.value_length"), int, False, head_dim),
            ffn_dim=_get(md, k("feed_forward_length"), int),
            vocab_size=vocab,
            context_length=context_length,
            norm_eps=_get(md, k(spec.eps_key), float),
            rope_base=_get(md, k("rope.freq_base"), float, False, 10000.0),
            rope_dim=_get(md, k("rope.dimension_count"), int, False, head_dim),
            rope_scale=factor if scaling == "linear" and factor > 0 else 1.0,
            sliding_window=_get(md, k("attention.sliding_window"), int, False, 0),
            spec=spec,
            rope_scaling="none" if scaling == "linear" and factor in (0.0, 1.0) else scaling,
            rope_orig_context=_get(md, k("rope.scaling.original_context_length"), int, False, context_length),
            rope_attn_factor=_get(md, k("rope.scaling.attn_factor"), float, False, 1.0),
        )
        for name, v in [("block_count", cfg.n_layers), ("embedding_length", d_model),
                        ("attention.head_count", n_heads), ("attention.head_count_kv", n_kv),
                        ("attention.key_length", head_dim), ("attention.value_length", cfg.head_dim_v),
                        ("feed_forward_length", cfg.ffn_dim), ("vocab_size", vocab)]:
            if not 0 < v <= MAX_DIM:
                derived = (f" (embedding_length {d_model} / head_count {n_heads})"
                           if name.endswith("_length") and k(name) not in md else "")
                raise ConfigError(f"metadata key {k(name)!r} is {v}{derived}, expected an integer "
                                  f"from 1 to {MAX_DIM}")
        if cfg.context_length <= 0:
            raise ConfigError(f"metadata key {k('context_length')!r} is {cfg.context_length}, expected a positive integer")
        if cfg.sliding_window < 0:
            raise ConfigError(f"metadata key {k('attention.sliding_window')!r} is {cfg.sliding_window}, expected >= 0")
        for name, v in [(spec.eps_key, cfg.norm_eps), ("rope.freq_base", cfg.rope_base), ("rope.scaling.factor", factor)]:
            if not math.isfinite(v):
                raise ConfigError(f"metadata key {k(name)!r} is {v}, expected a finite number")
        if n_heads % n_kv:
            raise ConfigError(f"{k('attention.head_count')} = {n_heads} is not a multiple of "
                              f"{k('attention.head_count_kv')} = {n_kv}")
        if not 0 <= cfg.rope_dim <= head_dim or cfg.rope_dim % 2:
            raise ConfigError(f"{k('rope.dimension_count')} = {cfg.rope_dim} must be even and <= head size {head_dim}")
        return cfg

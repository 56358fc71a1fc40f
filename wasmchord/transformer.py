"""The transformer, written once against the backend interface.

LLaMA (Llama-3, Mistral), Qwen2/Qwen3, Phi-2/Phi-3 and Gemma 3 differ only by `ArchSpec` flags,
which tensors exist and the RoPE table's inputs.
Tensor names are GGUF's (`token_embd`, `blk.{i}.attn_q`, `output_norm`, `output`); a missing
`output.weight` means the output head is tied to the embeddings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .backends.base import ON_DEVICE, Backend, OnDevice, WeightSource
from .config import ModelConfig
from .errors import ConfigError, GenerationError, GGUFError, UnsupportedError
from .formats.gguf import GGUFFile

log = logging.getLogger(__name__)


@dataclass
class Layer:
    attn_norm: object
    wqkv: object           # q | k | v stacked by rows: [(H + 2 KV) * hd, d]
    wo: object             # [d, H * hd_v]
    ffn_norm: object | None
    w_up: object           # swiglu/geglu: gate | up stacked [2f, d]; gelu MLP: up [f, d]
    w_down: object         # [d, f]
    bqkv: object = None
    bo: object = None
    attn_norm_b: object = None
    b_up: object = None
    b_down: object = None
    q_norm: object = None
    k_norm: object = None
    post_attn_norm: object = None
    post_ffn_norm: object = None


class Transformer:
    """Weights on a backend plus the forward pass. Holds no sequence state besides the KV cache."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, backend: Backend, max_ctx: int, progress=None, slots: int = 1):
        self.cfg, self.be, self.max_ctx, self.slots = cfg, backend, max_ctx, slots
        self._gf = gf
        spec = cfg.spec
        why = backend.supports(spec)
        if why:
            raise UnsupportedError(f"{gf.path.name}: the {backend.name} backend cannot run {cfg.arch}: {why}")
        missing, wrong = cfg.check_tensors({name: ti.shape for name, ti in gf.tensors.items()})
        if missing:
            raise GGUFError(gf.path, f"missing tensor {missing[0]!r} required by the {cfg.arch} architecture")
        if wrong:
            name, want = next(iter(wrong.items()))
            raise GGUFError(gf.path, f"tensor {name!r} has shape {list(gf.tensors[name].shape)}, but the config "
                                     f"gives {list(want)}")
        self.tok_embd = self._matrix(["token_embd.weight"])
        self.tied = "output.weight" not in gf.tensors
        self.output = self.tok_embd if self.tied else self._matrix(["output.weight"])
        self.output_b = self._vec("output.bias")
        self.output_norm = self._vec("output_norm.weight")
        self.output_norm_b = self._vec("output_norm.bias")
        self.layers = []
        for i in range(cfg.n_layers):
            if progress:
                progress("load weights", i, cfg.n_layers)
            p = f"blk.{i}."
            if f"{p}attn_qkv.weight" in gf.tensors:
                wqkv, bqkv = [f"{p}attn_qkv.weight"], self._vec(f"{p}attn_qkv.bias")
            else:
                wqkv = [f"{p}attn_{x}.weight" for x in ("q", "k", "v")]
                bqkv = self._qkv_bias(p)
            fused = spec.ffn == "gelu" or spec.fused_gate_up  # one up matrix (phi3: gate | up rows)
            up = [f"{p}ffn_up.weight"] if fused else [f"{p}ffn_gate.weight", f"{p}ffn_up.weight"]
            self.layers.append(Layer(
                attn_norm=self._vec(f"{p}attn_norm.weight"),
                attn_norm_b=self._vec(f"{p}attn_norm.bias"),
                wqkv=self._matrix(wqkv), bqkv=bqkv,
                wo=self._matrix([f"{p}attn_output.weight"]),
                bo=self._vec(f"{p}attn_output.bias"),
                ffn_norm=None if spec.parallel_block else self._vec(f"{p}ffn_norm.weight"),
                w_up=self._matrix(up), b_up=self._vec(f"{p}ffn_up.bias"),
                w_down=self._matrix([f"{p}ffn_down.weight"]),
                b_down=self._vec(f"{p}ffn_down.bias"),
                q_norm=self._vec(f"{p}attn_q_norm.weight"),
                k_norm=self._vec(f"{p}attn_k_norm.weight"),
                post_attn_norm=self._vec(f"{p}post_attention_norm.weight"),
                post_ffn_norm=self._vec(f"{p}post_ffw_norm.weight"),
            ))
        gf.release()  # what reading small tensors mapped around them (the kernel maps pages in clusters)
        if progress:
            progress("load weights", cfg.n_layers, cfg.n_layers)
        self.rope_ext = self._rope_ext()
        self._attention_args = [self._attention_kw(i, L) for i, L in enumerate(self.layers)]
        # KV caches for `slots` sequences; `cache` is slot 0's. owners[i]: the generate.Sequence whose
        # tokens slot i holds.
        self.cache = backend.alloc_kv_cache(cfg.n_layers, cfg.n_kv_heads, max_ctx, cfg.head_dim, cfg.head_dim_v,
                                            slots=slots)
        self.owners: list = [None] * slots
        self.closed = False

    def close(self):
        """Drop the weights and the KV cache (freed once nothing else refers to them); later passes raise."""
        self.closed = True
        self.tok_embd = self.output = self.output_b = self.output_norm = self.output_norm_b = None
        self.layers, self._attention_args, self.cache = [], [], None

    def _check_open(self):
        if self.closed:
            raise GenerationError("the model was closed (Model.close()): load it again to use it")

    # ------------------------------------------------------------------------------------ loading
    # Required tensors are present and every known tensor has the config's shape (checked in __init__).
    # Weights go to the backend one matrix at a time, and the file's pages of each are released once
    # it is there: loading holds the converted (or uploaded) weights and one matrix of the file.
    def _matrix(self, names: list[str]):
        """The tensors `names` stacked by rows as one backend matrix (e.g. q | k | v)."""
        gf = self._gf
        m = self.be.load_matrix([WeightSource(n, gf.tensor_bytes(n), gf.tensors[n].ggml_type, gf.tensors[n].shape)
                                 for n in names])
        for n in names:
            gf.release(n)
        return m

    def _qkv_bias(self, p: str):
        """q | k | v biases of block prefix `p`, concatenated on the host and uploaded; None without any."""
        names = [f"{p}attn_{x}.bias" for x in ("q", "k", "v")]
        have = [b in self._gf.tensors for b in names]
        if not any(have):
            return None
        if not all(have):
            raise GGUFError(self._gf.path, f"missing tensor {names[have.index(False)]!r}: the block's other "
                                           f"attention biases are present")
        return self.be.load_vector(np.concatenate([self._gf.dequantize(b).reshape(-1) for b in names]))

    def _attention_kw(self, i: int, L: Layer) -> dict:
        """Layer i's attention keywords (RoPE, scale, window, qk-norm), made once at load."""
        cfg, spec = self.cfg, self.cfg.spec
        local = cfg.is_local_layer(i)
        base = spec.rope_base_local if local and spec.rope_base_local else cfg.rope_base
        rope = dict(base=base, n_rot=cfg.rope_dim, scale=cfg.rope_scale, neox=spec.rope_style == "neox", **self.rope_ext)
        return dict(rope=rope, scale=cfg.attn_scale, window=cfg.sliding_window if local else 0,
                    qk_norm=(L.q_norm, L.k_norm, cfg.norm_eps) if spec.qk_norm else None)

    def _rope_ext(self) -> dict:
        """The RoPE table's inputs beyond base, dims and linear scale, as rope() keywords: per-dimension
        frequency divisors (`factors`) and a cos/sin multiplier (`attn_factor`). Llama-3 scaling stores
        its divisors as `rope_freqs`; longrope (Phi-3) stores long and short ones and takes the long ones
        when the context exceeds the original (llama.cpp llama_model::get_rope_factors)."""
        cfg, gf = self.cfg, self._gf
        name = "rope_freqs.weight"
        if cfg.rope_scaling == "longrope":
            name = f"rope_factors_{'long' if self.max_ctx > cfg.rope_orig_context else 'short'}.weight"
        ext = {}
        if name in gf.tensors:
            ext["factors"] = tuple(float(f) for f in gf.dequantize(name).reshape(-1))
        if cfg.rope_attn_factor != 1.0:
            ext["attn_factor"] = cfg.rope_attn_factor
        return ext

    def _vec(self, name: str):
        """A small tensor, or None when the file does not have it (an optional one)."""
        if name not in self._gf.tensors:
            return None
        return self.be.load_vector(self._gf.dequantize(name).reshape(-1))

    # ------------------------------------------------------------------------------------ forward
    def _norm(self, x, w, b=None):
        if self.cfg.spec.norm == "layer":
            return self.be.layernorm(x, w, b, self.cfg.norm_eps)
        return self.be.rmsnorm(x, w, self.cfg.norm_eps)

    def _prenorm(self, x, w, b=None):
        """The normalized input of a matmul as (x, norm=): an RMSNorm is handed to the matmul, which
        may fold it into its prologue (one GPU dispatch); a LayerNorm is applied here."""
        if self.cfg.spec.norm == "layer" or self.cfg.spec.parallel_block:  # parallel: x changes before the MLP reads h
            return self._norm(x, w, b), None
        return x, (w, self.cfg.norm_eps)

    def decode(self, pos0: int, slot: int = 0):
        """One decode step at position pos0 whose input token the last argmax/sample left on the device
        (encode-ahead): the backend may replay a captured step instead of running the graph."""
        self._check_open()
        cache = self.cache.slot(slot)
        return self.be.decode_step(cache, pos0, lambda: self.forward(ON_DEVICE, pos0, slot=slot))

    def forward(self, ids: np.ndarray, pos0: int, *, all_logits: bool = False, hidden: list | None = None,
                slot: int = 0):
        """Run positions pos0..pos0+n-1 of the sequence in cache slot `slot` for token `ids` [n]; write
        their K/V to the cache.

        Returns logits [n, vocab] when all_logits, else [vocab] for the last position (backend handles).
        `hidden`, when given, receives the residual stream [n, d] after each layer (as NumPy arrays).
        """
        self._check_open()
        if pos0 + len(ids) > self.max_ctx:
            raise ConfigError(f"context full: {pos0 + len(ids)} positions > context length {self.max_ctx}")
        cache = self.cache.slot(slot)

        def attend(i, q, k, v, **kw):
            return self.be.attend(q, k, v, cache, i, pos0, **kw)
        logits = self._run(ids, attend, all_logits, hidden)
        return logits if all_logits else logits[0]

    def forward_batch(self, ids, positions, slots):
        """One decode step of B sequences: token ids[b] at position positions[b] of the sequence in cache
        slot slots[b]; writes their K/V. Returns logits [B, vocab] (a backend handle). `ids` may be
        OnDevice(B): the tokens the last argmax_rows left on the device (encode-ahead)."""
        self._check_open()
        if max(positions) + 1 > self.max_ctx:
            raise ConfigError(f"context full: {max(positions) + 1} positions > context length {self.max_ctx}")

        def attend(i, q, k, v, **kw):
            return self.be.attend_batch(q, k, v, self.cache, i, positions, slots, **kw)
        ids = ids if isinstance(ids, OnDevice) else np.asarray(ids, np.int64)
        return self.be.decode_batch(self.cache, ids, positions, slots, lambda: self._run(ids, attend, True, None))

    def _run(self, ids, attend, all_logits, hidden):
        """The layers over token rows `ids` [n]; `attend(layer, q, k, v, rope=, scale=, window=, qk_norm=)`
        places the rows in their sequences."""
        with self.be.forward_scope():
            return self._layers(ids, attend, all_logits, hidden)

    def _layers(self, ids, attend, all_logits, hidden):
        cfg, be, spec = self.cfg, self.be, self.cfg.spec
        H, KV, hd, hdv = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim_v
        eps = cfg.norm_eps
        be.begin_forward()
        x = be.embed(self.tok_embd, ids, math.sqrt(cfg.d_model) if spec.embed_scale_sqrt_d else 1.0)  # [n, d]
        sizes, heads = [H * hd, KV * hd, KV * hdv], [H, KV, KV]
        for i, L in enumerate(self.layers):
            h, norm = self._prenorm(x, L.attn_norm, L.attn_norm_b)
            qkv = be.matmul(h, L.wqkv, L.bqkv, norm=norm)                                   # [n, (H+2KV)*hd]
            q, k, v = be.split_heads(qkv, sizes, heads)                                     # [n, H|KV, hd]
            a = attend(i, q, k, v, **self._attention_args[i])                               # [n, H*hdv]
            if spec.post_norms:  # gemma3: norm the attention output before the residual add
                x = be.add(x, be.rmsnorm(be.matmul(a, L.wo, L.bo), L.post_attn_norm, eps))
            else:
                x = be.matmul(a, L.wo, L.bo, residual=x)                                     # x += a @ wo.T
            if not spec.parallel_block:  # phi2's MLP reads the same normalized h as its attention
                h, norm = self._prenorm(x, L.ffn_norm)
            if spec.post_norms:
                x = be.add(x, be.rmsnorm(self._ffn(h, L, norm=norm), L.post_ffn_norm, eps))  # [n, d]
            else:
                x = self._ffn(h, L, residual=x, norm=norm)                                   # x += ffn(norm(x))
            if hidden is not None:
                hidden.append(np.array(be.read(x)))
        if not all_logits:
            x = x[-1:]
        h, norm = self._prenorm(x, self.output_norm, self.output_norm_b)
        return be.logits(h, self.output, self.output_b, norm=norm)                           # [n|1, vocab]

    def _ffn(self, h, L, residual=None, norm=None):
        be, ffn = self.be, self.cfg.spec.ffn
        if ffn in ("swiglu", "geglu") and L.b_up is None:  # gate|up and the gated activation, fusable
            act = be.matmul_glu(h, L.w_up, ffn, norm=norm)                                  # [n, f]
        else:
            up = be.matmul(h, L.w_up, L.b_up, norm=norm)                                     # [n, 2f] or [n, f]
            act = be.swiglu(up) if ffn == "swiglu" else be.geglu(up) if ffn == "geglu" else be.gelu(up)  # [n, f]
        return be.matmul(act, L.w_down, L.b_down, residual=residual)                         # [n, d]

"""Test helpers: tiny Hugging Face LLaMA models written to GGUF as llama.cpp's converter does."""

import numpy as np

from wasmchord.convert import permute_qk
from wasmchord.formats.gguf_writer import GGUFWriter


def tiny_vocab(n: int) -> dict:
    toks = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": toks,
            "tokenizer.ggml.scores": np.zeros(n, np.float32),
            "tokenizer.ggml.token_type": np.array([2, 3, 3] + [1] * (n - 3), np.int32),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def write_llama_gguf(hf_model, path, qtype="F32"):
    c = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    kv = c.num_key_value_heads
    hd = c.hidden_size // c.num_attention_heads
    w = GGUFWriter("llama")
    for k, v in {"llama.block_count": c.num_hidden_layers, "llama.context_length": c.max_position_embeddings,
                 "llama.embedding_length": c.hidden_size, "llama.feed_forward_length": c.intermediate_size,
                 "llama.attention.head_count": c.num_attention_heads, "llama.attention.head_count_kv": kv,
                 "llama.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
                 "llama.rope.freq_base": float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]),
                 "llama.rope.dimension_count": hd}.items():
        w.add(k, v)
    for k, v in tiny_vocab(c.vocab_size).items():
        w.add(k, v)
    mat = lambda name, a: w.add_tensor(name, a, qtype=qtype)  # noqa: E731
    vec = lambda name, a: w.add_tensor(name, a, qtype="F32")  # noqa: E731
    mat("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        vec(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        mat(f"blk.{i}.attn_q.weight", permute_qk(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        mat(f"blk.{i}.attn_k.weight", permute_qk(sd[p + "self_attn.k_proj.weight"], kv))
        mat(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        mat(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        vec(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        mat(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        mat(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        mat(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    vec("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        mat("output.weight", sd["lm_head.weight"])
    w.write(path)
    return path


def tiny_llama(*, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, vocab=100, tied=False, seed=0, rope_theta=10000.0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                      rope_theta=rope_theta, bos_token_id=1, eos_token_id=2)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init is tiny; widen it so errors would show
        for p in m.parameters():
            p.mul_(20 if p.dim() > 1 else 1).add_(torch.randn_like(p) * (0 if p.dim() > 1 else 0.1))
    return m

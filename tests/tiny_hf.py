"""Tiny Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3, Phi-2, Phi-3) with tokenizers, written to a directory as
save_pretrained does: tests turn them into GGUF files through the real converter (wasmchord.convert),
and so does the llama.cpp fixture tool."""

import json
from pathlib import Path

CORPUS_TEXT = ("The quick brown fox jumps over the lazy dog. Hello world, hello there! Numbers 123 456 "
               "and dates 2024-01-15. Code: def f(x): return x * 2. Café naïve résumé. Привет мир. ") * 20


def _widen(model, seed, calm=False):
    """Default init is tiny; widen it so that differences would show. `calm` widens only the embedding
    and output head: logits get a clear top-1 margin, as trained models have, so that quantization
    tests measure quantization and not a chaotic random network."""
    import torch
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(150 if calm and ("embed" in name or "lm_head" in name) else 1 if calm else 20)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def spm_tokenizer(d: Path, vocab: int):
    import sentencepiece as spm
    (d / "corpus.txt").write_text(CORPUS_TEXT)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2, num_threads=1,
                                   character_coverage=1.0, hard_vocab_limit=False)
    (d / "corpus.txt").unlink()
    (d / "tokenizer.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}))
    return spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).get_piece_size()


# tokenizer.json Split regexes of real byte-level BPE tokenizers (as their tokenizer.json spell them)
SPLITS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def bpe_tokenizer(d: Path, vocab: int, *, train: bool = True, split: str | None = None):
    """A byte-level BPE tokenizer.json: trained with `tokenizers`, or (train=False) bytes only, no merges.
    `split`: a key of SPLITS, the regex a Split pre-tokenizer applies before the byte mapping."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLITS[split]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab if train else 259, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS_TEXT], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "<s>",
                                                         "eos_token": "</s>", "unk_token": None}))
    return len(tok.get_vocab())


def _save(d, config_cls, model_cls, *, seed, tokenizer, calm, extra_vocab=0, **cfg):
    """A random model of `config_cls` with a tokenizer ("spm", "bpe" trained, "bytes" without merges) in `d`."""
    import torch
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        vocab = spm_tokenizer(d, 400)
    else:  # "bpe", "bytes", or a key of SPLITS (a trained BPE behind that Split regex)
        vocab = bpe_tokenizer(d, 300, train=tokenizer != "bytes", split=SPLITS.get(tokenizer) and tokenizer)
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=vocab + extra_vocab, **cfg)
    m = _widen(model_cls(cfg).eval(), seed, calm)
    m.save_pretrained(d)
    return m


def make_llama(d, *, seed=0, tokenizer="spm", hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, tied=False, calm=False,
               extra_vocab=0, rope_theta=10000.0, rope_scaling=None, max_pos=256):
    """A random LLaMA in `d`; `extra_vocab` pads the embedding beyond the tokenizer (an odd size, say);
    `rope_scaling` as config.json's (Llama-3: {"rope_type": "llama3", ...})."""
    from transformers import LlamaConfig, LlamaForCausalLM
    rope = {"rope_theta": rope_theta, "rope_type": "default", **(rope_scaling or {})}
    return _save(d, LlamaConfig, LlamaForCausalLM, seed=seed, tokenizer=tokenizer, calm=calm, extra_vocab=extra_vocab,
                 hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 intermediate_size=ffn, max_position_embeddings=max_pos, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                 rope_parameters=rope, bos_token_id=1, eos_token_id=2)


def make_mistral(d, *, seed=0, tokenizer="bytes", sliding_window=None, calm=False):
    from transformers import MistralConfig, MistralForCausalLM
    return _save(d, MistralConfig, MistralForCausalLM, seed=seed, tokenizer=tokenizer, calm=calm, hidden_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                 max_position_embeddings=256, sliding_window=sliding_window, rms_norm_eps=1e-5, bos_token_id=1,
                 eos_token_id=2)


def make_qwen2(d, *, seed=0, tokenizer="bytes", tied=False, calm=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return _save(d, Qwen2Config, Qwen2ForCausalLM, seed=seed, tokenizer=tokenizer, calm=calm, hidden_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                 max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-6,
                 rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, bos_token_id=1, eos_token_id=2)


def make_qwen3(d, *, seed=0, tokenizer="bytes", calm=False):
    """Qwen3 with an explicit head_dim (32) unlike hidden / heads (16), as Qwen3-0.6B has."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return _save(d, Qwen3Config, Qwen3ForCausalLM, seed=seed, tokenizer=tokenizer, calm=calm, hidden_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
                 max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, bos_token_id=1, eos_token_id=2)


def make_phi3(d, *, seed=0, tokenizer="bytes", longrope=False, sliding_window=None, calm=False):
    """Phi-3 (fused qkv and gate_up); `longrope`: Phi-3-128k's scaling, original context 64 of 256."""
    from transformers import Phi3Config, Phi3ForCausalLM
    import numpy as np
    rope = {"rope_theta": 10000.0, "rope_type": "default"}
    if longrope:
        g = np.random.default_rng(seed)
        rope = {"rope_theta": 10000.0, "rope_type": "longrope", "original_max_position_embeddings": 64,
                "long_factor": (1 + 4 * g.random(8)).round(3).tolist(), "short_factor": (1 + g.random(8)).round(3).tolist()}
    return _save(d, Phi3Config, Phi3ForCausalLM, seed=seed, tokenizer=tokenizer, calm=calm, hidden_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                 max_position_embeddings=256, original_max_position_embeddings=64, rms_norm_eps=1e-5,
                 rope_parameters=rope, sliding_window=sliding_window, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_phi2(d, *, seed=0, hidden=64, layers=2, heads=4, ffn=128, calm=False):
    import torch
    from transformers import PhiConfig, PhiForCausalLM
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    vocab = bpe_tokenizer(d, 300)
    torch.manual_seed(seed)
    cfg = PhiConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                    vocab_size=vocab + 5, max_position_embeddings=256, partial_rotary_factor=0.5,
                    layer_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    m = _widen(PhiForCausalLM(cfg).eval(), seed, calm)
    m.save_pretrained(d)
    return m


# Llama-3.1's RoPE scaling with the original context cut to 64, so that a tiny model's few frequencies
# fall in all three bands (kept, smoothed, divided by the factor).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# The architecture variants of the converter tests and of tools/make_convert_fixtures.py: name ->
# maker(d, calm=...). Each is seeded: the same call builds the same checkpoint.
VARIANTS = {
    "llama3": lambda d, **kw: make_llama(d, tokenizer="bytes", tied=True, rope_theta=500000.0,
                                         rope_scaling=LLAMA3_ROPE, **kw),
    "mistral": lambda d, **kw: make_mistral(d, **kw),
    "mistral_swa": lambda d, **kw: make_mistral(d, sliding_window=8, **kw),
    "qwen2": lambda d, **kw: make_qwen2(d, **kw),
    "qwen3": lambda d, **kw: make_qwen3(d, **kw),
    "phi3": lambda d, **kw: make_phi3(d, sliding_window=2047, **kw),
    "phi3_longrope": lambda d, **kw: make_phi3(d, longrope=True, **kw),
}

"""Tiny Hugging Face checkpoints (LLaMA, Phi-2) with tokenizers, written to a directory as
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


def bpe_tokenizer(d: Path, vocab: int, *, train: bool = True):
    """A byte-level BPE tokenizer.json: trained with `tokenizers`, or (train=False) bytes only, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab if train else 259, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS_TEXT], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "<s>",
                                                         "eos_token": "</s>", "unk_token": None}))
    return len(tok.get_vocab())


def make_llama(d, *, seed=0, tokenizer="spm", hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, tied=False, calm=False,
               extra_vocab=0, rope_theta=10000.0):
    """A random LLaMA in `d`; `extra_vocab` pads the embedding beyond the tokenizer (an odd size, say)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        vocab = spm_tokenizer(d, 400)
    else:
        vocab = bpe_tokenizer(d, 300, train=tokenizer == "bpe")
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab + extra_vocab,
                      max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=rope_theta,
                      bos_token_id=1, eos_token_id=2)
    m = _widen(LlamaForCausalLM(cfg).eval(), seed, calm)
    m.save_pretrained(d)
    return m


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

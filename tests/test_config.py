"""Model config from GGUF metadata."""

import time

import pytest

from wasmchord.config import ModelConfig
from wasmchord.errors import ConfigError, UnsupportedError
from wasmchord.formats.gguf import GGUFFile

LLAMA = {
    "general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
    "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.feed_forward_length": 96,
    "llama.context_length": 128, "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "tokenizer.ggml.tokens": ["a"] * 100,
}


def test_llama_config_derives_head_dim_and_vocab_from_tokens():
    c = ModelConfig.from_gguf(LLAMA)
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == (2, 64, 4, 2, 16, 96)
    assert c.vocab_size == 100 and c.n_rep == 2 and c.rope_base == 10000.0 and c.rope_dim == 16


def test_explicit_vocab_size_and_linear_rope_scaling():
    c = ModelConfig.from_gguf({**LLAMA, "llama.vocab_size": 90, "llama.rope.scaling.type": "linear",
                               "llama.rope.scaling.factor": 4.0, "llama.rope.freq_base": 5e5})
    assert c.vocab_size == 90 and c.rope_scale == 4.0 and c.rope_base == 5e5


def test_a_rope_factor_without_a_type_scales_linearly_as_in_llama_cpp():
    c = ModelConfig.from_gguf({**LLAMA, "llama.rope.scaling.factor": 2.0})
    assert (c.rope_scale, c.rope_scaling) == (2.0, "linear")


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "llama3"])
def test_a_rope_scaling_type_we_do_not_implement_is_named(kind):
    with pytest.raises(UnsupportedError, match=f"llama.rope.scaling.type = '{kind}' is not supported"):
        ModelConfig.from_gguf({**LLAMA, "llama.rope.scaling.type": kind, "llama.rope.scaling.factor": 4.0})


def test_longrope_needs_its_factor_tensors():
    c = ModelConfig.from_gguf({**LLAMA, "llama.rope.scaling.type": "longrope",
                               "llama.rope.scaling.original_context_length": 64})
    assert (c.rope_scaling, c.rope_orig_context, c.rope_scale) == ("longrope", 64, 1.0)
    assert c.tensor_shapes()["rope_factors_long.weight"] == ((8,), True)


def test_a_sliding_window_without_a_pattern_covers_every_layer():
    c = ModelConfig.from_gguf({**LLAMA, "llama.attention.sliding_window": 8})
    assert [c.is_local_layer(i) for i in range(2)] == [True, True]
    assert not ModelConfig.from_gguf(LLAMA).is_local_layer(0)


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                                 "llama.feed_forward_length", "llama.context_length",
                                 "llama.attention.layer_norm_rms_epsilon"])
def test_missing_required_key_is_named(key):
    md = {k: v for k, v in LLAMA.items() if k != key}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.from_gguf(md)


def test_wrong_value_kind_is_named():
    with pytest.raises(ConfigError, match="llama.block_count"):
        ModelConfig.from_gguf({**LLAMA, "llama.block_count": "two"})


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedError, match="mamba"):
        ModelConfig.from_gguf({**LLAMA, "general.architecture": "mamba"})


def test_heads_must_divide():
    with pytest.raises(ConfigError, match="head_count_kv"):
        ModelConfig.from_gguf({**LLAMA, "llama.attention.head_count_kv": 3})


def test_real_smollm2_config(smollm2_path):
    c = ModelConfig.from_gguf(GGUFFile(smollm2_path).metadata)
    assert (c.arch, c.n_layers, c.d_model, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 1536, 9, 3, 64)
    assert (c.rope_base, c.context_length, c.vocab_size) == (100000.0, 8192, 49152)


def test_real_gemma3_config(gemma_path):
    c = ModelConfig.from_gguf(GGUFFile(gemma_path).metadata)
    assert (c.arch, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.sliding_window) == \
        ("gemma3", 18, 640, 4, 1, 256, 512)
    assert [c.is_local_layer(i) for i in range(6)] == [True] * 5 + [False]


def test_real_qwen2_config(qwen_path):
    c = ModelConfig.from_gguf(GGUFFile(qwen_path).metadata)
    assert (c.arch, c.n_layers, c.d_model, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("qwen2", 28, 1536, 8960, 12, 2, 128)
    assert (c.rope_base, c.vocab_size, c.rope_scaling, c.sliding_window) == (1e6, 151936, "none", 0)
    assert c.tensor_shapes()["blk.0.attn_k.bias"] == ((256,), True)  # qwen2 requires its biases


def test_tensor_shapes_of_the_real_models_match_their_config(smollm2_path, gemma_path, qwen_path):
    for p in (smollm2_path, gemma_path, qwen_path):
        gf = GGUFFile(p)
        cfg = ModelConfig.from_gguf(gf.metadata)
        assert cfg.check_tensors({n: ti.shape for n, ti in gf.tensors.items()}) == ([], {})
        assert set(gf.tensors) <= set(cfg.tensor_shapes())  # every tensor of the file is one the graph knows


def test_check_tensors_names_missing_and_misshapen_tensors():
    cfg = ModelConfig.from_gguf(LLAMA)
    shapes = {n: t.shape for n, t in cfg.tensor_shapes().items() if t.required}
    assert cfg.check_tensors(shapes) == ([], {})
    del shapes["blk.1.ffn_gate.weight"]
    shapes["blk.0.attn_output.weight"] = (64, 63)
    assert cfg.check_tensors(shapes) == (["blk.1.ffn_gate.weight"], {"blk.0.attn_output.weight": (64, 64)})


def test_a_fused_qkv_tensor_stands_for_q_k_and_v():
    cfg = ModelConfig.from_gguf(LLAMA)
    shapes = {n: t.shape for n, t in cfg.tensor_shapes().items()
              if t.required and not n.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight"))}
    assert len(cfg.check_tensors(shapes)[0]) == 6
    shapes.update({f"blk.{i}.attn_qkv.weight": (64 + 2 * 32, 64) for i in range(2)})
    assert cfg.check_tensors(shapes) == ([], {})


def test_a_head_size_of_zero_names_the_keys_it_comes_from():
    md = {k: v for k, v in LLAMA.items()}
    md["llama.embedding_length"] = 2  # 2 // 4 heads: a head size of 0 (a ZeroDivisionError before)
    with pytest.raises(ConfigError, match=r"llama\.attention\.key_length' is 0 \(embedding_length 2 / head_count 4\)"):
        ModelConfig.from_gguf(md)


@pytest.mark.parametrize("key,value", [("llama.embedding_length", 2**31), ("llama.block_count", 2**40),
                                       ("llama.attention.head_count", 2**32), ("llama.vocab_size", 0),
                                       ("llama.attention.value_length", -1), ("llama.attention.key_length", 0)])
def test_dimensions_are_bounded_before_anything_is_sized_by_them(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*expected an integer from 1 to"):
        ModelConfig.from_gguf({**LLAMA, key: value})


@pytest.mark.parametrize("key,value", [("llama.rope.dimension_count", -2), ("llama.attention.sliding_window", -1),
                                       ("llama.rope.freq_base", float("nan")),
                                       ("llama.attention.layer_norm_rms_epsilon", float("inf")),
                                       ("tokenizer.ggml.tokens", 5)])
def test_values_out_of_their_range_are_named(key, value):
    md = {**LLAMA, key: value}
    if key.startswith("tokenizer"):
        md.pop("llama.vocab_size", None)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.from_gguf(md)


def test_a_block_count_beyond_the_files_layers_is_checked_without_listing_them_all():
    cfg = ModelConfig.from_gguf({**LLAMA, "llama.block_count": 2**24})  # 16M layers x 13 tensors
    shapes = {n: t.shape for n, t in ModelConfig.from_gguf(LLAMA).tensor_shapes().items() if t.required}
    t = time.perf_counter()
    missing, wrong = cfg.check_tensors(shapes)
    assert time.perf_counter() - t < 1.0
    assert missing[0] == "blk.2.attn_norm.weight" and wrong == {}

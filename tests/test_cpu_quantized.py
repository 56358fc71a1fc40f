"""The CPU backend's default path (weights kept in their GGUF blocks, multiplied by the compiled
kernels) on SmolLM2 and Gemma-3, against transformers in float32 (which dequantizes the same GGUF
file): logits within 1e-3 of the logit scale, and greedy continuations identical, on the prompts of
the llama.cpp fixtures. Qwen2.5-Coder's default path is checked the same way in test_qwen.py, against
the transformers results computed there once."""

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wasmchord import Model, hub

FIXTURES = Path(__file__).parent / "fixtures"
PROMPTS = [p["prompt"] for p in json.loads(bytes(np.load(FIXTURES / "llama_smollm2-135m-instruct.npz")["meta"]).decode())
           ["prompts"]]
MODELS = ["smollm2-135m-instruct", "gemma3-270m"]


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    from transformers import AutoModelForCausalLM
    path = hub.pull(request.param)
    ours = Model.load(path, device="cpu", context_length=512)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    yield ours, hf
    del hf
    gc.collect()


def test_the_default_keeps_weights_quantized(pair):
    ours, _ = pair
    assert ours.backend.weights == "quantized"
    assert ours.transformer.layers[0].w_up.nbytes < ours.transformer.layers[0].w_up.shape[0] * \
        ours.transformer.layers[0].w_up.shape[1]  # under a byte per weight


def test_logits_within_1e_3_of_float32(pair):
    ours, hf = pair
    worst = 0.0
    for text in PROMPTS:
        ids = ours.tokenizer.encode(text)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        got = ours.logits(ids)
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    assert worst < 1e-3, worst


def test_greedy_continuations_equal_float32(pair):
    ours, hf = pair
    for text in PROMPTS:
        ids = ours.tokenizer.encode(text)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        got = ours.generate(ids, max_tokens=16, temperature=0).tokens
        assert got == ref[:len(got)], text

"""Qwen2.5-Coder-1.5B-Instruct (qwen2: q/k/v biases, a 151,936-token byte-level BPE with the qwen2
pre-tokenizer, Q4_K and Q6_K, 28 layers, 1.5 B parameters: ten times SmolLM2) against transformers
float32 (which dequantizes the same GGUF) and llama.cpp fixtures (tools/make_llama_fixtures.py), on
both backends. On the GPU (lavapipe in CI: a software adapter, slow on a model this size) a short
prompt runs through the decode kernels one token at a time, then a few tokens are generated; the
prompt kernels are covered on the tiny Qwen2 of test_architectures.py."""

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wasmchord import Model
from wasmchord.generate import Sequence

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA_CPP_NOISE = 0.5  # see test_model_cpu.py
TOL = 1e-4             # relative to the largest logit
EXACT = (0, 2, 8, 11)  # prompts compared logit by logit (8: 157 tokens of code, 11: the chat prompt)
GREEDY = (0, 1, 2)     # prompts whose greedy continuation is compared token by token
N_GREEDY = 16


def fixture():
    fx = np.load(FIXTURES / "llama_qwen2.5-coder-1.5b-instruct.npz")
    return fx, json.loads(bytes(fx["meta"]).decode())["prompts"]


def ids_of(fx, i):
    return fx[f"p{i}_ids"].tolist()


@pytest.fixture(scope="module")
def reference(qwen_path):
    """transformers' float32 results on the fixture prompts, computed once; its 7 GB model is freed
    before ours loads, so that the two never share the machine's memory."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(qwen_path.parent), gguf_file=qwen_path.name,
                                              dtype=torch.float32).eval()
    fx, prompts = fixture()
    ref = {"argmax": [], "logits": {}, "greedy": {}}
    with torch.no_grad():
        for i in range(len(prompts)):
            lg = hf(torch.tensor([ids_of(fx, i)])).logits[0].numpy()
            ref["argmax"].append(lg.argmax(1))
            if i in EXACT:
                ref["logits"][i] = lg
        for i in GREEDY:
            ids = ids_of(fx, i)
            ref["greedy"][i] = hf.generate(torch.tensor([ids]), max_new_tokens=N_GREEDY,
                                           do_sample=False)[0, len(ids):].tolist()
    del hf
    gc.collect()
    return ref


@pytest.mark.gpu
def test_qwen_gpu_matches_transformers(gpu_backend, qwen_path, reference):
    g = Model.load(qwen_path, device="gpu", context_length=64)
    fx, _ = fixture()
    ids = ids_of(fx, 0)
    seq = Sequence(g.transformer)
    rows = [g.backend.read(seq.prefill(ids[:1])[0])] + [g.backend.read(seq.step(t)) for t in ids[1:]]
    ref = reference["logits"][0]
    assert np.abs(np.stack(rows) - ref).max() < TOL * np.abs(ref).max()
    # the cache holds the prompt: generate re-evaluates its last token, then decodes (encode-ahead, replay)
    got = g.generate(ids, max_tokens=4, temperature=0, sequence=seq).tokens
    assert got == reference["greedy"][0][:4]
    assert g.backend.stream.replayed > 0
    del g, seq
    gc.collect()  # the device's memory (host memory under lavapipe) before the CPU model loads


@pytest.fixture(scope="module")
def qwen_cpu(reference, qwen_path):
    return Model.load(qwen_path, device="cpu", context_length=512)


@pytest.mark.parametrize("activations", ["f32", "default"])
def test_qwen_cpu_matches_transformers_float32(qwen_cpu, qwen_path, reference, activations):
    """The weights in their blocks with float32 activations: within TOL; the default (int16 activations
    on a VNNI CPU: two int8 planes per 32 columns) within issue 19's 1e-3 for the default path."""
    m = qwen_cpu if activations == "default" else Model.load(qwen_path, device="cpu", context_length=512,
                                                              activations="f32")
    tol = TOL if m.backend.activations == "f32" else 1e-3
    w = m.transformer.layers[0].w_up
    assert m.backend.weights == "quantized" and w.nbytes < w.shape[0] * w.shape[1]  # in blocks: under a byte a weight
    fx, _ = fixture()
    for i in EXACT:
        ref, ours = reference["logits"][i], m.logits(ids_of(fx, i))
        assert np.abs(ours - ref).max() < tol * np.abs(ref).max(), i
        assert (ours.argmax(1) == ref.argmax(1)).all(), i
    for i in GREEDY:
        ours = m.generate(ids_of(fx, i), max_tokens=N_GREEDY, temperature=0).tokens
        assert ours == reference["greedy"][i][:len(ours)], i


def test_qwen_cpu_agrees_with_llama_cpp_no_worse_than_transformers(qwen_cpu, reference):
    """llama.cpp rounds activations to 8 bits in its matmuls: its argmax differs from an exact float32
    evaluation at near-ties. Ours must agree with it at least as often as transformers' does. The first
    position of these BOS-less prompts is left out of the near-tie rule: Qwen's first token carries
    extreme activations, and there llama.cpp's rounding moves the top logits by more than 1 (it picks
    "0" where transformers and we pick "1", with margins up to 3.4)."""
    fx, prompts = fixture()
    ours_agree = hf_agree = clear = clear_agree = 0
    for i in range(len(prompts)):
        lg = qwen_cpu.logits(ids_of(fx, i))
        llama = fx[f"p{i}_argmax"]
        ok = lg.argmax(1) == llama
        sure = fx[f"p{i}_margin"] >= LLAMA_CPP_NOISE
        sure[0] = False
        ours_agree += ok.sum()
        hf_agree += (reference["argmax"][i] == llama).sum()
        clear += sure.sum()
        clear_agree += (ok & sure).sum()
        assert np.corrcoef(lg[-1], fx[f"p{i}_last"])[0, 1] > 0.99, i
    total = sum(p["n_tokens"] for p in prompts)
    assert ours_agree >= hf_agree, (ours_agree, hf_agree, total)
    assert clear_agree / clear >= 0.99, (clear_agree, clear)


def test_qwen_cpu_greedy_diverges_from_llama_cpp_only_at_near_ties(qwen_cpu):
    fx, prompts = fixture()
    identical = 0
    for i in range(0, len(prompts), 2):  # every other prompt: 16 decode steps each on a 1.5 B model
        ref = fx[f"p{i}_greedy"].tolist()[:N_GREEDY]
        ours = qwen_cpu.generate(ids_of(fx, i), max_tokens=N_GREEDY, temperature=0).tokens
        j = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if j is None:
            identical += 1
        else:
            assert fx[f"p{i}_greedy_margin"][j] < LLAMA_CPP_NOISE, (i, j)
    assert identical >= 3


def test_qwen_chat_stops_at_the_end_of_its_turn(qwen_cpu):
    reply = qwen_cpu.chat([{"role": "user", "content": "Write a Python function that adds two numbers."}],
                          max_tokens=48, temperature=0)
    assert "def " in reply.text and "<|im_end|>" not in reply.text

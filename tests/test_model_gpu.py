"""The whole model on the GPU backend (lavapipe in CI): against the CPU backend and llama.cpp fixtures;
the same generate/stream/chat API and CLI; large tensors split across bindings; faults."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wasmchord import Model
from wasmchord.backends.webgpu import WgpuBackend
from wasmchord.errors import BackendError

pytestmark = pytest.mark.gpu
FIXTURES = Path(__file__).parent / "fixtures"
LLAMA_CPP_NOISE = 0.5  # see test_model_cpu.py
SHORT = [0, 4, 9]      # llama.cpp fixture prompts short enough for lavapipe


@pytest.fixture(scope="module")
def pair(gpu_backend):
    g = Model.load("smollm2-135m-instruct", device="gpu", context_length=128)
    c = Model.load("smollm2-135m-instruct", device="cpu", weights="f32", context_length=128)
    return g, c


def test_logits_match_cpu_backend(pair):
    g, c = pair
    ids = c.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    lg, lc = g.logits(ids), c.logits(ids)
    assert np.abs(lg - lc).max() < 1e-3 * np.abs(lc).max()
    assert (lg.argmax(1) == lc.argmax(1)).all()


def test_against_llama_cpp_fixtures(pair):
    g, c = pair
    fx = np.load(FIXTURES / "llama_smollm2-135m-instruct.npz")
    agree = total = 0
    for i in SHORT:
        ids = fx[f"p{i}_ids"].tolist()
        lg = g.logits(ids)
        sure = fx[f"p{i}_margin"] >= LLAMA_CPP_NOISE
        agree += ((lg.argmax(1) == fx[f"p{i}_argmax"]) | ~sure).sum()
        total += len(ids)
        assert np.corrcoef(lg[-1], fx[f"p{i}_last"])[0, 1] > 0.999
    assert agree / total >= 0.99


def test_greedy_continuations_equal_cpu(pair):
    g, c = pair
    fx = np.load(FIXTURES / "llama_smollm2-135m-instruct.npz")
    for i in SHORT[:2]:
        ids = fx[f"p{i}_ids"].tolist()
        assert g.generate(ids, max_tokens=12, temperature=0).tokens == c.generate(ids, max_tokens=12, temperature=0).tokens


def test_greedy_decode_reads_back_only_the_token(pair):
    g, _ = pair
    calls = []
    orig = g.backend.read
    g.backend.read = lambda x: calls.append(x) or orig(x)
    try:
        g.generate("Hello", max_tokens=4, temperature=0)
    finally:
        g.backend.read = orig
    assert calls == []  # no logits came back: argmax ran on the GPU


def test_stream_chat_and_sampling_work_on_gpu(pair):
    g, c = pair
    chunks = list(g.stream("Once upon a time", max_tokens=6, temperature=0))
    assert chunks[-1].finish_reason == "length"
    assert "".join(ch.text for ch in chunks) == c.generate("Once upon a time", max_tokens=6, temperature=0).text
    r = g.chat([{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0.7, seed=3)
    assert r.completion_tokens >= 1
    assert r.tokens == g.chat([{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0.7, seed=3).tokens


def test_raw_encoding_equals_the_public_api(pair):
    """Dispatches encoded through wgpu-native's C functions give bit-identical results to wgpu-py's
    wrappers, for logits and for an encode-ahead greedy run."""
    g, c = pair
    assert g.backend.stream.raw  # the fast path is the one exercised everywhere else
    slow = Model.load("smollm2-135m-instruct", device="gpu", context_length=128, raw_encode=False)
    assert not slow.backend.stream.raw
    ids = c.tokenizer.encode("Raw and wrapped encoders, one answer:")
    assert np.array_equal(g.logits(ids), slow.logits(ids))
    assert g.generate(ids, max_tokens=8, temperature=0).tokens == slow.generate(ids, max_tokens=8, temperature=0).tokens


def test_output_head_split_across_bindings(gpu_backend):
    """A forced 8 MiB binding limit splits the 28 MB embedding/output table into pieces."""
    small = Model.load("smollm2-135m-instruct", device="gpu", context_length=32, max_binding_size=8 << 20)
    assert len(small.transformer.tok_embd.pieces) > 1
    ref = Model.load("smollm2-135m-instruct", device="cpu", weights="f32", context_length=32)
    ids = ref.tokenizer.encode("Hello world")
    lg = small.logits(ids)
    assert np.abs(lg - ref.logits(ids)).max() < 1e-3 * np.abs(lg).max()


def test_cli_generate_on_gpu(gpu_backend):
    r = subprocess.run([sys.executable, "-m", "wasmchord", "generate", "The capital of France is", "--raw", "-n", "3",
                        "--temperature", "0", "--backend", "gpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris")


def test_auto_device_does_not_pick_a_software_adapter(gpu_backend):
    m = Model.load("smollm2-135m-instruct", device="auto", context_length=16)
    from wasmchord.backends.webgpu.device import is_software
    assert m.backend.name == ("cpu" if is_software(gpu_backend.gpu.adapter) else "gpu")


def test_device_failure_is_our_error_and_sticks(gpu_backend):
    m = Model.load("smollm2-135m-instruct", device="gpu", context_length=16)
    real = m.backend.gpu.device

    class LostQueue:
        def __getattr__(self, name):
            if name == "_internal":  # what the native submit hands to wgpu-native
                raise RuntimeError("device lost (simulated)")
            if name == "submit":
                def boom(*a, **k):
                    raise RuntimeError("device lost (simulated)")
                return boom
            return getattr(real.queue, name)

    class LostDevice:
        queue = LostQueue()

        def __getattr__(self, name):
            return getattr(real, name)

    m.backend.gpu.device = LostDevice()
    with pytest.raises(BackendError, match="device lost"):
        m.generate("Hello", max_tokens=2, temperature=0)
    m.backend.gpu.device = real
    with pytest.raises(BackendError, match="failed earlier"):
        m.generate("Hello", max_tokens=2, temperature=0)


@pytest.mark.parametrize("file,shader,entry,needle", [
    ("norm.wgsl", "norm", "rmsnorm", "let inv ="),
    ("activations.wgsl", "matvec", "matvec_glu", "let e = exp(2.0 * z);"),  # a part appended to matvec
])
def test_shader_compile_error_names_file_and_line(gpu_backend, tmp_path, monkeypatch, file, shader, entry, needle):
    from wasmchord.backends.webgpu import device, shaders
    src = device.shader_dir()
    for f in src.glob("*.wgsl"):
        (tmp_path / f.name).write_text(f.read_text())
    text = (src / file).read_text()
    line = text[:text.index(needle)].count("\n") + 1
    (tmp_path / file).write_text(text.replace(needle, needle.replace("=", "= nope +", 1)))
    monkeypatch.setattr(shaders, "shader_dir", lambda: tmp_path)
    b = WgpuBackend()
    with pytest.raises(BackendError, match=rf"{file.replace('.', '[.]')}:{line}:\d+: shader compilation failed"):
        b.programs.kernel(shader, entry, {})


def test_missing_adapter_message_names_the_driver(monkeypatch):
    from wasmchord.backends.webgpu import device as gpu_device
    monkeypatch.setattr(gpu_device, "find_adapter", lambda **kw: None)
    with pytest.raises(BackendError, match="mesa-vulkan-drivers"):
        Model.load("smollm2-135m-instruct", device="gpu")


def test_shaders_ship_inside_the_package_build(tmp_path):
    """The wheel carries shaders/ as wasmchord/shaders (hatchling force-include)."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                        str(root)], capture_output=True, text=True)
    if r.returncode != 0 and "hatchling" in r.stderr:
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(root)],
                           capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import zipfile
    names = zipfile.ZipFile(next(tmp_path.glob("wasmchord-*.whl"))).namelist()
    for f in (root / "shaders").glob("*.wgsl"):
        assert f"wasmchord/shaders/{f.name}" in names


def test_bench_profile_reports_kernels_bandwidth_and_host_time(gpu_backend, tmp_path):
    """`bench --profile`: per-kernel times and GB/s against the measured read bandwidth, dispatches, host
    encode time, the step's GPU time and idle time; the fused decode step (154 dispatches for SmolLM2's
    30 layers: embedding, 5 per layer, head, argmax in two passes)."""
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "wasmchord", "bench", "smollm2-135m-instruct", "--backend", "gpu",
                        "--prompt-lengths", "4", "--gen-tokens", "2", "--no-llama-cpp", "--profile",
                        "--profile-steps", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    p = json.loads(out.read_text())["profile"]
    kernels = {k["kernel"]: k for k in p["kernels"]}
    assert kernels["matvec.matvec[q4m]"]["calls_per_step"] == 30 * 3       # qkv, o, down per layer
    assert kernels["matvec.matvec_glu[q4m]"]["calls_per_step"] == 30       # gate|up with SiLU-multiply
    assert kernels["decode_attention.attend"]["calls_per_step"] == 30      # norms, rope, kv store, attention
    assert not any(k.startswith(("elementwise.", "norm.", "rope.", "attention.")) for k in kernels)  # all fused
    assert p["dispatches_per_step"] == 154 == sum(k["calls_per_step"] for k in p["kernels"])
    assert kernels["matvec.matvec[q4m]"]["GBps"] > 0 and p["read_GBps"] > 0
    # host encoding is part of each step's wall time (on lavapipe, which runs the kernels on the CPU, most
    # of it: 1.07 s per step on a 2-core Zen 3); medians and means, hence the margin
    assert 0 < p["host_encode_ms_per_step"] <= p["wall_ms_per_step"] * 1.5
    assert 0 < p["gpu_ms_per_step"] <= p["wall_ms_per_step"] * 1.5
    assert "dispatches per decode step" in r.stdout and "read bandwidth" in r.stdout


def test_profile_needs_the_gpu_backend():
    r = subprocess.run([sys.executable, "-m", "wasmchord", "bench", "--backend", "cpu", "--profile",
                        "--prompt-lengths", "4", "--gen-tokens", "1", "--no-llama-cpp"], capture_output=True, text=True)
    assert r.returncode == 2 and "--backend gpu" in r.stderr


@pytest.mark.parametrize("option", [dict(fused_attention=False), dict(shader_checks="all"),
                                    dict(shader_checks="bounds")])
def test_backend_options_give_the_same_tokens(pair, option):
    """The unfused attention path (separate RoPE, KV-write and split-KV kernels) and shader modules
    with naga's runtime checks decode the same greedy tokens as the defaults."""
    g, c = pair
    other = Model.load("smollm2-135m-instruct", device="gpu", context_length=128, **option)
    ids = c.tokenizer.encode("Options change kernels, not answers:")
    want = g.generate(ids, max_tokens=6, temperature=0).tokens
    assert other.generate(ids, max_tokens=6, temperature=0).tokens == want == \
        c.generate(ids, max_tokens=6, temperature=0).tokens


def test_logits_of_more_positions_than_one_binding_holds(gpu_backend):
    """60 positions x 49,152 logits (11.8 MB) pass an 8 MiB binding limit (as 683 positions pass the
    default 128 MiB, where the device raised a raw GPUValidationError): the logits come in blocks of
    positions, and no buffer bound to any kernel exceeds the limit."""
    small = Model.load("smollm2-135m-instruct", device="gpu", context_length=64, max_binding_size=8 << 20)
    programs, limit, largest = small.backend.programs, small.backend.gpu.max_binding, []
    bind_group = programs.bind_group

    def checked(kernel, param_buf, offset, buffers):
        largest.append(max(buffers[n].size for n in kernel.slots))
        return bind_group(kernel, param_buf, offset, buffers)
    programs.bind_group = checked
    ref = Model.load("smollm2-135m-instruct", device="cpu", context_length=64)
    ids = ref.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)[:60]
    lg, lc = small.logits(ids), ref.logits(ids)
    assert lg.shape == (60, 49152) and 60 * 49152 * 4 > limit == 8 << 20
    assert largest and max(largest) <= limit
    assert np.abs(lg - lc).max() < 1e-3 * np.abs(lc).max()
    assert small.generate(ids[:10], max_tokens=3, temperature=0).tokens == \
        ref.generate(ids[:10], max_tokens=3, temperature=0).tokens


def test_a_required_wgpu_backend_is_used_or_named(gpu_backend):
    vk = WgpuBackend(gpu_backend="vulkan")
    assert "(Vulkan" in vk.device_name and "Vulkan" in vk.describe()
    with pytest.raises(BackendError, match=r"no WebGPU adapter on the Metal backend; wgpu found: .*\(Vulkan"):
        WgpuBackend(gpu_backend="metal")
    with pytest.raises(BackendError, match="unknown GPU backend 'cuda'; expected one of: vulkan, metal, dx12, opengl"):
        WgpuBackend(gpu_backend="cuda")


def test_landing_on_opengl_is_said(gpu_backend, monkeypatch, caplog):
    """Without Vulkan, wgpu hands out its OpenGL adapter (here: simulated by taking lavapipe's)."""
    import logging

    from wasmchord.backends.webgpu import device
    gl = device.find_adapter(allow_software=True, backend="opengl")
    monkeypatch.setattr(device, "find_adapter", lambda **kw: gl)
    with caplog.at_level(logging.WARNING, logger="wasmchord.backends.webgpu.device"):
        device.open_device()
    assert "the GPU backend runs on llvmpipe" in caplog.text and "(OpenGL, software)" in caplog.text


def test_the_cli_says_which_adapter_it_chose_and_takes_a_requirement(gpu_backend):
    r = subprocess.run([sys.executable, "-m", "wasmchord", "generate", "Hi", "-n", "1", "--backend", "gpu",
                        "--gpu-backend", "vulkan"], capture_output=True, text=True)
    assert r.returncode == 0 and "wasmchord: GPU " in r.stderr and "(Vulkan" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "wasmchord", "info", "--gpu", "--gpu-backend", "metal"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no WebGPU adapter on the Metal backend" in r.stderr


# Every GGUF weight type the loader decodes also runs on the GPU: Q5_1 and Q5_K in their own format
# (scale, minimum and high bits per 32), Q2_K as 4-bit words with a scale and a minimum per 16, Q3_K
# repacked as signed bytes with a scale per 16, IQ4_NL and IQ4_XS as signed bytes with a scale per 32;
# on the CPU Q2_K and IQ4_XS have kernels, Q3_K runs as Q6_K blocks and IQ4_NL as Q8_0. A tiny Llama converted from transformers, its
# matrices replaced by random blocks of these types: GPU logits and greedy tokens, and the CPU kernels'
# logits, against the exact NumPy backend on the same blocks.
MIXED = {"token_embd": "Q5_K", "attn_q": "Q5_K", "attn_k": "Q3_K", "attn_v": "Q2_K", "attn_output": "Q5_1",
         "ffn_gate": "IQ4_NL", "ffn_up": "IQ4_XS", "ffn_down": "Q3_K", "output": "Q2_K"}


def test_every_weight_type_runs_on_both_backends(gpu_backend, tmp_path):
    from gguf_edit import rewrite
    from test_quants import random_raw
    from tiny_hf import make_llama
    from wasmchord.convert import convert
    from wasmchord.formats.gguf import GGUFFile
    from wasmchord.formats.quants import ggml_type
    rng = np.random.default_rng()
    make_llama(tmp_path / "hf", tokenizer="bytes", hidden=256, ffn=512, heads=4, kv_heads=2)
    f32 = convert(tmp_path / "hf", tmp_path / "f32.gguf", quant="f32")
    tensors = {}
    for name, ti in GGUFFile(f32).tensors.items():
        kind = name.split(".")[-2]
        if kind in MIXED:
            t, shape = ggml_type(MIXED[kind]), tuple(int(n) for n in ti.shape)  # NumPy order
            tensors[name] = (random_raw(t, shape, rng), t, shape)
    assert {n.split(".")[-2] for n in tensors} == set(MIXED)
    path = rewrite(f32, tmp_path / "mixed.gguf", tensors=tensors)
    ref = Model.load(path, device="cpu", weights="f32", context_length=64)
    g = Model.load(path, device="gpu", context_length=64)
    k = Model.load(path, device="cpu", activations="f32", context_length=64)
    ids = ref.tokenizer.encode("The quick brown fox jumps over")
    want = ref.logits(ids)
    for m in (g, k):
        assert np.abs(m.logits(ids) - want).max() < 1e-4 * np.abs(want).max()
    assert g.generate(ids, max_tokens=8, temperature=0).tokens == ref.generate(ids, max_tokens=8, temperature=0).tokens


def test_a_pass_that_grows_its_buffers_keeps_the_other_bind_groups(gpu_backend, tmp_path, monkeypatch):
    """A longer prompt replaces activation buffers one by one; the bind groups of the others stay
    cached, so the same prompt again creates almost none (before, it created all of them again: a
    fixed cost of the first prompts after a longer one, ~360 groups for SmolLM2)."""
    from tiny_hf import make_llama
    from wasmchord.convert import convert
    from wasmchord.generate import Sequence
    make_llama(tmp_path / "hf", tokenizer="bytes", calm=True)
    m = Model.load(convert(tmp_path / "hf", tmp_path / "tiny.gguf", quant="q8_0"), device="gpu", context_length=64)
    dev = m.backend.gpu.device
    created = []
    real = type(dev).create_bind_group
    monkeypatch.setattr(type(dev), "create_bind_group", lambda self, **kw: created.append(1) or real(self, **kw))
    s = Sequence(m.transformer)
    runs = []
    for n in (4, 16, 16):
        s.reset()
        before = len(created)
        runs.append((m.backend.read(s.prefill(list(range(3, 3 + n)))[0]), len(created) - before))
    (_, _), (first, _), (again, made) = runs
    assert made <= 10 and np.array_equal(first, again), made

"""Loading a model holds its weights once: the file's pages are let go once each matrix is on the
backend (converted to float32 on the CPU, uploaded on the GPU), so a 1-2 GB model does not sit in
memory twice."""

import gc
import weakref

import numpy as np
import pytest

from wasmchord import Model
from wasmchord.errors import GenerationError, GGUFError
from wasmchord.formats.gguf import GGUFFile


def mappings(path) -> dict[str, int]:
    """Resident bytes of each of this process's mappings of `path`, by address range (/proc/self/smaps)."""
    out, current = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head:  # a mapping's header line
                current = head if line.rstrip().endswith(str(path)) else None
            elif current and line.startswith("Rss:"):
                out[current] = out.get(current, 0) + int(line.split()[1]) * 1024
    return out


def mapped_rss(path, *, besides: dict | None = None) -> int:
    """Resident bytes of this process's mappings of `path`, leaving out those in `besides` (mappings
    that other objects, such as other tests' models, held before)."""
    return sum(v for k, v in mappings(path).items() if k not in (besides or {}))


def test_release_lets_go_of_a_tensors_pages(smollm2_path):
    gf = GGUFFile(smollm2_path)
    name = "token_embd.weight"
    first = gf.dequantize(name)                     # touches every page of the tensor
    before = mapped_rss(smollm2_path)
    assert before >= gf.tensors[name].n_bytes * 0.9
    gf.release(name)
    assert mapped_rss(smollm2_path) < before - gf.tensors[name].n_bytes * 0.9
    assert np.array_equal(gf.dequantize(name), first)  # the data is still there (read again)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_a_loaded_model_does_not_keep_its_file_in_memory(smollm2_path, device, request):
    if device == "gpu":
        request.getfixturevalue("gpu_backend")
    others = mappings(smollm2_path)  # models of this file that earlier tests keep
    m = Model.load(smollm2_path, device=device, context_length=64)
    header = min(ti.offset for ti in m.gguf.tensors.values())  # metadata: the tokenizer stays mapped
    data = smollm2_path.stat().st_size - header
    assert mapped_rss(smollm2_path, besides=others) < header + 0.02 * data  # without release: all of it (every tensor was read)
    assert m.generate("Hello", max_tokens=2, temperature=0).tokens  # and the model still runs


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_close_frees_the_weights_and_the_cache_and_later_use_says_so(smollm2_path, device, request):
    # On the GPU the backend is the session's, shared: it outlives the model, so what it caches
    # (the recorded decode step, bind groups) must let go of the model's buffers.
    be = request.getfixturevalue("gpu_backend") if device == "gpu" else "cpu"
    with Model.load(smollm2_path, device=be, context_length=64, slots=2) as m:
        m.generate("Hello", max_tokens=3, temperature=0)
        m.generate(["Hello", "Hi"], max_tokens=3, temperature=0)
        chat = m.start_chat()
        chat.send("Hi", max_tokens=2, temperature=0)
        engine = m.engine()
        open_stream = m.stream("Once upon a time", max_tokens=8, temperature=0)
        next(open_stream)
        layer = m.transformer.layers[0]
        held = [getattr(layer, f) for f in vars(layer) if getattr(layer, f) is not None] + [m.transformer.cache]
        refs = [weakref.ref(getattr(x, "buf", x)) for x in held]  # a GPU tensor is a view of a buffer
        del layer, held
    gc.collect()
    assert m.closed and "closed" in repr(m)
    assert all(r() is None for r in refs), [r() for r in refs]
    for use in (lambda: m.generate("Hi", max_tokens=2), lambda: m.logits([1, 2]), lambda: list(open_stream),
                lambda: chat.send("Again", max_tokens=2), lambda: engine.submit("Hi", max_tokens=2),
                lambda: m.generate(["a", "b"], max_tokens=2), lambda: m.engine()):
        with pytest.raises(GenerationError, match="closed"):
            use()
    with pytest.raises(GGUFError, match="output_norm.weight'. the file was closed"):
        m.gguf.dequantize("output_norm.weight")
    m.close()  # again: nothing happens

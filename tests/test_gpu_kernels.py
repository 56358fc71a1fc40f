"""Every GPU kernel against the NumPy backend: fresh random inputs, several shapes (odd ones too),
every weight type; output buffers are poisoned with NaN before the measured run."""

import os

import numpy as np
import pytest

from test_quants import random_raw
from wasmchord.backends.base import WeightSource
from wasmchord.backends.numpy_backend import NumpyBackend
from wasmchord.backends.webgpu import GTensor
from wasmchord.formats.quants import ggml_type, quantize

pytestmark = pytest.mark.gpu
GPU_TYPES = ["F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
             "IQ4_XS"]
CPU = NumpyBackend(weights="f32")  # the exact float32 reference


def weight(name, rows, k, rng):
    t = ggml_type(name)
    if name in ("Q4_0", "Q4_1", "Q8_0"):
        raw = quantize(rng.standard_normal((rows, k)).astype(np.float32), t).reshape(-1)
    else:
        raw = random_raw(t, (rows, k), rng)
    return WeightSource("w", raw, t, (rows, k))


def upload(g, a):
    a = np.ascontiguousarray(a, np.float32)
    return GTensor(g.gpu.buffer(a.nbytes, a), 0, a.shape)


def poison(g):
    for buf in g.arena.buffers.values():
        g.gpu.device.queue.write_buffer(buf, 0, np.full(buf.size // 4, np.nan, np.float32))


def run_twice(g, f):
    """Run once to allocate the arena, poison every arena buffer, run again and read the result."""
    g.begin_forward()
    f()
    g.stream.flush()
    poison(g)
    g.begin_forward()
    return g.read(f())


def close(a, b, tol=1e-4):
    scale = max(1.0, float(np.abs(b).max()))
    assert not np.isnan(a).any()
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


# One token runs matvec.wgsl, whose lanes per row follow k (4, 8, 16, 32 lanes for k = 128, 256,
# 512, 2048); 2 to 8 tokens (to 16 on a small matrix: 13 here) its matvec_batch, 4 tokens per weight
# read; more run the tiled matmul of qmatrix.wgsl (70 tokens x 130 rows cross tiles).
@pytest.mark.parametrize("name", GPU_TYPES)
@pytest.mark.parametrize("n,rows,k", [(1, 37, 256), (1, 8, 512), (1, 67, 128), (1, 130, 2048), (1, 20000, 512), (3, 45, 512), (7, 33, 256),
                                      (13, 29, 512), (19, 5, 768), (70, 130, 256)])
@pytest.mark.parametrize("sums", ["subgroup", "shared"])
def test_matmul_every_type(gpu_backend, name, n, rows, k, sums):
    """Both ways a matvec sums its lanes: subgroup operations (on devices whose subgroups are
    consecutive runs, lavapipe's are 8 wide) and shared memory."""
    g, rng = gpu_backend, np.random.default_rng()
    if sums == "subgroup" and not g.subgroup_size:
        pytest.skip("the device has no usable subgroups") if not os.environ.get("CI") else \
            pytest.fail("CI runs on lavapipe, whose subgroups the matvec uses")
    saved, g.subgroup_size = g.subgroup_size, (g.subgroup_size if sums == "subgroup" else None)
    if ggml_type(name).block_size == 256:
        k = -(-k // 256) * 256  # K-quant and IQ4_XS blocks span 256 values
    src = weight(name, rows, k, rng)
    x = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    W, xg, bg = g.load_matrix([src]), upload(g, x), g.load_vector(bias)
    try:
        got = run_twice(g, lambda: g.matmul(xg, W, bg))
    finally:
        g.subgroup_size = saved
    close(got, CPU.matmul(x, CPU.load_matrix([src]), bias))


def test_matmul_of_stacked_mixed_types_and_split_bindings(gpu_backend):
    """Q/K/V-style stacking with different types, and rows split across bindings by a small limit."""
    from wasmchord.backends.webgpu import WgpuBackend
    g, rng = WgpuBackend(max_binding_size=4096), np.random.default_rng()
    parts = [weight("Q4_1", 40, 256, rng), weight("Q8_0", 24, 256, rng), weight("Q6_K", 9, 256, rng),
             weight("Q3_K", 7, 256, rng), weight("Q5_K", 11, 256, rng)]
    W = g.load_matrix(parts)
    assert len(W.pieces) > 5  # split beyond one piece per part (Q6_K and Q3_K share a GPU format)
    for n in (1, 5):
        x = rng.standard_normal((n, 256)).astype(np.float32)
        close(run_twice(g, lambda: g.matmul(upload(g, x), W)), CPU.matmul(x, CPU.load_matrix(parts)))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "F16"])
def test_embedding_lookup_from_quantized_table_split_across_bindings(gpu_backend, name):
    from wasmchord.backends.webgpu import WgpuBackend
    g, rng = WgpuBackend(max_binding_size=8192), np.random.default_rng()
    src = weight(name, 50, 256, rng)
    T = g.load_matrix([src])
    ids = rng.integers(0, 50, size=6)
    got = run_twice(g, lambda: g.embed(T, ids, 1.5))
    close(got, CPU.embed(CPU.load_matrix([src]), ids, 1.5))


@pytest.mark.parametrize("shape", [(1, 576), (5, 64), (3, 4, 64)])
def test_rmsnorm(gpu_backend, shape):
    g, rng = gpu_backend, np.random.default_rng()
    x = rng.standard_normal(shape).astype(np.float32) * 3
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    if len(shape) == 3:  # a per-head view inside a wider buffer, as q/k norms see it
        n, h, d = shape
        wide = rng.standard_normal((n, h * d + 40)).astype(np.float32)
        wide[:, 8:8 + h * d] = x.reshape(n, -1)
        xb = upload(g, wide)
        xg = GTensor(xb.buf, 8, shape, wide.shape[1])
    else:
        xg = upload(g, x)
    close(run_twice(g, lambda: g.rmsnorm(xg, g.load_vector(w), 1e-5)), CPU.rmsnorm(x, w, 1e-5))


@pytest.mark.parametrize("neox,n_rot", [(False, 64), (True, 64), (True, 32)])
def test_rope_in_place(gpu_backend, neox, n_rot):
    g, rng = gpu_backend, np.random.default_rng()
    x = rng.standard_normal((5, 3, 64)).astype(np.float32)
    xg = upload(g, x)
    g.begin_forward()
    g.rope(xg, 17, base=10000.0, n_rot=n_rot, scale=2.0, neox=neox)
    close(g.read(xg), CPU.rope(x.copy(), 17, base=10000.0, n_rot=n_rot, scale=2.0, neox=neox))


# One query (decode) runs split-KV attention over splits of 128 positions: past 300 gives three
# splits, and a window of 150 leaves the first one empty.
@pytest.mark.parametrize("n,H,kv,window,past", [(1, 9, 3, 0, 9), (6, 4, 4, 0, 9), (11, 4, 1, 5, 9), (1, 4, 2, 3, 9),
                                                (1, 4, 2, 0, 300), (1, 6, 2, 150, 300), (1, 2, 1, 0, 127)])
def test_kv_write_with_rope_and_attention(gpu_backend, n, H, kv, window, past):
    g, rng = gpu_backend, np.random.default_rng()
    hd, ctx = 32, 320
    rope = dict(base=10000.0, n_rot=hd, scale=1.0, neox=False)
    cc, gc = CPU.alloc_kv_cache(1, kv, ctx, hd, hd), g.alloc_kv_cache(1, kv, ctx, hd, hd)
    for pos0, m in ((0, past), (past, n)):  # fill some history, then the queries' own positions
        qkv = rng.standard_normal((m, (H + 2 * kv) * hd)).astype(np.float32)
        q, k, v = CPU.split_heads(qkv.copy(), [H * hd, kv * hd, kv * hd], [H, kv, kv])
        CPU.kv_write(cc, 0, k, v, pos0, rope=rope)
        qg, kg, vg = g.split_heads(upload(g, qkv), [H * hd, kv * hd, kv * hd], [H, kv, kv])
        g.begin_forward()
        g.kv_write(gc, 0, kg, vg, pos0, rope=rope)
    want = CPU.attention(CPU.rope(q, past, **rope), cc, 0, past, scale=0.17, window=window)
    g.begin_forward()
    g.rope(qg, past, **rope)
    got = run_twice(g, lambda: g.attention(qg, gc, 0, past, scale=0.17, window=window))
    close(got, want)
    close(g.read(GTensor(gc.k[0], 0, (kv * ctx * hd,))).reshape(kv, ctx, hd)[:, :past + n], cc.k[0][:, :past + n])


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_gated_activations(gpu_backend, op):
    g, rng = gpu_backend, np.random.default_rng()
    x = rng.standard_normal((3, 2 * 100)).astype(np.float32) * 4
    close(run_twice(g, lambda: getattr(g, op)(upload(g, x))), getattr(CPU, op)(x))


def test_residual_add(gpu_backend):
    g, rng = gpu_backend, np.random.default_rng()
    a, b = rng.standard_normal((4, 70)).astype(np.float32), rng.standard_normal((4, 70)).astype(np.float32)
    ag = upload(g, a)
    g.begin_forward()
    g.add(ag, upload(g, b))
    close(g.read(ag), a + b)


@pytest.mark.parametrize("size", [1, 255, 49152, 100003])
def test_argmax_writes_the_token_buffer(gpu_backend, size):
    g, rng = gpu_backend, np.random.default_rng()
    x = rng.standard_normal(size).astype(np.float32)
    j = int(rng.integers(0, size))
    x[j] = 10.0
    if size > 2:
        x[(j + 1) % size] = 10.0  # a tie: the lower index wins, as np.argmax
    g.begin_forward()
    tok = g.argmax(upload(g, x))
    assert tok == int(np.argmax(x))
    assert int(np.frombuffer(g.gpu.device.queue.read_buffer(g.tokens.ids, 0, 4), np.uint32)[0]) == tok


@pytest.mark.parametrize("rows,size", [(1, 255), (5, 49152), (17, 4099)])
def test_argmax_rows_writes_one_token_per_row(gpu_backend, rows, size):
    """The batch engine's greedy rows: each row's argmax (ties: the lower index) to ids[row], read
    back by read_tokens; the rows sit at a stride wider than their length, after an offset."""
    g, rng = gpu_backend, np.random.default_rng()
    x = rng.standard_normal((rows, size + 3)).astype(np.float32)
    for r in range(rows):
        j = int(rng.integers(0, size))
        x[r, j] = x[r, (j + 1) % size] = 10.0 + r
        x[r, size:] = 99.0  # past each row's end: never read
    g.gpu.device.queue.write_buffer(g.tokens.ids, 0, np.full(rows, 0xDEADBEEF, np.uint32))  # poisoned
    flat = np.concatenate([np.full(4, 99.0, np.float32), x.reshape(-1)])
    view = GTensor(g.gpu.buffer(flat.nbytes, flat), 4, (rows, size), size + 3)
    g.begin_forward()
    g.argmax_rows(view)
    assert g.read_tokens(rows).tolist() == x[:, :size].argmax(1).tolist()


def test_tokens_of_a_step_wait_for_their_reader(gpu_backend):
    """A batch's tokens stay readable however many steps are submitted and read before them (the
    engine's step in flight, another engine's batches meanwhile), and are read once."""
    from wasmchord.errors import BackendError
    g, rng = gpu_backend, np.random.default_rng()
    x = rng.standard_normal((6, 8, 300)).astype(np.float32)
    g.begin_forward()
    g.argmax_rows(upload(g, x[0]))
    first = g.submit_rows(8)
    assert g.rows_on_device(first)
    for i in range(1, 6):
        g.begin_forward()
        g.argmax_rows(upload(g, x[i]))
        assert g.collect_rows(g.submit_rows(8)).tolist() == x[i].argmax(1).tolist()
    assert not g.rows_on_device(first)
    assert g.collect_rows(first).tolist() == x[0].argmax(1).tolist()
    with pytest.raises(BackendError, match="collected or discarded"):
        g.collect_rows(first)


def test_sample_rows_draws_each_row_as_sample_does(gpu_backend):
    """A batch's sampled rows, each with its own parameters, recent tokens (penalties) and generator,
    drawn one dispatch each into ids[row] after a batched argmax: the tokens `sample` draws for each
    row alone with the same generator; the argmax rows keep theirs."""
    from wasmchord.sampling import SamplingParams, make_rng
    g, rng = gpu_backend, np.random.default_rng()
    B, V = 5, 3000
    x = (2 * rng.standard_normal((B, V))).astype(np.float32)
    params = {1: SamplingParams(temperature=0.8, top_k=40, top_p=0.9),
              2: SamplingParams(temperature=1.2, min_p=0.05, repeat_penalty=1.3, presence_penalty=0.5),
              4: SamplingParams(temperature=0.0, frequency_penalty=2.0)}  # greedy with a penalty
    hist = {b: [int(t) for t in np.argsort(-x[b])[:6]] for b in params}  # the likeliest: penalties matter
    hist[4] += [int(x[4].argmax())] * 20  # its argmax, 21 times: 42 lower
    seeds = {b: int(rng.integers(0, 1000)) for b in params}
    steps = {b: int(rng.integers(0, 500)) for b in params}
    g.gpu.device.queue.write_buffer(g.tokens.ids, 0, np.full(B, 0xDEADBEEF, np.uint32))  # poisoned
    g.begin_forward()
    lg = upload(g, x)
    g.argmax_rows(lg)
    g.sample_rows(lg, [(b, params[b], make_rng(seeds[b]), hist[b], steps[b]) for b in params])
    got = g.collect_rows(g.submit_rows(B)).tolist()
    for b in range(B):
        if b in params:
            g.begin_forward()
            assert got[b] == g.sample(upload(g, x[b]), params[b], make_rng(seeds[b]), hist[b], steps[b]), b
        else:
            assert got[b] == int(x[b].argmax())
    assert got[4] != int(x[4].argmax())  # the penalty moved the greedy row off its argmax (the history's first)


def test_argmax_names_rows_without_a_token(gpu_backend):
    """A NaN or +infinity anywhere in a row gives BAD (the host's sampler fails such a request), a row
    of -infinity NONE, whatever the largest other value; single rows (`argmax`) the same."""
    from wasmchord.generate import NONE_ID
    g, rng = gpu_backend, np.random.default_rng()
    x = rng.standard_normal((4, 5000)).astype(np.float32)
    x[0, int(rng.integers(0, 5000))] = np.nan
    x[1, int(rng.integers(0, 5000))] = np.inf
    x[1, int(rng.integers(0, 5000))] = 1e30
    x[2] = -np.inf
    x[3, int(rng.integers(0, 5000))] = -np.inf  # a banned token: not a failure
    g.begin_forward()
    g.argmax_rows(upload(g, x))
    want = [NONE_ID - 1, NONE_ID - 1, NONE_ID, int(np.argmax(x[3]))]
    assert g.read_tokens(4).tolist() == want
    for row, tok in zip(x, want):
        g.begin_forward()
        assert g.argmax(upload(g, row)) == tok


def test_sample_names_rows_without_a_token(gpu_backend):
    """The sampler as the argmax: a NaN or +infinity among the allowed logits gives BAD (the host's
    sampler fails such a request), every allowed logit -infinity NONE; a NaN that a constraint
    leaves out does not count. Batch rows (`sample_rows`) and single draws (`sample`) alike."""
    from wasmchord.generate import NONE_ID
    from wasmchord.sampling import SamplingParams, make_rng
    g, rng = gpu_backend, np.random.default_rng()
    x = rng.standard_normal((5, 3000)).astype(np.float32)
    x[0, int(rng.integers(0, 3000))] = np.nan
    x[1, int(rng.integers(0, 3000))] = np.inf
    x[2] = -np.inf
    x[3, int(rng.integers(0, 3000))] = -np.inf  # a banned token: not a failure
    x[4, 7] = np.nan
    want = [NONE_ID - 1, NONE_ID - 1, NONE_ID]
    params = SamplingParams(temperature=0.9, top_p=0.95)
    g.begin_forward()
    g.sample_rows(upload(g, x[:4]), [(b, params, make_rng(b), (), 3) for b in range(4)])
    got = g.collect_rows(g.submit_rows(4)).tolist()
    assert got[:3] == want and 0 <= got[3] < 3000 and x[3, got[3]] > -np.inf
    for b in range(3):
        g.begin_forward()
        assert g.sample(upload(g, x[b]), params, make_rng(b), (), 3) == want[b]
    mask = np.full(3000 // 32 + 1, -1, np.int32)
    mask[0] = ~(1 << 7)  # token 7, the NaN, left out
    g.begin_forward()
    tok = g.sample(upload(g, x[4]), params, make_rng(0), (), 0, mask=mask)
    assert 0 <= tok < 3000 and tok != 7


@pytest.mark.parametrize("shape", [(1, 64), (7, 96)])
def test_layernorm_with_bias(gpu_backend, shape):
    g, rng = gpu_backend, np.random.default_rng()
    x = rng.standard_normal(shape).astype(np.float32) * 2 + 1
    w, b = rng.standard_normal(shape[-1]).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32)
    xg = upload(g, x)
    got = run_twice(g, lambda: g.layernorm(xg, g.load_vector(w), g.load_vector(b), 1e-5))
    close(got, CPU.layernorm(x, w, b, 1e-5))


def test_gelu(gpu_backend):
    g, rng = gpu_backend, np.random.default_rng()
    x = rng.standard_normal((3, 130)).astype(np.float32) * 4
    close(run_twice(g, lambda: g.gelu(upload(g, x))), CPU.gelu(x))


@pytest.mark.parametrize("n", [1, 6])
def test_matmul_with_fused_residual_add(gpu_backend, n):
    g, rng = gpu_backend, np.random.default_rng()
    src = weight("Q4_1", 96, 256, rng)
    x = rng.standard_normal((n, 256)).astype(np.float32)
    r = rng.standard_normal((n, 96)).astype(np.float32)
    rg = upload(g, r)
    g.begin_forward()
    out = g.matmul(upload(g, x), g.load_matrix([src]), residual=rg)
    assert out.buf is rg.buf
    close(g.read(rg), CPU.matmul(x, CPU.load_matrix([src]), residual=r.copy()))


@pytest.mark.parametrize("name", ["F16", "Q4_0", "Q6_K"])
@pytest.mark.parametrize("n", [1, 5])
def test_matmul_with_fused_rmsnorm(gpu_backend, name, n):
    """matmul(x, W, norm=(g, eps)) against the unfused reference rmsnorm(x, g, eps) @ W.T: folded into
    the matvec's prologue for one token, a separate norm dispatch for several; with a bias, a residual
    and x at an offset inside its buffer."""
    g, rng = gpu_backend, np.random.default_rng()
    k, rows, eps = 512, 45, 1e-5
    src = weight(name, rows, k, rng)
    xs = (rng.standard_normal((n + 2, k)) * rng.uniform(0.1, 10)).astype(np.float32)
    gw = rng.standard_normal(k).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    r = rng.standard_normal((n, rows)).astype(np.float32)
    x = xs[1:1 + n]
    ref = CPU.matmul(CPU.rmsnorm(x, gw, eps), CPU.load_matrix([src]), bias, residual=r.copy())
    W, xg, gg, bg = g.load_matrix([src]), upload(g, xs)[1:1 + n], g.load_vector(gw), g.load_vector(bias)
    assert xg.off > 0
    close(run_twice(g, lambda: g.matmul(xg, W, bg, norm=(gg, eps))), ref - r)
    rg = upload(g, r)
    g.begin_forward()
    g.matmul(xg, W, bg, residual=rg, norm=(gg, eps))
    close(g.read(rg), ref)


@pytest.mark.parametrize("name", ["F16", "Q4_1", "Q5_0", "Q4_K"])
@pytest.mark.parametrize("act", ["swiglu", "geglu"])
@pytest.mark.parametrize("n,normed", [(1, True), (1, False), (4, True)])
def test_fused_gate_up_activation(gpu_backend, name, act, n, normed):
    """matmul_glu against the unfused reference act(rmsnorm(x) @ [gate | up].T): one kernel with the
    activation in the epilogue for one token (f = 37 is not a multiple of the rows per workgroup),
    matmul then the elementwise kernel for several."""
    g, rng = gpu_backend, np.random.default_rng()
    k, f, eps = 512, 37, 1e-6
    src = weight(name, 2 * f, k, rng)
    xs = (rng.standard_normal((n + 1, k)) * 2).astype(np.float32)
    gw = rng.standard_normal(k).astype(np.float32)
    x = xs[1:]
    h = CPU.rmsnorm(x, gw, eps) if normed else x
    ref = getattr(CPU, act)(CPU.matmul(h, CPU.load_matrix([src])))
    W, xg, gg = g.load_matrix([src]), upload(g, xs)[1:], g.load_vector(gw)
    norm = (gg, eps) if normed else None
    got = run_twice(g, lambda: g.matmul_glu(xg, W, act, norm=norm))
    assert got.shape == (n, f)
    close(got, ref)


# Decode attention as one kernel (decode_attention.wgsl): q/k norms, RoPE, the KV store and split-KV
# attention, against the NumPy backend's composition of the separate ops; the partials merged on the
# host and in the output projection's prologue (matvec.wgsl XSRC 1). Cases: GQA groups of 3 and of 12
# (more query heads than one workgroup takes), partial rotary with hd = 80 (hd_v not dividing the
# workgroup), Gemma's 256-wide heads with q/k norms and NEOX RoPE, windows, three splits (past 300).
@pytest.mark.parametrize("H,kv,hd,n_rot,neox,qk,window,past", [
    (9, 3, 64, 64, False, False, 0, 9), (12, 1, 32, 32, True, False, 0, 40), (4, 2, 80, 32, True, False, 0, 130),
    (4, 1, 256, 256, True, True, 0, 20), (6, 2, 64, 64, False, True, 150, 300), (2, 1, 128, 128, True, False, 5, 127),
])
def test_fused_decode_attention(gpu_backend, H, kv, hd, n_rot, neox, qk, window, past):
    g, rng = gpu_backend, np.random.default_rng()
    ctx, eps, scale = 320, 1e-6, hd ** -0.5
    rope = dict(base=10000.0, n_rot=n_rot, scale=1.0, neox=neox)
    cc, gc = CPU.alloc_kv_cache(1, kv, ctx, hd, hd), g.alloc_kv_cache(1, kv, ctx, hd, hd)
    qw, kw = (rng.standard_normal(hd).astype(np.float32) for _ in range(2))
    norms = ((qw, kw, eps), (g.load_vector(qw), g.load_vector(kw), eps)) if qk else (None, None)
    sizes, heads = [H * hd, kv * hd, kv * hd], [H, kv, kv]
    hist = rng.standard_normal((past, (H + 2 * kv) * hd)).astype(np.float32)  # the history, stored unfused
    CPU.kv_write(cc, 0, *CPU.split_heads(hist.copy(), sizes, heads)[1:], 0, rope=rope)
    g.begin_forward()
    g.kv_write(gc, 0, *g.split_heads(upload(g, hist), sizes, heads)[1:], 0, rope=rope)
    qkv = (rng.standard_normal((1, (H + 2 * kv) * hd)) * 2).astype(np.float32)
    want = CPU.attend(*CPU.split_heads(qkv.copy(), sizes, heads), cc, 0, past, rope=rope, scale=scale, window=window,
                      qk_norm=norms[0])                                                  # [1, H*hd]
    qg = g.split_heads(upload(g, qkv), sizes, heads)
    poison(g)
    g.begin_forward()
    part = g.attend(*qg, gc, 0, past, rope=rope, scale=scale, window=window, qk_norm=norms[1])
    assert part.__class__.__name__ == "AttnPartials"
    close(g.read(part), want)
    stored = g.read(GTensor(gc.k[0], 0, (kv * ctx * hd,))).reshape(kv, ctx, hd)
    close(stored[:, past], cc.k[0][:, past])
    close(g.read(GTensor(gc.v[0], 0, (kv * ctx * hd,))).reshape(kv, ctx, hd)[:, past], cc.v[0][:, past])
    src = weight("Q8_0", 40, H * hd, rng)                                                 # the output projection
    r = rng.standard_normal((1, 40)).astype(np.float32)
    rg = upload(g, r)
    g.matmul(part, g.load_matrix([src]), residual=rg)
    close(g.read(rg), CPU.matmul(want, CPU.load_matrix([src]), residual=r.copy()))


@pytest.mark.parametrize("name", ["Q4_1", "Q6_K", "F16"])
@pytest.mark.parametrize("rt,lanes", [(1, 16), (2, 32), (4, 64), (2, 8)])
def test_matvec_rows_and_lanes_per_group(gpu_backend, name, rt, lanes):
    """Every rows-per-group and lanes-per-row choice of matvec.wgsl (the shape heuristics pick among
    them), with a residual and a row count that leaves the last workgroup partly empty."""
    g, rng = gpu_backend, np.random.default_rng()
    src = weight(name, 45, 512, rng)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    r = rng.standard_normal((1, 45)).astype(np.float32)
    g.matvec_rows, g.matvec_lanes = rt, lanes
    try:
        rg = upload(g, r)
        g.begin_forward()
        g.matmul(upload(g, x), g.load_matrix([src]), residual=rg)
        got = g.read(rg)
    finally:
        g.matvec_rows = g.matvec_lanes = None
    close(got, CPU.matmul(x, CPU.load_matrix([src]), residual=r.copy()))


# Batched decoding (the engine's step): B rows through the matmuls (matvec.wgsl's batch entry reads
# each weight block once for 2-8 rows; more rows take qmatrix.wgsl's tiles) and attend_batch, each row
# at its own position in its own cache slot, against one-sequence NumPy attention per row.
@pytest.mark.parametrize("B", [2, 3, 8, 17])
@pytest.mark.parametrize("name", ["F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                  "IQ4_NL", "IQ4_XS"])
def test_batched_matmul(gpu_backend, name, B):
    g, rng = gpu_backend, np.random.default_rng()
    k = 512
    src = weight(name, 75, k, rng)
    x = rng.standard_normal((B, k)).astype(np.float32)
    r = rng.standard_normal((B, 75)).astype(np.float32)
    W, xg = g.load_matrix([src]), upload(g, x)
    got = run_twice(g, lambda: g.matmul(xg, W, residual=upload(g, r)))
    close(got, CPU.matmul(x, CPU.load_matrix([src]), residual=r.copy()))


@pytest.mark.parametrize("B", [1, 2, 3, 8, 17])
@pytest.mark.parametrize("H,kv,hd,neox,qk,window", [(9, 3, 64, False, False, 0), (4, 1, 256, True, True, 0),
                                                    (4, 2, 64, True, False, 37)])
def test_batched_decode_attention(gpu_backend, B, H, kv, hd, neox, qk, window):
    g, rng = gpu_backend, np.random.default_rng()
    ctx, eps, scale = 320, 1e-6, hd ** -0.5
    rope = dict(base=10000.0, n_rot=hd, scale=1.0, neox=neox)
    slots = rng.permutation(B + 2)[:B]                  # rows land in slots out of order; two slots unused
    positions = rng.integers(0, 300, B)                 # each row's history length = its new position
    cc, gc = CPU.alloc_kv_cache(1, kv, ctx, hd, hd, slots=B + 2), g.alloc_kv_cache(1, kv, ctx, hd, hd, slots=B + 2)
    qw, kw = (rng.standard_normal(hd).astype(np.float32) for _ in range(2))
    norms = ((qw, kw, eps), (g.load_vector(qw), g.load_vector(kw), eps)) if qk else (None, None)
    sizes, heads = [H * hd, kv * hd, kv * hd], [H, kv, kv]
    g.begin_forward()
    for s, p in zip(slots, positions):
        if p:
            hist = rng.standard_normal((p, (H + 2 * kv) * hd)).astype(np.float32)
            CPU.kv_write(cc.slot(s), 0, *CPU.split_heads(hist.copy(), sizes, heads)[1:], 0, rope=rope)
            g.kv_write(gc.slot(int(s)), 0, *g.split_heads(upload(g, hist), sizes, heads)[1:], 0, rope=rope)
    qkv = (rng.standard_normal((B, (H + 2 * kv) * hd)) * 2).astype(np.float32)
    want = np.concatenate([CPU.attend(*CPU.split_heads(qkv[b:b + 1].copy(), sizes, heads), cc.slot(s), 0, int(p),
                                      rope=rope, scale=scale, window=window, qk_norm=norms[0])
                           for b, (s, p) in enumerate(zip(slots, positions))])                # [B, H*hd]
    g.stream.flush()
    qg = g.split_heads(upload(g, qkv), sizes, heads)
    poison(g)
    g.begin_forward()
    got = g.read(g.attend_batch(*qg, gc, 0, positions.tolist(), slots.tolist(), rope=rope, scale=scale,
                                window=window, qk_norm=norms[1]))
    close(got, want)

// rope.wgsl: rotary position embedding, and the KV-cache write fused with rotating the keys.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage cs     f32 [positions, n_rot/2, 2] (cos, sin) table for this rope base, read
//   2 storage x      f32 q view, rotated in place, read_write     (rope)
//   3 storage v      f32 v view, read                               (rope_store)
//   6 storage kin    f32 k view, read (may be the same buffer as v)  (rope_store)
//   4 storage kc     f32 key cache of this layer [slots, KV, ctx, hd], read_write   (rope_store; slot P.slot)
//   5 storage vc     f32 value cache of this layer [slots, KV, ctx, hd_v], read_write (rope_store)
// Pairs: GGUF/llama (neox == 0) rotates (2j, 2j+1); NEOX (neox == 1) rotates (j, j + n_rot/2).
// Head h of token i starts at x_off + i * x_stride + h * hd.

struct P {
    n: u32,
    heads: u32,
    hd: u32,
    n_rot: u32,
    pos0: u32,
    neox: u32,
    x_off: u32,
    x_stride: u32,
    v_off: u32,
    v_stride: u32,
    hd_v: u32,
    ctx: u32,
    slot: u32,       // rope_store: the cache slot (caches hold slots of [KV, ctx, hd])
    pad1: u32, pad2: u32, pad3: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> cs: array<f32>;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> kc: array<f32>;
@group(0) @binding(5) var<storage, read_write> vc: array<f32>;
@group(0) @binding(6) var<storage, read> kin: array<f32>;

// Indices (a, b) of the j-th rotated pair inside a head.
fn pair(j: u32) -> vec2<u32> {
    if (p.neox == 1u) { return vec2<u32>(j, j + p.n_rot / 2u); }
    return vec2<u32>(2u * j, 2u * j + 1u);
}

fn rotated(i: u32, j: u32, x0: f32, x1: f32) -> vec2<f32> {
    let t = ((p.pos0 + i) * (p.n_rot / 2u) + j) * 2u;
    let c = cs[t];
    let s = cs[t + 1u];
    return vec2<f32>(x0 * c - x1 * s, x0 * s + x1 * c);
}

// grid: (ceil(hd/2 / 64), heads, n)
@compute @workgroup_size(64)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let h = gid.y;
    let i = gid.z;
    if (j >= p.n_rot / 2u || h >= p.heads || i >= p.n) { return; }
    let base = p.x_off + i * p.x_stride + h * p.hd;
    let ab = pair(j);
    let r = rotated(i, j, x[base + ab.x], x[base + ab.y]);
    x[base + ab.x] = r.x;
    x[base + ab.y] = r.y;
}

// grid: (ceil(max(hd, hd_v) / 64), kv heads, n). Writes rotated k and plain v at pos0 + i.
@compute @workgroup_size(64)
fn rope_store(@builtin(global_invocation_id) gid: vec3<u32>) {
    let d = gid.x;
    let h = gid.y;
    let i = gid.z;
    if (h >= p.heads || i >= p.n) { return; }
    let base = p.x_off + i * p.x_stride + h * p.hd;
    let pos = p.pos0 + i;
    let ch = p.slot * p.heads + h;  // this KV head in the caches
    let kdst = (ch * p.ctx + pos) * p.hd;
    if (d < p.n_rot / 2u) {
        let ab = pair(d);
        let r = rotated(i, d, kin[base + ab.x], kin[base + ab.y]);
        kc[kdst + ab.x] = r.x;
        kc[kdst + ab.y] = r.y;
    }
    if (d >= p.n_rot && d < p.hd) {  // dimensions past n_rot are not rotated (partial rotary)
        kc[kdst + d] = kin[base + d];
    }
    if (d < p.hd_v) {
        vc[(ch * p.ctx + pos) * p.hd_v + d] = v[p.v_off + i * p.v_stride + h * p.hd_v + d];
    }
}

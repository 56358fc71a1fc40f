// attention.wgsl: causal attention of n queries over the KV cache, in three passes:
// scores (q.k * scale, causal and sliding-window mask by index), softmax per row, weighted sum of v.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage q      f32 query view, read        (head h of token i at q_off + i*q_stride + h*hd)
//   2 storage kc     f32 key cache [slots, KV, ctx, hd], read (slot P.slot)
//   3 storage vc     f32 value cache [slots, KV, ctx, hd_v], read
//   4 storage sc     f32 scores scratch [n, H, ctx], read_write
//   5 storage out    f32 output [n, H * hd_v], read_write
// Query i sits at position pos0 + i and sees keys t <= pos0 + i (and pos0 + i - t < window if window > 0).
// Grouped-query attention: query head h reads KV head h / (H / KV).

struct P {
    n: u32,
    heads: u32,
    kv_heads: u32,
    hd: u32,
    hd_v: u32,
    ctx: u32,
    pos0: u32,
    window: u32,
    q_off: u32,
    q_stride: u32,
    scale: f32,
    out_off: u32,    // element offset of this chunk's first output row
    slot: u32,       // the cache slot (caches hold slots of [KV, ctx, hd])
    pad1: u32, pad2: u32, pad3: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<f32>;
@group(0) @binding(3) var<storage, read> vc: array<f32>;
@group(0) @binding(4) var<storage, read_write> sc: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const NEG_INF: f32 = -3.0e38;

fn visible(i: u32, t: u32) -> bool {
    let qp = p.pos0 + i;
    if (t > qp) { return false; }
    if (p.window > 0u && qp - t >= p.window) { return false; }
    return true;
}

// grid: (ceil((pos0 + n) / 64), H, n)
@compute @workgroup_size(64)
fn scores(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    let h = gid.y;
    let i = gid.z;
    if (t >= p.pos0 + p.n || h >= p.heads || i >= p.n) { return; }
    let row = (i * p.heads + h) * p.ctx;
    if (!visible(i, t)) {
        sc[row + t] = NEG_INF;
        return;
    }
    let kh = p.slot * p.kv_heads + h / (p.heads / p.kv_heads);  // in the caches
    let qb = p.q_off + i * p.q_stride + h * p.hd;
    let kb = (kh * p.ctx + t) * p.hd;
    var acc = 0.0;
    for (var d = 0u; d < p.hd; d = d + 1u) {
        acc = acc + q[qb + d] * kc[kb + d];
    }
    sc[row + t] = acc * p.scale;
}

// grid: (n * H) workgroups, one per row of scores
@compute @workgroup_size(64)
fn softmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let r = wg.x + wg.y * nwg.x;
    let valid = r < p.n * p.heads;
    let i = r / p.heads;
    let len = p.pos0 + i + 1u;
    let row = r * p.ctx;
    var mx = NEG_INF;
    if (valid) {
        for (var t = lid; t < len; t = t + 64u) { mx = max(mx, sc[row + t]); }
    }
    mx = wg_max(lid, 64u, mx);
    var sum = 0.0;
    if (valid) {
        for (var t = lid; t < len; t = t + 64u) {
            let e = select(exp(sc[row + t] - mx), 0.0, sc[row + t] <= NEG_INF);
            sc[row + t] = e;
            sum = sum + e;
        }
    }
    let inv = 1.0 / wg_sum(lid, 64u, sum);
    if (valid) {
        for (var t = lid; t < len; t = t + 64u) { sc[row + t] = sc[row + t] * inv; }
    }
}

// grid: (ceil(hd_v / 64), H, n)
@compute @workgroup_size(64)
fn weighted_sum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let d = gid.x;
    let h = gid.y;
    let i = gid.z;
    if (d >= p.hd_v || h >= p.heads || i >= p.n) { return; }
    let kh = p.slot * p.kv_heads + h / (p.heads / p.kv_heads);  // in the caches
    let row = (i * p.heads + h) * p.ctx;
    let len = p.pos0 + i + 1u;
    var t0 = 0u;
    if (p.window > 0u && p.pos0 + i + 1u > p.window) { t0 = p.pos0 + i + 1u - p.window; }
    var acc = 0.0;
    for (var t = t0; t < len; t = t + 1u) {
        acc = acc + sc[row + t] * vc[(kh * p.ctx + t) * p.hd_v + d];
    }
    out[p.out_off + (i * p.heads + h) * p.hd_v + d] = acc;
}

// ---------------------------------------------------------------------------- decode (one query)
// Split-KV ("flash decoding"): the visible positions are cut into splits of DEC_SPLIT; one workgroup
// per (split, head) computes its scores in shared memory, their max m and sum l of exp(score - m),
// and the unnormalized weighted sum of v. decode_merge rescales the splits by exp(m_s - max m) and
// normalizes. Partials in sc: [H, ceil(ctx / DEC_SPLIT), 2 + hd_v] = (m, l, o[hd_v]).
const DEC_SPLIT: u32 = 128u;
var<workgroup> ps: array<f32, 128>;

fn partial_base(h: u32, s: u32) -> u32 {
    return (h * ((p.ctx + DEC_SPLIT - 1u) / DEC_SPLIT) + s) * (p.hd_v + 2u);
}

// grid: (ceil((pos0 + 1) / DEC_SPLIT), H)
@compute @workgroup_size(64)
fn decode_split(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let s = wg.x;
    let h = wg.y;
    let len = p.pos0 + 1u;
    var t0 = 0u;
    if (p.window > 0u && len > p.window) { t0 = len - p.window; }
    let b = max(s * DEC_SPLIT, t0);
    let e = min((s + 1u) * DEC_SPLIT, len);
    let kh = p.slot * p.kv_heads + h / (p.heads / p.kv_heads);  // in the caches
    let qb = p.q_off + h * p.hd;
    var mx = NEG_INF;
    for (var j = lid; j < DEC_SPLIT; j = j + 64u) {
        let t = s * DEC_SPLIT + j;
        var v = NEG_INF;
        if (t >= b && t < e) {
            let kb = (kh * p.ctx + t) * p.hd;
            var acc = 0.0;
            for (var d = 0u; d < p.hd; d = d + 1u) { acc = acc + q[qb + d] * kc[kb + d]; }
            v = acc * p.scale;
        }
        ps[j] = v;
        mx = max(mx, v);
    }
    mx = wg_max(lid, 64u, mx);
    var sum = 0.0;
    for (var j = lid; j < DEC_SPLIT; j = j + 64u) {
        let w = select(exp(ps[j] - mx), 0.0, ps[j] <= NEG_INF);
        ps[j] = w;
        sum = sum + w;
    }
    let l = wg_sum(lid, 64u, sum);  // also the barrier after which every ps[j] is visible
    let base = partial_base(h, s);
    for (var d = lid; d < p.hd_v; d = d + 64u) {
        var acc = 0.0;
        for (var t = b; t < e; t = t + 1u) {
            acc = acc + ps[t - s * DEC_SPLIT] * vc[(kh * p.ctx + t) * p.hd_v + d];
        }
        sc[base + 2u + d] = acc;
    }
    if (lid == 0u) {
        sc[base] = mx;
        sc[base + 1u] = l;
    }
}

// grid: (H)
@compute @workgroup_size(64)
fn decode_merge(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let ns = (p.pos0 + DEC_SPLIT) / DEC_SPLIT;
    var mx = NEG_INF;
    for (var s = 0u; s < ns; s = s + 1u) { mx = max(mx, sc[partial_base(h, s)]); }
    var l = 0.0;
    for (var s = 0u; s < ns; s = s + 1u) {
        let b = partial_base(h, s);
        l = l + select(exp(sc[b] - mx), 0.0, sc[b] <= NEG_INF) * sc[b + 1u];
    }
    for (var d = lid; d < p.hd_v; d = d + 64u) {
        var o = 0.0;
        for (var s = 0u; s < ns; s = s + 1u) {
            let b = partial_base(h, s);
            o = o + select(exp(sc[b] - mx), 0.0, sc[b] <= NEG_INF) * sc[b + 2u + d];
        }
        out[p.out_off + h * p.hd_v + d] = o / l;
    }
}

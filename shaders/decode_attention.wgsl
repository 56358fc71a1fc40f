// decode_attention.wgsl: one decode step's attention for one layer, fused: per-head RMSNorm of q and
// the new k (P.qk_norm), RoPE of both, the store of the new k and v at position pos0, and split-KV
// ("flash decoding") attention of the query heads that share a KV head over one split of SPLIT
// positions. Each workgroup writes, per query head, a partial: (max score m, sum l of exp(score - m),
// 0, 0) then the unnormalized output [hd_v], at ((row * heads + h) * splits_max + s) * (hd_v + 4)
// floats. One sequence (`attend`): the output projection merges the splits in its prologue
// (matvec.wgsl XSRC 1). A batch of sequences, each at its own position in its own cache slot
// (`attend_batch`, then `merge_batch` into [rows, heads * hd_v]).
//
// Bindings (group 0):
//   0 uniform P
//   1 storage qkv   vec4<f32> the QKV projection of this token, read: q heads at q_off, k at k_off, v at v_off
//   2 storage kc    vec4<f32> key cache of this layer [KV, ctx, hd], read_write
//   3 storage vc    vec4<f32> value cache of this layer [KV, ctx, hd_v], read_write
//   4 storage part  f32 partials, read_write
//   5 storage cs    f32 RoPE table [positions, n_rot / 2, 2] (cos, sin), read
//   6 storage qn    f32 q RMSNorm weight [hd], read      (P.qk_norm == 1)
//   7 storage kn    f32 k RMSNorm weight [hd], read      (P.qk_norm == 1)
//   8 storage seq   vec2<u32> (cache slot, position) of each row, read   (attend_batch, merge_batch)
//   9 storage out   f32 merged output [rows, heads * hd_v], read_write    (merge_batch)
// Row r's q heads start at q_off + r * row_stride in qkv, its k heads after them, then its v heads.
// The caches hold slots of [KV, ctx, hd]. grid (attend): (pos0 / SPLIT + 1, KV heads, ceil(rep /
// MAX_REP)), rep = heads / kv_heads; (attend_batch): (max over rows of pos / SPLIT + 1, KV heads,
// rows * ceil(rep / MAX_REP)). Limits: hd and hd_v multiples of 4, at most 256.

struct P {
    heads: u32,
    kv_heads: u32,
    hd: u32,
    hd_v: u32,
    ctx: u32,
    pos0: u32,       // attend: the position of the new token
    window: u32,     // > 0: a query sees the last `window` positions only
    scale: f32,
    q_off: u32,      // element offset of row 0's q in qkv (a multiple of 4)
    row_stride: u32, // elements between rows of qkv (a multiple of 4)
    slot: u32,       // attend: the cache slot
    n_rot: u32,      // rotated dimensions per head
    neox: u32,       // RoPE pairs: 0 (2j, 2j+1), 1 (j, j + n_rot/2)
    qk_norm: u32,
    eps: f32,
    rows: u32,       // attend_batch / merge_batch: sequences in the batch
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> kc: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> vc: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> part: array<f32>;
@group(0) @binding(5) var<storage, read> cs: array<f32>;
@group(0) @binding(6) var<storage, read> qn: array<f32>;
@group(0) @binding(7) var<storage, read> kn: array<f32>;
@group(0) @binding(8) var<storage, read> seq: array<vec2<u32>>;
@group(0) @binding(9) var<storage, read_write> out: array<f32>;

const SPLIT: u32 = 128u;    // key positions per workgroup (= invocations)
const MAX_REP: u32 = 8u;    // query heads per workgroup
const NEG_INF: f32 = -3.0e38;
// Workgroup memory in vec4s: q heads [0, 512), scores [512, 768), new k [768, 832), new v [832, 896),
// scratch [896, 928), per-head statistics [928, 936). After the weighted sum: all of it for the
// position groups' partial outputs.
const QS: u32 = 0u;
const SC: u32 = 512u;
const KN: u32 = 768u;
const VN: u32 = 832u;
const RED: u32 = 896u;
const ST: u32 = 928u;
var<workgroup> sm: array<vec4<f32>, 1024>;

fn smf(i: u32) -> f32 { return sm[i / 4u][i % 4u]; }
fn smf_set(i: u32, v: f32) { sm[i / 4u][i % 4u] = v; }

// Per-head sums over `heads` vectors of `len` floats at float offset `base` (stride len): invocation
// lid takes head lid / 16 and every 16th element; the 16 partials of a head are added by its first
// invocation. Results at float ST*4 + 8 * slot + head. Every invocation calls it.
fn head_sums(lid: u32, base: u32, len: u32, heads: u32, squares: bool, slot: u32) {
    let hh = lid / 16u;
    var acc = 0.0;
    if (hh < heads) {
        for (var d = lid % 16u; d < len; d += 16u) {
            let v = smf(base + hh * len + d);
            acc += select(v, v * v, squares);
        }
    }
    smf_set(RED * 4u + lid, acc);
    workgroupBarrier();
    if (lid % 16u == 0u && hh < heads) {
        var t = 0.0;
        for (var i = 0u; i < 16u; i++) { t += smf(RED * 4u + lid + i); }
        smf_set(ST * 4u + 8u * slot + hh, t);
    }
    workgroupBarrier();
}

// RMSNorm (weight w: 0 = qn, 1 = kn) and RoPE of `heads` vectors of hd floats at float offset base.
fn norm_rope(lid: u32, base: u32, heads: u32, which: u32, pos: u32) {
    let hd = p.hd;
    if (p.qk_norm == 1u) {
        head_sums(lid, base, hd, heads, true, 0u);
        for (var e = lid; e < heads * hd; e += SPLIT) {
            let inv = inverseSqrt(smf(ST * 4u + e / hd) / f32(hd) + p.eps);
            let w = select(qn[e % hd], kn[e % hd], which == 1u);
            smf_set(base + e, smf(base + e) * inv * w);
        }
        workgroupBarrier();
    }
    let half = p.n_rot / 2u;
    for (var e = lid; e < heads * half; e += SPLIT) {
        let h = e / half;
        let j = e % half;
        var a = 2u * j;
        var b = 2u * j + 1u;
        if (p.neox == 1u) { a = j; b = j + half; }
        let t = (pos * half + j) * 2u;
        let c = cs[t];
        let sn = cs[t + 1u];
        let x0 = smf(base + h * hd + a);
        let x1 = smf(base + h * hd + b);
        smf_set(base + h * hd + a, x0 * c - x1 * sn);
        smf_set(base + h * hd + b, x0 * sn + x1 * c);
    }
    workgroupBarrier();
}

@compute @workgroup_size(128)
fn attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    attend_one(wg.x, wg.y, wg.z, lid, 0u, p.pos0, p.slot);
}

@compute @workgroup_size(128)
fn attend_batch(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let chunks = (p.heads / p.kv_heads + MAX_REP - 1u) / MAX_REP;
    let row = wg.z / chunks;
    let sp = seq[row];  // splits past this row's own (pos / SPLIT) see no position: their partials go unread
    attend_one(wg.x, wg.y, wg.z % chunks, lid, row, sp.y, sp.x);
}

// Split s of KV head g, query heads of chunk z, for batch row `row` at position pos in cache slot `slot`.
fn attend_one(s: u32, g: u32, z: u32, lid: u32, row: u32, pos: u32, slot: u32) {
    let rep = p.heads / p.kv_heads;
    let h0 = g * rep + z * MAX_REP;                       // first query head of this workgroup
    let nh = min(MAX_REP, g * rep + rep - h0);            // query heads here
    let hd4 = p.hd / 4u;
    let hv4 = p.hd_v / 4u;
    let last = s == pos / SPLIT;
    let cg = slot * p.kv_heads + g;                       // this KV head in the caches
    let qrow = (p.q_off + row * p.row_stride) / 4u;
    let krow = qrow + p.heads * hd4;
    let vrow = krow + p.kv_heads * hd4;

    // ---- q heads, the new k and v into workgroup memory; norms and RoPE
    for (var e = lid; e < nh * hd4; e += SPLIT) { sm[QS + e] = qkv[qrow + h0 * hd4 + e]; }
    for (var e = lid; e < hd4; e += SPLIT) { sm[KN + e] = qkv[krow + g * hd4 + e]; }
    for (var e = lid; e < hv4; e += SPLIT) { sm[VN + e] = qkv[vrow + g * hv4 + e]; }
    workgroupBarrier();
    norm_rope(lid, QS * 4u, nh, 0u, pos);
    norm_rope(lid, KN * 4u, 1u, 1u, pos);
    if (last && z == 0u) {  // the new position's k and v go to the cache (read from sm below)
        let kb = (cg * p.ctx + pos) * hd4;
        for (var e = lid; e < hd4; e += SPLIT) { kc[kb + e] = sm[KN + e]; }
        let vb = (cg * p.ctx + pos) * hv4;
        for (var e = lid; e < hv4; e += SPLIT) { vc[vb + e] = sm[VN + e]; }
    }

    // ---- scores of this split's positions: invocation lid takes position t
    let len = pos + 1u;
    var t0 = 0u;
    if (p.window > 0u && len > p.window) { t0 = len - p.window; }
    let t = s * SPLIT + lid;
    let visible = t >= t0 && t < len;
    var sc = array<f32, 8>(NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF);
    if (visible) {
        var acc = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        let kb = (cg * p.ctx + t) * hd4;
        let fresh = t == pos;
        for (var c = 0u; c < hd4; c += 4u) {  // hd4 is a multiple of 4 when hd is of 16; else the tail below
            if (c + 4u > hd4) { break; }
            let k0 = select(kc[kb + c], sm[KN + c], fresh);
            let k1 = select(kc[kb + c + 1u], sm[KN + c + 1u], fresh);
            let k2 = select(kc[kb + c + 2u], sm[KN + c + 2u], fresh);
            let k3 = select(kc[kb + c + 3u], sm[KN + c + 3u], fresh);
            for (var h = 0u; h < MAX_REP; h++) {
                if (h < nh) {
                    let qb = QS + h * hd4 + c;
                    acc[h] += dot(sm[qb], k0) + dot(sm[qb + 1u], k1) + dot(sm[qb + 2u], k2) + dot(sm[qb + 3u], k3);
                }
            }
        }
        for (var c = hd4 - hd4 % 4u; c < hd4; c++) {
            let k = select(kc[kb + c], sm[KN + c], fresh);
            for (var h = 0u; h < MAX_REP; h++) { if (h < nh) { acc[h] += dot(sm[QS + h * hd4 + c], k); } }
        }
        for (var h = 0u; h < MAX_REP; h++) { if (h < nh) { sc[h] = acc[h] * p.scale; } }
    }
    // ---- per-head max and sum of exp over the split
    for (var h = 0u; h < MAX_REP; h++) { smf_set(SC * 4u + h * SPLIT + lid, sc[h]); }
    workgroupBarrier();
    let hh = lid / 16u;  // head of this invocation in the reductions; 8 positions each
    var mx = NEG_INF;
    for (var i = 0u; i < 8u; i++) { mx = max(mx, smf(SC * 4u + hh * SPLIT + (lid % 16u) * 8u + i)); }
    smf_set(RED * 4u + lid, mx);
    workgroupBarrier();
    if (lid % 16u == 0u) {
        var m = NEG_INF;
        for (var i = 0u; i < 16u; i++) { m = max(m, smf(RED * 4u + lid + i)); }
        smf_set(ST * 4u + hh, m);
    }
    workgroupBarrier();
    var m = array<f32, 8>();
    for (var h = 0u; h < MAX_REP; h++) { m[h] = smf(ST * 4u + h); }
    for (var h = 0u; h < MAX_REP; h++) {  // scores -> weights exp(score - m)
        let v = sc[h];
        smf_set(SC * 4u + h * SPLIT + lid, select(exp(v - m[h]), 0.0, v <= NEG_INF));
    }
    workgroupBarrier();
    var l = 0.0;
    for (var i = 0u; i < 8u; i++) { l += smf(SC * 4u + hh * SPLIT + (lid % 16u) * 8u + i); }
    smf_set(RED * 4u + lid, l);
    workgroupBarrier();
    if (lid % 16u == 0u) {
        var tot = 0.0;
        for (var i = 0u; i < 16u; i++) { tot += smf(RED * 4u + lid + i); }
        smf_set(ST * 4u + 8u + hh, tot);
    }
    workgroupBarrier();
    var lsum = array<f32, 8>();
    for (var h = 0u; h < MAX_REP; h++) { lsum[h] = smf(ST * 4u + 8u + h); }

    // ---- weighted sum of v: invocation = (position group pg, vec4 column col)
    let pgs = SPLIT / hv4;
    let col = lid % hv4;
    let pg = lid / hv4;               // invocations past pgs * hv4 (hd_v not dividing 512) sit out
    var o: array<vec4<f32>, 8>;
    let b = max(s * SPLIT, t0);
    let e = select(b, min(s * SPLIT + SPLIT, len), pg < pgs);
    var tt = b + pg;
    for (; tt + 3u * pgs < e; tt += 4u * pgs) {  // four positions at a time: independent loads in flight
        let t1 = tt + pgs;
        let t2 = tt + 2u * pgs;
        let t3 = tt + 3u * pgs;
        let v0 = select(vc[(cg * p.ctx + tt) * hv4 + col], sm[VN + col], tt == pos);
        let v1 = select(vc[(cg * p.ctx + t1) * hv4 + col], sm[VN + col], t1 == pos);
        let v2 = select(vc[(cg * p.ctx + t2) * hv4 + col], sm[VN + col], t2 == pos);
        let v3 = select(vc[(cg * p.ctx + t3) * hv4 + col], sm[VN + col], t3 == pos);
        let w = SC * 4u - s * SPLIT;
        for (var h = 0u; h < MAX_REP; h++) {
            if (h < nh) {
                let r = w + h * SPLIT;
                o[h] += smf(r + tt) * v0 + smf(r + t1) * v1 + smf(r + t2) * v2 + smf(r + t3) * v3;
            }
        }
    }
    for (; tt < e; tt += pgs) {
        let v = select(vc[(cg * p.ctx + tt) * hv4 + col], sm[VN + col], tt == pos);
        for (var h = 0u; h < MAX_REP; h++) { if (h < nh) { o[h] += smf(SC * 4u + h * SPLIT + tt - s * SPLIT) * v; } }
    }
    workgroupBarrier();  // scores, q and the new k/v are no longer needed: sm takes the partial outputs
    if (pg < pgs) {
        for (var h = 0u; h < MAX_REP; h++) { if (h < nh) { sm[(pg * MAX_REP + h) * hv4 + col] = o[h]; } }
    }
    workgroupBarrier();
    let smax = (p.ctx + SPLIT - 1u) / SPLIT;
    for (var i = lid; i < nh * hv4; i += SPLIT) {
        let h = i / hv4;
        let c = i % hv4;
        var acc = vec4<f32>(0.0);
        for (var q = 0u; q < pgs; q++) { acc += sm[(q * MAX_REP + h) * hv4 + c]; }
        let base = ((row * p.heads + h0 + h) * smax + s) * (p.hd_v + 4u);
        part[base + 4u + 4u * c] = acc.x;
        part[base + 5u + 4u * c] = acc.y;
        part[base + 6u + 4u * c] = acc.z;
        part[base + 7u + 4u * c] = acc.w;
        if (c == 0u) {
            part[base] = m[h];
            part[base + 1u] = lsum[h];
            part[base + 2u] = 0.0;
            part[base + 3u] = 0.0;
        }
    }
}

// The splits of each (row, head) merged: sum over splits of exp(m_s - max m) * o_s over the same sum
// of exp(m_s - max m) * l_s. grid: (heads, rows)
@compute @workgroup_size(64)
fn merge_batch(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let row = wg.y;
    let ns = seq[row].y / SPLIT + 1u;
    let smax = (p.ctx + SPLIT - 1u) / SPLIT;
    let first = ((row * p.heads + h) * smax) * (p.hd_v + 4u);
    var mx = NEG_INF;
    for (var sp = 0u; sp < ns; sp++) { mx = max(mx, part[first + sp * (p.hd_v + 4u)]); }
    var l = 0.0;
    for (var sp = 0u; sp < ns; sp++) {
        let b = first + sp * (p.hd_v + 4u);
        l += select(exp(part[b] - mx), 0.0, part[b] <= NEG_INF) * part[b + 1u];
    }
    for (var d = lid; d < p.hd_v; d += 64u) {
        var o = 0.0;
        for (var sp = 0u; sp < ns; sp++) {
            let b = first + sp * (p.hd_v + 4u);
            o += select(exp(part[b] - mx), 0.0, part[b] <= NEG_INF) * part[b + 4u + d];
        }
        out[(row * p.heads + h) * p.hd_v + d] = o / l;
    }
}

// sample.wgsl: next-token sampling on the GPU, one workgroup: penalties, top-k, top-p, min-p,
// temperature, then a Gumbel-max draw from a counter-based RNG (PCG hash of seed, step, index).
// Filters follow llama.cpp's chain (penalties -> top-k -> top-p -> min-p -> temperature) as value
// thresholds, so no sort of the vocabulary is needed: the k-th largest value by a radix select over
// order-preserving keys (4 passes of 8 bits), then the tokens that can survive (at least the top-k
// and min-p thresholds, at most CAP of them) gathered into workgroup memory, where the top-p
// threshold is found by bisection and the draw is made. More than CAP candidates (no top-k and no
// min-p over a flat distribution) takes the same steps over the whole vocabulary. A NaN or +infinity
// among the allowed logits draws nothing: the token is BAD; no allowed finite logit gives NONE.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage x     f32 logits, read_write (penalties are applied in place)
//   2 storage ids   u32 token buffer, read_write: ids[row] = the sampled token (next step's input)
//   3 storage hist  u32 recent tokens for the penalties [hist_off, hist_off + n_hist), read
//   4 storage mask  u32 allowed tokens (bit j % 32 of word j / 32), read   (P.masked == 1: a constraint;
//                   the others are set to -infinity in x first)

struct P {
    count: u32,        // vocabulary size
    x_off: u32,
    top_k: u32,        // 0 = off
    n_hist: u32,
    temperature: f32,  // > 0 (greedy decoding uses argmax.wgsl)
    top_p: f32,        // 1 = off
    min_p: f32,        // 0 = off
    repeat: f32,       // 1 = off
    presence: f32,
    frequency: f32,
    seed: u32,
    step: u32,
    masked: u32,
    row: u32,          // the token goes to ids[row] (a batch's rows are drawn one dispatch each)
    hist_off: u32,     // this draw's recent tokens start at hist[hist_off]
    pad3: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;
@group(0) @binding(3) var<storage, read> hist: array<u32>;
@group(0) @binding(4) var<storage, read> mask: array<u32>;

const WG: u32 = 256u;
fn pcg(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn uniform01(i: u32) -> f32 {
    let h = pcg(i ^ pcg(p.step ^ pcg(p.seed)));
    return (f32(h >> 8u) + 0.5) / 16777216.0;  // in (0, 1)
}

const CAP: u32 = 1024u;
var<workgroup> cand_v: array<f32, 1024>;
var<workgroup> cand_i: array<u32, 1024>;
var<workgroup> ncand: atomic<u32>;
var<workgroup> bins: array<atomic<u32>, 256>;
var<workgroup> suffix: array<u32, 256>;
var<workgroup> picked: array<u32, 2>;

fn key(v: f32) -> u32 {  // order-preserving: key(a) < key(b) iff a < b
    let b = bitcast<u32>(v);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn unkey(k: u32) -> f32 {
    return bitcast<f32>(select(~k, k & 0x7fffffffu, (k & 0x80000000u) != 0u));
}

// The k-th largest value (1 <= k <= count): its key's bytes, most significant first, each from a
// histogram of the values that share the bytes found so far.
fn kth_largest(lid: u32, k: u32) -> f32 {
    var prefix = 0u;
    var mask = 0u;
    var need = k;
    for (var shift = 24i; shift >= 0i; shift -= 8i) {
        atomicStore(&bins[lid], 0u);
        workgroupBarrier();
        for (var j = lid; j < p.count; j += WG) {
            let kj = key(x[p.x_off + j]);
            if ((kj & mask) == prefix) { atomicAdd(&bins[(kj >> u32(shift)) & 255u], 1u); }
        }
        workgroupBarrier();
        suffix[lid] = atomicLoad(&bins[lid]);   // suffix sums: values with this byte or a larger one
        workgroupBarrier();
        for (var off = 1u; off < WG; off <<= 1u) {
            var add = 0u;
            if (lid + off < WG) { add = suffix[lid + off]; }
            workgroupBarrier();
            suffix[lid] += add;
            workgroupBarrier();
        }
        var above = 0u;
        if (lid + 1u < WG) { above = suffix[lid + 1u]; }
        if (suffix[lid] >= need && above < need) {  // exactly one byte value qualifies
            picked[0] = lid;
            picked[1] = need - above;
        }
        workgroupBarrier();
        prefix |= picked[0] << u32(shift);
        mask |= 255u << u32(shift);
        need = picked[1];
        workgroupBarrier();
    }
    return unkey(prefix);
}

fn candidate(j: u32, few: bool) -> f32 {  // the j-th value looked at: a gathered candidate, or logit j
    if (few) { return cand_v[j]; }  // (not select(): it reads both arms, cand_v[j] out of bounds when j >= CAP)
    return x[p.x_off + j];
}

const NONE: u32 = 0xffffffffu;  // nothing can be drawn (every allowed logit is -infinity)
const BAD: u32 = 0xfffffffeu;   // a NaN or +infinity among the allowed logits: the host fails the request

fn non_finite(v: f32) -> bool {  // told by the bits, as in argmax.wgsl
    let b = bitcast<u32>(v);
    return (b & 0x7fffffffu) > 0x7f800000u || b == 0x7f800000u;
}

@compute @workgroup_size(256)
fn sample(@builtin(local_invocation_index) lid: u32) {
    // ---- a NaN or +infinity among the allowed logits: no draw, BAD (as argmax.wgsl and the host's check)
    var bad = 0u;
    for (var j = lid; j < p.count; j += WG) {
        let allowed = p.masked == 0u || ((mask[j / 32u] >> (j % 32u)) & 1u) == 1u;
        if (allowed && non_finite(x[p.x_off + j])) { bad = 1u; }
    }
    if (wg_sum_u(lid, WG, bad) > 0u) {
        if (lid == 0u) { ids[p.row] = BAD; }
        return;
    }
    // ---- a constraint: the tokens it leaves out cannot be drawn
    if (p.masked == 1u) {
        for (var j = lid; j < p.count; j += WG) {
            if (((mask[j / 32u] >> (j % 32u)) & 1u) == 0u) { x[p.x_off + j] = -3.4e38; }
        }
        storageBarrier();
        workgroupBarrier();
    }
    // ---- penalties (llama.cpp llama_sampler_penalties_apply), once per distinct recent token
    for (var j = lid; j < p.n_hist; j += WG) {
        let t = hist[p.hist_off + j];
        var first = true;
        var n = 0u;
        for (var k = 0u; k < p.n_hist; k++) {
            if (hist[p.hist_off + k] == t) {
                if (k < j) { first = false; }
                n++;
            }
        }
        if (first && t < p.count && x[p.x_off + t] > -3.0e38) {  // a masked-out token stays out
            var v = x[p.x_off + t];
            v = select(v / p.repeat, v * p.repeat, v <= 0.0);
            x[p.x_off + t] = min(v - f32(n) * p.frequency - p.presence, 3.0e38);  // a tiny repeat overflows
        }
    }
    storageBarrier();
    workgroupBarrier();

    var hi = -3.4e38;
    for (var j = lid; j < p.count; j += WG) { hi = max(hi, x[p.x_off + j]); }
    let mx = wg_max(lid, WG, hi);

    // ---- top-k: the k-th largest value (ties at it are kept)
    var tau_k = -3.4e38;
    if (p.top_k > 0u && p.top_k < p.count) { tau_k = kth_largest(lid, p.top_k); }
    // ---- the tokens that can survive: above top-k's and min-p's thresholds (p_i >= min_p * p_max)
    var lo = tau_k;
    if (p.min_p > 0.0) { lo = max(lo, mx + log(p.min_p)); }
    var z = 0.0;      // top-p's mass: the softmax (untempered) over the top-k survivors
    var c = 0u;
    var least = 3.4e38;
    for (var j = lid; j < p.count; j += WG) {
        let v = x[p.x_off + j];
        if (v >= tau_k) { z += exp(v - mx); }
        if (v >= lo) {
            c++;
            least = min(least, v);
        }
    }
    let total = wg_sum(lid, WG, z);
    let smallest = -wg_max(lid, WG, -least);  // the smallest candidate: the bisection's lower end
    let few = wg_sum_u(lid, WG, c) <= CAP;
    if (few) {
        if (lid == 0u) { atomicStore(&ncand, 0u); }
        workgroupBarrier();
        for (var j = lid; j < p.count; j += WG) {
            let v = x[p.x_off + j];
            if (v >= lo) {
                let slot = atomicAdd(&ncand, 1u);
                cand_v[slot] = v;
                cand_i[slot] = j;
            }
        }
    }
    workgroupBarrier();
    let n = select(p.count, atomicLoad(&ncand), few);

    // ---- top-p: the largest threshold whose mass >= top_p * total (found among the candidates)
    var tau = lo;
    if (p.top_p < 1.0) {
        var a = smallest;
        var b = mx;
        for (var it = 0u; it < 40u; it++) {
            let mid = 0.5 * (a + b);
            var sm = 0.0;
            for (var j = lid; j < n; j += WG) {
                let v = candidate(j, few);
                if (v >= mid) { sm += exp(v - mx); }
            }
            if (wg_sum(lid, WG, sm) >= p.top_p * total) { a = mid; } else { b = mid; }
        }
        tau = max(tau, a);
    }

    // ---- temperature and a Gumbel-max draw among the survivors (ties: the lowest index)
    var best = -3.4e38;
    var bi = NONE;
    for (var j = lid; j < n; j += WG) {
        let v = candidate(j, few);
        var i = j;
        if (few) { i = cand_i[j]; }
        if (v >= tau) {
            let g = v / p.temperature - log(-log(uniform01(i)));
            if (g > best || (g == best && i < bi)) { best = g; bi = i; }
        }
    }
    let tok = wg_argmax(lid, WG, best, bi);
    if (lid == 0u) { ids[p.row] = tok; }
}

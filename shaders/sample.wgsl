// sample.wgsl: next-token sampling on the GPU, one workgroup: penalties, top-k, top-p, min-p,
// temperature, then a Gumbel-max draw from a counter-based RNG (PCG hash of seed, step, index).
// Filters follow llama.cpp's chain (penalties -> top-k -> top-p -> min-p -> temperature), computed
// as value thresholds found by bisection, so no sort of the vocabulary is needed.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage x     f32 logits, read_write (penalties are applied in place)
//   2 storage ids   u32 token buffer, read_write: ids[0] = the sampled token (next step's input)
//   3 storage hist  u32 recent tokens for the penalties [n_hist], read

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
    pad0: u32, pad1: u32, pad2: u32, pad3: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;
@group(0) @binding(3) var<storage, read> hist: array<u32>;

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

@compute @workgroup_size(256)
fn sample(@builtin(local_invocation_index) lid: u32) {
    // ---- penalties (llama.cpp llama_sampler_penalties_apply), once per distinct recent token
    for (var j = lid; j < p.n_hist; j = j + WG) {
        let t = hist[j];
        var first = true;
        var n = 0u;
        for (var k = 0u; k < p.n_hist; k = k + 1u) {
            if (hist[k] == t) {
                if (k < j) { first = false; }
                n = n + 1u;
            }
        }
        if (first && t < p.count) {
            var v = x[p.x_off + t];
            v = select(v / p.repeat, v * p.repeat, v <= 0.0);
            x[p.x_off + t] = v - f32(n) * p.frequency - p.presence;
        }
    }
    storageBarrier();
    workgroupBarrier();

    // ---- range of the logits
    var lo = 3.4e38;
    var hi = -3.4e38;
    for (var j = lid; j < p.count; j = j + WG) {
        let v = x[p.x_off + j];
        lo = min(lo, v);
        hi = max(hi, v);
    }
    let mx = wg_max(lid, WG, hi);
    let mn = -wg_max(lid, WG, -lo);

    // ---- top-k: the largest threshold keeping at least k values
    var tau = mn;
    if (p.top_k > 0u && p.top_k < p.count) {
        var a = mn;
        var b = mx;
        for (var it = 0u; it < 40u; it = it + 1u) {
            let mid = 0.5 * (a + b);
            var c = 0u;
            for (var j = lid; j < p.count; j = j + WG) { c = c + select(0u, 1u, x[p.x_off + j] >= mid); }
            if (wg_sum_u(lid, WG, c) >= p.top_k) { a = mid; } else { b = mid; }
        }
        tau = a;
    }

    // ---- top-p over the survivors' softmax (untempered): the largest threshold whose mass >= top_p
    var z = 0.0;
    for (var j = lid; j < p.count; j = j + WG) {
        let v = x[p.x_off + j];
        if (v >= tau) { z = z + exp(v - mx); }
    }
    let total = wg_sum(lid, WG, z);
    if (p.top_p < 1.0) {
        var a = tau;
        var b = mx;
        for (var it = 0u; it < 40u; it = it + 1u) {
            let mid = 0.5 * (a + b);
            var s = 0.0;
            for (var j = lid; j < p.count; j = j + WG) {
                let v = x[p.x_off + j];
                if (v >= mid) { s = s + exp(v - mx); }
            }
            if (wg_sum(lid, WG, s) >= p.top_p * total) { a = mid; } else { b = mid; }
        }
        tau = max(tau, a);
    }

    // ---- min-p: p_i >= min_p * p_max
    if (p.min_p > 0.0) { tau = max(tau, mx + log(p.min_p)); }

    // ---- temperature and a Gumbel-max draw among the survivors (ties: the lowest index)
    var best = -3.4e38;
    var bi = 0xffffffffu;
    for (var j = lid; j < p.count; j = j + WG) {
        let v = x[p.x_off + j];
        if (v >= tau) {
            let g = v / p.temperature - log(-log(uniform01(j)));
            if (g > best) { best = g; bi = j; }
        }
    }
    let tok = wg_argmax(lid, WG, best, bi);
    if (lid == 0u) { ids[0] = tok; }
}

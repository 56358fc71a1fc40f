// qmatrix.wgsl: ops that read a (quantized) weight matrix: matvec, tiled matmul, embedding lookup.
//
// Bindings (group 0):
//   0 uniform P      parameters (below)
//   1 storage x      f32 activations, read         (matvec/matmul input; embed: token ids as u32 bits)
//   2 storage q      u32 packed quants, read       (layout per FMT, blocks of 32 elements)
//   3 storage s      f32 block scales, read        (1 per block; 2 per block for FMT 6)
//   4 storage m      f32 block minimums, read      (FMT 3 only)
//   5 storage out    f32 output, read_write
//   6 storage bias   f32 bias, read                (used when P.has_bias == 1)
//   7 storage g      f32 RMSNorm weight, read      (matvec with P.norm == 1: out = W (rmsnorm(x) * g))
// Override FMT: 0 F32 | 1 F16 | 2 Q4 sym (Q4_0) | 3 Q4 with min (Q4_1, Q4_K) | 4 Q5 sym (Q5_0)
//               | 5 Q8 (Q8_0) | 6 Q8 with a scale per 16 (Q6_K repacked).
// 4-bit words follow GGUF's byte order: in block word w, byte i holds element 4w+i (low nibble) and
// 16+4w+i (high nibble). Q5 adds one word whose bit j is bit 4 of element j.

override FMT: u32 = 0u;

struct P {
    n: u32,          // rows of x (tokens)
    k: u32,          // inner dimension (multiple of 32)
    rows: u32,       // weight rows in this chunk
    out_col0: u32,   // first output column written by this chunk
    out_stride: u32, // elements between output rows
    x_off: u32,      // element offset of x
    x_stride: u32,   // elements between rows of x
    out_off: u32,    // element offset of out
    has_bias: u32,
    row0: u32,       // embed: first vocabulary row of this chunk
    scale: f32,      // embed: multiplier
    accumulate: u32, // 1: out += result (the residual add fused into the epilogue)
    norm: u32,       // matvec: 1 = RMSNorm x (weight g) in the prologue
    eps: f32,        // matvec: the RMSNorm epsilon
    pad2: u32, pad3: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> q: array<u32>;
@group(0) @binding(3) var<storage, read> s: array<f32>;
@group(0) @binding(4) var<storage, read> m: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read> g: array<f32>;

// Element e (0..31) of global block gb.
fn deq(gb: u32, e: u32) -> f32 {
    switch FMT {
        case 0u: { return bitcast<f32>(q[gb * 32u + e]); }
        case 1u: {
            let v = unpack2x16float(q[gb * 16u + e / 2u]);
            return select(v.x, v.y, (e & 1u) == 1u);
        }
        case 2u, 3u: {
            let j = e & 15u;
            let sh = (j & 3u) * 8u + select(0u, 4u, e >= 16u);
            let nib = f32((q[gb * 4u + j / 4u] >> sh) & 15u);
            if (FMT == 2u) { return s[gb] * (nib - 8.0); }
            return s[gb] * nib + m[gb];
        }
        case 4u: {
            let j = e & 15u;
            let sh = (j & 3u) * 8u + select(0u, 4u, e >= 16u);
            let lo = (q[gb * 5u + j / 4u] >> sh) & 15u;
            let hi = (q[gb * 5u + 4u] >> e) & 1u;
            return s[gb] * (f32(lo | (hi << 4u)) - 16.0);
        }
        default: {
            let w = q[gb * 8u + e / 4u];
            let v = f32(bitcast<i32>(w << (24u - 8u * (e & 3u))) >> 24u);
            if (FMT == 6u) { return v * s[gb * 2u + e / 16u]; }
            return v * s[gb];
        }
    }
}

fn finish(i: u32, r: u32, acc: f32) {
    var v = acc;
    if (p.has_bias == 1u) { v = v + bias[r]; }
    let o = p.out_off + i * p.out_stride + p.out_col0 + r;
    if (p.accumulate == 1u) { v = v + out[o]; }
    out[o] = v;
}

// ---------------------------------------------------------------------------- matvec (one token)
// One workgroup per weight row; threads stride over k, then a shared-memory tree reduction.
// With p.norm, the RMSNorm of x is folded in: W (x * g / rms(x)) = (W (x * g)) / rms(x), the sum of
// squares gathered in the same pass over x (one dispatch instead of two, no normalized copy of x).
var<workgroup> red: array<f32, 64>;
var<workgroup> red_ss: array<f32, 64>;

@compute @workgroup_size(64)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let r = wg.x + wg.y * nwg.x;
    let nb = p.k / 32u;
    let norm = p.norm == 1u;
    var acc = 0.0;
    var ss = 0.0;
    if (r < p.rows) {
        for (var e = lid; e < p.k; e = e + 64u) {
            var xe = x[p.x_off + e];
            if (norm) {
                ss = ss + xe * xe;
                xe = xe * g[e];
            }
            acc = acc + deq(r * nb + e / 32u, e & 31u) * xe;
        }
    }
    red[lid] = acc;
    red_ss[lid] = ss;
    workgroupBarrier();
    for (var st = 32u; st > 0u; st = st >> 1u) {
        if (lid < st) {
            red[lid] = red[lid] + red[lid + st];
            red_ss[lid] = red_ss[lid] + red_ss[lid + st];
        }
        workgroupBarrier();
    }
    if (lid == 0u && r < p.rows) {
        var v = red[0];
        if (norm) { v = v * inverseSqrt(red_ss[0] / f32(p.k) + p.eps); }
        finish(0u, r, v);
    }
}

// ---------------------------------------------------------------------------- matmul (prefill)
// 16x16 outputs per workgroup (16 tokens x 16 rows); K walked one block (32) at a time, weights
// dequantized while staged into workgroup memory; f32 accumulation.
var<workgroup> tw: array<f32, 512>;  // [16 rows][32 k]
var<workgroup> tx: array<f32, 512>;  // [16 tokens][32 k]

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let r = wg.x * 16u + lid3.x;   // weight row of this thread's output
    let i = wg.y * 16u + lid3.y;   // token of this thread's output
    let nb = p.k / 32u;
    var acc = 0.0;
    for (var b = 0u; b < nb; b = b + 1u) {
        for (var t = lid; t < 512u; t = t + 256u) {
            let rr = wg.x * 16u + t / 32u;
            let ii = wg.y * 16u + t / 32u;
            let e = t & 31u;
            tw[t] = select(0.0, deq(rr * nb + b, e), rr < p.rows);
            tx[t] = select(0.0, x[p.x_off + ii * p.x_stride + b * 32u + e], ii < p.n);
        }
        workgroupBarrier();
        for (var e = 0u; e < 32u; e = e + 1u) {
            acc = acc + tw[lid3.x * 32u + e] * tx[lid3.y * 32u + e];
        }
        workgroupBarrier();
    }
    if (r < p.rows && i < p.n) { finish(i, r, acc); }
}

// ---------------------------------------------------------------------------- embedding lookup
// out[i, :] = table[ids[i], :] * scale, for the ids that fall in this chunk's rows. Ids are read
// from x's bits (the token buffer that argmax writes).
@compute @workgroup_size(64)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x;
    let i = gid.y;
    if (e >= p.k || i >= p.n) { return; }
    let id = bitcast<u32>(x[p.x_off + i]);
    if (id < p.row0 || id >= p.row0 + p.rows) { return; }
    let nb = p.k / 32u;
    out[p.out_off + i * p.out_stride + e] = deq((id - p.row0) * nb + e / 32u, e & 31u) * p.scale;
}

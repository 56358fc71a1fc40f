// qmatrix.wgsl: ops that read a (quantized) weight matrix: matvec (plain, and gate/up with the gated
// activation), tiled matmul, embedding lookup. silu and gelu_tanh: activations.wgsl.
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
    glu: u32,        // matvec_glu: 0 SiLU, 1 tanh GELU
    pad3: u32,
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
// MV_ROWS weight rows per workgroup, MV_LANES threads per row. A thread takes whole 32-element blocks
// (lane, lane + MV_LANES, ...): it loads the block's activations once as eight vec4s, reads the packed
// quants as u32 words, and applies the block scale once (the Q4/Q5 offset and the Q4_1/Q4_K minimum
// folded in through the block's sum of activations). Lanes of a row are summed in shared memory.
// With p.norm, the RMSNorm of x is folded in: W (x * g / rms(x)) = (W (x * g)) / rms(x), the sum of
// squares gathered in the same pass over x (one dispatch instead of two, no normalized copy of x).
const MV_ROWS: u32 = 8u;
const MV_LANES: u32 = 8u;
var<workgroup> red: array<f32, 64>;
var<workgroup> red_ss: array<f32, 64>;

fn nibbles(v: u32, sh: u32) -> vec4<f32> {
    return vec4<f32>(f32((v >> sh) & 15u), f32((v >> (sh + 8u)) & 15u), f32((v >> (sh + 16u)) & 15u),
                     f32((v >> (sh + 24u)) & 15u));
}

fn bits4(h: u32, e: u32) -> vec4<f32> {  // bit 4 of elements e..e+3 (Q5), as 0 or 16
    return vec4<f32>(f32((h >> e) & 1u), f32((h >> (e + 1u)) & 1u), f32((h >> (e + 2u)) & 1u),
                     f32((h >> (e + 3u)) & 1u)) * 16.0;
}

fn bytes4(v: u32) -> vec4<f32> {  // four signed bytes, low byte first
    return vec4<f32>(f32(bitcast<i32>(v << 24u) >> 24u), f32(bitcast<i32>(v << 16u) >> 24u),
                     f32(bitcast<i32>(v << 8u) >> 24u), f32(bitcast<i32>(v) >> 24u));
}

// Dot product of global block gb with its 32 activations xs (element 4j + i in xs[j][i]).
fn block_dot(gb: u32, xs: array<vec4<f32>, 8>) -> f32 {
    var d = 0.0;
    switch FMT {
        case 0u: {
            for (var j = 0u; j < 8u; j = j + 1u) {
                let b = gb * 32u + 4u * j;
                d = d + dot(vec4<f32>(bitcast<f32>(q[b]), bitcast<f32>(q[b + 1u]), bitcast<f32>(q[b + 2u]),
                                      bitcast<f32>(q[b + 3u])), xs[j]);
            }
            return d;
        }
        case 1u: {
            for (var j = 0u; j < 8u; j = j + 1u) {
                d = d + dot(vec4<f32>(unpack2x16float(q[gb * 16u + 2u * j]), unpack2x16float(q[gb * 16u + 2u * j + 1u])),
                            xs[j]);
            }
            return d;
        }
        case 2u, 3u, 4u: {
            let words = select(4u, 5u, FMT == 4u);
            var sx = vec4<f32>(0.0);
            for (var j = 0u; j < 4u; j = j + 1u) {
                let v = q[gb * words + j];
                var lo = nibbles(v, 0u);
                var hi = nibbles(v, 4u);
                if (FMT == 4u) {
                    let h = q[gb * 5u + 4u];
                    lo = lo + bits4(h, 4u * j);
                    hi = hi + bits4(h, 16u + 4u * j);
                }
                d = d + dot(lo, xs[j]) + dot(hi, xs[4u + j]);
                sx = sx + xs[j] + xs[4u + j];
            }
            let sum_x = sx.x + sx.y + sx.z + sx.w;
            if (FMT == 2u) { return s[gb] * (d - 8.0 * sum_x); }
            if (FMT == 4u) { return s[gb] * (d - 16.0 * sum_x); }
            return s[gb] * d + m[gb] * sum_x;
        }
        case 5u: {
            for (var j = 0u; j < 8u; j = j + 1u) { d = d + dot(bytes4(q[gb * 8u + j]), xs[j]); }
            return s[gb] * d;
        }
        default: {  // 6: a scale per 16 elements
            var d1 = 0.0;
            for (var j = 0u; j < 4u; j = j + 1u) {
                d = d + dot(bytes4(q[gb * 8u + j]), xs[j]);
                d1 = d1 + dot(bytes4(q[gb * 8u + 4u + j]), xs[4u + j]);
            }
            return s[gb * 2u] * d + s[gb * 2u + 1u] * d1;
        }
    }
}

// One lane's partial sums for weight row r, the row's blocks dealt over `lanes` lanes:
// (activations . weights, sum of squares of x if p.norm).
fn mv_lane(r: u32, lane: u32, lanes: u32) -> vec2<f32> {
    let nb = p.k / 32u;
    let norm = p.norm == 1u;
    var acc = 0.0;
    var ss = 0.0;
    for (var b = lane; b < nb; b = b + lanes) {
        var xs: array<vec4<f32>, 8>;
        for (var j = 0u; j < 8u; j = j + 1u) {
            let e = p.x_off + b * 32u + 4u * j;
            var v = vec4<f32>(x[e], x[e + 1u], x[e + 2u], x[e + 3u]);
            if (norm) {
                ss = ss + dot(v, v);
                let c = b * 32u + 4u * j;
                v = v * vec4<f32>(g[c], g[c + 1u], g[c + 2u], g[c + 3u]);
            }
            xs[j] = v;
        }
        acc = acc + block_dot(r * nb + b, xs);
    }
    return vec2<f32>(acc, ss);
}

// Sum the MV_LANES lanes of each row slot (every invocation calls this: it has barriers); the sums
// land in the slot's first lane.
fn mv_reduce(lid: u32, v: vec2<f32>) {
    let lane = lid % MV_LANES;
    red[lid] = v.x;
    red_ss[lid] = v.y;
    workgroupBarrier();
    for (var st = MV_LANES / 2u; st > 0u; st = st >> 1u) {
        if (lane < st) {
            red[lid] = red[lid] + red[lid + st];
            red_ss[lid] = red_ss[lid] + red_ss[lid + st];
        }
        workgroupBarrier();
    }
}

// The reduced row at slot lane 0 `i`, with the RMSNorm scale applied when p.norm.
fn mv_value(i: u32) -> f32 {
    if (p.norm == 1u) { return red[i] * inverseSqrt(red_ss[i] / f32(p.k) + p.eps); }
    return red[i];
}

@compute @workgroup_size(64)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let r = (wg.x + wg.y * nwg.x) * MV_ROWS + lid / MV_LANES;
    var v = vec2<f32>(0.0);
    if (r < p.rows) { v = mv_lane(r, lid % MV_LANES, MV_LANES); }
    mv_reduce(lid, v);
    if (lid % MV_LANES == 0u && r < p.rows) { finish(0u, r, mv_value(lid)); }
}

// Gate/up projection with the gated activation in the epilogue: the weight holds gate rows
// [0, p.rows) then up rows [p.rows, 2 p.rows); a workgroup computes MV_ROWS / 2 gate rows and the
// matching up rows, and writes act(gate) * up (p.glu: 0 SiLU, 1 tanh GELU). One token, no bias.
@compute @workgroup_size(64)
fn matvec_glu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let half = MV_ROWS / 2u;
    let slot = lid / MV_LANES;
    let j = (wg.x + wg.y * nwg.x) * half + slot % half;
    var v = vec2<f32>(0.0);
    if (j < p.rows) { v = mv_lane(select(j, p.rows + j, slot >= half), lid % MV_LANES, MV_LANES); }
    mv_reduce(lid, v);
    if (lid % MV_LANES == 0u && slot < half && j < p.rows) {
        let gate = mv_value(lid);
        let up = mv_value(lid + half * MV_LANES);
        out[p.out_off + p.out_col0 + j] = select(silu(gate), gelu_tanh(gate), p.glu == 1u) * up;
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

// matvec.wgsl: a few tokens times a (quantized) weight matrix, the decode step's matrix kernels: plain
// (with bias and the residual add in the epilogue), gate/up with the gated activation, and
// matvec_batch (up to 4 tokens per workgroup: each weight block is read once for them).
// Weight blocks: quant.wgsl; silu and gelu_tanh: activations.wgsl.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage x     vec4<f32> input, read   (XSRC 0: the activations; 1: split attention partials)
//   2-4             the weight (quant.wgsl)
//   5 storage out   f32 output, read_write
//   6 storage bias  f32 bias per row, read              (P.has_bias == 1)
//   7 storage g     vec4<f32> RMSNorm weight, read      (P.norm == 1: out = W (rmsnorm(x) * g))
//
// Work split: a workgroup of WG invocations is WG / LANES groups of LANES lanes; a group computes RT
// rows, its lanes dealt the row's 32-element blocks (lane, lane + LANES, ...). A lane loads a block's
// activations once and uses them for its RT rows; the block scale is applied once per block. Lanes
// are summed in shared memory. With P.norm, RMSNorm of x is folded in: W (x * g / rms(x)) =
// (W (x * g)) / rms(x), the sum of squares gathered in the same pass over x.
// XSRC 1 reads x as attention.wgsl's split-KV partials and merges them on the way in (the attention
// output projection): head h, split s at (h * splits_max + s) * (hd_v + 4) floats: (max, sum, 0, 0),
// then the unnormalized output [hd_v].

struct P {
    k: u32,          // inner dimension (multiple of 32)
    rows: u32,       // weight rows of this piece (matvec_glu: output columns, the gate half)
    out_off: u32,    // element offset of the output
    out_col0: u32,   // output column of this piece's row 0
    x_off: u32,      // element offset of x (multiple of 4)
    has_bias: u32,
    accumulate: u32, // 1: out += result (the residual add)
    norm: u32,       // 1: RMSNorm x in the prologue
    eps: f32,        // the RMSNorm epsilon
    glu: u32,        // matvec_glu: 0 SiLU, 1 tanh GELU
    hd_v: u32,       // XSRC 1: value head size
    pos0: u32,       // XSRC 1: the decode position (splits in use = pos0 / split + 1)
    ctx: u32,        // XSRC 1: the cache length (splits_max = ceil(ctx / SPLIT))
    n: u32,          // matvec_batch: tokens
    x_stride: u32,   // matvec_batch: elements between rows of x (a multiple of 4)
    out_stride: u32, // matvec_batch: elements between rows of out
}

override XSRC: u32 = 0u;
override LANES: u32 = 16u;  // lanes per row group: a power of two, 4..64
override SG: u32 = 0u;      // > 0: subgroups of SG invocations, LANES a multiple: lanes summed with lane_total
override SPLIT: u32 = 128u; // XSRC 1: key positions per attention split (decode_attention.wgsl's)
override RT: u32 = 4u;     // rows per group: 1, 2 or 4 (matvec_glu: 4)
const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read> g: array<vec4<f32>>;

var<workgroup> red: array<f32, 1280>;  // [RT + 1][WG]: each row's lane sums, then the sums of squares

fn xv(i: u32) -> vec4<f32> { return x[i]; }

// The 32 inputs of block b.
fn load_x(b: u32) -> X8 {
    if (XSRC == 0u) {
        let i = p.x_off / 4u + b * 8u;
        return X8(xv(i), xv(i + 1u), xv(i + 2u), xv(i + 3u), xv(i + 4u), xv(i + 5u), xv(i + 6u), xv(i + 7u));
    }
    return X8(merged(b * 32u), merged(b * 32u + 4u), merged(b * 32u + 8u), merged(b * 32u + 12u),
              merged(b * 32u + 16u), merged(b * 32u + 20u), merged(b * 32u + 24u), merged(b * 32u + 28u));
}

// Inputs e..e+3 (within one head, as hd_v is a multiple of 4) merged from the split partials:
// sum over splits of exp(m_s - max m) * o_s, over the same sum of exp(m_s - max m) * l_s.
fn merged(e: u32) -> vec4<f32> {
    let stride = (p.hd_v + 4u) / 4u;                     // vec4s per partial
    let smax = (p.ctx + SPLIT - 1u) / SPLIT;
    let ns = p.pos0 / SPLIT + 1u;
    let first = p.x_off / 4u + (e / p.hd_v) * smax * stride;
    var mx = -3.0e38;
    for (var sp = 0u; sp < ns; sp++) { mx = max(mx, x[first + sp * stride].x); }
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var sp = 0u; sp < ns; sp++) {
        let hdr = x[first + sp * stride];
        let w = select(exp(hdr.x - mx), 0.0, hdr.x <= -3.0e38);
        l += w * hdr.y;
        acc += w * x[first + sp * stride + 1u + (e % p.hd_v) / 4u];
    }
    return acc / l;
}

// One group's sums for weight rows r0..r3 (the first RT of them), reduced over its lanes into
// red[r * WG + group * LANES], the sum of squares of x at red[4 * WG + ...]. Every invocation calls
// it (barriers).
fn group_sums(lid: u32, r0: u32, r1: u32, r2: u32, r3: u32) {
    let lane = lid % LANES;
    let nb = p.k / 32u;
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    var ss = 0.0;
    for (var b = lane; b < nb; b += LANES) {
        var xs = load_x(b);
        if (p.norm == 1u) {
            ss += x8_dot(xs, xs);
            let gi = b * 8u;
            xs = x8_mul(xs, X8(g[gi], g[gi + 1u], g[gi + 2u], g[gi + 3u], g[gi + 4u], g[gi + 5u], g[gi + 6u], g[gi + 7u]));
        }
        let sx = x8_sum(xs);
        a0 += block_dot(r0 * nb + b, xs, sx);
        if (RT > 1u) { a1 += block_dot(r1 * nb + b, xs, sx); }
        if (RT > 2u) {
            a2 += block_dot(r2 * nb + b, xs, sx);
            a3 += block_dot(r3 * nb + b, xs, sx);
        }
    }
    lane_sums(lid, a0, a1, a2, a3, ss);
}

// Row r's sums for tokens t0..t0+3 (those below p.n), each block's raw values loaded once.
fn token_sums(lid: u32, r: u32, t0: u32) {
    let lane = lid % LANES;
    let nb = p.k / 32u;
    let last = p.n - 1u;
    let i0 = (p.x_off + min(t0, last) * p.x_stride) / 4u;
    let i1 = (p.x_off + min(t0 + 1u, last) * p.x_stride) / 4u;
    let i2 = (p.x_off + min(t0 + 2u, last) * p.x_stride) / 4u;
    let i3 = (p.x_off + min(t0 + 3u, last) * p.x_stride) / 4u;
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    for (var b = lane; b < nb; b += LANES) {
        let gb = r * nb + b;
        let v = block_raw(gb);
        let x0 = x_block(i0 + b * 8u);
        let x1 = x_block(i1 + b * 8u);
        let x2 = x_block(i2 + b * 8u);
        let x3 = x_block(i3 + b * 8u);
        a0 += scaled_dot(gb, v, x0, x8_sum(x0));
        a1 += scaled_dot(gb, v, x1, x8_sum(x1));
        a2 += scaled_dot(gb, v, x2, x8_sum(x2));
        a3 += scaled_dot(gb, v, x3, x8_sum(x3));
    }
    lane_sums(lid, a0, a1, a2, a3, 0.0);
}

fn x_block(i: u32) -> X8 {
    return X8(xv(i), xv(i + 1u), xv(i + 2u), xv(i + 3u), xv(i + 4u), xv(i + 5u), xv(i + 6u), xv(i + 7u));
}

// Five values per lane summed over each group's lanes into red[j * WG + group * LANES], j = 0..4.
fn lane_sums(lid: u32, a0_: f32, a1_: f32, a2_: f32, a3_: f32, ss_: f32) {
    let lane = lid % LANES;
    var a0 = a0_;
    var a1 = a1_;
    var a2 = a2_;
    var a3 = a3_;
    var ss = ss_;
    if (SG > 0u) {  // subgroup sums, then the LANES / SG subgroups of a group through shared memory
        a0 = lane_total(a0);
        a1 = lane_total(a1);
        a2 = lane_total(a2);
        a3 = lane_total(a3);
        ss = lane_total(ss);
        if (lid % SG == 0u) {
            red[lid] = a0;
            red[WG + lid] = a1;
            red[2u * WG + lid] = a2;
            red[3u * WG + lid] = a3;
            red[4u * WG + lid] = ss;
        }
        workgroupBarrier();
        if (LANES > SG && lane == 0u) {
            for (var i = SG; i < LANES; i += SG) {
                red[lid] += red[lid + i];
                red[WG + lid] += red[WG + lid + i];
                red[2u * WG + lid] += red[2u * WG + lid + i];
                red[3u * WG + lid] += red[3u * WG + lid + i];
                red[4u * WG + lid] += red[4u * WG + lid + i];
            }
        }
        workgroupBarrier();
        return;
    }
    red[lid] = a0;
    red[WG + lid] = a1;
    red[2u * WG + lid] = a2;
    red[3u * WG + lid] = a3;
    red[4u * WG + lid] = ss;
    workgroupBarrier();
    for (var st = LANES / 2u; st > 0u; st >>= 1u) {
        if (lane < st) {
            red[lid] += red[lid + st];
            red[WG + lid] += red[WG + lid + st];
            red[2u * WG + lid] += red[2u * WG + lid + st];
            red[3u * WG + lid] += red[3u * WG + lid + st];
            red[4u * WG + lid] += red[4u * WG + lid + st];
        }
        workgroupBarrier();
    }
}

// Row slot r of the group starting at invocation g0, with the RMSNorm scale applied when p.norm.
fn row_value(r: u32, g0: u32) -> f32 {
    var v = red[r * WG + g0];
    if (p.norm == 1u) { v *= inverseSqrt(red[4u * WG + g0] / f32(p.k) + p.eps); }
    return v;
}

@compute @workgroup_size(256)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let grp = lid / LANES;
    let r0 = ((wg.x + wg.y * nwg.x) * (WG / LANES) + grp) * RT;
    let last = p.rows - 1u;  // rows past the end read the last row; their results are not written
    group_sums(lid, min(r0, last), min(r0 + 1u, last), min(r0 + 2u, last), min(r0 + 3u, last));
    let lane = lid % LANES;
    let r = r0 + lane;
    if (lane < RT && r < p.rows) {
        var v = row_value(lane, grp * LANES);
        if (p.has_bias == 1u) { v += bias[r]; }
        let o = p.out_off + p.out_col0 + r;
        if (p.accumulate == 1u) { v += out[o]; }
        out[o] = v;
    }
}

// Gate/up projection with the gated activation in the epilogue: the weight holds gate rows
// [0, p.rows) then up rows [p.rows, 2 p.rows); a group computes gate rows j, j+1 and up rows
// p.rows + j, p.rows + j + 1, and writes act(gate) * up (p.glu: 0 SiLU, 1 tanh GELU). No bias.
@compute @workgroup_size(256)
fn matvec_glu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let grp = lid / LANES;
    let j0 = ((wg.x + wg.y * nwg.x) * (WG / LANES) + grp) * 2u;
    let ja = min(j0, p.rows - 1u);
    let jb = min(j0 + 1u, p.rows - 1u);
    group_sums(lid, ja, jb, p.rows + ja, p.rows + jb);
    let lane = lid % LANES;
    let j = j0 + lane;
    if (lane < 2u && j < p.rows) {
        let gate = row_value(lane, grp * LANES);
        let up = row_value(2u + lane, grp * LANES);
        out[p.out_off + p.out_col0 + j] = select(silu(gate), gelu_tanh(gate), p.glu == 1u) * up;
    }
}

// Up to 4 tokens (rows of x) times the matrix: a group computes one weight row for
// the workgroup's 4 tokens (grid.y: token groups), each weight block read once for them. No norm.
@compute @workgroup_size(256)
fn matvec_batch(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let grp = lid / LANES;
    let r = (wg.x * (WG / LANES) + grp);
    let t0 = wg.y * 4u;
    token_sums(lid, min(r, p.rows - 1u), t0);
    let lane = lid % LANES;
    let t = t0 + lane;
    if (lane < 4u && t < p.n && r < p.rows) {
        var v = red[lane * WG + grp * LANES];
        if (p.has_bias == 1u) { v += bias[r]; }
        let o = p.out_off + t * p.out_stride + p.out_col0 + r;
        if (p.accumulate == 1u) { v += out[o]; }
        out[o] = v;
    }
}

// qmatrix.wgsl: many tokens times a (quantized) weight matrix (prefill GEMM), and the embedding
// lookup. Weight blocks: quant.wgsl.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage x      vec4<f32> activations, read      (matmul; embed: token ids as u32 bits, as f32)
//   2-4              the weight (quant.wgsl)
//   5 storage out    f32 output, read_write
//   6 storage bias   f32 bias per row, read          (P.has_bias == 1)
//   7 storage ids    u32 token ids, read              (embed)

struct P {
    n: u32,          // tokens
    k: u32,          // inner dimension (multiple of 32)
    rows: u32,       // weight rows of this piece
    out_col0: u32,   // output column of the piece's row 0
    out_stride: u32, // elements between output rows
    x_off: u32,      // element offset of x (multiple of 4)
    x_stride: u32,   // elements between rows of x (multiple of 4)
    out_off: u32,    // element offset of out
    has_bias: u32,
    accumulate: u32, // 1: out += result (the residual add)
    row0: u32,       // embed: first vocabulary row of this piece
    scale: f32,      // embed: multiplier
    pad0: u32, pad1: u32, pad2: u32, pad3: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read> ids: array<u32>;

// ---------------------------------------------------------------------------- matmul (prefill)
// out[i, r] = x[i, :] . W[r, :] for a tile of 64 tokens x 64 rows per workgroup of 256 invocations,
// each computing 4 tokens x 4 rows. K advances one 32-element block at a time: invocations 0..63
// dequantize the tile's 64 weight blocks, the others stage the 64 x 32 activations; both tiles are
// kept k-major in workgroup memory so an invocation reads its 4 rows and 4 tokens as two vec4s.
const TM: u32 = 64u;  // tokens per tile
const TN: u32 = 64u;  // rows per tile
var<workgroup> ws: array<vec4<f32>, 512>;  // [32 k][TN / 4]
var<workgroup> xt: array<vec4<f32>, 512>;  // [32 k][TM / 4]

@compute @workgroup_size(256)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = wg.x * TN;
    let tok0 = wg.y * TM;
    let tx = lid % 16u;   // rows row0 + 4 tx ..
    let ty = lid / 16u;   // tokens tok0 + 4 ty ..
    let nb = p.k / 32u;
    var acc0 = vec4<f32>(0.0);  // token 4 ty + 0, rows 4 tx ..
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var b = 0u; b < nb; b++) {
        if (lid < TN) {
            let r = min(row0 + lid, p.rows - 1u);
            let v = block_values(r * nb + b);
            stage_w(0u, lid, v.v0);
            stage_w(4u, lid, v.v1);
            stage_w(8u, lid, v.v2);
            stage_w(12u, lid, v.v3);
            stage_w(16u, lid, v.v4);
            stage_w(20u, lid, v.v5);
            stage_w(24u, lid, v.v6);
            stage_w(28u, lid, v.v7);
        } else {
            for (var t = lid - TN; t < TM * 8u; t += 256u - TN) {
                let i = t % TM;       // token
                let c = t / TM;       // vec4 of the block
                let tok = min(tok0 + i, p.n - 1u);
                let v = x[(p.x_off + tok * p.x_stride) / 4u + b * 8u + c];
                for (var e = 0u; e < 4u; e++) { xt[(4u * c + e) * 16u + i / 4u][i % 4u] = v[e]; }
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 32u; kk++) {
            let w = ws[kk * 16u + tx];
            let a = xt[kk * 16u + ty];
            acc0 += a.x * w;
            acc1 += a.y * w;
            acc2 += a.z * w;
            acc3 += a.w * w;
        }
        workgroupBarrier();
    }
    store(tok0 + 4u * ty, row0 + 4u * tx, acc0);
    store(tok0 + 4u * ty + 1u, row0 + 4u * tx, acc1);
    store(tok0 + 4u * ty + 2u, row0 + 4u * tx, acc2);
    store(tok0 + 4u * ty + 3u, row0 + 4u * tx, acc3);
}

// Weight row r's values for k-rows kk..kk+3 into the k-major tile (row r: vec4 r / 4, component r % 4).
fn stage_w(kk: u32, r: u32, v: vec4<f32>) {
    ws[kk * 16u + r / 4u][r % 4u] = v.x;
    ws[(kk + 1u) * 16u + r / 4u][r % 4u] = v.y;
    ws[(kk + 2u) * 16u + r / 4u][r % 4u] = v.z;
    ws[(kk + 3u) * 16u + r / 4u][r % 4u] = v.w;
}

// Outputs (token i, rows r0..r0+3) with bias and residual, those inside the matrix.
fn store(i: u32, r0: u32, v4: vec4<f32>) {
    if (i >= p.n) { return; }
    for (var c = 0u; c < 4u; c++) {
        let r = r0 + c;
        if (r < p.rows) {
            var v = v4[c];
            if (p.has_bias == 1u) { v += bias[r]; }
            let o = p.out_off + i * p.out_stride + p.out_col0 + r;
            if (p.accumulate == 1u) { v += out[o]; }
            out[o] = v;
        }
    }
}

// ---------------------------------------------------------------------------- embedding lookup
// out[i, :] = table[ids[i], :] * scale for the ids that fall in this piece's rows; one invocation
// per 32-element block. grid: (ceil(k / 32 / 64), n)
@compute @workgroup_size(64)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>) {
    let b = gid.x;
    let i = gid.y;
    let nb = p.k / 32u;
    if (b >= nb || i >= p.n) { return; }
    let id = ids[i];
    if (id < p.row0 || id >= p.row0 + p.rows) { return; }
    let v = x8_scale(block_values((id - p.row0) * nb + b), p.scale);
    let o = p.out_off + i * p.out_stride + b * 32u;
    for (var c = 0u; c < 32u; c++) { out[o + c] = x8_at(v, c); }
}

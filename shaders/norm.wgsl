// norm.wgsl: RMSNorm and LayerNorm over the last axis of a (possibly strided, per-head) view.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage x    f32 input, read
//   2 storage w    f32 weight [m], read
//   3 storage out  f32 output, contiguous [rows, m], read_write
//   4 storage b    f32 bias [m], read (layernorm)
// Row r of the view starts at x_off + (r / heads) * x_stride + (r % heads) * m.
// One workgroup per row: f32 sums, reduced with wg_sum (reduce.wgsl).

struct P {
    rows: u32,
    m: u32,
    heads: u32,
    x_off: u32,
    x_stride: u32,
    eps: f32,
    pad0: u32, pad1: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> b: array<f32>;

@compute @workgroup_size(64)
fn rmsnorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let r = wg.x + wg.y * nwg.x;
    let base = p.x_off + (r / p.heads) * p.x_stride + (r % p.heads) * p.m;
    var acc = 0.0;
    if (r < p.rows) {
        for (var j = lid; j < p.m; j = j + 64u) {
            let v = x[base + j];
            acc = acc + v * v;
        }
    }
    let inv = 1.0 / sqrt(wg_sum(lid, 64u, acc) / f32(p.m) + p.eps);
    if (r >= p.rows) { return; }
    for (var j = lid; j < p.m; j = j + 64u) {
        out[r * p.m + j] = x[base + j] * inv * w[j];
    }
}


// LayerNorm with bias (phi2): (x - mean) / sqrt(var + eps) * w + b, f32 statistics.
@compute @workgroup_size(64)
fn layernorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let r = wg.x + wg.y * nwg.x;
    let base = p.x_off + (r / p.heads) * p.x_stride + (r % p.heads) * p.m;
    var acc = 0.0;
    if (r < p.rows) {
        for (var j = lid; j < p.m; j = j + 64u) { acc = acc + x[base + j]; }
    }
    let mean = wg_sum(lid, 64u, acc) / f32(p.m);
    var sq = 0.0;
    if (r < p.rows) {
        for (var j = lid; j < p.m; j = j + 64u) {
            let c = x[base + j] - mean;
            sq = sq + c * c;
        }
    }
    let inv = 1.0 / sqrt(wg_sum(lid, 64u, sq) / f32(p.m) + p.eps);
    if (r >= p.rows) { return; }
    for (var j = lid; j < p.m; j = j + 64u) {
        out[r * p.m + j] = (x[base + j] - mean) * inv * w[j] + b[j];
    }
}

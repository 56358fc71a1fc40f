// norm.wgsl: RMSNorm over the last axis of a (possibly strided, per-head) view.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage x    f32 input, read
//   2 storage w    f32 weight [m], read
//   3 storage out  f32 output, contiguous [rows, m], read_write
// Row r of the view starts at x_off + (r / heads) * x_stride + (r % heads) * m.
// One workgroup per row: f32 sum of squares, shared-memory tree reduction.

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

var<workgroup> red: array<f32, 64>;

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
    red[lid] = acc;
    workgroupBarrier();
    for (var st = 32u; st > 0u; st = st >> 1u) {
        if (lid < st) { red[lid] = red[lid] + red[lid + st]; }
        workgroupBarrier();
    }
    if (r >= p.rows) { return; }
    let inv = 1.0 / sqrt(red[0] / f32(p.m) + p.eps);
    for (var j = lid; j < p.m; j = j + 64u) {
        out[r * p.m + j] = x[base + j] * inv * w[j];
    }
}

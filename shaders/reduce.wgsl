// reduce.wgsl: workgroup-wide reductions through shared memory, appended to the modules that use them
// (SHADER_PARTS in wasmchord/backends/webgpu/shaders.py). Every invocation of the workgroup calls them
// (they hold barriers) with its local index `lid` and the workgroup size `n` (a power of two, at most
// 256); each returns the result to every invocation. Pairwise tree order, so results are reproducible.

var<workgroup> red_f: array<f32, 256>;
var<workgroup> red_u: array<u32, 256>;

fn wg_sum(lid: u32, n: u32, v: f32) -> f32 {
    red_f[lid] = v;
    workgroupBarrier();
    for (var st = n / 2u; st > 0u; st = st >> 1u) {
        if (lid < st) { red_f[lid] = red_f[lid] + red_f[lid + st]; }
        workgroupBarrier();
    }
    let r = red_f[0];
    workgroupBarrier();  // red_f is reused by the next reduction
    return r;
}

fn wg_max(lid: u32, n: u32, v: f32) -> f32 {
    red_f[lid] = v;
    workgroupBarrier();
    for (var st = n / 2u; st > 0u; st = st >> 1u) {
        if (lid < st) { red_f[lid] = max(red_f[lid], red_f[lid + st]); }
        workgroupBarrier();
    }
    let r = red_f[0];
    workgroupBarrier();
    return r;
}

fn wg_sum_u(lid: u32, n: u32, v: u32) -> u32 {
    red_u[lid] = v;
    workgroupBarrier();
    for (var st = n / 2u; st > 0u; st = st >> 1u) {
        if (lid < st) { red_u[lid] = red_u[lid] + red_u[lid + st]; }
        workgroupBarrier();
    }
    let r = red_u[0];
    workgroupBarrier();
    return r;
}

// The largest value and its index (ties: the lowest index); invalid entries carry index 0xffffffff.
fn wg_argmax(lid: u32, n: u32, v: f32, i: u32) -> u32 {
    red_f[lid] = v;
    red_u[lid] = i;
    workgroupBarrier();
    for (var st = n / 2u; st > 0u; st = st >> 1u) {
        if (lid < st) {
            let ov = red_f[lid + st];
            let oi = red_u[lid + st];
            if (ov > red_f[lid] || (ov == red_f[lid] && oi < red_u[lid])) {
                red_f[lid] = ov;
                red_u[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    let r = red_u[0];
    workgroupBarrier();
    return r;
}

// argmax.wgsl: index of the largest value of a vector (ties: the lowest index), one workgroup.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage x     f32 values, read
//   2 storage ids   u32 token buffer, read_write: ids[0] = argmax (the next step's embedding input)

struct P {
    count: u32,
    x_off: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;

@compute @workgroup_size(256)
fn argmax(@builtin(local_invocation_index) lid: u32) {
    var best = -3.4e38;
    var idx = 0xffffffffu;
    for (var j = lid; j < p.count; j = j + 256u) {
        let v = x[p.x_off + j];
        if (v > best) { best = v; idx = j; }
    }
    let tok = wg_argmax(lid, 256u, best, idx);
    if (lid == 0u) { ids[0] = tok; }
}

// elementwise.wgsl: gated activations (SwiGLU, GeGLU with tanh GELU), GELU, and the residual add.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage a    f32, read_write  (swiglu/geglu/gelu: output; add: accumulator a += b)
//   2 storage b    f32, read        (swiglu/geglu: gate | up [n, 2f]; gelu: input; add: addend)
// P.count = elements to produce; P.f = width of the gate half. silu and gelu_tanh: activations.wgsl.

struct P {
    count: u32,
    f: u32,
    a_off: u32,
    b_off: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

// (gate, up) for output element j of a [n, f] result read from [n, 2f].
fn gate_up(j: u32) -> vec2<f32> {
    let row = p.b_off + (j / p.f) * 2u * p.f + j % p.f;
    return vec2<f32>(b[row], b[row + p.f]);
}

@compute @workgroup_size(64)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = index(gid, nwg);
    if (j >= p.count) { return; }
    let gu = gate_up(j);
    a[p.a_off + j] = silu(gu.x) * gu.y;
}

@compute @workgroup_size(64)
fn gelu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = index(gid, nwg);
    if (j >= p.count) { return; }
    a[p.a_off + j] = gelu_tanh(b[p.b_off + j]);
}

@compute @workgroup_size(64)
fn geglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = index(gid, nwg);
    if (j >= p.count) { return; }
    let gu = gate_up(j);
    a[p.a_off + j] = gelu_tanh(gu.x) * gu.y;
}

@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = index(gid, nwg);
    if (j >= p.count) { return; }
    a[p.a_off + j] = a[p.a_off + j] + b[p.b_off + j];
}

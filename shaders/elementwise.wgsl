// elementwise.wgsl: gated activations (SwiGLU, GeGLU with tanh GELU), GELU, and the residual add.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage a    f32, read_write  (swiglu/geglu/gelu: output; add: accumulator a += b)
//   2 storage b    f32, read        (swiglu/geglu: gate | up [n, 2f]; gelu: input; add: addend)
// P.count = elements to produce; P.f = width of the gate half.

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

@compute @workgroup_size(64)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = index(gid, nwg);
    if (j >= p.count) { return; }
    let i = j / p.f;
    let c = j % p.f;
    let g = b[p.b_off + i * 2u * p.f + c];
    let u = b[p.b_off + i * 2u * p.f + p.f + c];
    a[p.a_off + j] = g / (1.0 + exp(-g)) * u;
}

// tanh-approximated GELU; tanh written through exp, clamped so exp never overflows.
fn gelu_tanh(g: f32) -> f32 {
    let z = clamp(0.7978845608 * (g + 0.044715 * g * g * g), -15.0, 15.0);
    let e = exp(2.0 * z);
    return 0.5 * g * (1.0 + (e - 1.0) / (e + 1.0));
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
    let i = j / p.f;
    let c = j % p.f;
    let g = b[p.b_off + i * 2u * p.f + c];
    let u = b[p.b_off + i * 2u * p.f + p.f + c];
    a[p.a_off + j] = gelu_tanh(g) * u;
}

@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = index(gid, nwg);
    if (j >= p.count) { return; }
    a[p.a_off + j] = a[p.a_off + j] + b[p.b_off + j];
}

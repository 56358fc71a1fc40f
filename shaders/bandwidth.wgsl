// bandwidth.wgsl: a saturating read of a large buffer (grid-stride vec4<u32> loads), the profiler's
// reference for what the device's memory gives a WGSL kernel.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage src   vec4<u32> the buffer read, read
//   2 storage dst   u32 one word per invocation (keeps the loads alive), read_write

struct P {
    n: u32,          // vec4s in src
    pad0: u32, pad1: u32, pad2: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

@compute @workgroup_size(256)
fn sweep(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    var acc = vec4<u32>(0u);
    for (var i = gid.x; i < p.n; i += stride) { acc ^= src[i]; }
    dst[gid.x] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}

// subgroup_probe.wgsl: how a device forms subgroups in a workgroup of 256 (compiled only with the
// `subgroup` feature): each invocation writes its subgroup size and its index within the subgroup.
// The GPU backend sums matvec lanes with subgroup operations only where subgroups are consecutive
// runs of local_invocation_index of one fixed size.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage out   u32 [256][2], read_write

struct P {
    pad0: u32, pad1: u32, pad2: u32, pad3: u32,
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(256)
fn probe(@builtin(local_invocation_index) lid: u32, @builtin(subgroup_size) size: u32,
         @builtin(subgroup_invocation_id) id: u32) {
    out[2u * lid] = size;
    out[2u * lid + 1u] = id;
}

// qmatrix_subgroup.wgsl: matvec entry points that sum with subgroup operations instead of shared
// memory and barriers. Appended to qmatrix.wgsl when the device has the `subgroup` feature.
//
// Correct for any subgroup size and any mapping of invocations to subgroups: each subgroup takes a
// slot from a workgroup counter (its first active invocation increments it), then handles the
// workgroup's rows slot, slot + subgroups, ... with its invocations as lanes over the blocks.

var<workgroup> sg_next: atomic<u32>;

struct SgLane {
    slot: u32,     // this subgroup's index among the workgroup's subgroups
    count: u32,    // subgroups in the workgroup
    lane: u32,     // lane within the subgroup
    lanes: u32,    // active lanes of the subgroup
}

fn sg_lane(lid: u32, sg_id: u32, sg_size: u32) -> SgLane {
    if (lid == 0u) { atomicStore(&sg_next, 0u); }  // workgroup memory is not zeroed on every driver
    workgroupBarrier();
    var slot = 0u;
    if (sg_id == subgroupBroadcastFirst(sg_id)) { slot = atomicAdd(&sg_next, 1u); }  // one per subgroup
    let lanes = min(sg_size, 64u);
    return SgLane(subgroupBroadcastFirst(slot), max(64u / lanes, 1u), sg_id, lanes);
}

// Row r summed over the subgroup's lanes (mv_lane: qmatrix.wgsl), the RMSNorm scale applied if p.norm.
fn sg_row(r: u32, l: SgLane) -> f32 {
    var part = vec2<f32>(0.0);
    if (l.lane < l.lanes) { part = mv_lane(r, l.lane, l.lanes); }
    let v = subgroupAdd(part.x);
    let ss = subgroupAdd(part.y);
    if (p.norm == 1u) { return v * inverseSqrt(ss / f32(p.k) + p.eps); }
    return v;
}

@compute @workgroup_size(64)
fn matvec_sg(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) sg_id: u32,
             @builtin(subgroup_size) sg_size: u32) {
    let l = sg_lane(lid, sg_id, sg_size);
    let r0 = (wg.x + wg.y * nwg.x) * MV_ROWS;
    for (var i = l.slot; i < MV_ROWS; i = i + l.count) {
        let r = r0 + i;
        if (r >= p.rows) { break; }  // uniform within the subgroup
        let v = sg_row(r, l);
        if (l.lane == 0u) { finish(0u, r, v); }
    }
}

@compute @workgroup_size(64)
fn matvec_glu_sg(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) sg_id: u32,
             @builtin(subgroup_size) sg_size: u32) {
    let l = sg_lane(lid, sg_id, sg_size);
    let half = MV_ROWS / 2u;
    let j0 = (wg.x + wg.y * nwg.x) * half;
    for (var i = l.slot; i < half; i = i + l.count) {
        let j = j0 + i;
        if (j >= p.rows) { break; }
        let gate = sg_row(j, l);
        let up = sg_row(p.rows + j, l);
        if (l.lane == 0u) {
            out[p.out_off + p.out_col0 + j] = select(silu(gate), gelu_tanh(gate), p.glu == 1u) * up;
        }
    }
}

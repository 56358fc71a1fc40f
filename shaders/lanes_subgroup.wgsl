// lanes_subgroup.wgsl: the sum over a subgroup, appended to matvec.wgsl on devices with the `subgroup`
// feature (lanes_plain.wgsl otherwise), so that matvec.wgsl compiles on every device.
fn lane_total(v: f32) -> f32 { return subgroupAdd(v); }

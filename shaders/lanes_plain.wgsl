// lanes_plain.wgsl: stands in for lanes_subgroup.wgsl on devices without the `subgroup` feature;
// matvec.wgsl never calls it there (its override SG is 0).
fn lane_total(v: f32) -> f32 { return v; }

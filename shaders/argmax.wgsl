// argmax.wgsl: index of the largest value of a vector (ties: the lowest index), in two dispatches:
// `partial` has each workgroup reduce a grid-stride share of the vector to (value, index); `final`
// reduces those in one workgroup and writes the token buffer: the index, or NONE / BAD (below).
// `partial_rows` / `combine_rows` do the same for several rows of a [rows, count] matrix at once
// (grid.y: the row; row r's token to ids[r]). wg_argmax: reduce.wgsl.
//
// Bindings (group 0):
//   0 uniform P
//   1 storage x     f32 values, read
//   2 storage ids   u32 token buffer, read_write: ids[0] = argmax (the next step's embedding input)
//   3 storage part  vec2<u32> (value bits, index) per partial workgroup, read_write
//   4 storage mask  u32 allowed tokens (bit j % 32 of word j / 32), read   (P.masked == 1: a constraint)

struct P {
    count: u32,
    x_off: u32,
    parts: u32,   // workgroups of `partial`
    masked: u32,  // 1: only tokens `mask` allows
    row_stride: u32,  // partial_rows / combine_rows: elements between rows of x
}

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> part: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read> mask: array<u32>;

fn allowed(j: u32) -> bool {
    return p.masked == 0u || ((mask[j / 32u] >> (j % 32u)) & 1u) == 1u;
}

const NONE: u32 = 0xffffffffu;  // no value above -3.4e38 is allowed (every allowed logit is -infinity)
const BAD: u32 = 0xfffffffeu;   // a NaN or +infinity among the allowed values: the host fails the request
const TOP: u32 = 0x7f7fffffu;   // the largest finite f32's bits: a BAD share outranks every other one

// NaN or +infinity, told by the bits (comparisons with NaN are not reliable in shaders).
fn non_finite(v: f32) -> bool {
    let b = bitcast<u32>(v);
    return (b & 0x7fffffffu) > 0x7f800000u || b == 0x7f800000u;
}

// Workgroup w's share of the row at x_off into part[slot].
fn partial_of(w: u32, lid: u32, x_off: u32, slot: u32) {
    var best = -3.4e38;
    var idx = NONE;
    for (var j = w * 256u + lid; j < p.count; j += p.parts * 256u) {
        let v = x[x_off + j];
        if (idx != BAD && allowed(j)) {
            if (non_finite(v)) {
                best = bitcast<f32>(TOP);
                idx = BAD;
            } else if (v > best) {
                best = v;
                idx = j;
            }
        }
    }
    let i = wg_argmax(lid, 256u, best, idx);
    if (lid == 0u) {
        var v = -3.4e38;
        if (i == BAD) { v = bitcast<f32>(TOP); } else if (i != NONE) { v = x[x_off + i]; }
        part[slot] = vec2<u32>(bitcast<u32>(v), i);
    }
}

// The partials part[first..first + parts) reduced to one token, written to ids[out].
fn combine_of(lid: u32, first: u32, out: u32) {
    var best = -3.4e38;
    var idx = NONE;
    for (var j = lid; j < p.parts; j += 256u) {
        let v = bitcast<f32>(part[first + j].x);
        let i = part[first + j].y;
        if (v > best || (v == best && i < idx)) { best = v; idx = i; }
    }
    let tok = wg_argmax(lid, 256u, best, idx);
    if (lid == 0u) { ids[out] = tok; }
}

// grid: (parts)
@compute @workgroup_size(256)
fn partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    partial_of(wg.x, lid, p.x_off, wg.x);
}

// grid: (1)
@compute @workgroup_size(256)
fn combine(@builtin(local_invocation_index) lid: u32) {
    combine_of(lid, 0u, 0u);
}

// grid: (parts, rows)
@compute @workgroup_size(256)
fn partial_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    partial_of(wg.x, lid, p.x_off + wg.y * p.row_stride, wg.y * p.parts + wg.x);
}

// grid: (1, rows)
@compute @workgroup_size(256)
fn combine_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    combine_of(lid, wg.y * p.parts, wg.y);
}

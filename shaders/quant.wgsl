// quant.wgsl: quantized weight blocks as the GPU backend repacks them (webgpu/weights.py), appended to
// the modules that read weights (matvec.wgsl, qmatrix.wgsl). A block is 32 consecutive elements of a
// row; block gb of a matrix is row (gb / blocks per row), elements 32 * (gb % blocks per row) + 0..31.
// A block's 32 values travel as an X8 (element 4j + i in field vj, component i): a struct, not an
// array, so that compilers keep it in registers.
//
// Bindings (group 0):
//   2 storage q    vec4<u32> packed quants, read    (vec4s per block: see FMT)
//   3 storage s    f32 block scales, read           (1 per block; 2 for FMT 6 and 7; 4 for FMT 8)
//   4 storage m    u32 per block, read              (FMT 3: the minimum as f32 bits; FMT 4, 7: bit 4 of the 32 values)
// Override FMT: 0 F32 (8 vec4s) | 1 F16 (4) | 2 Q4 sym, Q4_0 (1) | 3 Q4 with min, Q4_1 and Q4_K (1)
//               | 4 Q5 sym, Q5_0 (1) | 5 Q8, Q8_0 (2) | 6 Q8 with a scale per 16, Q6_K and Q3_K
//               repacked (2) | 7 Q5 with min, Q5_1 and Q5_K (1; s holds scale, minimum per block)
//               | 8 Q4 with a scale and a minimum per 16, Q2_K repacked (1; s: scale, minimum, scale, minimum).
// 4-bit words follow GGUF's byte order: in word w of a block, byte i holds element 4w+i (low nibble)
// and element 16+4w+i (high nibble).

override FMT: u32 = 0u;

@group(0) @binding(2) var<storage, read> q: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> s: array<f32>;
@group(0) @binding(4) var<storage, read> m: array<u32>;

struct X8 { v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>,
            v4: vec4<f32>, v5: vec4<f32>, v6: vec4<f32>, v7: vec4<f32>, }

fn x8_dot(a: X8, b: X8) -> f32 {
    return dot(a.v0, b.v0) + dot(a.v1, b.v1) + dot(a.v2, b.v2) + dot(a.v3, b.v3)
         + dot(a.v4, b.v4) + dot(a.v5, b.v5) + dot(a.v6, b.v6) + dot(a.v7, b.v7);
}

fn x8_sum(a: X8) -> f32 {
    let t = a.v0 + a.v1 + a.v2 + a.v3 + a.v4 + a.v5 + a.v6 + a.v7;
    return t.x + t.y + t.z + t.w;
}

fn x8_mul(a: X8, b: X8) -> X8 {
    return X8(a.v0 * b.v0, a.v1 * b.v1, a.v2 * b.v2, a.v3 * b.v3, a.v4 * b.v4, a.v5 * b.v5, a.v6 * b.v6, a.v7 * b.v7);
}

fn x8_scale(a: X8, k: f32) -> X8 {
    return X8(a.v0 * k, a.v1 * k, a.v2 * k, a.v3 * k, a.v4 * k, a.v5 * k, a.v6 * k, a.v7 * k);
}

fn nib4(v: u32) -> vec4<f32> {  // the low nibbles of the four bytes of v
    let n = v & 0x0f0f0f0fu;
    return vec4<f32>(f32(n & 0xffu), f32((n >> 8u) & 0xffu), f32((n >> 16u) & 0xffu), f32(n >> 24u));
}

fn hi4(h: u32, e: u32) -> vec4<f32> {  // bit 4 of elements e..e+3 (Q5), as 0 or 16
    return vec4<f32>(f32((h >> e) & 1u), f32((h >> (e + 1u)) & 1u), f32((h >> (e + 2u)) & 1u),
                     f32((h >> (e + 3u)) & 1u)) * 16.0;
}

fn i8x4(v: u32) -> vec4<f32> {  // four signed bytes, low byte first
    return vec4<f32>(f32(bitcast<i32>(v << 24u) >> 24u), f32(bitcast<i32>(v << 16u) >> 24u),
                     f32(bitcast<i32>(v << 8u) >> 24u), f32(bitcast<i32>(v) >> 24u));
}

fn f16x4(a: u32, b: u32) -> vec4<f32> { return vec4<f32>(unpack2x16float(a), unpack2x16float(b)); }

// Block gb's 32 raw values: nibbles 0..15 (Q4), 0..31 (Q5) or signed bytes (Q8, Q3_K) before the block
// scale; the values themselves for F32/F16.
fn block_raw(gb: u32) -> X8 {
    switch FMT {
        case 0u: {
            let b = gb * 8u;
            return X8(bitcast<vec4<f32>>(q[b]), bitcast<vec4<f32>>(q[b + 1u]), bitcast<vec4<f32>>(q[b + 2u]),
                      bitcast<vec4<f32>>(q[b + 3u]), bitcast<vec4<f32>>(q[b + 4u]), bitcast<vec4<f32>>(q[b + 5u]),
                      bitcast<vec4<f32>>(q[b + 6u]), bitcast<vec4<f32>>(q[b + 7u]));
        }
        case 1u: {
            let a = q[gb * 4u];
            let b = q[gb * 4u + 1u];
            let c = q[gb * 4u + 2u];
            let d = q[gb * 4u + 3u];
            return X8(f16x4(a.x, a.y), f16x4(a.z, a.w), f16x4(b.x, b.y), f16x4(b.z, b.w),
                      f16x4(c.x, c.y), f16x4(c.z, c.w), f16x4(d.x, d.y), f16x4(d.z, d.w));
        }
        case 2u, 3u, 8u: {
            let w = q[gb];
            return X8(nib4(w.x), nib4(w.y), nib4(w.z), nib4(w.w),
                      nib4(w.x >> 4u), nib4(w.y >> 4u), nib4(w.z >> 4u), nib4(w.w >> 4u));
        }
        case 4u, 7u: {
            let w = q[gb];
            let h = m[gb];
            return X8(nib4(w.x) + hi4(h, 0u), nib4(w.y) + hi4(h, 4u), nib4(w.z) + hi4(h, 8u),
                      nib4(w.w) + hi4(h, 12u), nib4(w.x >> 4u) + hi4(h, 16u), nib4(w.y >> 4u) + hi4(h, 20u),
                      nib4(w.z >> 4u) + hi4(h, 24u), nib4(w.w >> 4u) + hi4(h, 28u));
        }
        default: {
            let a = q[gb * 2u];
            let b = q[gb * 2u + 1u];
            return X8(i8x4(a.x), i8x4(a.y), i8x4(a.z), i8x4(a.w), i8x4(b.x), i8x4(b.y), i8x4(b.z), i8x4(b.w));
        }
    }
}

// Dot product of block gb with its 32 activations xs; sx = their sum. The block scale is applied
// once; the Q4/Q5 offsets and the Q4 minimums come in through sx.
fn block_dot(gb: u32, xs: X8, sx: f32) -> f32 {
    return scaled_dot(gb, block_raw(gb), xs, sx);
}

// block_dot with the block's raw values `v` already loaded (several activation vectors, one block).
fn scaled_dot(gb: u32, v: X8, xs: X8, sx: f32) -> f32 {
    switch FMT {
        case 0u, 1u: { return x8_dot(v, xs); }
        case 2u: { return s[gb] * (x8_dot(v, xs) - 8.0 * sx); }
        case 3u: { return s[gb] * x8_dot(v, xs) + bitcast<f32>(m[gb]) * sx; }
        case 4u: { return s[gb] * (x8_dot(v, xs) - 16.0 * sx); }
        case 7u: { return s[gb * 2u] * x8_dot(v, xs) + s[gb * 2u + 1u] * sx; }
        case 8u: {
            let d0 = dot(v.v0, xs.v0) + dot(v.v1, xs.v1) + dot(v.v2, xs.v2) + dot(v.v3, xs.v3);
            let d1 = dot(v.v4, xs.v4) + dot(v.v5, xs.v5) + dot(v.v6, xs.v6) + dot(v.v7, xs.v7);
            let h = xs.v0 + xs.v1 + xs.v2 + xs.v3;
            let sx0 = h.x + h.y + h.z + h.w;
            return s[gb * 4u] * d0 + s[gb * 4u + 1u] * sx0 + s[gb * 4u + 2u] * d1 + s[gb * 4u + 3u] * (sx - sx0);
        }
        case 6u: {
            let d0 = dot(v.v0, xs.v0) + dot(v.v1, xs.v1) + dot(v.v2, xs.v2) + dot(v.v3, xs.v3);
            let d1 = dot(v.v4, xs.v4) + dot(v.v5, xs.v5) + dot(v.v6, xs.v6) + dot(v.v7, xs.v7);
            return s[gb * 2u] * d0 + s[gb * 2u + 1u] * d1;
        }
        default: { return s[gb] * x8_dot(v, xs); }
    }
}

// Block gb's 32 values, dequantized.
fn block_values(gb: u32) -> X8 {
    let v = block_raw(gb);
    switch FMT {
        case 0u, 1u: { return v; }
        case 2u: {
            let d = s[gb];
            let o = vec4<f32>(8.0);
            return X8(d * (v.v0 - o), d * (v.v1 - o), d * (v.v2 - o), d * (v.v3 - o),
                      d * (v.v4 - o), d * (v.v5 - o), d * (v.v6 - o), d * (v.v7 - o));
        }
        case 3u: {
            let d = s[gb];
            let mn = vec4<f32>(bitcast<f32>(m[gb]));
            return X8(d * v.v0 + mn, d * v.v1 + mn, d * v.v2 + mn, d * v.v3 + mn,
                      d * v.v4 + mn, d * v.v5 + mn, d * v.v6 + mn, d * v.v7 + mn);
        }
        case 4u: {
            let d = s[gb];
            let o = vec4<f32>(16.0);
            return X8(d * (v.v0 - o), d * (v.v1 - o), d * (v.v2 - o), d * (v.v3 - o),
                      d * (v.v4 - o), d * (v.v5 - o), d * (v.v6 - o), d * (v.v7 - o));
        }
        case 8u: {
            let d0 = s[gb * 4u];
            let m0 = vec4<f32>(s[gb * 4u + 1u]);
            let d1 = s[gb * 4u + 2u];
            let m1 = vec4<f32>(s[gb * 4u + 3u]);
            return X8(d0 * v.v0 + m0, d0 * v.v1 + m0, d0 * v.v2 + m0, d0 * v.v3 + m0,
                      d1 * v.v4 + m1, d1 * v.v5 + m1, d1 * v.v6 + m1, d1 * v.v7 + m1);
        }
        case 7u: {
            let d = s[gb * 2u];
            let mn = vec4<f32>(s[gb * 2u + 1u]);
            return X8(d * v.v0 + mn, d * v.v1 + mn, d * v.v2 + mn, d * v.v3 + mn,
                      d * v.v4 + mn, d * v.v5 + mn, d * v.v6 + mn, d * v.v7 + mn);
        }
        case 6u: {
            let d0 = s[gb * 2u];
            let d1 = s[gb * 2u + 1u];
            return X8(v.v0 * d0, v.v1 * d0, v.v2 * d0, v.v3 * d0, v.v4 * d1, v.v5 * d1, v.v6 * d1, v.v7 * d1);
        }
        default: { return x8_scale(v, s[gb]); }
    }
}

// Component c (0..31) of an X8.
fn x8_at(a: X8, c: u32) -> f32 {
    switch c / 4u {
        case 0u: { return a.v0[c % 4u]; }
        case 1u: { return a.v1[c % 4u]; }
        case 2u: { return a.v2[c % 4u]; }
        case 3u: { return a.v3[c % 4u]; }
        case 4u: { return a.v4[c % 4u]; }
        case 5u: { return a.v5[c % 4u]; }
        case 6u: { return a.v6[c % 4u]; }
        default: { return a.v7[c % 4u]; }
    }
}

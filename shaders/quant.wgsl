// quant.wgsl: quantized weight blocks as the GPU backend repacks them (webgpu/weights.py), appended to
// the modules that read weights (matvec.wgsl, qmatrix.wgsl). A block is 32 consecutive elements of a
// row; block gb of a matrix is row (gb / blocks per row), elements 32 * (gb % blocks per row) + 0..31.
//
// Bindings (group 0):
//   2 storage q    vec4<u32> packed quants, read    (Q vec4s per block, see FMT)
//   3 storage s    f32 block scales, read           (1 per block; 2 per block for FMT 6)
//   4 storage m    u32 per block, read              (FMT 3: the minimum as f32 bits; FMT 4: bit 4 of the 32 values)
// Override FMT: 0 F32 (8 vec4) | 1 F16 (4) | 2 Q4 sym, Q4_0 (1) | 3 Q4 with min, Q4_1 and Q4_K (1)
//               | 4 Q5 sym, Q5_0 (1) | 5 Q8, Q8_0 (2) | 6 Q8 with a scale per 16, Q6_K repacked (2).
// 4-bit words follow GGUF's byte order: in word w of a block, byte i holds element 4w+i (low nibble)
// and element 16+4w+i (high nibble).

override FMT: u32 = 0u;

@group(0) @binding(2) var<storage, read> q: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> s: array<f32>;
@group(0) @binding(4) var<storage, read> m: array<u32>;

// vec4s of quants per block
fn block_vec4s() -> u32 {
    switch FMT {
        case 0u: { return 8u; }
        case 1u: { return 4u; }
        case 5u, 6u: { return 2u; }
        default: { return 1u; }
    }
}

fn nib4(v: u32, sh: u32) -> vec4<f32> {  // four nibbles at bit offsets sh, sh+8, sh+16, sh+24
    let n = (v >> sh) & 0x0f0f0f0fu;
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

// Block gb's 32 raw values (element 4j + i in [j][i]), before the block scale for the quantized
// formats: nibbles 0..15 (Q4), 0..31 (Q5), signed bytes (Q8); the values themselves for F32/F16.
fn block_raw(gb: u32) -> array<vec4<f32>, 8> {
    var v: array<vec4<f32>, 8>;
    switch FMT {
        case 0u: {
            for (var j = 0u; j < 8u; j++) { v[j] = bitcast<vec4<f32>>(q[gb * 8u + j]); }
        }
        case 1u: {
            for (var j = 0u; j < 4u; j++) {
                let w = q[gb * 4u + j];
                v[2u * j] = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
                v[2u * j + 1u] = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
            }
        }
        case 2u, 3u, 4u: {
            let w = q[gb];
            for (var j = 0u; j < 4u; j++) {
                v[j] = nib4(w[j], 0u);
                v[4u + j] = nib4(w[j], 4u);
            }
            if (FMT == 4u) {
                let h = m[gb];
                for (var j = 0u; j < 4u; j++) {
                    v[j] += hi4(h, 4u * j);
                    v[4u + j] += hi4(h, 16u + 4u * j);
                }
            }
        }
        default: {
            let a = q[gb * 2u];
            let b = q[gb * 2u + 1u];
            for (var j = 0u; j < 4u; j++) {
                v[j] = i8x4(a[j]);
                v[4u + j] = i8x4(b[j]);
            }
        }
    }
    return v;
}

// Dot product of block gb with its 32 activations xs (element 4j + i in xs[j][i]); sx = their sum.
// The block scale is applied once; the Q4/Q5 offsets and the Q4 minimums come in through sx.
fn block_dot(gb: u32, xs: array<vec4<f32>, 8>, sx: f32) -> f32 {
    let v = block_raw(gb);
    if (FMT == 6u) {
        let d0 = dot(v[0], xs[0]) + dot(v[1], xs[1]) + dot(v[2], xs[2]) + dot(v[3], xs[3]);
        let d1 = dot(v[4], xs[4]) + dot(v[5], xs[5]) + dot(v[6], xs[6]) + dot(v[7], xs[7]);
        return s[gb * 2u] * d0 + s[gb * 2u + 1u] * d1;
    }
    var d = 0.0;
    for (var j = 0u; j < 8u; j++) { d += dot(v[j], xs[j]); }
    switch FMT {
        case 0u, 1u: { return d; }
        case 2u: { return s[gb] * (d - 8.0 * sx); }
        case 3u: { return s[gb] * d + bitcast<f32>(m[gb]) * sx; }
        case 4u: { return s[gb] * (d - 16.0 * sx); }
        default: { return s[gb] * d; }
    }
}

// Block gb's 32 values, dequantized (element 4j + i in [j][i]).
fn block_values(gb: u32) -> array<vec4<f32>, 8> {
    var v = block_raw(gb);
    for (var j = 0u; j < 8u; j++) {
        switch FMT {
            case 0u, 1u: {}
            case 2u: { v[j] = s[gb] * (v[j] - 8.0); }
            case 3u: { v[j] = s[gb] * v[j] + bitcast<f32>(m[gb]); }
            case 4u: { v[j] = s[gb] * (v[j] - 16.0); }
            case 6u: { v[j] = v[j] * s[gb * 2u + j / 4u]; }
            default: { v[j] = v[j] * s[gb]; }
        }
    }
    return v;
}

// activations.wgsl: activation functions, appended to the modules that use them (SHADER_PARTS in
// wgpu_backend.py): elementwise.wgsl and qmatrix.wgsl's fused gate/up matvec.

fn silu(g: f32) -> f32 {
    return g / (1.0 + exp(-g));
}

// tanh-approximated GELU; tanh written through exp, clamped so exp never overflows.
fn gelu_tanh(g: f32) -> f32 {
    let z = clamp(0.7978845608 * (g + 0.044715 * g * g * g), -15.0, 15.0);
    let e = exp(2.0 * z);
    return 0.5 * g * (1.0 + (e - 1.0) / (e + 1.0));
}

//! The CubeCL flash attention on `Wgpu` (lavapipe in CI) against the dense reference on
//! the CPU backend: every mask kind and combination, GQA ratios, lengths that are not multiples
//! of the 32-row tiles, decode against a longer cache; forward outputs and, through
//! autodiff, the gradients of queries, keys and values within 1e-3 relative error.
//!
//! Lavapipe ends a shader invocation's loops once they have run 65,535 iterations in all
//! (llvmpipe's `LP_MAX_TGSI_LOOP_ITERATIONS`), so the lengths here stay within what one
//! query row's tiles take under that limit; `gpu-check` runs long sequences on CUDA.

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorData};
use tritter_kernels::check::{
    attention_gradients, check_attention_forward, check_attention_gradients, ATTENTION_SHAPES,
};
use tritter_kernels::TritterBackend;

#[test]
fn forward_matches_the_reference_for_every_mask() {
    let device = WgpuDevice::Cpu;
    check_attention_forward(&ATTENTION_SHAPES, 1e-3, |q, k, v, mask| {
        let t = |d: &TensorData| Tensor::<Wgpu, 4>::from_data(d.clone(), &device);
        <Wgpu as TritterBackend>::flex_attention(t(q), t(k), t(v), mask)
            .into_data()
            .to_vec()
            .unwrap()
    });
}

#[test]
fn backward_matches_the_reference_for_every_mask() {
    let device = WgpuDevice::Cpu;
    check_attention_gradients(&ATTENTION_SHAPES, 1e-3, |data, mask| {
        attention_gradients::<Autodiff<Wgpu>>(data, mask, &device)
    });
}

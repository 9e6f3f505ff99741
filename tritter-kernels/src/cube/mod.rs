//! CubeCL kernels: one source for CUDA and wgpu (Vulkan, Metal; lavapipe in CI).
//!
//! [`ternary`]: BitLinear's packed product — 2-bit weights, int8 activations packed four
//! to a 32-bit word (WGSL has no 8-bit integers), exact `i32` accumulation.
//!
//! [`kv_int4`]: the INT4 KV cache in device memory — append and decode attention kernels.
//!
//! Burn's `Wgpu` and `Cuda` backends are `Fusion<CubeBackend<…>>`: [`fusion`] moves
//! tensors between the fusion graph and the CubeCL backend the kernels run on.

pub mod attention;
pub mod fusion;
pub mod kv_int4;
pub mod ternary;

use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

/// An uninitialized contiguous tensor of `shape` and `dtype` on `like`'s device: a
/// kernel's output.
pub(crate) fn empty_like<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: Vec<usize>,
    dtype: DType,
) -> CubeTensor<R> {
    let n: usize = shape.iter().product();
    let buffer = like.client.empty(n.max(1) * dtype.size());
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        buffer,
        dtype,
    )
}

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

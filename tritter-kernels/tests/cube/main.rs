//! The CubeCL kernels on `Wgpu` (lavapipe in CI) against their references, in one test
//! binary so that Burn's `Wgpu` backend is compiled into it once: flash attention
//! ([`attention`]), the INT4 KV cache ([`kv_int4`]) and the ternary product
//! ([`ternary`]). The f16 product runs in a binary of its own (`cube_ternary_f16.rs`).
mod attention;
mod kv_int4;
mod ternary;

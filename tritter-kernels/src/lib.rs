//! Tritter's backend extension: the ops the model needs a fast path for.
//!
//! The model calls [`TritterBackend`]'s ops and never a kernel directly, so the CPU path
//! and the GPU path are the same model code. Every op has a reference implementation in
//! [`reference`], written with Burn tensor ops; it is the provided method of the trait, so
//! a backend without a dedicated kernel uses it, and `Autodiff<B>` differentiates it.

pub mod reference;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

/// Ops with Tritter-specific kernels. Provided methods are the reference implementations.
pub trait TritterBackend: Backend {
    /// BitLinear's product `Q_a(x) · Q_w(W)` with straight-through estimators on both
    /// quantizers: `x` is `[tokens, in]` (already RMS-normalized), `weight` the latent
    /// `[in, out]` matrix. Returns `[tokens, out]`.
    fn bitlinear_matmul(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        reference::bitlinear_matmul(x, weight)
    }

    /// Scaled dot-product attention over `[batch, heads, q, d]` queries and
    /// `[batch, heads, kv, d]` keys/values. `mask` (`true` = masked) is
    /// `[batch, heads, q, kv]`; `causal` aligns the last query with the last key.
    fn tritter_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
        causal: bool,
    ) -> Tensor<Self, 4> {
        reference::attention(q, k, v, mask, causal)
    }
}

impl TritterBackend for burn::backend::Flex {}
impl TritterBackend for burn::backend::Wgpu {}
#[cfg(feature = "cuda")]
impl TritterBackend for burn::backend::Cuda {}
impl<B: TritterBackend> TritterBackend for Autodiff<B> {}

//! Tritter's backend extension: the ops the model needs a fast path for.
//!
//! The model calls [`TritterBackend`]'s ops and never a kernel directly, so the CPU path
//! and the GPU path are the same model code. Every op has a reference implementation in
//! [`reference`], written with Burn tensor ops; it is the provided method of the trait, so
//! a backend without a dedicated kernel uses it, and `Autodiff<B>` differentiates it.

mod autodiff;
pub mod reference;

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

/// BitLinear's forward: the product and the quantized operands it was computed from.
#[derive(Debug, Clone)]
pub struct BitLinearForward<B: Backend> {
    /// `Q_a(x) · Q_w(W)`, `[tokens, out]`.
    pub output: Tensor<B, 2>,
    /// `Q_a(x)` dequantized: `xq / s` per token, `[tokens, in]`.
    pub x_quantized: Tensor<B, 2>,
    /// `Q_w(W)` dequantized: `Wq · γ`, `[in, out]`.
    pub w_quantized: Tensor<B, 2>,
}

/// Ops with Tritter-specific kernels. Provided methods are the reference implementations.
pub trait TritterBackend: Backend {
    /// BitLinear's product `Q_a(x) · Q_w(W)` with straight-through estimators on both
    /// quantizers: `x` is `[tokens, in]` (already RMS-normalized), `weight` the latent
    /// `[in, out]` matrix. Returns `[tokens, out]`.
    fn bitlinear_matmul(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        reference::bitlinear_matmul(x, weight)
    }

    /// BitLinear's forward without gradients: quantize both operands and multiply.
    fn bitlinear_forward(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> BitLinearForward<Self> {
        reference::bitlinear_forward(x, weight)
    }

    /// RMSNorm over the last dimension of `[rows, dim]` with gain `gamma`.
    fn rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        reference::rms_norm(x, gamma, eps)
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
impl<B: TritterBackend, C: CheckpointStrategy> TritterBackend for Autodiff<B, C> {
    fn bitlinear_matmul(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        autodiff::bitlinear_matmul(x, weight)
    }

    fn rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        autodiff::rms_norm(x, gamma, eps)
    }

    fn tritter_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: Option<Tensor<Self, 4, Bool>>,
        causal: bool,
    ) -> Tensor<Self, 4> {
        autodiff::attention(q, k, v, mask, causal)
    }
}

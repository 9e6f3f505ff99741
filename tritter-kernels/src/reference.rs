//! Reference implementations of the Tritter ops, in Burn tensor ops. These define what the
//! kernels must compute; the formulas follow BitNet b1.58 (arXiv 2402.17764).

use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor};

/// Floor on the absmean/absmax denominators (BitNet's ε).
pub const QUANT_EPS: f32 = 1e-5;
/// Largest int8 activation magnitude.
pub const ACT_MAX: f32 = 127.0;

/// Per-tensor absmean ternary quantization (b1.58 eq. 1–3):
/// `γ = max(mean|W|, ε)`, `Wq = clamp(round(W / γ), −1, 1)`. Returns `(Wq, γ)` with
/// `Wq ∈ {−1, 0, 1}` and `W ≈ Wq · γ`; `γ` has shape `[1]`.
pub fn ternary_quantize<B: Backend, const D: usize>(
    w: Tensor<B, D>,
) -> (Tensor<B, D>, Tensor<B, 1>) {
    let gamma = w.clone().abs().mean().clamp_min(QUANT_EPS);
    let q = (w / gamma.clone().unsqueeze()).round().clamp(-1.0, 1.0);
    (q, gamma)
}

/// Per-token absmax int8 quantization, no zero point:
/// `s = 127 / max(max|x|, ε)`, `xq = clamp(round(x·s), −128, 127)`.
/// Returns `(xq, 1/s)` with `xq` integer-valued and `x ≈ xq / s`; `1/s` is `[tokens, 1]`.
pub fn int8_quantize<B: Backend>(x: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let inv_scale = x.clone().abs().max_dim(1).clamp_min(QUANT_EPS) / ACT_MAX;
    let q = (x / inv_scale.clone()).round().clamp(-128.0, ACT_MAX);
    (q, inv_scale)
}

/// Straight-through estimator: the forward value of `quantized`, the gradient of `x`
/// (`x + (q(x) − x).detach()`).
pub fn straight_through<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    quantized: Tensor<B, D>,
) -> Tensor<B, D> {
    x.clone() + (quantized - x).detach()
}

/// BitLinear's product: int8 activations times ternary weights, both through STEs.
/// Numerically `(xq · Wq) · γ / s` — the integer product scaled once per token and once
/// per tensor.
pub fn bitlinear_matmul<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    let (wq, gamma) = ternary_quantize(weight.clone().detach());
    let w = straight_through(weight, wq * gamma.unsqueeze());
    let (xq, inv_scale) = int8_quantize(x.clone().detach());
    let x = straight_through(x, xq * inv_scale);
    x.matmul(w)
}

/// Scaled dot-product attention through Burn's attention op.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    causal: bool,
) -> Tensor<B, 4> {
    burn_attention(
        q,
        k,
        v,
        mask,
        None,
        AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: causal,
        },
    )
}

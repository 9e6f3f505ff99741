//! Reference implementations of the Tritter ops, in Burn tensor ops. These define what the
//! kernels must compute; the formulas follow BitNet b1.58 (arXiv 2402.17764).

use crate::mask::{AttentionMask, MaskMod};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorData};

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
    ternary_quantize_scaled(w, None)
}

/// [`ternary_quantize`] with `γ` given instead of measured when `scale` is `Some`: the
/// weights of a model loaded from an export are `Wq · γ` with the exported `γ`, and
/// quantize back to exactly `Wq` (`±γ / γ = ±1` in floating point).
pub fn ternary_quantize_scaled<B: Backend, const D: usize>(
    w: Tensor<B, D>,
    scale: Option<f32>,
) -> (Tensor<B, D>, Tensor<B, 1>) {
    let gamma = absmean_scale(w.clone(), scale);
    let q = (w / gamma.clone().unsqueeze()).round().clamp(-1.0, 1.0);
    (q, gamma)
}

/// The ternary quantizer's `γ` `[1]`: `scale` where given, else `mean(|W|)`, at least ε.
pub fn absmean_scale<B: Backend, const D: usize>(
    w: Tensor<B, D>,
    scale: Option<f32>,
) -> Tensor<B, 1> {
    match scale {
        Some(gamma) => Tensor::from_floats([gamma.max(QUANT_EPS)], &w.device()),
        None => w.abs().mean().clamp_min(QUANT_EPS),
    }
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
pub fn bitlinear_matmul<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    scale: Option<f32>,
) -> Tensor<B, 2> {
    let (wq, gamma) = ternary_quantize_scaled(weight.clone().detach(), scale);
    let w = straight_through(weight, wq * gamma.unsqueeze());
    let (xq, inv_scale) = int8_quantize(x.clone().detach());
    let x = straight_through(x, xq * inv_scale);
    x.matmul(w)
}

/// BitLinear's forward on plain tensors: the product and its quantized operands, computed
/// from the quantized values themselves (no straight-through arithmetic, which would
/// perturb them by rounding).
pub fn bitlinear_forward<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    scale: Option<f32>,
) -> crate::BitLinearForward<B> {
    let (wq, gamma) = ternary_quantize_scaled(weight, scale);
    let w_quantized = wq * gamma.unsqueeze();
    let (xq, inv_scale) = int8_quantize(x);
    let x_quantized = xq * inv_scale;
    crate::BitLinearForward {
        output: x_quantized.clone().matmul(w_quantized.clone()),
        x_quantized,
        w_quantized: crate::QuantizedWeight::Dense(w_quantized),
    }
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

/// `true` above the causal diagonal of a `[q, kv]` score matrix whose last query is the
/// last key (queries continue a cache of `kv − q` positions).
pub fn causal_mask<B: Backend>(
    [batch, heads, q, kv]: [usize; 4],
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let offset = kv - q;
    let masked: Vec<bool> = (0..q)
        .flat_map(|i| (0..kv).map(move |j| j > i + offset))
        .collect();
    Tensor::<B, 2, Bool>::from_data(TensorData::new(masked, [q, kv]), device)
        .unsqueeze::<4>()
        .expand([batch, heads, q, kv])
}

/// Gradients of scaled dot-product attention, from its inputs, its output and the
/// output's gradient (the standard softmax backward, with the probabilities recomputed):
/// `dV = Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O))`, `dQ = dS·K·τ`, `dK = dSᵀ·Q·τ`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    causal: bool,
    grad_out: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [batch, heads, nq, d] = q.dims();
    let nk = k.dims()[2];
    let scale = 1.0 / (d as f64).sqrt();
    let mut scores = q.clone().matmul(k.clone().swap_dims(2, 3)) * scale;
    if let Some(mask) = mask {
        scores = scores.mask_fill(mask, f32::NEG_INFINITY);
    }
    if causal {
        scores = scores.mask_fill(
            causal_mask([batch, heads, nq, nk], &q.device()),
            f32::NEG_INFINITY,
        );
    }
    let p = softmax(scores, 3);
    let grad_v = p.clone().swap_dims(2, 3).matmul(grad_out.clone());
    let grad_p = grad_out.clone().matmul(v.swap_dims(2, 3));
    let delta = (grad_out * out).sum_dim(3);
    let grad_s = p * (grad_p - delta) * scale;
    let grad_q = grad_s.clone().matmul(k);
    let grad_k = grad_s.swap_dims(2, 3).matmul(q);
    (grad_q, grad_k, grad_v)
}

/// Heads `start..start + heads` of `x` `[batch, seq, width]` (each `head_dim` wide) as
/// `[batch, heads, seq, head_dim]`, contiguous.
pub fn split_heads<B: Backend>(
    x: Tensor<B, 3>,
    start: usize,
    heads: usize,
    head_dim: usize,
) -> Tensor<B, 4> {
    let [batch, seq, _] = x.dims();
    let y = x
        .narrow(2, start * head_dim, heads * head_dim)
        .reshape([batch, seq, heads, head_dim])
        .swap_dims(1, 2);
    // Reshaping through one dimension copies a strided view into contiguous memory.
    y.reshape([batch * heads * seq * head_dim])
        .reshape([batch, heads, seq, head_dim])
}

/// `x` `[batch, heads, seq, head_dim]` placed as heads `start..start + heads` of a
/// `[batch, seq, width]` tensor, zero elsewhere (the inverse of [`split_heads`]).
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>, width: usize, start: usize) -> Tensor<B, 3> {
    let [batch, heads, seq, head_dim] = x.dims();
    let y = x.swap_dims(1, 2).reshape([batch, seq, heads * head_dim]);
    if width == heads * head_dim {
        return y;
    }
    let lo = start * head_dim;
    Tensor::zeros([batch, seq, width], &y.device())
        .slice_assign([0..batch, 0..seq, lo..lo + heads * head_dim], y)
}

/// Rotary embedding with full-size tables (rotate-half convention, `sin` holding
/// `[−sin, sin]` per position): `x·cos + [x₂, x₁]·sin`.
pub fn rotary<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    x.clone() * cos + rotate_half(x) * sin
}

/// The gradient of [`rotary`] with respect to `x` (the rotation's transpose):
/// `dy·cos + [(dy·sin)₂, (dy·sin)₁]`.
pub fn rotary_backward<B: Backend>(
    grad: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    grad.clone() * cos + rotate_half(grad * sin)
}

/// `[x₁, x₂]` → `[x₂, x₁]` over the last dimension's halves.
fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let half = x.dims()[3] / 2;
    Tensor::cat(
        vec![x.clone().narrow(3, half, half), x.narrow(3, 0, half)],
        3,
    )
}

/// `relu(gate)² ⊙ up` from `[rows, 2·ffn]` = `[gate | up]` → `[rows, ffn]`.
pub fn squared_relu_gate<B: Backend>(gate_up: Tensor<B, 2>, ffn: usize) -> Tensor<B, 2> {
    let gate = burn::tensor::activation::relu(gate_up.clone().narrow(1, 0, ffn));
    let up = gate_up.narrow(1, ffn, ffn);
    gate.clone() * gate * up
}

/// The gradient of [`squared_relu_gate`] with respect to `[gate | up]`:
/// `[dy ⊙ up ⊙ 2·relu(gate) | dy ⊙ relu(gate)²]`.
pub fn squared_relu_gate_backward<B: Backend>(
    gate_up: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    ffn: usize,
) -> Tensor<B, 2> {
    let gate = burn::tensor::activation::relu(gate_up.clone().narrow(1, 0, ffn));
    let up = gate_up.narrow(1, ffn, ffn);
    let d_gate = grad.clone() * up * gate.clone() * 2.0;
    let d_up = grad * gate.clone() * gate;
    Tensor::cat(vec![d_gate, d_up], 1)
}

/// Attention under an [`AttentionMask`] with grouped key/value heads, densely: keys
/// repeated per query head, the mask materialized (what the kernels are checked against).
pub fn flex_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask,
) -> Tensor<B, 4> {
    let (k, v, dense, causal) = flex_inputs(&q, k, v, mask);
    attention(q, k, v, dense, causal)
}

/// RMSNorm over the last dimension of `[rows, dim]`: `x / sqrt(mean(x²) + ε) · g`.
pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, gamma: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let inv_rms = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    x * inv_rms * gamma.unsqueeze()
}

/// Queries, keys and values for inference from the fused projection (see
/// [`crate::TritterBackend::qk_norm_rotary`]): QK-norm per head, then the rotation by each
/// row's tables.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rotary<B: Backend>(
    qkv: Tensor<B, 2>,
    q_gamma: Tensor<B, 1>,
    k_gamma: Tensor<B, 1>,
    eps: f64,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    heads: usize,
    kv_heads: usize,
) -> [Tensor<B, 3>; 3] {
    let [rows, d] = cos.dims();
    // Materialized copies (reshape of a flattened tensor), so that every op below
    // is contiguous and element-wise.
    let contiguous = |x: Tensor<B, 3>| {
        let dims = x.dims();
        x.reshape([dims.iter().product::<usize>()]).reshape(dims)
    };
    let split = |start: usize, n: usize| {
        qkv.clone()
            .narrow(1, start * d, n * d)
            .reshape([rows * n * d])
            .reshape([rows, n, d])
    };
    let norm_rotate = |x: Tensor<B, 3>, gamma: Tensor<B, 1>, n: usize| {
        let x = rms_norm(x.reshape([rows * n, d]), gamma, eps).reshape([rows, n, d]);
        let table =
            |t: &Tensor<B, 2>| contiguous(t.clone().reshape([rows, 1, d]).expand([rows, n, d]));
        let rotated = Tensor::cat(
            vec![
                x.clone().narrow(2, d / 2, d / 2),
                x.clone().narrow(2, 0, d / 2),
            ],
            2,
        );
        x * table(&cos) + rotated * table(&sin)
    };
    [
        norm_rotate(split(0, heads), q_gamma, heads),
        norm_rotate(split(heads, kv_heads), k_gamma, kv_heads),
        split(heads + kv_heads, kv_heads),
    ]
}

/// Gradients of [`rms_norm`] with `r = 1/sqrt(mean(x²) + ε)` per row:
/// `dx = r·(g ⊙ dy) − x·r³·mean(g ⊙ dy ⊙ x)`, `dg = Σ_rows dy ⊙ x·r`.
pub fn rms_norm_backward<B: Backend>(
    x: Tensor<B, 2>,
    gamma: Tensor<B, 1>,
    eps: f64,
    grad_out: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 1>) {
    let inv_rms = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    let normalized = x.clone() * inv_rms.clone();
    let grad_gamma = (grad_out.clone() * normalized).sum_dim(0).squeeze_dim(0);
    let g_dy = grad_out * gamma.unsqueeze();
    let dot = (g_dy.clone() * x.clone()).mean_dim(1);
    let grad_x = g_dy * inv_rms.clone() - x * inv_rms.powi_scalar(3) * dot;
    (grad_x, grad_gamma)
}

/// Grouped-query attention's key/value heads repeated for each query head they serve.
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, repeat: usize) -> Tensor<B, 4> {
    if repeat == 1 {
        return x;
    }
    let [b, h, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, h, repeat, t, d])
        .reshape([b, h * repeat, t, d])
}

/// The dense operands of [`crate::TritterBackend::tritter_attention`] for a
/// [`AttentionMask`]: keys and values repeated per query head, and the mask as a boolean
/// tensor (`None` with `causal` for the plain causal mask).
#[allow(clippy::type_complexity)]
pub fn flex_inputs<B: Backend>(
    q: &Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask,
) -> (Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 4, Bool>>, bool) {
    let [batch, heads, q_len, _] = q.dims();
    let [_, kv_heads, kv_len, _] = k.dims();
    let (k, v) = (
        repeat_kv(k, heads / kv_heads),
        repeat_kv(v, heads / kv_heads),
    );
    match &mask.mask {
        MaskMod::Causal => (k, v, None, true),
        MaskMod::Full => (k, v, None, false),
        _ => {
            let dense = mask_tensor(mask, [batch, heads, q_len, kv_len], &q.device());
            (k, v, Some(dense), false)
        }
    }
}

/// `mask` as a boolean tensor `[batch, heads, q_len, kv_len]`, `true` where masked (the
/// same for every head).
pub fn mask_tensor<B: Backend>(
    mask: &AttentionMask,
    [batch, heads, q_len, kv_len]: [usize; 4],
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    Tensor::<B, 3, Bool>::from_data(
        TensorData::new(mask.dense(batch, q_len, kv_len), [batch, q_len, kv_len]),
        device,
    )
    .unsqueeze_dim::<4>(1)
    .expand([batch, heads, q_len, kv_len])
}

/// Gradients of attention under an [`AttentionMask`] with grouped key/value heads: the
/// dense [`attention_backward`] on repeated heads, the key and value gradients summed
/// over each group's query heads.
pub fn flex_attention_backward<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    grad_out: Tensor<B, 4>,
    mask: &AttentionMask,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [batch, heads, _, d] = q.dims();
    let [_, kv_heads, kv_len, _] = k.dims();
    let group = heads / kv_heads;
    let (k, v, dense, causal) = flex_inputs(&q, k, v, mask);
    let (grad_q, grad_k, grad_v) = attention_backward(q, k, v, out, dense, causal, grad_out);
    let fold = |g: Tensor<B, 4>| {
        g.reshape([batch, kv_heads, group, kv_len, d])
            .sum_dim(2)
            .reshape([batch, kv_heads, kv_len, d])
    };
    (grad_q, fold(grad_k), fold(grad_v))
}

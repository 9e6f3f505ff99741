//! Tritter's backend extension: the ops the model needs a fast path for.
//!
//! The model calls [`TritterBackend`]'s ops and never a kernel directly, so the CPU path
//! and the GPU path are the same model code. Every op has a reference implementation in
//! [`reference`], written with Burn tensor ops; it is the provided method of the trait, so
//! a backend without a dedicated kernel uses it, and `Autodiff<B>` differentiates it.

mod autodiff;
pub mod check;
pub mod cube;
pub mod kv_int4;
pub mod mask;
pub mod packed;
pub mod reference;

pub use mask::{AttentionMask, MaskMod};
pub use packed::{PackedStorage, PackedTernary};

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};

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
    /// `[in, out]` matrix; `scale` fixes `γ` instead of measuring it (weights loaded
    /// from an export). Returns `[tokens, out]`. Without autodiff there are no gradients,
    /// so the default is the plain quantized product.
    fn bitlinear_matmul(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        scale: Option<f32>,
    ) -> Tensor<Self, 2> {
        Self::bitlinear_forward(x, weight, scale).output
    }

    /// BitLinear's forward without gradients: quantize both operands and multiply.
    fn bitlinear_forward(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        scale: Option<f32>,
    ) -> BitLinearForward<Self> {
        reference::bitlinear_forward(x, weight, scale)
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

    /// Attention of `q` `[batch, heads, q_len, d]` against `k`, `v` `[batch, kv_heads,
    /// kv_len, d]` — grouped-query: query head `h` reads key head `h / (heads /
    /// kv_heads)` — under `mask`, the queries being the last `q_len` positions.
    fn flex_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: &AttentionMask,
    ) -> Tensor<Self, 4> {
        Self::flex_attention_forward(q, k, v, mask).0
    }

    /// [`TritterBackend::flex_attention`] and, where the backend computes it, each query
    /// row's log-sum-exp `[batch, heads, q_len]` for the backward. The default repeats
    /// the key heads and materializes the mask for [`TritterBackend::tritter_attention`].
    fn flex_attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: &AttentionMask,
    ) -> (Tensor<Self, 4>, Option<Tensor<Self, 3>>) {
        let (k, v, dense, causal) = reference::flex_inputs(&q, k, v, mask);
        (Self::tritter_attention(q, k, v, dense, causal), None)
    }

    /// Gradients `(dq, dk, dv)` of [`TritterBackend::flex_attention`] (`dk`, `dv` in
    /// key-head shape) from the output `out`, its log-sum-exp when the forward gave one,
    /// and the output's gradient.
    #[allow(clippy::too_many_arguments)]
    fn flex_attention_backward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        out: Tensor<Self, 4>,
        lse: Option<Tensor<Self, 3>>,
        grad_out: Tensor<Self, 4>,
        mask: &AttentionMask,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        let _ = lse;
        reference::flex_attention_backward(q, k, v, out, grad_out, mask)
    }

    /// Moves a packed ternary matrix (the export's bytes, `[d_out, ceil(d_in / 4)]`) to
    /// `device`, still packed. The default keeps 16 codes per 32-bit word on the device.
    fn ternary_upload(
        bytes: &[u8],
        d_out: usize,
        d_in: usize,
        gamma: f32,
        device: &Self::Device,
    ) -> PackedTernary<Self> {
        packed::upload_words(bytes, d_out, d_in, gamma, device)
    }

    /// Like [`TritterBackend::ternary_upload`] for a matrix of `previous`'s shape, reusing
    /// `previous`'s memory where the backend can (streaming swaps two sets of buffers).
    fn ternary_reupload(
        previous: PackedTernary<Self>,
        bytes: &[u8],
        gamma: f32,
        device: &Self::Device,
    ) -> PackedTernary<Self> {
        Self::ternary_upload(bytes, previous.d_out, previous.d_in, gamma, device)
    }

    /// BitLinear's inference product from packed weights: `x` `[tokens, d_in]` (already
    /// RMS-normalized), quantized to int8 per token. Returns `[tokens, d_out]`.
    fn ternary_packed_matmul(x: Tensor<Self, 2>, w: &PackedTernary<Self>) -> Tensor<Self, 2> {
        packed::matmul_words(x, w)
    }

    /// Device memory [`TritterBackend::ternary_packed_matmul`] needs beyond its input and
    /// output, at most, for a `[d_out, d_in]` matrix.
    fn ternary_scratch_bytes(d_out: usize, d_in: usize) -> usize {
        packed::words_scratch_bytes(d_out, d_in)
    }

    /// Whether an f16 KV cache is better kept in host memory with decode attention on
    /// the CPU ([`kv_int4::Int4KvCache::f16_only`]) than on the device: true where the
    /// device is the CPU.
    fn host_f16_kv_cache() -> bool {
        false
    }
}

/// The CPU backend computes packed products natively: bytes stay in host memory, each
/// row is unpacked once per call and serves every token, accumulation in `i32`.
impl TritterBackend for burn::backend::Flex {
    fn ternary_upload(
        bytes: &[u8],
        d_out: usize,
        d_in: usize,
        gamma: f32,
        _device: &Self::Device,
    ) -> PackedTernary<Self> {
        packed::upload_host(bytes, d_out, d_in, gamma)
    }

    fn ternary_reupload(
        previous: PackedTernary<Self>,
        bytes: &[u8],
        gamma: f32,
        device: &Self::Device,
    ) -> PackedTernary<Self> {
        let (d_out, d_in) = (previous.d_out, previous.d_in);
        // The previous matrix's bytes are this backend's device memory: refill them.
        if let PackedStorage::Host(mut buffer) = previous.storage {
            if let Some(buffer_bytes) = std::sync::Arc::get_mut(&mut buffer) {
                if buffer_bytes.len() == bytes.len() {
                    buffer_bytes.copy_from_slice(bytes);
                    return PackedTernary {
                        d_in,
                        d_out,
                        gamma,
                        storage: PackedStorage::Host(buffer),
                    };
                }
            }
        }
        Self::ternary_upload(bytes, d_out, d_in, gamma, device)
    }

    fn ternary_packed_matmul(x: Tensor<Self, 2>, w: &PackedTernary<Self>) -> Tensor<Self, 2> {
        let PackedStorage::Host(bytes) = &w.storage else {
            return packed::matmul_words(x, w);
        };
        let [tokens, d_in] = x.dims();
        assert_eq!(
            d_in, w.d_in,
            "input width {d_in} against a matrix of {}",
            w.d_in
        );
        let device = x.device();
        let values: Vec<f32> = x
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 activations");
        let y = packed::ternary_gemm(&values, tokens, bytes, w.d_out, d_in, w.gamma);
        Tensor::from_data(TensorData::new(y, [tokens, w.d_out]), &device)
    }

    fn ternary_scratch_bytes(d_out: usize, d_in: usize) -> usize {
        // Quantized activations and i32 accumulators are per call and proportional to
        // the activations; one unpacked row per thread.
        let _ = d_out;
        d_in.div_ceil(4) * 4 * rayon::current_num_threads()
    }

    fn host_f16_kv_cache() -> bool {
        true
    }
}
/// Burn's CubeCL backends (`Wgpu`, `Cuda`: fusion over `CubeBackend`) run the CubeCL
/// kernels of [`cube`].
impl<R, F, I, BT> TritterBackend for cube::fusion::Fused<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn ternary_packed_matmul(x: Tensor<Self, 2>, w: &PackedTernary<Self>) -> Tensor<Self, 2> {
        cube::ternary::packed_matmul(x, w)
    }

    fn flex_attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: &AttentionMask,
    ) -> (Tensor<Self, 4>, Option<Tensor<Self, 3>>) {
        let (out, lse) = cube::attention::forward(q, k, v, mask);
        (out, Some(lse))
    }

    fn flex_attention_backward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        out: Tensor<Self, 4>,
        lse: Option<Tensor<Self, 3>>,
        grad_out: Tensor<Self, 4>,
        mask: &AttentionMask,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        let lse = match lse {
            Some(lse) => lse,
            None => cube::attention::forward(q.clone(), k.clone(), v.clone(), mask).1,
        };
        cube::attention::backward(q, k, v, out, lse, grad_out, mask)
    }

    fn ternary_scratch_bytes(d_out: usize, d_in: usize) -> usize {
        // Packed activations are per call and proportional to the activations.
        let _ = (d_out, d_in);
        0
    }
}
impl<B: TritterBackend, C: CheckpointStrategy> TritterBackend for Autodiff<B, C> {
    fn bitlinear_matmul(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        scale: Option<f32>,
    ) -> Tensor<Self, 2> {
        autodiff::bitlinear_matmul(x, weight, scale)
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

    fn flex_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: &AttentionMask,
    ) -> Tensor<Self, 4> {
        autodiff::flex_attention(q, k, v, mask)
    }
}

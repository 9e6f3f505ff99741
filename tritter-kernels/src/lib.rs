//! Tritter's backend extension: the ops the model needs a fast path for.
//!
//! The model calls [`TritterBackend`]'s ops and never a kernel directly, so the CPU path
//! and the GPU path are the same model code. Every op has a reference implementation in
//! [`reference`](mod@reference), written with Burn tensor ops; it is the provided method
//! of the trait, so a backend without a dedicated kernel uses it, and `Autodiff<B>`
//! differentiates it.

mod autodiff;
pub mod check;
pub mod cpu;
pub mod cube;
pub mod int8;
pub mod isa;
pub mod kv_int4;
pub mod mask;
pub mod packed;
pub mod reference;

pub use mask::{AttentionMask, MaskMod};
pub use packed::{PackedStorage, PackedTernary};

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

/// BitLinear's forward: the product and the quantized operands it was computed from.
#[derive(Debug, Clone)]
pub struct BitLinearForward<B: Backend> {
    /// `Q_a(x) · Q_w(W)`, `[tokens, out]`.
    pub output: Tensor<B, 2>,
    /// `Q_a(x)` dequantized: `xq / s` per token, `[tokens, in]`.
    pub x_quantized: Tensor<B, 2>,
    /// `Q_w(W)`, as the backward to the input uses it.
    pub w_quantized: QuantizedWeight<B>,
}

/// `Q_w(W)` as BitLinear's forward leaves it for the backward.
#[derive(Debug, Clone)]
pub enum QuantizedWeight<B: Backend> {
    /// `Wq · γ` dequantized, `[in, out]`.
    Dense(Tensor<B, 2>),
    /// `Wq` packed 16 codes to a 32-bit word (the device layout of [`PackedTernary`]),
    /// `[out, ceil(in / 16)]`, with `γ` `[1]` on the device: a sixteenth of the dense
    /// matrix's memory, multiplied without unpacking.
    Packed {
        words: Tensor<B, 2, Int>,
        gamma: Tensor<B, 1>,
        d_in: usize,
    },
}

impl<B: Backend> QuantizedWeight<B> {
    /// `Wq · γ` `[in, out]`.
    pub fn dense(self) -> Tensor<B, 2> {
        match self {
            Self::Dense(w) => w,
            Self::Packed { words, gamma, d_in } => {
                packed::unpack_words(words, d_in).transpose() * gamma.unsqueeze()
            }
        }
    }
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

    /// BitLinear's backward from the quantized operands of its forward (straight-through
    /// estimators): `dx = dy · Q_w(W)ᵀ` and `dW = Q_a(x)ᵀ · dy`, each when asked for.
    fn bitlinear_backward(
        x_quantized: Tensor<Self, 2>,
        w_quantized: QuantizedWeight<Self>,
        grad: Tensor<Self, 2>,
        [want_x, want_w]: [bool; 2],
    ) -> (Option<Tensor<Self, 2>>, Option<Tensor<Self, 2>>) {
        (
            want_x.then(|| grad.clone().matmul(w_quantized.dense().transpose())),
            want_w.then(|| x_quantized.transpose().matmul(grad)),
        )
    }

    /// RMSNorm over the last dimension of `[rows, dim]` with gain `gamma`.
    fn rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        reference::rms_norm(x, gamma, eps)
    }

    /// Gradients `(dx, dgamma)` of [`TritterBackend::rms_norm`] from the output's gradient.
    fn rms_norm_backward(
        x: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        eps: f64,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        reference::rms_norm_backward(x, gamma, eps, grad)
    }

    /// Heads `start..start + heads` of `x` `[batch, seq, width]` as `[batch, heads, seq,
    /// head_dim]` (queries, keys or values out of the fused q/k/v product).
    fn split_heads(
        x: Tensor<Self, 3>,
        start: usize,
        heads: usize,
        head_dim: usize,
    ) -> Tensor<Self, 4> {
        reference::split_heads(x, start, heads, head_dim)
    }

    /// `x` `[batch, heads, seq, head_dim]` as heads `start..` of a `[batch, seq, width]`
    /// tensor, zero elsewhere: the inverse of [`TritterBackend::split_heads`], and the
    /// attention output's layout for the output projection.
    fn merge_heads(x: Tensor<Self, 4>, width: usize, start: usize) -> Tensor<Self, 3> {
        reference::merge_heads(x, width, start)
    }

    /// Rotary position embedding of `x` `[batch, heads, len, d]` with tables of its shape
    /// (rotate-half convention, `sin` holding `[−sin, sin]` per position).
    fn rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        reference::rotary(x, cos, sin)
    }

    /// The gradient of [`TritterBackend::rotary`] with respect to `x`.
    fn rotary_backward(
        grad: Tensor<Self, 4>,
        cos: Tensor<Self, 4>,
        sin: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        reference::rotary_backward(grad, cos, sin)
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

    /// The squared-ReLU gate `relu(gate)² ⊙ up` of the feed-forward, from the fused
    /// gate/up product `[rows, 2·ffn]` (gate first) → `[rows, ffn]`.
    fn squared_relu_gate(gate_up: Tensor<Self, 2>, ffn: usize) -> Tensor<Self, 2> {
        reference::squared_relu_gate(gate_up, ffn)
    }

    /// Inference's attention inputs from the fused projection `qkv`
    /// `[rows, (heads + 2·kv_heads)·d]`: queries `[rows, heads, d]` and keys
    /// `[rows, kv_heads, d]`, each head RMS-normalized with its gain (QK-norm, `ε = eps`)
    /// and rotated by its row's tables `cos`, `sin` `[rows, d]` (rotate-half, `sin`
    /// holding `[−sin, sin]`), and values `[rows, kv_heads, d]`.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rotary(
        qkv: Tensor<Self, 2>,
        q_gamma: Tensor<Self, 1>,
        k_gamma: Tensor<Self, 1>,
        eps: f64,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        heads: usize,
        kv_heads: usize,
    ) -> [Tensor<Self, 3>; 3] {
        reference::qk_norm_rotary(qkv, q_gamma, k_gamma, eps, cos, sin, heads, kv_heads)
    }

    /// The gradient of [`TritterBackend::squared_relu_gate`] with respect to `gate_up`,
    /// from the output's gradient.
    fn squared_relu_gate_backward(
        gate_up: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        ffn: usize,
    ) -> Tensor<Self, 2> {
        reference::squared_relu_gate_backward(gate_up, grad, ffn)
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

    /// Whether [`TritterBackend::ternary_map`] computes on mapped file pages in place.
    fn computes_in_place() -> bool {
        false
    }

    /// A packed matrix this backend computes on in place, from the export's bytes in a
    /// mapping the caller keeps resident while the matrix is used: where the device's
    /// memory is the host's, the mapped file pages already are device memory. `None`
    /// (the default) where the codes must be uploaded ([`TritterBackend::ternary_upload`]).
    fn ternary_map(
        codes: packed::MappedCodes,
        d_out: usize,
        d_in: usize,
        gamma: f32,
    ) -> Option<PackedTernary<Self>> {
        let _ = (codes, d_out, d_in, gamma);
        None
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

    /// Device memory [`TritterBackend::flex_attention`] needs beyond its inputs and
    /// output, at most, for one call of `shape`. The default's: key and value heads
    /// repeated for every query head, the dense mask, and the scores and probabilities.
    fn attention_scratch_bytes(shape: cpu::AttentionShape) -> usize {
        let cpu::AttentionShape {
            batch,
            heads,
            q_len,
            kv_len,
            d,
            ..
        } = shape;
        let scores = batch * heads * q_len * kv_len;
        4 * 2 * batch * heads * kv_len * d + scores + 4 * 2 * scores
    }

    /// Whether a full-precision (f32 or f16) KV cache is better kept in host memory,
    /// appended in place, with decode attention on the CPU
    /// ([`kv_int4::Int4KvCache::f32_only`], [`kv_int4::Int4KvCache::f16_only`]), than on
    /// the device: true where the device is the CPU.
    fn host_kv_cache() -> bool {
        false
    }

    /// An empty INT4 cache of one layer of one sequence in device memory, where this
    /// backend has the kernels for it and they serve the shape; `None` keeps the INT4
    /// cache in host memory ([`kv_int4::Int4KvCache`]).
    fn device_int4_kv_cache(
        kv_heads: usize,
        head_dim: usize,
        group: usize,
        recent: usize,
        device: &Self::Device,
    ) -> Option<Box<dyn kv_int4::DeviceKvCache<Self>>> {
        let _ = (kv_heads, head_dim, group, recent, device);
        None
    }
}

/// The CPU backend computes packed products natively: bytes stay in host memory, each
/// row is unpacked once per call and serves every token, accumulation in `i32`. BitLinear
/// trains through the integer product of [`int8`] where the CPU has AVX-512 VNNI (the
/// `f32` product of the dequantized operands elsewhere); attention, the norms, the rotary
/// embedding and the gate run the kernels of [`cpu`].
impl TritterBackend for burn::backend::Flex {
    fn bitlinear_forward(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        scale: Option<f32>,
    ) -> BitLinearForward<Self> {
        let [tokens, d_in] = x.dims();
        let w_dims = weight.dims();
        let [_, d_out] = w_dims;
        let x = cpu::Host::new(x);
        // γ through Burn's own mean, as the reference and the export measure it, so that an
        // exported layer (γ fixed) computes exactly what the checkpoint's layer computes.
        let gamma = scale.unwrap_or_else(|| weight.clone().abs().mean().into_scalar());
        let weight = cpu::Host::new(weight);
        let (output, xq, wq) = if int8::available() {
            let (codes, xq) = int8::quantize_activations(x.slice(), d_in);
            let (panels, wq) = int8::quantize_weights(weight.slice(), d_in, d_out, gamma);
            (int8::matmul(&codes, tokens, &panels, gamma), xq, wq)
        } else {
            let xq = cpu::quantize_activations(x.slice(), d_in);
            let wq = cpu::quantize_weights(weight.slice(), gamma);
            let output = cpu::matmul(
                cpu::Matrix::new(&xq, tokens, d_in),
                cpu::Matrix::new(&wq, d_in, d_out),
            );
            (output, xq, wq)
        };
        BitLinearForward {
            output: cpu::flex_tensor(output, [tokens, d_out]),
            x_quantized: cpu::flex_tensor(xq, [tokens, d_in]),
            w_quantized: QuantizedWeight::Dense(cpu::flex_tensor(wq, w_dims)),
        }
    }

    fn bitlinear_backward(
        x_quantized: Tensor<Self, 2>,
        w_quantized: QuantizedWeight<Self>,
        grad: Tensor<Self, 2>,
        [want_x, want_w]: [bool; 2],
    ) -> (Option<Tensor<Self, 2>>, Option<Tensor<Self, 2>>) {
        let w_quantized = w_quantized.dense();
        let ([tokens, d_in], [_, d_out]) = (x_quantized.dims(), w_quantized.dims());
        let [xq, wq, grad] = [x_quantized, w_quantized, grad].map(cpu::Host::new);
        let (xq, wq) = (
            cpu::Matrix::new(xq.slice(), tokens, d_in),
            cpu::Matrix::new(wq.slice(), d_in, d_out),
        );
        let grad = cpu::Matrix::new(grad.slice(), tokens, d_out);
        (
            want_x.then(|| cpu::flex_tensor(cpu::matmul(grad, wq.t()), [tokens, d_in])),
            want_w.then(|| cpu::flex_tensor(cpu::matmul(xq.t(), grad), [d_in, d_out])),
        )
    }

    fn rms_norm(x: Tensor<Self, 2>, gamma: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        let dims = x.dims();
        let (x, gamma) = (cpu::Host::new(x), cpu::Host::new(gamma));
        cpu::flex_tensor(cpu::rms_norm(x.slice(), gamma.slice(), eps), dims)
    }

    fn rms_norm_backward(
        x: Tensor<Self, 2>,
        gamma: Tensor<Self, 1>,
        eps: f64,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        let (dims, d) = (x.dims(), gamma.dims()[0]);
        let [x, grad] = [x, grad].map(cpu::Host::new);
        let gamma = cpu::Host::new(gamma);
        let (dx, dg) = cpu::rms_norm_backward(x.slice(), gamma.slice(), eps, grad.slice());
        (cpu::flex_tensor(dx, dims), cpu::flex_tensor(dg, [d]))
    }

    fn split_heads(
        x: Tensor<Self, 3>,
        start: usize,
        heads: usize,
        head_dim: usize,
    ) -> Tensor<Self, 4> {
        let [batch, seq, width] = x.dims();
        let x = cpu::Host::new(x);
        cpu::flex_tensor(
            cpu::split_heads(x.slice(), [batch, seq, width], start, heads, head_dim),
            [batch, heads, seq, head_dim],
        )
    }

    fn merge_heads(x: Tensor<Self, 4>, width: usize, start: usize) -> Tensor<Self, 3> {
        let dims = x.dims();
        let x = cpu::Host::new(x);
        cpu::flex_tensor(
            cpu::merge_heads(x.slice(), dims, width, start),
            [dims[0], dims[2], width],
        )
    }

    fn qk_norm_rotary(
        qkv: Tensor<Self, 2>,
        q_gamma: Tensor<Self, 1>,
        k_gamma: Tensor<Self, 1>,
        eps: f64,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        heads: usize,
        kv_heads: usize,
    ) -> [Tensor<Self, 3>; 3] {
        let [rows, d] = cos.dims();
        let [qkv, cos, sin] = [qkv, cos, sin].map(cpu::Host::new);
        let [q_gamma, k_gamma] = [q_gamma, k_gamma].map(cpu::Host::new);
        let [q, k, v] = cpu::qk_norm_rotary(
            qkv.slice(),
            [q_gamma.slice(), k_gamma.slice()],
            eps,
            cos.slice(),
            sin.slice(),
            heads,
            kv_heads,
        );
        [
            cpu::flex_tensor(q, [rows, heads, d]),
            cpu::flex_tensor(k, [rows, kv_heads, d]),
            cpu::flex_tensor(v, [rows, kv_heads, d]),
        ]
    }

    fn rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let dims = x.dims();
        let [x, cos, sin] = [x, cos, sin].map(cpu::Host::new);
        cpu::flex_tensor(
            cpu::rotary(x.slice(), cos.slice(), sin.slice(), dims[3], false),
            dims,
        )
    }

    fn rotary_backward(
        grad: Tensor<Self, 4>,
        cos: Tensor<Self, 4>,
        sin: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        let dims = grad.dims();
        let [grad, cos, sin] = [grad, cos, sin].map(cpu::Host::new);
        cpu::flex_tensor(
            cpu::rotary(grad.slice(), cos.slice(), sin.slice(), dims[3], true),
            dims,
        )
    }

    fn flex_attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        mask: &AttentionMask,
    ) -> (Tensor<Self, 4>, Option<Tensor<Self, 3>>) {
        let shape = cpu::attention_shape(q.dims(), k.dims());
        let (q, k, v) = (cpu::Host::new(q), cpu::Host::new(k), cpu::Host::new(v));
        let (out, lse) = cpu::attention_forward(q.slice(), k.slice(), v.slice(), shape, mask);
        let (b, h, n, d) = (shape.batch, shape.heads, shape.q_len, shape.d);
        (
            cpu::flex_tensor(out, [b, h, n, d]),
            Some(cpu::flex_tensor(lse, [b, h, n])),
        )
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
        let shape = cpu::attention_shape(q.dims(), k.dims());
        let lse = match lse {
            Some(lse) => lse,
            None => Self::flex_attention_forward(q.clone(), k.clone(), v.clone(), mask)
                .1
                .expect("the CPU forward gives the log-sum-exp"),
        };
        let [q, k, v, out, grad_out] = [q, k, v, out, grad_out].map(cpu::Host::new);
        let lse = cpu::Host::new(lse);
        let (dq, dk, dv) = cpu::attention_backward(
            q.slice(),
            k.slice(),
            v.slice(),
            out.slice(),
            lse.slice(),
            grad_out.slice(),
            shape,
            mask,
        );
        let (b, h, hk, n, m, d) = (
            shape.batch,
            shape.heads,
            shape.kv_heads,
            shape.q_len,
            shape.kv_len,
            shape.d,
        );
        (
            cpu::flex_tensor(dq, [b, h, n, d]),
            cpu::flex_tensor(dk, [b, hk, m, d]),
            cpu::flex_tensor(dv, [b, hk, m, d]),
        )
    }

    fn squared_relu_gate(gate_up: Tensor<Self, 2>, ffn: usize) -> Tensor<Self, 2> {
        let rows = gate_up.dims()[0];
        let gate_up = cpu::Host::new(gate_up);
        cpu::flex_tensor(cpu::squared_relu_gate(gate_up.slice(), ffn), [rows, ffn])
    }

    fn squared_relu_gate_backward(
        gate_up: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        ffn: usize,
    ) -> Tensor<Self, 2> {
        let rows = gate_up.dims()[0];
        let (gate_up, grad) = (cpu::Host::new(gate_up), cpu::Host::new(grad));
        cpu::flex_tensor(
            cpu::squared_relu_gate_backward(gate_up.slice(), grad.slice(), ffn),
            [rows, 2 * ffn],
        )
    }

    fn ternary_upload(
        bytes: &[u8],
        d_out: usize,
        d_in: usize,
        gamma: f32,
        _device: &Self::Device,
    ) -> PackedTernary<Self> {
        packed::upload_host(bytes, d_out, d_in, gamma)
    }

    fn computes_in_place() -> bool {
        true
    }

    fn ternary_map(
        codes: packed::MappedCodes,
        d_out: usize,
        d_in: usize,
        gamma: f32,
    ) -> Option<PackedTernary<Self>> {
        Some(packed::map_host(codes, d_out, d_in, gamma))
    }

    fn ternary_packed_matmul(x: Tensor<Self, 2>, w: &PackedTernary<Self>) -> Tensor<Self, 2> {
        let codes = match &w.storage {
            PackedStorage::Host(words) => packed::Codes::Panels(words),
            PackedStorage::Mapped(codes) => packed::Codes::Rows(codes.bytes()),
            PackedStorage::Words(_) => return packed::matmul_words(x, w),
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
        let y = packed::cpu_gemm(&values, tokens, codes, w.d_out, d_in, w.gamma);
        Tensor::from_data(TensorData::new(y, [tokens, w.d_out]), &device)
    }

    fn ternary_scratch_bytes(d_out: usize, d_in: usize) -> usize {
        // The int8 activations (rows, then tiles) are per call and proportional to the
        // activations; the accumulators live in registers. A matrix computed in place
        // rearranges each task's panels into a scratch per thread (not with AMX, which
        // multiplies the rows as they stand), and the portable kernel unpacks each panel
        // into another.
        let _ = d_out;
        packed::rows_scratch_bytes(d_in)
    }

    fn attention_scratch_bytes(shape: cpu::AttentionShape) -> usize {
        cpu::attention_forward_scratch_bytes(shape)
    }

    fn host_kv_cache() -> bool {
        true
    }
}
/// Burn's CubeCL backends (`Wgpu`, `Cuda`: fusion over `CubeBackend`) run the CubeCL
/// kernels of [`cube`]. BitLinear trains through the ternary kernels: the forward packs
/// the latent weights on the device and multiplies them with int8 activations, and the
/// backward to the input multiplies the gradient by the packed weights it kept.
impl<R, F, I, BT> TritterBackend for cube::fusion::Fused<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn bitlinear_forward(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        scale: Option<f32>,
    ) -> BitLinearForward<Self> {
        cube::ternary::bitlinear_forward(x, weight, scale)
    }

    fn bitlinear_backward(
        x_quantized: Tensor<Self, 2>,
        w_quantized: QuantizedWeight<Self>,
        grad: Tensor<Self, 2>,
        [want_x, want_w]: [bool; 2],
    ) -> (Option<Tensor<Self, 2>>, Option<Tensor<Self, 2>>) {
        let grad_w = want_w.then(|| x_quantized.transpose().matmul(grad.clone()));
        let grad_x = want_x.then(|| match w_quantized {
            QuantizedWeight::Packed { words, gamma, d_in } => {
                cube::ternary::transposed_product(grad, words, gamma, d_in)
            }
            dense => grad.matmul(dense.dense().transpose()),
        });
        (grad_x, grad_w)
    }

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

    fn attention_scratch_bytes(shape: cpu::AttentionShape) -> usize {
        cube::attention::forward_scratch_bytes(shape)
    }

    fn device_int4_kv_cache(
        kv_heads: usize,
        head_dim: usize,
        group: usize,
        recent: usize,
        device: &Self::Device,
    ) -> Option<Box<dyn kv_int4::DeviceKvCache<Self>>> {
        use cube::kv_int4::DeviceInt4KvCache;
        DeviceInt4KvCache::<R, F, I, BT>::supports(head_dim, group, recent).then(|| {
            Box::new(DeviceInt4KvCache::<R, F, I, BT>::new(
                kv_heads, head_dim, group, recent, device,
            )) as Box<dyn kv_int4::DeviceKvCache<Self>>
        })
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

    fn squared_relu_gate(gate_up: Tensor<Self, 2>, ffn: usize) -> Tensor<Self, 2> {
        autodiff::squared_relu_gate(gate_up, ffn)
    }

    fn rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        autodiff::rotary(x, cos, sin)
    }

    fn split_heads(
        x: Tensor<Self, 3>,
        start: usize,
        heads: usize,
        head_dim: usize,
    ) -> Tensor<Self, 4> {
        autodiff::split_heads(x, start, heads, head_dim)
    }

    fn merge_heads(x: Tensor<Self, 4>, width: usize, start: usize) -> Tensor<Self, 3> {
        autodiff::merge_heads(x, width, start)
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

    fn attention_scratch_bytes(shape: cpu::AttentionShape) -> usize {
        // The inner backend's forward; what it keeps for the backward is its output.
        B::attention_scratch_bytes(shape)
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

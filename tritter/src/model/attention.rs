//! Attention: fused q/k/v BitLinear, QK-norm, RoPE, grouped-query heads, causal or
//! sliding-window masking, and an optional KV cache.

use super::bitlinear::{rms_norm, BitLinear, BitLinearConfig};
use super::config::TritterConfig;
use crate::infer::kv_cache::LayerCache;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;
use std::sync::Arc;
use tritter_kernels::{AttentionMask, MaskMod, TritterBackend};

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[hidden, (heads + 2·kv_heads)·head_dim]`: queries, keys, values in one product.
    pub qkv: BitLinear<B>,
    pub out: BitLinear<B>,
    /// QK-norm: RMSNorm over head_dim, shared by all heads, before RoPE.
    pub q_norm: RmsNorm<B>,
    pub k_norm: RmsNorm<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

impl<B: Backend> Attention<B> {
    pub fn new(config: &TritterConfig, device: &B::Device) -> Self {
        let hd = config.head_dim();
        let eps = config.norm_eps;
        Self {
            qkv: BitLinearConfig::new(config.hidden_size, config.qkv_size())
                .with_norm_eps(eps)
                .init(device),
            out: BitLinearConfig::new(config.num_heads * hd, config.hidden_size)
                .with_norm_eps(eps)
                .init(device),
            q_norm: RmsNormConfig::new(hd).with_epsilon(eps).init(device),
            k_norm: RmsNormConfig::new(hd).with_epsilon(eps).init(device),
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: hd,
            sliding_window: config.sliding_window,
        }
    }
}

/// The head layout of an attention layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

impl Heads {
    pub fn new(config: &TritterConfig) -> Self {
        Self {
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim(),
            sliding_window: config.sliding_window,
        }
    }
}

impl<B: TritterBackend> Attention<B> {
    /// `x`: `[batch, seq, hidden]` at absolute positions `start..start + seq`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let heads = Heads {
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            sliding_window: self.sliding_window,
        };
        let qkv = self.qkv.forward(x);
        self.out
            .forward(attend(qkv, &self.q_norm, &self.k_norm, heads, rope, cache))
    }
}

/// Attention between the q/k/v product and the output projection: `qkv`
/// `[batch, seq, (heads + 2·kv_heads)·head_dim]` → `[batch, seq, heads·head_dim]`.
/// QK-norm, RoPE, the cache append, GQA and the mask happen here.
pub fn attend<B: TritterBackend>(
    qkv: Tensor<B, 3>,
    q_norm: &RmsNorm<B>,
    k_norm: &RmsNorm<B>,
    heads: Heads,
    rope: &Rope<B>,
    cache: Option<&mut LayerCache<B>>,
) -> Tensor<B, 3> {
    let [_, seq, _] = qkv.dims();
    let (nh, nkv, hd) = (heads.num_heads, heads.num_kv_heads, heads.head_dim);
    let split = |start: usize, heads: usize| B::split_heads(qkv.clone(), start, heads, hd);
    let q = rope.q.apply(rms_norm(q_norm, split(0, nh)));
    let k = rope.k.apply(rms_norm(k_norm, split(nh, nkv)));
    let v = split(nh + nkv, nkv);
    let (k, v) = match cache {
        Some(cache) => {
            cache.push(k, v);
            // One position of one sequence: an INT4 cache (or the CPU's f16 cache) is
            // read by its own decode attention, codes dequantized inside the kernel.
            if q.dims()[0] * seq == 1 && rope.documents.is_none() {
                let queries = q.clone().reshape([nh, hd]);
                if let Some(out) = cache.decode_attention(queries, heads.sliding_window) {
                    return B::merge_heads(out.reshape([1, nh, 1, hd]), nh * hd, 0);
                }
            }
            cache.keys_values()
        }
        None => (k, v),
    };
    let kv_len = k.dims()[2];
    let mask = attention_mask(heads.sliding_window, kv_len);
    let mask = match &rope.documents {
        Some(documents) => {
            assert_eq!(
                kv_len, seq,
                "document masks apply to whole sequences, not to a cache"
            );
            AttentionMask {
                mask: mask.and(MaskMod::Document),
                documents: Some(documents.clone()),
            }
        }
        None => AttentionMask::new(mask),
    };
    let out = B::flex_attention(q, k, v, &mask);
    B::merge_heads(out, nh * hd, 0)
}

/// The model's mask over `kv_len` keys: causal, or a sliding window when the keys reach
/// past it.
pub fn attention_mask(sliding_window: Option<usize>, kv_len: usize) -> MaskMod {
    match sliding_window {
        Some(window) if window < kv_len => MaskMod::sliding_window(window),
        _ => MaskMod::causal(),
    }
}

/// Copies a strided view into contiguous memory. Element-wise kernels (Flex's above all)
/// are many times faster on contiguous tensors than on views left by `narrow`/`swap_dims`.
pub fn contiguous<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dims = x.dims();
    x.reshape([dims.iter().product::<usize>()]).reshape(dims)
}

/// Appends position `p`'s rotary row: `[cos, cos]` to `cos` and `[−sin, sin]` to `sin`,
/// angles `p · θ^(−2j/d)`.
pub fn rope_row(p: usize, head_dim: usize, theta: f64, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    let half = head_dim / 2;
    let angles: Vec<f64> = (0..half)
        .map(|j| p as f64 * theta.powf(-2.0 * j as f64 / head_dim as f64))
        .collect();
    cos.extend(angles.iter().chain(&angles).map(|a| a.cos() as f32));
    sin.extend(angles.iter().map(|a| -a.sin() as f32));
    sin.extend(angles.iter().map(|a| a.sin() as f32));
}

/// Rotary position tables (rotate-half convention): pairs `(x_j, x_{j + d/2})` rotate by
/// `p · θ^(−2j/d)` at position `p`. Built once per forward for `[batch, heads, len, d]`,
/// materialized at full size so the rotation is three contiguous element-wise ops.
#[derive(Clone)]
pub struct RopeTables<B: Backend> {
    /// `[cos, cos]` per position.
    cos: Tensor<B, 4>,
    /// `[−sin, sin]` per position.
    sin: Tensor<B, 4>,
}

impl<B: Backend> RopeTables<B> {
    pub fn new(
        head_dim: usize,
        theta: f64,
        start: usize,
        [batch, heads, len]: [usize; 3],
        device: &B::Device,
    ) -> Self {
        let mut cos = Vec::with_capacity(len * head_dim);
        let mut sin = Vec::with_capacity(len * head_dim);
        for p in start..start + len {
            rope_row(p, head_dim, theta, &mut cos, &mut sin);
        }
        let table = |v: Vec<f32>| {
            let t = Tensor::<B, 2>::from_data(TensorData::new(v, [len, head_dim]), device)
                .unsqueeze::<4>()
                .expand([batch, heads, len, head_dim]);
            contiguous(t)
        };
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// Rotates a contiguous `[batch, heads, len, head_dim]` tensor:
    /// `x·cos + rotate_half(x)·sin`, `rotate_half([x1, x2]) = [x2, x1]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4>
    where
        B: TritterBackend,
    {
        B::rotary(x, self.cos.clone(), self.sin.clone())
    }
}

/// The positions of one forward pass: rotary tables for the query heads and the key
/// heads and, for packed training sequences, the document of every position
/// (`[batch, len]`), so that attention stays within each document.
pub struct Rope<B: Backend> {
    pub q: RopeTables<B>,
    pub k: RopeTables<B>,
    pub documents: Option<Arc<Vec<i32>>>,
}

impl<B: Backend> Rope<B> {
    pub fn new(
        head_dim: usize,
        theta: f64,
        start: usize,
        [batch, q_heads, kv_heads, len]: [usize; 4],
        device: &B::Device,
    ) -> Self {
        let q = RopeTables::new(head_dim, theta, start, [batch, q_heads, len], device);
        let k = if kv_heads == q_heads {
            q.clone()
        } else {
            RopeTables::new(head_dim, theta, start, [batch, kv_heads, len], device)
        };
        Self {
            q,
            k,
            documents: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::tensor::Distribution;
    use tritter_kernels::reference::mask_tensor;

    #[test]
    fn rope_scores_depend_only_on_relative_position() {
        let device = Default::default();
        let d = 16;
        let q =
            Tensor::<TestBackend, 4>::random([1, 1, 1, d], Distribution::Normal(0.0, 1.0), &device);
        let k =
            Tensor::<TestBackend, 4>::random([1, 1, 1, d], Distribution::Normal(0.0, 1.0), &device);
        let table = |p| RopeTables::<TestBackend>::new(d, 10_000.0, p, [1, 1, 1], &device);
        let score = |pq: usize, pk: usize| {
            let rq = table(pq).apply(q.clone());
            let rk = table(pk).apply(k.clone());
            (rq * rk).sum().into_scalar()
        };
        let a = score(5, 2);
        let b = score(105, 102);
        let c = score(7, 2);
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        assert!((a - c).abs() > 1e-3, "different offsets should differ");
        // Position 0 is the identity.
        let r0 = table(0).apply(q.clone());
        // A pair (x_j, x_{j+d/2}) at position 1 rotates by θ^(−2j/d) radians.
        let x = Tensor::<TestBackend, 4>::from_data(
            TensorData::new(
                (0..d)
                    .map(|i| if i == 1 || i == 9 { 1.0 } else { 0.0 })
                    .collect::<Vec<f32>>(),
                [1, 1, 1, d],
            ),
            &device,
        );
        let r: Vec<f32> = table(1).apply(x).into_data().to_vec().unwrap();
        let angle = 10_000f64.powf(-2.0 / d as f64);
        let (c, s) = (angle.cos() as f32, angle.sin() as f32);
        assert!(
            (r[1] - (c - s)).abs() < 1e-5 && (r[9] - (c + s)).abs() < 1e-5,
            "{r:?}"
        );
        r0.into_data()
            .assert_approx_eq::<f32>(&q.into_data(), Default::default());
    }

    #[test]
    fn sliding_window_mask_matches_definition() {
        let device = Default::default();
        let m = mask_tensor::<TestBackend>(
            &AttentionMask::new(MaskMod::sliding_window(2)),
            [1, 1, 4, 4],
            &device,
        );
        let v: Vec<bool> = m.into_data().to_vec().unwrap();
        #[rustfmt::skip]
        let expected = vec![
            false, true,  true,  true,
            false, false, true,  true,
            true,  false, false, true,
            true,  true,  false, false,
        ];
        assert_eq!(v, expected);
    }
}

//! Attention: fused q/k/v BitLinear, QK-norm, RoPE, grouped-query heads, causal or
//! sliding-window masking, and an optional KV cache.

use super::bitlinear::{BitLinear, BitLinearConfig};
use super::config::TritterConfig;
use crate::infer::kv_cache::LayerCache;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;
use tritter_kernels::TritterBackend;

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

impl<B: TritterBackend> Attention<B> {
    /// `x`: `[batch, seq, hidden]` at absolute positions `start..start + seq`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = self.qkv.forward(x);
        let split = |start: usize, heads: usize| {
            qkv.clone()
                .narrow(2, start * hd, heads * hd)
                .reshape([batch, seq, heads, hd])
                .swap_dims(1, 2)
        };
        let q = rope.apply(self.q_norm.forward(split(0, nh)));
        let k = rope.apply(self.k_norm.forward(split(nh, nkv)));
        let v = split(nh + nkv, nkv);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        let kv_len = k.dims()[2];
        let k = repeat_kv(k, nh / nkv);
        let v = repeat_kv(v, nh / nkv);
        let (mask, causal) = match self.sliding_window {
            Some(window) if window < kv_len => (
                Some(sliding_window_mask::<B>(
                    [batch, nh, seq, kv_len],
                    window,
                    &q.device(),
                )),
                false,
            ),
            _ => (None, true),
        };
        let out = B::tritter_attention(q, k, v, mask, causal);
        self.out
            .forward(out.swap_dims(1, 2).reshape([batch, seq, nh * hd]))
    }
}

/// Grouped-query attention: each key/value head serves `repeat` query heads.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, repeat: usize) -> Tensor<B, 4> {
    if repeat == 1 {
        return x;
    }
    let [b, h, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, h, repeat, t, d])
        .reshape([b, h * repeat, t, d])
}

/// `true` where query `i` (the last `q` of `kv` positions) may not see key `j`:
/// the future, or more than `window − 1` tokens back.
pub fn sliding_window_mask<B: Backend>(
    [batch, heads, q, kv]: [usize; 4],
    window: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let offset = kv - q;
    let masked: Vec<bool> = (0..q)
        .flat_map(|i| {
            let pos = i + offset;
            (0..kv).map(move |j| j > pos || pos - j >= window)
        })
        .collect();
    Tensor::<B, 2, Bool>::from_data(TensorData::new(masked, [q, kv]), device)
        .unsqueeze::<4>()
        .expand([batch, heads, q, kv])
}

/// Rotary position tables for positions `start..start + len` (rotate-half convention):
/// pairs `(x_j, x_{j + d/2})` rotate by `p · θ^(−2j/d)`.
pub struct RopeTables<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

impl<B: Backend> RopeTables<B> {
    pub fn new(head_dim: usize, theta: f64, start: usize, len: usize, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for j in 0..half {
                let freq = theta.powf(-2.0 * j as f64 / head_dim as f64);
                let angle = p as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<B, 2>::from_data(TensorData::new(v, [len, half]), device).unsqueeze::<4>()
        };
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// Rotates `[batch, heads, len, head_dim]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let d = x.dims()[3];
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let r1 = x1.clone() * self.cos.clone() - x2.clone() * self.sin.clone();
        let r2 = x2 * self.cos.clone() + x1 * self.sin.clone();
        Tensor::cat(vec![r1, r2], 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::tensor::Distribution;

    #[test]
    fn rope_scores_depend_only_on_relative_position() {
        let device = Default::default();
        let d = 16;
        let q =
            Tensor::<TestBackend, 4>::random([1, 1, 1, d], Distribution::Normal(0.0, 1.0), &device);
        let k =
            Tensor::<TestBackend, 4>::random([1, 1, 1, d], Distribution::Normal(0.0, 1.0), &device);
        let score = |pq: usize, pk: usize| {
            let rq = RopeTables::<TestBackend>::new(d, 10_000.0, pq, 1, &device).apply(q.clone());
            let rk = RopeTables::<TestBackend>::new(d, 10_000.0, pk, 1, &device).apply(k.clone());
            (rq * rk).sum().into_scalar()
        };
        let a = score(5, 2);
        let b = score(105, 102);
        let c = score(7, 2);
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        assert!((a - c).abs() > 1e-3, "different offsets should differ");
        // Position 0 is the identity.
        let r0 = RopeTables::<TestBackend>::new(d, 10_000.0, 0, 1, &device).apply(q.clone());
        r0.into_data()
            .assert_approx_eq::<f32>(&q.into_data(), Default::default());
    }

    #[test]
    fn sliding_window_mask_matches_definition() {
        let device = Default::default();
        let m = sliding_window_mask::<TestBackend>([1, 1, 4, 4], 2, &device);
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

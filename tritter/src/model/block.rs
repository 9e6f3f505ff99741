//! A transformer block with the norm reordering of Chameleon ("post-sublayer norm"):
//! `h = x + RMSNorm(Attn(x))`, `out = h + RMSNorm(FFN(h))`.

use super::attention::{Attention, Rope};
use super::bitlinear::rms_norm;
use super::config::TritterConfig;
use super::ffn::FeedForward;
use crate::infer::kv_cache::LayerCache;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;
use tritter_kernels::TritterBackend;

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attn: Attention<B>,
    pub attn_norm: RmsNorm<B>,
    pub ffn: FeedForward<B>,
    pub ffn_norm: RmsNorm<B>,
}

impl<B: Backend> Block<B> {
    pub fn new(config: &TritterConfig, device: &B::Device) -> Self {
        let norm = || {
            RmsNormConfig::new(config.hidden_size)
                .with_epsilon(config.norm_eps)
                .init(device)
        };
        Self {
            attn: Attention::new(config, device),
            attn_norm: norm(),
            ffn: FeedForward::new(config, device),
            ffn_norm: norm(),
        }
    }
}

impl<B: TritterBackend> Block<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let h = x.clone() + rms_norm(&self.attn_norm, self.attn.forward(x, rope, cache));
        h.clone() + rms_norm(&self.ffn_norm, self.ffn.forward(h))
    }
}

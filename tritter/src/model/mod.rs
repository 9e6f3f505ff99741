//! The Tritter model: embedding → blocks → final norm → LM head.

pub mod attention;
pub mod bitlinear;
pub mod block;
pub mod config;
pub mod ffn;

use crate::infer::kv_cache::KvCache;
use attention::Rope;
use block::Block;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
pub use config::{ConfigError, ConfigOverrides, TritterConfig, UnknownPreset, PRESETS};
use std::sync::Arc;
use tritter_kernels::TritterBackend;

#[derive(Module, Debug)]
pub struct TritterModel<B: Backend> {
    /// Full-precision token embedding.
    pub embedding: Embedding<B>,
    pub blocks: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
    /// Full-precision LM head; `None` when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: TritterConfig,
}

impl TritterConfig {
    /// Builds a model with fresh weights. The config must be valid.
    pub fn init<B: Backend>(&self, device: &B::Device) -> TritterModel<B> {
        TritterModel {
            embedding: EmbeddingConfig::new(self.vocab_size, self.hidden_size).init(device),
            blocks: (0..self.num_layers)
                .map(|_| Block::new(self, device))
                .collect(),
            norm: RmsNormConfig::new(self.hidden_size)
                .with_epsilon(self.norm_eps)
                .init(device),
            lm_head: (!self.tie_embeddings).then(|| {
                LinearConfig::new(self.hidden_size, self.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
            config: self.clone(),
        }
    }
}

impl<B: TritterBackend> TritterModel<B> {
    /// Logits `[batch, seq, vocab]` for tokens `[batch, seq]`. With a cache, the tokens
    /// continue the cached sequence and their keys and values are appended to it.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.forward_with(tokens, cache, None)
    }

    /// [`TritterModel::forward`] over packed sequences: `documents` (`[batch, seq]`, row
    /// major) gives each position's document, and attention never crosses documents.
    pub fn forward_with(
        &self,
        tokens: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
        documents: Option<Arc<Vec<i32>>>,
    ) -> Tensor<B, 3> {
        let [batch, seq] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let c = &self.config;
        let mut rope = Rope::new(
            c.head_dim(),
            c.rope_theta,
            start,
            [batch, c.num_heads, c.num_kv_heads, seq],
            &tokens.device(),
        );
        rope.documents = documents;
        let mut x = self.embedding.forward(tokens);
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| c.layer_mut(i));
            x = block.forward(x, &rope, layer_cache);
        }
        if let Some(cache) = cache {
            cache.advance(seq);
        }
        self.head(bitlinear::rms_norm(&self.norm, x))
    }

    fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => {
                let [b, t, h] = x.dims();
                let w = self.embedding.weight.val();
                x.reshape([b * t, h])
                    .matmul(w.transpose())
                    .reshape([b, t, self.config.vocab_size])
            }
        }
    }

    /// Mean next-token cross-entropy of `inputs` `[batch, seq]` against `targets`, with
    /// attention kept within `documents` when given (see [`TritterModel::forward_with`]).
    pub fn loss(
        &self,
        inputs: Tensor<B, 2, Int>,
        targets: Tensor<B, 2, Int>,
        documents: Option<Arc<Vec<i32>>>,
    ) -> Tensor<B, 1> {
        let [b, t] = inputs.dims();
        let logits = self.forward_with(inputs, None, documents);
        let vocab = self.config.vocab_size;
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.reshape([b * t, vocab]), targets.reshape([b * t]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::module::Module;

    fn tiny() -> TritterConfig {
        TritterConfig::preset("test", 264)
            .unwrap()
            .with_overrides(&ConfigOverrides {
                hidden_size: Some(64),
                num_layers: Some(2),
                num_heads: Some(4),
                num_kv_heads: Some(2),
                ffn_size: Some(128),
                ..Default::default()
            })
    }

    #[test]
    fn parameter_count_is_exact_for_every_preset_shape() {
        let device = Default::default();
        for config in [
            tiny(),
            TritterConfig {
                tie_embeddings: true,
                ..tiny()
            },
            TritterConfig::preset("test", 264).unwrap(),
        ] {
            let model = config.init::<TestBackend>(&device);
            assert_eq!(model.num_params(), config.parameter_count(), "{config:?}");
        }
    }

    #[test]
    fn preset_parameter_counts() {
        // Exact counts, byte vocabulary (264), untied head: checked by hand from the shapes.
        let count = |name: &str| TritterConfig::preset(name, 264).unwrap().parameter_count();
        let by_hand = |h: usize, l: usize, nh: usize, kv: usize, f: usize| {
            let hd = h / nh;
            let qkv = h * (nh + 2 * kv) * hd;
            let o = h * h;
            let ffn = 2 * h * f + f * h;
            let norms = h + h + h + f + 2 * hd + 2 * h;
            2 * 264 * h + h + l * (qkv + o + ffn + norms)
        };
        for (name, [h, l, nh, kv, f, _]) in PRESETS {
            assert_eq!(count(name), by_hand(h, l, nh, kv, f), "{name}");
        }
        // Sanity anchors on the ternary body.
        let c7 = TritterConfig::preset("7B", 264).unwrap();
        assert_eq!(
            c7.ternary_parameter_count(),
            32 * (4096 * 48 * 128 + 4096 * 4096 + 3 * 4096 * 11008)
        );
        let c125 = TritterConfig::preset("125M", 264).unwrap();
        assert_eq!(
            c125.ternary_parameter_count(),
            12 * (768 * 768 * 4 + 3 * 768 * 3072)
        );
    }

    #[test]
    fn causal_future_tokens_do_not_change_past_logits() {
        let device = Default::default();
        let model = tiny().init::<TestBackend>(&device);
        let a = Tensor::<TestBackend, 2, Int>::from_data([[10, 20, 30, 40, 50, 60]], &device);
        let b = Tensor::<TestBackend, 2, Int>::from_data([[10, 20, 30, 41, 99, 7]], &device);
        let la = model.forward(a, None).narrow(1, 0, 3);
        let lb = model.forward(b, None).narrow(1, 0, 3);
        la.into_data()
            .assert_approx_eq::<f32>(&lb.into_data(), Default::default());
        // And a changed past token does change later logits.
        let c = Tensor::<TestBackend, 2, Int>::from_data([[11, 20, 30, 40, 50, 60]], &device);
        let a = Tensor::<TestBackend, 2, Int>::from_data([[10, 20, 30, 40, 50, 60]], &device);
        let diff = (model.forward(a, None) - model.forward(c, None))
            .abs()
            .max()
            .into_scalar();
        assert!(diff > 1e-4);
    }

    #[test]
    fn document_masks_keep_attention_within_documents() {
        let device = Default::default();
        let model = tiny().init::<TestBackend>(&device);
        // Two packed documents: positions 0–2 and 3–5; the first differs between a and b.
        let documents = Some(Arc::new(vec![0, 0, 0, 1, 1, 1]));
        let a = || Tensor::<TestBackend, 2, Int>::from_data([[10, 20, 30, 40, 50, 60]], &device);
        let b = || Tensor::<TestBackend, 2, Int>::from_data([[11, 99, 31, 40, 50, 60]], &device);
        let la = model
            .forward_with(a(), None, documents.clone())
            .narrow(1, 3, 3);
        let lb = model.forward_with(b(), None, documents).narrow(1, 3, 3);
        la.into_data()
            .assert_approx_eq::<f32>(&lb.into_data(), Default::default());
        // Without the mask the second document sees the first.
        let diff = (model.forward(a(), None) - model.forward(b(), None))
            .narrow(1, 3, 3)
            .abs()
            .max()
            .into_scalar();
        assert!(diff > 1e-4);
    }

    #[test]
    fn sliding_window_bounds_what_a_token_sees() {
        let device = Default::default();
        let config = TritterConfig {
            sliding_window: Some(2),
            num_layers: 1,
            ..tiny()
        };
        let model = config.init::<TestBackend>(&device);
        // With one layer and window 2, position 4 sees positions 3 and 4 only.
        let a = Tensor::<TestBackend, 2, Int>::from_data([[10, 20, 30, 40, 50]], &device);
        let b = Tensor::<TestBackend, 2, Int>::from_data([[99, 98, 97, 40, 50]], &device);
        let la = model.forward(a, None).narrow(1, 4, 1);
        let lb = model.forward(b, None).narrow(1, 4, 1);
        la.into_data()
            .assert_approx_eq::<f32>(&lb.into_data(), Default::default());
    }

    #[test]
    fn gqa_with_kv_equal_heads_is_multi_head_attention() {
        // With num_kv_heads == num_heads, GQA's repeat is the identity: the layer equals
        // plain multi-head attention computed head by head.
        use burn::tensor::module::attention as mha;
        let device = Default::default();
        let config = TritterConfig {
            num_kv_heads: 4,
            num_layers: 1,
            ..tiny()
        };
        let model = config.init::<TestBackend>(&device);
        let attn = &model.blocks[0].attn;
        let x = Tensor::<TestBackend, 3>::random(
            [2, 5, 64],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let rope = Rope::new(16, config.rope_theta, 0, [2, 4, 4, 5], &device);
        let ours = attn.forward(x.clone(), &rope, None);
        // Reference: explicit per-head attention with a causal mask.
        let qkv = attn.qkv.forward(x);
        let heads = |s: usize| {
            qkv.clone()
                .narrow(2, s * 16, 4 * 16)
                .reshape([2, 5, 4, 16])
                .swap_dims(1, 2)
        };
        let q = rope.q.apply(attn.q_norm.forward(heads(0)));
        let k = rope.k.apply(attn.k_norm.forward(heads(4)));
        let v = heads(8);
        let reference = mha(
            q,
            k,
            v,
            None,
            None,
            burn::tensor::ops::AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            },
        );
        let reference = attn
            .out
            .forward(reference.swap_dims(1, 2).reshape([2, 5, 64]));
        ours.into_data()
            .assert_approx_eq::<f32>(&reference.into_data(), Default::default());
    }

    #[test]
    fn grouped_query_heads_share_keys() {
        // kv_heads = 1: every query head attends over the same keys and values.
        let device = Default::default();
        let config = TritterConfig {
            num_kv_heads: 1,
            ..tiny()
        };
        let model = config.init::<TestBackend>(&device);
        let tokens = Tensor::<TestBackend, 2, Int>::from_data([[1, 2, 3, 4]], &device);
        let logits = model.forward(tokens, None);
        assert_eq!(logits.dims(), [1, 4, 264]);
        assert!(logits.is_finite().all().into_scalar());
    }
}

//! The key/value cache of incremental decoding: per layer, the post-RoPE keys and the
//! values of every position seen so far, `[batch, kv_heads, len, head_dim]`.

use burn::prelude::*;
use burn::tensor::FloatDType;

/// One layer's cached keys and values, stored in f32 or f16.
#[derive(Debug, Clone, Default)]
pub struct LayerCache<B: Backend> {
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    half: bool,
}

impl<B: Backend> LayerCache<B> {
    /// Appends new keys and values and returns all of them (in f32).
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let store = |t: Tensor<B, 4>| {
            if self.half {
                t.cast(FloatDType::F16)
            } else {
                t
            }
        };
        let (k, v) = (store(k), store(v));
        let (k, v) = match self.kv.take() {
            Some((ck, cv)) => (Tensor::cat(vec![ck, k], 2), Tensor::cat(vec![cv, v], 2)),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        if self.half {
            (k.cast(FloatDType::F32), v.cast(FloatDType::F32))
        } else {
            (k, v)
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let per = if self.half { 2 } else { 4 };
        self.kv.as_ref().map_or(0, |(k, v)| {
            per * (k.shape().num_elements() + v.shape().num_elements())
        })
    }
}

/// Every layer's cache and the number of positions it holds.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self::with_half_precision(num_layers, false)
    }

    /// A cache that stores keys and values in f16 (`half`) or f32.
    pub fn with_half_precision(num_layers: usize, half: bool) -> Self {
        Self {
            layers: (0..num_layers)
                .map(|_| LayerCache { kv: None, half })
                .collect(),
            len: 0,
        }
    }

    /// Bytes held by every layer.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerCache<B> {
        &mut self.layers[layer]
    }

    pub fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}

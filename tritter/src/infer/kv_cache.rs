//! The key/value cache of incremental decoding: per layer, the post-RoPE keys and the
//! values of every position seen so far, `[batch, kv_heads, len, head_dim]` on the
//! device in f32 or f16, written in place into buffers reserved for the positions the
//! generation will reach; or, for one sequence, KIVI INT4 codes — in device memory where
//! the backend has the kernels (`TritterBackend::device_int4_kv_cache`: CUDA, wgpu), in
//! host memory ([`tritter_kernels::kv_int4`]) elsewhere, as are the f32 and f16 caches on
//! the CPU, appended in place — with decode attention that reads them directly.

use super::budget::{KvCacheType, INT4_GROUP, INT4_RECENT_WINDOW};
use burn::prelude::*;
use burn::tensor::{FloatDType, TensorCreationOptions};
use tritter_kernels::kv_int4::{DeviceKvCache, Int4KvCache};
use tritter_kernels::TritterBackend;

#[derive(Debug, Clone)]
enum Stored<B: Backend> {
    Empty,
    /// Keys and values of `len` positions at the front of buffers
    /// `[batch, kv_heads, capacity, head_dim]`.
    Dense {
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        len: usize,
    },
    Host(Int4KvCache, B::Device),
    Device(Box<dyn DeviceKvCache<B>>),
}

/// An unwritten buffer for `positions` of keys or values like `t`'s
/// (`[batch, kv_heads, _, head_dim]`, its device and dtype).
fn buffer_like<B: Backend>(t: &Tensor<B, 4>, positions: usize) -> Tensor<B, 4> {
    let [batch, kv_heads, _, head_dim] = t.dims();
    let options = TensorCreationOptions::new(t.device()).with_dtype(t.dtype());
    Tensor::empty([batch, kv_heads, positions, head_dim], options)
}

/// `buffer` with `values` (`[batch, kv_heads, n, head_dim]`) at positions `at..at + n`.
fn write_at<B: Backend>(buffer: Tensor<B, 4>, at: usize, values: Tensor<B, 4>) -> Tensor<B, 4> {
    let [batch, kv_heads, n, head_dim] = values.dims();
    buffer.slice_assign([0..batch, 0..kv_heads, at..at + n, 0..head_dim], values)
}

/// One layer's cached keys and values.
#[derive(Debug, Clone)]
pub struct LayerCache<B: TritterBackend> {
    stored: Stored<B>,
    kind: KvCacheType,
    /// Positions a dense cache reserves when it is first written (at least those
    /// written then; it doubles if they run out).
    reserve: usize,
}

fn host(t: Tensor<impl Backend, 4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 keys and values")
}

impl<B: TritterBackend> LayerCache<B> {
    /// A cache for `reserve` positions (0 if unknown: it grows as they come).
    pub fn new(kind: KvCacheType, reserve: usize) -> Self {
        Self {
            stored: Stored::Empty,
            kind,
            reserve,
        }
    }

    /// Stores new keys and values, `[batch, kv_heads, new, head_dim]` (batch 1 for INT4).
    pub fn push(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        let [batch, kv_heads, new, head_dim] = k.dims();
        // Full precision in host memory, appended in place, where the device is the host.
        let host_full = self.kind != KvCacheType::Int4 && B::host_kv_cache() && batch == 1;
        if self.kind == KvCacheType::Int4 || host_full {
            assert_eq!(batch, 1, "the INT4 KV cache holds one sequence");
            if matches!(self.stored, Stored::Empty) {
                // INT4 codes on the device where it has the kernels, else in host memory.
                let device = (!host_full)
                    .then(|| {
                        B::device_int4_kv_cache(
                            kv_heads,
                            head_dim,
                            INT4_GROUP,
                            INT4_RECENT_WINDOW,
                            &k.device(),
                        )
                    })
                    .flatten();
                self.stored = match device {
                    Some(cache) => Stored::Device(cache),
                    None if host_full => {
                        let cache = match self.kind {
                            KvCacheType::F16 => Int4KvCache::f16_only(kv_heads, head_dim),
                            _ => Int4KvCache::f32_only(kv_heads, head_dim),
                        };
                        Stored::Host(cache, k.device())
                    }
                    None => Stored::Host(
                        Int4KvCache::new(kv_heads, head_dim, INT4_GROUP, INT4_RECENT_WINDOW),
                        k.device(),
                    ),
                };
            }
            match &mut self.stored {
                Stored::Device(cache) => {
                    let shape = [kv_heads, new, head_dim];
                    cache.append(k.reshape(shape), v.reshape(shape));
                }
                Stored::Host(cache, _) => cache.append(&host(k), &host(v), new),
                _ => unreachable!("an INT4 or host layer holds its cache"),
            }
            return;
        }
        let (k, v) = if self.kind == KvCacheType::F16 {
            (k.cast(FloatDType::F16), v.cast(FloatDType::F16))
        } else {
            (k, v)
        };
        let (mut keys, mut values, len) = match std::mem::replace(&mut self.stored, Stored::Empty) {
            Stored::Dense { keys, values, len } => (keys, values, len),
            _ => {
                let reserve = self.reserve.max(new);
                (buffer_like(&k, reserve), buffer_like(&v, reserve), 0)
            }
        };
        let capacity = keys.dims()[2];
        if len + new > capacity {
            // More positions than reserved: twice the room, the cached ones copied over.
            let capacity = (2 * capacity).max(len + new);
            let grow = |buffer: Tensor<B, 4>| {
                write_at(buffer_like(&buffer, capacity), 0, buffer.narrow(2, 0, len))
            };
            (keys, values) = (grow(keys), grow(values));
        }
        // In place: the cache holds the buffers' only handles once the last step's
        // attention has read them.
        keys = write_at(keys, len, k);
        values = write_at(values, len, v);
        self.stored = Stored::Dense {
            keys,
            values,
            len: len + new,
        };
    }

    /// Every cached key and value in f32 (INT4 codes dequantized).
    pub fn keys_values(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match &self.stored {
            Stored::Empty => panic!("keys and values read from an empty cache"),
            Stored::Dense { keys, values, len } => {
                let held = |t: &Tensor<B, 4>| {
                    let t = t.clone().narrow(2, 0, *len);
                    match self.kind {
                        KvCacheType::F16 => t.cast(FloatDType::F32),
                        _ => t,
                    }
                };
                (held(keys), held(values))
            }
            Stored::Host(cache, device) => {
                let (keys, values) = cache.dequantize();
                let shape = [1, cache.kv_heads(), cache.len(), cache.head_dim()];
                let tensor = |x: Vec<f32>| Tensor::from_data(TensorData::new(x, shape), device);
                (tensor(keys), tensor(values))
            }
            Stored::Device(cache) => {
                let (keys, values) = cache.dequantize();
                (keys.unsqueeze(), values.unsqueeze())
            }
        }
    }

    /// Decode attention of one position's queries `[num_heads, head_dim]` read straight
    /// from an INT4 cache (or the CPU's host f16 cache), to every cached token or the
    /// last `window`: `[num_heads, head_dim]`. `None` for a dense cache, which the
    /// model's attention reads instead.
    pub fn decode_attention(
        &self,
        queries: Tensor<B, 2>,
        window: Option<usize>,
    ) -> Option<Tensor<B, 2>> {
        match &self.stored {
            Stored::Host(cache, device) => {
                let [heads, head_dim] = queries.dims();
                let q: Vec<f32> = queries
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .expect("f32 queries");
                let out = cache.decode_attention(&q, heads, window);
                Some(Tensor::from_data(
                    TensorData::new(out, [heads, head_dim]),
                    device,
                ))
            }
            Stored::Device(cache) => Some(cache.decode_attention(queries, window)),
            _ => None,
        }
    }

    /// Whether the layer holds a cache in host memory (INT4, or the CPU's f16).
    pub fn is_host(&self) -> bool {
        matches!(self.stored, Stored::Host(..))
    }

    /// The cache in host memory, where the layer holds one ([`LayerCache::is_host`]).
    pub fn host_mut(&mut self) -> Option<&mut Int4KvCache> {
        match &mut self.stored {
            Stored::Host(cache, _) => Some(cache),
            _ => None,
        }
    }

    /// Whether the keys and values live in the device's memory: a dense cache, or INT4
    /// codes with the device's kernels (not the host-memory INT4 or f16 cache).
    pub fn on_device(&self) -> bool {
        matches!(self.stored, Stored::Dense { .. } | Stored::Device(_))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.stored {
            Stored::Empty => 0,
            Stored::Dense { keys, values, .. } => {
                let per = if self.kind == KvCacheType::F16 { 2 } else { 4 };
                per * (keys.shape().num_elements() + values.shape().num_elements())
            }
            Stored::Host(cache, _) => cache.bytes(),
            Stored::Device(cache) => cache.bytes(),
        }
    }
}

/// Every layer's cache and the number of positions it holds.
#[derive(Debug, Clone)]
pub struct KvCache<B: TritterBackend> {
    layers: Vec<LayerCache<B>>,
    len: usize,
}

impl<B: TritterBackend> KvCache<B> {
    /// An f32 cache for `reserve` positions (0 if unknown).
    pub fn new(num_layers: usize, reserve: usize) -> Self {
        Self::with_storage(num_layers, KvCacheType::F32, reserve)
    }

    /// A cache that stores keys and values as `kind`, for `reserve` positions (a dense
    /// cache's buffers hold that many from the start; 0 if unknown).
    pub fn with_storage(num_layers: usize, kind: KvCacheType, reserve: usize) -> Self {
        Self {
            layers: (0..num_layers)
                .map(|_| LayerCache::new(kind, reserve))
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// A dense cache (two sequences: not the CPU's host cache) written in place holds
    /// exactly what appending every step's keys and values holds, whether it reserved
    /// enough positions, too few (it grows) or none; it holds the positions reserved.
    fn dense_cache_appends_in_place_and_grows<B: TritterBackend>(device: B::Device) {
        let (batch, kv_heads, head_dim) = (2, 3, 8);
        for kind in [KvCacheType::F32, KvCacheType::F16] {
            for reserve in [0, 5, 16] {
                let mut cache = LayerCache::<B>::new(kind, reserve);
                let (mut keys, mut values) = (Vec::new(), Vec::new());
                for new in [3, 1, 1, 4, 1] {
                    let shape = [batch, kv_heads, new, head_dim];
                    let k = Tensor::<B, 4>::random(shape, Distribution::Normal(0., 1.), &device);
                    let v = Tensor::<B, 4>::random(shape, Distribution::Normal(0., 1.), &device);
                    cache.push(k.clone(), v.clone());
                    keys.push(k);
                    values.push(v);
                    let (got_k, got_v) = cache.keys_values();
                    let expected = |parts: &[Tensor<B, 4>]| {
                        let all = Tensor::cat(parts.to_vec(), 2);
                        match kind {
                            KvCacheType::F16 => all.cast(FloatDType::F16).cast(FloatDType::F32),
                            _ => all,
                        }
                    };
                    for (got, want) in [(got_k, expected(&keys)), (got_v, expected(&values))] {
                        assert_eq!(got.dims(), want.dims(), "{kind} reserving {reserve}");
                        got.into_data().assert_eq(&want.into_data(), true);
                    }
                }
                assert!(cache.on_device());
                let per = if kind == KvCacheType::F16 { 2 } else { 4 };
                // 10 positions: reserved, or doubled from 5 (or from the first 3 to 6 to 12).
                let capacity = match reserve {
                    16 => 16,
                    5 => 10,
                    _ => 12,
                };
                assert_eq!(
                    cache.bytes(),
                    per * 2 * batch * kv_heads * capacity * head_dim,
                    "{kind} reserving {reserve}"
                );
            }
        }
    }

    #[test]
    fn dense_cache_on_the_cpu() {
        dense_cache_appends_in_place_and_grows::<crate::TestBackend>(Default::default());
    }

    /// On a CubeCL backend (wgpu: lavapipe in CI), where the buffers are written in place
    /// when the cache holds their only handles.
    #[test]
    fn dense_cache_on_wgpu() {
        use burn::backend::wgpu::{Wgpu, WgpuDevice};
        dense_cache_appends_in_place_and_grows::<Wgpu>(WgpuDevice::Cpu);
    }
}

//! `tritter bench kv-cache`: one layer's decode attention against a long cache, with the
//! cache in f32 and f16 as device tensors (Burn's attention op; `f16-dev` casts the cache
//! to f32 at every call) and in host memory as f16 and KIVI INT4 (the fused host kernel,
//! what the engine uses on the CPU), on keys and values shaped like a trained model's.

use super::budget::{INT4_GROUP, INT4_RECENT_WINDOW};
use anyhow::Result;
use burn::prelude::*;
use burn::tensor::FloatDType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;
use tritter_kernels::kv_int4::Int4KvCache;
use tritter_kernels::TritterBackend;

/// The shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub struct KvBenchShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One context length's figures.
#[derive(Debug, Clone)]
pub struct KvBenchRow {
    pub context: usize,
    /// `(storage, seconds per decode attention call, bytes of cache read)`.
    pub timings: Vec<(&'static str, f64, usize)>,
    /// Relative L2 error of INT4 attention against f32.
    pub int4_error: f32,
    /// Tokens quantized per second while filling the INT4 cache.
    pub quantize_tokens_per_sec: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..iters)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Runs the benchmark at each context length with `iters` timed calls per storage.
impl KvBenchShape {
    /// Refuses a shape the caches cannot hold, naming the constraint it breaks.
    pub fn check(&self) -> Result<()> {
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        anyhow::ensure!(
            nkv > 0 && nh % nkv == 0,
            "{nkv} kv heads must divide the {nh} query heads (each serves a whole group)"
        );
        anyhow::ensure!(
            d % 2 == 0,
            "head dim {d} must be even (the INT4 cache packs two codes to a byte)"
        );
        Ok(())
    }
}

pub fn bench_kv_cache<B: TritterBackend>(
    shape: KvBenchShape,
    contexts: &[usize],
    iters: usize,
    device: &B::Device,
) -> Result<Vec<KvBenchRow>> {
    shape.check()?;
    let KvBenchShape {
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
    } = shape;
    let mut rng = StdRng::seed_from_u64(11);
    let mut rows = Vec::new();
    for &n in contexts {
        // Keys with four outlier channels, values with a per-channel offset, queries
        // leaning towards two earlier keys per head.
        let offset: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let keys: Vec<f32> = (0..nkv * n * d)
            .map(|i| rng.random_range(-1.0f32..1.0) * if i % d < 4 { 8.0 } else { 1.0 })
            .collect();
        let values: Vec<f32> = (0..nkv * n * d)
            .map(|i| offset[i % d] + 0.5 * rng.random_range(-1.0f32..1.0))
            .collect();
        let mut q: Vec<f32> = (0..nh * d)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        for h in 0..nh {
            for _ in 0..2 {
                let t = rng.random_range(0..n);
                let key = &keys[((h / (nh / nkv)) * n + t) * d..][..d];
                for (qc, kc) in q[h * d..(h + 1) * d].iter_mut().zip(key) {
                    *qc += 0.5 * kc;
                }
            }
        }

        let start = Instant::now();
        let mut int4 = Int4KvCache::new(nkv, d, INT4_GROUP, INT4_RECENT_WINDOW);
        int4.append(&keys, &values, n);
        let quantize_tokens_per_sec = n as f64 / start.elapsed().as_secs_f64();

        // The engine's decode: the query heads of a key/value head as one group of rows.
        let (keys_host, values_host) = (keys.clone(), values.clone());
        let k = Tensor::<B, 4>::from_data(TensorData::new(keys, [1, nkv, n, d]), device);
        let v = Tensor::<B, 4>::from_data(TensorData::new(values, [1, nkv, n, d]), device);
        let qt =
            Tensor::<B, 4>::from_data(TensorData::new(q.clone(), [1, nkv, nh / nkv, d]), device);
        let dense = |k: Tensor<B, 4>, v: Tensor<B, 4>| {
            B::tritter_attention(qt.clone(), k, v, None, false).reshape([nh * d])
        };
        let exact: Vec<f32> = dense(k.clone(), v.clone()).into_data().to_vec()?;
        let f32_secs = time(iters, || {
            let out = dense(k.clone(), v.clone());
            B::sync(device).ok();
            std::hint::black_box(out);
        });
        let (k16, v16) = (
            k.clone().cast(FloatDType::F16),
            v.clone().cast(FloatDType::F16),
        );
        let f16_secs = time(iters, || {
            let out = dense(
                k16.clone().cast(FloatDType::F32),
                v16.clone().cast(FloatDType::F32),
            );
            B::sync(device).ok();
            std::hint::black_box(out);
        });
        drop((k, v, k16, v16));
        let mut host16 = Int4KvCache::f16_only(nkv, d);
        host16.append(&keys_host, &values_host, n);
        drop((keys_host, values_host));
        let host16_secs = time(iters, || {
            std::hint::black_box(host16.decode_attention(&q, nh, None));
        });
        let host16_bytes = host16.bytes();
        drop(host16);
        let got = int4.decode_attention(&q, nh, None);
        let int4_secs = time(iters, || {
            std::hint::black_box(int4.decode_attention(&q, nh, None));
        });
        let num: f32 = got.iter().zip(&exact).map(|(a, b)| (a - b).powi(2)).sum();
        let den: f32 = exact.iter().map(|b| b * b).sum();
        let elements = 2 * nkv * n * d;
        rows.push(KvBenchRow {
            context: n,
            timings: vec![
                ("f32", f32_secs, 4 * elements),
                ("f16-dev", f16_secs, 2 * elements),
                ("f16", host16_secs, host16_bytes),
                ("int4", int4_secs, int4.bytes()),
            ],
            int4_error: (num / den).sqrt(),
            quantize_tokens_per_sec,
        });
    }
    Ok(rows)
}

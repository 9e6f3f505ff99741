//! Tokens/s of one training step (forward + backward + clipping + AdamW) on the CPU
//! backend, for the `test` and `125M` presets at sequence 256, batch 8, byte vocabulary,
//! with the implied GFLOP/s (6 · parameters · tokens/s) against the f32 matmul rate
//! measured in the same run.
//!
//! `cargo bench --bench train_step` (set `TRITTER_BENCH_PRESETS=test` to skip 125M).

use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::{Duration, Instant};
use tritter::model::TritterConfig;
use tritter::train::step::clip_global_norm;

type B = Autodiff<Flex>;

const SEQ: usize = 256;
const BATCH: usize = 8;

/// f32 matmul GFLOP/s on 1024×1024×1024, the machine's reference rate.
fn matmul_gflops() -> f64 {
    let device = Default::default();
    let a = Tensor::<Flex, 2>::random([1024, 1024], Distribution::Normal(0.0, 1.0), &device);
    let b = Tensor::<Flex, 2>::random([1024, 1024], Distribution::Normal(0.0, 1.0), &device);
    let _ = a.clone().matmul(b.clone()).into_data();
    let iters = 20;
    let start = Instant::now();
    for _ in 0..iters {
        let _ = a.clone().matmul(b.clone()).into_data();
    }
    2.0 * 1024f64.powi(3) * iters as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn bench_train_step(c: &mut Criterion) {
    let presets = std::env::var("TRITTER_BENCH_PRESETS").unwrap_or_else(|_| "test,125M".into());
    let peak = matmul_gflops();
    println!("f32 matmul 1024³ on Flex: {peak:.1} GFLOP/s");
    let mut group = c.benchmark_group("train_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(20));
    for preset in presets.split(',') {
        let device = Default::default();
        let config = TritterConfig::preset(preset, 264).expect("preset");
        let params = config.parameter_count() as f64;
        let mut model = config.init::<B>(&device);
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
        let inputs =
            Tensor::<B, 2, Int>::random([BATCH, SEQ], Distribution::Uniform(8.0, 263.0), &device);
        let targets =
            Tensor::<B, 2, Int>::random([BATCH, SEQ], Distribution::Uniform(8.0, 263.0), &device);
        let tokens = (BATCH * SEQ) as u64;
        group.throughput(Throughput::Elements(tokens));
        let mut times = Vec::new();
        group.bench_function(preset, |b| {
            b.iter(|| {
                let start = Instant::now();
                let loss = model.loss(inputs.clone(), targets.clone(), None);
                let mut grads = GradientsParams::from_grads(loss.backward(), &model);
                clip_global_norm::<B, _>(&model, &mut grads, 1.0);
                model = optim.step(1e-3, model.clone(), grads);
                times.push(start.elapsed().as_secs_f64());
            })
        });
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let tps = tokens as f64 / median;
        let gflops = 6.0 * params * tps / 1e9;
        println!(
            "{preset}: {params:.3e} params, {tps:.0} tokens/s, {gflops:.1} GFLOP/s = {:.0}% of matmul peak",
            100.0 * gflops / peak
        );
    }
    group.finish();
}

criterion_group!(benches, bench_train_step);
criterion_main!(benches);

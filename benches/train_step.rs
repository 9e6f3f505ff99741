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
    // As `train` runs: freed step buffers stay in the heap.
    tritter::memory::retain_freed_buffers();
    if std::env::var_os("TRITTER_BENCH_OPS").is_some() {
        op_breakdown();
    }
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
        // Where a step's time goes: the median of each phase over a few more steps.
        let mut phases = [(); 4].map(|_| Vec::new());
        for _ in 0..5 {
            let start = Instant::now();
            let loss = model.loss(inputs.clone(), targets.clone(), None);
            let _ = loss.clone().into_scalar();
            let forward = start.elapsed();
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            let backward = start.elapsed();
            clip_global_norm::<B, _>(&model, &mut grads, 1.0);
            let clip = start.elapsed();
            model = optim.step(1e-3, model.clone(), grads);
            let step = start.elapsed();
            for (phase, t) in
                phases
                    .iter_mut()
                    .zip([forward, backward - forward, clip - backward, step - clip])
            {
                phase.push(t.as_secs_f64() * 1e3);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let [f, b, c, o] = phases.each_mut().map(median);
        println!(
            "{preset}: forward {f:.1} ms, backward {b:.1} ms, clip {c:.1} ms, AdamW {o:.1} ms"
        );
    }
    group.finish();
}

/// Forward and forward + backward times of each part of one block of the `test` preset
/// at the bench's shape, on `Autodiff<Flex>` (set `TRITTER_BENCH_OPS=1`).
fn op_breakdown() {
    use tritter::model::attention::{attend, contiguous, Heads, Rope};
    use tritter::model::bitlinear::rms_norm;
    use tritter::model::ffn::squared_relu_gate;
    use tritter_kernels::TritterBackend;
    let device = Default::default();
    let config = TritterConfig::preset("test", 264).expect("preset");
    let model = config.init::<B>(&device);
    let block = &model.blocks[0];
    let h = config.hidden_size;
    let rope = Rope::<B>::new(
        config.head_dim(),
        config.rope_theta,
        0,
        [BATCH, config.num_heads, config.num_kv_heads, SEQ],
        &device,
    );
    let input = |width: usize| {
        Tensor::<B, 3>::random([BATCH, SEQ, width], Distribution::Normal(0.0, 1.0), &device)
            .require_grad()
    };
    let time = |name: &str, width: usize, op: &dyn Fn(Tensor<B, 3>) -> Tensor<B, 3>| {
        let (mut fwd, mut both) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            let x = input(width);
            let start = Instant::now();
            let y = op(x);
            let _ = y.clone().sum().into_scalar();
            fwd.push(start.elapsed().as_secs_f64() * 1e3);
            let _ = y.sum().backward();
            both.push(start.elapsed().as_secs_f64() * 1e3);
        }
        fwd.sort_by(f64::total_cmp);
        both.sort_by(f64::total_cmp);
        println!(
            "{name:<24} forward {:>7.2} ms  forward+backward {:>7.2} ms",
            fwd[3], both[3]
        );
    };
    let heads = Heads::new(&config);
    time("qkv BitLinear", h, &|x| block.attn.qkv.forward(x));
    time("attend", config.qkv_size(), &|x| {
        attend(
            x,
            &block.attn.q_norm,
            &block.attn.k_norm,
            heads,
            &rope,
            None,
        )
    });
    let (nh, hd) = (config.num_heads, config.head_dim());
    let heads4 = |x: Tensor<B, 3>| x.reshape([BATCH, SEQ, nh, hd]).swap_dims(1, 2);
    time("flex_attention", h, &|x| {
        let mask = tritter_kernels::AttentionMask::new(tritter_kernels::MaskMod::causal());
        let q = contiguous(heads4(x));
        B::flex_attention(q.clone(), q.clone(), q, &mask)
            .swap_dims(1, 2)
            .reshape([BATCH, SEQ, h])
    });
    time("rope", h, &|x| {
        let q = contiguous(heads4(x));
        rope.q.apply(q).swap_dims(1, 2).reshape([BATCH, SEQ, h])
    });
    time("heads split + merge", h, &|x| {
        contiguous(heads4(x))
            .swap_dims(1, 2)
            .reshape([BATCH, SEQ, h])
    });
    time("out BitLinear", h, &|x| block.attn.out.forward(x));
    time("rms_norm", h, &|x| rms_norm(&block.attn_norm, x));
    time("residual add", h, &|x| x.clone() + x);
    time("gate_up BitLinear", h, &|x| block.ffn.gate_up.forward(x));
    time("squared_relu_gate", 2 * config.ffn_size, &|x| {
        squared_relu_gate(x, config.ffn_size)
    });
    time("down BitLinear", config.ffn_size, &|x| {
        block.ffn.down.forward(x)
    });
    time("whole block", h, &|x| block.forward(x, &rope, None));
}

criterion_group!(benches, bench_train_step);
criterion_main!(benches);

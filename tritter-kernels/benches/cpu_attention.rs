//! The CPU backend's flash attention (`tritter_kernels::cpu`) against Burn's attention op
//! on the same backend: forward, and forward + backward through autodiff, causal, at the
//! training shape of the `test` preset (batch 8, 4 heads of 64, sequence 256) and at
//! longer sequences; GFLOP/s count the unmasked half of `4·q·kv·d` per head forward and
//! 2.5× that backward.
//!
//! `cargo bench -p tritter-kernels --bench cpu_attention`

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;
use tritter_kernels::{reference, AttentionMask, MaskMod, TritterBackend};

fn bench(c: &mut Criterion) {
    let device = Default::default();
    let mut group = c.benchmark_group("cpu_attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let mask = AttentionMask::new(MaskMod::causal());
    for (batch, heads, seq, d) in [(8, 4, 256, 64), (1, 8, 2048, 64), (1, 4, 8192, 64)] {
        let shape = [batch, heads, seq, d];
        let flops = 4.0 * (batch * heads) as f64 * (seq * seq) as f64 / 2.0 * d as f64;
        let x = || Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v) = (x(), x(), x());
        let name = format!("b{batch} h{heads} s{seq} d{d}");
        let report = |what: &str, seconds: f64, flops: f64| {
            println!(
                "{name} {what}: {:.2} ms, {:.1} GFLOP/s",
                seconds * 1e3,
                flops / seconds / 1e9
            )
        };
        let time = |f: &dyn Fn()| {
            f();
            let start = std::time::Instant::now();
            let n = 3;
            for _ in 0..n {
                f();
            }
            start.elapsed().as_secs_f64() / n as f64
        };
        let flash = time(&|| {
            let _ = Flex::flex_attention(q.clone(), k.clone(), v.clone(), &mask).into_data();
        });
        report("flash forward", flash, flops);
        if seq <= 2048 {
            let dense = time(&|| {
                let _ =
                    reference::flex_attention(q.clone(), k.clone(), v.clone(), &mask).into_data();
            });
            report("Burn attention forward", dense, flops);
        }
        type A = Autodiff<Flex>;
        let both = time(&|| {
            let [q, k, v] = [&q, &k, &v]
                .map(|t| Tensor::<A, 4>::from_data(t.to_data(), &device).require_grad());
            let out = A::flex_attention(q.clone(), k, v, &mask);
            let grads = out.sum().backward();
            let _ = q.grad(&grads).unwrap().into_data();
        });
        report("flash forward + backward", both, 3.5 * flops);
        group.bench_function(format!("flash forward {name}"), |b| {
            b.iter(|| Flex::flex_attention(q.clone(), k.clone(), v.clone(), &mask).into_data())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

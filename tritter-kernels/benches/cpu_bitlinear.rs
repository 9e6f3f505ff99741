//! BitLinear's training forward on the CPU at the shapes of the `test` and `125M` presets
//! (2048 tokens): the integer product of `tritter_kernels::int8` (AVX-512 VNNI) against
//! the `f32` product of the dequantized operands, each with its quantization, and the
//! products alone. GOP/s count `2·tokens·in·out`.
//!
//! `cargo bench -p tritter-kernels --bench cpu_bitlinear`

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tritter_kernels::{cpu, int8};

const TOKENS: usize = 2048;

fn median_seconds(f: &dyn Fn()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..9)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[4]
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_bitlinear");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let vnni = int8::available();
    if !vnni {
        println!("no AVX-512 VNNI on this CPU: BitLinear uses the f32 product");
    }
    for (d_in, d_out) in [
        (256, 768),
        (256, 1024),
        (512, 256),
        (768, 2304),
        (3072, 768),
    ] {
        let x: Vec<f32> = (0..TOKENS * d_in)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
            .collect();
        let w: Vec<f32> = (0..d_in * d_out)
            .map(|i| ((i * 104_729 % 1000) as f32 - 500.0) / 10_000.0)
            .collect();
        let gamma = w.iter().map(|v| v.abs()).sum::<f32>() / w.len() as f32;
        let ops = 2.0 * (TOKENS * d_in * d_out) as f64;
        let name = format!("{TOKENS}×{d_in}×{d_out}");
        let report = |what: &str, seconds: f64| {
            println!(
                "{name} {what:<28} {:>7.2} ms  {:>6.1} GOP/s",
                seconds * 1e3,
                ops / seconds / 1e9
            )
        };
        let f32_forward = || {
            let xq = cpu::quantize_activations(&x, d_in);
            let wq = cpu::quantize_weights(&w, gamma);
            cpu::matmul(
                cpu::Matrix::new(&xq, TOKENS, d_in),
                cpu::Matrix::new(&wq, d_in, d_out),
            )
        };
        report(
            "f32: quantize + product",
            median_seconds(&|| {
                black_box(f32_forward());
            }),
        );
        let (xq, wq) = (
            cpu::quantize_activations(&x, d_in),
            cpu::quantize_weights(&w, gamma),
        );
        report(
            "f32: product",
            median_seconds(&|| {
                black_box(cpu::matmul(
                    cpu::Matrix::new(&xq, TOKENS, d_in),
                    cpu::Matrix::new(&wq, d_in, d_out),
                ));
            }),
        );
        if vnni {
            let int8_forward = || {
                let (acts, _) = int8::quantize_activations(&x, d_in);
                let (panels, _) = int8::quantize_weights(&w, d_in, d_out, gamma);
                int8::matmul(&acts, TOKENS, &panels, gamma)
            };
            report(
                "int8: quantize + product",
                median_seconds(&|| {
                    black_box(int8_forward());
                }),
            );
            report(
                "int8: quantize activations",
                median_seconds(&|| {
                    black_box(int8::quantize_activations(&x, d_in));
                }),
            );
            report(
                "int8: quantize weights",
                median_seconds(&|| {
                    black_box(int8::quantize_weights(&w, d_in, d_out, gamma));
                }),
            );
            let (acts, _) = int8::quantize_activations(&x, d_in);
            let (panels, _) = int8::quantize_weights(&w, d_in, d_out, gamma);
            report(
                "int8: product",
                median_seconds(&|| {
                    black_box(int8::matmul(&acts, TOKENS, &panels, gamma));
                }),
            );
            group.bench_function(format!("int8 {name}"), |b| {
                b.iter(|| black_box(int8_forward()))
            });
        }
        group.bench_function(format!("f32 {name}"), |b| {
            b.iter(|| black_box(f32_forward()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

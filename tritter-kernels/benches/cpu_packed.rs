//! The packed ternary product of inference on the CPU, each kernel this CPU runs
//! (portable, AVX2, AVX-512 VNNI), at the layer shapes of the `1B` and `3B` presets, for
//! 1 token (decode) and 16 (a batch, or a prefill tile), with the weights in cache, in
//! the CPU layout and in place in the export's rows; and one token in place from memory. G multiply-adds/s count `tokens·d_in·d_out`. Also the
//! rearrangement of the export's rows into that layout by each transposer, in bytes of
//! codes per second.
//!
//! `cargo bench -p tritter-kernels --bench cpu_packed`

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Duration;
use tritter_kernels::packed::{
    cpu_gemm_with, interleave, interleave_with, panel_words, Codes, Kernel, Transpose,
};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_packed");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    // (d_in, d_out): 1B's attention and FFN up/down, 3B's FFN down.
    for (d_in, d_out) in [
        (2048usize, 2048usize),
        (2048, 5632),
        (5632, 2048),
        (6912, 2560),
    ] {
        let row_bytes = d_in.div_ceil(4);
        // Codes 0, 1, 2 (weights −1, 0, +1) in a fixed scatter.
        let bytes: Vec<u8> = (0..d_out * row_bytes)
            .map(|i| {
                let b = (i * 2_654_435_761usize) >> 7;
                (0..4).fold(0u8, |acc, k| {
                    acc | ((((b >> (3 * k)) % 3) as u8) << (2 * k))
                })
            })
            .collect();
        let mut words = vec![0u32; panel_words(d_out, d_in)];
        interleave(&bytes, d_out, d_in, &mut words);
        // Rearranging the export's rows into the CPU layout, in bytes of codes.
        group.throughput(criterion::Throughput::Bytes(bytes.len() as u64));
        for transpose in Transpose::supported() {
            group.bench_function(format!("interleave {transpose:?} {d_out}×{d_in}"), |b| {
                b.iter(|| interleave_with(transpose, black_box(&bytes), d_out, d_in, &mut words))
            });
        }
        for tokens in [1, 16] {
            let x: Vec<f32> = (0..tokens * d_in)
                .map(|i| ((i * 7919) % 255) as f32 - 127.0)
                .collect();
            group.throughput(criterion::Throughput::Elements(
                (tokens * d_in * d_out) as u64,
            ));
            for kernel in Kernel::supported() {
                for (place, codes) in [
                    ("", Codes::Panels(&words)),
                    (" in place", Codes::Rows(&bytes)),
                ] {
                    group.bench_function(
                        format!("{kernel:?}{place} {tokens}×{d_in}×{d_out}"),
                        |b| {
                            b.iter(|| {
                                black_box(cpu_gemm_with(
                                    kernel,
                                    black_box(&x),
                                    tokens,
                                    codes,
                                    d_out,
                                    d_in,
                                    1.0,
                                ))
                            })
                        },
                    );
                }
            }
        }
    }
    // One token in place from memory, as a streamed layer's product runs: enough
    // copies of 3B's FFN up-projection (in 4 KiB pages, as a file's are mapped) to pass
    // through memory rather than the caches, one after another.
    let (d_in, d_out) = (2560usize, 13824usize);
    let matrix: Vec<u8> = (0..d_out * d_in / 4)
        .map(|i| (i % 81) as u8 & 0x55)
        .collect();
    let copies: Vec<Vec<u8>> = (0..(256usize << 20).div_ceil(matrix.len()))
        .map(|_| matrix.clone())
        .collect();
    let x: Vec<f32> = (0..d_in)
        .map(|i| ((i * 7919) % 255) as f32 - 127.0)
        .collect();
    group.throughput(criterion::Throughput::Elements((d_in * d_out) as u64));
    for kernel in Kernel::supported() {
        let mut next = 0;
        group.bench_function(
            format!("{kernel:?} in place from memory 1×{d_in}×{d_out}"),
            |b| {
                b.iter(|| {
                    next = (next + 1) % copies.len();
                    let codes = Codes::Rows(&copies[next]);
                    black_box(cpu_gemm_with(
                        kernel,
                        black_box(&x),
                        1,
                        codes,
                        d_out,
                        d_in,
                        1.0,
                    ))
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

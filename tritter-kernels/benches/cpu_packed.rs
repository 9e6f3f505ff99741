//! The packed ternary product of inference on the CPU, each kernel this CPU runs
//! (portable, AVX2, AVX-VNNI, AVX-512 VNNI, AMX), at the layer shapes of the `1B` and
//! `3B` presets, for 1 token (decode) and 16 (a batch, or a prefill tile), with the
//! weights in cache, in the CPU layout and in place in the export's rows; and one token
//! in place from memory, in 2 MiB and in 4 KiB pages. G multiply-adds/s count
//! `tokens·d_in·d_out`. Also the rearrangement of the export's rows into that layout by
//! each transposer, in bytes of codes per second.
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
    // copies of 3B's FFN up-projection to pass through memory rather than the caches,
    // one after another; in 2 MiB pages, as the streaming engine maps a model file on a
    // filesystem with large folios (ext4, XFS), and in 4 KiB pages, as elsewhere.
    let (d_in, d_out) = (2560usize, 13824usize);
    let matrix: Vec<u8> = (0..d_out * d_in / 4)
        .map(|i| (i % 81) as u8 & 0x55)
        .collect();
    let x: Vec<f32> = (0..d_in)
        .map(|i| ((i * 7919) % 255) as f32 - 127.0)
        .collect();
    group.throughput(criterion::Throughput::Elements((d_in * d_out) as u64));
    for huge in [true, false] {
        let memory = Copies::new(&matrix, 256 << 20, huge);
        let pages = if huge { "2 MiB" } else { "4 KiB" };
        for kernel in Kernel::supported() {
            let mut next = 0;
            group.bench_function(
                format!("{kernel:?} in place from memory ({pages} pages) 1×{d_in}×{d_out}"),
                |b| {
                    b.iter(|| {
                        next = (next + 1) % memory.count;
                        let codes = Codes::Rows(memory.copy(next));
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
    }
    group.finish();
}

/// Copies of a matrix, side by side from a 2 MiB boundary, backed by 2 MiB or 4 KiB
/// pages (on Linux; elsewhere by whatever the allocator gives).
struct Copies {
    memory: Vec<u8>,
    first: usize,
    matrix: usize,
    count: usize,
}

impl Copies {
    fn new(matrix: &[u8], bytes: usize, huge: bool) -> Self {
        const HUGE: usize = 2 << 20;
        let count = bytes.div_ceil(matrix.len());
        // Zeroed by mapping fresh pages: none is touched before the advice.
        let mut memory = vec![0u8; count * matrix.len() + HUGE];
        let first = memory.as_ptr().align_offset(HUGE);
        #[cfg(target_os = "linux")]
        // SAFETY: advice on pages of `memory`, which changes how they are backed, never
        // their contents.
        unsafe {
            let advice = if huge {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            let start = memory.as_mut_ptr().add(first);
            libc::madvise(start.cast(), memory.len() - first, advice);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = huge;
        for copy in memory[first..].chunks_exact_mut(matrix.len()) {
            copy.copy_from_slice(matrix);
        }
        Self {
            memory,
            first,
            matrix: matrix.len(),
            count,
        }
    }

    fn copy(&self, i: usize) -> &[u8] {
        &self.memory[self.first + i * self.matrix..][..self.matrix]
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

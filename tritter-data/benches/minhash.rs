//! MinHash signatures over real code, 256 permutations over the same 5-gram shingles,
//! bytes of source per second on one core, and the estimation error of each against the
//! exact Jaccard of edited copies: the pipeline's `MinHasher` (`minhash-rs` with FNV),
//! `minhash-rs` with its default SipHash-1-3, and the multiply-shift universal hashing
//! (`(a·x + b) >> 32` per permutation) Tritter used before, kept here as the baseline
//! that chose between them.
//!
//!     cargo bench -p tritter-data --bench minhash

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use minhash_rs::min_hasher::MinHasher as _;
use minhash_rs::prelude::*;
use tritter_data::dedup::{estimated_jaccard, into_set, shingles, sorted_jaccard, MinHasher};

type Sip256 = MinHash<u32, 256>;

/// Multiply-shift permutations of 32-bit shingle hashes.
struct MultiplyShift {
    a: Vec<u64>,
    b: Vec<u64>,
}

impl MultiplyShift {
    fn new(num_perm: usize, seed: u64) -> Self {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = state;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        let a = (0..num_perm).map(|_| next() | 1).collect();
        let b = (0..num_perm).map(|_| next()).collect();
        Self { a, b }
    }

    fn signature(&self, shingles: &[u64]) -> Vec<u32> {
        let mut sig = vec![u32::MAX; self.a.len()];
        for &s in shingles {
            let x = (s ^ (s >> 32)) & 0xffff_ffff;
            for ((m, &a), &b) in sig.iter_mut().zip(&self.a).zip(&self.b) {
                *m = (*m).min((a.wrapping_mul(x).wrapping_add(b) >> 32) as u32);
            }
        }
        sig
    }
}

/// The Rust sources of this workspace.
fn corpus() -> Vec<Vec<u8>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut docs = Vec::new();
    let mut dirs = vec![
        root.join("tritter/src"),
        root.join("tritter-data/src"),
        root.join("tritter-kernels/src"),
    ];
    while let Some(dir) = dirs.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                docs.push(std::fs::read(&path).unwrap());
            }
        }
    }
    docs
}

/// Every `k`-th line replaced.
fn edited(doc: &[u8], k: usize) -> Vec<u8> {
    String::from_utf8_lossy(doc)
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i % k == 0 {
                format!("// edit {i}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// Mean absolute error of each estimator against the exact Jaccard over edited copies.
fn report_accuracy(docs: &[Vec<u8>], ours: &MinHasher, old: &MultiplyShift) {
    let (mut e_ours, mut e_old, mut e_sip, mut n) = (0.0, 0.0, 0.0, 0);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for doc in docs.iter().filter(|d| d.len() > 2000) {
        for k in [3, 5, 10, 25] {
            let copy = edited(doc, k);
            shingles(doc, 5, &mut a);
            shingles(&copy, 5, &mut b);
            let exact = sorted_jaccard(&into_set(a.clone()), &into_set(b.clone()));
            let mut scratch = Vec::new();
            let est = estimated_jaccard(
                &ours.signature(doc, &mut scratch),
                &ours.signature(&copy, &mut scratch),
            );
            let sa: Sip256 = a.iter().copied().collect();
            let sb: Sip256 = b.iter().copied().collect();
            e_ours += (est - exact).abs();
            e_old += (estimated_jaccard(&old.signature(&a), &old.signature(&b)) - exact).abs();
            e_sip += (sa.estimate_jaccard_index(&sb) - exact).abs();
            n += 1;
        }
    }
    let n = n as f64;
    eprintln!(
        "mean |estimate - exact Jaccard| over {n} edited pairs: MinHasher (minhash-rs FNV) {:.4}, minhash-rs SipHash-1-3 {:.4}, multiply-shift {:.4}",
        e_ours / n,
        e_sip / n,
        e_old / n
    );
}

fn signatures(c: &mut Criterion) {
    let docs = corpus();
    let bytes: usize = docs.iter().map(Vec::len).sum();
    let ours = MinHasher::new(256, 5, 0x7472_6974);
    let old = MultiplyShift::new(256, 0x7472_6974);
    report_accuracy(&docs, &ours, &old);
    let mut group = c.benchmark_group("minhash 256 perms, 5-gram shingles");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.sample_size(10);
    group.bench_function("MinHasher (minhash-rs FNV)", |bench| {
        let mut scratch = Vec::new();
        bench.iter(|| {
            docs.iter()
                .map(|d| ours.signature(d, &mut scratch)[0] as u64)
                .sum::<u64>()
        })
    });
    group.bench_function("multiply-shift", |bench| {
        let mut scratch = Vec::new();
        bench.iter(|| {
            docs.iter()
                .map(|d| {
                    shingles(d, 5, &mut scratch);
                    old.signature(&scratch)[0] as u64
                })
                .sum::<u64>()
        })
    });
    group.bench_function("minhash-rs SipHash-1-3", |bench| {
        let mut scratch = Vec::new();
        bench.iter(|| {
            docs.iter()
                .map(|d| {
                    shingles(d, 5, &mut scratch);
                    let s: Sip256 = scratch.iter().copied().collect();
                    s.into_words()[0] as u64
                })
                .sum::<u64>()
        })
    });
    group.finish();
}

criterion_group!(benches, signatures);
criterion_main!(benches);

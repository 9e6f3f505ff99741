//! `tritter-data bench dedup`: exact and near-dedup over real code, one core, with the
//! precision and recall of near-dedup against exact Jaccard similarity.
//!
//! Recall needs the true duplicate pairs, which no LSH setting finds exhaustively; the
//! reference set is a deterministic sample of the pairs sharing a band under a much
//! looser LSH (64 bands of 4 rows: a pair of Jaccard 0.5 collides with probability 0.98),
//! each scored by exact Jaccard on its shingle sets. A pair is called a duplicate when
//! near-dedup put both documents in one cluster — what decides that one of them is
//! dropped.

use crate::dedup::{
    band_key, cluster_documents, exact_similarity, DedupConfig, MinHasher, Verdict,
};
use crate::document::fnv1a;
use std::collections::{HashMap, HashSet};
use std::time::Instant;
use xxhash_rust::xxh3::xxh3_128;

/// What the benchmark measured.
#[derive(Debug, Clone, Default)]
pub struct DedupBench {
    pub documents: usize,
    pub bytes: u64,
    pub exact_duplicates: usize,
    pub exact_mb_per_sec: f64,
    pub signature_mb_per_sec: f64,
    pub cluster_secs: f64,
    pub near_duplicates: usize,
    pub bands: usize,
    pub rows: usize,
    /// Pairs that shared a band and were checked.
    pub candidate_pairs: u64,
    /// Reference pairs scored by exact Jaccard, and of those at or above the threshold.
    pub pairs_scored: usize,
    pub true_pairs: usize,
    pub precision: f64,
    pub recall: f64,
    /// Peak resident set of the process, bytes (Linux).
    pub peak_rss: Option<u64>,
}

/// Candidate pairs `(i < j)` sharing at least one of `bands` bands of `rows` rows.
fn band_pairs(signatures: &[Vec<u32>], bands: usize, rows: usize) -> HashSet<(u32, u32)> {
    let mut pairs = HashSet::new();
    for band in 0..bands {
        let mut buckets: HashMap<u64, Vec<u32>> = HashMap::new();
        for (i, sig) in signatures.iter().enumerate() {
            if sig[0] == u32::MAX {
                continue;
            }
            buckets
                .entry(band_key(sig, band, rows))
                .or_default()
                .push(i as u32);
        }
        for bucket in buckets.values() {
            // Bound the quadratic blow-up of huge buckets (boilerplate shared by
            // thousands of files): pairs with their first 64 members only.
            for (x, &i) in bucket.iter().enumerate().take(64) {
                for &j in &bucket[x + 1..] {
                    pairs.insert((i, j));
                }
            }
        }
    }
    pairs
}

/// Runs the benchmark over `docs` (contents in pipeline order), scoring up to
/// `max_pairs` reference pairs.
pub fn bench_dedup(docs: &[Vec<u8>], config: &DedupConfig, max_pairs: usize) -> DedupBench {
    let bytes: u64 = docs.iter().map(|d| d.len() as u64).sum();
    let mb = bytes as f64 / 1e6;
    let mut out = DedupBench {
        documents: docs.len(),
        bytes,
        ..Default::default()
    };

    let start = Instant::now();
    let mut seen = HashSet::new();
    let unique: Vec<&Vec<u8>> = docs.iter().filter(|d| seen.insert(xxh3_128(d))).collect();
    out.exact_mb_per_sec = mb / start.elapsed().as_secs_f64();
    out.exact_duplicates = docs.len() - unique.len();

    let hasher = MinHasher::new(config.num_perm, config.ngram, config.seed);
    let mut scratch = Vec::new();
    let start = Instant::now();
    let signatures: Vec<Vec<u32>> = unique
        .iter()
        .map(|d| hasher.signature(d, &mut scratch))
        .collect();
    let unique_mb = unique.iter().map(|d| d.len()).sum::<usize>() as f64 / 1e6;
    out.signature_mb_per_sec = unique_mb / start.elapsed().as_secs_f64();

    let contents: Vec<&[u8]> = unique.iter().map(|d| d.as_slice()).collect();
    let start = Instant::now();
    let (verdicts, stats) = cluster_documents(&signatures, &contents, config);
    out.cluster_secs = start.elapsed().as_secs_f64();
    out.near_duplicates = verdicts.iter().filter(|v| **v != Verdict::Keep).count();
    (out.bands, out.rows) = (stats.bands, stats.rows);
    out.candidate_pairs = stats.candidate_pairs;
    let cluster = |i: u32| match verdicts[i as usize] {
        Verdict::Keep => i as usize,
        Verdict::DuplicateOf { kept, .. } => kept,
    };

    // Reference pairs under a loose LSH, a deterministic sample of them, exact Jaccard;
    // a pair is called a duplicate when near-dedup put both in one cluster.
    let mut reference: Vec<(u32, u32)> = band_pairs(&signatures, 64, 4).into_iter().collect();
    reference.sort_unstable_by_key(|&(i, j)| {
        (fnv1a(&[i.to_le_bytes(), j.to_le_bytes()].concat()), i, j)
    });
    reference.truncate(max_pairs);
    let mut exact = exact_similarity(&contents, config.ngram);
    let (mut tp, mut fp, mut fneg) = (0usize, 0usize, 0usize);
    for &(i, j) in &reference {
        let truth = exact(i as usize, j as usize) >= config.threshold;
        let duplicate = cluster(i) == cluster(j);
        match (truth, duplicate) {
            (true, true) => tp += 1,
            (false, true) => fp += 1,
            (true, false) => fneg += 1,
            _ => {}
        }
    }
    out.pairs_scored = reference.len();
    out.true_pairs = tp + fneg;
    out.precision = tp as f64 / (tp + fp).max(1) as f64;
    out.recall = tp as f64 / (tp + fneg).max(1) as f64;
    out.peak_rss = crate::rss::peak();
    out
}

//! Exact and near-duplicate detection (BigCode's recipe): MinHash over 5-gram shingles of
//! the tokens left when splitting on non-alphanumerics, LSH with bands × rows chosen for
//! the Jaccard threshold, candidate pairs checked against the full signatures, union-find
//! clusters, and the first document of each cluster (in pipeline order) kept.
//!
//! The permutations are multiply-add-shift hashes (Dietzfelbinger) of a 32-bit shingle
//! hash: `h_i(x) = (a_i·x + b_i) mod 2⁶⁴ ≫ 32`, strongly universal, and a loop over 256 of
//! them per shingle vectorizes, which is what makes signatures cheap.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Near-dedup settings (the recipe's `[dedup]` table).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Drop byte-identical documents.
    #[serde(default = "yes")]
    pub exact: bool,
    /// Drop near-duplicates.
    #[serde(default = "yes")]
    pub near: bool,
    /// Jaccard similarity from which two documents are duplicates.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// MinHash permutations.
    #[serde(default = "default_num_perm")]
    pub num_perm: usize,
    /// Tokens per shingle.
    #[serde(default = "default_ngram")]
    pub ngram: usize,
    /// How a candidate pair (sharing an LSH band) is confirmed: `exact` computes the
    /// Jaccard similarity of the two shingle sets, `signature` estimates it from the
    /// MinHash signatures (no shingle sets kept; noisier near the threshold).
    #[serde(default)]
    pub verify: Verify,
    /// LSH bands and rows; chosen for `threshold` when absent.
    pub bands: Option<usize>,
    pub rows: Option<usize>,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

/// See [`DedupConfig::verify`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Verify {
    #[default]
    Exact,
    Signature,
}

fn yes() -> bool {
    true
}
fn default_threshold() -> f64 {
    0.7
}
fn default_num_perm() -> usize {
    256
}
fn default_ngram() -> usize {
    5
}
fn default_seed() -> u64 {
    42
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            exact: true,
            near: true,
            threshold: default_threshold(),
            num_perm: default_num_perm(),
            ngram: default_ngram(),
            verify: Verify::Exact,
            bands: None,
            rows: None,
            seed: default_seed(),
        }
    }
}

impl DedupConfig {
    /// What is wrong with the settings, if anything.
    pub fn problem(&self) -> Option<String> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Some(format!(
                "`dedup.threshold` is {}; expected a Jaccard similarity in (0, 1]",
                self.threshold
            ));
        }
        if !NUM_PERMS.contains(&self.num_perm) {
            return Some(format!(
                "`dedup.num_perm` is {}; expected one of {NUM_PERMS:?}",
                self.num_perm
            ));
        }
        if self.ngram == 0 {
            return Some("`dedup.ngram` must be at least 1".into());
        }
        match (self.bands, self.rows) {
            (Some(b), Some(r)) if b * r > self.num_perm || b == 0 || r == 0 => Some(format!(
                "`dedup.bands` × `dedup.rows` = {b} × {r} must be between 1 and num_perm = {}",
                self.num_perm
            )),
            (Some(_), None) | (None, Some(_)) => {
                Some("give both `dedup.bands` and `dedup.rows`, or neither".into())
            }
            _ => None,
        }
    }

    /// `(bands, rows)`: the recipe's, or [`recall_first_lsh_params`].
    pub fn lsh_params(&self) -> (usize, usize) {
        match (self.bands, self.rows) {
            (Some(b), Some(r)) => (b, r),
            _ => recall_first_lsh_params(self.threshold, self.num_perm),
        }
    }
}

/// The most selective bands × rows (most rows, as many bands as fit) under which a pair
/// at the threshold still becomes a candidate with probability ≥ 0.99. Candidates are
/// confirmed afterwards, so extra candidates cost a check while a missed pair is a
/// duplicate kept — the opposite trade from [`optimal_lsh_params`], which puts a pair at
/// the threshold at even odds.
pub fn recall_first_lsh_params(threshold: f64, num_perm: usize) -> (usize, usize) {
    (1..=num_perm)
        .rev()
        .map(|r| (num_perm / r, r))
        .find(|&(b, r)| collision_probability(threshold, b, r) >= 0.99)
        .unwrap_or((num_perm, 1))
}

/// The probability that two documents of Jaccard `s` share at least one of `b` bands of
/// `r` rows: `1 − (1 − sʳ)ᵇ`.
pub fn collision_probability(s: f64, bands: usize, rows: usize) -> f64 {
    1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32)
}

/// Bands × rows (≤ `num_perm`) minimizing the area under the collision curve below the
/// threshold (false positives) plus the area above it not collided (false negatives),
/// equally weighted — datasketch's `optimal_param`.
pub fn optimal_lsh_params(threshold: f64, num_perm: usize) -> (usize, usize) {
    let integrate = |f: &dyn Fn(f64) -> f64, lo: f64, hi: f64| {
        let steps = 200;
        let h = (hi - lo) / steps as f64;
        (0..steps)
            .map(|i| f(lo + (i as f64 + 0.5) * h) * h)
            .sum::<f64>()
    };
    let mut best = (f64::INFINITY, (1, 1));
    for b in 1..=num_perm {
        for r in 1..=num_perm / b {
            let fp = integrate(&|s| collision_probability(s, b, r), 0.0, threshold);
            let fneg = integrate(&|s| 1.0 - collision_probability(s, b, r), threshold, 1.0);
            if fp + fneg < best.0 {
                best = (fp + fneg, (b, r));
            }
        }
    }
    best.1
}

/// A 64-bit mix (splitmix64's finalizer).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a over a token's bytes.
fn token_hash(bytes: &[u8]) -> u64 {
    crate::document::fnv1a(bytes)
}

/// The hashes of a document's shingles: `ngram` consecutive tokens, tokens being maximal
/// runs of ASCII alphanumerics (and any non-ASCII bytes). A document with fewer tokens
/// has one shingle of all of them; one with none has none.
pub fn shingles(content: &[u8], ngram: usize, out: &mut Vec<u64>) {
    out.clear();
    let mut tokens: Vec<u64> = Vec::with_capacity(content.len() / 4);
    let mut start = None;
    for (i, &b) in content.iter().enumerate() {
        let word = b.is_ascii_alphanumeric() || b >= 0x80;
        match (word, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                tokens.push(token_hash(&content[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        tokens.push(token_hash(&content[s..]));
    }
    if tokens.is_empty() {
        return;
    }
    let n = ngram.min(tokens.len());
    for window in tokens.windows(n) {
        let h = window
            .iter()
            .fold(0x9e37_79b9_7f4a_7c15u64, |h, &t| mix(h ^ t));
        out.push(h);
    }
}

/// Permutation counts [`MinHasher`] supports (`minhash-rs` fixes them at compile time).
pub const NUM_PERMS: [usize; 4] = [64, 128, 256, 512];

/// Computes MinHash signatures with `num_perm` permutations through `minhash-rs`
/// (`MinHash<u32, P, Fnv>`): as accurate as multiply-shift permutations and 11%
/// faster on real code (`cargo bench -p tritter-data --bench minhash`). The seed is mixed
/// into every shingle hash, so seeds give independent hash families.
#[derive(Debug, Clone)]
pub struct MinHasher {
    num_perm: usize,
    ngram: usize,
    seed: u64,
}

type Sketch<const P: usize> = minhash_rs::prelude::MinHash<u32, P, minhash_rs::hasher::Fnv>;

impl MinHasher {
    /// `num_perm` must be one of [`NUM_PERMS`] (recipes are checked for it).
    pub fn new(num_perm: usize, ngram: usize, seed: u64) -> Self {
        assert!(
            NUM_PERMS.contains(&num_perm),
            "num_perm {num_perm} is not one of {NUM_PERMS:?}"
        );
        Self {
            num_perm,
            ngram,
            seed: mix(seed),
        }
    }

    pub fn num_perm(&self) -> usize {
        self.num_perm
    }

    /// The signature of `content`: per permutation, the smallest permuted shingle hash
    /// (`u32::MAX` everywhere for a document without tokens).
    pub fn signature(&self, content: &[u8], scratch: &mut Vec<u64>) -> Vec<u32> {
        shingles(content, self.ngram, scratch);
        let values = scratch.iter().map(|&s| s ^ self.seed);
        match self.num_perm {
            64 => values.collect::<Sketch<64>>().into_words().to_vec(),
            128 => values.collect::<Sketch<128>>().into_words().to_vec(),
            256 => values.collect::<Sketch<256>>().into_words().to_vec(),
            512 => values.collect::<Sketch<512>>().into_words().to_vec(),
            n => unreachable!("num_perm {n} checked in new"),
        }
    }
}

/// The LSH bucket of a signature in band `band` of `rows` rows.
pub fn band_key(signature: &[u32], band: usize, rows: usize) -> u64 {
    signature[band * rows..(band + 1) * rows]
        .iter()
        .fold(band as u64, |h, &v| mix(h ^ v as u64))
}

/// The fraction of equal signature positions: an unbiased estimate of Jaccard.
pub fn estimated_jaccard(a: &[u32], b: &[u32]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// Exact Jaccard similarity of two shingle lists (any order, repeats allowed).
pub fn exact_jaccard(a: &[u64], b: &[u64]) -> f64 {
    sorted_jaccard(&into_set(a.to_vec()), &into_set(b.to_vec()))
}

/// Sorted and deduplicated.
pub fn into_set(mut list: Vec<u64>) -> Vec<u64> {
    list.sort_unstable();
    list.dedup();
    list
}

/// Jaccard similarity of two sorted, deduplicated sets.
pub fn sorted_jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut inter) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - inter;
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Disjoint sets over `0..n`, the smaller index as each set's root.
#[derive(Debug, Clone)]
pub struct UnionFind {
    parent: Vec<usize>,
}

impl UnionFind {
    pub fn new(n: usize) -> Self {
        Self {
            parent: (0..n).collect(),
        }
    }

    pub fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    pub fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = (ra.min(rb), ra.max(rb));
            self.parent[hi] = lo;
        }
    }
}

/// What near-dedup decided for one document.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Keep,
    /// In the cluster of the kept document `kept`; `matched` is the document whose
    /// similarity to this one reached the threshold (`kept` itself when the clusters were
    /// joined through others), with that `similarity`.
    DuplicateOf {
        kept: usize,
        matched: usize,
        similarity: f64,
    },
}

/// Near-dedup statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NearDedupStats {
    pub bands: usize,
    pub rows: usize,
    /// Pairs that shared a band bucket.
    pub candidate_pairs: u64,
    /// Of those, pairs whose signatures agree on at least the threshold.
    pub confirmed_pairs: u64,
}

/// Clusters documents by their signatures (in pipeline order) and keeps the first of each
/// cluster. A candidate pair (sharing a band) joins a cluster only when `similarity(i, j)`
/// reaches the threshold — the exact Jaccard of their shingle sets, or the signatures'
/// estimate ([`signature_similarity`]).
pub fn near_dedup(
    signatures: &[Vec<u32>],
    config: &DedupConfig,
    mut similarity: impl FnMut(usize, usize) -> f64,
) -> (Vec<Verdict>, NearDedupStats) {
    let (bands, rows) = config.lsh_params();
    let mut stats = NearDedupStats {
        bands,
        rows,
        ..Default::default()
    };
    let mut clusters = Clusters::new(signatures.len(), config.threshold);
    let mut members = Vec::new();
    for band in 0..bands {
        let mut buckets: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, sig) in signatures.iter().enumerate() {
            if sig.first() == Some(&u32::MAX) {
                continue; // no tokens
            }
            buckets
                .entry(band_key(sig, band, rows))
                .or_default()
                .push(i);
        }
        let mut keys: Vec<u64> = buckets.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            members.clone_from(&buckets[&key]);
            clusters.bucket(&members, &mut similarity);
        }
    }
    let (verdicts, counts) = clusters.verdicts(&mut similarity);
    stats.candidate_pairs = counts.candidate_pairs;
    stats.confirmed_pairs = counts.confirmed_pairs;
    (verdicts, stats)
}

/// Union-find clustering of documents `0..n` from LSH buckets, fed one bucket at a time
/// in any number of bands (in memory by [`near_dedup`], from sorted runs on disk by the
/// build's merge): every member of a bucket is compared with the earlier members until
/// one reaches the threshold, skipping those already in its cluster. Buckets fed in the
/// same order give the same clusters wherever they come from.
pub struct Clusters {
    sets: UnionFind,
    matched: Vec<Option<(usize, f64)>>,
    threshold: f64,
    stats: NearDedupStats,
}

impl Clusters {
    pub fn new(n: usize, threshold: f64) -> Self {
        Self {
            sets: UnionFind::new(n),
            matched: vec![None; n],
            threshold,
            stats: NearDedupStats::default(),
        }
    }

    /// One bucket's members, ascending.
    pub fn bucket(&mut self, members: &[usize], similarity: &mut impl FnMut(usize, usize) -> f64) {
        for (p, &i) in members.iter().enumerate() {
            for &j in &members[..p] {
                if self.sets.find(i) == self.sets.find(j) {
                    continue;
                }
                self.stats.candidate_pairs += 1;
                let s = similarity(j, i);
                if s >= self.threshold {
                    self.stats.confirmed_pairs += 1;
                    self.sets.union(i, j);
                    self.matched[i].get_or_insert((j, s));
                    break;
                }
            }
        }
    }

    /// The first document of each cluster stays; the others are its duplicates.
    pub fn verdicts(
        mut self,
        similarity: &mut impl FnMut(usize, usize) -> f64,
    ) -> (Vec<Verdict>, NearDedupStats) {
        let n = self.matched.len();
        let verdicts = (0..n)
            .map(|i| {
                let root = self.sets.find(i);
                if root == i {
                    return Verdict::Keep;
                }
                let (matched, similarity) = match self.matched[i] {
                    Some(m) => m,
                    None => (root, similarity(root, i)),
                };
                Verdict::DuplicateOf {
                    kept: root,
                    matched,
                    similarity,
                }
            })
            .collect();
        (verdicts, self.stats)
    }
}

/// [`near_dedup`] confirming candidates as `config.verify` says.
pub fn cluster_documents(
    signatures: &[Vec<u32>],
    contents: &[&[u8]],
    config: &DedupConfig,
) -> (Vec<Verdict>, NearDedupStats) {
    match config.verify {
        Verify::Exact => near_dedup(signatures, config, exact_similarity(contents, config.ngram)),
        Verify::Signature => near_dedup(signatures, config, signature_similarity(signatures)),
    }
}

/// The similarity of two documents estimated from their signatures.
pub fn signature_similarity(signatures: &[Vec<u32>]) -> impl FnMut(usize, usize) -> f64 + '_ {
    |i, j| estimated_jaccard(&signatures[i], &signatures[j])
}

/// The exact Jaccard similarity of two documents' shingle sets, each computed once, on
/// first use.
pub fn exact_similarity<'a>(
    contents: &'a [&'a [u8]],
    ngram: usize,
) -> impl FnMut(usize, usize) -> f64 + 'a {
    let mut sets: HashMap<usize, Vec<u64>> = HashMap::new();
    move |i, j| {
        for k in [i, j] {
            sets.entry(k).or_insert_with(|| {
                let mut s = Vec::new();
                shingles(contents[k], ngram, &mut s);
                into_set(s)
            });
        }
        sorted_jaccard(&sets[&i], &sets[&j])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real code: this file, edited to known degrees.
    fn base() -> Vec<u8> {
        include_bytes!("dedup.rs").to_vec()
    }

    /// Replaces every `k`-th line with a new one.
    fn edit(text: &[u8], k: usize, tag: &str) -> Vec<u8> {
        let text = String::from_utf8_lossy(text);
        text.lines()
            .enumerate()
            .map(|(i, l)| {
                if i % k == 0 {
                    format!("let changed_{tag}_{i} = {i} * 7 + unrelated_{tag}();")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes()
    }

    #[test]
    fn bands_and_rows_suit_the_threshold() {
        // datasketch's choice for 256 permutations at 0.7: a pair at the threshold
        // collides at even odds.
        let (b, r) = optimal_lsh_params(0.7, 256);
        assert!(b * r <= 256);
        let knee = (1.0 / b as f64).powf(1.0 / r as f64);
        assert!((knee - 0.7).abs() < 0.08, "({b}, {r}): knee {knee}");
        // Confirmed candidates: a pair at the threshold almost surely a candidate, one
        // at 0.3 rarely.
        let (b, r) = recall_first_lsh_params(0.7, 256);
        assert_eq!((b, r), (42, 6));
        assert!(collision_probability(0.7, b, r) >= 0.99);
        assert!(collision_probability(0.3, b, r) < 0.05);
    }

    #[test]
    fn signatures_estimate_jaccard() {
        let hasher = MinHasher::new(256, 5, 1);
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        let a = base();
        for k in [50, 10, 4, 2] {
            let b = edit(&a, k, "x");
            let sig_a = hasher.signature(&a, &mut sa);
            let sig_b = hasher.signature(&b, &mut sb);
            let exact = exact_jaccard(&sa, &sb);
            let estimate = estimated_jaccard(&sig_a, &sig_b);
            // Standard error √(J(1−J)/256) ≤ 0.031; four of them.
            assert!(
                (exact - estimate).abs() < 0.125,
                "k {k}: {exact} vs {estimate}"
            );
        }
        // Identical content, identical signature; no tokens, the empty signature.
        assert_eq!(hasher.signature(&a, &mut sa), hasher.signature(&a, &mut sb));
        assert!(hasher
            .signature(b"  ;; {} ", &mut sa)
            .iter()
            .all(|&v| v == u32::MAX));
    }

    #[test]
    fn near_duplicates_cluster_and_distinct_files_do_not() {
        let hasher = MinHasher::new(256, 5, 7);
        let a = base();
        let other = include_bytes!("build.rs").to_vec();
        let docs = [
            a.clone(),
            edit(&a, 40, "a"), // a light edit of 0
            other.clone(),
            edit(&a, 2, "b"), // half the lines changed: well below 0.7
            edit(&other, 30, "c"),
            edit(&a, 40, "a"), // identical to 1
        ];
        let mut scratch = Vec::new();
        let sets: Vec<Vec<u64>> = docs
            .iter()
            .map(|d| {
                shingles(d, 5, &mut scratch);
                scratch.clone()
            })
            .collect();
        assert!(exact_jaccard(&sets[0], &sets[1]) > 0.8);
        assert!(exact_jaccard(&sets[0], &sets[3]) < 0.4);
        let sigs: Vec<Vec<u32>> = docs
            .iter()
            .map(|d| hasher.signature(d, &mut scratch))
            .collect();
        let contents: Vec<&[u8]> = docs.iter().map(Vec::as_slice).collect();
        let config = DedupConfig::default();
        let (verdicts, stats) = near_dedup(&sigs, &config, exact_similarity(&contents, 5));
        // The signatures' estimate reaches the same clusters here.
        let (by_signature, _) = near_dedup(&sigs, &config, signature_similarity(&sigs));
        let roots = |v: &[Verdict]| {
            v.iter()
                .map(|v| match v {
                    Verdict::Keep => None,
                    Verdict::DuplicateOf { kept, .. } => Some(*kept),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(roots(&by_signature), roots(&verdicts));
        assert_eq!(verdicts[0], Verdict::Keep);
        assert!(matches!(
            verdicts[1],
            Verdict::DuplicateOf { kept: 0, matched: 0, similarity } if similarity > 0.7
        ));
        assert_eq!(verdicts[2], Verdict::Keep);
        assert_eq!(verdicts[3], Verdict::Keep);
        assert!(matches!(verdicts[4], Verdict::DuplicateOf { kept: 2, .. }));
        // An exact copy of 1 matches 0 or 1 at similarity ≥ 0.7, in 0's cluster.
        assert!(matches!(
            verdicts[5],
            Verdict::DuplicateOf { kept: 0, similarity, .. } if similarity >= 0.7
        ));
        assert!(stats.confirmed_pairs >= 3);
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = DedupConfig {
            threshold: 1.5,
            ..Default::default()
        };
        assert!(bad.problem().unwrap().contains("dedup.threshold"));
        let bad = DedupConfig {
            bands: Some(30),
            rows: Some(10),
            ..Default::default()
        };
        assert!(bad.problem().unwrap().contains("30 × 10"));
        let bad = DedupConfig {
            num_perm: 100,
            ..Default::default()
        };
        assert!(bad.problem().unwrap().contains("`dedup.num_perm` is 100"));
        assert!(DedupConfig::default().problem().is_none());
    }
}

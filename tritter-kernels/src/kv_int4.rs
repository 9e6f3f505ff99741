//! The INT4 key/value cache of one layer of one sequence (KIVI, arXiv 2402.02750), in host
//! memory, with decode attention that reads the 4-bit codes directly.
//!
//! Keys are quantized per channel: a group of `group` consecutive tokens shares, for each
//! channel, an f16 scale and zero point (key outliers live in channels). Values are
//! quantized per token: each token's channels, in groups of `group`, share a scale and
//! zero point. The most recent tokens stay in f16: at least `recent` of them, and a group
//! of keys is quantized only once `recent + group` have gathered, so there are at most
//! `recent + group − 1`. Codes are asymmetric, `x ≈ scale · c + zero` with `c ∈ 0..=15`,
//! two to a byte (low nibble first).
//!
//! Decode attention never dequantizes a key or a value into memory: a query against a
//! key group is `Σ_c (q_c·scale_c)·code_tc + Σ_c q_c·zero_c`, the first factor and the
//! second sum computed once per group; values are accumulated as
//! `Σ_t p_t·scale_t·code_tc + Σ_t p_t·zero_t`.

use crate::cpu::madd;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// The INT4 cache of one layer of one sequence held in a device's memory (the CubeCL
/// backends' [`crate::cube::kv_int4::DeviceInt4KvCache`]): the host cache's layout and
/// numbers, appended and attended to by kernels. Keys and values are
/// `[kv_heads, tokens, head_dim]`.
pub trait DeviceKvCache<B: Backend>: std::fmt::Debug + Send + Sync {
    /// Appends new keys and values, quantizing the oldest recent tokens a group at a time
    /// as [`Int4KvCache::append`] does.
    fn append(&mut self, keys: Tensor<B, 3>, values: Tensor<B, 3>);
    /// Tokens cached.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Tokens held as 4-bit codes.
    fn quantized_len(&self) -> usize;
    /// Device bytes held, the buffers' spare room included.
    fn bytes(&self) -> usize;
    /// Every cached key and value as floats.
    fn dequantize(&self) -> (Tensor<B, 3>, Tensor<B, 3>);
    /// Attention of one position's queries `[num_heads, head_dim]` to every cached token
    /// (or the last `window`), scaled by `1/√head_dim`, the codes dequantized inside the
    /// kernel. Returns `[num_heads, head_dim]`.
    fn decode_attention(&self, queries: Tensor<B, 2>, window: Option<usize>) -> Tensor<B, 2>;
    fn boxed_clone(&self) -> Box<dyn DeviceKvCache<B>>;
}

impl<B: Backend> Clone for Box<dyn DeviceKvCache<B>> {
    fn clone(&self) -> Self {
        self.boxed_clone()
    }
}

/// Tokens per key group and channels per value group (KIVI's G).
pub const DEFAULT_GROUP: usize = 32;
/// Tokens kept in f16 (KIVI's residual length R).
pub const DEFAULT_RECENT: usize = 128;

/// Codes, scales and zero points of one key/value head.
#[derive(Debug, Clone, Default)]
struct Head {
    /// Quantized keys, `[tokens][head_dim / 2]`.
    key_codes: Vec<u8>,
    /// Per key group and channel, `[groups][head_dim]`.
    key_scale: Vec<f16>,
    key_zero: Vec<f16>,
    /// Quantized values, `[tokens][head_dim / 2]`.
    value_codes: Vec<u8>,
    /// Per token and channel group, `[tokens][channel_groups]`.
    value_scale: Vec<f16>,
    value_zero: Vec<f16>,
    /// The most recent keys and values, `[tokens][head_dim]`.
    recent_keys: Window,
    recent_values: Window,
}

/// Keys or values held in full precision, `[tokens][head_dim]`: f16, or f32 for a cache
/// that keeps the model's own numbers ([`Int4KvCache::f32_only`]).
#[derive(Debug, Clone)]
enum Window {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Default for Window {
    fn default() -> Self {
        Self::F16(Vec::new())
    }
}

impl Window {
    fn push(&mut self, new: &[f32]) {
        match self {
            Self::F16(window) => {
                let at = window.len();
                window.resize(at + new.len(), f16::ZERO);
                window[at..].convert_from_f32_slice(new);
            }
            Self::F32(window) => window.extend_from_slice(new),
        }
    }

    /// The `k`-th `[d]` row, as f32.
    #[inline(always)]
    fn row(&self, k: usize, row: &mut [f32]) {
        let d = row.len();
        match self {
            // Eight at a time with the CPU's conversion instructions where it has them.
            Self::F16(window) => window[k * d..(k + 1) * d].convert_to_f32_slice(row),
            Self::F32(window) => row.copy_from_slice(&window[k * d..(k + 1) * d]),
        }
    }

    /// Elements `span`, as f32.
    fn to_f32(&self, span: std::ops::Range<usize>) -> Vec<f32> {
        match self {
            Self::F16(window) => window[span].iter().map(|x| x.to_f32()).collect(),
            Self::F32(window) => window[span].to_vec(),
        }
    }

    /// Drops the first `n` elements.
    fn drain(&mut self, n: usize) {
        match self {
            Self::F16(window) => drop(window.drain(..n)),
            Self::F32(window) => drop(window.drain(..n)),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::F16(window) => 2 * window.len(),
            Self::F32(window) => 4 * window.len(),
        }
    }
}

impl Head {
    /// Quantized key `t` as f32 (`g` tokens per key group).
    fn key_row(&self, t: usize, g: usize, row: &mut [f32]) {
        let d = row.len();
        unpack(&self.key_codes[t * d / 2..(t + 1) * d / 2], row);
        let params = (t / g) * d..(t / g + 1) * d;
        for ((x, s), z) in row
            .iter_mut()
            .zip(&self.key_scale[params.clone()])
            .zip(&self.key_zero[params])
        {
            *x = s.to_f32() * *x + z.to_f32();
        }
    }

    /// Quantized value `t` as f32 (`g` channels per value group).
    #[inline(always)]
    fn value_row(&self, t: usize, g: usize, row: &mut [f32]) {
        let d = row.len();
        let cg = d.div_ceil(g);
        unpack(&self.value_codes[t * d / 2..(t + 1) * d / 2], row);
        for (k, part) in row.chunks_mut(g).enumerate() {
            let (s, z) = (
                self.value_scale[t * cg + k].to_f32(),
                self.value_zero[t * cg + k].to_f32(),
            );
            for x in part {
                *x = s * *x + z;
            }
        }
    }
}

/// One layer's INT4 cache for one sequence: `kv_heads` heads of `head_dim` channels.
#[derive(Debug, Clone)]
pub struct Int4KvCache {
    kv_heads: usize,
    head_dim: usize,
    group: usize,
    recent: usize,
    heads: Vec<Head>,
    /// Tokens held as codes (a multiple of `group`).
    quantized: usize,
    /// Tokens held in f16.
    in_recent: usize,
}

/// `(scale, zero)` in f16 for values in `[lo, hi]`, and the codes' f32 view of them.
fn scale_zero(lo: f32, hi: f32) -> (f16, f16) {
    (f16::from_f32((hi - lo) / 15.0), f16::from_f32(lo))
}

fn code(x: f32, scale: f32, zero: f32) -> u8 {
    if scale > 0.0 {
        ((x - zero) / scale).round().clamp(0.0, 15.0) as u8
    } else {
        0
    }
}

fn set_nibble(bytes: &mut [u8], i: usize, c: u8) {
    bytes[i / 2] |= c << ((i % 2) * 4);
}

impl Int4KvCache {
    /// An empty cache. `head_dim` and `group` must be even (two codes to a byte, and a
    /// byte never straddles two value groups).
    pub fn new(kv_heads: usize, head_dim: usize, group: usize, recent: usize) -> Self {
        assert!(
            head_dim.is_multiple_of(2) && group > 0 && group.is_multiple_of(2),
            "head_dim {head_dim}, group {group}"
        );
        Self {
            kv_heads,
            head_dim,
            group,
            recent,
            heads: vec![Head::default(); kv_heads],
            quantized: 0,
            in_recent: 0,
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.quantized + self.in_recent
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An f16 cache that never quantizes: the same layout and fused decode attention,
    /// every token in the f16 window.
    pub fn f16_only(kv_heads: usize, head_dim: usize) -> Self {
        Self::new(kv_heads, head_dim, DEFAULT_GROUP, usize::MAX)
    }

    /// [`Int4KvCache::f16_only`] in f32: the keys and values exactly as computed,
    /// appended in place and attended to by the same decode attention.
    pub fn f32_only(kv_heads: usize, head_dim: usize) -> Self {
        let mut cache = Self::f16_only(kv_heads, head_dim);
        for head in &mut cache.heads {
            head.recent_keys = Window::F32(Vec::new());
            head.recent_values = Window::F32(Vec::new());
        }
        cache
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Tokens held as 4-bit codes.
    pub fn quantized_len(&self) -> usize {
        self.quantized
    }

    fn channel_groups(&self) -> usize {
        self.head_dim.div_ceil(self.group)
    }

    /// Bytes held (codes, scales and zero points, the full-precision window).
    pub fn bytes(&self) -> usize {
        self.heads
            .iter()
            .map(|h| {
                h.key_codes.len()
                    + h.value_codes.len()
                    + 2 * (h.key_scale.len()
                        + h.key_zero.len()
                        + h.value_scale.len()
                        + h.value_zero.len())
                    + h.recent_keys.bytes()
                    + h.recent_values.bytes()
            })
            .sum()
    }

    /// Appends `tokens` new keys and values, each `[kv_heads][tokens][head_dim]`, and
    /// quantizes the oldest f16 tokens a group at a time while more than
    /// `recent + group − 1` are held.
    pub fn append(&mut self, keys: &[f32], values: &[f32], tokens: usize) {
        let d = self.head_dim;
        assert_eq!(keys.len(), self.kv_heads * tokens * d, "keys");
        assert_eq!(values.len(), self.kv_heads * tokens * d, "values");
        for (h, head) in self.heads.iter_mut().enumerate() {
            let span = h * tokens * d..(h + 1) * tokens * d;
            head.recent_keys.push(&keys[span.clone()]);
            head.recent_values.push(&values[span]);
        }
        self.in_recent += tokens;
        if self.in_recent >= self.recent.saturating_add(self.group) {
            let groups = (self.in_recent - self.recent) / self.group;
            self.quantize_oldest_groups(groups);
        }
    }

    /// Quantizes the oldest `groups` groups of f16 tokens, removing them from the window
    /// in one move.
    fn quantize_oldest_groups(&mut self, groups: usize) {
        let (d, g) = (self.head_dim, self.group);
        for h in 0..self.heads.len() {
            for k in 0..groups {
                let span = k * g * d..(k + 1) * g * d;
                let head = &self.heads[h];
                let keys = head.recent_keys.to_f32(span.clone());
                let values = head.recent_values.to_f32(span);
                self.quantize_group(h, &keys, &values);
            }
            let head = &mut self.heads[h];
            head.recent_keys.drain(groups * g * d);
            head.recent_values.drain(groups * g * d);
        }
        self.quantized += groups * g;
        self.in_recent -= groups * g;
    }

    /// Appends one group's codes, scales and zero points to head `h`.
    fn quantize_group(&mut self, h: usize, keys: &[f32], values: &[f32]) {
        let (d, g, cg) = (self.head_dim, self.group, self.channel_groups());
        let head = &mut self.heads[h];
        // Keys: per channel over the group's tokens.
        let mut codes = vec![0u8; g * d / 2];
        for c in 0..d {
            let column = (0..g).map(|t| keys[t * d + c]);
            let lo = column.clone().fold(f32::INFINITY, f32::min);
            let hi = column.fold(f32::NEG_INFINITY, f32::max);
            let (scale, zero) = scale_zero(lo, hi);
            for t in 0..g {
                let q = code(keys[t * d + c], scale.to_f32(), zero.to_f32());
                set_nibble(&mut codes, t * d + c, q);
            }
            head.key_scale.push(scale);
            head.key_zero.push(zero);
        }
        head.key_codes.extend_from_slice(&codes);
        // Values: per token over groups of channels.
        let mut codes = vec![0u8; g * d / 2];
        for t in 0..g {
            for k in 0..cg {
                let span = t * d + k * self.group..t * d + ((k + 1) * self.group).min(d);
                let part = &values[span.clone()];
                let lo = part.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = part.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (scale, zero) = scale_zero(lo, hi);
                for i in span {
                    let q = code(values[i], scale.to_f32(), zero.to_f32());
                    set_nibble(&mut codes, i, q);
                }
                head.value_scale.push(scale);
                head.value_zero.push(zero);
            }
        }
        head.value_codes.extend_from_slice(&codes);
    }

    /// Every cached key and value dequantized, each `[kv_heads][len][head_dim]` (the
    /// reference for decode attention, and the keys and values prefill attends to).
    pub fn dequantize(&self) -> (Vec<f32>, Vec<f32>) {
        let (d, g) = (self.head_dim, self.group);
        let n = self.len();
        let mut keys = vec![0f32; self.kv_heads * n * d];
        let mut values = vec![0f32; self.kv_heads * n * d];
        for ((head, keys), values) in self
            .heads
            .iter()
            .zip(keys.chunks_mut(n * d))
            .zip(values.chunks_mut(n * d))
        {
            for (t, (k, v)) in keys.chunks_mut(d).zip(values.chunks_mut(d)).enumerate() {
                if t < self.quantized {
                    head.key_row(t, g, k);
                    head.value_row(t, g, v);
                } else {
                    head.recent_keys.row(t - self.quantized, k);
                    head.recent_values.row(t - self.quantized, v);
                }
            }
        }
        (keys, values)
    }

    /// Attention of one new position's queries, `[num_heads][head_dim]` (query head `h`
    /// reads key/value head `h / (num_heads / kv_heads)`), to every cached token, or to
    /// the last `window` of them. Scaled by `1/√head_dim`. Returns `[num_heads][head_dim]`.
    /// The query heads sharing a key/value head are served together: each code is
    /// unpacked once for all of them.
    pub fn decode_attention(
        &self,
        queries: &[f32],
        num_heads: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        let d = self.head_dim;
        assert_eq!(queries.len(), num_heads * d, "queries");
        assert!(
            num_heads.is_multiple_of(self.kv_heads),
            "GQA: {num_heads} query heads"
        );
        let per_kv = num_heads / self.kv_heads;
        let mut out = vec![0f32; num_heads * d];
        out.par_chunks_mut(per_kv * d)
            .zip(queries.par_chunks(per_kv * d))
            .zip(self.heads.par_iter())
            .for_each(|((out, q), head)| self.attend_kv_head(head, q, per_kv, window, out));
        out
    }

    /// `queries` and `out` are `[rows][head_dim]`, the query heads of `head`.
    fn attend_kv_head(
        &self,
        head: &Head,
        queries: &[f32],
        rows: usize,
        window: Option<usize>,
        out: &mut [f32],
    ) {
        let cache = self;
        crate::cpu::dispatch!(attend(
            cache: &Int4KvCache,
            head: &Head,
            queries: &[f32],
            rows: usize,
            window: Option<usize>,
            out: &mut [f32],
        ))
    }
}

/// [`Int4KvCache::attend_kv_head`], with fused multiply-adds where `FMA` (compiled for
/// AVX-512 or AVX2 by [`crate::cpu::dispatch`]): each key and value row is converted once
/// and serves every query head of its key/value head from L1.
#[inline(always)]
fn attend<const FMA: bool>(
    cache: &Int4KvCache,
    head: &Head,
    queries: &[f32],
    rows: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    let (d, g) = (cache.head_dim, cache.group);
    let n = cache.len();
    let first = window.map_or(0, |w| n.saturating_sub(w));
    let scale = 1.0 / (d as f32).sqrt();
    // scores[(t − first)·rows + r]: a token's rows side by side. (Row by row, a stride
    // of `n` floats would put each token's scores in one L1 set where `n` is a multiple
    // of 1024.)
    let mut scores = vec![0f32; (n - first) * rows];
    let mut row = vec![0f32; d];
    // Quantized keys, a group at a time: q·(s⊙c + z) = (q⊙s)·c + q·z.
    let mut qs = vec![0f32; rows * d];
    let mut bias = vec![0f32; rows];
    for group in first / g..cache.quantized / g {
        let params = group * d..(group + 1) * d;
        let (s, z) = (&head.key_scale[params.clone()], &head.key_zero[params]);
        for r in 0..rows {
            let q = &queries[r * d..(r + 1) * d];
            bias[r] = 0.0;
            for c in 0..d {
                qs[r * d + c] = q[c] * s[c].to_f32();
                bias[r] += q[c] * z[c].to_f32();
            }
        }
        for t in (group * g).max(first)..(group + 1) * g {
            unpack(&head.key_codes[t * d / 2..(t + 1) * d / 2], &mut row);
            let scores = &mut scores[(t - first) * rows..][..rows];
            for r in 0..rows {
                scores[r] = (dot::<FMA>(&qs[r * d..(r + 1) * d], &row) + bias[r]) * scale;
            }
        }
    }
    for t in first.max(cache.quantized)..n {
        head.recent_keys.row(t - cache.quantized, &mut row);
        let scores = &mut scores[(t - first) * rows..][..rows];
        for r in 0..rows {
            scores[r] = dot::<FMA>(&queries[r * d..(r + 1) * d], &row) * scale;
        }
    }
    // Softmax weights, left unnormalized: each row's output is divided by its sum once.
    let mut max = vec![f32::NEG_INFINITY; rows];
    for token in scores.chunks_exact(rows) {
        for (m, &s) in max.iter_mut().zip(token) {
            *m = m.max(s);
        }
    }
    let mut total = vec![0f32; rows];
    for token in scores.chunks_exact_mut(rows) {
        for ((s, &m), sum) in token.iter_mut().zip(&max).zip(&mut total) {
            *s = crate::cpu::exp::<FMA>(*s - m);
            *sum += *s;
        }
    }
    out.fill(0.0);
    // Values, a token at a time, each row converted once for every query head (quantized
    // ones as Σ p·(s·c + z)).
    for t in first..n {
        if t < cache.quantized {
            head.value_row(t, g, &mut row);
        } else {
            head.recent_values.row(t - cache.quantized, &mut row);
        }
        let weights = &scores[(t - first) * rows..][..rows];
        for (r, &p) in weights.iter().enumerate() {
            axpy::<FMA>(p, &row, &mut out[r * d..(r + 1) * d]);
        }
    }
    for (out, sum) in out.chunks_exact_mut(d).zip(total) {
        // No key at all (an empty window) leaves the output 0.
        let inverse = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        out.iter_mut().for_each(|x| *x *= inverse);
    }
}

/// Two 4-bit codes per byte, low nibble first, as f32.
#[inline(always)]
fn unpack(codes: &[u8], out: &mut [f32]) {
    for (pair, o) in codes.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = (pair & 15) as f32;
        o[1] = (pair >> 4) as f32;
    }
}

/// `a·b`, in sixteen independent sums so that it vectorizes.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FMA && crate::cpu::avx512_available() {
        // SAFETY: the CPU has AVX-512 F (checked by `avx512_available`).
        return unsafe { dot_avx512(a, b) };
    }
    let mut acc = [0f32; 16];
    let ((ca, ra), (cb, rb)) = (a.as_chunks::<16>(), b.as_chunks::<16>());
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..16 {
            acc[i] = madd::<FMA>(x[i], y[i], acc[i]);
        }
    }
    sum16(acc) + tail
}

/// [`dot`] in AVX-512 registers (the compiler splits the portable loop's sixteen sums
/// into pairs): two chains of sums, masked loads for the last 1 to 31 elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (a, b) = (a.as_ptr(), b.as_ptr());
    let (mut even, mut odd) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= n {
        even = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), even);
        odd = _mm512_fmadd_ps(
            _mm512_loadu_ps(a.add(i + 16)),
            _mm512_loadu_ps(b.add(i + 16)),
            odd,
        );
        i += 32;
    }
    while i < n {
        let mask: __mmask16 = (1u32 << (n - i).min(16)).wrapping_sub(1) as __mmask16;
        even = _mm512_fmadd_ps(
            _mm512_maskz_loadu_ps(mask, a.add(i)),
            _mm512_maskz_loadu_ps(mask, b.add(i)),
            even,
        );
        i += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(even, odd))
}

/// The sum of sixteen lanes, in halves (four vector steps, not fifteen scalar ones).
#[inline(always)]
fn sum16(mut acc: [f32; 16]) -> f32 {
    let mut width = 8;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// `y += a·x`.
#[inline(always)]
fn axpy<const FMA: bool>(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = madd::<FMA>(a, x, *y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{one_query_attention as attention, relative_l2 as rel_l2};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn codes_round_trip_within_half_a_step_and_windows_fill_as_documented() {
        let mut rng = StdRng::seed_from_u64(1);
        let (heads, d, g, r) = (2, 40, 16, 8);
        let mut cache = Int4KvCache::new(heads, d, g, r);
        let mut all_k = vec![Vec::new(); heads];
        let mut all_v = vec![Vec::new(); heads];
        for chunk in [5, 1, 30, 1, 1, 17] {
            let k = random(&mut rng, heads * chunk * d);
            let v = random(&mut rng, heads * chunk * d);
            for h in 0..heads {
                all_k[h].extend_from_slice(&k[h * chunk * d..(h + 1) * chunk * d]);
                all_v[h].extend_from_slice(&v[h * chunk * d..(h + 1) * chunk * d]);
            }
            cache.append(&k, &v, chunk);
            let len = cache.len();
            // Quantized in whole groups, leaving r..r+g−1 tokens in f16.
            assert_eq!(cache.quantized_len() % g, 0);
            let recent = len - cache.quantized_len();
            assert!(
                recent < r + g && (len < r + g || recent >= r),
                "{len} {recent}"
            );
        }
        assert_eq!(cache.len(), 55);
        assert_eq!(cache.quantized_len(), 32);
        let (keys, values) = cache.dequantize();
        let n = cache.len();
        for h in 0..heads {
            for (what, got, sent) in [("key", &keys, &all_k[h]), ("value", &values, &all_v[h])] {
                for (i, (x, y)) in got[h * n * d..(h + 1) * n * d].iter().zip(sent).enumerate() {
                    // Range ≤ 2 over 15 steps: half a step is 1/15, plus f16 rounding.
                    let tol = if i < 32 * d { 1.0 / 15.0 + 2e-3 } else { 1e-3 };
                    assert!((x - y).abs() <= tol, "{what} {h}/{i}: {x} vs {y}");
                }
            }
        }
        // 4 bits per code, f16 scale and zero per key group × channel and per value
        // token × channel group, f16 window.
        let expected =
            heads * (2 * 32 * d / 2 + 2 * 2 * (2 * d + 32 * d.div_ceil(g)) + 2 * 2 * 23 * d);
        assert_eq!(cache.bytes(), expected);
    }

    #[test]
    fn fused_decode_attention_equals_attention_over_the_dequantized_cache() {
        let mut rng = StdRng::seed_from_u64(2);
        for (kv_heads, per_kv, d, len, window) in [
            (1, 1, 16, 3, None),
            (2, 4, 64, 200, None),
            (2, 2, 48, 181, Some(70)),
            (4, 1, 32, 97, Some(5)),
        ] {
            let mut cache = Int4KvCache::new(kv_heads, d, 32, 16);
            let k = random(&mut rng, kv_heads * len * d);
            let v = random(&mut rng, kv_heads * len * d);
            cache.append(&k, &v, len);
            let nh = kv_heads * per_kv;
            let q = random(&mut rng, nh * d);
            let fused = cache.decode_attention(&q, nh, window);
            let (keys, values) = cache.dequantize();
            let first = window.map_or(0, |w| len.saturating_sub(w));
            for h in 0..nh {
                let kv = h / per_kv;
                let span = (kv * len + first) * d..(kv + 1) * len * d;
                let reference = attention(
                    &q[h * d..(h + 1) * d],
                    &keys[span.clone()],
                    &values[span],
                    d,
                );
                let got = &fused[h * d..(h + 1) * d];
                assert!(
                    rel_l2(got, &reference) < 1e-5,
                    "{kv_heads}×{per_kv} d {d} len {len}: head {h}"
                );
            }
        }
    }

    /// The f32 cache holds the keys and values exactly as appended, a few at a time as
    /// prefill chunks and decode steps append them, and attends to them as the exact
    /// attention does.
    #[test]
    fn the_f32_cache_keeps_exact_values() {
        let mut rng = StdRng::seed_from_u64(3);
        let (kv_heads, per_kv, d) = (2, 3, 64);
        let mut cache = Int4KvCache::f32_only(kv_heads, d);
        let mut appended = vec![Vec::new(); kv_heads];
        for tokens in [7, 1, 1, 300, 1] {
            let k = random(&mut rng, kv_heads * tokens * d);
            cache.append(&k, &k, tokens);
            for (h, all) in appended.iter_mut().enumerate() {
                all.extend_from_slice(&k[h * tokens * d..(h + 1) * tokens * d]);
            }
        }
        let len = cache.len();
        assert_eq!((len, cache.quantized_len()), (310, 0));
        assert_eq!(cache.bytes(), 2 * 4 * kv_heads * len * d);
        let (keys, values) = cache.dequantize();
        assert_eq!(keys, appended.concat());
        assert_eq!(values, keys);
        let nh = kv_heads * per_kv;
        let q = random(&mut rng, nh * d);
        let got = cache.decode_attention(&q, nh, None);
        for h in 0..nh {
            let kv = &keys[(h / per_kv) * len * d..(h / per_kv + 1) * len * d];
            let reference = attention(&q[h * d..(h + 1) * d], kv, kv, d);
            assert!(
                rel_l2(&got[h * d..(h + 1) * d], &reference) < 1e-6,
                "head {h}"
            );
        }
    }

    #[test]
    fn int4_decode_attention_error_against_full_precision_is_bounded() {
        // Shaped like a trained model's: keys with a few outlier channels (KIVI's
        // observation), values with a per-channel offset, queries that pick out a few
        // earlier keys. Uniform noise everywhere else would be the worst case for 4 bits.
        let mut rng = StdRng::seed_from_u64(3);
        let (kv_heads, per_kv, d, len) = (2, 4, 128, 1024);
        let mut k = random(&mut rng, kv_heads * len * d);
        for (i, x) in k.iter_mut().enumerate() {
            if i % d < 4 {
                *x *= 8.0;
            }
        }
        let offset = random(&mut rng, d);
        let v: Vec<f32> = random(&mut rng, kv_heads * len * d)
            .iter()
            .enumerate()
            .map(|(i, x)| offset[i % d] + 0.5 * x)
            .collect();
        let mut cache = Int4KvCache::new(kv_heads, d, DEFAULT_GROUP, DEFAULT_RECENT);
        cache.append(&k, &v, len);
        let nh = kv_heads * per_kv;
        let mut q = random(&mut rng, nh * d);
        for h in 0..nh {
            for pick in [rng.random_range(0..len), rng.random_range(0..len)] {
                let key = &k[((h / per_kv) * len + pick) * d..][..d];
                for (qc, kc) in q[h * d..(h + 1) * d].iter_mut().zip(key) {
                    *qc += 0.5 * kc;
                }
            }
        }
        let got = cache.decode_attention(&q, nh, None);
        let mut worst = 0f32;
        for h in 0..nh {
            let span = (h / per_kv) * len * d..(h / per_kv + 1) * len * d;
            let exact = attention(&q[h * d..(h + 1) * d], &k[span.clone()], &v[span], d);
            worst = worst.max(rel_l2(&got[h * d..(h + 1) * d], &exact));
        }
        println!("INT4 decode attention, {len} tokens: relative L2 error {worst:.4}");
        assert!(worst < 0.05, "{worst}");
        // 896 tokens as codes (0.625 bytes per element with their scales), 128 in f16.
        let (quantized, recent) = (896, 128);
        let per_head =
            quantized * d + 4 * (quantized / 32 * d + quantized * d / 32) + 4 * recent * d;
        assert_eq!(cache.bytes(), kv_heads * per_head);
        println!(
            "{} bytes against {} in f16",
            cache.bytes(),
            2 * 2 * kv_heads * len * d
        );
    }
}

//! Kernels for Burn's CPU backend (`Flex`): flash attention forward and backward with the
//! mask vocabulary of [`crate::mask`], and the squared-ReLU gate, on plain `f32` slices.
//!
//! Attention walks 32 × 32 tiles of the score matrix like the CubeCL kernels: the block
//! mask skips empty tiles, full tiles take no per-element test, the softmax is online
//! (running max and sum per query row), and the backward recomputes probabilities from
//! the forward's log-sum-exp — no `[q, kv]` matrix is ever held, so memory is linear in
//! the sequence. One rayon task per (sequence, head) in the forward and per (sequence,
//! key head) in the backward, which owns its query heads' `dQ` and its key head's `dK`,
//! `dV`: GQA without repeated keys and without atomics. The inner loops are written for
//! the compiler to vectorize, and are compiled for AVX2 + FMA where the CPU has them.

use crate::mask::{AttentionMask, Tile};
use rayon::prelude::*;

/// Query rows and keys per tile.
pub const BLOCK_Q: usize = 32;
pub const BLOCK_KV: usize = 32;
/// A score that stands for "masked" (finite, so no `inf − inf`); a fully masked row's
/// log-sum-exp.
pub const MASKED: f32 = -1.0e30;

/// The shape of one attention call: `q` `[batch, heads, q_len, d]`, `k`, `v`
/// `[batch, kv_heads, kv_len, d]`, the queries being the last `q_len` positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub d: usize,
}

impl AttentionShape {
    /// Tiles of `block_q` queries by `block_kv` keys in the block mask of every sequence.
    pub fn tiles(&self, block_q: usize, block_kv: usize) -> usize {
        self.batch * self.q_len.div_ceil(block_q) * self.kv_len.div_ceil(block_kv)
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn check(&self, mask: &AttentionMask) {
        assert!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "{} query heads cannot share {} key heads",
            self.heads,
            self.kv_heads
        );
        assert!(
            self.q_len <= self.kv_len,
            "{} queries against {} keys",
            self.q_len,
            self.kv_len
        );
        if let Some(docs) = &mask.documents {
            assert_eq!(
                docs.len(),
                self.batch * self.kv_len,
                "document ids for {} sequences of {} keys",
                self.batch,
                self.kv_len
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn fma_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && crate::isa::allows(crate::isa::Tier::Avx2)
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        fma_available()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && crate::isa::allows(crate::isa::Tier::Avx512)
    })
}

/// `a·b + c`, fused where the kernel is compiled with FMA (elsewhere `mul_add` would be
/// a library call).
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `eˣ` without a library call, so that loops over it vectorize: `2ⁿ · p(r)` with
/// `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, and a degree-6 polynomial (relative error below
/// 2·10⁻⁷). Inputs below −87 give 0.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = crate::packed::ROUND_SHIFT;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, x));
    let mut p = 1.0 / 720.0;
    p = madd::<FMA>(p, r, 1.0 / 120.0);
    p = madd::<FMA>(p, r, 1.0 / 24.0);
    p = madd::<FMA>(p, r, 1.0 / 6.0);
    p = madd::<FMA>(p, r, 0.5);
    p = madd::<FMA>(p, r, 1.0);
    p = madd::<FMA>(p, r, 1.0);
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x <= -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// `$kernel::<true>` compiled for AVX-512 or for AVX2 + FMA where the CPU has them (the
/// kernels are `#[inline(always)]`, so they take the wrapper's target features), `::<false>`
/// otherwise.
macro_rules! dispatch {
    ($kernel:ident($($arg:ident: $ty:ty),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn wide($($arg: $ty),*) {
            $kernel::<true>($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast($($arg: $ty),*) {
            $kernel::<true>($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        if $crate::cpu::avx512_available() {
            // SAFETY: the CPU has AVX-512 F and VL, AVX2 and FMA (checked by `avx512_available`).
            return unsafe { wide($($arg),*) };
        }
        #[cfg(target_arch = "x86_64")]
        if $crate::cpu::fma_available() {
            // SAFETY: the CPU has AVX2 and FMA (checked by `fma_available`).
            return unsafe { fast($($arg),*) };
        }
        $kernel::<false>($($arg),*)
    }};
}
pub(crate) use dispatch;

/// `row` reduced by `op` (associative) from `init`, eight lanes side by side and then
/// across, where a sequential fold would keep the loop from vectorizing.
#[inline(always)]
fn lanes(row: &[f32; BLOCK_KV], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    for chunk in row.chunks_exact(8) {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = op(*a, x);
        }
    }
    acc.into_iter().fold(init, op)
}

/// One sequence's view of the mask: tile classes and the per-element test.
struct SeqMask<'a> {
    mask: &'a AttentionMask,
    tiles: &'a [Tile],
    docs: Option<&'a [i32]>,
    kv_blocks: usize,
    /// Position of query row 0.
    offset: usize,
}

impl SeqMask<'_> {
    fn tile(&self, qb: usize, kb: usize) -> Tile {
        self.tiles[qb * self.kv_blocks + kb]
    }

    fn allows(&self, row: usize, key: usize) -> bool {
        self.mask.mask.allows(self.offset + row, key, self.docs)
    }
}

/// The tiles of every sequence and a per-sequence view of them.
struct Masks<'a> {
    mask: &'a AttentionMask,
    blocks: crate::mask::BlockMask,
    shape: AttentionShape,
}

impl<'a> Masks<'a> {
    fn new(mask: &'a AttentionMask, shape: AttentionShape) -> Self {
        shape.check(mask);
        let blocks = mask.block_mask(shape.batch, shape.q_len, shape.kv_len, BLOCK_Q, BLOCK_KV);
        Self {
            mask,
            blocks,
            shape,
        }
    }

    fn sequence(&self, b: usize) -> SeqMask<'_> {
        let per_seq = self.blocks.q_blocks * self.blocks.kv_blocks;
        SeqMask {
            mask: self.mask,
            tiles: &self.blocks.tiles[b * per_seq..(b + 1) * per_seq],
            docs: self
                .mask
                .documents
                .as_ref()
                .map(|d| &d[b * self.shape.kv_len..(b + 1) * self.shape.kv_len]),
            kv_blocks: self.blocks.kv_blocks,
            offset: self.shape.kv_len - self.shape.q_len,
        }
    }
}

/// Copies keys `start..start + cols` of `x` (`[len, d]`) transposed into `t` (`[d, BLOCK_KV]`),
/// zero beyond `cols`.
#[inline(always)]
fn transpose_block(x: &[f32], d: usize, start: usize, cols: usize, t: &mut [f32]) {
    t.fill(0.0);
    for j in 0..cols {
        let row = &x[(start + j) * d..(start + j + 1) * d];
        for (c, &v) in row.iter().enumerate() {
            t[c * BLOCK_KV + j] = v;
        }
    }
}

/// Query rows processed together: each key (or value) vector loaded serves them all.
const ROWS: usize = 4;
/// Columns of an accumulator chunk kept in registers.
const LANES: usize = 16;

/// `s[r][j] += Σ_c a_r[c] · t[c][j]` for [`ROWS`] rows `a` against a transposed block `t`
/// (`[d, BLOCK_KV]`).
#[inline(always)]
fn products<const FMA: bool>(a: [&[f32]; ROWS], t: &[f32], s: &mut [[f32; BLOCK_KV]; ROWS]) {
    for c in 0..a[0].len() {
        let tc: &[f32; BLOCK_KV] = t[c * BLOCK_KV..(c + 1) * BLOCK_KV].try_into().unwrap();
        for r in 0..ROWS {
            let ac = a[r][c];
            for j in 0..BLOCK_KV {
                s[r][j] = madd::<FMA>(ac, tc[j], s[r][j]);
            }
        }
    }
}

/// `s[r][j] = scale · Σ_c a_r[c] · t[c][j]` for up to [`ROWS`] rows `a` against a
/// transposed block `t` (`[d, BLOCK_KV]`); masked entries (beyond `cols`, or refused by
/// a partial tile: `(mask, first row, first key)`) set to [`MASKED`]. Rows past `a.len()`
/// are left as garbage.
///
/// `LOCAL` accumulates in a local array, which stays in registers where `s`, written
/// through each step, does not: the forward ran 1.1–1.25× faster so. The
/// backward, which holds two blocks of scores at once, ran about 1.3× slower so (2 EPYC
/// cores with AVX-512), and accumulates in place.
#[inline(always)]
fn scores<const FMA: bool, const LOCAL: bool>(
    a: [&[f32]; ROWS],
    live: usize,
    t: &[f32],
    scale: f32,
    cols: usize,
    partial: Option<(&SeqMask, usize, usize)>,
    s: &mut [[f32; BLOCK_KV]; ROWS],
) {
    if LOCAL {
        let mut acc = [[0.0; BLOCK_KV]; ROWS];
        products::<FMA>(a, t, &mut acc);
        *s = acc;
    } else {
        *s = [[0.0; BLOCK_KV]; ROWS];
        products::<FMA>(a, t, s);
    }
    for (r, row) in s.iter_mut().enumerate().take(live) {
        for (j, v) in row.iter_mut().enumerate() {
            *v = if j < cols { *v * scale } else { MASKED };
        }
        if let Some((mask, first_row, key0)) = partial {
            for (j, v) in row.iter_mut().enumerate().take(cols) {
                if !mask.allows(first_row + r, key0 + j) {
                    *v = MASKED;
                }
            }
        }
    }
}

/// `acc_r += Σ_j w[r][j] · x[key0 + j]` for rows `r < live` of `acc` (`d` apart) and
/// `cols` rows of `x` (`[len, d]`): a `ROWS × cols` by `cols × d` product with the
/// accumulators in registers, [`LANES`] columns at a time.
#[inline(always)]
fn accumulate_rows<const FMA: bool>(
    w: &[[f32; BLOCK_KV]; ROWS],
    live: usize,
    x: &[f32],
    key0: usize,
    cols: usize,
    d: usize,
    acc: &mut [f32],
) {
    let mut c0 = 0;
    while c0 + LANES <= d {
        let mut a = [[0f32; LANES]; ROWS];
        for (r, a) in a.iter_mut().enumerate().take(live) {
            a.copy_from_slice(&acc[r * d + c0..r * d + c0 + LANES]);
        }
        for j in 0..cols {
            let xj: &[f32; LANES] = x[(key0 + j) * d + c0..(key0 + j) * d + c0 + LANES]
                .try_into()
                .unwrap();
            for r in 0..ROWS {
                let wj = w[r][j];
                for l in 0..LANES {
                    a[r][l] = madd::<FMA>(wj, xj[l], a[r][l]);
                }
            }
        }
        for (r, a) in a.iter().enumerate().take(live) {
            acc[r * d + c0..r * d + c0 + LANES].copy_from_slice(a);
        }
        c0 += LANES;
    }
    for r in 0..live {
        for j in 0..cols {
            let wj = w[r][j];
            for c in c0..d {
                acc[r * d + c] = madd::<FMA>(wj, x[(key0 + j) * d + c], acc[r * d + c]);
            }
        }
    }
}

/// `out[key0 + j] += Σ_r w[r][j] · y_r` for keys `j < cols` and rows `r < live` (the
/// transposed product of [`accumulate_rows`]: `dK += dSᵀ·Q`, `dV += Pᵀ·dO`).
#[inline(always)]
fn accumulate_keys<const FMA: bool>(
    w: &[[f32; BLOCK_KV]; ROWS],
    live: usize,
    y: [&[f32]; ROWS],
    key0: usize,
    cols: usize,
    d: usize,
    out: &mut [f32],
) {
    let mut c0 = 0;
    while c0 + LANES <= d {
        let mut ys = [[0f32; LANES]; ROWS];
        for (r, ys) in ys.iter_mut().enumerate().take(live) {
            ys.copy_from_slice(&y[r][c0..c0 + LANES]);
        }
        for j in 0..cols {
            let o: &mut [f32; LANES] = (&mut out[(key0 + j) * d + c0..(key0 + j) * d + c0 + LANES])
                .try_into()
                .unwrap();
            for r in 0..ROWS {
                let wj = w[r][j];
                for l in 0..LANES {
                    o[l] = madd::<FMA>(wj, ys[r][l], o[l]);
                }
            }
        }
        c0 += LANES;
    }
    for j in 0..cols {
        for r in 0..live {
            let wj = w[r][j];
            for c in c0..d {
                let o = &mut out[(key0 + j) * d + c];
                *o = madd::<FMA>(wj, y[r][c], *o);
            }
        }
    }
}

/// The rows `first..first + live` of `x` (`d` apart), padded to [`ROWS`] with the first
/// (their results are ignored), and zero weights for the padding.
#[inline(always)]
fn row_group(x: &[f32], first: usize, live: usize, d: usize) -> [&[f32]; ROWS] {
    std::array::from_fn(|r| {
        let row = first + if r < live { r } else { 0 };
        &x[row * d..(row + 1) * d]
    })
}

/// Flash attention forward: the output `[batch, heads, q_len, d]` and each query row's
/// log-sum-exp of its scaled scores `[batch, heads, q_len]` ([`MASKED`] for a row that
/// sees no key, whose output is 0). Scores are scaled by `1/√d`.
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    mask: &AttentionMask,
) -> (Vec<f32>, Vec<f32>) {
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        q_len,
        kv_len,
        d,
    } = shape;
    assert_eq!(q.len(), batch * heads * q_len * d, "query size");
    assert_eq!(k.len(), batch * kv_heads * kv_len * d, "key size");
    assert_eq!(v.len(), k.len(), "value size");
    let masks = Masks::new(mask, shape);
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![MASKED; batch * heads * q_len];
    out.par_chunks_mut((q_len * d).max(1))
        .zip(lse.par_chunks_mut(q_len.max(1)))
        .enumerate()
        .for_each(|(bh, (out, lse))| {
            let (b, h) = (bh / heads, bh % heads);
            let kvh = b * kv_heads + h / shape.group();
            let q = &q[bh * q_len * d..(bh + 1) * q_len * d];
            let k = &k[kvh * kv_len * d..(kvh + 1) * kv_len * d];
            let v = &v[kvh * kv_len * d..(kvh + 1) * kv_len * d];
            let seq = masks.sequence(b);
            forward_head_any(q, k, v, shape, &seq, out, lse);
        });
    (out, lse)
}

/// Memory [`attention_forward`] holds beyond its inputs and output, at most: the tile
/// classes of the block mask, the log-sum-exp, and for each query head computing at
/// once (one per thread of the pool) its keys transposed block by block and its block
/// of accumulators. Nothing of size `q_len × kv_len`, and no repeated key heads.
pub fn attention_forward_scratch_bytes(shape: AttentionShape) -> usize {
    let AttentionShape {
        batch,
        heads,
        q_len,
        kv_len,
        d,
        ..
    } = shape;
    let running = rayon::current_num_threads().min(batch * heads);
    let kv_blocks = kv_len.div_ceil(BLOCK_KV);
    let per_head = kv_blocks * BLOCK_KV * d + BLOCK_Q * d + kv_blocks;
    shape.tiles(BLOCK_Q, BLOCK_KV) * std::mem::size_of::<crate::mask::Tile>()
        + 4 * batch * heads * q_len
        + 4 * running * per_head
}

fn forward_head_any(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    mask: &SeqMask,
    out: &mut [f32],
    lse: &mut [f32],
) {
    dispatch!(forward_head(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: AttentionShape,
        mask: &SeqMask,
        out: &mut [f32],
        lse: &mut [f32],
    ))
}

#[inline(always)]
fn forward_head<const FMA: bool>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    mask: &SeqMask,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (q_len, kv_len, d) = (shape.q_len, shape.kv_len, shape.d);
    let scale = 1.0 / (d as f32).sqrt();
    // Each key block transposed once, when first needed, for every query block (the
    // size of this head's keys).
    let kv_blocks = kv_len.div_ceil(BLOCK_KV);
    let mut kt = vec![0f32; kv_blocks * d * BLOCK_KV];
    let mut transposed = vec![false; kv_blocks];
    let mut acc = vec![0f32; BLOCK_Q * d];
    let mut s = [[0f32; BLOCK_KV]; ROWS];
    for qb in 0..q_len.div_ceil(BLOCK_Q) {
        let r0 = qb * BLOCK_Q;
        let rows = BLOCK_Q.min(q_len - r0);
        acc.fill(0.0);
        let mut m = [MASKED; BLOCK_Q];
        let mut l = [0f32; BLOCK_Q];
        for kb in 0..kv_len.div_ceil(BLOCK_KV) {
            let tile = mask.tile(qb, kb);
            if tile == Tile::Empty {
                continue;
            }
            let c0 = kb * BLOCK_KV;
            let cols = BLOCK_KV.min(kv_len - c0);
            let kt = &mut kt[kb * d * BLOCK_KV..(kb + 1) * d * BLOCK_KV];
            if !transposed[kb] {
                transpose_block(k, d, c0, cols, kt);
                transposed[kb] = true;
            }
            let mut i = 0;
            while i < rows {
                let live = ROWS.min(rows - i);
                let partial = (tile == Tile::Partial).then_some((mask, r0 + i, c0));
                scores::<FMA, true>(
                    row_group(q, r0 + i, live, d),
                    live,
                    kt,
                    scale,
                    cols,
                    partial,
                    &mut s,
                );
                for r in 0..ROWS {
                    if r >= live {
                        s[r] = [0.0; BLOCK_KV];
                        continue;
                    }
                    let row = &mut s[r];
                    let tile_max = lanes(row, MASKED, f32::max);
                    if tile_max <= MASKED * 0.5 {
                        *row = [0.0; BLOCK_KV];
                        continue;
                    }
                    let m_new = m[i + r].max(tile_max);
                    let correction = exp::<FMA>(m[i + r] - m_new);
                    for p in row.iter_mut() {
                        *p = if *p > MASKED * 0.5 {
                            exp::<FMA>(*p - m_new)
                        } else {
                            0.0
                        };
                    }
                    let sum = lanes(row, 0.0, |a, b| a + b);
                    l[i + r] = l[i + r] * correction + sum;
                    m[i + r] = m_new;
                    if correction != 1.0 {
                        acc[(i + r) * d..(i + r + 1) * d]
                            .iter_mut()
                            .for_each(|a| *a *= correction);
                    }
                }
                accumulate_rows::<FMA>(&s, live, v, c0, cols, d, &mut acc[i * d..]);
                i += live;
            }
        }
        for i in 0..rows {
            let row = r0 + i;
            if l[i] > 0.0 {
                let inv = 1.0 / l[i];
                for (o, a) in out[row * d..(row + 1) * d]
                    .iter_mut()
                    .zip(&acc[i * d..(i + 1) * d])
                {
                    *o = a * inv;
                }
                lse[row] = m[i] + l[i].ln();
            }
        }
    }
}

/// Gradients `(dQ, dK, dV)` of [`attention_forward`] from its output, log-sum-exp and the
/// output's gradient; `dK`, `dV` in key-head shape.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    grad_out: &[f32],
    shape: AttentionShape,
    mask: &AttentionMask,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape {
        kv_heads,
        q_len,
        kv_len,
        d,
        ..
    } = shape;
    assert_eq!(out.len(), q.len(), "output size");
    assert_eq!(grad_out.len(), q.len(), "output gradient size");
    assert_eq!(lse.len(), q.len() / d.max(1), "log-sum-exp size");
    let masks = Masks::new(mask, shape);
    let group = shape.group();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let q_chunk = group * q_len * d;
    let kv_chunk = kv_len * d;
    dq.par_chunks_mut(q_chunk.max(1))
        .zip(dk.par_chunks_mut(kv_chunk.max(1)))
        .zip(dv.par_chunks_mut(kv_chunk.max(1)))
        .enumerate()
        .for_each(|(bkv, ((dq, dk), dv))| {
            let b = bkv / kv_heads;
            let seq = masks.sequence(b);
            let k = &k[bkv * kv_chunk..(bkv + 1) * kv_chunk];
            let v = &v[bkv * kv_chunk..(bkv + 1) * kv_chunk];
            // This key head's query heads are consecutive: `b·heads + kvh·group + g`.
            let first = bkv * group;
            let rows = first * q_len..(first + group) * q_len;
            let elems = rows.start * d..rows.end * d;
            let head = HeadGrads {
                q: &q[elems.clone()],
                out: &out[elems.clone()],
                grad_out: &grad_out[elems],
                lse: &lse[rows],
                k,
                v,
            };
            backward_heads_any(&head, shape, &seq, dq, dk, dv);
        });
    (dq, dk, dv)
}

/// One key head's operands: its key and value rows, and its query heads' rows.
struct HeadGrads<'a> {
    q: &'a [f32],
    out: &'a [f32],
    grad_out: &'a [f32],
    lse: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

fn backward_heads_any(
    x: &HeadGrads,
    shape: AttentionShape,
    mask: &SeqMask,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    dispatch!(backward_heads(
        x: &HeadGrads,
        shape: AttentionShape,
        mask: &SeqMask,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ))
}

#[inline(always)]
fn backward_heads<const FMA: bool>(
    x: &HeadGrads,
    shape: AttentionShape,
    mask: &SeqMask,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (q_len, kv_len, d) = (shape.q_len, shape.kv_len, shape.d);
    let scale = 1.0 / (d as f32).sqrt();
    let mut kt = vec![0f32; d * BLOCK_KV];
    let mut vt = vec![0f32; d * BLOCK_KV];
    let (mut p, mut dp) = ([[0f32; BLOCK_KV]; ROWS], [[0f32; BLOCK_KV]; ROWS]);
    // delta = rowsum(dO ⊙ O), per query row of every head of the group.
    let delta: Vec<f32> = x
        .grad_out
        .chunks_exact(d.max(1))
        .zip(x.out.chunks_exact(d.max(1)))
        .map(|(g, o)| g.iter().zip(o).map(|(a, b)| a * b).sum())
        .collect();
    for kb in 0..kv_len.div_ceil(BLOCK_KV) {
        let c0 = kb * BLOCK_KV;
        let cols = BLOCK_KV.min(kv_len - c0);
        let mut live = false;
        for g in 0..shape.group() {
            let base = g * q_len;
            for qb in 0..q_len.div_ceil(BLOCK_Q) {
                let tile = mask.tile(qb, kb);
                if tile == Tile::Empty {
                    continue;
                }
                if !live {
                    transpose_block(x.k, d, c0, cols, &mut kt);
                    transpose_block(x.v, d, c0, cols, &mut vt);
                    live = true;
                }
                let r0 = qb * BLOCK_Q;
                let rows = BLOCK_Q.min(q_len - r0);
                let mut i = 0;
                while i < rows {
                    let live = ROWS.min(rows - i);
                    let first = base + r0 + i;
                    let q_rows = row_group(x.q, first, live, d);
                    let do_rows = row_group(x.grad_out, first, live, d);
                    let partial = (tile == Tile::Partial).then_some((mask, r0 + i, c0));
                    scores::<FMA, false>(q_rows, live, &kt, scale, cols, partial, &mut p);
                    scores::<FMA, false>(do_rows, live, &vt, 1.0, cols, None, &mut dp);
                    let mut ds = [[0f32; BLOCK_KV]; ROWS];
                    for r in 0..ROWS {
                        if r >= live || x.lse[first + r] <= MASKED * 0.5 {
                            p[r] = [0.0; BLOCK_KV];
                            continue;
                        }
                        let (lse, delta) = (x.lse[first + r], delta[first + r]);
                        for j in 0..BLOCK_KV {
                            p[r][j] = if p[r][j] > MASKED * 0.5 {
                                exp::<FMA>(p[r][j] - lse)
                            } else {
                                0.0
                            };
                            ds[r][j] = p[r][j] * (dp[r][j] - delta) * scale;
                        }
                    }
                    accumulate_rows::<FMA>(&ds, live, x.k, c0, cols, d, &mut dq[first * d..]);
                    accumulate_keys::<FMA>(&ds, live, q_rows, c0, cols, d, dk);
                    accumulate_keys::<FMA>(&p, live, do_rows, c0, cols, d, dv);
                    i += live;
                }
            }
        }
    }
}

/// `relu(gate)² ⊙ up` over rows of `[gate | up]` (`2·ffn` wide) → rows of `ffn`.
pub fn squared_relu_gate(gate_up: &[f32], ffn: usize) -> Vec<f32> {
    let rows = gate_up.len() / (2 * ffn).max(1);
    let mut out = vec![0f32; rows * ffn];
    out.par_chunks_mut(ffn.max(1) * 64)
        .zip(gate_up.par_chunks(2 * ffn.max(1) * 64))
        .for_each(|(out, gate_up)| {
            for (o, x) in out.chunks_exact_mut(ffn).zip(gate_up.chunks_exact(2 * ffn)) {
                let (gate, up) = x.split_at(ffn);
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    let r = g.max(0.0);
                    *o = r * r * u;
                }
            }
        });
    out
}

/// The gradient of [`squared_relu_gate`] with respect to `[gate | up]`:
/// `[dy ⊙ up ⊙ 2·relu(gate) | dy ⊙ relu(gate)²]`.
pub fn squared_relu_gate_backward(gate_up: &[f32], grad: &[f32], ffn: usize) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len()];
    out.par_chunks_mut(2 * ffn.max(1) * 64)
        .zip(gate_up.par_chunks(2 * ffn.max(1) * 64))
        .zip(grad.par_chunks(ffn.max(1) * 64))
        .for_each(|((out, gate_up), grad)| {
            for ((o, x), dy) in out
                .chunks_exact_mut(2 * ffn)
                .zip(gate_up.chunks_exact(2 * ffn))
                .zip(grad.chunks_exact(ffn))
            {
                let (gate, up) = x.split_at(ffn);
                let (d_gate, d_up) = o.split_at_mut(ffn);
                for i in 0..ffn {
                    let r = gate[i].max(0.0);
                    d_gate[i] = dy[i] * up[i] * 2.0 * r;
                    d_up[i] = dy[i] * r * r;
                }
            }
        });
    out
}

/// Rows per parallel task of the row-wise kernels.
const ROWS_PER_TASK: usize = 32;

/// RMSNorm over rows of `d`: `x / sqrt(mean(x²) + ε) · g`.
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f64) -> Vec<f32> {
    let d = gamma.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(d.max(1) * ROWS_PER_TASK)
        .zip(x.par_chunks(d.max(1) * ROWS_PER_TASK))
        .for_each(|(out, x)| {
            for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let r = inv_rms(x, eps);
                for ((o, &x), &g) in o.iter_mut().zip(x).zip(gamma) {
                    *o = x * r * g;
                }
            }
        });
    out
}

/// [`crate::TritterBackend::qk_norm_rotary`] on host rows: each query and key head
/// normalized as [`rms_norm`] does and rotated as [`rotary`] does, in one pass.
pub fn qk_norm_rotary(
    qkv: &[f32],
    [q_gamma, k_gamma]: [&[f32]; 2],
    eps: f64,
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    kv_heads: usize,
) -> [Vec<f32>; 3] {
    let d = q_gamma.len();
    let half = d / 2;
    let width = (heads + 2 * kv_heads) * d;
    let rows = qkv.len() / width.max(1);
    assert_eq!(qkv.len(), rows * width, "rows of {width} projections");
    assert!(
        cos.len() == rows * d && sin.len() == rows * d,
        "one table row per row"
    );
    let mut q = vec![0f32; rows * heads * d];
    let mut k = vec![0f32; rows * kv_heads * d];
    let mut v = vec![0f32; rows * kv_heads * d];
    q.par_chunks_mut(heads * d * ROWS_PER_TASK)
        .zip(k.par_chunks_mut(kv_heads * d * ROWS_PER_TASK))
        .zip(v.par_chunks_mut(kv_heads * d * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(task, ((q, k), v))| {
            let first = task * ROWS_PER_TASK;
            for (r, ((q, k), v)) in q
                .chunks_exact_mut(heads * d)
                .zip(k.chunks_exact_mut(kv_heads * d))
                .zip(v.chunks_exact_mut(kv_heads * d))
                .enumerate()
            {
                let row = &qkv[(first + r) * width..(first + r + 1) * width];
                let (c, s) = (&cos[(first + r) * d..][..d], &sin[(first + r) * d..][..d]);
                let (q_in, rest) = row.split_at(heads * d);
                let (k_in, v_in) = rest.split_at(kv_heads * d);
                for (input, out, gamma) in [(q_in, q, q_gamma), (k_in, k, k_gamma)] {
                    for (x, o) in input.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                        let inv = inv_rms(x, eps);
                        for i in 0..half {
                            let a = x[i] * inv * gamma[i];
                            let b = x[i + half] * inv * gamma[i + half];
                            o[i] = a * c[i] + b * s[i];
                            o[i + half] = b * c[i + half] + a * s[i + half];
                        }
                    }
                }
                v.copy_from_slice(v_in);
            }
        });
    [q, k, v]
}

#[inline(always)]
fn inv_rms(x: &[f32], eps: f64) -> f32 {
    let sum = lane_sum(x.len(), |i| x[i] * x[i]);
    1.0 / (sum / x.len() as f32 + eps as f32).sqrt()
}

/// `Σ_{i<n} f(i)` in 16 independent partial sums, so the loop vectorizes (a single
/// running float sum cannot be reordered by the compiler).
#[inline(always)]
fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let whole = n / LANES * LANES;
    for base in (0..whole).step_by(LANES) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f(base + l);
        }
    }
    lanes.iter().sum::<f32>() + (whole..n).map(f).sum::<f32>()
}

/// Gradients of [`rms_norm`] with `r = 1/sqrt(mean(x²) + ε)` per row:
/// `dx = r·(g ⊙ dy) − x·r³·mean(g ⊙ dy ⊙ x)`, `dg = Σ_rows dy ⊙ x·r`.
pub fn rms_norm_backward(x: &[f32], gamma: &[f32], eps: f64, grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let mut dx = vec![0f32; x.len()];
    // Each task's partial `dg` is kept apart and they are summed in task order, so the
    // result does not depend on how the tasks were scheduled (training is reproducible).
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(d.max(1) * ROWS_PER_TASK)
        .zip(x.par_chunks(d.max(1) * ROWS_PER_TASK))
        .zip(grad.par_chunks(d.max(1) * ROWS_PER_TASK))
        .map(|((dx, x), grad)| {
            let mut dg = vec![0f32; d];
            for ((dx, x), dy) in dx
                .chunks_exact_mut(d)
                .zip(x.chunks_exact(d))
                .zip(grad.chunks_exact(d))
            {
                let r = inv_rms(x, eps);
                let dot = lane_sum(d, |i| dy[i] * gamma[i] * x[i]);
                let c = r * r * r * dot / d as f32;
                for i in 0..d {
                    dx[i] = r * gamma[i] * dy[i] - x[i] * c;
                    dg[i] += dy[i] * x[i] * r;
                }
            }
            dg
        })
        .collect();
    let mut dg = vec![0f32; d];
    for partial in partials {
        dg.iter_mut().zip(partial).for_each(|(a, b)| *a += b);
    }
    (dx, dg)
}

/// Rotary embedding over rows of `d` with full-size tables (rotate-half convention,
/// `sin` holding `[−sin, sin]`): `y = x·cos + [x₂, x₁]·sin`. With `transpose`, the
/// rotation's transpose (its inverse) — the backward: `dx = dy·cos + [(dy·sin)₂, (dy·sin)₁]`.
pub fn rotary(x: &[f32], cos: &[f32], sin: &[f32], d: usize, transpose: bool) -> Vec<f32> {
    assert!(
        cos.len() == x.len() && sin.len() == x.len(),
        "rotary tables of the input's size"
    );
    let half = d / 2;
    let mut out = vec![0f32; x.len()];
    let chunk = d.max(1) * ROWS_PER_TASK;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(cos.par_chunks(chunk).zip(sin.par_chunks(chunk)))
        .for_each(|((out, x), (cos, sin))| {
            for (((o, x), c), s) in out
                .chunks_exact_mut(d)
                .zip(x.chunks_exact(d))
                .zip(cos.chunks_exact(d))
                .zip(sin.chunks_exact(d))
            {
                let (o1, o2) = o.split_at_mut(half);
                let (x1, x2) = x.split_at(half);
                let (c1, c2) = c.split_at(half);
                let (s1, s2) = s.split_at(half);
                for i in 0..half {
                    if transpose {
                        o1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                        o2[i] = x2[i] * c2[i] + x1[i] * s1[i];
                    } else {
                        o1[i] = x1[i] * c1[i] + x2[i] * s1[i];
                        o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
                    }
                }
            }
        });
    out
}

/// BitLinear's quantized operands in one pass each: activations per token
/// (`xq / s`, `[tokens, d_in]`) and weights per tensor (`Wq · γ`), as
/// [`crate::reference::int8_quantize`] and [`crate::reference::ternary_quantize_scaled`]
/// compute them.
pub fn quantize_activations(x: &[f32], d_in: usize) -> Vec<f32> {
    use crate::packed::{int8_code, int8_inv_scale};
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(d_in.max(1) * ROWS_PER_TASK)
        .zip(x.par_chunks(d_in.max(1) * ROWS_PER_TASK))
        .for_each(|(out, x)| {
            for (o, x) in out.chunks_exact_mut(d_in).zip(x.chunks_exact(d_in)) {
                let inv_scale = int8_inv_scale(x);
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = int8_code(v, inv_scale) * inv_scale;
                }
            }
        });
    out
}

/// `Wq · γ` with `Wq = clamp(round(W / γ), −1, 1)`, `γ` floored at ε.
pub fn quantize_weights(w: &[f32], gamma: f32) -> Vec<f32> {
    let gamma = gamma.max(crate::reference::QUANT_EPS);
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(4096)
        .zip(w.par_chunks(4096))
        .for_each(|(out, w)| {
            for (o, &v) in out.iter_mut().zip(w) {
                *o = crate::packed::round_clamped(v / gamma, -1.0, 1.0) * gamma;
            }
        });
    out
}

/// [`crate::reference::split_heads`]: heads `start..start + heads` of `x`
/// `[batch, seq, width]` → `[batch, heads, seq, head_dim]`.
pub fn split_heads(
    x: &[f32],
    [batch, seq, width]: [usize; 3],
    start: usize,
    heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    assert!(
        (start + heads) * head_dim <= width,
        "heads beyond the width"
    );
    let mut out = vec![0f32; batch * heads * seq * head_dim];
    out.par_chunks_mut((seq * head_dim).max(1))
        .enumerate()
        .for_each(|(bh, out)| {
            let (b, h) = (bh / heads, bh % heads);
            let col = (start + h) * head_dim;
            for (t, o) in out.chunks_exact_mut(head_dim).enumerate() {
                let row = (b * seq + t) * width + col;
                o.copy_from_slice(&x[row..row + head_dim]);
            }
        });
    out
}

/// [`crate::reference::merge_heads`]: `x` `[batch, heads, seq, head_dim]` → heads
/// `start..` of `[batch, seq, width]`, zero elsewhere.
pub fn merge_heads(
    x: &[f32],
    [batch, heads, seq, head_dim]: [usize; 4],
    width: usize,
    start: usize,
) -> Vec<f32> {
    assert!(
        (start + heads) * head_dim <= width,
        "heads beyond the width"
    );
    let mut out = vec![0f32; batch * seq * width];
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(bt, out)| {
            let (b, t) = (bt / seq, bt % seq);
            for h in 0..heads {
                let src = ((b * heads + h) * seq + t) * head_dim;
                let col = (start + h) * head_dim;
                out[col..col + head_dim].copy_from_slice(&x[src..src + head_dim]);
            }
        });
    out
}

/// A row-major `rows × cols` matrix, or its transpose read in place.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    pub values: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a> Matrix<'a> {
    pub fn new(values: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols, "a {rows}×{cols} matrix");
        Self {
            values,
            rows,
            cols,
            transposed: false,
        }
    }

    pub fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }

    /// `(rows, cols)` as read.
    fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// `(column stride, row stride)` as read.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (self.cols as isize, 1)
        } else {
            (1, self.cols as isize)
        }
    }
}

/// `a · b`, row-major `[m, n]`, on every core through `gemm` (the kernel Burn's CPU
/// backend uses, called without its tensor wrapper, which costs more than the product
/// itself at BitLinear's shapes).
pub fn matmul(a: Matrix, b: Matrix) -> Vec<f32> {
    let ((m, k), (k2, n)) = (a.shape(), b.shape());
    assert_eq!(k, k2, "a {m}×{k} matrix times a {k2}×{n} matrix");
    if m * n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    // Not zeroed: the product writes every value (`read_dst` false).
    let mut out = Vec::<f32>::with_capacity(m * n);
    let ((a_cs, a_rs), (b_cs, b_rs)) = (a.strides(), b.strides());
    // SAFETY: `out` has room for `m·n` values, written with strides (1, n) and never read
    // (`read_dst` false), after which all `m·n` are initialized; `a` and `b` hold their
    // `m·k` and `k·n` values at the strides `Matrix::strides` gives for their shapes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.spare_capacity_mut().as_mut_ptr().cast::<f32>(),
            1,
            n as isize,
            false,
            a.values.as_ptr(),
            a_cs,
            a_rs,
            b.values.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
        out.set_len(m * n);
    }
    out
}

/// A Flex tensor's values as an `f32` slice, without a copy when it is a contiguous `f32`
/// tensor (the model's case).
pub(crate) struct Host(Result<burn::backend::flex::FlexTensor, Vec<f32>>);

impl Host {
    pub(crate) fn new<const D: usize>(t: burn::tensor::Tensor<burn::backend::Flex, D>) -> Self {
        let flex = t.clone().into_primitive().tensor().to_contiguous();
        if flex.as_slice::<f32>().is_some() {
            Host(Ok(flex))
        } else {
            Host(Err(t
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 values")))
        }
    }

    pub(crate) fn slice(&self) -> &[f32] {
        match &self.0 {
            Ok(flex) => flex.as_slice::<f32>().expect("contiguous f32"),
            Err(values) => values,
        }
    }
}

/// A Flex tensor that takes ownership of `values`.
pub(crate) fn flex_tensor<const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
) -> burn::tensor::Tensor<burn::backend::Flex, D> {
    burn::tensor::Tensor::from_data(
        burn::tensor::TensorData::new(values, shape),
        &Default::default(),
    )
}

/// The [`AttentionShape`] of queries `[batch, heads, q_len, d]` and keys
/// `[batch, kv_heads, kv_len, d]`.
pub(crate) fn attention_shape(
    [batch, heads, q_len, d]: [usize; 4],
    k: [usize; 4],
) -> AttentionShape {
    assert_eq!(
        (k[0], k[3]),
        (batch, d),
        "queries {:?} against keys {k:?}",
        [batch, heads, q_len, d]
    );
    AttentionShape {
        batch,
        heads,
        kv_heads: k[1],
        q_len,
        kv_len: k[2],
        d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f32;
        let mut x = -86.9f32;
        while x < 20.0 {
            let (a, b) = (exp::<false>(x), x.exp());
            worst = worst.max((a - b).abs() / b);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp::<false>(-1.0e30), 0.0);
        assert_eq!(exp::<false>(0.0), 1.0);
    }
}

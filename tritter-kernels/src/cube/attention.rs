//! Flash attention in CubeCL: online softmax over key tiles held in shared memory, no
//! `q × kv` matrix anywhere; GQA by indexing (query head `h` reads key head
//! `h / (heads / kv_heads)`); masks from [`crate::mask`] — tiles the block mask calls
//! empty are skipped, full tiles get no per-element test, partial tiles evaluate the
//! mask's terms per element.
//!
//! Forward: one cube per (query tile, batch · head), one unit per query row, keeping
//! the row's running max, sum and output in registers; it also writes each row's
//! log-sum-exp for the backward. Backward (FlashAttention-2's recurrences, recomputing
//! probabilities from the log-sum-exp): one kernel for `dQ` (a unit per query row) and
//! one for `dK`, `dV` (a unit per key row, summing over the query heads of its group),
//! so nothing is accumulated atomically.

use crate::mask::{AttentionMask, BlockMask};
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::{CubeCount, CubeDim};

use super::empty_like;

/// Query rows per cube (one unit each) and keys per shared-memory tile.
pub const BLOCK_Q: usize = 32;
pub const BLOCK_KV: usize = 32;
/// A score that stands for "masked" (finite, so no `inf − inf`).
const MASKED: f32 = -1.0e30;

/// Whether query position `q` may see key `kv` under the mask's terms (`[terms, 3]`:
/// flags, window, below; see [`crate::mask`]) and document ids `docs` (`[batch, kv]`).
#[cube]
fn allowed(terms: &Tensor<i32>, docs: &Tensor<i32>, doc_row: usize, q: usize, kv: usize) -> bool {
    let mut any = false;
    for t in 0..terms.shape(0) {
        let flags = terms[t * 3];
        let mut ok = true;
        if (flags & 1) != 0 {
            ok = ok && q >= kv;
        }
        if (flags & 2) != 0 {
            ok = ok && (q < kv || q - kv < terms[t * 3 + 1] as usize);
        }
        if (flags & 4) != 0 {
            ok = ok && docs[doc_row + q] == docs[doc_row + kv];
        }
        if (flags & 8) != 0 {
            ok = ok && kv < terms[t * 3 + 2] as usize;
        }
        any = any || ok;
    }
    any
}

#[cube(launch)]
fn flash_forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    terms: &Tensor<i32>,
    docs: &Tensor<i32>,
    tiles: &Tensor<i32>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    #[comptime] d: usize,
    #[comptime] bq: usize,
    #[comptime] bk: usize,
) {
    let heads = q.shape(1);
    let q_len = q.shape(2);
    let kv_heads = k.shape(1);
    let kv_len = k.shape(2);
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads;
    let g = (bh % heads) / (heads / kv_heads);
    let qb = CUBE_POS_X as usize;
    let row = qb * bq + UNIT_POS_X as usize;
    let live = row < q_len;
    let pos = row + kv_len - q_len;
    let q_base = (bh * q_len + row) * d;
    let kv_base = (b * kv_heads + g) * kv_len * d;
    let doc_row = b * kv_len;
    let q_blocks = q_len.div_ceil(bq);
    let kv_blocks = kv_len.div_ceil(bk);
    let scale = F::new(comptime!(1.0 / (d as f32).sqrt()));
    let masked = F::new(MASKED);

    let mut qr = Array::<F>::new(d);
    let mut acc = Array::<F>::new(d);
    for c in 0..d {
        qr[c] = if live {
            q[q_base + c] * scale
        } else {
            F::new(0.0)
        };
        acc[c] = F::new(0.0);
    }
    let mut m = masked;
    let mut l = F::new(0.0);
    let mut s = Array::<F>::new(bk);
    let mut ks = SharedMemory::<F>::new(bk * d);
    let mut vs = SharedMemory::<F>::new(bk * d);

    for kb in 0..kv_blocks {
        let tile = tiles[(b * q_blocks + qb) * kv_blocks + kb];
        if tile != 0 {
            let start = kb * bk;
            let mut i = UNIT_POS_X as usize;
            while i < bk * d {
                let kv = start + i / d;
                if kv < kv_len {
                    ks[i] = k[kv_base + kv * d + i % d];
                    vs[i] = v[kv_base + kv * d + i % d];
                } else {
                    ks[i] = F::new(0.0);
                    vs[i] = F::new(0.0);
                }
                i += bq;
            }
            sync_cube();
            if live {
                let mut tile_max = masked;
                for j in 0..bk {
                    let kv = start + j;
                    let mut ok = kv < kv_len;
                    if ok && tile == 2 {
                        ok = allowed(terms, docs, doc_row, pos, kv);
                    }
                    let mut score = masked;
                    if ok {
                        score = F::new(0.0);
                        for c in 0..d {
                            score += qr[c] * ks[j * d + c];
                        }
                    }
                    s[j] = score;
                    tile_max = F::max(tile_max, score);
                }
                if tile_max > F::new(MASKED * 0.5) {
                    let m_new = F::max(m, tile_max);
                    let correction = F::exp(m - m_new);
                    l *= correction;
                    // Probabilities first, then one pass per channel, whose key loop has
                    // a constant trip count (unrolled where the compiler can).
                    for j in 0..bk {
                        let mut p = F::new(0.0);
                        if s[j] > F::new(MASKED * 0.5) {
                            p = F::exp(s[j] - m_new);
                        }
                        s[j] = p;
                        l += p;
                    }
                    for c in 0..d {
                        let mut a = acc[c] * correction;
                        for j in 0..bk {
                            a += s[j] * vs[j * d + c];
                        }
                        acc[c] = a;
                    }
                    m = m_new;
                }
            }
            sync_cube();
        }
    }
    if live {
        let inv = if l > F::new(0.0) {
            F::new(1.0) / l
        } else {
            F::new(0.0)
        };
        for c in 0..d {
            out[q_base + c] = acc[c] * inv;
        }
        lse[bh * q_len + row] = if l > F::new(0.0) {
            m + F::ln(l)
        } else {
            masked
        };
    }
}

/// `dQ`: one unit per query row, over the key tiles the block mask keeps. `delta` is
/// `rowsum(dO ∘ O)`.
#[cube(launch)]
fn flash_backward_dq_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    grad_out: &Tensor<F>,
    lse: &Tensor<F>,
    delta: &Tensor<F>,
    terms: &Tensor<i32>,
    docs: &Tensor<i32>,
    tiles: &Tensor<i32>,
    grad_q: &mut Tensor<F>,
    #[comptime] d: usize,
    #[comptime] bq: usize,
    #[comptime] bk: usize,
) {
    let heads = q.shape(1);
    let q_len = q.shape(2);
    let kv_heads = k.shape(1);
    let kv_len = k.shape(2);
    let bh = ABSOLUTE_POS_Y as usize;
    let row = ABSOLUTE_POS_X as usize;
    if row >= q_len || bh >= q.shape(0) * heads {
        terminate!();
    }
    let b = bh / heads;
    let g = (bh % heads) / (heads / kv_heads);
    let pos = row + kv_len - q_len;
    let q_base = (bh * q_len + row) * d;
    let kv_base = (b * kv_heads + g) * kv_len * d;
    let doc_row = b * kv_len;
    let qb = row / bq;
    let q_blocks = q_len.div_ceil(bq);
    let kv_blocks = kv_len.div_ceil(bk);
    let scale = F::new(comptime!(1.0 / (d as f32).sqrt()));
    let row_lse = lse[bh * q_len + row];
    let row_delta = delta[bh * q_len + row];
    let mut dq = Array::<F>::new(d);
    for c in 0..d {
        dq[c] = F::new(0.0);
    }
    // Each tile's `ds` first, then one pass per channel whose key loop has a constant
    // trip count; keys beyond the end are clamped and weighted zero.
    let mut ds = Array::<F>::new(bk);
    for kb in 0..kv_blocks {
        let tile = tiles[(b * q_blocks + qb) * kv_blocks + kb];
        if tile != 0 {
            for j in 0..bk {
                let kv = kb * bk + j;
                let mut ok = kv < kv_len;
                if ok && tile == 2 {
                    ok = allowed(terms, docs, doc_row, pos, kv);
                }
                let mut kvc = kv;
                if kvc >= kv_len {
                    kvc = kv_len - 1;
                }
                let mut sums = Array::<F>::new(2usize);
                sums[0] = F::new(0.0);
                sums[1] = F::new(0.0);
                for c in 0..d {
                    sums[0] += q[q_base + c] * k[kv_base + kvc * d + c];
                    sums[1] += grad_out[q_base + c] * v[kv_base + kvc * d + c];
                }
                let mut x = F::new(0.0);
                if ok {
                    let p = F::exp(sums[0] * scale - row_lse);
                    x = p * (sums[1] - row_delta) * scale;
                }
                ds[j] = x;
            }
            for c in 0..d {
                let mut a = dq[c];
                for j in 0..bk {
                    let mut kv = kb * bk + j;
                    if kv >= kv_len {
                        kv = kv_len - 1;
                    }
                    a += ds[j] * k[kv_base + kv * d + c];
                }
                dq[c] = a;
            }
        }
    }
    for c in 0..d {
        grad_q[q_base + c] = dq[c];
    }
}

/// `dK`, `dV`: one unit per key row of a key head, over every query head of its group
/// and the query tiles the block mask keeps.
#[cube(launch)]
fn flash_backward_dkv_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    grad_out: &Tensor<F>,
    lse: &Tensor<F>,
    delta: &Tensor<F>,
    terms: &Tensor<i32>,
    docs: &Tensor<i32>,
    tiles: &Tensor<i32>,
    grad_k: &mut Tensor<F>,
    grad_v: &mut Tensor<F>,
    #[comptime] d: usize,
    #[comptime] bq: usize,
    #[comptime] bk: usize,
) {
    let heads = q.shape(1);
    let q_len = q.shape(2);
    let kv_heads = k.shape(1);
    let kv_len = k.shape(2);
    let bg = ABSOLUTE_POS_Y as usize;
    let kv = ABSOLUTE_POS_X as usize;
    if kv >= kv_len || bg >= k.shape(0) * kv_heads {
        terminate!();
    }
    let b = bg / kv_heads;
    let g = bg % kv_heads;
    let group = heads / kv_heads;
    let kv_row = (bg * kv_len + kv) * d;
    let doc_row = b * kv_len;
    let kb = kv / bk;
    let q_blocks = q_len.div_ceil(bq);
    let kv_blocks = kv_len.div_ceil(bk);
    let scale = F::new(comptime!(1.0 / (d as f32).sqrt()));
    let mut dk = Array::<F>::new(d);
    let mut dv = Array::<F>::new(d);
    for c in 0..d {
        dk[c] = F::new(0.0);
        dv[c] = F::new(0.0);
    }
    for qb in 0..q_blocks {
        let tile = tiles[(b * q_blocks + qb) * kv_blocks + kb];
        if tile != 0 {
            for i in 0..bq {
                // Rows beyond the end are clamped and weighted zero (no branch around
                // the channel loops).
                let row = qb * bq + i;
                let mut ok = row < q_len;
                let mut rowc = row;
                if !ok {
                    rowc = q_len - 1;
                }
                let pos = rowc + kv_len - q_len;
                if ok && tile == 2 {
                    ok = allowed(terms, docs, doc_row, pos, kv);
                }
                for hh in 0..group {
                    let bh = b * heads + g * group + hh;
                    let q_base = (bh * q_len + rowc) * d;
                    let mut sums = Array::<F>::new(2usize);
                    sums[0] = F::new(0.0);
                    sums[1] = F::new(0.0);
                    for c in 0..d {
                        sums[0] += q[q_base + c] * k[kv_row + c];
                        sums[1] += grad_out[q_base + c] * v[kv_row + c];
                    }
                    let mut w = Array::<F>::new(2usize);
                    w[0] = F::new(0.0);
                    w[1] = F::new(0.0);
                    if ok {
                        let p = F::exp(sums[0] * scale - lse[bh * q_len + rowc]);
                        w[0] = p;
                        w[1] = p * (sums[1] - delta[bh * q_len + rowc]) * scale;
                    }
                    for c in 0..d {
                        dv[c] += w[0] * grad_out[q_base + c];
                        dk[c] += w[1] * q[q_base + c];
                    }
                }
            }
        }
    }
    for c in 0..d {
        grad_k[kv_row + c] = dk[c];
        grad_v[kv_row + c] = dv[c];
    }
}

/// The mask's terms, documents and tile classes as device tensors.
struct MaskTensors<R: CubeRuntime> {
    terms: CubeTensor<R>,
    docs: CubeTensor<R>,
    tiles: CubeTensor<R>,
}

fn i32_tensor<R: CubeRuntime>(
    like: &CubeTensor<R>,
    values: Vec<i32>,
    shape: Vec<usize>,
) -> CubeTensor<R> {
    let values = if values.is_empty() { vec![0] } else { values };
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let handle: Handle = like.client.create_from_slice(&bytes);
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        handle,
        DType::I32,
    )
}

fn mask_tensors<R: CubeRuntime>(
    like: &CubeTensor<R>,
    mask: &AttentionMask,
    blocks: &BlockMask,
    batch: usize,
    kv_len: usize,
) -> MaskTensors<R> {
    let terms = mask.mask.terms();
    let flat: Vec<i32> = terms
        .iter()
        .flat_map(|t| {
            [
                t.flags,
                t.window.min(i32::MAX as usize) as i32,
                t.below.min(i32::MAX as usize) as i32,
            ]
        })
        .collect();
    let docs = match &mask.documents {
        Some(d) => d.as_ref().clone(),
        None => vec![0; batch * kv_len],
    };
    MaskTensors {
        terms: i32_tensor(like, flat, vec![terms.len(), 3]),
        docs: i32_tensor(like, docs, vec![batch, kv_len]),
        tiles: i32_tensor(
            like,
            blocks.tiles.iter().map(|&t| t as i32).collect(),
            vec![batch, blocks.q_blocks, blocks.kv_blocks],
        ),
    }
}

fn dims4<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 4] {
    let s = t.meta.shape();
    [s[0], s[1], s[2], s[3]]
}

/// Checks the shapes and the mask's documents; returns `[batch, heads, q_len, d]`,
/// `kv_heads` and `kv_len`.
fn check(
    q: &CubeTensor<impl CubeRuntime>,
    k: &CubeTensor<impl CubeRuntime>,
    mask: &AttentionMask,
) -> ([usize; 4], usize, usize) {
    let [batch, heads, q_len, d] = dims4(q);
    let [kb, kv_heads, kv_len, kd] = dims4(k);
    assert!(
        kb == batch && kd == d,
        "keys [{kb}, {kv_heads}, {kv_len}, {kd}] against queries [{batch}, {heads}, {q_len}, {d}]"
    );
    assert!(
        heads % kv_heads == 0,
        "{heads} query heads over {kv_heads} key heads"
    );
    assert!(kv_len >= q_len, "{q_len} queries over {kv_len} keys");
    if let Some(docs) = &mask.documents {
        assert_eq!(
            docs.len(),
            batch * kv_len,
            "document ids for [{batch}, {kv_len}] positions"
        );
    }
    ([batch, heads, q_len, d], kv_heads, kv_len)
}

/// Attention output `[batch, heads, q_len, d]` and row log-sum-exp `[batch, heads,
/// q_len]` of `q` against `k`, `v` (`[batch, kv_heads, kv_len, d]`) under `mask`.
pub fn flash_forward<R: CubeRuntime, F: Float + CubeElement>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    mask: &AttentionMask,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let ([batch, heads, q_len, d], _, kv_len) = check(&q, &k, mask);
    let blocks = mask.block_mask(batch, q_len, kv_len, BLOCK_Q, BLOCK_KV);
    let m = mask_tensors(&q, mask, &blocks, batch, kv_len);
    let out = empty_like(&q, vec![batch, heads, q_len, d], q.dtype);
    let lse = empty_like(&q, vec![batch, heads, q_len], q.dtype);
    let client = q.client.clone();
    flash_forward_kernel::launch::<F, R>(
        &client,
        CubeCount::Static(q_len.div_ceil(BLOCK_Q) as u32, (batch * heads) as u32, 1),
        CubeDim::new_1d(BLOCK_Q as u32),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        m.terms.into_tensor_arg(),
        m.docs.into_tensor_arg(),
        m.tiles.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        d,
        BLOCK_Q,
        BLOCK_KV,
    );
    (out, lse)
}

/// Gradients `(dQ, dK, dV)` of [`flash_forward`], from its output's gradient, its
/// log-sum-exp and `delta = rowsum(dO ∘ O)` (`[batch, heads, q_len]`).
#[allow(clippy::too_many_arguments)]
pub fn flash_backward<R: CubeRuntime, F: Float + CubeElement>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    grad_out: CubeTensor<R>,
    lse: CubeTensor<R>,
    delta: CubeTensor<R>,
    mask: &AttentionMask,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let (grad_out, lse, delta) = (
        into_contiguous(grad_out),
        into_contiguous(lse),
        into_contiguous(delta),
    );
    let ([batch, heads, q_len, d], kv_heads, kv_len) = check(&q, &k, mask);
    let blocks = mask.block_mask(batch, q_len, kv_len, BLOCK_Q, BLOCK_KV);
    let m = mask_tensors(&q, mask, &blocks, batch, kv_len);
    let grad_q = empty_like(&q, vec![batch, heads, q_len, d], q.dtype);
    let grad_k = empty_like(&q, vec![batch, kv_heads, kv_len, d], q.dtype);
    let grad_v = empty_like(&q, vec![batch, kv_heads, kv_len, d], q.dtype);
    let client = q.client.clone();
    let unit = 64u32;
    flash_backward_dq_kernel::launch::<F, R>(
        &client,
        CubeCount::Static((q_len as u32).div_ceil(unit), (batch * heads) as u32, 1),
        CubeDim::new_1d(unit),
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        grad_out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        m.terms.clone().into_tensor_arg(),
        m.docs.clone().into_tensor_arg(),
        m.tiles.clone().into_tensor_arg(),
        grad_q.clone().into_tensor_arg(),
        d,
        BLOCK_Q,
        BLOCK_KV,
    );
    flash_backward_dkv_kernel::launch::<F, R>(
        &client,
        CubeCount::Static((kv_len as u32).div_ceil(unit), (batch * kv_heads) as u32, 1),
        CubeDim::new_1d(unit),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        grad_out.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        m.terms.into_tensor_arg(),
        m.docs.into_tensor_arg(),
        m.tiles.into_tensor_arg(),
        grad_k.clone().into_tensor_arg(),
        grad_v.clone().into_tensor_arg(),
        d,
        BLOCK_Q,
        BLOCK_KV,
    );
    (grad_q, grad_k, grad_v)
}

use super::fusion::{float_from_cube, float_to_cube, Fused};
use burn::tensor::Tensor as BurnTensor;
use burn_cubecl::{BoolElement, FloatElement, IntElement};

/// [`flash_forward`] on Burn's CubeCL backends: the output and each row's log-sum-exp.
#[allow(clippy::type_complexity)]
pub fn forward<R, F, I, BT>(
    q: BurnTensor<Fused<R, F, I, BT>, 4>,
    k: BurnTensor<Fused<R, F, I, BT>, 4>,
    v: BurnTensor<Fused<R, F, I, BT>, 4>,
    mask: &AttentionMask,
) -> (
    BurnTensor<Fused<R, F, I, BT>, 4>,
    BurnTensor<Fused<R, F, I, BT>, 3>,
)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let device = q.device();
    let (out, lse) =
        flash_forward::<R, F>(float_to_cube(q), float_to_cube(k), float_to_cube(v), mask);
    (float_from_cube(out, &device), float_from_cube(lse, &device))
}

/// Device memory [`forward`] needs beyond its inputs and output: the log-sum-exp and the
/// mask's tensors (tile classes, document ids); the scores stay in each cube's shared
/// memory and registers, and key heads are read in place by the query heads sharing them.
pub fn forward_scratch_bytes(shape: crate::cpu::AttentionShape) -> usize {
    let lse = shape.batch * shape.heads * shape.q_len;
    let docs = shape.batch * shape.kv_len;
    4 * (lse + docs + shape.tiles(BLOCK_Q, BLOCK_KV))
}

/// [`flash_backward`] on Burn's CubeCL backends: `(dq, dk, dv)`.
#[allow(clippy::type_complexity)]
pub fn backward<R, F, I, BT>(
    q: BurnTensor<Fused<R, F, I, BT>, 4>,
    k: BurnTensor<Fused<R, F, I, BT>, 4>,
    v: BurnTensor<Fused<R, F, I, BT>, 4>,
    out: BurnTensor<Fused<R, F, I, BT>, 4>,
    lse: BurnTensor<Fused<R, F, I, BT>, 3>,
    grad_out: BurnTensor<Fused<R, F, I, BT>, 4>,
    mask: &AttentionMask,
) -> (
    BurnTensor<Fused<R, F, I, BT>, 4>,
    BurnTensor<Fused<R, F, I, BT>, 4>,
    BurnTensor<Fused<R, F, I, BT>, 4>,
)
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let device = q.device();
    let delta: BurnTensor<Fused<R, F, I, BT>, 3> =
        (grad_out.clone() * out).sum_dim(3).squeeze_dim(3);
    let (dq, dk, dv) = flash_backward::<R, F>(
        float_to_cube(q),
        float_to_cube(k),
        float_to_cube(v),
        float_to_cube(grad_out),
        float_to_cube(lse),
        float_to_cube(delta),
        mask,
    );
    (
        float_from_cube(dq, &device),
        float_from_cube(dk, &device),
        float_from_cube(dv, &device),
    )
}

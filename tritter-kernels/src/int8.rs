//! BitLinear's training forward on the CPU as an integer product: int8 activation codes
//! times ternary weight codes, accumulated exactly in `i32` with AVX-512 VNNI, then scaled
//! once per output by `γ / s` — the A8 path of BitNet, as the export's packed product
//! computes it, at the shapes of training (thousands of tokens at once).
//!
//! Weights are quantized straight into panels of [`PANEL`] outputs: for every four inputs
//! `k..k + 4`, 32 outputs × 4 bytes, each byte a code `c = q + 1 ∈ {0, 1, 2}`, so that
//! one 64-byte load feeds `vpdpbusd` for 16 outputs. Activation codes are broadcast four
//! at a time against them, in a tile of [`TILE_TOKENS`] tokens × [`PANEL`] outputs held
//! in 16 accumulators: `Σ c·x = Σ q·x + Σ x`, so the token's code sum is subtracted once
//! at the end. Every value is an exact integer until the single scaling, so the result
//! is the reference's `Σ q·x` exactly, and the same bits as [`crate::packed`]'s product
//! of the exported layer.
//!
//! CPUs without AVX-512 VNNI (or with `TRITTER_CPU_KERNELS` below `avx512`) keep the `f32`
//! product of the dequantized operands ([`crate::cpu::matmul`]).

use crate::packed::{int8_code, int8_inv_scale, round_clamped};
use rayon::prelude::*;

/// Outputs per weight panel (two 16-lane accumulators per token).
pub const PANEL: usize = 32;
/// Tokens per register tile.
pub const TILE_TOKENS: usize = 8;
/// Tokens per parallel task.
const TASK_TOKENS: usize = 64;

/// Whether the integer product runs on this CPU.
pub fn available() -> bool {
    crate::packed::use_vnni()
}

/// Per-token int8 activations: codes in rows of `stride` (a multiple of 4, zero-padded,
/// the row count padded to whole tiles with zero rows), each token's `1/s` and code sum.
pub struct Activations {
    pub codes: Vec<i8>,
    pub stride: usize,
    pub inv_scales: Vec<f32>,
    pub sums: Vec<i32>,
}

/// Quantizes `x` `[tokens, d_in]`: the codes for the integer product and `Q_a(x)`
/// dequantized (`code · 1/s`, as [`crate::cpu::quantize_activations`] gives it).
pub fn quantize_activations(x: &[f32], d_in: usize) -> (Activations, Vec<f32>) {
    quantize_activations_with(x, d_in, available())
}

fn quantize_activations_with(x: &[f32], d_in: usize, vector: bool) -> (Activations, Vec<f32>) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = vector;
    let tokens = x.len() / d_in.max(1);
    let stride = d_in.div_ceil(4) * 4;
    let padded = tokens.div_ceil(TILE_TOKENS) * TILE_TOKENS;
    let mut codes = vec![0i8; padded * stride];
    let mut dequantized = vec![0f32; x.len()];
    let mut inv_scales = vec![0f32; padded];
    let mut sums = vec![0i32; padded];
    let rows = TASK_TOKENS;
    codes
        .par_chunks_mut(stride.max(1) * rows)
        .zip(dequantized.par_chunks_mut(d_in.max(1) * rows))
        .zip(x.par_chunks(d_in.max(1) * rows))
        .zip(
            inv_scales
                .par_chunks_mut(rows)
                .zip(sums.par_chunks_mut(rows)),
        )
        .for_each(|(((codes, deq), x), (inv_scales, sums))| {
            for ((((codes, deq), x), inv), sum) in codes
                .chunks_exact_mut(stride)
                .zip(deq.chunks_exact_mut(d_in))
                .zip(x.chunks_exact(d_in))
                .zip(inv_scales.iter_mut())
                .zip(sums.iter_mut())
            {
                #[cfg(target_arch = "x86_64")]
                if vector {
                    // SAFETY: the CPU has the features (`available`).
                    (*inv, *sum) = unsafe { vnni::quantize_row(x, codes, deq) };
                    continue;
                }
                (*inv, *sum) = quantize_row(x, codes, deq);
            }
        });
    let activations = Activations {
        codes,
        stride,
        inv_scales,
        sums,
    };
    (activations, dequantized)
}

/// One token into codes and dequantized values; returns its `1/s` and code sum.
fn quantize_row(x: &[f32], codes: &mut [i8], dequantized: &mut [f32]) -> (f32, i32) {
    let inv_scale = int8_inv_scale(x);
    let mut total = 0i32;
    for ((c, d), &v) in codes.iter_mut().zip(dequantized.iter_mut()).zip(x) {
        let code = int8_code(v, inv_scale);
        *d = code * inv_scale;
        *c = code as i8;
        total += code as i32;
    }
    (inv_scale, total)
}

/// Ternary weights in panels for the integer product (see the module documentation).
pub struct Panels {
    pub codes: Vec<u8>,
    pub d_in: usize,
    pub d_out: usize,
}

impl Panels {
    /// Groups of four inputs.
    fn quads(&self) -> usize {
        self.d_in.div_ceil(4)
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn panel_bytes(&self) -> usize {
        panel_bytes(self.d_in)
    }
}

/// Bytes of one panel of `d_in` inputs: 4 codes per output per group of four inputs.
fn panel_bytes(d_in: usize) -> usize {
    d_in.div_ceil(4) * PANEL * 4
}

/// Quantizes the latent `w` `[d_in, d_out]` with scale `γ` (floored at ε) into panels,
/// and returns `Q_w(W) = Wq · γ` dequantized beside them.
pub fn quantize_weights(w: &[f32], d_in: usize, d_out: usize, gamma: f32) -> (Panels, Vec<f32>) {
    quantize_weights_with(w, d_in, d_out, gamma, available())
}

fn quantize_weights_with(
    w: &[f32],
    d_in: usize,
    d_out: usize,
    gamma: f32,
    vector: bool,
) -> (Panels, Vec<f32>) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = vector;
    assert_eq!(w.len(), d_in * d_out, "a {d_in}×{d_out} weight");
    let gamma = gamma.max(crate::reference::QUANT_EPS);
    let panel_bytes = panel_bytes(d_in);
    // Padding (inputs beyond `d_in`, outputs beyond `d_out`) is code 1 (q = 0).
    let mut codes = vec![1u8; d_out.div_ceil(PANEL) * panel_bytes];
    let mut dequantized = vec![0f32; w.len()];
    let shared = SharedCodes(codes.as_mut_ptr());
    let rows = 4 * QUADS_PER_TASK;
    dequantized
        .par_chunks_mut((rows * d_out).max(1))
        .zip(w.par_chunks((rows * d_out).max(1)))
        .enumerate()
        .for_each(|(task, (deq, w))| {
            let codes = &shared;
            let first_quad = task * QUADS_PER_TASK;
            #[cfg(target_arch = "x86_64")]
            if vector {
                // SAFETY: the CPU has the features; each task writes only its own quads'
                // bytes of every panel.
                return unsafe {
                    vnni::quantize_weights(w, deq, d_out, gamma, codes.0, first_quad, panel_bytes)
                };
            }
            for (k, (deq, w)) in deq
                .chunks_exact_mut(d_out)
                .zip(w.chunks_exact(d_out))
                .enumerate()
            {
                let (quad, lane) = (first_quad + k / 4, k % 4);
                for (o, (d, &v)) in deq.iter_mut().zip(w).enumerate() {
                    let q = round_clamped(v / gamma, -1.0, 1.0);
                    *d = q * gamma;
                    let at = (o / PANEL) * panel_bytes + quad * PANEL * 4 + (o % PANEL) * 4 + lane;
                    // SAFETY: `at` lies in this task's quads of panel `o / PANEL`.
                    unsafe { *codes.0.add(at) = (q + 1.0) as u8 };
                }
            }
        });
    (Panels { codes, d_in, d_out }, dequantized)
}

/// Groups of four weight rows per parallel task.
const QUADS_PER_TASK: usize = 8;

/// The panel bytes, written by tasks at disjoint offsets.
struct SharedCodes(*mut u8);
// SAFETY: tasks write disjoint bytes (their own quads of each panel).
unsafe impl Sync for SharedCodes {}

/// `y = (Σ_k code[t][k] · q[k][o]) · (1/s_t) · γ`, `[tokens, d_out]` row-major.
///
/// # Panics
/// Where [`available`] is false, or the operands' sizes disagree.
pub fn matmul(x: &Activations, tokens: usize, w: &Panels, gamma: f32) -> Vec<f32> {
    assert!(available(), "the integer product needs AVX-512 VNNI");
    assert_eq!(x.stride, w.quads() * 4, "activations of {} inputs", w.d_in);
    assert!(x.inv_scales.len() >= tokens.div_ceil(TILE_TOKENS) * TILE_TOKENS);
    let gamma = gamma.max(crate::reference::QUANT_EPS);
    let d_out = w.d_out;
    let mut y = Vec::<f32>::with_capacity(tokens * d_out);
    let out = &mut y.spare_capacity_mut()[..tokens * d_out];
    out.par_chunks_mut((TASK_TOKENS * d_out).max(1))
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * TASK_TOKENS;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has the features (`available`); the codes hold whole tiles
            // of `stride`-byte rows and whole panels; every output of the task is written.
            unsafe {
                vnni::rows(x, first, out, d_out, w, gamma)
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!(
                "tokens {first}.. ({} outputs, γ {gamma}): no integer product",
                out.len()
            );
        });
    // SAFETY: every task wrote each of its `tokens_in_task · d_out` values.
    unsafe { y.set_len(tokens * d_out) };
    y
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Activations, Panels, PANEL, TILE_TOKENS};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// [`super::quantize_row`] 16 values at a time, with the same operations in the same
    /// order (divide, clamp, round by adding and removing 1.5·2²³, multiply back).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn quantize_row(x: &[f32], codes: &mut [i8], dequantized: &mut [f32]) -> (f32, i32) {
        let (lo, hi) = (
            _mm512_set1_ps(-128.0),
            _mm512_set1_ps(crate::reference::ACT_MAX),
        );
        let magic = _mm512_set1_ps(crate::packed::ROUND_SHIFT);
        let inv = crate::packed::int8_inv_scale(x);
        let inv_scale = _mm512_set1_ps(inv);
        let mut total = _mm512_setzero_si512();
        let d_in = x.len();
        for start in (0..d_in).step_by(16) {
            let mask = (1u32 << (d_in - start).min(16)).wrapping_sub(1) as u16;
            let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(start));
            let q = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(v, inv_scale), lo), hi);
            let q = _mm512_sub_ps(_mm512_add_ps(q, magic), magic);
            let deq = dequantized.as_mut_ptr().add(start);
            _mm512_mask_storeu_ps(deq, mask, _mm512_mul_ps(q, inv_scale));
            let code = _mm512_maskz_mov_epi32(mask, _mm512_cvtps_epi32(q));
            _mm512_mask_cvtepi32_storeu_epi8(codes.as_mut_ptr().add(start).cast(), mask, code);
            total = _mm512_add_epi32(total, code);
        }
        (inv, _mm512_reduce_add_epi32(total))
    }

    /// Weight rows `4·first_quad..` (`w`, `d_out` wide, a whole number of quads but for
    /// the last): `Wq · γ` into `deq` and the codes `q + 1` into the panels at `codes`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn quantize_weights(
        w: &[f32],
        deq: &mut [f32],
        d_out: usize,
        gamma: f32,
        codes: *mut u8,
        first_quad: usize,
        panel_bytes: usize,
    ) {
        let (lo, hi) = (_mm512_set1_ps(-1.0), _mm512_set1_ps(1.0));
        let magic = _mm512_set1_ps(crate::packed::ROUND_SHIFT);
        let (gamma, one) = (_mm512_set1_ps(gamma), _mm512_set1_epi32(1));
        let rows = w.len() / d_out;
        for quad in 0..rows.div_ceil(4) {
            for start in (0..d_out).step_by(16) {
                let mask = (1u32 << (d_out - start).min(16)).wrapping_sub(1) as u16;
                let mut bytes = _mm512_setzero_si512();
                for lane in 0..4 {
                    let row = 4 * quad + lane;
                    let code = if row < rows {
                        let at = row * d_out + start;
                        let v = _mm512_maskz_loadu_ps(mask, w.as_ptr().add(at));
                        let q = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(v, gamma), lo), hi);
                        let q = _mm512_sub_ps(_mm512_add_ps(q, magic), magic);
                        _mm512_mask_storeu_ps(
                            deq.as_mut_ptr().add(at),
                            mask,
                            _mm512_mul_ps(q, gamma),
                        );
                        _mm512_add_epi32(_mm512_cvtps_epi32(q), one)
                    } else {
                        one
                    };
                    bytes = _mm512_or_si512(
                        bytes,
                        _mm512_sllv_epi32(code, _mm512_set1_epi32(8 * lane as i32)),
                    );
                }
                let (panel, half) = (start / PANEL, (start % PANEL) / 16);
                let at = panel * panel_bytes + (first_quad + quad) * PANEL * 4 + half * 64;
                _mm512_storeu_si512(codes.add(at).cast(), bytes);
            }
        }
    }

    /// Tokens `first..` of `x`, as many as `out` has rows of `d_out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn rows(
        x: &Activations,
        first: usize,
        out: &mut [MaybeUninit<f32>],
        d_out: usize,
        w: &Panels,
        gamma: f32,
    ) {
        let tokens = out.len() / d_out;
        let quads = w.quads();
        let gamma = _mm512_set1_ps(gamma);
        for tile in (0..tokens).step_by(TILE_TOKENS) {
            let t0 = first + tile;
            let rows = (tokens - tile).min(TILE_TOKENS);
            let codes = x.codes.as_ptr().add(t0 * x.stride);
            for (p, panel) in w.codes.chunks_exact(w.panel_bytes()).enumerate() {
                let mut acc = [[_mm512_setzero_si512(); 2]; TILE_TOKENS];
                let panel = panel.as_ptr();
                for quad in 0..quads {
                    let w0 = _mm512_loadu_si512(panel.add(quad * 4 * PANEL).cast());
                    let w1 = _mm512_loadu_si512(panel.add(quad * 4 * PANEL + 64).cast());
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let four = codes.add(i * x.stride + 4 * quad).cast::<i32>();
                        let xb = _mm512_set1_epi32(four.read_unaligned());
                        acc[0] = _mm512_dpbusd_epi32(acc[0], w0, xb);
                        acc[1] = _mm512_dpbusd_epi32(acc[1], w1, xb);
                    }
                }
                let columns = (d_out - p * PANEL).min(PANEL);
                let masks = [
                    (1u32 << columns.min(16)).wrapping_sub(1) as u16,
                    if columns > 16 {
                        (1u32 << (columns - 16)).wrapping_sub(1) as u16
                    } else {
                        0
                    },
                ];
                for (i, acc) in acc.iter().enumerate().take(rows) {
                    let sum = _mm512_set1_epi32(x.sums[t0 + i]);
                    let inv = _mm512_set1_ps(x.inv_scales[t0 + i]);
                    let dst = out.as_mut_ptr().add((tile + i) * d_out + p * PANEL);
                    for (half, (&a, &mask)) in acc.iter().zip(&masks).enumerate() {
                        // `(a as f32 · 1/s) · γ`, in the packed product's order.
                        let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, sum));
                        let v = _mm512_mul_ps(_mm512_mul_ps(v, inv), gamma);
                        _mm512_mask_storeu_ps(dst.add(16 * half).cast(), mask, v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The integer reference: `Σ code·q` scaled as the module does.
    fn reference(x: &[f32], w: &[f32], d_in: usize, d_out: usize, gamma: f32) -> Vec<f32> {
        let tokens = x.len() / d_in;
        let mut y = vec![0f32; tokens * d_out];
        for t in 0..tokens {
            let row = &x[t * d_in..(t + 1) * d_in];
            let inv = int8_inv_scale(row);
            for o in 0..d_out {
                let mut acc = 0i32;
                for k in 0..d_in {
                    let q = round_clamped(w[k * d_out + o] / gamma, -1.0, 1.0) as i32;
                    acc += int8_code(row[k], inv) as i32 * q;
                }
                y[t * d_out + o] = acc as f32 * inv * gamma;
            }
        }
        y
    }

    #[test]
    fn integer_product_is_exact_on_ragged_shapes() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: the f32 product serves");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(tokens, d_in, d_out) in &[
            (1, 4, 1),
            (5, 7, 33),
            (8, 64, 32),
            (13, 130, 70),
            (70, 257, 97),
            (129, 256, 768),
        ] {
            let x: Vec<f32> = (0..tokens * d_in)
                .map(|_| rng.random_range(-3.0..3.0))
                .collect();
            let w: Vec<f32> = (0..d_in * d_out)
                .map(|_| rng.random_range(-0.1..0.1))
                .collect();
            let gamma = w.iter().map(|v| v.abs()).sum::<f32>() / w.len() as f32;
            let (acts, xq) = quantize_activations(&x, d_in);
            let (panels, wq) = quantize_weights(&w, d_in, d_out, gamma);
            let y = matmul(&acts, tokens, &panels, gamma);
            assert_eq!(
                y,
                reference(&x, &w, d_in, d_out, gamma),
                "{tokens}×{d_in}×{d_out}"
            );
            assert_eq!(xq, crate::cpu::quantize_activations(&x, d_in));
            assert_eq!(wq, crate::cpu::quantize_weights(&w, gamma));
        }
    }

    /// The AVX-512 quantizers write the same codes, sums, scales and values as the
    /// portable ones, padding included.
    #[test]
    fn vector_quantizers_match_the_portable_ones() {
        if !available() {
            eprintln!("no AVX-512 VNNI here: only the portable quantizers run");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for &(tokens, d_in, d_out) in &[(3, 5, 7), (9, 33, 40), (70, 130, 97), (64, 256, 256)] {
            let mut x: Vec<f32> = (0..tokens * d_in)
                .map(|_| rng.random_range(-3.0..3.0))
                .collect();
            x[..d_in].fill(0.0);
            let w: Vec<f32> = (0..d_in * d_out)
                .map(|_| rng.random_range(-0.1..0.1))
                .collect();
            let gamma = 0.05;
            let ((a, xa), (b, xb)) = (
                quantize_activations_with(&x, d_in, true),
                quantize_activations_with(&x, d_in, false),
            );
            assert_eq!(
                (a.codes, a.sums, a.inv_scales, xa),
                (b.codes, b.sums, b.inv_scales, xb)
            );
            let ((a, wa), (b, wb)) = (
                quantize_weights_with(&w, d_in, d_out, gamma, true),
                quantize_weights_with(&w, d_in, d_out, gamma, false),
            );
            assert_eq!((a.codes, wa), (b.codes, wb), "{d_in}×{d_out}");
        }
    }
}

//! Inference on packed ternary weights: BitLinear's product computed from the export's
//! 2-bit codes, with int8 activations and exact integer accumulation (the W1.58A8 path).
//!
//! Packed layout (the export's): a `[d_out, ceil(d_in / 4)]` byte matrix; input `c` of
//! row `r` sits in byte `c / 4` at bits `2·(c % 4)`, coded `q + 1` (0 → −1, 1 → 0,
//! 2 → +1). The product is `y[t, o] = (Σ_c xq[t, c]·q[o, c]) · γ / s_t` with `xq`, `s_t`
//! from [`crate::reference::int8_quantize`]: the same numbers as the latent-weight path,
//! summed exactly in integers.

use crate::reference::{int8_quantize, ACT_MAX, QUANT_EPS};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rayon::prelude::*;
use std::sync::Arc;

/// A ternary matrix packed 2 bits per weight, held where its backend computes.
#[derive(Debug, Clone)]
pub struct PackedTernary<B: Backend> {
    pub d_in: usize,
    pub d_out: usize,
    /// The per-tensor scale γ: the weight is `q · γ`.
    pub gamma: f32,
    pub storage: PackedStorage<B>,
}

#[derive(Debug, Clone)]
pub enum PackedStorage<B: Backend> {
    /// The export's bytes in host memory (the CPU backend's device memory).
    Host(Arc<[u8]>),
    /// Rows of 32-bit words, 16 codes per word, `[d_out, ceil(d_in / 16)]`, on the device.
    Words(Tensor<B, 2, Int>),
}

impl<B: Backend> PackedTernary<B> {
    /// Bytes this matrix occupies where it is stored.
    pub fn stored_bytes(&self) -> usize {
        match &self.storage {
            PackedStorage::Host(bytes) => bytes.len(),
            PackedStorage::Words(_) => self.d_out * self.d_in.div_ceil(16) * 4,
        }
    }
}

/// Checks that `bytes` holds a `[d_out, ceil(d_in / 4)]` matrix of valid codes (no 3).
pub fn validate_codes(bytes: &[u8], d_out: usize, d_in: usize) -> Result<(), String> {
    let row_bytes = d_in.div_ceil(4);
    if bytes.len() != d_out * row_bytes {
        return Err(format!(
            "{} bytes, expected {d_out} × {row_bytes} = {}",
            bytes.len(),
            d_out * row_bytes
        ));
    }
    // A byte holds an invalid code when some 2-bit field is 0b11.
    if let Some(i) = bytes.iter().position(|b| (b & (b >> 1) & 0x55) != 0) {
        return Err(format!(
            "invalid ternary code in row {} (byte {i})",
            i / row_bytes
        ));
    }
    Ok(())
}

/// Keeps the export's bytes in host memory.
pub fn upload_host<B: Backend>(
    bytes: &[u8],
    d_out: usize,
    d_in: usize,
    gamma: f32,
) -> PackedTernary<B> {
    PackedTernary {
        d_in,
        d_out,
        gamma,
        storage: PackedStorage::Host(Arc::from(bytes)),
    }
}

/// Moves the export's bytes to the device as 32-bit words, 16 codes each (rows padded
/// with code 1 = zero). The weights travel packed.
pub fn upload_words<B: Backend>(
    bytes: &[u8],
    d_out: usize,
    d_in: usize,
    gamma: f32,
    device: &B::Device,
) -> PackedTernary<B> {
    let row_bytes = d_in.div_ceil(4);
    let words_per_row = d_in.div_ceil(16);
    let mut words = Vec::with_capacity(d_out * words_per_row);
    for row in bytes.chunks_exact(row_bytes) {
        for w in 0..words_per_row {
            let mut word = [0x55u8; 4];
            for (k, b) in word.iter_mut().enumerate() {
                if let Some(&v) = row.get(4 * w + k) {
                    *b = v;
                }
            }
            words.push(i32::from_le_bytes(word));
        }
    }
    let words = Tensor::from_data(TensorData::new(words, [d_out, words_per_row]), device);
    PackedTernary {
        d_in,
        d_out,
        gamma,
        storage: PackedStorage::Words(words),
    }
}

/// Weights unpacked at a time by [`matmul_words`]: bounds its scratch memory.
pub const UNPACK_TILE_WEIGHTS: usize = 1 << 22;

/// Scratch bytes [`matmul_words`] allocates beyond its input and output: one tile of
/// weights as integers, shifted codes and floats.
pub fn words_scratch_bytes(d_out: usize, d_in: usize) -> usize {
    let tile_rows = (UNPACK_TILE_WEIGHTS / d_in.max(1)).clamp(1, d_out.max(1));
    tile_rows * d_in.div_ceil(16) * 16 * 12
}

/// The product on the device, unpacking row tiles with integer tensor ops. Any backend.
pub fn matmul_words<B: Backend>(x: Tensor<B, 2>, w: &PackedTernary<B>) -> Tensor<B, 2> {
    let PackedStorage::Words(words) = &w.storage else {
        panic!("matmul_words needs device words");
    };
    let (xq, inv_scale) = int8_quantize(x);
    let tile_rows = (UNPACK_TILE_WEIGHTS / w.d_in.max(1)).clamp(1, w.d_out.max(1));
    let mut outputs = Vec::new();
    let mut start = 0;
    while start < w.d_out {
        let rows = tile_rows.min(w.d_out - start);
        let q = unpack_words(words.clone().narrow(0, start, rows), w.d_in);
        outputs.push(xq.clone().matmul(q.transpose()));
        start += rows;
    }
    Tensor::cat(outputs, 1) * inv_scale * w.gamma
}

/// The ternary values `q` `[rows, d_in]` of word rows `[rows, ceil(d_in / 16)]`, unpacked
/// with integer tensor ops.
pub fn unpack_words<B: Backend>(words: Tensor<B, 2, Int>, d_in: usize) -> Tensor<B, 2> {
    let [rows, words_per_row] = words.dims();
    let shifts = Tensor::<B, 1, Int>::from_data(
        TensorData::new((0..16).map(|k| 2 * k).collect::<Vec<i32>>(), [16]),
        &words.device(),
    )
    .reshape([1, 1, 16]);
    let codes = words
        .reshape([rows, words_per_row, 1])
        .expand([rows, words_per_row, 16])
        .bitwise_right_shift(shifts.expand([rows, words_per_row, 16]))
        .bitwise_and_scalar(B::IntElem::from_elem(3))
        .reshape([rows, words_per_row * 16])
        .narrow(1, 0, d_in);
    codes.float() - 1.0
}

/// `LUT[b]`: the four codes of byte `b` as `i8` weights.
const LUT: [[i8; 4]; 256] = {
    let mut lut = [[0i8; 4]; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 4 {
            lut[b][k] = ((b >> (2 * k)) & 3) as i8 - 1;
            k += 1;
        }
        b += 1;
    }
    lut
};

/// `round(v)` (half to even) clamped to `[lo, hi]`, for ranges within ±2²², without a
/// library call and without a branch, so that loops over it vectorize (baseline x86-64
/// has no rounding instruction): clamping first changes nothing for integer bounds, and
/// adding and removing 1.5·2²³ leaves the nearest integer under the default rounding mode.
#[inline(always)]
pub(crate) fn round_clamped(v: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v.clamp(lo, hi) + MAGIC) - MAGIC
}

/// `max_i |x_i|` in 16 independent lanes.
#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v.abs());
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(0f32, |m, v| m.max(v.abs()))
}

/// One token's `1/s = max(max|x|, ε) / 127`, as [`int8_quantize`] computes it.
#[inline(always)]
pub(crate) fn int8_inv_scale(row: &[f32]) -> f32 {
    abs_max(row).max(QUANT_EPS) / ACT_MAX
}

/// The int8 code `clamp(round(v·s), −128, 127)` of a value of a token with `1/s`.
#[inline(always)]
pub(crate) fn int8_code(v: f32, inv_scale: f32) -> f32 {
    round_clamped(v / inv_scale, -128.0, ACT_MAX)
}

/// Per-token int8 quantization of `x` `[tokens, d_in]`, as [`int8_quantize`] computes it.
/// Rows are laid out `stride ≥ d_in` apart, zero-padded. Returns the codes, `1/s` per
/// token, and the sum of each token's codes.
pub fn quantize_rows(x: &[f32], d_in: usize, stride: usize) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    let tokens = x.len() / d_in.max(1);
    let mut xq = vec![0i8; tokens * stride];
    let mut inv_scales = Vec::with_capacity(tokens);
    let mut sums = Vec::with_capacity(tokens);
    for (row, out) in x.chunks_exact(d_in).zip(xq.chunks_exact_mut(stride)) {
        let inv_scale = int8_inv_scale(row);
        let mut sum = 0i32;
        for (o, &v) in out.iter_mut().zip(row) {
            *o = int8_code(v, inv_scale) as i8;
            sum += *o as i32;
        }
        inv_scales.push(inv_scale);
        sums.push(sum);
    }
    (xq, inv_scales, sums)
}

/// Portable kernel: `out[r·tokens + t] = Σ_c q[r][c]·xq[t][c]`.
fn rows_portable(
    packed: &[u8],
    d_in: usize,
    xq: &[i8],
    stride: usize,
    tokens: usize,
    out: &mut [i32],
) {
    let row_bytes = d_in.div_ceil(4);
    let mut row = vec![0i8; row_bytes * 4];
    for (r, packed_row) in packed.chunks_exact(row_bytes).enumerate() {
        for (dst, &b) in row.chunks_exact_mut(4).zip(packed_row) {
            dst.copy_from_slice(&LUT[b as usize]);
        }
        let w = &row[..d_in];
        for t in 0..tokens {
            let x = &xq[t * stride..t * stride + d_in];
            out[r * tokens + t] = x.iter().zip(w).map(|(&a, &b)| a as i32 * b as i32).sum();
        }
    }
}

/// AVX-512 VNNI kernel. Codes `c = q + 1 ∈ {0, 1, 2}` are unpacked in registers, 64 per
/// 16 bytes, and multiplied as unsigned bytes against the signed activations with
/// `vpdpbusd`: `Σ c·x = Σ q·x + Σ x`, so `Σ q·x = Σ c·x − Σ x`. Each unpacked vector
/// serves up to eight tokens.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn block<const NT: usize>(
        row: &[u8],
        stride: usize,
        xq: *const i8,
        sums: &[i32],
        out: &mut [i32],
    ) {
        let mask = _mm512_set1_epi32(0x0303_0303);
        let mut acc = [_mm512_setzero_si512(); NT];
        let row_bytes = row.len();
        let mut b = 0;
        while b < row_bytes {
            let left = row_bytes - b;
            let bytes = if left >= 16 {
                _mm_loadu_si128(row.as_ptr().add(b) as *const __m128i)
            } else {
                _mm_maskz_loadu_epi8((1u16 << left) - 1, row.as_ptr().add(b) as *const i8)
            };
            let w = _mm512_cvtepu8_epi32(bytes);
            let w = _mm512_or_si512(
                _mm512_or_si512(w, _mm512_slli_epi32::<6>(w)),
                _mm512_or_si512(_mm512_slli_epi32::<12>(w), _mm512_slli_epi32::<18>(w)),
            );
            let w = _mm512_and_si512(w, mask);
            for (j, a) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_si512(xq.add(j * stride + 4 * b) as *const __m512i);
                *a = _mm512_dpbusd_epi32(*a, w, x);
            }
            b += 16;
        }
        for j in 0..NT {
            out[j] = _mm512_reduce_add_epi32(acc[j]) - sums[j];
        }
    }

    /// `xq` rows are `stride` apart with `stride ≥ 4·ceil(row_bytes / 16)·16`, zero-padded.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn rows(
        packed: &[u8],
        row_bytes: usize,
        xq: &[i8],
        stride: usize,
        sums: &[i32],
        tokens: usize,
        out: &mut [i32],
    ) {
        for (r, row) in packed.chunks_exact(row_bytes).enumerate() {
            let out = &mut out[r * tokens..(r + 1) * tokens];
            let mut t = 0;
            while t < tokens {
                let x = xq.as_ptr().add(t * stride);
                let (s, o) = (&sums[t..], &mut out[t..]);
                t += match tokens - t {
                    1 => {
                        block::<1>(row, stride, x, s, o);
                        1
                    }
                    2 => {
                        block::<2>(row, stride, x, s, o);
                        2
                    }
                    3 => {
                        block::<3>(row, stride, x, s, o);
                        3
                    }
                    4..=7 => {
                        block::<4>(row, stride, x, s, o);
                        4
                    }
                    _ => {
                        block::<8>(row, stride, x, s, o);
                        8
                    }
                };
            }
        }
    }

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
}

/// Whether `TRITTER_PORTABLE_KERNELS` asks for the portable kernels instead of the ones
/// for the CPU's vector extensions (VNNI here, AVX2 + FMA in [`crate::cpu`]).
pub(crate) fn portable_kernels_forced() -> bool {
    std::env::var_os("TRITTER_PORTABLE_KERNELS").is_some()
}

/// Whether the AVX-512 VNNI kernels (here and in [`crate::int8`]) run on this CPU.
pub(crate) fn use_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| vnni::available() && !portable_kernels_forced())
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Output rows per parallel task.
const ROW_BLOCK: usize = 32;

/// The product on the CPU from the export's bytes: `x` `[tokens, d_in]` row-major,
/// returns `[tokens, d_out]` row-major. Each row of weights is unpacked once per group
/// of up to eight tokens, in registers, so a batch costs little more than one token until the
/// dot products dominate. AVX-512 VNNI where the CPU has it (set
/// `TRITTER_PORTABLE_KERNELS` to force the portable kernel), portable Rust otherwise.
pub fn ternary_gemm(
    x: &[f32],
    tokens: usize,
    packed: &[u8],
    d_out: usize,
    d_in: usize,
    gamma: f32,
) -> Vec<f32> {
    gemm(x, tokens, packed, d_out, d_in, gamma, use_vnni())
}

fn gemm(
    x: &[f32],
    tokens: usize,
    packed: &[u8],
    d_out: usize,
    d_in: usize,
    gamma: f32,
    vnni: bool,
) -> Vec<f32> {
    let row_bytes = d_in.div_ceil(4);
    let stride = if vnni {
        row_bytes.div_ceil(16) * 64
    } else {
        d_in
    };
    let (xq, inv_scales, sums) = quantize_rows(x, d_in, stride);
    let mut acc = vec![0i32; d_out * tokens];
    acc.par_chunks_mut(ROW_BLOCK * tokens)
        .zip(packed.par_chunks(ROW_BLOCK * row_bytes))
        .for_each(|(out, packed)| {
            #[cfg(target_arch = "x86_64")]
            if vnni {
                // SAFETY: the CPU has the features (checked by `use_vnni`); `xq` rows are
                // `stride` apart and padded to whole 64-byte vectors.
                return unsafe { vnni::rows(packed, row_bytes, &xq, stride, &sums, tokens, out) };
            }
            rows_portable(packed, d_in, &xq, stride, tokens, out)
        });
    let mut y = vec![0f32; tokens * d_out];
    for (o, acc_row) in acc.chunks_exact(tokens).enumerate() {
        for (t, &a) in acc_row.iter().enumerate() {
            y[t * d_out + o] = a as f32 * inv_scales[t] * gamma;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::bitlinear_forward;
    use burn::backend::Flex;
    use burn::tensor::Distribution;
    use rand::{Rng, SeedableRng};

    fn random_packed(d_out: usize, d_in: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let q: Vec<f32> = (0..d_out * d_in)
            .map(|_| rng.random_range(-1i32..=1) as f32)
            .collect();
        let row_bytes = d_in.div_ceil(4);
        let mut bytes = vec![0x55u8; d_out * row_bytes];
        for r in 0..d_out {
            for c in 0..d_in {
                let code = (q[r * d_in + c] as i32 + 1) as u8;
                let b = &mut bytes[r * row_bytes + c / 4];
                *b = (*b & !(3 << (2 * (c % 4)))) | (code << (2 * (c % 4)));
            }
        }
        (bytes, q)
    }

    /// The integer product equals the reference on latent weights `q·γ/p` (which
    /// quantize back to exactly `q`, γ).
    #[test]
    fn cpu_and_device_paths_match_the_reference() {
        let device = Default::default();
        for (tokens, d_in, d_out) in [
            (1, 64, 48),
            (5, 70, 33),
            (16, 257, 129),
            (7, 1030, 65),
            (19, 96, 40),
        ] {
            let (bytes, q) = random_packed(d_out, d_in, (tokens * d_in) as u64);
            validate_codes(&bytes, d_out, d_in).unwrap();
            let gamma = 0.37f32;
            let p = q.iter().filter(|v| **v != 0.0).count() as f32 / q.len() as f32;
            let latent = Tensor::<Flex, 2>::from_data(
                TensorData::new(
                    q.iter().map(|v| v * gamma / p).collect::<Vec<_>>(),
                    [d_out, d_in],
                ),
                &device,
            )
            .transpose();
            let x =
                Tensor::<Flex, 2>::random([tokens, d_in], Distribution::Normal(0.0, 1.0), &device);
            let reference: Vec<f32> = bitlinear_forward(x.clone(), latent, None)
                .output
                .into_data()
                .to_vec()
                .unwrap();
            let xv: Vec<f32> = x.clone().into_data().to_vec().unwrap();
            let portable = gemm(&xv, tokens, &bytes, d_out, d_in, gamma, false);
            let fast = gemm(&xv, tokens, &bytes, d_out, d_in, gamma, use_vnni());
            let words = upload_words::<Flex>(&bytes, d_out, d_in, gamma, &device);
            let dev: Vec<f32> = matmul_words(x, &words).into_data().to_vec().unwrap();
            let norm = reference.iter().map(|v| v * v).sum::<f32>().sqrt();
            // Integer accumulation: both CPU kernels give the same bits.
            assert_eq!(portable, fast);
            let mut rounding = vec![0.5f32, 1.5, 2.5, -0.5, -2.5, 126.5, -127.5, 3.4999];
            rounding
                .iter_mut()
                .for_each(|v| *v = round_clamped(*v, -128.0, 127.0));
            assert_eq!(rounding, [0.0, 2.0, 2.0, -0.0, -2.0, 126.0, -128.0, 3.0]);
            for (name, got) in [("cpu", &fast), ("words", &dev)] {
                let err = got
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                assert!(
                    err / norm < 1e-5,
                    "{name} {tokens}x{d_in}x{d_out}: relative error {}",
                    err / norm
                );
            }
        }
    }

    #[test]
    fn integer_accumulation_is_exact() {
        // One token of all-127 activations against a row of +1 codes: Σ = 127·d_in exactly.
        let d_in = 1000;
        let bytes = vec![0b1010_1010u8; d_in / 4];
        let x = vec![2.0f32; d_in];
        let y = ternary_gemm(&x, 1, &bytes, 1, d_in, 1.0);
        // inv_scale = 2/127: y = 127·1000·(2/127) = 2000.
        assert!((y[0] - 2000.0).abs() < 1e-2, "{}", y[0]);
    }

    #[test]
    fn invalid_codes_and_sizes_are_named() {
        assert!(validate_codes(&[0x55, 0x55], 2, 4).is_ok());
        let err = validate_codes(&[0x55, 0b0111_0101], 2, 4).unwrap_err();
        assert!(err.contains("row 1"), "{err}");
        assert!(validate_codes(&[0x55], 2, 4)
            .unwrap_err()
            .contains("expected 2"));
    }
}

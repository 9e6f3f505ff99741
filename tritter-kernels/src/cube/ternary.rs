//! The ternary GEMM/GEMV: `y[t, o] = (Σ_c xq[t, c] · q[o, c]) · scale[t]`.
//!
//! Weights are the device layout of [`crate::PackedTernary`]: rows of 32-bit words, 16
//! two-bit codes each (`q + 1`; padding codes are 1, i.e. 0). Activations are int8
//! (quantized per token by Burn ops, exactly as the reference does) packed four to a
//! word by [`pack_int8`], so a weight word meets four activation words. Accumulation is
//! in `i32` — exact — and each output is scaled once. Up to [`GEMV_MAX_TOKENS`] tokens
//! (decode) a GEMV kernel gives each weight row 32 threads reading consecutive words;
//! beyond, a tiled GEMM stages weight and activation words in shared memory and has
//! each thread compute 4 × 4 outputs, so every decoded code serves four tokens.

use super::empty_like;
use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

/// Threads per cube along outputs and along tokens.
const TILE: u32 = 16;

#[cube(launch)]
fn pack_int8_kernel<F: Float>(xq: &Tensor<F>, packed: &mut Tensor<i32>) {
    let word = ABSOLUTE_POS_X as usize;
    let t = ABSOLUTE_POS_Y as usize;
    let words = packed.shape(1);
    let d_in = xq.shape(1);
    if t >= packed.shape(0) || word >= words {
        terminate!();
    }
    let mut bits = 0i32;
    #[unroll]
    for k in 0..4u32 {
        let c = word * 4 + k as usize;
        if c < d_in {
            let v = i32::cast_from(xq[t * d_in + c]);
            bits |= (v & 255) << (8 * k) as i32;
        }
    }
    packed[t * words + word] = bits;
}

/// Tokens up to which the product runs as a GEMV (decode, small batches).
pub const GEMV_MAX_TOKENS: usize = 8;
/// GEMV: rows of weights per cube, threads per row.
const GEMV_ROWS: u32 = 8;
const GEMV_LANES: u32 = 32;
// The lane reduction halves five times.
const _: () = assert!(GEMV_LANES == 1 << 5);
/// Tiled GEMM: threads per cube along outputs and tokens, each computing `REG × REG`
/// outputs; weight words staged in shared memory per step.
const GEMM_THREADS: u32 = 16;
const REG: usize = 4;
const GEMM_TILE: usize = GEMM_THREADS as usize * REG;
const GEMM_WORDS: usize = 4;

/// `Σ_{k<4} byte_k(xw) · (code_{4j+k}(ww) − 1)`: one activation word (four int8 values)
/// against the four codes of weight word `ww` it meets at position `j`.
#[cube]
fn word_dot(ww: i32, xw: i32, j: u32) -> i32 {
    let mut acc = 0i32;
    #[unroll]
    for k in 0..4u32 {
        // Sign-extend byte k; decode code (q + 1) at bits 2·(4j + k).
        let a = (xw << (24 - 8 * k) as i32) >> 24;
        let code = (ww >> (2 * (4 * j + k)) as i32) & 3;
        acc += a * (code - 1);
    }
    acc
}

/// Decode and small batches: `GEMV_LANES` threads share a weight row, reading consecutive
/// words (coalesced), each accumulating every token in registers; the lanes' partial sums
/// meet in shared memory.
#[cube(launch)]
fn ternary_gemv_kernel<F: Float>(
    x: &Tensor<i32>,
    w: &Tensor<i32>,
    scale: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] max_tokens: usize,
) {
    let lane = UNIT_POS_X as usize;
    let r = UNIT_POS_Y as usize;
    let lanes = comptime!(GEMV_LANES as usize);
    let o = CUBE_POS_X as usize * comptime!(GEMV_ROWS as usize) + r;
    let d_out = out.shape(1);
    let tokens = out.shape(0);
    let kw = w.shape(1);
    let mut acc = Array::<i32>::new(max_tokens);
    #[unroll]
    for t in 0..max_tokens {
        acc[t] = 0;
    }
    if o < d_out {
        let mut i = lane;
        while i < kw {
            let ww = w[o * kw + i];
            #[unroll]
            for t in 0..max_tokens {
                if t < tokens {
                    let base = t * kw * 4 + i * 4;
                    acc[t] += word_dot(ww, x[base], 0)
                        + word_dot(ww, x[base + 1], 1)
                        + word_dot(ww, x[base + 2], 2)
                        + word_dot(ww, x[base + 3], 3);
                }
            }
            i += lanes;
        }
    }
    let mut partial = SharedMemory::<i32>::new(comptime!(
        GEMV_ROWS as usize * GEMV_LANES as usize * max_tokens
    ));
    let row = r * lanes * max_tokens;
    #[unroll]
    for t in 0..max_tokens {
        partial[row + t * lanes + lane] = acc[t];
    }
    sync_cube();
    // log2(GEMV_LANES) halvings.
    #[unroll]
    for level in 1..6usize {
        let stride = lanes >> level;
        if lane < stride {
            #[unroll]
            for t in 0..max_tokens {
                let at = row + t * lanes + lane;
                partial[at] += partial[at + stride];
            }
        }
        sync_cube();
    }
    if o < d_out && lane < tokens {
        out[lane * d_out + o] = F::cast_from(partial[row + lane * lanes]) * scale[lane];
    }
}

/// Prefill and training: a cube computes `GEMM_TILE` outputs × `GEMM_TILE` tokens, staging
/// `GEMM_WORDS` weight words of each row (and the activation words they meet) in shared
/// memory; each thread decodes a weight word once for `REG` tokens and an activation
/// word once for `REG` outputs.
#[cube(launch)]
fn ternary_gemm_kernel<F: Float>(
    x: &Tensor<i32>,
    w: &Tensor<i32>,
    scale: &Tensor<F>,
    out: &mut Tensor<F>,
) {
    let tile = comptime!(GEMM_TILE);
    let words = comptime!(GEMM_WORDS);
    let threads = comptime!(GEMM_THREADS as usize);
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let o0 = CUBE_POS_X as usize * tile;
    let t0 = CUBE_POS_Y as usize * tile;
    let d_out = out.shape(1);
    let tokens = out.shape(0);
    let kw = w.shape(1);
    let lin = ty * threads + tx;
    let mut ws = SharedMemory::<i32>::new(comptime!(GEMM_TILE * GEMM_WORDS));
    let mut xs = SharedMemory::<i32>::new(comptime!(GEMM_TILE * GEMM_WORDS * 4));
    let mut acc = Array::<i32>::new(comptime!(REG * REG));
    #[unroll]
    for i in 0..REG * REG {
        acc[i] = 0;
    }
    // Padding beyond the matrix: weight words of sixteen codes 1 (q = 0), zero activations.
    // `div_ceil` does not expand in a kernel.
    #[allow(clippy::manual_div_ceil)]
    let steps = (kw + words - 1) / words;
    for step in 0..steps {
        let k0 = step * words;
        // One weight word and four activation words per thread.
        let o = o0 + lin / words;
        let kk = k0 + lin % words;
        let mut word = 0x5555_5555i32;
        if o < d_out && kk < kw {
            word = w[o * kw + kk];
        }
        ws[lin] = word;
        #[unroll]
        for j in 0..4usize {
            let at = lin + j * threads * threads;
            let t = t0 + at / (words * 4);
            let kk = k0 * 4 + at % (words * 4);
            let mut word = 0i32;
            if t < tokens && kk < kw * 4 {
                word = x[t * kw * 4 + kk];
            }
            xs[at] = word;
        }
        sync_cube();
        #[unroll]
        for c in 0..GEMM_WORDS {
            let mut ww = Array::<i32>::new(comptime!(REG));
            #[unroll]
            for a in 0..REG {
                ww[a] = ws[(tx + a * threads) * words + c];
            }
            #[unroll]
            for j in 0..4u32 {
                #[unroll]
                for b in 0..REG {
                    let xw = xs[(ty + b * threads) * words * 4 + c * 4 + j as usize];
                    #[unroll]
                    for a in 0..REG {
                        acc[a * REG + b] += word_dot(ww[a], xw, j);
                    }
                }
            }
        }
        sync_cube();
    }
    #[unroll]
    for a in 0..REG {
        #[unroll]
        for b in 0..REG {
            let o = o0 + tx + a * threads;
            let t = t0 + ty + b * threads;
            if o < d_out && t < tokens {
                out[t * d_out + o] = F::cast_from(acc[a * REG + b]) * scale[t];
            }
        }
    }
}

/// Training's weight quantizer on the device: latent `weight` `[d_in, d_out]` to words
/// `[d_out, ceil(d_in / 16)]` of codes `round(W / γ)` clamped to ±1, plus one (the
/// reference's arithmetic; padding codes are 1). Threads along outputs read
/// consecutive latent weights.
#[cube(launch)]
fn pack_ternary_kernel<F: Float>(weight: &Tensor<F>, gamma: &Tensor<F>, words: &mut Tensor<i32>) {
    let o = ABSOLUTE_POS_X as usize;
    let j = ABSOLUTE_POS_Y as usize;
    let d_out = words.shape(0);
    let kw = words.shape(1);
    let d_in = weight.shape(0);
    if o >= d_out || j >= kw {
        terminate!();
    }
    let g = gamma[0];
    let mut bits = 0i32;
    #[unroll]
    for k in 0..16u32 {
        let c = j * 16 + k as usize;
        let mut code = 1i32;
        if c < d_in {
            let q = F::clamp(
                F::round(weight[c * d_out + o] / g),
                F::new(-1.0),
                F::new(1.0),
            );
            code = i32::cast_from(q) + 1;
        }
        bits |= code << (2 * k) as i32;
    }
    words[o * kw + j] = bits;
}

/// Tokens per thread of [`ternary_transposed_kernel`].
const T_REG: usize = 4;

/// BitLinear's backward to the input: `dx[t, c] = γ · Σ_o dy[t, o] · q[o, c]` in `f32`
/// (the straight-through gradient is not quantized). A thread owns one weight word
/// column (16 inputs) for `T_REG` tokens and walks every output row: neighbouring
/// threads read neighbouring words of a row, and each gradient value is read once per
/// row of threads and serves 16 inputs.
#[cube(launch)]
fn ternary_transposed_kernel<F: Float>(
    dy: &Tensor<F>,
    w: &Tensor<i32>,
    gamma: &Tensor<F>,
    dx: &mut Tensor<F>,
) {
    let j = ABSOLUTE_POS_X as usize;
    let t0 = ABSOLUTE_POS_Y as usize * comptime!(T_REG);
    let d_out = w.shape(0);
    let kw = w.shape(1);
    let tokens = dy.shape(0);
    let d_in = dx.shape(1);
    if j >= kw || t0 >= tokens {
        terminate!();
    }
    let mut acc = Array::<F>::new(comptime!(T_REG * 16));
    #[unroll]
    for i in 0..T_REG * 16 {
        acc[i] = F::new(0.0);
    }
    for o in 0..d_out {
        let ww = w[o * kw + j];
        let mut g = Array::<F>::new(comptime!(T_REG));
        #[unroll]
        for b in 0..T_REG {
            let mut v = F::new(0.0);
            if t0 + b < tokens {
                v = dy[(t0 + b) * d_out + o];
            }
            g[b] = v;
        }
        #[unroll]
        for k in 0..16u32 {
            let q = F::cast_from(((ww >> (2 * k) as i32) & 3) - 1);
            #[unroll]
            for b in 0..T_REG {
                acc[b * 16 + k as usize] += g[b] * q;
            }
        }
    }
    let scale = gamma[0];
    #[unroll]
    for b in 0..T_REG {
        #[unroll]
        for k in 0..16usize {
            let c = j * 16 + k;
            if t0 + b < tokens && c < d_in {
                dx[(t0 + b) * d_in + c] = acc[b * 16 + k] * scale;
            }
        }
    }
}

fn dims(t: &CubeTensor<impl CubeRuntime>) -> [usize; 2] {
    let shape = t.meta.shape();
    [shape[0], shape[1]]
}

fn cubes(x: usize, y: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new_2d(TILE, TILE);
    let count = CubeCount::Static((x as u32).div_ceil(TILE), (y as u32).div_ceil(TILE), 1);
    (count, dim)
}

/// Packs int8-valued floats `[tokens, d_in]` into `[tokens, 4 · ceil(d_in / 16)]` words,
/// four values each, zero-padded to whole weight words.
pub fn pack_int8<R: CubeRuntime, F: Float + CubeElement>(xq: CubeTensor<R>) -> CubeTensor<R> {
    let xq = into_contiguous(xq);
    let [tokens, d_in] = dims(&xq);
    let words = d_in.div_ceil(16) * 4;
    let packed = empty_like(&xq, vec![tokens, words], DType::I32);
    let (count, dim) = cubes(words, tokens);
    pack_int8_kernel::launch::<F, R>(
        &xq.client,
        count,
        dim,
        xq.clone().into_tensor_arg(),
        packed.clone().into_tensor_arg(),
    );
    packed
}

/// `[tokens, d_out]` products of packed activations `x` (from [`pack_int8`]) and packed
/// weight words `w` `[d_out, ceil(d_in / 16)]`, each token's row times `scale[t]`.
pub fn ternary_gemm<R: CubeRuntime, F: Float + CubeElement>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    scale: CubeTensor<R>,
    dtype: DType,
) -> CubeTensor<R> {
    let (x, w, scale) = (
        into_contiguous(x),
        into_contiguous(w),
        into_contiguous(scale),
    );
    let [tokens, x_words] = dims(&x);
    let [d_out, w_words] = dims(&w);
    assert_eq!(x_words, 4 * w_words, "activation and weight words disagree");
    let out = empty_like(&x, vec![tokens, d_out], dtype);
    let client = x.client.clone();
    if tokens <= GEMV_MAX_TOKENS {
        let count = CubeCount::Static((d_out as u32).div_ceil(GEMV_ROWS), 1, 1);
        ternary_gemv_kernel::launch::<F, R>(
            &client,
            count,
            CubeDim::new_2d(GEMV_LANES, GEMV_ROWS),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            scale.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            tokens.next_power_of_two(),
        );
    } else {
        let tile = GEMM_TILE as u32;
        let count = CubeCount::Static(
            (d_out as u32).div_ceil(tile),
            (tokens as u32).div_ceil(tile),
            1,
        );
        ternary_gemm_kernel::launch::<F, R>(
            &client,
            count,
            CubeDim::new_2d(GEMM_THREADS, GEMM_THREADS),
            x.into_tensor_arg(),
            w.into_tensor_arg(),
            scale.into_tensor_arg(),
            out.clone().into_tensor_arg(),
        );
    }
    out
}

/// Words `[d_out, ceil(d_in / 16)]` of latent `weight` `[d_in, d_out]` quantized by
/// `gamma` `[1]`.
pub fn pack_ternary<R: CubeRuntime, F: Float + CubeElement>(
    weight: CubeTensor<R>,
    gamma: CubeTensor<R>,
) -> CubeTensor<R> {
    let (weight, gamma) = (into_contiguous(weight), into_contiguous(gamma));
    let [d_in, d_out] = dims(&weight);
    let kw = d_in.div_ceil(16);
    let words = empty_like(&weight, vec![d_out, kw], DType::I32);
    let (count, dim) = cubes(d_out, kw);
    pack_ternary_kernel::launch::<F, R>(
        &weight.client,
        count,
        dim,
        weight.clone().into_tensor_arg(),
        gamma.into_tensor_arg(),
        words.clone().into_tensor_arg(),
    );
    words
}

/// `[tokens, d_in]` products `γ · dy · q` of `dy` `[tokens, d_out]` and the weight words
/// `w` `[d_out, ceil(d_in / 16)]`.
pub fn ternary_transposed<R: CubeRuntime, F: Float + CubeElement>(
    dy: CubeTensor<R>,
    w: CubeTensor<R>,
    gamma: CubeTensor<R>,
    d_in: usize,
) -> CubeTensor<R> {
    let (dy, w, gamma) = (
        into_contiguous(dy),
        into_contiguous(w),
        into_contiguous(gamma),
    );
    let [tokens, d_out] = dims(&dy);
    let [w_rows, kw] = dims(&w);
    assert_eq!(w_rows, d_out, "gradient width against the matrix's outputs");
    assert_eq!(
        kw,
        d_in.div_ceil(16),
        "weight words against the input width"
    );
    let dx = empty_like(&dy, vec![tokens, d_in], dy.dtype);
    let (count, dim) = cubes(kw, tokens.div_ceil(T_REG));
    ternary_transposed_kernel::launch::<F, R>(
        &dy.client,
        count,
        dim,
        dy.clone().into_tensor_arg(),
        w.into_tensor_arg(),
        gamma.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
    );
    dx
}

use super::fusion::{float_from_cube, float_to_cube, int_from_cube, int_to_cube, Fused};
use crate::packed::{matmul_words, PackedStorage, PackedTernary};
use crate::reference::{absmean_scale, int8_quantize};
use crate::{BitLinearForward, QuantizedWeight};
use burn::tensor::{Int, Tensor as BurnTensor};
use burn_cubecl::{BoolElement, FloatElement, IntElement};

/// BitLinear's packed inference product on a CubeCL device: activations quantized per
/// token by Burn ops (the reference's arithmetic), packed, and multiplied by the kernel.
pub fn packed_matmul<R, F, I, BT>(
    x: BurnTensor<Fused<R, F, I, BT>, 2>,
    w: &PackedTernary<Fused<R, F, I, BT>>,
) -> BurnTensor<Fused<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let (xq, inv_scale) = int8_quantize(x);
    let tokens = xq.dims()[0];
    integer_product(xq, inv_scale.reshape([tokens]) * w.gamma, w)
}

/// `xq · qᵀ` for int8-valued `xq` `[tokens, d_in]`, accumulated exactly in `i32` by the
/// kernel, each row times `scale` `[tokens]`.
pub fn integer_product<R, F, I, BT>(
    xq: BurnTensor<Fused<R, F, I, BT>, 2>,
    scale: BurnTensor<Fused<R, F, I, BT>, 1>,
    w: &PackedTernary<Fused<R, F, I, BT>>,
) -> BurnTensor<Fused<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let PackedStorage::Words(words) = &w.storage else {
        let tokens = xq.dims()[0];
        return matmul_words(xq, w) / w.gamma * scale.reshape([tokens, 1]);
    };
    assert_eq!(xq.dims()[1], w.d_in, "input width against the matrix's");
    let device = xq.device();
    let packed = pack_int8::<R, F>(float_to_cube(xq));
    let out = ternary_gemm::<R, F>(
        packed,
        int_to_cube(words.clone()),
        float_to_cube(scale),
        F::dtype(),
    );
    float_from_cube(out, &device)
}

/// BitLinear's training forward on a CubeCL device: the latent weights quantized into
/// packed words by [`pack_ternary`], activations quantized per token by Burn ops (the
/// reference's arithmetic), and the product by the ternary kernel — exact in `i32`,
/// scaled once by `γ / s`. The packed words are what the backward keeps.
pub fn bitlinear_forward<R, F, I, BT>(
    x: BurnTensor<Fused<R, F, I, BT>, 2>,
    weight: BurnTensor<Fused<R, F, I, BT>, 2>,
    scale: Option<f32>,
) -> BitLinearForward<Fused<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let [tokens, d_in] = x.dims();
    assert_eq!(
        weight.dims()[0],
        d_in,
        "input width against the weight's rows"
    );
    let device = x.device();
    let gamma = absmean_scale(weight.clone(), scale);
    let words = pack_ternary::<R, F>(float_to_cube(weight), float_to_cube(gamma.clone()));
    let (xq, inv_scale) = int8_quantize(x);
    let packed = pack_int8::<R, F>(float_to_cube(xq.clone()));
    let row_scale = inv_scale.clone().reshape([tokens]) * gamma.clone();
    let out = ternary_gemm::<R, F>(packed, words.clone(), float_to_cube(row_scale), F::dtype());
    BitLinearForward {
        output: float_from_cube(out, &device),
        x_quantized: xq * inv_scale,
        w_quantized: QuantizedWeight::Packed {
            words: int_from_cube(words, &device),
            gamma,
            d_in,
        },
    }
}

/// BitLinear's backward to the input from the packed words its forward kept:
/// `dx = γ · dy · Wqᵀ`, `[tokens, d_in]`.
pub fn transposed_product<R, F, I, BT>(
    grad: BurnTensor<Fused<R, F, I, BT>, 2>,
    words: BurnTensor<Fused<R, F, I, BT>, 2, Int>,
    gamma: BurnTensor<Fused<R, F, I, BT>, 1>,
    d_in: usize,
) -> BurnTensor<Fused<R, F, I, BT>, 2>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let device = grad.device();
    let dx = ternary_transposed::<R, F>(
        float_to_cube(grad),
        int_to_cube(words),
        float_to_cube(gamma),
        d_in,
    );
    float_from_cube(dx, &device)
}

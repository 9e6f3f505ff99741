//! The ternary GEMM/GEMV: `y[t, o] = (Σ_c xq[t, c] · q[o, c]) · scale[t]`.
//!
//! Weights are the device layout of [`crate::PackedTernary`]: rows of 32-bit words, 16
//! two-bit codes each (`q + 1`; padding codes are 1, i.e. 0). Activations are int8
//! (quantized per token by Burn ops, exactly as the reference does) packed four to a
//! word by [`pack_int8`], so a weight word meets four activation words. Each thread
//! accumulates one output in `i32` — exact — and scales it once.

use burn::tensor::{DType, Shape};
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

#[cube(launch)]
fn ternary_gemm_kernel<F: Float>(
    x: &Tensor<i32>,
    w: &Tensor<i32>,
    scale: &Tensor<F>,
    out: &mut Tensor<F>,
) {
    let o = ABSOLUTE_POS_X as usize;
    let t = ABSOLUTE_POS_Y as usize;
    let d_out = out.shape(1);
    if o >= d_out || t >= out.shape(0) {
        terminate!();
    }
    let kw = w.shape(1);
    let x_row = t * kw * 4;
    let w_row = o * kw;
    let mut acc = 0i32;
    for i in 0..kw {
        let word = w[w_row + i];
        #[unroll]
        for j in 0..4u32 {
            let xw = x[x_row + i * 4 + j as usize];
            #[unroll]
            for k in 0..4u32 {
                // Sign-extend byte k; decode code (q + 1) at bits 2·(4j + k).
                let a = (xw << (24 - 8 * k) as i32) >> 24;
                let code = (word >> (2 * (4 * j + k)) as i32) & 3;
                acc += a * (code - 1);
            }
        }
    }
    out[t * d_out + o] = F::cast_from(acc) * scale[t];
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
    let shape = Shape::from(vec![tokens, words]);
    let buffer = xq.client.empty(tokens * words * 4);
    let packed = CubeTensor::new_contiguous(
        xq.client.clone(),
        xq.device.clone(),
        shape,
        buffer,
        DType::I32,
    );
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
    let shape = Shape::from(vec![tokens, d_out]);
    let buffer = x.client.empty(tokens * d_out * dtype.size());
    let out = CubeTensor::new_contiguous(x.client.clone(), x.device.clone(), shape, buffer, dtype);
    let (count, dim) = cubes(d_out, tokens);
    let client = x.client.clone();
    ternary_gemm_kernel::launch::<F, R>(
        &client,
        count,
        dim,
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        scale.into_tensor_arg(),
        out.clone().into_tensor_arg(),
    );
    out
}

use super::fusion::{float_from_cube, float_to_cube, int_to_cube, Fused};
use crate::packed::{matmul_words, PackedStorage, PackedTernary};
use crate::reference::int8_quantize;
use burn::tensor::Tensor as BurnTensor;
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

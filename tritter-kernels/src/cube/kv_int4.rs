//! The INT4 KV cache (KIVI) in device memory: the layout and arithmetic of
//! [`crate::kv_int4::Int4KvCache`], with an append kernel that quantizes whole groups on
//! the device and a decode attention kernel that reads the 4-bit codes directly.
//!
//! Codes are packed eight to a 32-bit word (WGSL has no 8-bit integers), rows of
//! `ceil(head_dim / 8)` words per token. Each scale and zero point is an f16, the two
//! packed in one word (scale in the low half), converted in the kernels with integer
//! arithmetic so that devices without f16 arithmetic run them too. The window of recent
//! tokens holds f16 values (in f32 storage), as the host cache does: the device cache
//! quantizes exactly the numbers the host cache quantizes and holds the same codes.
//!
//! Decode attention is split over chunks of [`CHUNK`] tokens (flash decoding): a cube per
//! (query head, chunk) scores its tokens — dequantization fused, one thread per token —
//! takes the chunk's softmax and its weighted values, and a second kernel merges the
//! chunks' partial results by their maxima and sums.

// `div_ceil` does not expand in a kernel.
#![allow(clippy::manual_div_ceil)]

use super::empty_like as empty;
use super::fusion::{float_from_cube, float_to_cube, int_from_cube, int_to_cube, Fused};
use crate::kv_int4::DeviceKvCache;
use burn::tensor::{DType, Int, Tensor as BurnTensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

/// Codes per 32-bit word.
const WORD_CODES: usize = 8;
/// Tokens per cube of the decode kernel; also its thread count, and the largest head_dim.
pub const CHUNK: usize = 256;
// The reductions halve log2(CHUNK) = 8 times.
const _: () = assert!(CHUNK == 1 << 8);
/// Threads per side of the 2-d launches.
const TILE: u32 = 16;
/// Most cubes along y in one launch; threads loop beyond.
const MAX_CUBES_Y: usize = 32768;

/// The f16 nearest `x` (ties to even), as its 16 bits. `x` is finite; beyond f16's range
/// it becomes infinity, below its normals a subnormal.
#[cube]
fn f16_bits(x: f32) -> u32 {
    let b = u32::reinterpret(x);
    let sign = (b >> 16) & 0x8000;
    let a = b & 0x7FFF_FFFF;
    let mut h = 0x7C00u32;
    if a < 0x3880_0000 {
        // Subnormal (or zero): an integer number of 2^-24.
        let v = f32::reinterpret(a) * 16_777_216.0;
        h = u32::cast_from(f32::round(v));
    } else if a < 0x4780_0000 {
        // Round the mantissa to 10 bits, ties to even; a carry moves the exponent.
        let r = a + 0x0FFF + ((a >> 13) & 1);
        h = (r >> 13) - 0x1C000;
    }
    sign | h
}

/// The value of f16 bits `h` (finite).
#[cube]
fn from_f16_bits(h: u32) -> f32 {
    let sign = (h & 0x8000) << 16;
    let e = (h >> 10) & 0x1F;
    let m = h & 0x3FF;
    let mut magnitude = ((e + 112) << 23) | (m << 13);
    if e == 0 {
        magnitude = u32::reinterpret(f32::cast_from(m) * 5.960_464_5e-8);
    }
    f32::reinterpret(sign | magnitude)
}

/// The parameter word of values in `[lo, hi]`: scale `(hi − lo) / 15` and zero point
/// `lo`, each rounded to f16, the scale in the low half.
#[cube]
fn pack_params(lo: f32, hi: f32) -> i32 {
    i32::reinterpret(f16_bits((hi - lo) / 15.0) | (f16_bits(lo) << 16))
}

/// The scale of a packed parameter word (its low half).
#[cube]
fn scale_of(word: i32) -> f32 {
    from_f16_bits(u32::reinterpret(word) & 0xFFFF)
}

/// The zero point of a packed parameter word (its high half).
#[cube]
fn zero_of(word: i32) -> f32 {
    from_f16_bits(u32::reinterpret(word) >> 16)
}

/// The host cache's code: `round((x − zero) / scale)` in `0..=15` (half away from zero;
/// `x ≥ zero` here), 0 for a zero scale.
#[cube]
fn code(x: f32, scale: f32, zero: f32) -> i32 {
    let mut c = 0i32;
    if scale > 0.0 {
        let v = f32::floor((x - zero) / scale + 0.5);
        c = i32::cast_from(f32::clamp(v, 0.0, 15.0));
    }
    c
}

/// Values rounded to f16 (the recent window's precision).
#[cube(launch)]
fn round_f16_kernel<F: Float>(x: &Tensor<F>, out: &mut Tensor<F>) {
    let i = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
    if i < out.len() {
        out[i] = F::cast_from(from_f16_bits(f16_bits(f32::cast_from(x[i]))));
    }
}

/// Keys, per channel over each group of tokens: a thread per (head and group, word of 8
/// channels) measures its channels' ranges, writes their parameters, then the group's
/// codes of those channels, a word per token.
#[cube(launch)]
fn quantize_keys_kernel<F: Float>(
    keys: &Tensor<F>,
    codes: &mut Tensor<i32>,
    params_out: &mut Tensor<i32>,
    #[comptime] group: usize,
) {
    let j = ABSOLUTE_POS_X as usize;
    let hg = ABSOLUTE_POS_Y as usize;
    let n = keys.shape(1);
    let d = keys.shape(2);
    let wpr = codes.shape(2);
    let groups = params_out.shape(1);
    if j >= wpr || hg >= params_out.shape(0) * groups {
        terminate!();
    }
    let h = hg / groups;
    let first_row = h * n + (hg % groups) * group;
    let mut scale = Array::<f32>::new(WORD_CODES);
    let mut zero = Array::<f32>::new(WORD_CODES);
    #[unroll]
    for k in 0..WORD_CODES {
        let c = j * WORD_CODES + k;
        scale[k] = 0.0;
        zero[k] = 0.0;
        if c < d {
            let mut range = Array::<f32>::new(2usize);
            range[0] = f32::cast_from(keys[first_row * d + c]);
            range[1] = range[0];
            for t in 1..group {
                let x = f32::cast_from(keys[(first_row + t) * d + c]);
                range[0] = f32::min(range[0], x);
                range[1] = f32::max(range[1], x);
            }
            let p = pack_params(range[0], range[1]);
            params_out[hg * d + c] = p;
            scale[k] = scale_of(p);
            zero[k] = zero_of(p);
        }
    }
    for t in 0..group {
        let row = first_row + t;
        let mut bits = 0i32;
        #[unroll]
        for k in 0..WORD_CODES {
            let c = j * WORD_CODES + k;
            if c < d {
                let x = f32::cast_from(keys[row * d + c]);
                bits |= code(x, scale[k], zero[k]) << comptime!((4 * k) as i32);
            }
        }
        codes[row * wpr + j] = bits;
    }
}

/// Values, per token over groups of channels: a thread per (token row, channel group).
#[cube(launch)]
fn quantize_values_kernel<F: Float>(
    values: &Tensor<F>,
    codes: &mut Tensor<i32>,
    params_out: &mut Tensor<i32>,
    #[comptime] group: usize,
) {
    let k = ABSOLUTE_POS_X as usize;
    let row = ABSOLUTE_POS_Y as usize;
    let d = values.shape(2);
    let rows = values.shape(0) * values.shape(1);
    let wpr = codes.shape(2);
    let cg = params_out.shape(2);
    if k >= cg || row >= rows {
        terminate!();
    }
    let c0 = k * group;
    let mut range = Array::<f32>::new(2usize);
    range[0] = f32::cast_from(values[row * d + c0]);
    range[1] = range[0];
    for i in 1..group {
        if c0 + i < d {
            let x = f32::cast_from(values[row * d + c0 + i]);
            range[0] = f32::min(range[0], x);
            range[1] = f32::max(range[1], x);
        }
    }
    let p = pack_params(range[0], range[1]);
    params_out[row * cg + k] = p;
    let scale = scale_of(p);
    let zero = zero_of(p);
    #[unroll]
    for w in 0..group / WORD_CODES {
        let j = c0 / WORD_CODES + w;
        if j < wpr {
            let mut bits = 0i32;
            #[unroll]
            for kk in 0..WORD_CODES {
                let c = j * WORD_CODES + kk;
                if c < d {
                    let x = f32::cast_from(values[row * d + c]);
                    bits |= code(x, scale, zero) << comptime!((4 * kk) as i32);
                }
            }
            codes[row * wpr + j] = bits;
        }
    }
}

/// The quantized tokens `0..out.shape(1)` of keys and values as floats (what prefill
/// attends to, and the tests' view of the codes).
#[cube(launch)]
fn dequantize_kernel<F: Float>(
    key_codes: &Tensor<i32>,
    key_params: &Tensor<i32>,
    value_codes: &Tensor<i32>,
    value_params: &Tensor<i32>,
    keys: &mut Tensor<F>,
    values: &mut Tensor<F>,
    #[comptime] group: usize,
) {
    let c = ABSOLUTE_POS_X as usize;
    let d = keys.shape(2);
    let n = keys.shape(1);
    let rows = keys.shape(0) * n;
    let cap = key_codes.shape(1);
    let wpr = key_codes.shape(2);
    let capg = key_params.shape(1);
    let cg = value_params.shape(2);
    let stride = (CUBE_COUNT_Y * CUBE_DIM_Y) as usize;
    let steps = (rows + stride - 1) / stride;
    if c < d {
        for step in 0..steps {
            let row = ABSOLUTE_POS_Y as usize + step * stride;
            if row < rows {
                let h = row / n;
                let t = row % n;
                let shift = i32::cast_from(4 * (c % WORD_CODES));
                let at = (h * cap + t) * wpr + c / WORD_CODES;
                let kp = key_params[(h * capg + t / group) * d + c];
                let kc = f32::cast_from((key_codes[at] >> shift) & 15);
                keys[row * d + c] = F::cast_from(scale_of(kp) * kc + zero_of(kp));
                let vp = value_params[(h * cap + t) * cg + c / group];
                let vc = f32::cast_from((value_codes[at] >> shift) & 15);
                values[row * d + c] = F::cast_from(scale_of(vp) * vc + zero_of(vp));
            }
        }
    }
}

/// One (query head, chunk of tokens) of decode attention: the chunk's maximum score, its
/// sum of exponentials and its exponential-weighted values.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn decode_partial_kernel<F: Float>(
    q: &Tensor<F>,
    key_codes: &Tensor<i32>,
    key_params: &Tensor<i32>,
    value_codes: &Tensor<i32>,
    value_params: &Tensor<i32>,
    recent_keys: &Tensor<F>,
    recent_values: &Tensor<F>,
    part_out: &mut Tensor<F>,
    part_max: &mut Tensor<F>,
    part_sum: &mut Tensor<F>,
    first: u32,
    quantized: u32,
    len: u32,
    #[comptime] group: usize,
) {
    let chunk = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let tid = UNIT_POS_X as usize;
    let nh = q.shape(0);
    let d = q.shape(1);
    let kv_heads = key_codes.shape(0);
    let cap = key_codes.shape(1);
    let wpr = key_codes.shape(2);
    let capg = key_params.shape(1);
    let cg = value_params.shape(2);
    let nr = recent_keys.shape(1);
    let chunks = part_max.shape(1);
    let g = h / (nh / kv_heads);
    let quantized = quantized as usize;
    let len = len as usize;
    let base = first as usize + chunk * CHUNK;

    let mut qs = SharedMemory::<f32>::new(CHUNK);
    if tid < d {
        qs[tid] = f32::cast_from(q[h * d + tid]);
    }
    sync_cube();

    // Scores, a thread per token; the codes' dequantization is fused: (s·c + z)·q.
    let t = base + tid;
    let live = t < len;
    let mut score = Array::<f32>::new(1usize);
    score[0] = -3.0e38;
    if live {
        let mut acc = Array::<f32>::new(1usize);
        acc[0] = 0.0;
        if t < quantized {
            let prow = (g * capg + t / group) * d;
            for j in 0..wpr {
                let word = key_codes[(g * cap + t) * wpr + j];
                #[unroll]
                for k in 0..WORD_CODES {
                    let c = j * WORD_CODES + k;
                    if c < d {
                        let p = key_params[prow + c];
                        let code = f32::cast_from((word >> comptime!((4 * k) as i32)) & 15);
                        acc[0] += qs[c] * (scale_of(p) * code + zero_of(p));
                    }
                }
            }
        } else {
            let row = (g * nr + t - quantized) * d;
            for c in 0..d {
                acc[0] += qs[c] * f32::cast_from(recent_keys[row + c]);
            }
        }
        score[0] = acc[0] / f32::sqrt(f32::cast_from(d));
    }

    let mut weights = SharedMemory::<f32>::new(CHUNK);
    let mut reduce = SharedMemory::<f32>::new(CHUNK);
    reduce[tid] = score[0];
    sync_cube();
    #[unroll]
    for level in 1..9usize {
        let stride = CHUNK >> level;
        if tid < stride {
            reduce[tid] = f32::max(reduce[tid], reduce[tid + stride]);
        }
        sync_cube();
    }
    let max = reduce[0];
    sync_cube();
    let mut p = Array::<f32>::new(1usize);
    p[0] = 0.0;
    if live {
        p[0] = f32::exp(score[0] - max);
    }
    weights[tid] = p[0];
    reduce[tid] = p[0];
    sync_cube();
    #[unroll]
    for level in 1..9usize {
        let stride = CHUNK >> level;
        if tid < stride {
            reduce[tid] += reduce[tid + stride];
        }
        sync_cube();
    }
    let sum = reduce[0];
    sync_cube();

    // Values: thread (lane, channel) sums every `lanes`-th token of the chunk.
    let lanes = CHUNK / d;
    let c = tid % d;
    let lane = tid / d;
    let mut acc = Array::<f32>::new(1usize);
    acc[0] = 0.0;
    if lane < lanes {
        let steps = (CHUNK + lanes - 1) / lanes;
        let shift = i32::cast_from(4 * (c % WORD_CODES));
        for step in 0..steps {
            let i = lane + step * lanes;
            let t = base + i;
            if i < CHUNK && t < len {
                let mut v = Array::<f32>::new(1usize);
                if t < quantized {
                    let word = value_codes[(g * cap + t) * wpr + c / WORD_CODES];
                    let p = value_params[(g * cap + t) * cg + c / group];
                    v[0] = scale_of(p) * f32::cast_from((word >> shift) & 15) + zero_of(p);
                } else {
                    v[0] = f32::cast_from(recent_values[(g * nr + t - quantized) * d + c]);
                }
                acc[0] += weights[i] * v[0];
            }
        }
    }
    reduce[tid] = acc[0];
    sync_cube();
    if lane == 0 {
        let mut total = Array::<f32>::new(1usize);
        total[0] = reduce[c];
        for other in 1..lanes {
            total[0] += reduce[other * d + c];
        }
        part_out[(h * chunks + chunk) * d + c] = F::cast_from(total[0]);
    }
    if tid == 0 {
        part_max[h * chunks + chunk] = F::cast_from(max);
        part_sum[h * chunks + chunk] = F::cast_from(sum);
    }
}

/// Merges the chunks of each query head: `Σ e^(m_j − M) o_j / Σ e^(m_j − M) l_j`.
#[cube(launch)]
fn decode_merge_kernel<F: Float>(
    part_out: &Tensor<F>,
    part_max: &Tensor<F>,
    part_sum: &Tensor<F>,
    out: &mut Tensor<F>,
) {
    let h = CUBE_POS_X as usize;
    let c = UNIT_POS_X as usize;
    let d = out.shape(1);
    let chunks = part_max.shape(1);
    if c < d {
        let mut m = Array::<f32>::new(3usize);
        m[0] = f32::cast_from(part_max[h * chunks]);
        for j in 1..chunks {
            m[0] = f32::max(m[0], f32::cast_from(part_max[h * chunks + j]));
        }
        m[1] = 0.0;
        m[2] = 0.0;
        for j in 0..chunks {
            let w = f32::exp(f32::cast_from(part_max[h * chunks + j]) - m[0]);
            m[1] += w * f32::cast_from(part_sum[h * chunks + j]);
            m[2] += w * f32::cast_from(part_out[(h * chunks + j) * d + c]);
        }
        out[h * d + c] = F::cast_from(m[2] / m[1]);
    }
}

/// A 2-d launch of `x × y` threads in `TILE × TILE` cubes, at most [`MAX_CUBES_Y`] along y.
fn grid(x: usize, y: usize) -> (CubeCount, CubeDim) {
    let cubes_y = y.div_ceil(TILE as usize).clamp(1, MAX_CUBES_Y);
    (
        CubeCount::Static((x as u32).div_ceil(TILE).max(1), cubes_y as u32, 1),
        CubeDim::new_2d(TILE, TILE),
    )
}

fn dims3<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 3] {
    let s = t.meta.shape();
    [s[0], s[1], s[2]]
}

type Float3<R, F, I, BT> = BurnTensor<Fused<R, F, I, BT>, 3>;
type Int3<R, F, I, BT> = BurnTensor<Fused<R, F, I, BT>, 3, Int>;
/// Recent keys and values.
type Window<R, F, I, BT> = (Float3<R, F, I, BT>, Float3<R, F, I, BT>);

/// One layer's INT4 cache for one sequence, on a CubeCL device.
pub struct DeviceInt4KvCache<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    kv_heads: usize,
    head_dim: usize,
    group: usize,
    recent: usize,
    device: burn::tensor::Device<Fused<R, F, I, BT>>,
    /// Tokens the code buffers hold room for (a multiple of `group`).
    capacity: usize,
    quantized: usize,
    /// `[kv_heads, capacity, words]` codes and `[kv_heads, capacity / group, head_dim]`
    /// parameters of the keys; `[kv_heads, capacity, words]` and
    /// `[kv_heads, capacity, channel groups]` of the values.
    key_codes: Int3<R, F, I, BT>,
    key_params: Int3<R, F, I, BT>,
    value_codes: Int3<R, F, I, BT>,
    value_params: Int3<R, F, I, BT>,
    /// The recent tokens, f16 values, `[kv_heads, tokens, head_dim]`.
    window: Option<Window<R, F, I, BT>>,
}

impl<R, F, I, BT> Clone for DeviceInt4KvCache<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn clone(&self) -> Self {
        Self {
            device: self.device.clone(),
            key_codes: self.key_codes.clone(),
            key_params: self.key_params.clone(),
            value_codes: self.value_codes.clone(),
            value_params: self.value_params.clone(),
            window: self.window.clone(),
            ..*self
        }
    }
}

impl<R, F, I, BT> std::fmt::Debug for DeviceInt4KvCache<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceInt4KvCache")
            .field("kv_heads", &self.kv_heads)
            .field("head_dim", &self.head_dim)
            .field("group", &self.group)
            .field("recent", &self.recent)
            .field("quantized", &self.quantized)
            .field("in_recent", &self.in_recent())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl<R, F, I, BT> DeviceInt4KvCache<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    /// Whether the kernels serve this shape: `group` a multiple of 8 (a value group is
    /// whole words), `head_dim` at most [`CHUNK`], at least one recent token, and 32-bit
    /// integer tensors.
    pub fn supports(head_dim: usize, group: usize, recent: usize) -> bool {
        group > 0
            && group.is_multiple_of(WORD_CODES)
            && (1..=CHUNK).contains(&head_dim)
            && recent > 0
            && I::dtype() == DType::I32
    }

    /// An empty cache; see [`Self::supports`].
    pub fn new(
        kv_heads: usize,
        head_dim: usize,
        group: usize,
        recent: usize,
        device: &burn::tensor::Device<Fused<R, F, I, BT>>,
    ) -> Self {
        assert!(
            Self::supports(head_dim, group, recent),
            "device INT4 cache: head_dim {head_dim}, group {group}, recent {recent}"
        );
        let capacity = group;
        let zeros = |shape: [usize; 3]| Int3::<R, F, I, BT>::zeros(shape, device);
        let words = head_dim.div_ceil(WORD_CODES);
        Self {
            kv_heads,
            head_dim,
            group,
            recent,
            device: device.clone(),
            capacity,
            quantized: 0,
            key_codes: zeros([kv_heads, capacity, words]),
            key_params: zeros([kv_heads, capacity / group, head_dim]),
            value_codes: zeros([kv_heads, capacity, words]),
            value_params: zeros([kv_heads, capacity, head_dim.div_ceil(group)]),
            window: None,
        }
    }

    fn in_recent(&self) -> usize {
        self.window.as_ref().map_or(0, |(k, _)| k.dims()[1])
    }

    fn round_f16(&self, x: Float3<R, F, I, BT>) -> Float3<R, F, I, BT> {
        let x = into_contiguous(float_to_cube(x));
        let n = x.meta.shape().num_elements();
        let out = empty(&x, x.meta.shape().to_vec(), x.dtype);
        let cubes = n.div_ceil(CHUNK).max(1);
        let (cx, cy) = (cubes.min(65535), cubes.div_ceil(65535));
        round_f16_kernel::launch::<F, R>(
            &x.client,
            CubeCount::Static(cx as u32, cy as u32, 1),
            CubeDim::new_1d(CHUNK as u32),
            x.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
        );
        float_from_cube(out, &self.device)
    }

    /// Codes and parameters of whole groups of `[kv_heads, n, head_dim]` keys and values.
    fn quantize(
        &self,
        keys: Float3<R, F, I, BT>,
        values: Float3<R, F, I, BT>,
    ) -> [Int3<R, F, I, BT>; 4] {
        let (d, g) = (self.head_dim, self.group);
        let keys = into_contiguous(float_to_cube(keys));
        let values = into_contiguous(float_to_cube(values));
        let [kv, n, _] = dims3(&keys);
        let (words, groups, cg) = (d.div_ceil(WORD_CODES), n / g, d.div_ceil(g));
        let key_codes = empty(&keys, vec![kv, n, words], DType::I32);
        let key_params = empty(&keys, vec![kv, groups, d], DType::I32);
        let value_codes = empty(&keys, vec![kv, n, words], DType::I32);
        let value_params = empty(&keys, vec![kv, n, cg], DType::I32);
        let client = keys.client.clone();
        // Launched at most MAX_CUBES_Y cubes of rows at a time (`quantize_oldest_groups`).
        assert!(
            kv * n <= MAX_CUBES_Y * TILE as usize,
            "too many tokens at once"
        );
        let (count, dim) = grid(words, kv * groups);
        quantize_keys_kernel::launch::<F, R>(
            &client,
            count,
            dim,
            keys.into_tensor_arg(),
            key_codes.clone().into_tensor_arg(),
            key_params.clone().into_tensor_arg(),
            g,
        );
        let (count, dim) = grid(cg, kv * n);
        quantize_values_kernel::launch::<F, R>(
            &client,
            count,
            dim,
            values.into_tensor_arg(),
            value_codes.clone().into_tensor_arg(),
            value_params.clone().into_tensor_arg(),
            g,
        );
        [key_codes, key_params, value_codes, value_params].map(|t| int_from_cube(t, &self.device))
    }

    /// Room for `tokens` quantized tokens, doubling.
    fn reserve(&mut self, tokens: usize) {
        if tokens <= self.capacity {
            return;
        }
        let capacity = tokens.max(2 * self.capacity).next_multiple_of(self.group);
        let grow = |t: &mut Int3<R, F, I, BT>, rows: usize| {
            let [a, old, c] = t.dims();
            let mut bigger = Int3::<R, F, I, BT>::zeros([a, rows, c], &self.device);
            bigger = bigger.slice_assign([0..a, 0..old, 0..c], t.clone());
            *t = bigger;
        };
        grow(&mut self.key_codes, capacity);
        grow(&mut self.key_params, capacity / self.group);
        grow(&mut self.value_codes, capacity);
        grow(&mut self.value_params, capacity);
        self.capacity = capacity;
    }

    /// Quantizes the oldest `groups` groups of the window, in launches of at most
    /// [`MAX_CUBES_Y`] cubes of token rows.
    fn quantize_oldest_groups(&mut self, groups: usize) {
        let (g, kv) = (self.group, self.kv_heads);
        let n = groups * g;
        let (keys, values) = self.window.take().expect("a window to quantize");
        let in_recent = keys.dims()[1];
        self.reserve(self.quantized + n);
        let per_launch = (MAX_CUBES_Y * TILE as usize / kv / g).max(1) * g;
        let mut done = 0;
        while done < n {
            let take = per_launch.min(n - done);
            let [kc, kp, vc, vp] = self.quantize(
                keys.clone().narrow(1, done, take),
                values.clone().narrow(1, done, take),
            );
            let q = self.quantized;
            let put = |t: Int3<R, F, I, BT>, at: usize, new: Int3<R, F, I, BT>| {
                let [_, rows, c] = new.dims();
                t.slice_assign([0..kv, at..at + rows, 0..c], new)
            };
            self.key_codes = put(self.key_codes.clone(), q, kc);
            self.key_params = put(self.key_params.clone(), q / g, kp);
            self.value_codes = put(self.value_codes.clone(), q, vc);
            self.value_params = put(self.value_params.clone(), q, vp);
            self.quantized += take;
            done += take;
        }
        self.window = Some((
            keys.narrow(1, n, in_recent - n),
            values.narrow(1, n, in_recent - n),
        ));
    }
}

impl<R, F, I, BT> DeviceKvCache<Fused<R, F, I, BT>> for DeviceInt4KvCache<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn append(&mut self, keys: Float3<R, F, I, BT>, values: Float3<R, F, I, BT>) {
        let [kv, _, d] = keys.dims();
        assert_eq!(
            [kv, d],
            [self.kv_heads, self.head_dim],
            "keys' heads and width"
        );
        assert_eq!(keys.dims(), values.dims(), "keys against values");
        let (keys, values) = (self.round_f16(keys), self.round_f16(values));
        self.window = Some(match self.window.take() {
            Some((k, v)) => (
                BurnTensor::cat(vec![k, keys], 1),
                BurnTensor::cat(vec![v, values], 1),
            ),
            None => (keys, values),
        });
        let in_recent = self.in_recent();
        if in_recent >= self.recent.saturating_add(self.group) {
            self.quantize_oldest_groups((in_recent - self.recent) / self.group);
        }
    }

    fn len(&self) -> usize {
        self.quantized + self.in_recent()
    }

    fn quantized_len(&self) -> usize {
        self.quantized
    }

    fn bytes(&self) -> usize {
        let per_token =
            4 * (2 * self.head_dim.div_ceil(WORD_CODES) + self.head_dim.div_ceil(self.group));
        let key_params = 4 * self.head_dim * self.capacity / self.group;
        self.kv_heads * (self.capacity * per_token + key_params)
            + 2 * 4 * self.kv_heads * self.in_recent() * self.head_dim
    }

    fn dequantize(&self) -> (Float3<R, F, I, BT>, Float3<R, F, I, BT>) {
        let (kv, d) = (self.kv_heads, self.head_dim);
        let mut parts = (Vec::new(), Vec::new());
        if self.quantized > 0 {
            let key_codes = int_to_cube(self.key_codes.clone());
            let keys = empty(&key_codes, vec![kv, self.quantized, d], F::dtype());
            let values = empty(&key_codes, vec![kv, self.quantized, d], F::dtype());
            let (count, dim) = grid(d, kv * self.quantized);
            dequantize_kernel::launch::<F, R>(
                &key_codes.client.clone(),
                count,
                dim,
                key_codes.into_tensor_arg(),
                int_to_cube(self.key_params.clone()).into_tensor_arg(),
                int_to_cube(self.value_codes.clone()).into_tensor_arg(),
                int_to_cube(self.value_params.clone()).into_tensor_arg(),
                keys.clone().into_tensor_arg(),
                values.clone().into_tensor_arg(),
                self.group,
            );
            parts.0.push(float_from_cube(keys, &self.device));
            parts.1.push(float_from_cube(values, &self.device));
        }
        if let Some((k, v)) = &self.window {
            parts.0.push(k.clone());
            parts.1.push(v.clone());
        }
        assert!(
            !parts.0.is_empty(),
            "keys and values read from an empty cache"
        );
        (BurnTensor::cat(parts.0, 1), BurnTensor::cat(parts.1, 1))
    }

    fn decode_attention(
        &self,
        queries: BurnTensor<Fused<R, F, I, BT>, 2>,
        window: Option<usize>,
    ) -> BurnTensor<Fused<R, F, I, BT>, 2> {
        let [nh, d] = queries.dims();
        assert_eq!(d, self.head_dim, "queries' width");
        assert!(nh.is_multiple_of(self.kv_heads), "GQA: {nh} query heads");
        let (recent_keys, recent_values) = self.window.clone().expect("a non-empty cache");
        let len = self.len();
        let first = window.map_or(0, |w| len.saturating_sub(w));
        let chunks = (len - first).div_ceil(CHUNK);
        let q = into_contiguous(float_to_cube(queries));
        let part_out = empty(&q, vec![nh, chunks, d], F::dtype());
        let part_max = empty(&q, vec![nh, chunks], F::dtype());
        let part_sum = empty(&q, vec![nh, chunks], F::dtype());
        let client = q.client.clone();
        decode_partial_kernel::launch::<F, R>(
            &client,
            CubeCount::Static(chunks as u32, nh as u32, 1),
            CubeDim::new_1d(CHUNK as u32),
            q.clone().into_tensor_arg(),
            int_to_cube(self.key_codes.clone()).into_tensor_arg(),
            int_to_cube(self.key_params.clone()).into_tensor_arg(),
            int_to_cube(self.value_codes.clone()).into_tensor_arg(),
            int_to_cube(self.value_params.clone()).into_tensor_arg(),
            into_contiguous(float_to_cube(recent_keys)).into_tensor_arg(),
            into_contiguous(float_to_cube(recent_values)).into_tensor_arg(),
            part_out.clone().into_tensor_arg(),
            part_max.clone().into_tensor_arg(),
            part_sum.clone().into_tensor_arg(),
            first as u32,
            self.quantized as u32,
            len as u32,
            self.group,
        );
        let out = empty(&q, vec![nh, d], F::dtype());
        decode_merge_kernel::launch::<F, R>(
            &client,
            CubeCount::Static(nh as u32, 1, 1),
            CubeDim::new_1d(CHUNK as u32),
            part_out.into_tensor_arg(),
            part_max.into_tensor_arg(),
            part_sum.into_tensor_arg(),
            out.clone().into_tensor_arg(),
        );
        float_from_cube(out, &self.device)
    }

    fn boxed_clone(&self) -> Box<dyn DeviceKvCache<Fused<R, F, I, BT>>> {
        Box::new(self.clone())
    }
}

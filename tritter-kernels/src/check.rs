//! What the kernel checks share — the lavapipe and CPU kernel tests, the whole-model
//! comparison and the `gpu-check` binary: a relative error, a deterministic generator,
//! random ternary matrices in the export's layout, the attention cases and their
//! reference results.

use crate::mask::{AttentionMask, MaskMod};
use crate::reference;
use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor, TensorData};

/// `‖a − b‖ / ‖b‖`.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f32 {
    let norm = b.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt();
    diff / norm
}

/// A deterministic generator (SplitMix64).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A random ternary matrix: the export's bytes (`[d_out, ceil(d_in / 4)]`, code `q + 1`)
/// and its values `q` (`[d_out, d_in]`).
pub fn random_ternary(d_out: usize, d_in: usize, rng: &mut SplitMix) -> (Vec<u8>, Vec<i32>) {
    let row_bytes = d_in.div_ceil(4);
    let mut bytes = vec![0x55u8; d_out * row_bytes];
    let mut q = vec![0i32; d_out * d_in];
    for o in 0..d_out {
        for c in 0..d_in {
            let code = rng.below(3) as u8;
            q[o * d_in + c] = code as i32 - 1;
            let byte = &mut bytes[o * row_bytes + c / 4];
            *byte = (*byte & !(3 << (2 * (c % 4)))) | (code << (2 * (c % 4)));
        }
    }
    (bytes, q)
}

/// The CPU backend's packed product of `x` `[tokens, d_in]` and the export's bytes of a
/// `[d_out, d_in]` matrix with scale `gamma`: the yardstick of the device products.
pub fn cpu_packed_matmul(
    x: &[f32],
    tokens: usize,
    bytes: &[u8],
    d_out: usize,
    d_in: usize,
    gamma: f32,
) -> Vec<f32> {
    use crate::TritterBackend;
    let device = Default::default();
    Flex::ternary_packed_matmul(
        Tensor::from_data(TensorData::new(x.to_vec(), [tokens, d_in]), &device),
        &Flex::ternary_upload(bytes, d_out, d_in, gamma, &device),
    )
    .into_data()
    .to_vec()
    .expect("f32 products")
}

/// The integer reference of the ternary product: `Σ_c xq[t][c] · q[o][c]`, `[tokens,
/// d_out]` as f32, for `xq` `[tokens, d_in]` and `q` `[d_out, d_in]`.
pub fn ternary_product(xq: &[i32], q: &[i32], d_out: usize, d_in: usize) -> Vec<f32> {
    let tokens = xq.len() / d_in.max(1);
    let mut out = vec![0f32; tokens * d_out];
    for t in 0..tokens {
        for o in 0..d_out {
            let acc: i32 = (0..d_in).map(|c| xq[t * d_in + c] * q[o * d_in + c]).sum();
            out[t * d_out + o] = acc as f32;
        }
    }
    out
}

/// Every mask kind and combination the attention kernels are checked on.
pub fn attention_masks() -> Vec<(&'static str, MaskMod)> {
    vec![
        ("full", MaskMod::Full),
        ("causal", MaskMod::causal()),
        ("sliding window 9", MaskMod::sliding_window(9)),
        ("document causal", MaskMod::document_causal()),
        ("sinks 3 + window 8", MaskMod::sinks(3, 8)),
        ("prefix-lm 11", MaskMod::prefix_lm(11)),
        (
            "prefix-lm 6 and document",
            MaskMod::prefix_lm(6).and(MaskMod::Document),
        ),
        (
            "window 5 or (below 4 and document)",
            MaskMod::sliding_window(5).or(MaskMod::Below(4).and(MaskMod::Document)),
        ),
    ]
}

/// Packed documents of varying lengths in each sequence, `[batch, kv_len]`.
pub fn packed_documents(batch: usize, kv_len: usize) -> Vec<i32> {
    (0..batch)
        .flat_map(|b| {
            let mut doc = 0;
            let mut left = 3 + b * 5;
            (0..kv_len).map(move |_| {
                if left == 0 {
                    doc += 1;
                    left = 7 + (doc as usize * 11) % 23;
                }
                left -= 1;
                doc
            })
        })
        .collect()
}

/// Attention shapes `(batch, heads, kv_heads, q_len, kv_len, d)`: lengths that are not
/// multiples of the 32-row tiles, GQA ratios 1, 2, 4, decode against a longer cache,
/// head_dim 128 (the 3B-and-larger presets') over many key tiles.
pub const ATTENTION_SHAPES: [AttentionCase; 8] = [
    (1, 2, 2, 45, 45, 16),
    (2, 4, 2, 33, 70, 8),
    (1, 4, 1, 1, 70, 32),
    (2, 2, 1, 7, 7, 64),
    (1, 3, 3, 65, 65, 8),
    (1, 8, 2, 1, 300, 128),
    (1, 2, 1, 40, 300, 128),
    (1, 4, 2, 1, 511, 64),
];

/// Standard normal values of `shape` (Burn's generator on the CPU backend).
pub fn normal(shape: [usize; 4]) -> TensorData {
    Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
        .into_data()
}

/// The dense reference's attention output for `q`, `k`, `v` under `mask`.
pub fn reference_attention(
    q: &TensorData,
    k: &TensorData,
    v: &TensorData,
    mask: &AttentionMask,
) -> Vec<f32> {
    let t = |d: &TensorData| Tensor::<Flex, 4>::from_data(d.clone(), &Default::default());
    reference::flex_attention(t(q), t(k), t(v), mask)
        .into_data()
        .to_vec()
        .expect("f32 output")
}

/// The dense reference's gradients `[dq, dk, dv]` of `Σ out ⊙ g` for `[q, k, v, g]`.
pub fn reference_attention_gradients(
    data: [&TensorData; 4],
    mask: &AttentionMask,
) -> [Vec<f32>; 3] {
    let [q, k, v, g] = data.map(|d| Tensor::<Flex, 4>::from_data(d.clone(), &Default::default()));
    let out = reference::flex_attention(q.clone(), k.clone(), v.clone(), mask);
    let (dq, dk, dv) = reference::flex_attention_backward(q, k, v, out, g, mask);
    [dq, dk, dv].map(|t| t.into_data().to_vec().expect("f32 gradient"))
}

/// Gradients `[dq, dk, dv]` of `Σ out ⊙ g` through `B`'s attention and autodiff.
pub fn attention_gradients<B: burn::tensor::backend::AutodiffBackend + crate::TritterBackend>(
    data: [&TensorData; 4],
    mask: &AttentionMask,
    device: &B::Device,
) -> [Vec<f32>; 3] {
    let [q, k, v, g] = data.map(|d| Tensor::<B, 4>::from_data(d.clone(), device));
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let out = B::flex_attention(q.clone(), k.clone(), v.clone(), mask);
    let grads = (out * g).sum().backward();
    [q, k, v].map(|t| {
        t.grad(&grads)
            .expect("a gradient")
            .into_data()
            .to_vec()
            .expect("f32")
    })
}

/// One attention shape: `(batch, heads, kv_heads, q_len, kv_len, d)`.
pub type AttentionCase = (usize, usize, usize, usize, usize, usize);

/// Checks `forward(q, k, v, mask)` against the dense reference on fresh random inputs for
/// every shape of `shapes` and every mask of [`attention_masks`] (documents packed):
/// finite, and within `tolerance` relative error.
pub fn check_attention_forward(
    shapes: &[AttentionCase],
    tolerance: f32,
    forward: impl Fn(&TensorData, &TensorData, &TensorData, &AttentionMask) -> Vec<f32>,
) {
    for &(batch, heads, kv_heads, q_len, kv_len, d) in shapes {
        let (q, k, v) = (
            normal([batch, heads, q_len, d]),
            normal([batch, kv_heads, kv_len, d]),
            normal([batch, kv_heads, kv_len, d]),
        );
        for (name, mask) in attention_masks() {
            let mask = AttentionMask::with_documents(mask, packed_documents(batch, kv_len));
            let expected = reference_attention(&q, &k, &v, &mask);
            let got = forward(&q, &k, &v, &mask);
            assert!(got.iter().all(|x| x.is_finite()), "{name}: not finite");
            let err = relative_l2(&got, &expected);
            assert!(
                err < tolerance,
                "{name}, shape {:?}: relative error {err}",
                (batch, heads, kv_heads, q_len, kv_len, d)
            );
        }
    }
}

/// Checks `gradients([q, k, v, g], mask)` (`[dq, dk, dv]` of `Σ out ⊙ g`) against the
/// dense reference like [`check_attention_forward`].
pub fn check_attention_gradients(
    shapes: &[AttentionCase],
    tolerance: f32,
    gradients: impl Fn([&TensorData; 4], &AttentionMask) -> [Vec<f32>; 3],
) {
    for &(batch, heads, kv_heads, q_len, kv_len, d) in shapes {
        let data = [
            normal([batch, heads, q_len, d]),
            normal([batch, kv_heads, kv_len, d]),
            normal([batch, kv_heads, kv_len, d]),
            normal([batch, heads, q_len, d]),
        ];
        let data = [&data[0], &data[1], &data[2], &data[3]];
        for (name, mask) in attention_masks() {
            let mask = AttentionMask::with_documents(mask, packed_documents(batch, kv_len));
            let expected = reference_attention_gradients(data, &mask);
            let got = gradients(data, &mask);
            for (what, (g, e)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&expected)) {
                assert!(g.iter().all(|x| x.is_finite()), "{name} {what}: not finite");
                let err = relative_l2(g, e);
                assert!(
                    err < tolerance,
                    "{name} {what}, shape {:?}: relative error {err}",
                    (batch, heads, kv_heads, q_len, kv_len, d)
                );
            }
        }
    }
}

/// Softmax attention of one query `[d]` to `[len, d]` keys and values, scaled by `1/√d`,
/// in plain `f32`: the yardstick of the INT4 caches' decode attention.
pub fn one_query_attention(q: &[f32], keys: &[f32], values: &[f32], d: usize) -> Vec<f32> {
    let scores: Vec<f32> = keys
        .chunks(d)
        .map(|k| k.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt())
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = e.iter().sum();
    let mut out = vec![0f32; d];
    for (p, v) in e.iter().zip(values.chunks(d)) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += p / total * x;
        }
    }
    out
}

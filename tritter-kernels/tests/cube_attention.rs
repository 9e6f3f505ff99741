//! The CubeCL flash attention on `Wgpu` (lavapipe in CI) against the reference on the CPU
//! backend: every mask kind and combination, GQA ratios, lengths that are not multiples
//! of the 32-row tiles, decode against a longer cache; forward outputs and, through
//! autodiff, the gradients of queries, keys and values within 1e-3 relative error.

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor, TensorData};
use tritter_kernels::check::relative_l2;
use tritter_kernels::{AttentionMask, MaskMod, TritterBackend};

fn masks() -> Vec<(&'static str, MaskMod)> {
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

/// Packed documents of varying lengths in each sequence.
fn documents(batch: usize, kv_len: usize) -> Vec<i32> {
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

/// (batch, heads, kv_heads, q_len, kv_len, d)
const SHAPES: [(usize, usize, usize, usize, usize, usize); 5] = [
    (1, 2, 2, 45, 45, 16),
    (2, 4, 2, 33, 70, 8),
    (1, 4, 1, 1, 70, 32),
    (2, 2, 1, 7, 7, 64),
    (1, 3, 3, 65, 65, 8),
];

fn random(shape: [usize; 4]) -> TensorData {
    Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
        .into_data()
}

#[test]
fn forward_matches_the_reference_for_every_mask() {
    let device = WgpuDevice::Cpu;
    for (batch, heads, kv_heads, q_len, kv_len, d) in SHAPES {
        let (q, k, v) = (
            random([batch, heads, q_len, d]),
            random([batch, kv_heads, kv_len, d]),
            random([batch, kv_heads, kv_len, d]),
        );
        for (name, mask) in masks() {
            let mask = AttentionMask::with_documents(mask, documents(batch, kv_len));
            let expected: Vec<f32> = Flex::flex_attention(
                Tensor::from_data(q.clone(), &Default::default()),
                Tensor::from_data(k.clone(), &Default::default()),
                Tensor::from_data(v.clone(), &Default::default()),
                &mask,
            )
            .into_data()
            .to_vec()
            .unwrap();
            let got: Vec<f32> = <Wgpu as TritterBackend>::flex_attention(
                Tensor::from_data(q.clone(), &device),
                Tensor::from_data(k.clone(), &device),
                Tensor::from_data(v.clone(), &device),
                &mask,
            )
            .into_data()
            .to_vec()
            .unwrap();
            assert!(got.iter().all(|x| x.is_finite()), "{name}: not finite");
            let err = relative_l2(&got, &expected);
            assert!(
                err < 1e-3,
                "{name}, shape {:?}: relative error {err}",
                (batch, heads, kv_heads, q_len, kv_len, d)
            );
        }
    }
}

/// Gradients of `Σ out ⊙ g` for q, k and v.
fn gradients<B: burn::tensor::backend::AutodiffBackend + TritterBackend>(
    data: [&TensorData; 4],
    mask: &AttentionMask,
    device: &B::Device,
) -> [Vec<f32>; 3] {
    let [q, k, v, g] = data.map(|d| Tensor::<B, 4>::from_data(d.clone(), device));
    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
    let out = B::flex_attention(q.clone(), k.clone(), v.clone(), mask);
    let grads = (out * g).sum().backward();
    [q, k, v].map(|t| t.grad(&grads).unwrap().into_data().to_vec().unwrap())
}

#[test]
fn backward_matches_the_reference_for_every_mask() {
    let device = WgpuDevice::Cpu;
    for (batch, heads, kv_heads, q_len, kv_len, d) in SHAPES {
        let data = [
            random([batch, heads, q_len, d]),
            random([batch, kv_heads, kv_len, d]),
            random([batch, kv_heads, kv_len, d]),
            random([batch, heads, q_len, d]),
        ];
        let data = [&data[0], &data[1], &data[2], &data[3]];
        for (name, mask) in masks() {
            let mask = AttentionMask::with_documents(mask, documents(batch, kv_len));
            let expected = gradients::<Autodiff<Flex>>(data, &mask, &Default::default());
            let got = gradients::<Autodiff<Wgpu>>(data, &mask, &device);
            for (what, (g, e)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&expected)) {
                assert!(g.iter().all(|x| x.is_finite()), "{name} {what}: not finite");
                let err = relative_l2(g, e);
                assert!(
                    err < 1e-3,
                    "{name} {what}, shape {:?}: relative error {err}",
                    (batch, heads, kv_heads, q_len, kv_len, d)
                );
            }
        }
    }
}

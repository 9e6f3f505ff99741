//! The CubeCL flash attention on `Wgpu` (lavapipe in CI) against the dense reference on
//! the CPU backend: every mask kind and combination, GQA ratios, lengths that are not multiples
//! of the 32-row tiles, decode against a longer cache; forward outputs and, through
//! autodiff, the gradients of queries, keys and values within 1e-3 relative error.

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::Autodiff;
use burn::tensor::Tensor;
use tritter_kernels::check::{
    attention_gradients as gradients, attention_masks as masks, normal as random,
    packed_documents as documents, reference_attention, reference_attention_gradients, relative_l2,
    ATTENTION_SHAPES as SHAPES,
};
use tritter_kernels::{AttentionMask, TritterBackend};

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
            let expected = reference_attention(&q, &k, &v, &mask);
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
            let expected = reference_attention_gradients(data, &mask);
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

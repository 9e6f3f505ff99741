//! The CPU backend's kernels (`tritter_kernels::cpu`) against the dense reference: flash
//! attention forward and, through autodiff, its gradients for every mask kind and
//! combination, GQA ratios, lengths that are not multiples of the 32-row tiles, decode
//! against a longer cache; the squared-ReLU gate and its gradient.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor, TensorData};
use tritter_kernels::check::{
    attention_gradients, check_attention_forward, check_attention_gradients, normal, relative_l2,
    AttentionCase, ATTENTION_SHAPES,
};
use tritter_kernels::{reference, AttentionMask, MaskMod, QuantizedWeight, TritterBackend};

/// The shared shapes and two that span several tiles each way (the model's head size).
fn shapes() -> Vec<AttentionCase> {
    let mut shapes = ATTENTION_SHAPES.to_vec();
    shapes.extend([(2, 4, 2, 100, 130, 64), (1, 2, 2, 96, 96, 64)]);
    shapes
}

#[test]
fn attention_forward_matches_the_reference_for_every_mask() {
    check_attention_forward(&shapes(), 1e-5, |q, k, v, mask| {
        let t = |d: &TensorData| Tensor::<Flex, 4>::from_data(d.clone(), &Default::default());
        values(Flex::flex_attention(t(q), t(k), t(v), mask))
    });
}

#[test]
fn attention_gradients_match_the_reference_for_every_mask() {
    check_attention_gradients(&shapes(), 1e-5, |data, mask| {
        attention_gradients::<Autodiff<Flex>>(data, mask, &Default::default())
    });
}

/// The log-sum-exp the forward hands the backward is the dense one.
#[test]
fn attention_log_sum_exp_is_the_scores() {
    let (q, k, v) = (
        normal([2, 2, 40, 16]),
        normal([2, 2, 40, 16]),
        normal([2, 2, 40, 16]),
    );
    let t =
        |d: &burn::tensor::TensorData| Tensor::<Flex, 4>::from_data(d.clone(), &Default::default());
    let mask = AttentionMask::new(MaskMod::sliding_window(7));
    let (_, lse) = Flex::flex_attention_forward(t(&q), t(&k), t(&v), &mask);
    let scores = t(&q).matmul(t(&k).swap_dims(2, 3)) / 4.0;
    let dense = reference::mask_tensor::<Flex>(&mask, [2, 2, 40, 40], &Default::default());
    let scores = scores.mask_fill(dense, f32::NEG_INFINITY);
    let max = scores.clone().max_dim(3);
    let expected = ((scores - max.clone()).exp().sum_dim(3).log() + max).squeeze_dim::<3>(3);
    let got: Vec<f32> = lse.unwrap().into_data().to_vec().unwrap();
    let expected: Vec<f32> = expected.into_data().to_vec().unwrap();
    assert!(relative_l2(&got, &expected) < 1e-6);
}

#[test]
fn squared_relu_gate_and_its_gradient_match_the_reference() {
    type A = Autodiff<Flex>;
    let device = Default::default();
    for (rows, ffn) in [(1, 1), (37, 19), (130, 96)] {
        let x = Tensor::<Flex, 2>::random([rows, 2 * ffn], Distribution::Normal(0.0, 1.0), &device);
        let g = Tensor::<Flex, 2>::random([rows, ffn], Distribution::Normal(0.0, 1.0), &device);
        let got: Vec<f32> = Flex::squared_relu_gate(x.clone(), ffn)
            .into_data()
            .to_vec()
            .unwrap();
        let want: Vec<f32> = reference::squared_relu_gate(x.clone(), ffn)
            .into_data()
            .to_vec()
            .unwrap();
        assert!(relative_l2(&got, &want) < 1e-6, "forward {rows}×{ffn}");
        // The fused op's gradient, and the gradient of the reference differentiated op by op.
        let gradient = |fused: bool| -> Vec<f32> {
            let x = Tensor::<A, 2>::from_data(x.to_data(), &device).require_grad();
            let y = if fused {
                A::squared_relu_gate(x.clone(), ffn)
            } else {
                reference::squared_relu_gate(x.clone(), ffn)
            };
            let grads = (y * Tensor::from_data(g.to_data(), &device))
                .sum()
                .backward();
            x.grad(&grads).unwrap().into_data().to_vec().unwrap()
        };
        let (fused, by_ops) = (gradient(true), gradient(false));
        assert!(relative_l2(&fused, &by_ops) < 1e-6, "gradient {rows}×{ffn}");
        let hand: Vec<f32> = reference::squared_relu_gate_backward(x, g, ffn)
            .into_data()
            .to_vec()
            .unwrap();
        assert!(
            relative_l2(&hand, &by_ops) < 1e-6,
            "reference gradient {rows}×{ffn}"
        );
    }
}

fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

#[test]
fn rms_norm_and_its_gradients_match_the_reference() {
    let device = Default::default();
    for (rows, d) in [(1, 5), (45, 64), (300, 33), (4096, 64)] {
        let x = Tensor::<Flex, 2>::random([rows, d], Distribution::Normal(0.0, 2.0), &device);
        let gamma = Tensor::<Flex, 1>::random([d], Distribution::Normal(1.0, 0.3), &device);
        let g = Tensor::<Flex, 2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device);
        let got = values(Flex::rms_norm(x.clone(), gamma.clone(), 1e-5));
        let want = values(reference::rms_norm(x.clone(), gamma.clone(), 1e-5));
        assert!(relative_l2(&got, &want) < 1e-6, "forward {rows}×{d}");
        let (dx, dg) = Flex::rms_norm_backward(x.clone(), gamma.clone(), 1e-5, g.clone());
        // Summed in a fixed order: the same bits on every call, whatever the scheduling.
        let again = Flex::rms_norm_backward(x.clone(), gamma.clone(), 1e-5, g.clone()).1;
        assert_eq!(values(dg.clone()), values(again), "dgamma is deterministic");
        let (want_dx, want_dg) = reference::rms_norm_backward(x, gamma, 1e-5, g);
        assert!(
            relative_l2(&values(dx), &values(want_dx)) < 1e-5,
            "dx {rows}×{d}"
        );
        assert!(
            relative_l2(&values(dg), &values(want_dg)) < 1e-5,
            "dgamma {rows}×{d}"
        );
    }
}

#[test]
fn rotary_and_its_gradient_match_the_reference() {
    type A = Autodiff<Flex>;
    let device = Default::default();
    let shape = [2, 3, 17, 16];
    let random = || Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let (x, cos, sin, g) = (random(), random(), random(), random());
    let got = values(Flex::rotary(x.clone(), cos.clone(), sin.clone()));
    let want = values(reference::rotary(x.clone(), cos.clone(), sin.clone()));
    assert!(relative_l2(&got, &want) < 1e-6);
    let gradient = |fused: bool| -> Vec<f32> {
        let a = |t: &Tensor<Flex, 4>| Tensor::<A, 4>::from_data(t.to_data(), &device);
        let x = a(&x).require_grad();
        let y = if fused {
            A::rotary(x.clone(), a(&cos), a(&sin))
        } else {
            reference::rotary(x.clone(), a(&cos), a(&sin))
        };
        let grads = (y * a(&g)).sum().backward();
        x.grad(&grads).unwrap().into_data().to_vec().unwrap()
    };
    assert!(relative_l2(&gradient(true), &gradient(false)) < 1e-6);
}

#[test]
fn qk_norm_and_rotation_match_the_reference() {
    let device = Default::default();
    // Grouped and plain attention; one row and a prefill chunk.
    for (rows, heads, kv_heads, d) in [(1, 4, 2, 16), (37, 3, 3, 32), (16, 20, 4, 128)] {
        let random = |shape: [usize; 2]| {
            Tensor::<Flex, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let qkv = random([rows, (heads + 2 * kv_heads) * d]);
        let (cos, sin) = (random([rows, d]), random([rows, d]));
        let gains = random([2, d]);
        let gain = |i: usize| gains.clone().narrow(0, i, 1).reshape([d]);
        let got = Flex::qk_norm_rotary(
            qkv.clone(),
            gain(0),
            gain(1),
            1e-6,
            cos.clone(),
            sin.clone(),
            heads,
            kv_heads,
        );
        let want =
            reference::qk_norm_rotary(qkv, gain(0), gain(1), 1e-6, cos, sin, heads, kv_heads);
        for (name, got, want) in [
            ("q", &got[0], &want[0]),
            ("k", &got[1], &want[1]),
            ("v", &got[2], &want[2]),
        ] {
            assert_eq!(got.dims(), want.dims(), "{name}");
            let err = relative_l2(&values(got.clone()), &values(want.clone()));
            assert!(err < 1e-6, "{name} {rows}×{heads}/{kv_heads}×{d}: {err}");
        }
    }
}

#[test]
fn bitlinear_quantization_matches_the_reference() {
    let device = Default::default();
    for (tokens, d_in, d_out, scale) in [
        (1, 8, 4, None),
        (37, 70, 33, None),
        (64, 256, 96, Some(0.02)),
    ] {
        // Include ties of the rounding (x·127/absmax at .5) and an all-zero row.
        let mut x: Vec<f32> =
            Tensor::<Flex, 2>::random([tokens, d_in], Distribution::Normal(0.0, 1.0), &device)
                .into_data()
                .to_vec()
                .unwrap();
        x[..d_in].iter_mut().for_each(|v| *v = 0.0);
        let x =
            Tensor::<Flex, 2>::from_data(burn::tensor::TensorData::new(x, [tokens, d_in]), &device);
        let w = Tensor::<Flex, 2>::random([d_in, d_out], Distribution::Normal(0.0, 0.05), &device);
        let got = Flex::bitlinear_forward(x.clone(), w.clone(), scale);
        let want = reference::bitlinear_forward(x, w, scale);
        for (what, a, b) in [
            ("x", got.x_quantized, want.x_quantized),
            ("w", got.w_quantized.dense(), want.w_quantized.dense()),
            ("output", got.output, want.output),
        ] {
            let err = relative_l2(&values(a), &values(b));
            // γ is a mean over the whole matrix: summation order moves it by an ulp.
            assert!(err < 1e-5, "{what} {tokens}×{d_in}×{d_out}: {err}");
        }
    }
}

#[test]
fn head_split_and_merge_match_the_reference_with_gradients() {
    type A = Autodiff<Flex>;
    let device = Default::default();
    let (batch, seq, hd) = (2, 5, 4);
    let width = 7 * hd;
    let x = Tensor::<Flex, 3>::random([batch, seq, width], Distribution::Normal(0.0, 1.0), &device);
    let g = Tensor::<Flex, 4>::random([batch, 3, seq, hd], Distribution::Normal(0.0, 1.0), &device);
    let got = values(Flex::split_heads(x.clone(), 2, 3, hd));
    let want = values(reference::split_heads(x.clone(), 2, 3, hd));
    assert_eq!(got, want);
    let heads = reference::split_heads(x.clone(), 2, 3, hd);
    let got = values(Flex::merge_heads(heads.clone(), width, 2));
    let want = values(reference::merge_heads(heads, width, 2));
    assert_eq!(got, want);
    // Split then merge through autodiff: fused ops against Burn's own ops.
    let gradient = |fused: bool| -> Vec<f32> {
        let x = Tensor::<A, 3>::from_data(x.to_data(), &device).require_grad();
        let g = Tensor::<A, 4>::from_data(g.to_data(), &device);
        let y = if fused {
            A::merge_heads(A::split_heads(x.clone(), 2, 3, hd) * g, 3 * hd, 0)
        } else {
            reference::merge_heads(reference::split_heads(x.clone(), 2, 3, hd) * g, 3 * hd, 0)
        };
        let grads = (y.clone() * y).sum().backward();
        x.grad(&grads).unwrap().into_data().to_vec().unwrap()
    };
    assert!(relative_l2(&gradient(true), &gradient(false)) < 1e-6);
}

#[test]
fn bitlinear_backward_products_match_burns_matmul() {
    let device = Default::default();
    for (tokens, d_in, d_out) in [(1, 3, 2), (37, 70, 33), (130, 64, 200)] {
        let r = |shape: [usize; 2]| {
            Tensor::<Flex, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let (xq, wq, grad) = (r([tokens, d_in]), r([d_in, d_out]), r([tokens, d_out]));
        let dense = || QuantizedWeight::Dense(wq.clone());
        let (dx, dw) = Flex::bitlinear_backward(xq.clone(), dense(), grad.clone(), [true, true]);
        let want_dx = values(grad.clone().matmul(wq.clone().transpose()));
        let want_dw = values(xq.clone().transpose().matmul(grad.clone()));
        assert!(
            relative_l2(&values(dx.unwrap()), &want_dx) < 1e-6,
            "dx {tokens}×{d_in}×{d_out}"
        );
        assert!(
            relative_l2(&values(dw.unwrap()), &want_dw) < 1e-6,
            "dw {tokens}×{d_in}×{d_out}"
        );
        let (dx, dw) = Flex::bitlinear_backward(xq, dense(), grad, [false, true]);
        assert!(dx.is_none() && dw.is_some());
    }
}

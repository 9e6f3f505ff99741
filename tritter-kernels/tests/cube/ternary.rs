//! The CubeCL ternary GEMM on `Wgpu` (lavapipe in CI: `WgpuDevice::Cpu`): exact against
//! the integer reference, and equal to the CPU backend's packed product, on shapes that
//! are not multiples of the kernels' tiles: the GEMV (up to 8 tokens; 8 rows × 32 lanes)
//! and the tiled GEMM (64 outputs × 64 tokens per cube, 4 weight words = 64 inputs per
//! step, 16 inputs per word).

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::tensor::{Tensor, TensorData};
use tritter_kernels::check::{
    cpu_packed_matmul, random_ternary, relative_l2, ternary_product, SplitMix,
};
use tritter_kernels::cube::ternary::integer_product;
use tritter_kernels::TritterBackend;

const SHAPES: [(usize, usize, usize); 12] = [
    (1, 1, 1),
    (1, 33, 100),
    (3, 17, 257),
    (5, 9, 1100),
    (8, 64, 64),
    (9, 1, 17),
    (17, 15, 33),
    (40, 70, 300),
    (2, 5, 4096),
    (16, 16, 16),
    (64, 64, 64),
    (130, 129, 1000),
];

#[test]
fn ternary_gemm_is_exact_against_the_integer_reference() {
    let device = WgpuDevice::Cpu;
    let mut rng = SplitMix(7);
    for (tokens, d_out, d_in) in SHAPES {
        let (bytes, q) = random_ternary(d_out, d_in, &mut rng);
        // int8 activations, the extremes included.
        let xq: Vec<i32> = (0..tokens * d_in)
            .map(|i| match i % 97 {
                0 => -128,
                1 => 127,
                _ => rng.below(256) as i32 - 128,
            })
            .collect();
        let expected = ternary_product(&xq, &q, d_out, d_in);
        let w = <Wgpu as TritterBackend>::ternary_upload(&bytes, d_out, d_in, 1.0, &device);
        let x = Tensor::<Wgpu, 2>::from_data(
            TensorData::new(
                xq.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                [tokens, d_in],
            ),
            &device,
        );
        let scale = Tensor::<Wgpu, 1>::ones([tokens], &device);
        let got: Vec<f32> = integer_product(x, scale, &w).into_data().to_vec().unwrap();
        assert_eq!(got, expected, "tokens {tokens}, d_out {d_out}, d_in {d_in}");
    }
}

#[test]
fn packed_matmul_on_wgpu_equals_the_cpu_backend() {
    let device = WgpuDevice::Cpu;
    let mut rng = SplitMix(11);
    for (tokens, d_out, d_in) in SHAPES {
        let (bytes, _) = random_ternary(d_out, d_in, &mut rng);
        let mut x: Vec<f32> = (0..tokens * d_in)
            .map(|_| (rng.below(20001) as f32 - 10000.0) / 3000.0)
            .collect();
        // A row of zeros: its scale is the clamp, its output zero.
        if tokens > 2 {
            x[d_in..2 * d_in].fill(0.0);
        }
        let gamma = 0.37;
        let cpu = cpu_packed_matmul(&x, tokens, &bytes, d_out, d_in, gamma);
        let gpu = <Wgpu as TritterBackend>::ternary_packed_matmul(
            Tensor::from_data(TensorData::new(x, [tokens, d_in]), &device),
            &<Wgpu as TritterBackend>::ternary_upload(&bytes, d_out, d_in, gamma, &device),
        );
        let gpu: Vec<f32> = gpu.into_data().to_vec().unwrap();
        let err = relative_l2(&gpu, &cpu);
        assert!(
            err < 1e-6,
            "tokens {tokens}, d_out {d_out}, d_in {d_in}: relative difference {err}"
        );
        assert!(gpu.iter().all(|v| v.is_finite()));
    }
}

/// Training through the kernels: the latent weights packed on the device, the forward by
/// the ternary GEMM/GEMV, the backward to the input by the transposed ternary kernel,
/// against the straight-through reference in Burn ops on the same device.
#[test]
fn bitlinear_trains_through_the_ternary_kernels() {
    type A = burn::backend::Autodiff<Wgpu>;
    let device = WgpuDevice::Cpu;
    let mut rng = SplitMix(13);
    let mut normal = |n: usize, std: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.below(20001) as f32 - 10000.0) / 10000.0 * std * 1.7)
            .collect()
    };
    for (tokens, d_out, d_in) in SHAPES {
        let x = normal(tokens * d_in, 1.0);
        let w = normal(d_in * d_out, 0.05);
        let g = normal(tokens * d_out, 1.0);
        for scale in [None, Some(0.021)] {
            let what = format!("tokens {tokens}, d_out {d_out}, d_in {d_in}, scale {scale:?}");
            let run = |kernels: bool| {
                let x =
                    Tensor::<A, 2>::from_data(TensorData::new(x.clone(), [tokens, d_in]), &device)
                        .require_grad();
                let w =
                    Tensor::<A, 2>::from_data(TensorData::new(w.clone(), [d_in, d_out]), &device)
                        .require_grad();
                let y = if kernels {
                    A::bitlinear_matmul(x.clone(), w.clone(), scale)
                } else {
                    tritter_kernels::reference::bitlinear_matmul(x.clone(), w.clone(), scale)
                };
                let g =
                    Tensor::<A, 2>::from_data(TensorData::new(g.clone(), [tokens, d_out]), &device);
                let grads = (y.clone() * g).sum().backward();
                [y.inner(), x.grad(&grads).unwrap(), w.grad(&grads).unwrap()]
                    .map(|t| t.into_data().to_vec::<f32>().unwrap())
            };
            let got = run(true);
            let want = run(false);
            for (name, got, want) in [
                ("y", &got[0], &want[0]),
                ("dx", &got[1], &want[1]),
                ("dW", &got[2], &want[2]),
            ] {
                assert!(
                    got.iter().all(|v| v.is_finite()),
                    "{name} {what}: not finite"
                );
                let err = relative_l2(got, want);
                assert!(err < 1e-5, "{name} {what}: relative difference {err}");
            }
            // The packed words the backward keeps are the reference's quantization, exactly.
            let x =
                Tensor::<Wgpu, 2>::from_data(TensorData::new(x.clone(), [tokens, d_in]), &device);
            let w =
                Tensor::<Wgpu, 2>::from_data(TensorData::new(w.clone(), [d_in, d_out]), &device);
            let forward = Wgpu::bitlinear_forward(x.clone(), w.clone(), scale);
            assert!(
                matches!(
                    forward.w_quantized,
                    tritter_kernels::QuantizedWeight::Packed { .. }
                ),
                "{what}: the forward keeps packed words"
            );
            let reference = tritter_kernels::reference::bitlinear_forward(x, w, scale);
            let packed: Vec<f32> = forward.w_quantized.dense().into_data().to_vec().unwrap();
            let dense: Vec<f32> = reference.w_quantized.dense().into_data().to_vec().unwrap();
            assert_eq!(packed, dense, "{what}: quantized weights");
        }
    }
}

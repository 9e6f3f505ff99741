//! The CubeCL ternary product on an f16 `Wgpu` backend (lavapipe in CI), in a test binary
//! of its own: in a process that has already run the product on an f32 `Wgpu` backend on
//! the same device, the f16 product comes back as zeros of the right signs (Burn's own
//! f16 ops are unaffected). That interaction is not yet understood; one precision per
//! device per process is what the engine uses.

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::tensor::{Tensor, TensorData};
use tritter_kernels::check::{
    cpu_packed_matmul, random_ternary, relative_l2, ternary_product, SplitMix,
};
use tritter_kernels::cube::ternary::integer_product;
use tritter_kernels::TritterBackend;

/// On an f16 backend the kernel writes f16: integer sums small enough for f16 to hold
/// exactly come out exact.
#[test]
fn ternary_gemm_writes_f16_on_an_f16_backend() {
    type Half = Wgpu<half::f16, i32>;
    let device = WgpuDevice::Cpu;
    let mut rng = SplitMix(13);
    for (tokens, d_out, d_in) in [(1, 33, 100), (5, 9, 300), (70, 65, 130)] {
        let (bytes, q) = random_ternary(d_out, d_in, &mut rng);
        // |Σ| ≤ 7 · d_in ≤ 2048: exact in f16.
        let xq: Vec<i32> = (0..tokens * d_in)
            .map(|_| rng.below(15) as i32 - 7)
            .collect();
        let expected = ternary_product(&xq, &q, d_out, d_in);
        let w = <Half as TritterBackend>::ternary_upload(&bytes, d_out, d_in, 1.0, &device);
        let values: Vec<half::f16> = xq.iter().map(|&v| half::f16::from_f32(v as f32)).collect();
        let x = Tensor::<Half, 2>::from_data(TensorData::new(values, [tokens, d_in]), &device);
        let scale = Tensor::<Half, 1>::from_data(
            TensorData::new(vec![half::f16::ONE; tokens], [tokens]),
            &device,
        );
        let out = integer_product(x, scale, &w).into_data();
        assert_eq!(out.dtype, burn::tensor::DType::F16);
        let got: Vec<f32> = out.convert::<f32>().to_vec().unwrap();
        assert_eq!(got, expected, "tokens {tokens}, d_out {d_out}, d_in {d_in}");

        // The packed engine's product (quantization by Burn ops, then the kernel) in f16
        // against the CPU backend's in f32.
        let x: Vec<f32> = (0..tokens * d_in)
            .map(|_| (rng.below(20001) as f32 - 10000.0) / 3000.0)
            .collect();
        let gamma = 0.37;
        let cpu = cpu_packed_matmul(&x, tokens, &bytes, d_out, d_in, gamma);
        let halves: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
        let gpu = <Half as TritterBackend>::ternary_packed_matmul(
            Tensor::from_data(TensorData::new(halves, [tokens, d_in]), &device),
            &<Half as TritterBackend>::ternary_upload(&bytes, d_out, d_in, gamma, &device),
        );
        let gpu: Vec<f32> = gpu.into_data().convert::<f32>().to_vec().unwrap();
        let err = relative_l2(&gpu, &cpu);
        assert!(err < 1e-2, "f16 product: relative difference {err}");
    }
}

//! BitLinear: a linear layer with ternary weights and int8 activations (BitNet b1.58).

use burn::module::{Module, Param};
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use tritter_kernels::TritterBackend;

#[derive(Config, Debug)]
pub struct BitLinearConfig {
    pub d_input: usize,
    pub d_output: usize,
    #[config(default = 1e-5)]
    pub norm_eps: f64,
}

/// Latent f32 weights `[d_input, d_output]`, quantized in the forward pass to
/// `{−1, 0, 1}·γ` per tensor, with the input RMS-normalized ("SubLN") and quantized to
/// int8 per token. No bias.
#[derive(Module, Debug)]
pub struct BitLinear<B: Backend> {
    pub norm: RmsNorm<B>,
    pub weight: Param<Tensor<B, 2>>,
    /// `γ` fixed instead of measured from the weights: set for a layer loaded from an
    /// export, whose weights are `Wq · γ`, so that it computes exactly what the exporting
    /// model did. Not part of the record (checkpoints always measure `γ`).
    #[module(skip)]
    pub scale: Option<f32>,
}

impl BitLinearConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> BitLinear<B> {
        // Normal with std 1/sqrt(d_input): unit-variance outputs for unit-variance inputs.
        let std = 1.0 / (self.d_input as f64).sqrt();
        let weight = Tensor::random(
            [self.d_input, self.d_output],
            Distribution::Normal(0.0, std),
            device,
        );
        BitLinear {
            norm: RmsNormConfig::new(self.d_input)
                .with_epsilon(self.norm_eps)
                .init(device),
            weight: Param::from_tensor(weight),
            scale: None,
        }
    }
}

/// RMSNorm through the backend extension (one graph node under autodiff).
pub fn rms_norm<B: TritterBackend, const D: usize>(
    norm: &RmsNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let d = dims[D - 1];
    let rows = dims.iter().product::<usize>() / d;
    B::rms_norm(x.reshape([rows, d]), norm.gamma.val(), norm.epsilon).reshape(dims)
}

impl<B: TritterBackend> BitLinear<B> {
    /// `[..., d_input]` → `[..., d_output]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_input = dims[D - 1];
        let tokens = dims[..D - 1].iter().product::<usize>();
        let x = rms_norm(&self.norm, x).reshape([tokens, d_input]);
        let y = B::bitlinear_matmul(x, self.weight.val(), self.scale);
        let mut out_dims = dims;
        out_dims[D - 1] = self.weight.dims()[1];
        y.reshape(out_dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use burn::tensor::TensorData;

    #[test]
    fn forward_matches_hand_computed_quantization() {
        let device = Default::default();
        let mut layer = BitLinearConfig::new(2, 2).init::<TestBackend>(&device);
        // mean|W| = (0.4 + 0.1 + 0.3 + 0.8) / 4 = 0.4 → W/γ = [[1, -0.25], [0.75, -2]]
        // → round, clamp → Wq = [[1, 0], [1, -1]], used as Wq·γ.
        layer.weight = Param::from_data([[0.4, -0.1], [0.3, -0.8]], &device);
        // Input [3, 4]: RMSNorm → [3, 4] / sqrt((9 + 16) / 2) = [0.8485, 1.1314];
        // absmax per token: s = 127 / 1.1314 → xq = round([95.25, 127]) = [95, 127].
        let x = Tensor::<TestBackend, 2>::from_data([[3.0, 4.0]], &device);
        let y = layer.forward(x);
        let rms = (12.5f32).sqrt();
        let inv_s = (4.0 / rms) / 127.0;
        let x0 = 95.0 * inv_s;
        let x1 = 127.0 * inv_s;
        let gamma = 0.4f32;
        let expected = [(x0 + x1) * gamma, -x1 * gamma];
        y.into_data()
            .assert_approx_eq::<f32>(&TensorData::from([expected]), Default::default());
    }

    #[test]
    fn straight_through_gradients_pass_the_quantizers() {
        use burn::backend::Autodiff;
        type B = Autodiff<TestBackend>;
        let device = Default::default();
        let x = Tensor::<B, 2>::from_data([[0.3, -1.2, 0.7]], &device).require_grad();
        let w = Tensor::<B, 2>::from_data([[0.5, -0.2], [0.1, 0.9], [-0.7, 0.05]], &device)
            .require_grad();
        let y = tritter_kernels::reference::bitlinear_matmul(x.clone(), w.clone(), None);
        let grads = y.sum().backward();
        // With STE, d(sum(x·W))/dW = xᵀ·1 and d/dx = 1·Wqᵀ... i.e. the gradient of the
        // float product through the quantized operands: dW[i][j] = xq[i], dx[i] = Σ_j Wq[i][j].
        let gw: Vec<f32> = w.grad(&grads).unwrap().into_data().to_vec().unwrap();
        let gx: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
        // xq = round(x·127/1.2)·1.2/127
        let q = |v: f32| (v * 127.0 / 1.2).round() * 1.2 / 127.0;
        let expected_gw = [q(0.3), q(0.3), q(-1.2), q(-1.2), q(0.7), q(0.7)];
        for (a, b) in gw.iter().zip(expected_gw) {
            assert!((a - b).abs() < 1e-5, "{gw:?}");
        }
        // γ = mean|W| = 2.45 / 6; Wq = [[1, 0], [0, 1], [-1, 0]] (0.05/γ rounds to 0).
        let gamma = 2.45f32 / 6.0;
        let expected_gx = [gamma, gamma, -gamma];
        for (a, b) in gx.iter().zip(expected_gx) {
            assert!((a - b).abs() < 1e-5, "{gx:?}");
        }
    }
}

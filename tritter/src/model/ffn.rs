//! Squared-ReLU gated feed-forward: `down(relu(gate(x))² ⊙ up(x))`.

use super::bitlinear::{BitLinear, BitLinearConfig};
use super::config::TritterConfig;
use burn::prelude::*;
use tritter_kernels::TritterBackend;

#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// `[hidden, 2·ffn]`: gate and up projections in one product.
    pub gate_up: BitLinear<B>,
    pub down: BitLinear<B>,
    pub ffn_size: usize,
}

impl<B: Backend> FeedForward<B> {
    pub fn new(config: &TritterConfig, device: &B::Device) -> Self {
        Self {
            gate_up: BitLinearConfig::new(config.hidden_size, 2 * config.ffn_size)
                .with_norm_eps(config.norm_eps)
                .init(device),
            down: BitLinearConfig::new(config.ffn_size, config.hidden_size)
                .with_norm_eps(config.norm_eps)
                .init(device),
            ffn_size: config.ffn_size,
        }
    }
}

impl<B: TritterBackend> FeedForward<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down
            .forward(squared_relu_gate(self.gate_up.forward(x), self.ffn_size))
    }
}

/// `relu(gate)² ⊙ up` from the fused gate/up product `[..., 2·ffn]` → `[..., ffn]`
/// (one fused op of the backend).
pub fn squared_relu_gate<B: TritterBackend, const D: usize>(
    gate_up: Tensor<B, D>,
    ffn_size: usize,
) -> Tensor<B, D> {
    let mut dims = gate_up.dims();
    let width = dims[D - 1];
    let rows = dims.iter().product::<usize>() / width;
    dims[D - 1] = ffn_size;
    B::squared_relu_gate(gate_up.reshape([rows, width]), ffn_size).reshape(dims)
}

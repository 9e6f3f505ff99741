//! Tritter: ternary-weight (BitNet b1.58) code language models in Burn — the model,
//! quantization-aware training, packed export, and generation.

pub mod device;
pub mod export;
pub mod infer;
pub mod memory;
pub mod model;
pub mod tokenizer;
pub mod train;

pub use model::{TritterConfig, TritterModel};

/// The CPU backend the tests run on.
#[cfg(test)]
pub(crate) type TestBackend = burn::backend::Flex;

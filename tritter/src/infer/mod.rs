//! Inference: loading exports, the KV cache, sampling and generation.

pub mod generate;
pub mod kv_cache;
pub mod load;

pub use generate::{generate, Sampler, SamplingConfig};
pub use load::{load_export, LoadedModel};

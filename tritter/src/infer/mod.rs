//! Inference: loading exports, KV cache, sampling and generation.

pub mod kv_cache;

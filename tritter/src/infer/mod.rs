//! Inference: loading exports, the KV cache, sampling and generation, resident or
//! streamed layer group by layer group under a memory budget.

pub mod agreement;
pub mod budget;
pub mod generate;
pub mod kv_bench;
pub mod kv_cache;
pub mod load;
pub mod model_file;
pub mod streaming;

pub use agreement::{check_greedy, compare_generations, Agreement, LOGIT_TOLERANCE};
pub use budget::{ByteSize, KvCacheType, MemoryPlan, PlanRequest};
pub use generate::{generate, Sampler, SamplingConfig};
pub use load::{load_export, load_model_file, LoadedModel};
pub use model_file::ModelFile;
pub use streaming::{StreamStats, StreamingEngine};

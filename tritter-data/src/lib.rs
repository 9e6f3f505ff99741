//! Tritter's code-corpus pipeline: sources → language → filters → secrets → exact dedup →
//! near dedup → tokenize → token shards.
//!
//! Each stage is a small function over [`Document`]s that counts what it kept and dropped;
//! the counts end in the dataset's `manifest.json`. The crate has no Burn dependency, so it
//! builds fast and is usable on its own.

pub mod bench;
pub mod blobs;
pub mod bpe;
pub mod build;
pub mod dedup;
pub mod document;
pub mod error;
pub mod filter;
pub mod language;
pub mod parquet_source;
pub mod recipe;
pub mod rss;
pub mod secrets;
pub mod shard;
pub mod source;
pub mod stats;
pub mod tokenizer;
pub mod work;

pub use build::{
    build_dataset, build_shard, merge_shards, BuildOptions, BuildSummary, REDACTIONS_FILE,
    REMOVED_FILE,
};
pub use dedup::DedupConfig;
pub use document::Document;
pub use error::DataError;
pub use language::Language;
pub use recipe::DataRecipe;
pub use shard::{DatasetManifest, ShardReader, Split, TokenStream};
pub use tokenizer::{ByteTokenizer, HfTokenizer, Tokenizer, TokenizerSpec};
pub use work::ShardSpec;

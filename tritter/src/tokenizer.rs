//! Tokenizers: the byte-level multimodal tokenizer and Hugging Face `tokenizer.json`
//! behind one trait. They live in `tritter-data` (which tokenizes corpora without Burn);
//! this module is the model side's view of them.

pub use tritter_data::tokenizer::{special, ByteTokenizer, HfTokenizer, Tokenizer, TokenizerSpec};

//! `tritter-data tokenizer train`: a byte-level BPE `tokenizer.json` trained with the
//! `tokenizers` crate on the documents a recipe keeps (after the filters, secrets
//! redaction and exact dedup), with Tritter's special tokens first.

use crate::build::{read_documents, BuildOptions};
use crate::error::{DataError, Result};
use crate::recipe::DataRecipe;
use crate::tokenizer::{HfTokenizer, Tokenizer};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

/// Special tokens, ids 0–3, named as the byte vocabulary names them.
pub const SPECIAL_TOKENS: [&str; 4] = ["<pad>", "<bos>", "<eos>", "<code>"];

/// What training produced.
#[derive(Debug, Clone)]
pub struct BpeSummary {
    pub documents: usize,
    pub bytes: u64,
    pub vocab_size: usize,
    /// Tokens per byte of the training documents under the new tokenizer.
    pub tokens_per_byte: f64,
    pub seconds: f64,
}

/// Trains on the documents `recipe` keeps and writes `out` (through a temporary file, so
/// a failure leaves any previous tokenizer in place).
pub fn train_bpe(
    recipe: &DataRecipe,
    vocab_size: usize,
    out: &Path,
    options: &BuildOptions,
) -> Result<BpeSummary> {
    let minimum = 256 + SPECIAL_TOKENS.len() + 1;
    if vocab_size < minimum {
        return Err(DataError::Tokenizer(format!(
            "--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {minimum} (256 bytes, {} special tokens, one merge)",
            SPECIAL_TOKENS.len()
        )));
    }
    crate::error::check_output_file(out, "--out", "tokenizer.json")
        .map_err(DataError::Tokenizer)?;
    let start = std::time::Instant::now();
    let docs = read_documents(recipe, options)?;
    if docs.is_empty() {
        return Err(DataError::EmptyCorpus(format!(
            "recipe `{}` keeps no documents to train a tokenizer on",
            recipe.name
        )));
    }
    let bytes: u64 = docs.iter().map(|d| d.content.len() as u64).sum();
    if options.progress {
        eprintln!(
            "training a {vocab_size}-token BPE on {} documents ({:.1} MB)",
            docs.len(),
            bytes as f64 / 1e6
        );
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(t.to_string(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let fail = |e: tokenizers::Error| DataError::Tokenizer(format!("BPE training: {e}"));
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        PostProcessorWrapper,
        ByteLevelDecoder,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
    .with_post_processor(None)
    .with_decoder(Some(ByteLevelDecoder::default()))
    .build()
    .map_err(fail)?;
    tokenizer
        .train(
            &mut trainer,
            docs.iter().map(|d| String::from_utf8_lossy(&d.content)),
        )
        .map_err(fail)?;
    let tokenizer: tokenizers::Tokenizer = tokenizer.into();
    let json = tokenizer.to_string(false).map_err(fail)?;

    // Measure, then write atomically.
    let trained = HfTokenizer::from_bytes(json.as_bytes())?;
    let tokens: usize = docs.iter().map(|d| trained.encode(&d.content).len()).sum();
    let partial = out.with_extension("json.partial");
    std::fs::write(&partial, &json).map_err(|e| DataError::io(&partial, e))?;
    std::fs::rename(&partial, out).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        DataError::io(out, e)
    })?;
    Ok(BpeSummary {
        documents: docs.len(),
        bytes,
        vocab_size: trained.vocab_size(),
        tokens_per_byte: tokens as f64 / bytes as f64,
        seconds: start.elapsed().as_secs_f64(),
    })
}

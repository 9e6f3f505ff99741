//! Token shards: the on-disk dataset format.
//!
//! A dataset directory holds `manifest.json` and, per split, shard pairs:
//! `{split}-{n:05}.tokens` (token ids, little-endian u32, documents packed back to back,
//! each ending in `<eos>`) and `{split}-{n:05}.docs` (little-endian u64 offsets of each
//! document's first token within the shard, so attention can be masked per document).
//! The manifest lists every shard with its token count and an FNV-1a checksum, so a
//! truncated or corrupted shard is caught at load, naming the file.

use crate::document::fnv1a;
use crate::error::{DataError, Result};
use crate::stats::PipelineStats;
use crate::tokenizer::TokenizerSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "tritter-shards-v1";
/// The only codec of this format version; later versions add compressed codecs.
pub const CODEC_RAW: &str = "raw-u32le";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    pub tokens_file: String,
    pub docs_file: String,
    pub codec: String,
    pub tokens: u64,
    pub documents: u64,
    /// FNV-1a 64 of the tokens file's bytes, hex.
    pub checksum: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitInfo {
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LanguageCounts {
    pub documents: u64,
    pub bytes: u64,
    pub tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetManifest {
    pub format: String,
    pub tool_version: String,
    pub name: String,
    pub tokenizer: TokenizerSpec,
    pub vocab_size: usize,
    pub eos: u32,
    pub splits: BTreeMap<Split, SplitInfo>,
    pub languages: BTreeMap<String, LanguageCounts>,
    pub stats: PipelineStats,
    /// The recipe the dataset was built from.
    pub recipe: serde_json::Value,
}

impl DatasetManifest {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
        let manifest: DatasetManifest = serde_json::from_str(&text)
            .map_err(|e| DataError::dataset(&path, format!("malformed manifest: {e}")))?;
        if manifest.format != FORMAT {
            return Err(DataError::dataset(
                &path,
                format!("unknown format `{}`, expected `{FORMAT}`", manifest.format),
            ));
        }
        Ok(manifest)
    }

    pub fn split(&self, split: Split) -> Option<&SplitInfo> {
        self.splits.get(&split)
    }
}

/// Writes one split's shards.
pub struct ShardWriter {
    dir: PathBuf,
    split: Split,
    shard_tokens: u64,
    tokens: Vec<u32>,
    doc_starts: Vec<u64>,
    info: SplitInfo,
}

impl ShardWriter {
    pub fn new(dir: &Path, split: Split, shard_tokens: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            split,
            shard_tokens,
            tokens: Vec::new(),
            doc_starts: Vec::new(),
            info: SplitInfo::default(),
        }
    }

    /// Appends one tokenized document. Documents never span shards.
    pub fn push_document(&mut self, ids: &[u32]) -> Result<()> {
        if !self.tokens.is_empty() && (self.tokens.len() + ids.len()) as u64 > self.shard_tokens {
            self.flush()?;
        }
        self.doc_starts.push(self.tokens.len() as u64);
        self.tokens.extend_from_slice(ids);
        self.info.documents += 1;
        self.info.tokens += ids.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let n = self.info.shards.len();
        let tokens_file = format!("{}-{n:05}.tokens", self.split.name());
        let docs_file = format!("{}-{n:05}.docs", self.split.name());
        let token_bytes: Vec<u8> = self.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let doc_bytes: Vec<u8> = self
            .doc_starts
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        write_file(&self.dir.join(&tokens_file), &token_bytes)?;
        write_file(&self.dir.join(&docs_file), &doc_bytes)?;
        self.info.shards.push(ShardInfo {
            tokens_file,
            docs_file,
            codec: CODEC_RAW.to_string(),
            tokens: self.tokens.len() as u64,
            documents: self.doc_starts.len() as u64,
            checksum: format!("{:016x}", fnv1a(&token_bytes)),
        });
        self.tokens.clear();
        self.doc_starts.clear();
        Ok(())
    }

    pub fn finish(mut self) -> Result<SplitInfo> {
        self.flush()?;
        Ok(self.info)
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| DataError::io(path, e))
}

/// A split's tokens, loaded and verified.
#[derive(Debug, Clone)]
pub struct TokenStream {
    pub tokens: Vec<u32>,
    /// Offset of each document's first token in `tokens`.
    pub doc_starts: Vec<u64>,
}

/// Reads and verifies shards.
pub struct ShardReader;

impl ShardReader {
    /// Loads every shard of `split`, checking sizes and checksums against the manifest.
    pub fn load(dir: &Path, split: Split) -> Result<TokenStream> {
        let manifest = DatasetManifest::load(dir)?;
        let info = manifest.split(split).ok_or_else(|| {
            DataError::dataset(dir, format!("the manifest has no `{}` split", split.name()))
        })?;
        let mut tokens = Vec::with_capacity(info.tokens as usize);
        let mut doc_starts = Vec::with_capacity(info.documents as usize);
        for shard in &info.shards {
            let path = dir.join(&shard.tokens_file);
            if shard.codec != CODEC_RAW {
                return Err(DataError::dataset(
                    &path,
                    format!("unknown codec `{}`", shard.codec),
                ));
            }
            let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
            if bytes.len() as u64 != shard.tokens * 4 {
                return Err(DataError::dataset(
                    &path,
                    format!(
                        "shard is {} bytes, the manifest says {} tokens ({} bytes): truncated or corrupt",
                        bytes.len(),
                        shard.tokens,
                        shard.tokens * 4
                    ),
                ));
            }
            let checksum = format!("{:016x}", fnv1a(&bytes));
            if checksum != shard.checksum {
                return Err(DataError::dataset(
                    &path,
                    format!(
                        "checksum {checksum} does not match the manifest's {}: corrupt shard",
                        shard.checksum
                    ),
                ));
            }
            let docs_path = dir.join(&shard.docs_file);
            let doc_bytes = std::fs::read(&docs_path).map_err(|e| DataError::io(&docs_path, e))?;
            if doc_bytes.len() as u64 != shard.documents * 8 {
                return Err(DataError::dataset(
                    &docs_path,
                    "document index size does not match the manifest: truncated or corrupt",
                ));
            }
            let base = tokens.len() as u64;
            doc_starts.extend(
                doc_bytes
                    .chunks_exact(8)
                    .map(|c| base + u64::from_le_bytes(c.try_into().unwrap())),
            );
            tokens.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap())),
            );
        }
        Ok(TokenStream { tokens, doc_starts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_splits_shards_at_document_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), Split::Train, 5);
        w.push_document(&[1, 2, 3]).unwrap();
        w.push_document(&[4, 5]).unwrap();
        w.push_document(&[6, 7, 8]).unwrap();
        let info = w.finish().unwrap();
        assert_eq!(info.shards.len(), 2);
        assert_eq!(info.shards[0].tokens, 5);
        assert_eq!(info.tokens, 8);
        assert_eq!(info.documents, 3);
    }
}

//! Token shards: the on-disk dataset format.
//!
//! A dataset directory holds `manifest.json` and, per split, shard pairs:
//! `{split}-{n:05}.tokens` (token ids, little-endian u32, documents packed back to back,
//! each ending in `<eos>`) and `{split}-{n:05}.docs` (little-endian u64 offsets of each
//! document's first token within the shard, so attention can be masked per document).
//! The manifest lists every shard with its token count and an FNV-1a checksum of the
//! token bytes, so a truncated or corrupted shard is caught at load, naming the file.
//! Token files are zstd-compressed by default (`{split}-{n:05}.tokens.zst`, one frame
//! with zstd's own content checksum; codec `zstd-u32le`), or raw (`raw-u32le`).

use crate::document::fnv1a;
use crate::error::{DataError, Result};
use crate::stats::PipelineStats;
use crate::tokenizer::TokenizerSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const FORMAT: &str = "tritter-shards-v1";
/// Token files as they are.
pub const CODEC_RAW: &str = "raw-u32le";
/// Token files as one zstd frame.
pub const CODEC_ZSTD: &str = "zstd-u32le";

/// How token files are stored (the recipe's `shard_codec`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardCodec {
    Raw,
    #[default]
    Zstd,
}

/// zstd level of token shards: fast to write, ~3× smaller than raw ids for code.
const ZSTD_LEVEL: i32 = 3;

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
    codec: ShardCodec,
    tokens: Vec<u32>,
    doc_starts: Vec<u64>,
    info: SplitInfo,
}

impl ShardWriter {
    pub fn new(dir: &Path, split: Split, shard_tokens: u64) -> Self {
        Self::with_codec(dir, split, shard_tokens, ShardCodec::default())
    }

    pub fn with_codec(dir: &Path, split: Split, shard_tokens: u64, codec: ShardCodec) -> Self {
        Self {
            dir: dir.to_path_buf(),
            split,
            shard_tokens,
            codec,
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
        let docs_file = format!("{}-{n:05}.docs", self.split.name());
        let token_bytes: Vec<u8> = self.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let (tokens_file, codec, stored) = match self.codec {
            ShardCodec::Raw => (
                format!("{}-{n:05}.tokens", self.split.name()),
                CODEC_RAW,
                None,
            ),
            ShardCodec::Zstd => {
                let file = format!("{}-{n:05}.tokens.zst", self.split.name());
                let compressed =
                    compress(&token_bytes).map_err(|e| DataError::io(self.dir.join(&file), e))?;
                (file, CODEC_ZSTD, Some(compressed))
            }
        };
        let doc_bytes: Vec<u8> = self
            .doc_starts
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        write_file(
            &self.dir.join(&tokens_file),
            stored.as_deref().unwrap_or(&token_bytes),
        )?;
        write_file(&self.dir.join(&docs_file), &doc_bytes)?;
        self.info.shards.push(ShardInfo {
            tokens_file,
            docs_file,
            codec: codec.to_string(),
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

/// One zstd frame with a content checksum.
fn compress(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL)?;
    encoder.include_checksum(true)?;
    encoder.write_all(bytes)?;
    encoder.finish()
}

/// A shard's token bytes, decompressed as its codec says.
fn read_tokens(path: &Path, shard: &ShardInfo) -> Result<Vec<u8>> {
    let stored = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    match shard.codec.as_str() {
        CODEC_RAW => Ok(stored),
        CODEC_ZSTD => zstd::stream::decode_all(stored.as_slice())
            .map_err(|e| DataError::dataset(path, format!("corrupt zstd shard: {e}"))),
        other => Err(DataError::dataset(path, format!("unknown codec `{other}`"))),
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
            let bytes = read_tokens(&path, shard)?;
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

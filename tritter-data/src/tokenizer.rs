//! Tokenizers behind one trait: the byte-level multimodal tokenizer and Hugging Face
//! `tokenizer.json` files loaded through the `tokenizers` crate.

use crate::error::{DataError, Result};
use crate::language::Language;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Special token ids of the byte-level multimodal vocabulary.
pub mod special {
    pub const PAD: u32 = 0;
    pub const BOS: u32 = 1;
    pub const EOS: u32 = 2;
    pub const UNK: u32 = 3;
    pub const TEXT: u32 = 4;
    pub const CODE: u32 = 5;
    pub const IMAGE: u32 = 6;
    pub const AUDIO: u32 = 7;
    /// Byte `b` is token `b + BYTE_OFFSET`.
    pub const BYTE_OFFSET: u32 = 8;
}

/// What every tokenizer gives the pipeline and the model.
pub trait Tokenizer: Send + Sync {
    fn vocab_size(&self) -> usize;
    /// Token ids of raw bytes, without special tokens.
    fn encode(&self, bytes: &[u8]) -> Vec<u32>;
    /// Bytes of token ids; special tokens decode to nothing.
    fn decode(&self, ids: &[u32]) -> Vec<u8>;
    fn bos(&self) -> Option<u32>;
    fn eos(&self) -> u32;
    /// The modality marker placed after `<bos>` for source code, if the vocabulary has one.
    fn code_marker(&self) -> Option<u32>;

    /// A training document: `<bos> <code> tokens <eos>` (markers the vocabulary lacks are left out).
    fn encode_document(&self, content: &[u8], _language: Language) -> Vec<u32> {
        let mut ids = Vec::with_capacity(content.len() + 3);
        ids.extend(self.bos());
        ids.extend(self.code_marker());
        ids.extend(self.encode(content));
        ids.push(self.eos());
        ids
    }
}

/// Byte-level multimodal tokenizer: ids 0..8 are special, byte `b` is `b + 8`.
/// Round-trips any byte string exactly, invalid UTF-8 included.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const VOCAB_SIZE: usize = 256 + special::BYTE_OFFSET as usize;
}

impl Tokenizer for ByteTokenizer {
    fn vocab_size(&self) -> usize {
        Self::VOCAB_SIZE
    }

    fn encode(&self, bytes: &[u8]) -> Vec<u32> {
        bytes
            .iter()
            .map(|&b| b as u32 + special::BYTE_OFFSET)
            .collect()
    }

    fn decode(&self, ids: &[u32]) -> Vec<u8> {
        ids.iter()
            .filter(|&&id| (special::BYTE_OFFSET..Self::VOCAB_SIZE as u32).contains(&id))
            .map(|&id| (id - special::BYTE_OFFSET) as u8)
            .collect()
    }

    fn bos(&self) -> Option<u32> {
        Some(special::BOS)
    }

    fn eos(&self) -> u32 {
        special::EOS
    }

    fn code_marker(&self) -> Option<u32> {
        Some(special::CODE)
    }
}

/// A Hugging Face `tokenizer.json`. Special tokens are looked up by the names the byte
/// vocabulary uses (`<bos>`, `<eos>`, `<code>`), then by common alternatives.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: u32,
    code: Option<u32>,
}

impl HfTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Self::from_tokenizer(inner, path)
    }

    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| DataError::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        Self::from_tokenizer(inner, Path::new("<embedded tokenizer.json>"))
    }

    fn from_tokenizer(mut inner: tokenizers::Tokenizer, path: &Path) -> Result<Self> {
        // Text that spells a special token (`<eos>` in a comment) is text: document
        // structure comes only from the ids `encode_document` adds.
        inner.set_encode_special_tokens(true);
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(&["<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>"]);
        let eos =
            find(&["<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>"]).ok_or_else(|| {
                DataError::Tokenizer(format!(
                    "{} has no end-of-sequence token (looked for <eos>, </s>, <|endoftext|>)",
                    path.display()
                ))
            })?;
        let code = find(&["<code>"]);
        Ok(Self {
            inner,
            bos,
            eos,
            code,
        })
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl Tokenizer for HfTokenizer {
    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn encode(&self, bytes: &[u8]) -> Vec<u32> {
        let text = String::from_utf8_lossy(bytes);
        self.inner
            .encode(text.as_ref(), false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    fn decode(&self, ids: &[u32]) -> Vec<u8> {
        self.inner
            .decode(ids, true)
            .map(String::into_bytes)
            .unwrap_or_default()
    }

    fn bos(&self) -> Option<u32> {
        self.bos
    }

    fn eos(&self) -> u32 {
        self.eos
    }

    fn code_marker(&self) -> Option<u32> {
        self.code
    }
}

/// Which tokenizer a recipe names: `tokenizer = "byte"` or
/// `tokenizer = { huggingface = "path/to/tokenizer.json" }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerSpec {
    #[default]
    Byte,
    #[serde(rename = "huggingface")]
    HuggingFace(PathBuf),
}

impl TokenizerSpec {
    /// Loads the tokenizer; relative paths resolve against `base_dir`.
    pub fn load(&self, base_dir: &Path) -> Result<Box<dyn Tokenizer>> {
        match self {
            TokenizerSpec::Byte => Ok(Box::new(ByteTokenizer)),
            TokenizerSpec::HuggingFace(path) => {
                Ok(Box::new(HfTokenizer::from_file(&base_dir.join(path))?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_round_trips_arbitrary_bytes() {
        let t = ByteTokenizer;
        let all: Vec<u8> = (0..=255u8).collect();
        assert_eq!(t.decode(&t.encode(&all)), all);
        // Invalid UTF-8 survives unchanged.
        let invalid = [0xff, 0xfe, b'a', 0xc3, 0x28, 0x00];
        assert_eq!(t.decode(&t.encode(&invalid)), invalid);
        // Pseudo-random bytes.
        let mut x: u32 = 12345;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        assert_eq!(t.decode(&t.encode(&noise)), noise);
    }

    #[test]
    fn byte_ids_follow_the_reference_layout() {
        let t = ByteTokenizer;
        assert_eq!(t.encode(b"\x00A\xff"), vec![8, 65 + 8, 263]);
        assert_eq!(t.vocab_size(), 264);
        let doc = t.encode_document(b"x", Language::Python);
        assert_eq!(
            doc,
            vec![special::BOS, special::CODE, b'x' as u32 + 8, special::EOS]
        );
        // Special tokens decode to nothing.
        assert_eq!(
            t.decode(&[special::BOS, special::CODE, 8 + b'a' as u32, special::EOS]),
            b"a"
        );
    }

    #[test]
    fn spec_parses_from_toml() {
        #[derive(Deserialize)]
        struct R {
            tokenizer: TokenizerSpec,
        }
        let r: R = toml::from_str("tokenizer = \"byte\"").unwrap();
        assert_eq!(r.tokenizer, TokenizerSpec::Byte);
        let r: R = toml::from_str("tokenizer = { huggingface = \"t.json\" }").unwrap();
        assert_eq!(r.tokenizer, TokenizerSpec::HuggingFace("t.json".into()));
    }
}

use crate::language::Language;

/// One source file flowing through the pipeline.
#[derive(Debug, Clone)]
pub struct Document {
    /// Where the document came from: a path (or, for blob stores, a blob id).
    pub id: String,
    /// Name of the recipe source that produced it.
    pub source: String,
    pub language: Language,
    pub content: Vec<u8>,
}

impl Document {
    /// A stable 64-bit hash of the document id (FNV-1a), used for the train/valid split and
    /// for deterministic ordering. Independent of platform and Rust version.
    pub fn id_hash(&self) -> u64 {
        fnv1a(self.id.as_bytes())
    }
}

/// FNV-1a 64-bit: tiny, stable across platforms and releases.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

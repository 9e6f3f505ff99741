//! The intermediate outputs of one input shard, on disk, so that shards can run on many
//! machines (`tritter-data build --shard i/n`) and a final step (`--merge`) clusters
//! them and writes the dataset, with memory bounded by one shard rather than the corpus.
//!
//! A build's work directory (`{output}.work`, beside the dataset) holds one directory per
//! finished shard, `shard-{i:05}-of-{n:05}/`:
//!
//! - `documents.bin`: the documents the shard kept, each a record
//!   `u32 id_len, id, u32 source_len, source, u8 language, u32 content_len` followed by
//!   the content as one zstd frame; `documents.idx`: the `u64` offset of each record and
//!   of the end, so a document is read by index;
//! - `signatures.bin`: each document's MinHash signature, `num_perm` `u32`s, by index;
//! - `hashes.bin`: `(u128 content hash, u32 index)`, sorted, for exact dedup across
//!   shards;
//! - `bands/{band:03}.bin`: `(u64 band key, u32 index)`, sorted: the shard's LSH buckets;
//! - `removed.jsonl`, `redactions.jsonl`: the shard's part of the reports;
//! - `meta.json`, written last: counts, timings and the fingerprint of the recipe and
//!   shard count that made it.
//!
//! A shard is written to `….partial` and renamed into place when complete, so a killed
//! build leaves either a finished shard or none, and `--resume` can trust what it finds.

use crate::dedup::{band_key, MinHasher};
use crate::document::{fnv1a, Document};
use crate::error::{DataError, Result};
use crate::language::Language;
use crate::recipe::DataRecipe;
use crate::stats::{PipelineStats, StageTimes};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const WORK_FORMAT: &str = "tritter-work-v1";
const META_FILE: &str = "meta.json";
const DOCUMENTS_FILE: &str = "documents.bin";
const INDEX_FILE: &str = "documents.idx";
const SIGNATURES_FILE: &str = "signatures.bin";
const HASHES_FILE: &str = "hashes.bin";
const BANDS_DIR: &str = "bands";
/// zstd level of intermediate documents: fast; they are read once or twice.
const DOCUMENT_ZSTD_LEVEL: i32 = 1;

/// Which input shard: `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl ShardSpec {
    pub const WHOLE: ShardSpec = ShardSpec { index: 0, count: 1 };

    /// Parses `i/n` (0 ≤ i < n).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{text}` is not a shard `i/n` with 0 <= i < n (e.g. 3/8)");
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// This shard's part of `0..len`: a contiguous range, so shards concatenated in order
    /// give the whole in its order.
    pub fn range(self, len: usize) -> std::ops::Range<usize> {
        (self.index * len / self.count)..((self.index + 1) * len / self.count)
    }

    /// This shard's share of a cap on the whole corpus.
    pub fn share(self, cap: u64) -> u64 {
        cap.div_ceil(self.count as u64)
    }

    fn dir_name(self) -> String {
        format!("shard-{:05}-of-{:05}", self.index, self.count)
    }
}

impl std::fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What a finished shard holds, written last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardMeta {
    pub format: String,
    pub shard: ShardSpec,
    /// Of the recipe and shard count: a shard made by another recipe is never merged.
    pub fingerprint: String,
    pub documents: u64,
    pub bytes_read: u64,
    /// MinHash signature length (0: near dedup off).
    pub num_perm: usize,
    pub bands: usize,
    pub stats: PipelineStats,
    pub times: StageTimes,
}

/// The fingerprint of what a shard's outputs depend on: the recipe (its stages and
/// sources) and how the input was split.
pub fn fingerprint(recipe: &DataRecipe, count: usize) -> String {
    let mut text = serde_json::to_string(recipe).expect("recipe serializes");
    text.push_str(&format!("|shards={count}|{WORK_FORMAT}"));
    format!("{:016x}", fnv1a(text.as_bytes()))
}

/// A build's work directory.
#[derive(Debug, Clone)]
pub struct WorkDir {
    pub root: PathBuf,
}

impl WorkDir {
    /// `{out}.work`, beside the dataset.
    pub fn for_output(out: &Path) -> Self {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(".work");
        Self {
            root: out.with_file_name(name),
        }
    }

    pub fn shard_dir(&self, shard: ShardSpec) -> PathBuf {
        self.root.join(shard.dir_name())
    }

    /// The meta of a finished shard made by the same recipe, if there is one.
    pub fn finished(&self, shard: ShardSpec, fingerprint: &str) -> Option<ShardMeta> {
        let meta = read_meta(&self.shard_dir(shard)).ok()?;
        (meta.fingerprint == fingerprint && meta.format == WORK_FORMAT).then_some(meta)
    }

    /// The shard count of the shards in the directory, which must all agree.
    pub fn shard_count(&self) -> Result<usize> {
        let entries = std::fs::read_dir(&self.root).map_err(|e| DataError::io(&self.root, e))?;
        let mut counts: Vec<usize> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let rest = name.strip_prefix("shard-")?;
                let (_, n) = rest.split_once("-of-")?;
                n.parse().ok()
            })
            .collect();
        counts.sort_unstable();
        counts.dedup();
        match counts.as_slice() {
            [n] => Ok(*n),
            [] => Err(DataError::dataset(
                &self.root,
                "no finished input shards to merge; run `tritter-data build --shard i/n` first",
            )),
            many => Err(DataError::dataset(
                &self.root,
                format!(
                    "holds shards of different splits (of {}); remove the stale ones",
                    many.iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }

    /// Opens every shard of `count`, checking each is finished and made by this recipe.
    pub fn open_all(&self, count: usize, fingerprint: &str) -> Result<Vec<WorkShard>> {
        let mut missing = Vec::new();
        let mut shards = Vec::new();
        for index in 0..count {
            let spec = ShardSpec { index, count };
            let dir = self.shard_dir(spec);
            match read_meta(&dir) {
                Ok(meta) if meta.fingerprint == fingerprint => {
                    shards.push(WorkShard::open(dir, meta)?)
                }
                Ok(_) => {
                    return Err(DataError::dataset(
                        &dir,
                        "was built from a different recipe or shard count; rebuild it",
                    ))
                }
                Err(_) => missing.push(index.to_string()),
            }
        }
        if !missing.is_empty() {
            return Err(DataError::dataset(
                &self.root,
                format!(
                    "input shard(s) {} of {count} are not finished; run them with --shard i/{count}",
                    missing.join(", ")
                ),
            ));
        }
        Ok(shards)
    }
}

fn read_meta(dir: &Path) -> Result<ShardMeta> {
    let path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| DataError::dataset(&path, format!("corrupt shard meta: {e}")))
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    let file = File::create(path).map_err(|e| DataError::io(path, e))?;
    Ok(BufWriter::with_capacity(1 << 20, file))
}

/// Writes one shard's intermediate outputs.
pub struct WorkWriter {
    partial: PathBuf,
    finished: PathBuf,
    documents: BufWriter<File>,
    offsets: Vec<u64>,
    offset: u64,
    signatures: BufWriter<File>,
    hashes: Vec<(u128, u32)>,
    /// Per band: (key, index).
    bands: Vec<Vec<(u64, u32)>>,
    rows: usize,
    hasher: Option<MinHasher>,
    scratch: Vec<u64>,
}

impl WorkWriter {
    /// Starts shard `shard` in `work`, replacing any unfinished attempt; `hasher` and
    /// `(bands, rows)` when near dedup is on.
    pub fn create(
        work: &WorkDir,
        shard: ShardSpec,
        near: Option<(MinHasher, usize, usize)>,
    ) -> Result<Self> {
        let finished = work.shard_dir(shard);
        let mut name = finished.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let partial = finished.with_file_name(name);
        for dir in [&partial, &finished] {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
            }
        }
        std::fs::create_dir_all(partial.join(BANDS_DIR)).map_err(|e| DataError::io(&partial, e))?;
        let (hasher, bands, rows) = match near {
            Some((h, b, r)) => (Some(h), b, r),
            None => (None, 0, 0),
        };
        Ok(Self {
            documents: create(&partial.join(DOCUMENTS_FILE))?,
            signatures: create(&partial.join(SIGNATURES_FILE))?,
            partial,
            finished,
            offsets: Vec::new(),
            offset: 0,
            hashes: Vec::new(),
            bands: vec![Vec::new(); bands],
            rows,
            hasher,
            scratch: Vec::new(),
        })
    }

    /// The directory reports are written into while the shard runs.
    pub fn dir(&self) -> &Path {
        &self.partial
    }

    pub fn documents(&self) -> u64 {
        self.offsets.len() as u64
    }

    /// Adds a kept document with its content hash; signs it when near dedup is on.
    pub fn push(&mut self, doc: &Document, hash: u128, times: &mut StageTimes) -> Result<()> {
        let index = self.offsets.len() as u32;
        if let Some(hasher) = &self.hasher {
            let start = std::time::Instant::now();
            let signature = hasher.signature(&doc.content, &mut self.scratch);
            times.add("signatures", start, doc.content.len());
            let bytes: Vec<u8> = signature.iter().flat_map(|v| v.to_le_bytes()).collect();
            let path = self.partial.join(SIGNATURES_FILE);
            self.signatures
                .write_all(&bytes)
                .map_err(|e| DataError::io(&path, e))?;
            if signature.first() != Some(&u32::MAX) {
                for (band, bucket) in self.bands.iter_mut().enumerate() {
                    bucket.push((band_key(&signature, band, self.rows), index));
                }
            }
        }
        let start = std::time::Instant::now();
        self.hashes.push((hash, index));
        let content = zstd::bulk::compress(&doc.content, DOCUMENT_ZSTD_LEVEL)
            .map_err(|e| DataError::io(self.partial.join(DOCUMENTS_FILE), e))?;
        let mut record = Vec::with_capacity(content.len() + doc.id.len() + doc.source.len() + 13);
        for field in [doc.id.as_bytes(), doc.source.as_bytes()] {
            record.extend_from_slice(&(field.len() as u32).to_le_bytes());
            record.extend_from_slice(field);
        }
        record.push(language_code(doc.language));
        record.extend_from_slice(&(doc.content.len() as u32).to_le_bytes());
        record.extend_from_slice(&content);
        self.documents
            .write_all(&record)
            .map_err(|e| DataError::io(self.partial.join(DOCUMENTS_FILE), e))?;
        self.offsets.push(self.offset);
        self.offset += record.len() as u64;
        times.add("write work", start, doc.content.len());
        Ok(())
    }

    /// Sorts and writes the buckets and hashes, then the meta, and moves the shard into
    /// place.
    pub fn finish(mut self, mut meta: ShardMeta) -> Result<ShardMeta> {
        let flush = |w: &mut BufWriter<File>, path: PathBuf| -> Result<()> {
            w.flush().map_err(|e| DataError::io(path, e))
        };
        flush(&mut self.documents, self.partial.join(DOCUMENTS_FILE))?;
        flush(&mut self.signatures, self.partial.join(SIGNATURES_FILE))?;
        self.offsets.push(self.offset);
        write_records(
            &self.partial.join(INDEX_FILE),
            self.offsets.iter().map(|o| o.to_le_bytes()),
        )?;
        self.hashes.sort_unstable();
        write_records(
            &self.partial.join(HASHES_FILE),
            self.hashes.iter().map(|&(h, i)| hash_record(h, i)),
        )?;
        for (band, bucket) in self.bands.iter_mut().enumerate() {
            bucket.sort_unstable();
            write_records(
                &band_path(&self.partial, band),
                bucket.iter().map(|&(k, i)| band_record(k, i)),
            )?;
        }
        meta.documents = self.offsets.len() as u64 - 1;
        meta.num_perm = self.hasher.as_ref().map_or(0, MinHasher::num_perm);
        meta.bands = self.bands.len();
        let path = self.partial.join(META_FILE);
        let json = serde_json::to_string_pretty(&meta).expect("meta serializes");
        std::fs::write(&path, json).map_err(|e| DataError::io(&path, e))?;
        std::fs::rename(&self.partial, &self.finished)
            .map_err(|e| DataError::io(&self.finished, e))?;
        Ok(meta)
    }
}

fn band_path(dir: &Path, band: usize) -> PathBuf {
    dir.join(BANDS_DIR).join(format!("{band:03}.bin"))
}

fn hash_record(hash: u128, index: u32) -> [u8; 20] {
    let mut r = [0u8; 20];
    r[..16].copy_from_slice(&hash.to_le_bytes());
    r[16..].copy_from_slice(&index.to_le_bytes());
    r
}

fn band_record(key: u64, index: u32) -> [u8; 12] {
    let mut r = [0u8; 12];
    r[..8].copy_from_slice(&key.to_le_bytes());
    r[8..].copy_from_slice(&index.to_le_bytes());
    r
}

fn write_records<const W: usize>(
    path: &Path,
    records: impl Iterator<Item = [u8; W]>,
) -> Result<()> {
    let mut out = create(path)?;
    for r in records {
        out.write_all(&r).map_err(|e| DataError::io(path, e))?;
    }
    out.flush().map_err(|e| DataError::io(path, e))
}

fn language_code(language: Language) -> u8 {
    Language::ALL
        .iter()
        .position(|&l| l == language)
        .expect("a known language") as u8
}

/// A finished shard, read by document index.
pub struct WorkShard {
    pub dir: PathBuf,
    pub meta: ShardMeta,
    offsets: Vec<u64>,
    documents: File,
    signatures: File,
}

impl WorkShard {
    fn open(dir: PathBuf, meta: ShardMeta) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let bytes = std::fs::read(&index_path).map_err(|e| DataError::io(&index_path, e))?;
        let offsets: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if offsets.len() as u64 != meta.documents + 1 {
            return Err(DataError::dataset(
                &index_path,
                format!(
                    "indexes {} documents, the shard's meta says {}: truncated or corrupt",
                    offsets.len().saturating_sub(1),
                    meta.documents
                ),
            ));
        }
        let open = |name: &str| {
            let path = dir.join(name);
            File::open(&path).map_err(|e| DataError::io(&path, e))
        };
        let documents = open(DOCUMENTS_FILE)?;
        let length = documents
            .metadata()
            .map_err(|e| DataError::io(dir.join(DOCUMENTS_FILE), e))?
            .len();
        if offsets.last() != Some(&length) {
            return Err(DataError::dataset(
                dir.join(DOCUMENTS_FILE),
                format!(
                    "is {length} bytes, its index says {}: truncated",
                    offsets[offsets.len() - 1]
                ),
            ));
        }
        Ok(Self {
            signatures: open(SIGNATURES_FILE)?,
            documents,
            offsets,
            dir,
            meta,
        })
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Document `index`, its content decompressed.
    pub fn document(&self, index: usize) -> Result<Document> {
        let path = self.dir.join(DOCUMENTS_FILE);
        let (start, end) = (self.offsets[index], self.offsets[index + 1]);
        let mut record = vec![0u8; (end - start) as usize];
        self.documents
            .read_exact_at(&mut record, start)
            .map_err(|e| DataError::io(&path, e))?;
        let corrupt = || DataError::dataset(&path, format!("corrupt document record {index}"));
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let slice = record.get(at..at + n).ok_or_else(corrupt)?;
            at += n;
            Ok(slice)
        };
        let mut field = || -> Result<String> {
            let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
            String::from_utf8(take(len)?.to_vec()).map_err(|_| corrupt())
        };
        let id = field()?;
        let source = field()?;
        let mut take = |n: usize| -> Result<Vec<u8>> {
            let slice = record.get(at..at + n).ok_or_else(corrupt)?.to_vec();
            at += n;
            Ok(slice)
        };
        let language = *Language::ALL
            .get(take(1)?[0] as usize)
            .ok_or_else(corrupt)?;
        let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let content = zstd::bulk::decompress(&record[at..], len).map_err(|_| corrupt())?;
        if content.len() != len {
            return Err(corrupt());
        }
        Ok(Document {
            id,
            source,
            language,
            content,
        })
    }

    /// Document `index`'s MinHash signature.
    pub fn signature(&self, index: usize) -> Result<Vec<u32>> {
        let width = self.meta.num_perm * 4;
        let mut bytes = vec![0u8; width];
        self.signatures
            .read_exact_at(&mut bytes, (index * width) as u64)
            .map_err(|e| DataError::io(self.dir.join(SIGNATURES_FILE), e))?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    /// Appends this shard's report `name` to `out`.
    pub fn copy_report(&self, name: &str, out: &mut impl Write, out_path: &Path) -> Result<()> {
        let path = self.dir.join(name);
        let mut file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        std::io::copy(&mut file, out).map_err(|e| DataError::io(out_path, e))?;
        Ok(())
    }
}

/// Sorted runs of `(key, index)` records, one per shard, merged into one stream ordered by
/// key and then by the document's global index (`base` of its shard + index).
pub struct MergedRuns {
    runs: Vec<(BufReader<File>, PathBuf, u64)>,
    heap: BinaryHeap<Reverse<(u128, u64, usize)>>,
    key_bytes: usize,
}

impl MergedRuns {
    /// Every shard's exact-dedup hashes.
    pub fn hashes(shards: &[WorkShard], bases: &[u64]) -> Result<Self> {
        Self::open(
            shards.iter().map(|s| s.dir.join(HASHES_FILE)).collect(),
            bases,
            16,
        )
    }

    /// Every shard's buckets of `band`.
    pub fn band(shards: &[WorkShard], bases: &[u64], band: usize) -> Result<Self> {
        Self::open(
            shards.iter().map(|s| band_path(&s.dir, band)).collect(),
            bases,
            8,
        )
    }

    fn open(paths: Vec<PathBuf>, bases: &[u64], key_bytes: usize) -> Result<Self> {
        let mut merged = Self {
            runs: Vec::new(),
            heap: BinaryHeap::new(),
            key_bytes,
        };
        for (run, (path, &base)) in paths.into_iter().zip(bases).enumerate() {
            let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
            merged
                .runs
                .push((BufReader::with_capacity(1 << 16, file), path, base));
            merged.refill(run)?;
        }
        Ok(merged)
    }

    fn refill(&mut self, run: usize) -> Result<()> {
        let (reader, path, base) = &mut self.runs[run];
        let mut record = [0u8; 20];
        let width = self.key_bytes + 4;
        let mut filled = 0;
        while filled < width {
            match reader.read(&mut record[filled..width]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DataError::io(&*path, e)),
            }
        }
        if filled == 0 {
            return Ok(());
        }
        if filled < width {
            return Err(DataError::dataset(&*path, "truncated record"));
        }
        let mut key = [0u8; 16];
        key[..self.key_bytes].copy_from_slice(&record[..self.key_bytes]);
        let index = u32::from_le_bytes(record[self.key_bytes..width].try_into().expect("4 bytes"));
        self.heap.push(Reverse((
            u128::from_le_bytes(key),
            *base + index as u64,
            run,
        )));
        Ok(())
    }

    /// The next key and the global indices that share it, ascending.
    pub fn next_group(&mut self, members: &mut Vec<usize>) -> Result<Option<u128>> {
        members.clear();
        let Some(&Reverse((key, _, _))) = self.heap.peek() else {
            return Ok(None);
        };
        while let Some(&Reverse((k, global, run))) = self.heap.peek() {
            if k != key {
                break;
            }
            self.heap.pop();
            members.push(global as usize);
            self.refill(run)?;
        }
        Ok(Some(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_and_partition() {
        assert_eq!(
            ShardSpec::parse("3/8").unwrap(),
            ShardSpec { index: 3, count: 8 }
        );
        for bad in ["8/8", "1", "a/2", "0/0", "-1/2"] {
            assert!(ShardSpec::parse(bad).unwrap_err().contains(bad), "{bad}");
        }
        let len = 103;
        let mut all = Vec::new();
        for index in 0..7 {
            all.extend(ShardSpec { index, count: 7 }.range(len));
        }
        assert_eq!(all, (0..len).collect::<Vec<_>>());
        assert_eq!(ShardSpec { index: 0, count: 3 }.share(10), 4);
    }
}

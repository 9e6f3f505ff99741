//! An exported model file, memory-mapped and checked before any weight is used. Opening
//! checks the header, every tensor's place in the file (a truncated file names the first
//! tensor it cuts) and dtypes and shapes against the config; each tensor's bytes are
//! checked against the checksum the exporter wrote (or, in files without checksums, its
//! ternary codes are validated) the first time they are read. Opening a model thus costs
//! no read of its weights, and a streamed model is verified by its first pass, group by
//! group, instead of by a whole extra read before it.

use crate::export::{BitLinearTensors, FORMAT};
use crate::model::TritterConfig;
use crate::tokenizer::{ByteTokenizer, HfTokenizer, Tokenizer, TokenizerSpec};
use anyhow::{anyhow, bail, Context, Result};
use memmap2::{Advice, Mmap, UncheckedAdvice};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use xxhash_rust::xxh3::xxh3_64;

#[derive(Debug, Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Where a tensor lies in the file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// A checked, memory-mapped export.
pub struct ModelFile {
    pub path: PathBuf,
    pub config: TritterConfig,
    pub tokenizer_spec: TokenizerSpec,
    tokenizer_json: Option<String>,
    pub(crate) tensors: HashMap<String, TensorEntry>,
    /// How each tensor's bytes are checked on first use, and whether they have been.
    checks: HashMap<String, TensorCheck>,
    mmap: Mmap,
    file: std::fs::File,
    /// Whether released pages also leave the OS page cache
    /// ([`ModelFile::set_drop_page_cache`]).
    drop_page_cache: AtomicBool,
}

/// What a tensor's bytes must satisfy, checked once, the first time they are read.
enum Check {
    /// The xxh3-64 the exporter recorded.
    Checksum(u64),
    /// Packed ternary codes of a `[rows, cols]` matrix (files without checksums).
    Codes { rows: usize, cols: usize },
}

struct TensorCheck {
    check: Check,
    done: AtomicBool,
}

impl TensorCheck {
    fn new(check: Check) -> Self {
        Self {
            check,
            done: AtomicBool::new(false),
        }
    }
}

/// The page size the mapping's advice is aligned to.
const PAGE: usize = 4096;

/// The largest folio the page cache holds a file in (a PMD, 2 MiB on x86-64); folios
/// are aligned to their size in the file.
pub const MAX_FOLIO: usize = 2 << 20;

/// `ranges` joined into runs, in order, wherever their pages touch (share a page or
/// meet at a page boundary): what [`ModelFile::release_all`] releases, request by request.
fn page_runs(
    ranges: impl IntoIterator<Item = std::ops::Range<usize>>,
) -> Vec<std::ops::Range<usize>> {
    let mut ranges: Vec<_> = ranges.into_iter().filter(|r| !r.is_empty()).collect();
    ranges.sort_by_key(|r| r.start);
    let mut runs: Vec<std::ops::Range<usize>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match runs.last_mut() {
            Some(run) if range.start / PAGE <= run.end.div_ceil(PAGE) => {
                run.end = run.end.max(range.end)
            }
            _ => runs.push(range),
        }
    }
    runs
}

/// Pages touched while checking are dropped in pieces of this size.
const RELEASE_CHUNK: usize = 16 << 20;

impl ModelFile {
    /// Opens `path` and checks its structure against its config. Each tensor's bytes are
    /// verified the first time [`ModelFile::bytes`] (or [`ModelFile::f32s`]) reads them,
    /// an error naming the tensor if they are corrupt; [`ModelFile::verify_all`] verifies
    /// every tensor now.
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display();
        if path.is_dir() {
            bail!(
                "{shown} is a directory; a model is one exported file (a training run becomes one \
                 with `tritter export --out model.safetensors {shown}`)"
            );
        }
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {shown}"))?;
        let file_len = file.metadata()?.len() as usize;
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes).map_err(|_| {
            anyhow!("{shown} is not a safetensors file: shorter than its 8-byte header length")
        })?;
        let header_len = u64::from_le_bytes(len_bytes) as usize;
        if header_len > 100 << 20 || 8 + header_len > file_len {
            bail!("{shown} is not a valid safetensors file: header of {header_len} bytes in a file of {file_len} (truncated or corrupt?)");
        }
        let mut header = vec![0u8; header_len];
        file.read_exact(&mut header)?;
        let mut raw: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| {
                anyhow!("{shown}: the safetensors header is not valid JSON ({e}); corrupt file?")
            })?;
        let meta: HashMap<String, String> = match raw.remove("__metadata__") {
            Some(m) => serde_json::from_value(m)
                .map_err(|e| anyhow!("{shown}: malformed metadata: {e}"))?,
            None => HashMap::new(),
        };
        let data_start = 8 + header_len;
        let mut tensors = HashMap::new();
        for (name, value) in raw {
            let entry: HeaderEntry = serde_json::from_value(value).map_err(|e| {
                anyhow!("{shown}: tensor `{name}` has a malformed header entry: {e}")
            })?;
            let (start, end) = (
                data_start + entry.data_offsets.0,
                data_start + entry.data_offsets.1,
            );
            tensors.insert(
                name,
                TensorEntry {
                    dtype: entry.dtype,
                    shape: entry.shape,
                    start,
                    end,
                },
            );
        }
        // Truncation: name the first tensor that does not fit in the file.
        let mut by_offset: Vec<(&String, &TensorEntry)> = tensors.iter().collect();
        by_offset.sort_by_key(|(_, e)| e.start);
        for (name, e) in &by_offset {
            if e.end > file_len || e.start > e.end {
                bail!(
                    "{shown}: tensor `{name}` lies at bytes {}..{} but the file has {file_len} bytes (truncated?)",
                    e.start,
                    e.end
                );
            }
        }

        let get_meta = |key: &str| {
            meta.get(key)
                .ok_or_else(|| anyhow!("{shown}: metadata has no `{key}` (not a Tritter export?)"))
        };
        if get_meta("format")? != FORMAT {
            bail!(
                "{shown}: format `{}` is not `{FORMAT}`",
                get_meta("format")?
            );
        }
        let config: TritterConfig = serde_json::from_str(get_meta("config")?)
            .with_context(|| format!("{shown}: malformed `config` metadata"))?;
        config
            .validate()
            .with_context(|| format!("{shown}: `config` metadata"))?;
        let tokenizer_spec: TokenizerSpec = serde_json::from_str(get_meta("tokenizer")?)
            .with_context(|| format!("{shown}: malformed `tokenizer` metadata"))?;
        let checksums: Option<BTreeMap<String, String>> = meta
            .get("checksums")
            .map(|c| serde_json::from_str(c))
            .transpose()
            .with_context(|| format!("{shown}: malformed `checksums` metadata"))?;
        // Tensors without a check have none beyond the structure (the f32 tensors of a
        // file without checksums; their values are checked to be finite as they are read).
        let checks: HashMap<String, TensorCheck> = match checksums {
            Some(checksums) => tensors
                .keys()
                .map(|name| {
                    let recorded = checksums
                        .get(name)
                        .ok_or_else(|| anyhow!("{shown}: tensor `{name}` has no checksum"))?;
                    let sum = u64::from_str_radix(recorded, 16).map_err(|_| {
                        anyhow!("{shown}: tensor `{name}` has a malformed checksum `{recorded}`")
                    })?;
                    Ok((name.clone(), TensorCheck::new(Check::Checksum(sum))))
                })
                .collect::<Result<_>>()?,
            None => BitLinearTensors::all(&config)
                .map(|t| {
                    let (rows, cols) = (t.d_out, t.d_in);
                    (t.weight(), TensorCheck::new(Check::Codes { rows, cols }))
                })
                .collect(),
        };

        // SAFETY: the map is read-only; the file is not modified while it is open.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {shown}"))?;
        // What the kernel reads in through this mapping it may then cache in 2 MiB folios
        // (on filesystems with large folios, such as ext4 and XFS), which the mapping maps
        // whole: a streamed group's pages come in and leave with one entry per 2 MiB
        // instead of 512. A file already cached in small pages keeps them.
        #[cfg(target_os = "linux")]
        let _ = mmap.advise(Advice::HugePage);
        let model = Self {
            path: path.to_path_buf(),
            config,
            tokenizer_spec,
            tokenizer_json: meta.get("tokenizer_json").cloned(),
            tensors,
            checks,
            mmap,
            file,
            drop_page_cache: AtomicBool::new(false),
        };
        model.check_layout()?;
        Ok(model)
    }

    /// Every tensor the config implies is present with its dtype and shape.
    fn check_layout(&self) -> Result<()> {
        let c = &self.config;
        let (v, h, hd) = (c.vocab_size, c.hidden_size, c.head_dim());
        self.expect("embedding.weight", "F32", &[v, h])?;
        if !c.tie_embeddings {
            self.expect("lm_head.weight", "F32", &[h, v])?;
        }
        self.expect("norm.gamma", "F32", &[h])?;
        for i in 0..c.num_layers {
            for (name, d) in [
                ("attn.q_norm", hd),
                ("attn.k_norm", hd),
                ("attn_norm", h),
                ("ffn_norm", h),
            ] {
                self.expect(&format!("blocks.{i}.{name}.gamma"), "F32", &[d])?;
            }
            for t in BitLinearTensors::of_layer(c, i) {
                self.expect(&t.weight(), "U8", &[t.d_out, t.row_bytes()])?;
                self.expect(&t.scale(), "F32", &[1])?;
                self.expect(&t.norm(), "F32", &[t.d_in])?;
            }
        }
        Ok(())
    }

    fn expect(&self, name: &str, dtype: &str, shape: &[usize]) -> Result<()> {
        let e = self.entry(name)?;
        let elem = if dtype == "U8" { 1 } else { 4 };
        if e.dtype != dtype
            || e.shape != shape
            || e.end - e.start != elem * shape.iter().product::<usize>()
        {
            bail!(
                "{}: tensor `{name}` is {} {:?} ({} bytes), expected {dtype} {shape:?}",
                self.path.display(),
                e.dtype,
                e.shape,
                e.end - e.start
            );
        }
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.path.display()))
    }

    /// Verifies every tensor not yet verified, in file order, releasing the pages each
    /// one read: a model larger than memory is not held by its verification.
    pub fn verify_all(&self) -> Result<()> {
        let mut by_offset: Vec<(&String, &TensorEntry)> = self.tensors.iter().collect();
        by_offset.sort_by_key(|(_, e)| e.start);
        for (name, e) in by_offset {
            if self.verify(name, e)? {
                self.release_bytes(e.start..e.end);
            }
        }
        Ok(())
    }

    /// Checks `name`'s bytes the first time they are asked for; whether they were read
    /// now (false once verified).
    fn verify(&self, name: &str, e: &TensorEntry) -> Result<bool> {
        let Some(TensorCheck { check, done }) = self.checks.get(name) else {
            return Ok(false);
        };
        if done.load(Ordering::Acquire) {
            return Ok(false);
        }
        let bytes = &self.mmap[e.start..e.end];
        let shown = self.path.display();
        match *check {
            Check::Checksum(recorded) => {
                let actual = xxh3_64(bytes);
                if actual != recorded {
                    bail!(
                        "{shown}: tensor `{name}` is corrupt: its checksum is {actual:016x}, the file records {recorded:016x}"
                    );
                }
            }
            Check::Codes { rows, cols } => {
                tritter_kernels::packed::validate_codes(bytes, rows, cols)
                    .map_err(|why| anyhow!("{shown}: tensor `{name}` is corrupt: {why}"))?;
            }
        }
        done.store(true, Ordering::Release);
        Ok(true)
    }

    /// The bytes of a tensor, straight from the map; verified the first time they are
    /// asked for (an error naming the tensor if they are corrupt).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        Ok(&self.mmap[self.verified_range(name)?])
    }

    /// [`ModelFile::range`], once the tensor's bytes are verified (as by
    /// [`ModelFile::bytes`]).
    pub fn verified_range(&self, name: &str) -> Result<std::ops::Range<usize>> {
        let e = self.entry(name)?;
        self.verify(name, e)?;
        Ok(e.start..e.end)
    }

    /// Where a tensor's bytes lie in the file (and in [`AsRef::as_ref`]'s bytes), which
    /// are not verified: see [`ModelFile::verified_range`].
    pub fn range(&self, name: &str) -> Result<std::ops::Range<usize>> {
        let e = self.entry(name)?;
        Ok(e.start..e.end)
    }

    /// An f32 tensor's values; non-finite values are an error naming the tensor.
    pub fn f32s(&self, name: &str) -> Result<Vec<f32>> {
        let values: Vec<f32> = self
            .bytes(name)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            bail!(
                "{}: tensor `{name}` holds non-finite values",
                self.path.display()
            );
        }
        Ok(values)
    }

    /// Maps every page of `name` in one call (`MADV_POPULATE_READ`) instead of one page
    /// fault per 4 KiB while it is copied; a no-op where the kernel lacks it.
    pub fn populate(&self, name: &str) {
        if let Ok(e) = self.entry(name) {
            let pages = self.pages(e.start..e.end);
            let _ = self
                .mmap
                .advise_range(Advice::PopulateRead, pages.start, pages.len());
        }
    }

    /// Drops the mapped pages of `name` from this process's resident set (they stay in
    /// the OS page cache, unless [`ModelFile::set_drop_page_cache`] asked otherwise):
    /// after a tensor has been copied to the device, its file pages must not count
    /// against the memory budget.
    pub fn release(&self, name: &str) {
        if let Ok(e) = self.entry(name) {
            self.release_bytes(e.start..e.end);
        }
    }

    /// [`ModelFile::release_bytes`] for several ranges, in one request for each run of
    /// ranges whose pages touch. Each request makes every other thread of the process
    /// flush its TLB (an interrupt to each of its CPUs), and a layer's tensors lie side
    /// by side in the file: a layer's dozen small tensors cost one request, not twelve.
    pub fn release_all(&self, ranges: impl IntoIterator<Item = std::ops::Range<usize>>) {
        for run in page_runs(ranges) {
            self.release_bytes(run);
        }
    }

    /// [`ModelFile::release_all`] from this process's resident set only: the pages stay
    /// in the OS page cache even with [`ModelFile::set_drop_page_cache`]. For a layer's
    /// scales and norms, a few KiB that share 2 MiB folios with the next layers' own:
    /// dropping them from the page cache would drop those too, to be read again from
    /// storage a moment later (a whole folio per layer, about a tenth of what a pass
    /// through the 3B preset reads).
    pub fn unmap_all(&self, ranges: impl IntoIterator<Item = std::ops::Range<usize>>) {
        for run in page_runs(ranges) {
            self.unmap(self.pages(run));
        }
    }

    /// [`ModelFile::release`] by position: the pages holding `range`. With
    /// [`ModelFile::set_drop_page_cache`], they also leave the OS page cache.
    pub fn release_bytes(&self, range: std::ops::Range<usize>) {
        let std::ops::Range { start, end } = self.pages(range);
        self.unmap(start..end);
        if self.drop_page_cache.load(Ordering::Relaxed) {
            // The page cache drops only whole folios, and a large one may straddle the
            // range: the request covers every folio that holds part of it. Folios still
            // mapped (a neighbour's pages in use) are kept.
            let start = start / MAX_FOLIO * MAX_FOLIO;
            let end = (end.div_ceil(MAX_FOLIO) * MAX_FOLIO).min(self.mmap.len());
            evict_cached_pages(&self.file, start, end - start);
        }
    }

    /// Drops whole `pages` of the mapping from this process's resident set.
    fn unmap(&self, pages: std::ops::Range<usize>) {
        let std::ops::Range { start, end } = pages;
        let mut at = start;
        while at < end {
            let len = RELEASE_CHUNK.min(end - at);
            // SAFETY: a read-only private file mapping: dropping its pages only makes the
            // next read fault them back in from the file; no slice into them is held.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, at, len)
            };
            at += len;
        }
    }

    /// Whether pages released after use ([`ModelFile::release_bytes`]) also leave the OS
    /// page cache, so that every pass through a streamed model reads its layers from
    /// storage again. This is what streaming a model larger than the machine's memory
    /// costs, and it keeps the file from filling the page cache (which a container's
    /// memory limit counts). Turning it on drops the file's cached pages now. Only clean
    /// pages no process maps are dropped; the kernel may keep others. Where the OS has
    /// no such request (not Linux), this does nothing.
    pub fn set_drop_page_cache(&self, drop: bool) {
        self.drop_page_cache.store(drop, Ordering::Relaxed);
        if drop {
            self.drop_from_page_cache();
        }
    }

    /// Whether released pages also leave the OS page cache
    /// ([`ModelFile::set_drop_page_cache`]).
    pub fn drops_page_cache(&self) -> bool {
        self.drop_page_cache.load(Ordering::Relaxed)
    }

    /// Drops the file's pages from this process's mapping, then its clean pages from the
    /// OS page cache, now, once. The cache keeps a whole folio (up to 2 MiB) while any
    /// of its pages is mapped, and a large folio read in through the mapping can map
    /// pages that no tensor's release covers (the header's, before the first tensor):
    /// left mapped, they kept a model smaller than a folio cached whole.
    pub fn drop_from_page_cache(&self) {
        self.unmap(0..self.mmap.len());
        evict_cached_pages(&self.file, 0, self.mmap.len());
    }

    /// The whole pages of the mapping that hold `range`.
    fn pages(&self, range: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let start = range.start / PAGE * PAGE;
        let end = (range.end.div_ceil(PAGE) * PAGE).min(self.mmap.len());
        start..end
    }

    /// Bytes of `range` held in the OS page cache now (`mincore`; whole pages). Where
    /// the OS cannot say (not Unix), every byte counts as cached.
    pub fn cached_bytes(&self, range: std::ops::Range<usize>) -> usize {
        #[cfg(unix)]
        {
            let std::ops::Range { start, end } = self.pages(range.clone());
            if start >= end {
                return 0;
            }
            let mut resident = vec![0u8; (end - start).div_ceil(PAGE)];
            // SAFETY: the range lies in the mapping and `resident` has a byte per page.
            let ok = unsafe {
                libc::mincore(
                    self.mmap.as_ptr().add(start) as *mut libc::c_void,
                    end - start,
                    resident.as_mut_ptr() as *mut _,
                )
            } == 0;
            if !ok {
                return range.len();
            }
            resident.iter().filter(|&&r| r & 1 == 1).count() * PAGE
        }
        #[cfg(not(unix))]
        range.len()
    }

    /// The tokenizer the model was trained with.
    pub fn tokenizer(&self) -> Result<Box<dyn Tokenizer>> {
        Ok(match &self.tokenizer_spec {
            TokenizerSpec::Byte => Box::new(ByteTokenizer),
            TokenizerSpec::HuggingFace(_) => {
                let json = self.tokenizer_json.as_deref().ok_or_else(|| {
                    anyhow!("{}: metadata has no `tokenizer_json`", self.path.display())
                })?;
                Box::new(HfTokenizer::from_bytes(json.as_bytes())?)
            }
        })
    }

    /// Bytes of the file.
    pub fn len(&self) -> usize {
        self.mmap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }
}

/// Asks the OS to drop `len` bytes of `file` from `offset` out of its page cache
/// (`POSIX_FADV_DONTNEED`): only clean pages no process maps leave. Where the OS has no
/// such request (not Linux), this does nothing.
pub fn evict_cached_pages(file: &std::fs::File, offset: usize, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: advice on an open descriptor; no memory is passed.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// The whole file's bytes, mapped: what a matrix computed in place
/// ([`tritter_kernels::TritterBackend::ternary_map`]) reads, once its tensor has been
/// verified ([`ModelFile::verified_range`]).
impl AsRef<[u8]> for ModelFile {
    fn as_ref(&self) -> &[u8] {
        &self.mmap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_on_touching_pages_are_released_together() {
        let one = |run: std::ops::Range<usize>| vec![run];
        // A layer's small tensors, out of order and side by side across pages: one run.
        assert_eq!(
            page_runs([100..200, 0..100, 200..5000, 5000..9000]),
            one(0..9000)
        );
        // Ranges that only share a page, or meet at a page boundary, also join; a range
        // inside another adds nothing.
        assert_eq!(page_runs([0..10, 4000..4100, 8192..8200]), one(0..8200));
        assert_eq!(page_runs([0..9000, 10..20]), one(0..9000));
        // A whole page between them keeps them apart: its bytes are not released.
        assert_eq!(
            page_runs([0..4096, 4 * PAGE..4 * PAGE + 10, 8193..8194]),
            [0..4096, 8193..8194, 4 * PAGE..4 * PAGE + 10]
        );
        assert_eq!(page_runs([0..10, 8193..8194]), [0..10, 8193..8194]);
        // Nothing to release, nothing asked.
        assert!(page_runs([5..5, 7..7]).is_empty());
        assert!(page_runs(std::iter::empty()).is_empty());
    }
}

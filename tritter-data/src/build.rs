//! `tritter-data build`: sources → language → filters → secrets → exact dedup →
//! signatures, per input shard (in parallel, or on many machines with `--shard i/n`);
//! then the merge: exact dedup across shards → near dedup → tokenize → token shards.

use crate::dedup::{
    estimated_jaccard, into_set, shingles, sorted_jaccard, Clusters, DedupConfig, MinHasher,
    Verdict, Verify,
};
use crate::document::Document;
use crate::error::{DataError, Result};
use crate::filter::FilterConfig;
use crate::language::Language;
use crate::parquet_source::{read_rows, ParquetColumns, ParquetRow};
use crate::recipe::DataRecipe;
use crate::secrets::{Finding, SecretsAction, SecretsConfig};
use crate::shard::{DatasetManifest, LanguageCounts, ShardWriter, Split, FORMAT, MANIFEST_FILE};
use crate::source::{list_source, ResolvedSource};
use crate::stats::{PipelineStats, StageTimes};
use crate::tokenizer::TokenizerSpec;
use crate::work::{
    fingerprint, MergedRuns, ShardMeta, ShardSpec, WorkDir, WorkShard, WorkWriter, WORK_FORMAT,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use xxhash_rust::xxh3::xxh3_128;

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Overrides the recipe's output directory.
    pub out: Option<PathBuf>,
    /// Show progress bars on stderr.
    pub progress: bool,
    /// Keep the input shards an earlier, interrupted run finished instead of redoing them.
    pub resume: bool,
    /// Input shards scanned at once (default: the available cores). The dataset does not
    /// depend on it.
    pub jobs: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct BuildSummary {
    pub dir: PathBuf,
    pub manifest: DatasetManifest,
    pub seconds: f64,
    pub bytes_read: u64,
    /// Time per stage, in core-seconds over all threads and shards.
    pub times: StageTimes,
    /// Input shards finished by an earlier run and reused (`--resume`).
    pub reused_shards: usize,
}

impl BuildSummary {
    /// A human-readable table of what each stage kept and dropped, and how fast it ran.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.manifest;
        out.push_str(&format!("dataset {} at {}\n", m.name, self.dir.display()));
        out.push_str(&format!(
            "{:<12} {:>9} {:>12}  dropped\n",
            "stage", "kept", "kept bytes"
        ));
        for (name, c) in &m.stats.stages {
            let dropped: Vec<String> = c
                .dropped
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .chain(c.redacted.iter().map(|(k, n)| format!("redacted {k}: {n}")))
                .collect();
            out.push_str(&format!(
                "{:<12} {:>9} {:>12}  {}\n",
                name,
                c.kept,
                c.kept_bytes,
                dropped.join(", ")
            ));
        }
        for (lang, c) in &m.languages {
            out.push_str(&format!(
                "{lang:<12} {:>9} docs {:>12} bytes {:>12} tokens\n",
                c.documents, c.bytes, c.tokens
            ));
        }
        for (split, info) in &m.splits {
            out.push_str(&format!(
                "{:<12} {:>9} docs {:>12} tokens in {} shard(s)\n",
                split.name(),
                info.documents,
                info.tokens,
                info.shards.len()
            ));
        }
        out.push_str(&format!(
            "{:<12} {:>9} {:>9} {:>14}\n",
            "timing", "core-s", "MB in", "MB/s per core"
        ));
        for (name, t) in &self.times.stages {
            let rate = if t.bytes > 0 {
                format!("{:.1}", t.mb_per_s())
            } else {
                "-".to_string()
            };
            out.push_str(&format!(
                "{name:<12} {:>9.2} {:>9.1} {rate:>14}\n",
                t.seconds,
                t.bytes as f64 / 1e6,
            ));
        }
        let mb = self.bytes_read as f64 / 1e6;
        let core_seconds: f64 = self.times.stages.values().map(|t| t.seconds).sum();
        out.push_str(&format!(
            "read {mb:.1} MB in {:.1} s ({:.1} MB/s; {:.1} MB per core-second of stage work)",
            self.seconds,
            mb / self.seconds.max(1e-9),
            mb / core_seconds.max(1e-9)
        ));
        if self.reused_shards > 0 {
            out.push_str(&format!(
                "; {} input shard(s) reused from the interrupted run",
                self.reused_shards
            ));
        }
        out.push('\n');
        out
    }
}

/// Builds the dataset a recipe describes: its `input_shards` scanned (in parallel, each
/// to its own intermediate outputs in the work directory), then merged. The dataset is
/// written to a temporary directory beside the output and renamed into place only when
/// complete, so a failed build never leaves a half-written dataset or destroys the
/// previous one; with `resume`, the shards a killed build finished are reused.
pub fn build_dataset(recipe: &DataRecipe, options: &BuildOptions) -> Result<BuildSummary> {
    let start = Instant::now();
    let out_dir = options.out.clone().unwrap_or_else(|| recipe.output_dir());
    let work = WorkDir::for_output(&out_dir);
    let count = recipe.input_shards;
    let fingerprint = fingerprint(recipe, count);
    if !options.resume && work.root.exists() {
        std::fs::remove_dir_all(&work.root).map_err(|e| DataError::io(&work.root, e))?;
    }
    // Loaded before the scan, so a bad tokenizer fails fast.
    recipe.tokenizer.load(&recipe.base_dir)?;
    let specs: Vec<ShardSpec> = (0..count).map(|index| ShardSpec { index, count }).collect();
    let todo: Vec<ShardSpec> = specs
        .iter()
        .copied()
        .filter(|&s| !options.resume || work.finished(s, &fingerprint).is_none())
        .collect();
    let reused_shards = count - todo.len();
    let mut listed = StageTimes::default();
    if !todo.is_empty() {
        let t = Instant::now();
        let sources = resolve_sources(recipe)?;
        listed.add("list", t, 0);
        scan_shards(recipe, &sources, &todo, &work, &fingerprint, options)?;
    }
    let mut summary = merge(recipe, options, &work, count, &fingerprint)?;
    summary.times.merge(&listed);
    std::fs::remove_dir_all(&work.root).map_err(|e| DataError::io(&work.root, e))?;
    summary.seconds = start.elapsed().as_secs_f64();
    summary.reused_shards = reused_shards;
    Ok(summary)
}

/// Scans one input shard of `recipe` (`--shard i/n`) into the work directory beside the
/// output, for a later `--merge`. With `resume`, a shard already finished is kept.
/// Returns its meta, and whether it was reused.
pub fn build_shard(
    recipe: &DataRecipe,
    shard: ShardSpec,
    options: &BuildOptions,
) -> Result<(ShardMeta, bool)> {
    let out_dir = options.out.clone().unwrap_or_else(|| recipe.output_dir());
    let work = WorkDir::for_output(&out_dir);
    let fingerprint = fingerprint(recipe, shard.count);
    if options.resume {
        if let Some(meta) = work.finished(shard, &fingerprint) {
            return Ok((meta, true));
        }
    }
    let sources = resolve_sources(recipe)?;
    let progress = ScanProgress::new(options.progress, &sources, &[shard]);
    let meta = scan_shard(recipe, &sources, shard, &work, &fingerprint, &progress)?;
    progress.bar.finish_and_clear();
    Ok((meta, false))
}

/// Clusters the finished input shards in the work directory and writes the dataset
/// (`--merge`), then removes the work directory.
pub fn merge_shards(recipe: &DataRecipe, options: &BuildOptions) -> Result<BuildSummary> {
    let start = Instant::now();
    let out_dir = options.out.clone().unwrap_or_else(|| recipe.output_dir());
    let work = WorkDir::for_output(&out_dir);
    if !work.root.is_dir() {
        return Err(DataError::dataset(
            &work.root,
            "no work directory: run `tritter-data build --shard i/n` for every shard first",
        ));
    }
    let count = work.shard_count()?;
    let mut summary = merge(recipe, options, &work, count, &fingerprint(recipe, count))?;
    std::fs::remove_dir_all(&work.root).map_err(|e| DataError::io(&work.root, e))?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Files read and bytes per second over every shard being scanned.
struct ScanProgress {
    bar: ProgressBar,
    bytes: AtomicU64,
    start: Instant,
}

impl ScanProgress {
    fn new(enabled: bool, sources: &[ResolvedSource], shards: &[ShardSpec]) -> Self {
        let items: usize = sources.iter().map(|s| s.files.len()).sum();
        let files: usize = shards.iter().map(|s| s.range(items).len()).sum();
        Self {
            bar: progress_bar(enabled, files as u64, "scan", "files"),
            bytes: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    fn file(&self, bytes: u64) {
        self.bar.inc(1);
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if self.bar.length().is_some() {
            let secs = self.start.elapsed().as_secs_f64().max(1e-9);
            self.bar
                .set_message(format!("{:.1} MB/s", total as f64 / 1e6 / secs));
        }
    }
}

/// Scans `shards` with up to `options.jobs` threads; the first error stops the others.
fn scan_shards(
    recipe: &DataRecipe,
    sources: &[ResolvedSource],
    shards: &[ShardSpec],
    work: &WorkDir,
    fingerprint: &str,
    options: &BuildOptions,
) -> Result<()> {
    let jobs = options
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, shards.len());
    let progress = ScanProgress::new(options.progress, sources, shards);
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<DataError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= shards.len() || failed.lock().expect("not poisoned").is_some() {
                    return;
                }
                if let Err(e) = scan_shard(recipe, sources, shards[i], work, fingerprint, &progress)
                {
                    failed.lock().expect("not poisoned").get_or_insert(e);
                    return;
                }
            });
        }
    });
    progress.bar.finish_and_clear();
    match failed.into_inner().expect("not poisoned") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Every corpus-scanning stage over one input shard — read, language, filters, secrets,
/// exact dedup within the shard, MinHash signatures and LSH buckets — into the work
/// directory.
fn scan_shard(
    recipe: &DataRecipe,
    sources: &[ResolvedSource],
    shard: ShardSpec,
    work: &WorkDir,
    fingerprint: &str,
    progress: &ScanProgress,
) -> Result<ShardMeta> {
    let near = recipe.dedup.near.then(|| {
        let (bands, rows) = recipe.dedup.lsh_params();
        let d = &recipe.dedup;
        (MinHasher::new(d.num_perm, d.ngram, d.seed), bands, rows)
    });
    let mut writer = WorkWriter::create(work, shard, near)?;
    let mut reports = Reports {
        removed: RemovedLog(JsonLines::create(writer.dir(), REMOVED_FILE)?),
        redactions: RedactionLog(JsonLines::create(writer.dir(), REDACTIONS_FILE)?),
    };
    let mut stats = PipelineStats::default();
    let mut times = StageTimes::default();
    let mut sink =
        |doc: Document, hash: u128, times: &mut StageTimes| writer.push(&doc, hash, times);
    let bytes_read = read_sources(
        recipe,
        sources,
        shard,
        progress,
        Tally {
            stats: &mut stats,
            times: &mut times,
            reports: &mut reports,
        },
        &mut sink,
    )?;
    reports.removed.finish()?;
    reports.redactions.finish()?;
    writer.finish(ShardMeta {
        format: WORK_FORMAT.to_string(),
        shard,
        fingerprint: fingerprint.to_string(),
        documents: 0,
        bytes_read,
        num_perm: 0,
        bands: 0,
        stats,
        times,
    })
}

/// Where a stage's counts, timings and reports go.
struct Tally<'a> {
    stats: &'a mut PipelineStats,
    times: &'a mut StageTimes,
    reports: &'a mut Reports,
}

/// A document that passed every scanning stage, with its content hash.
type Sink<'a> = dyn FnMut(Document, u128, &mut StageTimes) -> Result<()> + 'a;

/// Runs shard `shard`'s part of the sources' files through language selection, the
/// filters, secrets handling and exact dedup, in pipeline order, handing each kept
/// document to `sink`; returns the bytes read. The recipe's size caps are shared evenly
/// among the shards.
fn read_sources(
    recipe: &DataRecipe,
    sources: &[ResolvedSource],
    shard: ShardSpec,
    progress: &ScanProgress,
    tally: Tally,
    sink: &mut Sink,
) -> Result<u64> {
    let items: Vec<(usize, usize)> = sources
        .iter()
        .enumerate()
        .flat_map(|(s, source)| (0..source.files.len()).map(move |f| (s, f)))
        .collect();
    let mut admit = Admission {
        recipe,
        languages: recipe.languages(),
        stats: tally.stats,
        times: tally.times,
        reports: tally.reports,
        seen: HashMap::new(),
        sink,
        total_bytes: 0,
        total_cap: shard.share(recipe.max_total_bytes),
    };
    let mut bytes_read = 0u64;
    let mut source_bytes = vec![0u64; sources.len()];
    for &(s, f) in &items[shard.range(items.len())] {
        let (source, file) = (&sources[s], &sources[s].files[f]);
        let cap = source.max_bytes.map(|m| shard.share(m));
        let before = bytes_read;
        if let Some(columns) = &source.parquet {
            let start = Instant::now();
            let rows = read_rows(&file.path, columns)?;
            admit.times.add("read", start, 0);
            for mut row in rows {
                let id = format!("{}/{}", source.name, row.id);
                admit.stats.stage("source").keep(0);
                let content = match std::mem::replace(&mut row.content, Err("")) {
                    Ok(c) => c,
                    Err(reason) => {
                        admit.drop(&id, "read", reason)?;
                        continue;
                    }
                };
                bytes_read += content.len() as u64;
                admit.times.add("read", Instant::now(), content.len());
                let size = content.len() as u64;
                if let Some(reason) = stack_flags(&row, columns, &recipe.filters) {
                    admit.drop(&id, "filter", reason)?;
                    continue;
                }
                if !admit.fits(&id, size, source_bytes[s], cap)? {
                    continue;
                }
                let language = row.detect_language(&content);
                source_bytes[s] += admit.admit(id, &source.name, &row.path, content, language)?;
            }
        } else {
            let id = format!("{}/{}", source.name, file.relative);
            admit.stats.stage("source").keep(file.size as usize);
            if admit.fits(&id, file.size, source_bytes[s], cap)? {
                let start = Instant::now();
                match std::fs::read(&file.path) {
                    Ok(content) => {
                        bytes_read += content.len() as u64;
                        admit.times.add("read", start, content.len());
                        let language = Language::detect(&file.path, &content);
                        source_bytes[s] +=
                            admit.admit(id, &source.name, &file.relative, content, language)?;
                    }
                    Err(_) => admit.drop(&id, "read", "unreadable")?,
                }
            }
        }
        progress.file(bytes_read - before);
    }
    Ok(bytes_read)
}

/// Stack v2's own `is_generated` / `is_vendor` flags and licence, under the same switches
/// as the filters.
fn stack_flags(
    row: &ParquetRow,
    columns: &ParquetColumns,
    filters: &FilterConfig,
) -> Option<&'static str> {
    if filters.drop_generated && row.is_generated {
        Some("auto-generated")
    } else if filters.drop_vendored && row.is_vendor {
        Some("vendored")
    } else if !row.licensed(columns) {
        Some("license")
    } else {
        None
    }
}

/// The stages from language selection to exact dedup, applied to one document at a time.
struct Admission<'a, 's> {
    recipe: &'a DataRecipe,
    languages: Vec<Language>,
    stats: &'a mut PipelineStats,
    times: &'a mut StageTimes,
    reports: &'a mut Reports,
    seen: HashMap<u128, String>,
    sink: &'a mut Sink<'s>,
    total_bytes: u64,
    total_cap: u64,
}

impl Admission<'_, '_> {
    /// Whether a document of `size` bytes is within the per-file cap and the total and
    /// per-source caps (`source_bytes` kept from its source so far); logs it if not.
    fn fits(
        &mut self,
        id: &str,
        size: u64,
        source_bytes: u64,
        source_cap: Option<u64>,
    ) -> Result<bool> {
        if size > self.recipe.max_file_bytes {
            self.drop(id, "filter", "file too large")?;
            return Ok(false);
        }
        if self.total_bytes + size > self.total_cap
            || source_cap.is_some_and(|m| source_bytes + size > m)
        {
            self.stats.stage("filter").drop("over size cap");
            return Ok(false);
        }
        Ok(true)
    }

    fn drop(&mut self, id: &str, stage: &str, reason: &str) -> Result<()> {
        self.stats.stage(stage).drop(reason);
        self.reports.removed.write(id, stage, reason, None)
    }

    /// Runs one document through the stages; returns the bytes kept (0 if dropped).
    fn admit(
        &mut self,
        id: String,
        source: &str,
        relative: &str,
        content: Vec<u8>,
        language: Option<Language>,
    ) -> Result<u64> {
        let recipe = self.recipe;
        let start = Instant::now();
        let size = content.len();
        let Some(language) = language else {
            self.stats.stage("language").drop("not code");
            self.times.add("language", start, size);
            return Ok(0);
        };
        if !self.languages.contains(&language) {
            self.stats
                .stage("language")
                .drop(&format!("{language} not selected"));
            self.times.add("language", start, size);
            return Ok(0);
        }
        self.stats.stage("language").keep(size);
        self.times.add("language", start, size);

        let start = Instant::now();
        let verdict = match filter_reason(&content) {
            Some(reason) => Err(reason),
            None => {
                // Valid UTF-8 from here on (`filter_reason` checked).
                let text = String::from_utf8(content).expect("checked utf-8");
                match recipe.filters.reason(relative, &text) {
                    Some(reason) => Err(reason),
                    None => Ok(text),
                }
            }
        };
        self.times.add("filter", start, size);
        let text = match verdict {
            Ok(text) => text,
            Err(reason) => {
                self.drop(&id, "filter", reason)?;
                return Ok(0);
            }
        };
        self.stats.stage("filter").keep(text.len());

        let start = Instant::now();
        let findings = recipe.secrets.find(&text);
        self.times.add("secrets", start, size);
        let content = if findings.is_empty() {
            text.into_bytes()
        } else if recipe.secrets.action == SecretsAction::Drop {
            let reason = format!("holds a secret ({})", findings[0].kind);
            self.drop(&id, "secrets", &reason)?;
            return Ok(0);
        } else {
            for f in &findings {
                self.stats.stage("secrets").redact(f.kind);
                self.reports.redactions.write(&id, f)?;
            }
            SecretsConfig::redact(&text, &findings).into_bytes()
        };
        self.stats.stage("secrets").keep(content.len());

        let start = Instant::now();
        let hash = xxh3_128(&content);
        if recipe.dedup.exact {
            if let Some(first) = self.seen.get(&hash) {
                self.stats.stage("exact dedup").drop("identical content");
                let first = first.clone();
                self.reports.removed.write(
                    &id,
                    "exact dedup",
                    "identical content",
                    Some((&first, 1.0)),
                )?;
                return Ok(0);
            }
            self.seen.insert(hash, id.clone());
            self.stats.stage("exact dedup").keep(content.len());
        }
        self.times.add("exact dedup", start, content.len());
        let bytes = content.len() as u64;
        self.total_bytes += bytes;
        (self.sink)(
            Document {
                id,
                source: source.to_string(),
                language,
                content,
            },
            hash,
            self.times,
        )?;
        Ok(bytes)
    }
}

/// The documents a recipe keeps before near-dedup (for training a tokenizer on them).
pub fn read_documents(recipe: &DataRecipe, options: &BuildOptions) -> Result<Vec<Document>> {
    let sources = resolve_sources(recipe)?;
    let mut reports = Reports {
        removed: RemovedLog(JsonLines::sink()),
        redactions: RedactionLog(JsonLines::sink()),
    };
    let mut stats = PipelineStats::default();
    let mut times = StageTimes::default();
    let mut kept = Vec::new();
    let progress = ScanProgress::new(options.progress, &sources, &[ShardSpec::WHOLE]);
    read_sources(
        recipe,
        &sources,
        ShardSpec::WHOLE,
        &progress,
        Tally {
            stats: &mut stats,
            times: &mut times,
            reports: &mut reports,
        },
        &mut |doc, _, _| {
            kept.push(doc);
            Ok(())
        },
    )?;
    progress.bar.finish_and_clear();
    Ok(kept)
}

/// Every source of the recipe that exists here, with its files listed.
fn resolve_sources(recipe: &DataRecipe) -> Result<Vec<ResolvedSource>> {
    let mut sources = Vec::new();
    for source in &recipe.sources {
        if let Some(resolved) = list_source(recipe, source)? {
            sources.push(resolved);
        }
    }
    Ok(sources)
}

/// The finished input shards, one dataset: exact dedup across shards (a k-way merge of
/// their sorted content hashes), near dedup (each band's sorted buckets merged, one band
/// at a time, into union-find clusters), then tokenize and shard in pipeline order.
/// Memory: the union-find and one bucket at a time, never the corpus.
fn merge(
    recipe: &DataRecipe,
    options: &BuildOptions,
    work: &WorkDir,
    count: usize,
    fingerprint: &str,
) -> Result<BuildSummary> {
    let start = Instant::now();
    let out_dir = options.out.clone().unwrap_or_else(|| recipe.output_dir());
    let tokenizer = recipe.tokenizer.load(&recipe.base_dir)?;
    let shards = work.open_all(count, fingerprint)?;
    let mut bases = Vec::with_capacity(shards.len());
    let mut n = 0usize;
    let mut stats = PipelineStats::default();
    let mut times = StageTimes::default();
    let mut bytes_read = 0;
    for shard in &shards {
        bases.push(n as u64);
        n += shard.len();
        stats.merge(&shard.meta.stats);
        times.merge(&shard.meta.times);
        bytes_read += shard.meta.bytes_read;
    }
    let corpus = Corpus {
        shards: &shards,
        bases: &bases,
    };

    let staging = staging_dir(&out_dir);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;
    let mut removed = RemovedLog(JsonLines::create(&staging, REMOVED_FILE)?);
    let mut redactions = RedactionLog(JsonLines::create(&staging, REDACTIONS_FILE)?);
    for shard in &shards {
        removed.0.append(shard, REMOVED_FILE)?;
        redactions.0.append(shard, REDACTIONS_FILE)?;
    }

    let mut dropped = vec![false; n];
    let mut members = Vec::new();
    if recipe.dedup.exact && count > 1 {
        let t = Instant::now();
        let mut runs = MergedRuns::hashes(&shards, &bases)?;
        while runs.next_group(&mut members)?.is_some() {
            if members.len() < 2 {
                continue;
            }
            let first = corpus.document(members[0])?.id;
            for &g in &members[1..] {
                dropped[g] = true;
                let doc = corpus.document(g)?;
                let c = stats.stage("exact dedup");
                c.kept -= 1;
                c.kept_bytes -= doc.content.len() as u64;
                c.drop("identical content");
                removed.write(
                    &doc.id,
                    "exact dedup",
                    "identical content",
                    Some((&first, 1.0)),
                )?;
            }
        }
        times.add("exact dedup", t, 0);
    }

    let verdicts = if recipe.dedup.near {
        let t = Instant::now();
        let (bands, _) = recipe.dedup.lsh_params();
        let bar = progress_bar(options.progress, bands as u64, "near dedup", "bands");
        let mut similarity = MergeSimilarity::new(corpus, &recipe.dedup);
        let mut clusters = Clusters::new(n, recipe.dedup.threshold);
        for band in 0..bands {
            let mut runs = MergedRuns::band(&shards, &bases, band)?;
            while runs.next_group(&mut members)?.is_some() {
                if members.len() < 2 {
                    continue;
                }
                members.retain(|&g| !dropped[g]);
                clusters.bucket(&members, &mut |i, j| similarity.get(i, j));
            }
            similarity.check()?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        let (verdicts, _) = clusters.verdicts(&mut |i, j| similarity.get(i, j));
        similarity.check()?;
        let bytes = stats.stage("exact dedup").kept_bytes;
        times.add("near dedup", t, bytes as usize);
        verdicts
    } else {
        vec![Verdict::Keep; n]
    };

    let mut language_counts: BTreeMap<String, LanguageCounts> = BTreeMap::new();
    let writer =
        |split| ShardWriter::with_codec(&staging, split, recipe.shard_tokens, recipe.shard_codec);
    let (mut train, mut valid) = (writer(Split::Train), writer(Split::Valid));
    let mut first_train_doc: Option<Vec<u32>> = None;
    let bar = progress_bar(options.progress, n as u64, "tokenize", "docs");
    let tokenize_start = Instant::now();
    let mut tokenized_bytes = 0u64;
    for g in 0..n {
        bar.inc(1);
        if dropped[g] {
            continue;
        }
        let doc = corpus.document(g)?;
        if let Verdict::DuplicateOf {
            matched,
            similarity,
            ..
        } = verdicts[g]
        {
            stats.stage("near dedup").drop("near duplicate");
            let matched = corpus.document(matched)?.id;
            removed.write(
                &doc.id,
                "near dedup",
                "near duplicate",
                Some((&matched, similarity)),
            )?;
            continue;
        }
        if recipe.dedup.near {
            stats.stage("near dedup").keep(doc.content.len());
        }
        let t = Instant::now();
        let ids = tokenizer.encode_document(&doc.content, doc.language);
        times.add("tokenize", t, doc.content.len());
        stats.stage("tokenize").keep(doc.content.len());
        tokenized_bytes += doc.content.len() as u64;
        if bar.length().is_some() {
            let secs = tokenize_start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("{:.1} MB/s", tokenized_bytes as f64 / 1e6 / secs));
        }
        let counts = language_counts
            .entry(doc.language.name().to_string())
            .or_default();
        counts.documents += 1;
        counts.bytes += doc.content.len() as u64;
        counts.tokens += ids.len() as u64;
        let t = Instant::now();
        if is_valid_document(&doc, recipe.valid_fraction) {
            valid.push_document(&ids)?;
        } else {
            if first_train_doc.is_none() {
                first_train_doc = Some(ids.clone());
            }
            train.push_document(&ids)?;
        }
        times.add("shard", t, doc.content.len());
    }
    bar.finish_and_clear();
    removed.finish()?;
    redactions.finish()?;

    let train_info = train.finish()?;
    let mut valid_info = valid.finish()?;
    if train_info.documents == 0 && valid_info.documents == 0 {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(DataError::EmptyCorpus(format!(
            "no {} files were kept from sources [{}]",
            recipe.languages.join("/"),
            recipe
                .sources
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // A held-out split must exist; with a tiny corpus, hold out the first training document.
    if valid_info.documents == 0 && recipe.valid_fraction > 0.0 {
        let ids = first_train_doc.expect("train split is non-empty");
        let mut w = writer(Split::Valid);
        w.push_document(&ids)?;
        valid_info = w.finish()?;
    }
    if train_info.documents == 0 {
        return Err(DataError::EmptyCorpus(
            "every kept document fell into the validation split; lower `valid_fraction`".into(),
        ));
    }

    let tokenizer_spec = copy_tokenizer(recipe, &staging)?;
    let manifest = DatasetManifest {
        format: FORMAT.to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        name: recipe.name.clone(),
        tokenizer: tokenizer_spec,
        vocab_size: tokenizer.vocab_size(),
        eos: tokenizer.eos(),
        splits: BTreeMap::from([(Split::Train, train_info), (Split::Valid, valid_info)]),
        languages: language_counts,
        stats,
        recipe: serde_json::to_value(recipe).unwrap_or_default(),
    };
    let manifest_path = staging.join(MANIFEST_FILE);
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    std::fs::write(&manifest_path, json).map_err(|e| DataError::io(&manifest_path, e))?;
    replace_dir(&staging, &out_dir)?;

    Ok(BuildSummary {
        dir: out_dir,
        manifest,
        seconds: start.elapsed().as_secs_f64(),
        bytes_read,
        times,
        reused_shards: 0,
    })
}

/// The finished shards as one sequence of documents, by global index.
#[derive(Clone, Copy)]
struct Corpus<'a> {
    shards: &'a [WorkShard],
    bases: &'a [u64],
}

impl Corpus<'_> {
    fn locate(&self, global: usize) -> (&WorkShard, usize) {
        let shard = self.bases.partition_point(|&b| b as usize <= global) - 1;
        (&self.shards[shard], global - self.bases[shard] as usize)
    }

    fn document(&self, global: usize) -> Result<Document> {
        let (shard, index) = self.locate(global);
        shard.document(index)
    }
}

/// The merge's candidate-pair similarity: the signatures' estimate or the exact Jaccard
/// of the shingle sets, as the recipe says, read from the shards and cached (a bounded
/// number of entries). The first read error is kept for [`MergeSimilarity::check`].
struct MergeSimilarity<'a> {
    corpus: Corpus<'a>,
    config: &'a DedupConfig,
    cache: HashMap<usize, Vec<u64>>,
    signatures: HashMap<usize, Vec<u32>>,
    error: Option<DataError>,
}

/// Documents whose shingle sets or signatures stay cached during the merge.
const SIMILARITY_CACHE: usize = 1 << 16;

impl<'a> MergeSimilarity<'a> {
    fn new(corpus: Corpus<'a>, config: &'a DedupConfig) -> Self {
        Self {
            corpus,
            config,
            cache: HashMap::new(),
            signatures: HashMap::new(),
            error: None,
        }
    }

    fn get(&mut self, i: usize, j: usize) -> f64 {
        let result = match self.config.verify {
            Verify::Exact => self
                .load_sets(i, j)
                .map(|()| sorted_jaccard(&self.cache[&i], &self.cache[&j])),
            Verify::Signature => self
                .load_signatures(i, j)
                .map(|()| estimated_jaccard(&self.signatures[&i], &self.signatures[&j])),
        };
        result.unwrap_or_else(|e| {
            self.error.get_or_insert(e);
            0.0
        })
    }

    fn load_sets(&mut self, i: usize, j: usize) -> Result<()> {
        if self.cache.len() >= SIMILARITY_CACHE {
            self.cache.clear();
        }
        for k in [i, j] {
            if !self.cache.contains_key(&k) {
                let doc = self.corpus.document(k)?;
                let mut list = Vec::new();
                shingles(&doc.content, self.config.ngram, &mut list);
                self.cache.insert(k, into_set(list));
            }
        }
        Ok(())
    }

    fn load_signatures(&mut self, i: usize, j: usize) -> Result<()> {
        if self.signatures.len() >= SIMILARITY_CACHE {
            self.signatures.clear();
        }
        for k in [i, j] {
            if !self.signatures.contains_key(&k) {
                let (shard, index) = self.corpus.locate(k);
                self.signatures.insert(k, shard.signature(index)?);
            }
        }
        Ok(())
    }

    fn check(&mut self) -> Result<()> {
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The reports written beside the shards.
struct Reports {
    removed: RemovedLog,
    redactions: RedactionLog,
}

/// A JSON-lines report beside the shards.
struct JsonLines {
    path: PathBuf,
    /// `None`: lines are discarded.
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl JsonLines {
    fn create(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        let file = std::fs::File::create(&path).map_err(|e| DataError::io(&path, e))?;
        Ok(Self {
            path,
            out: Some(std::io::BufWriter::new(file)),
        })
    }

    fn sink() -> Self {
        Self {
            path: PathBuf::new(),
            out: None,
        }
    }

    fn line(&mut self, value: serde_json::Value) -> Result<()> {
        use std::io::Write;
        match &mut self.out {
            Some(out) => writeln!(out, "{value}").map_err(|e| DataError::io(&self.path, e)),
            None => Ok(()),
        }
    }

    /// Appends an input shard's part of this report.
    fn append(&mut self, shard: &WorkShard, name: &str) -> Result<()> {
        match &mut self.out {
            Some(out) => shard.copy_report(name, out, &self.path),
            None => Ok(()),
        }
    }

    fn finish(self) -> Result<()> {
        use std::io::Write;
        match self.out {
            Some(mut out) => out.flush().map_err(|e| DataError::io(&self.path, e)),
            None => Ok(()),
        }
    }
}

/// `removed.jsonl`: one line per dropped document — its id, the stage, the reason and, for
/// a duplicate, the document it duplicates with their (estimated) Jaccard similarity.
pub const REMOVED_FILE: &str = "removed.jsonl";
struct RemovedLog(JsonLines);

impl RemovedLog {
    fn write(
        &mut self,
        id: &str,
        stage: &str,
        reason: &str,
        duplicate_of: Option<(&String, f64)>,
    ) -> Result<()> {
        let mut line = serde_json::json!({ "id": id, "stage": stage, "reason": reason });
        if let Some((first, jaccard)) = duplicate_of {
            line["duplicate_of"] = first.as_str().into();
            line["jaccard"] = ((jaccard * 1000.0).round() / 1000.0).into();
        }
        self.0.line(line)
    }

    fn finish(self) -> Result<()> {
        self.0.finish()
    }
}

/// `redactions.jsonl`: the id, kind and line of every redaction — never the secret.
pub const REDACTIONS_FILE: &str = "redactions.jsonl";
struct RedactionLog(JsonLines);

impl RedactionLog {
    fn write(&mut self, id: &str, finding: &Finding) -> Result<()> {
        self.0
            .line(serde_json::json!({ "id": id, "kind": finding.kind, "line": finding.line }))
    }

    fn finish(self) -> Result<()> {
        self.0.finish()
    }
}

/// Why a file is not worth training on, if it is not.
fn filter_reason(content: &[u8]) -> Option<&'static str> {
    if content.iter().all(|b| b.is_ascii_whitespace()) {
        return Some("empty");
    }
    if std::str::from_utf8(content).is_err() {
        return Some("invalid utf-8");
    }
    None
}

/// Held-out documents are chosen by a hash of their id, so the split is stable across
/// rebuilds and machines.
fn is_valid_document(doc: &Document, valid_fraction: f64) -> bool {
    (doc.id_hash() % 1_000_000) < (valid_fraction * 1_000_000.0) as u64
}

fn copy_tokenizer(recipe: &DataRecipe, dir: &Path) -> Result<TokenizerSpec> {
    match &recipe.tokenizer {
        TokenizerSpec::Byte => Ok(TokenizerSpec::Byte),
        TokenizerSpec::HuggingFace(path) => {
            let src = recipe.resolve(path);
            let dst = dir.join("tokenizer.json");
            std::fs::copy(&src, &dst).map_err(|e| DataError::io(&src, e))?;
            Ok(TokenizerSpec::HuggingFace("tokenizer.json".into()))
        }
    }
}

fn staging_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Moves a finished dataset into place, replacing an older one only after the new one is
/// complete.
fn replace_dir(staging: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(".old");
        let old = out.with_file_name(name);
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| DataError::io(&old, e))?;
        }
        std::fs::rename(out, &old).map_err(|e| DataError::io(out, e))?;
        std::fs::rename(staging, out).map_err(|e| DataError::io(out, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| DataError::io(&old, e))?;
    } else {
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        }
        std::fs::rename(staging, out).map_err(|e| DataError::io(out, e))?;
    }
    Ok(())
}

fn progress_bar(enabled: bool, len: u64, stage: &str, unit: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{stage:<10} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}) {{msg}} eta {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

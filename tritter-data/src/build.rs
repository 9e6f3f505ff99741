//! `tritter-data build`: sources → language → filter → tokenize → shards, with counts.

use crate::dedup::{cluster_documents, DedupConfig, MinHasher, Verdict};
use crate::document::Document;
use crate::error::{DataError, Result};
use crate::filter::FilterConfig;
use crate::language::Language;
use crate::parquet_source::{read_rows, ParquetColumns, ParquetRow};
use crate::recipe::DataRecipe;
use crate::secrets::{Finding, SecretsAction, SecretsConfig};
use crate::shard::{DatasetManifest, LanguageCounts, ShardWriter, Split, FORMAT, MANIFEST_FILE};
use crate::source::{list_source, ResolvedSource};
use crate::stats::PipelineStats;
use crate::tokenizer::TokenizerSpec;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;
use xxhash_rust::xxh3::xxh3_128;

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Overrides the recipe's output directory.
    pub out: Option<PathBuf>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

#[derive(Debug, Clone)]
pub struct BuildSummary {
    pub dir: PathBuf,
    pub manifest: DatasetManifest,
    pub seconds: f64,
    pub bytes_read: u64,
}

impl BuildSummary {
    /// A human-readable table of what each stage kept and dropped.
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
        let mb = self.bytes_read as f64 / 1e6;
        out.push_str(&format!(
            "read {mb:.1} MB in {:.1} s ({:.1} MB/s)\n",
            self.seconds,
            mb / self.seconds.max(1e-9)
        ));
        out
    }
}

/// Builds the dataset a recipe describes. The dataset is written to a temporary directory
/// beside the output and renamed into place only when complete, so a failed build never
/// leaves a half-written dataset or destroys the previous one.
pub fn build_dataset(recipe: &DataRecipe, options: &BuildOptions) -> Result<BuildSummary> {
    let start = Instant::now();
    let out_dir = options.out.clone().unwrap_or_else(|| recipe.output_dir());
    let tokenizer = recipe.tokenizer.load(&recipe.base_dir)?;
    let sources = resolve_sources(recipe)?;

    let staging = staging_dir(&out_dir);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| DataError::io(&staging, e))?;

    let mut stats = PipelineStats::default();
    let mut language_counts: BTreeMap<String, LanguageCounts> = BTreeMap::new();
    let mut train = ShardWriter::with_codec(
        &staging,
        Split::Train,
        recipe.shard_tokens,
        recipe.shard_codec,
    );
    let mut valid = ShardWriter::with_codec(
        &staging,
        Split::Valid,
        recipe.shard_tokens,
        recipe.shard_codec,
    );
    let mut first_train_doc: Option<Vec<u32>> = None;

    let mut reports = Reports {
        removed: RemovedLog(JsonLines::create(&staging, REMOVED_FILE)?),
        redactions: RedactionLog(JsonLines::create(&staging, REDACTIONS_FILE)?),
    };
    let (kept, bytes_read) = read_sources(recipe, &sources, options, &mut stats, &mut reports)?;
    let Reports {
        mut removed,
        redactions,
    } = reports;

    let verdicts = if recipe.dedup.near {
        near_dedup_stage(
            &kept,
            &recipe.dedup,
            options.progress,
            &mut stats,
            &mut removed,
        )?
    } else {
        vec![Verdict::Keep; kept.len()]
    };
    for (doc, verdict) in kept.iter().zip(verdicts) {
        if verdict != Verdict::Keep {
            continue;
        }
        let ids = tokenizer.encode_document(&doc.content, doc.language);
        stats.stage("tokenize").keep(doc.content.len());
        let counts = language_counts
            .entry(doc.language.name().to_string())
            .or_default();
        counts.documents += 1;
        counts.bytes += doc.content.len() as u64;
        counts.tokens += ids.len() as u64;
        if is_valid_document(doc, recipe.valid_fraction) {
            valid.push_document(&ids)?;
        } else {
            if first_train_doc.is_none() {
                first_train_doc = Some(ids.clone());
            }
            train.push_document(&ids)?;
        }
    }
    drop(kept);
    removed.finish()?;
    redactions.finish()?;

    let train_info = train.finish()?;
    let mut valid_info = valid.finish()?;
    if train_info.documents == 0 && valid_info.documents == 0 {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(DataError::EmptyCorpus(format!(
            "no {} files were kept from sources [{}]",
            recipe.languages.join("/"),
            describe_sources(&sources)
        )));
    }
    // A held-out split must exist; with a tiny corpus, hold out the first training document.
    if valid_info.documents == 0 && recipe.valid_fraction > 0.0 {
        let ids = first_train_doc.expect("train split is non-empty");
        let mut w = ShardWriter::with_codec(
            &staging,
            Split::Valid,
            recipe.shard_tokens,
            recipe.shard_codec,
        );
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
    })
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

/// The documents of `sources` that pass language selection, the filters, secrets
/// handling and exact dedup, in pipeline order, and the bytes read; counts go to `stats`,
/// drops and redactions to their reports.
fn read_sources(
    recipe: &DataRecipe,
    sources: &[ResolvedSource],
    options: &BuildOptions,
    stats: &mut PipelineStats,
    reports: &mut Reports,
) -> Result<(Vec<Document>, u64)> {
    let start = Instant::now();
    let mut admit = Admission {
        recipe,
        languages: recipe.languages(),
        stats,
        reports,
        seen: HashMap::new(),
        kept: Vec::new(),
        total_bytes: 0,
    };
    let mut bytes_read = 0u64;
    let total_files: usize = sources.iter().map(|s| s.files.len()).sum();
    let bar = progress_bar(options.progress, total_files as u64, "reading");
    for source in sources {
        let mut source_bytes = 0u64;
        for file in &source.files {
            bar.inc(1);
            if let Some(columns) = &source.parquet {
                for mut row in read_rows(&file.path, columns)? {
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
                    let size = content.len() as u64;
                    if let Some(reason) = stack_flags(&row, columns, &recipe.filters) {
                        admit.drop(&id, "filter", reason)?;
                        continue;
                    }
                    if !admit.fits(&id, size, source_bytes, source.max_bytes)? {
                        continue;
                    }
                    let language = row.detect_language(&content);
                    source_bytes += admit.admit(id, &source.name, &row.path, content, language)?;
                }
            } else {
                let id = format!("{}/{}", source.name, file.relative);
                admit.stats.stage("source").keep(file.size as usize);
                if !admit.fits(&id, file.size, source_bytes, source.max_bytes)? {
                    continue;
                }
                let content = match std::fs::read(&file.path) {
                    Ok(c) => c,
                    Err(_) => {
                        admit.drop(&id, "read", "unreadable")?;
                        continue;
                    }
                };
                bytes_read += content.len() as u64;
                let language = Language::detect(&file.path, &content);
                source_bytes += admit.admit(id, &source.name, &file.relative, content, language)?;
            }
            if bar.length().is_some() {
                let secs = start.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!("{:.1} MB/s", bytes_read as f64 / 1e6 / secs));
            }
        }
    }
    bar.finish_and_clear();
    Ok((admit.kept, bytes_read))
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
struct Admission<'a> {
    recipe: &'a DataRecipe,
    languages: Vec<Language>,
    stats: &'a mut PipelineStats,
    reports: &'a mut Reports,
    seen: HashMap<u128, String>,
    kept: Vec<Document>,
    total_bytes: u64,
}

impl Admission<'_> {
    /// Whether a document of `size` bytes is within the per-file cap and the total and
    /// per-source caps (`source_bytes` kept from its source so far); logs it if not.
    fn fits(
        &mut self,
        id: &str,
        size: u64,
        source_bytes: u64,
        source_max: Option<u64>,
    ) -> Result<bool> {
        if size > self.recipe.max_file_bytes {
            self.drop(id, "filter", "file too large")?;
            return Ok(false);
        }
        if self.total_bytes + size > self.recipe.max_total_bytes
            || source_max.is_some_and(|m| source_bytes + size > m)
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
        let Some(language) = language else {
            self.stats.stage("language").drop("not code");
            return Ok(0);
        };
        if !self.languages.contains(&language) {
            self.stats
                .stage("language")
                .drop(&format!("{language} not selected"));
            return Ok(0);
        }
        self.stats.stage("language").keep(content.len());
        if let Some(reason) = filter_reason(&content) {
            self.drop(&id, "filter", reason)?;
            return Ok(0);
        }
        // Valid UTF-8 from here on (`filter_reason` checked).
        let text = String::from_utf8(content).expect("checked utf-8");
        if let Some(reason) = recipe.filters.reason(relative, &text) {
            self.drop(&id, "filter", reason)?;
            return Ok(0);
        }
        self.stats.stage("filter").keep(text.len());
        let findings = recipe.secrets.find(&text);
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
        if recipe.dedup.exact {
            let hash = xxh3_128(&content);
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
        let bytes = content.len() as u64;
        self.total_bytes += bytes;
        self.kept.push(Document {
            id,
            source: source.to_string(),
            language,
            content,
        });
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
    Ok(read_sources(recipe, &sources, options, &mut stats, &mut reports)?.0)
}

/// MinHash signatures of the kept documents, then LSH clusters; the first document of
/// each cluster stays.
fn near_dedup_stage(
    docs: &[Document],
    config: &DedupConfig,
    progress: bool,
    stats: &mut PipelineStats,
    removed: &mut RemovedLog,
) -> Result<Vec<Verdict>> {
    let hasher = MinHasher::new(config.num_perm, config.ngram, config.seed);
    let bar = progress_bar(progress, docs.len() as u64, "signatures");
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut scratch = Vec::new();
    let signatures: Vec<Vec<u32>> = docs
        .iter()
        .map(|d| {
            bar.inc(1);
            bytes += d.content.len() as u64;
            if bar.length().is_some() {
                let secs = start.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!("{:.1} MB/s", bytes as f64 / 1e6 / secs));
            }
            hasher.signature(&d.content, &mut scratch)
        })
        .collect();
    bar.finish_and_clear();
    let contents: Vec<&[u8]> = docs.iter().map(|d| d.content.as_slice()).collect();
    let (verdicts, _) = cluster_documents(&signatures, &contents, config);
    for (doc, verdict) in docs.iter().zip(&verdicts) {
        match *verdict {
            Verdict::Keep => stats.stage("near dedup").keep(doc.content.len()),
            Verdict::DuplicateOf {
                matched,
                similarity,
                ..
            } => {
                stats.stage("near dedup").drop("near duplicate");
                removed.write(
                    &doc.id,
                    "near dedup",
                    "near duplicate",
                    Some((&docs[matched].id, similarity)),
                )?;
            }
        }
    }
    Ok(verdicts)
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

fn describe_sources(sources: &[ResolvedSource]) -> String {
    sources
        .iter()
        .map(|s| {
            format!(
                "{} ({}, {} candidate files)",
                s.name,
                s.root.display(),
                s.files.len()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
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

fn progress_bar(enabled: bool, len: u64, stage: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{stage:<10} [{{bar:30}}] {{pos}}/{{len}} files ({{per_sec}}) {{msg}} eta {{eta}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

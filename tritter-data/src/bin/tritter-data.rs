//! `tritter-data`: builds token datasets from code.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tritter_data::{
    build_dataset, build_shard, error::at_least_one, merge_shards, BuildOptions, DataRecipe,
    DatasetManifest, DedupConfig, ShardReader, ShardSpec, Split,
};

#[derive(Parser)]
#[command(
    name = "tritter-data",
    version,
    about = "Build token datasets from source code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a dataset from a data recipe, or from directories with the default stages.
    #[command(group(clap::ArgGroup::new("input").required(true).args(["recipe", "source"])))]
    Build {
        recipe: Option<PathBuf>,
        /// A directory of code (repeatable), instead of a recipe; needs --out.
        #[arg(long, conflicts_with = "recipe", requires = "out")]
        source: Vec<PathBuf>,
        /// Write the dataset here instead of the recipe's `output`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Scan only input shard `i` of `n` (0-based) into `{out}.work/`, for a later
        /// `--merge`: one per machine or scheduler task.
        #[arg(long, value_parser = ShardSpec::parse, conflicts_with = "merge")]
        shard: Option<ShardSpec>,
        /// Merge the finished input shards in `{out}.work/` into the dataset.
        #[arg(long)]
        merge: bool,
        /// Reuse the input shards an interrupted run finished.
        #[arg(long)]
        resume: bool,
        /// Input shards scanned at once (default: the available cores).
        #[arg(long, value_parser = at_least_one)]
        jobs: Option<usize>,
    },
    /// Print a dataset's manifest summary.
    Inspect {
        dataset: PathBuf,
        /// Also print the first N training documents, decoded (up to 400 bytes each).
        #[arg(long, default_value_t = 0)]
        samples: usize,
    },
    /// Tokenizers.
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Benchmarks on real code.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE `tokenizer.json` on the documents a data recipe keeps
    /// (after filters, secrets and exact dedup); a recipe uses it with
    /// `tokenizer = { huggingface = "tokenizer.json" }`.
    Train {
        recipe: PathBuf,
        #[arg(long)]
        vocab_size: usize,
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Exact and near-dedup on one core: MB/s per stage, duplicate rates, and near-dedup's
    /// precision and recall against exact Jaccard on sampled pairs.
    Dedup {
        /// Directory of code (default: the local Cargo registry sources).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Megabytes of .rs and .py files to read, in path order.
        #[arg(long, default_value_t = 200)]
        max_mb: u64,
        /// Reference pairs to score by exact Jaccard.
        #[arg(long, default_value_t = 5000)]
        pairs: usize,
        #[arg(long, default_value_t = 0.7)]
        threshold: f64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Build {
            recipe,
            source,
            out,
            shard,
            merge,
            resume,
            jobs,
        } => {
            let recipe = match (recipe, &out) {
                (Some(path), _) => DataRecipe::from_file(&path)?,
                (None, Some(out)) => DataRecipe::from_sources(&source, out)?,
                (None, None) => unreachable!("clap requires --out with --source"),
            };
            let options = BuildOptions {
                out,
                progress: true,
                resume,
                jobs,
            };
            if let Some(shard) = shard {
                let (meta, reused) = build_shard(&recipe, shard, &options)?;
                let kept: u64 = meta
                    .stats
                    .stages
                    .get("exact dedup")
                    .map_or(meta.documents, |c| c.kept);
                println!(
                    "input shard {shard}: {} documents kept of {:.1} MB read{}",
                    kept,
                    meta.bytes_read as f64 / 1e6,
                    if reused {
                        " (finished earlier; reused)"
                    } else {
                        ""
                    }
                );
            } else {
                let summary = if merge {
                    merge_shards(&recipe, &options)?
                } else {
                    build_dataset(&recipe, &options)?
                };
                print!("{}", summary.table());
            }
        }
        Command::Inspect { dataset, samples } => {
            let manifest = DatasetManifest::load(&dataset)?;
            let samples = if samples > 0 {
                let tokenizer = manifest.tokenizer.load(&dataset)?;
                let stream = ShardReader::load(&dataset, Split::Train)?;
                let ends = stream
                    .doc_starts
                    .iter()
                    .skip(1)
                    .copied()
                    .chain([stream.tokens.len() as u64]);
                stream
                    .doc_starts
                    .iter()
                    .zip(ends)
                    .take(samples)
                    .map(|(&start, end)| {
                        let bytes = tokenizer.decode(&stream.tokens[start as usize..end as usize]);
                        let text =
                            String::from_utf8_lossy(&bytes[..bytes.len().min(400)]).into_owned();
                        serde_json::json!({ "tokens": end - start, "text": text })
                    })
                    .collect()
            } else {
                Vec::new()
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "name": manifest.name,
                    "tokenizer": manifest.tokenizer,
                    "vocab_size": manifest.vocab_size,
                    "splits": manifest.splits.iter().map(|(s, i)| (s.name().to_string(), serde_json::json!({"documents": i.documents, "tokens": i.tokens, "shards": i.shards.len()}))).collect::<serde_json::Map<_, _>>(),
                    "languages": manifest.languages,
                    "stats": manifest.stats,
                    "samples": samples,
                }))
                .context("printing manifest")?
            );
        }
        Command::Tokenizer {
            command:
                TokenizerCommand::Train {
                    recipe,
                    vocab_size,
                    out,
                },
        } => {
            let recipe = DataRecipe::from_file(&recipe)?;
            let options = BuildOptions {
                progress: true,
                ..BuildOptions::default()
            };
            let s = tritter_data::bpe::train_bpe(&recipe, vocab_size, &out, &options)?;
            println!(
                "wrote {}: {} tokens, trained on {} documents ({:.1} MB) in {:.1} s; {:.3} tokens per byte",
                out.display(),
                s.vocab_size,
                s.documents,
                s.bytes as f64 / 1e6,
                s.seconds,
                s.tokens_per_byte
            );
        }
        Command::Bench {
            bench:
                Bench::Dedup {
                    dir,
                    max_mb,
                    pairs,
                    threshold,
                },
        } => {
            let dir = match dir {
                Some(d) => d,
                None => tritter_data::source::cargo_home()
                    .map(|h| h.join("registry").join("src"))
                    .context("no --dir given and no Cargo home found")?,
            };
            let start = std::time::Instant::now();
            let docs = read_code(&dir, max_mb * 1_000_000)?;
            let bytes: usize = docs.iter().map(Vec::len).sum();
            eprintln!(
                "read {} files, {:.1} MB from {} in {:.1} s",
                docs.len(),
                bytes as f64 / 1e6,
                dir.display(),
                start.elapsed().as_secs_f64()
            );
            let config = DedupConfig {
                threshold,
                ..Default::default()
            };
            if let Some(problem) = config.problem() {
                anyhow::bail!(problem);
            }
            let r = tritter_data::bench::bench_dedup(&docs, &config, pairs);
            let mb = r.bytes as f64 / 1e6;
            println!("{} documents, {mb:.1} MB; one core", r.documents);
            println!(
                "exact dedup      {:>8.1} MB/s   {} duplicates ({:.1}%)",
                r.exact_mb_per_sec,
                r.exact_duplicates,
                100.0 * r.exact_duplicates as f64 / r.documents as f64
            );
            println!(
                "minhash          {:>8.1} MB/s   {} permutations, {}-gram shingles",
                r.signature_mb_per_sec, config.num_perm, config.ngram
            );
            println!(
                "lsh + clusters   {:>8.1} MB/s   {} bands x {} rows, {} near duplicates ({:.1}% of unique)",
                mb / r.cluster_secs.max(1e-9),
                r.bands,
                r.rows,
                r.near_duplicates,
                100.0 * r.near_duplicates as f64 / (r.documents - r.exact_duplicates).max(1) as f64
            );
            println!(
                "near dedup at Jaccard {threshold}: precision {:.3}, recall {:.3} on {} pairs scored by exact Jaccard ({} at or above it)",
                r.precision, r.recall, r.pairs_scored, r.true_pairs
            );
            if let Some(rss) = r.peak_rss {
                println!("peak resident set {:.0} MiB", rss as f64 / (1 << 20) as f64);
            }
        }
    }
    Ok(())
}

/// `.rs` and `.py` files under `dir` up to 256 KiB each, in path order, until `max_bytes`.
fn read_code(dir: &std::path::Path, max_bytes: u64) -> Result<Vec<Vec<u8>>> {
    let mut docs = Vec::new();
    let mut total = 0u64;
    let walker = ignore::WalkBuilder::new(dir)
        .standard_filters(false)
        .sort_by_file_path(|a, b| a.cmp(b))
        .build();
    for entry in walker {
        let entry = entry.with_context(|| format!("walking {}", dir.display()))?;
        let path = entry.path();
        let code = path.extension().is_some_and(|e| e == "rs" || e == "py");
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        if !code || !entry.file_type().is_some_and(|t| t.is_file()) || size > 256 << 10 {
            continue;
        }
        if total + size > max_bytes {
            break;
        }
        let content = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        total += content.len() as u64;
        docs.push(content);
    }
    Ok(docs)
}

//! `tritter-data`: builds token datasets from code.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tritter_data::{build_dataset, BuildOptions, DataRecipe, DatasetManifest};

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
    /// Build a dataset from a data recipe.
    Build {
        recipe: PathBuf,
        /// Write the dataset here instead of the recipe's `output`.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a dataset's manifest summary.
    Inspect { dataset: PathBuf },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Build { recipe, out } => {
            let recipe = DataRecipe::from_file(&recipe)?;
            let summary = build_dataset(
                &recipe,
                &BuildOptions {
                    out,
                    progress: true,
                },
            )?;
            print!("{}", summary.table());
        }
        Command::Inspect { dataset } => {
            let manifest = DatasetManifest::load(&dataset)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "name": manifest.name,
                    "tokenizer": manifest.tokenizer,
                    "vocab_size": manifest.vocab_size,
                    "splits": manifest.splits.iter().map(|(s, i)| (s.name().to_string(), serde_json::json!({"documents": i.documents, "tokens": i.tokens, "shards": i.shards.len()}))).collect::<serde_json::Map<_, _>>(),
                    "languages": manifest.languages,
                    "stats": manifest.stats,
                }))
                .context("printing manifest")?
            );
        }
    }
    Ok(())
}

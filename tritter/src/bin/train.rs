//! `train <recipe.toml>`: quantization-aware training of a Tritter model.

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use tritter::train::recipe::TrainRecipe;
use tritter::train::{train, TrainOptions};

#[derive(Parser)]
#[command(
    name = "train",
    version,
    about = "Train a ternary Tritter model from a TOML recipe"
)]
struct Cli {
    /// Training recipe (TOML).
    recipe: PathBuf,
    /// cpu, cuda or wgpu (default: the recipe's `device`).
    #[arg(long)]
    device: Option<String>,
    /// Total optimizer steps (default: the recipe's `train.steps`).
    #[arg(long)]
    steps: Option<usize>,
    /// Continue from the newest checkpoint of the run directory.
    #[arg(long)]
    resume: bool,
    /// Run directory (default: `<train.output_dir>/<name>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Plain progress line every N steps when stdout is not a terminal.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let recipe = TrainRecipe::from_file(&cli.recipe)?;
    let summary = train(
        &recipe,
        &TrainOptions {
            device: cli.device,
            steps: cli.steps,
            resume: cli.resume,
            out: cli.out,
            log_every: cli.log_every,
        },
    )?;
    let losses: Vec<String> = summary
        .valid_losses
        .iter()
        .map(|l| format!("{l:.3}"))
        .collect();
    println!(
        "trained {} steps; validation loss by checkpoint: [{}]; run directory: {}",
        summary.steps,
        losses.join(", "),
        summary.run_dir.display()
    );
    Ok(())
}

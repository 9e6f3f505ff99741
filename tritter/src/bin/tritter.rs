//! `tritter`: export trained models and generate with them.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tritter::device::{run_on, BackendJob, DeviceKind};
use tritter::export::export_model;
use tritter::infer::{generate, load_export, Sampler, SamplingConfig};
use tritter::train::load_checkpoint_model;
use tritter_kernels::TritterBackend;

#[derive(Parser)]
#[command(
    name = "tritter",
    version,
    about = "Export and run ternary Tritter models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export a run's newest checkpoint (or a `model-N.mpk`) to packed safetensors.
    Export {
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate text from an exported model, streaming tokens to stdout.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Export { checkpoint, out } => {
            let device = Default::default();
            let (model, tokenizer, run_dir) =
                load_checkpoint_model::<burn::backend::Flex>(&checkpoint, &device)?;
            let tokenizer_json = match &tokenizer {
                tritter_data::TokenizerSpec::HuggingFace(_) => {
                    let path = run_dir.join("tokenizer.json");
                    Some(
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    )
                }
                tritter_data::TokenizerSpec::Byte => None,
            };
            let bytes = export_model(&model, &tokenizer, tokenizer_json.as_deref(), &out)?;
            let c = &model.config;
            println!(
                "wrote {} ({bytes} bytes): {} ternary weights packed in {} bytes, {} full-precision bytes",
                out.display(),
                c.ternary_parameter_count(),
                c.packed_size_bytes(),
                c.high_precision_bytes()
            );
        }
        Command::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            device,
        } => {
            let sampling = SamplingConfig {
                temperature,
                top_k,
                top_p,
                seed,
            };
            let job = GenerateJob {
                model: &model,
                prompt: &prompt,
                max_new: max_new_tokens,
                sampling,
            };
            run_on(DeviceKind::parse(&device)?, job)?;
        }
    }
    Ok(())
}

struct GenerateJob<'a> {
    model: &'a std::path::Path,
    prompt: &'a str,
    max_new: usize,
    sampling: SamplingConfig,
}

impl BackendJob for GenerateJob<'_> {
    type Output = ();
    fn run<B: TritterBackend>(self, device: B::Device) -> Result<()> {
        run_generate::<B>(self.model, self.prompt, self.max_new, self.sampling, device)
    }
}

fn run_generate<B: TritterBackend>(
    path: &std::path::Path,
    prompt: &str,
    max_new: usize,
    sampling: SamplingConfig,
    device: B::Device,
) -> Result<()> {
    let loaded = load_export::<B>(path, &device)?;
    let tokenizer = loaded.tokenizer.as_ref();
    let mut ids: Vec<u32> = tokenizer
        .bos()
        .into_iter()
        .chain(tokenizer.code_marker())
        .collect();
    ids.extend(tokenizer.encode(prompt.as_bytes()));
    let mut sampler = Sampler::new(sampling);
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(prompt.as_bytes())?;
    stdout.flush()?;
    let start = Instant::now();
    let mut generated = Vec::new();
    let mut printed = 0;
    let tokens = generate(
        &loaded.model,
        &ids,
        max_new,
        &mut sampler,
        Some(tokenizer.eos()),
        true,
        |t| {
            generated.push(t);
            let text = tokenizer.decode(&generated);
            if text.len() > printed {
                let _ = stdout.write_all(&text[printed..]);
                let _ = stdout.flush();
                printed = text.len();
            }
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    writeln!(stdout)?;
    eprintln!(
        "{} tokens in {secs:.2} s ({:.1} tokens/s)",
        tokens.len(),
        tokens.len() as f64 / secs.max(1e-9)
    );
    Ok(())
}

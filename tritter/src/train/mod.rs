//! Quantization-aware training with burn-train's `SupervisedTraining`.
//!
//! A burn-train "epoch" is `checkpoint_every` optimizer steps: after each, the validation
//! split is evaluated and a checkpoint (model, optimizer, schedule) is written to
//! `runs/<name>/checkpoint/`. The data position is the step count (see [`data`]).

pub mod data;
pub mod metrics;
pub mod recipe;
pub mod schedule;
pub mod step;

use crate::device::{run_on, BackendJob, DeviceKind};
use crate::model::{TritterConfig, TritterModel};
use anyhow::{bail, Context, Result};
use burn::backend::Autodiff;
use burn::module::Module;
use burn::optim::AdamWConfig;
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::LearningRateMetric;
use burn::train::{FileApplicationLoggerInstaller, Interrupter, Learner, SupervisedTraining};
use data::{TrainLoader, ValidLoader};
use metrics::{JsonlMetricLogger, LmMetric, LmQuantity, PlainRenderer};
use recipe::TrainRecipe;
use schedule::BitNetSchedule;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use step::{LmTrainer, StepControl};
use tritter_data::{build_dataset, BuildOptions, DataRecipe, DatasetManifest, ShardReader, Split};
use tritter_kernels::TritterBackend;

/// Command-line overrides of a recipe.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub device: Option<String>,
    pub steps: Option<usize>,
    pub resume: bool,
    /// Run directory; default `<output_dir>/<name>`.
    pub out: Option<PathBuf>,
    /// Print a plain progress line every this many steps when stdout is no terminal.
    pub log_every: usize,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: usize,
    /// Validation loss at each checkpoint, in order.
    pub valid_losses: Vec<f64>,
}

pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const CONFIG_FILE: &str = "config.json";
pub const RUN_RECIPE_FILE: &str = "recipe.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";

/// The recorder of every checkpoint file.
pub type CheckpointRecorder = NamedMpkFileRecorder<FullPrecisionSettings>;

/// Trains as the recipe says, on the device it (or `options`) names.
pub fn train(recipe: &TrainRecipe, options: &TrainOptions) -> Result<TrainSummary> {
    struct TrainJob<'a>(&'a TrainRecipe, &'a TrainOptions);
    impl BackendJob for TrainJob<'_> {
        type Output = TrainSummary;
        fn run<B: TritterBackend>(self, device: B::Device) -> Result<TrainSummary> {
            train_on::<Autodiff<B>>(self.0, self.1, device)
        }
    }
    let device = DeviceKind::parse(options.device.as_deref().unwrap_or(&recipe.device))?;
    run_on(device, TrainJob(recipe, options))
}

/// Loads the recipe's dataset, building it first when it does not exist.
pub fn ensure_dataset(recipe: &TrainRecipe) -> Result<(PathBuf, DatasetManifest)> {
    let data_path = recipe.data_recipe_path();
    let data_recipe = DataRecipe::from_file(&data_path)
        .with_context(|| format!("data recipe named by `data` in recipe `{}`", recipe.name))?;
    let dir = data_recipe.output_dir();
    if !dir.join(tritter_data::shard::MANIFEST_FILE).exists() {
        eprintln!(
            "dataset {} not built yet: building it from {}",
            dir.display(),
            data_path.display()
        );
        let summary = build_dataset(
            &data_recipe,
            &BuildOptions {
                progress: true,
                ..BuildOptions::default()
            },
        )?;
        eprint!("{}", summary.table());
    }
    let manifest = DatasetManifest::load(&dir)?;
    Ok((dir, manifest))
}

/// The newest epoch whose model, optimizer and scheduler checkpoints all exist and decode;
/// a damaged newest checkpoint (a run killed while burn-train was writing it) falls back
/// to the one before it.
pub fn latest_checkpoint(run_dir: &Path) -> Option<usize> {
    let dir = run_dir.join(CHECKPOINT_DIR);
    let mut epochs: Vec<usize> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("model-")?
                .strip_suffix(".mpk")?
                .parse()
                .ok()
        })
        .filter(|epoch| {
            ["optim", "scheduler"]
                .iter()
                .all(|kind| dir.join(format!("{kind}-{epoch}.mpk")).exists())
        })
        .collect();
    epochs.sort_unstable();
    epochs.into_iter().rev().find(|epoch| {
        let ok = ["model", "optim", "scheduler"]
            .iter()
            .all(|kind| checkpoint_loads(&dir.join(format!("{kind}-{epoch}"))));
        if !ok {
            eprintln!(
                "warning: checkpoint {epoch} in {} is damaged; using an older one",
                dir.display()
            );
        }
        ok
    })
}

/// Whether a checkpoint file decodes as a whole (a truncated or corrupt file does not).
fn checkpoint_loads(stem: &Path) -> bool {
    std::fs::read(stem.with_extension("mpk"))
        .ok()
        .is_some_and(|bytes| rmp_serde::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok())
}

fn train_on<B>(
    recipe: &TrainRecipe,
    options: &TrainOptions,
    device: B::Device,
) -> Result<TrainSummary>
where
    B: AutodiffBackend + TritterBackend,
    B::InnerBackend: TritterBackend,
{
    crate::memory::retain_freed_buffers();
    let t = &recipe.train;
    let steps = options.steps.unwrap_or(t.steps);
    if steps == 0 {
        bail!("--steps must be positive");
    }
    let run_dir = options
        .out
        .clone()
        .unwrap_or_else(|| t.output_dir.join(&recipe.name));
    let resume_epoch = if options.resume {
        Some(latest_checkpoint(&run_dir).with_context(|| {
            format!(
                "--resume: no usable checkpoint in {}",
                run_dir.join(CHECKPOINT_DIR).display()
            )
        })?)
    } else {
        if run_dir.join(CHECKPOINT_DIR).exists() {
            bail!(
                "run directory {} already holds checkpoints; pass --resume to continue it or --out to start a new run",
                run_dir.display()
            );
        }
        None
    };

    let (data_dir, manifest) = ensure_dataset(recipe)?;
    let config = recipe.model_config_for(&manifest)?;
    let train_stream = Arc::new(ShardReader::load(&data_dir, Split::Train)?);
    let valid_stream = Arc::new(ShardReader::load(&data_dir, Split::Valid)?);
    if train_stream.tokens.len() <= t.seq_len + 1 {
        bail!(
            "the training split of {} has {} tokens, fewer than one sequence of {}",
            data_dir.display(),
            train_stream.tokens.len(),
            t.seq_len + 1
        );
    }

    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    write_run_files(&run_dir, recipe, &config, &data_dir, &manifest)?;

    B::seed(&device, recipe.seed);
    let model: TritterModel<B> = config.init(&device);
    let accumulation = t.grad_accumulation;
    let schedule = BitNetSchedule::new(recipe.optim.clone(), steps, accumulation);
    let interrupter = Interrupter::new();
    let trainer = LmTrainer {
        model,
        control: Some(StepControl {
            schedule: schedule.clone(),
            grad_clip: recipe.optim.grad_clip,
            interrupter: interrupter.clone(),
        }),
    };
    let o = &recipe.optim;
    let optim = AdamWConfig::new()
        .with_beta_1(o.beta1 as f32)
        .with_beta_2(o.beta2 as f32)
        .with_epsilon(o.eps as f32)
        .with_weight_decay(0.0)
        .init::<B, LmTrainer<B>>();

    let micro_per_epoch = t.checkpoint_every * accumulation;
    let micro_total = steps * accumulation;
    let num_epochs = steps.div_ceil(t.checkpoint_every);
    let train_loader = TrainLoader::<B>::new(
        train_stream,
        recipe.seed,
        t.batch_size,
        t.seq_len,
        micro_per_epoch,
        micro_total,
        resume_epoch.unwrap_or(0),
        device.clone(),
    )
    .with_document_mask(t.document_mask);
    let valid_loader = ValidLoader::<B::InnerBackend>::new(
        valid_stream,
        t.batch_size,
        t.seq_len,
        t.valid_batches,
        device.clone(),
    )
    .with_document_mask(t.document_mask);
    if valid_loader.num_batches() == 0 {
        bail!(
            "the validation split of {} is shorter than one batch of {} × {} tokens",
            data_dir.display(),
            t.batch_size,
            t.seq_len + 1
        );
    }

    let metrics_logger =
        JsonlMetricLogger::new(&run_dir.join(METRICS_FILE), micro_per_epoch, micro_total)
            .with_context(|| format!("opening {}", run_dir.join(METRICS_FILE).display()))?;
    let mut training =
        SupervisedTraining::new(&run_dir, Arc::new(train_loader), Arc::new(valid_loader))
            .metric_train_numeric(LmMetric::new(LmQuantity::Loss))
            .metric_valid_numeric(LmMetric::new(LmQuantity::Loss))
            .metric_train_numeric(LmMetric::new(LmQuantity::Perplexity))
            .metric_valid_numeric(LmMetric::new(LmQuantity::Perplexity))
            .metric_train_numeric(LmMetric::new(LmQuantity::TokensPerSecond))
            .metric_train_numeric(LmMetric::new(LmQuantity::GradNorm))
            .metric_train_numeric(LearningRateMetric::new())
            .with_metric_logger(metrics_logger)
            .with_file_checkpointer(CheckpointRecorder::new())
            .with_checkpointing_strategy(KeepLastNCheckpoints::new(t.keep_checkpoints))
            .with_application_logger(Some(Box::new(FileApplicationLoggerInstaller::new(
                run_dir.join("train.log"),
            ))))
            .with_interrupter(interrupter.clone())
            .num_epochs(num_epochs);
    if let Some(epoch) = resume_epoch {
        training = training.checkpoint(epoch);
    }
    if !std::io::stdout().is_terminal() {
        training = training.renderer(PlainRenderer::new(
            options.log_every.max(1) * accumulation,
            micro_per_epoch,
            micro_total,
        ));
    }
    let learner = Learner::new(trainer, optim, schedule);
    let result = training.launch(learner);
    drop(result.renderer);
    if let Some(message) = interrupter.get_message() {
        bail!("{message}");
    }
    Ok(TrainSummary {
        run_dir: run_dir.clone(),
        steps,
        valid_losses: read_valid_losses(&run_dir.join(METRICS_FILE)),
    })
}

fn write_run_files(
    run_dir: &Path,
    recipe: &TrainRecipe,
    config: &TritterConfig,
    data_dir: &Path,
    manifest: &DatasetManifest,
) -> Result<()> {
    let recipe_toml = toml::to_string_pretty(recipe).context("serializing the recipe")?;
    std::fs::write(run_dir.join(RUN_RECIPE_FILE), recipe_toml)?;
    let run = serde_json::json!({
        "model": config,
        "tokenizer": manifest.tokenizer,
        "dataset": data_dir,
    });
    std::fs::write(
        run_dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&run)?,
    )?;
    if let tritter_data::TokenizerSpec::HuggingFace(path) = &manifest.tokenizer {
        std::fs::copy(data_dir.join(path), run_dir.join("tokenizer.json"))?;
    }
    Ok(())
}

/// Validation losses recorded in a run's `metrics.jsonl`, in order.
pub fn read_valid_losses(path: &Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["split"] == "valid")
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

/// Loads a training checkpoint's model (the latent weights) for a run directory or a
/// `model-N.mpk` file.
pub fn load_checkpoint_model<B: Backend>(
    path: &Path,
    device: &B::Device,
) -> Result<(TritterModel<B>, tritter_data::TokenizerSpec, PathBuf)> {
    if !path.exists() {
        bail!(
            "{}: no such run directory or checkpoint file",
            path.display()
        );
    }
    let (run_dir, model_file) = if path.is_dir() {
        let epoch = latest_checkpoint(path).with_context(|| {
            format!(
                "no usable checkpoint in {}",
                path.join(CHECKPOINT_DIR).display()
            )
        })?;
        (
            path.to_path_buf(),
            path.join(CHECKPOINT_DIR).join(format!("model-{epoch}.mpk")),
        )
    } else {
        let run_dir = path
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        (run_dir, path.to_path_buf())
    };
    let config_path = run_dir.join(CONFIG_FILE);
    let run: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("parsing {}", config_path.display()))?;
    let config: TritterConfig = serde_json::from_value(run["model"].clone())
        .with_context(|| format!("`model` in {}", config_path.display()))?;
    config.validate()?;
    let tokenizer = serde_json::from_value(run["tokenizer"].clone()).unwrap_or_default();
    let model = config.init::<B>(device);
    let trainer = LmTrainer {
        model,
        control: None,
    };
    let stem = model_file.with_extension("");
    let record = CheckpointRecorder::new()
        .load(stem.clone(), device)
        .map_err(|e| {
            anyhow::anyhow!(
                "checkpoint {} is unreadable (truncated or corrupt?): {e}",
                model_file.display()
            )
        })?;
    Ok((trainer.load_record(record).model, tokenizer, run_dir))
}

//! Training recipes (TOML): the model, the data recipe, and the optimisation settings.

use crate::infer::budget::{ByteSize, KvCacheType};
use crate::model::{ConfigOverrides, TritterConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tritter_data::DatasetManifest;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainRecipe {
    pub name: String,
    /// The data recipe whose dataset this run trains on (built first when missing).
    pub data: PathBuf,
    /// `cpu`, `cuda` or `wgpu`; `--device` overrides it.
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub model: ModelSection,
    pub train: TrainSection,
    #[serde(default)]
    pub optim: OptimSection,
    /// How the trained model runs: `tritter generate --recipe` and `tritter plan
    /// --recipe` take these unless their flags say otherwise.
    #[serde(default, skip_serializing_if = "InferenceSection::is_empty")]
    pub inference: InferenceSection,
    /// Directory the recipe was read from.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `preset` plus any [`ConfigOverrides`] field; an unknown field is an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "toml::Table", into = "toml::Table")]
pub struct ModelSection {
    pub preset: String,
    pub overrides: ConfigOverrides,
}

impl TryFrom<toml::Table> for ModelSection {
    type Error = String;

    fn try_from(mut table: toml::Table) -> Result<Self, String> {
        let preset = match table.remove("preset") {
            Some(toml::Value::String(p)) => p,
            Some(other) => return Err(format!("`model.preset` = {other}: expected a preset name")),
            None => return Err("`model.preset` is missing".into()),
        };
        let overrides = toml::Value::Table(table)
            .try_into::<ConfigOverrides>()
            .map_err(|e| format!("in [model]: {e}"))?;
        Ok(Self { preset, overrides })
    }
}

impl From<ModelSection> for toml::Table {
    fn from(section: ModelSection) -> toml::Table {
        let mut table = toml::Table::try_from(&section.overrides).unwrap_or_default();
        table.insert("preset".into(), toml::Value::String(section.preset));
        table
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps in the whole run.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accumulation: usize,
    /// Steps between checkpoints (one burn-train "epoch").
    pub checkpoint_every: usize,
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Validation batches evaluated at every checkpoint.
    #[serde(default = "default_valid_batches")]
    pub valid_batches: usize,
    /// Where runs go: `<output_dir>/<name>`; `--out` overrides the run directory.
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// Keep attention within each document of a packed training window (the shards
    /// record where documents start), instead of across the `<eos>` between them.
    #[serde(default)]
    pub document_mask: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    /// Peak learning rate, reached after warmup.
    pub lr: f64,
    pub warmup_steps: usize,
    /// Cosine decay floor as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// BitNet two-stage schedule: at this fraction of the run the learning rate drops ...
    pub stage2_at: f64,
    /// ... by this factor, and weight decay goes to zero.
    pub stage2_lr_ratio: f64,
    /// Decoupled weight decay of the ternary (BitLinear) weights in stage 1. Norms,
    /// embeddings and the head are never decayed.
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm.
    pub grad_clip: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// `[inference]`: the memory budget and streaming settings of the trained model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceSection {
    /// Bytes the inference engine may hold on the device (`"14GiB"`, or a number of
    /// bytes): a model that does not fit streams its layers through it in groups.
    pub gpu_memory_budget: Option<ByteSize>,
    /// Layers per streamed group (default: the largest that fits twice).
    pub layer_group_size: Option<usize>,
    /// KV cache storage: `f32`, `f16` or `int4`.
    pub kv_cache: Option<KvCacheType>,
}

impl InferenceSection {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Each setting this one gives, else `fallback`'s.
    pub fn or(self, fallback: Self) -> Self {
        Self {
            gpu_memory_budget: self.gpu_memory_budget.or(fallback.gpu_memory_budget),
            layer_group_size: self.layer_group_size.or(fallback.layer_group_size),
            kv_cache: self.kv_cache.or(fallback.kv_cache),
        }
    }
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            lr: 1.5e-3,
            warmup_steps: 100,
            min_lr_ratio: 0.1,
            stage2_at: 0.5,
            stage2_lr_ratio: 0.5,
            weight_decay: 0.1,
            grad_clip: 1.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        }
    }
}

fn default_device() -> String {
    "cpu".into()
}
fn default_seed() -> u64 {
    42
}
fn one() -> usize {
    1
}
fn default_keep() -> usize {
    2
}
fn default_valid_batches() -> usize {
    8
}
fn default_output_dir() -> PathBuf {
    "runs".into()
}

/// A recipe that could not be used, naming the file and what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The OS error is in the message rather than a source, so a report of the chain
    /// does not repeat it.
    #[error("cannot read recipe {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("malformed recipe {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl TrainRecipe {
    pub fn from_file(path: &Path) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|error| RecipeError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let mut recipe: TrainRecipe = toml::from_str(&text).map_err(|e| RecipeError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        recipe.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        recipe.validate().map_err(|message| RecipeError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(recipe)
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.train;
        for (field, v) in [
            ("train.steps", t.steps),
            ("train.batch_size", t.batch_size),
            ("train.seq_len", t.seq_len),
            ("train.grad_accumulation", t.grad_accumulation),
            ("train.checkpoint_every", t.checkpoint_every),
            ("train.keep_checkpoints", t.keep_checkpoints),
            ("train.valid_batches", t.valid_batches),
        ] {
            if v == 0 {
                return Err(format!("`{field}` = 0: must be positive"));
            }
        }
        let o = &self.optim;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return Err(format!("`optim.lr` = {}: must be positive", o.lr));
        }
        if !(0.0..=1.0).contains(&o.stage2_at) {
            return Err(format!(
                "`optim.stage2_at` = {}: must be in [0, 1]",
                o.stage2_at
            ));
        }
        if o.grad_clip.is_nan() || o.grad_clip <= 0.0 {
            return Err(format!(
                "`optim.grad_clip` = {}: must be positive",
                o.grad_clip
            ));
        }
        // Values outside these ranges train nothing useful, or NaN (`eps` = 0 divides
        // by a zero second moment), so they are refused with the recipe.
        for (field, v, ok, expected) in [
            (
                "optim.min_lr_ratio",
                o.min_lr_ratio,
                (0.0..=1.0).contains(&o.min_lr_ratio),
                "in [0, 1]",
            ),
            (
                "optim.stage2_lr_ratio",
                o.stage2_lr_ratio,
                o.stage2_lr_ratio > 0.0 && o.stage2_lr_ratio <= 1.0,
                "in (0, 1]",
            ),
            (
                "optim.weight_decay",
                o.weight_decay,
                (0.0..f64::INFINITY).contains(&o.weight_decay),
                "finite and at least 0",
            ),
            (
                "optim.beta1",
                o.beta1,
                (0.0..1.0).contains(&o.beta1),
                "in [0, 1)",
            ),
            (
                "optim.beta2",
                o.beta2,
                (0.0..1.0).contains(&o.beta2),
                "in [0, 1)",
            ),
            (
                "optim.eps",
                o.eps,
                o.eps > 0.0 && o.eps.is_finite(),
                "positive",
            ),
        ] {
            if !ok {
                return Err(format!("`{field}` = {v}: must be {expected}"));
            }
        }
        if self.inference.gpu_memory_budget == Some(ByteSize(0)) {
            return Err("`inference.gpu_memory_budget` = 0: must be positive".into());
        }
        if self.inference.layer_group_size == Some(0) {
            return Err("`inference.layer_group_size` = 0: must be positive".into());
        }
        crate::device::DeviceKind::parse(&self.device).map_err(|e| e.to_string())?;
        // Resolve the preset now so an unknown one is reported with the recipe.
        self.model_config(1).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The data recipe path, resolved against this recipe's directory.
    pub fn data_recipe_path(&self) -> PathBuf {
        self.base_dir.join(&self.data)
    }

    /// The model config for a vocabulary of `vocab_size` (from the dataset's tokenizer),
    /// validated, with `max_seq_len` at least the training sequence length.
    pub fn model_config(&self, vocab_size: usize) -> anyhow::Result<TritterConfig> {
        let mut config = TritterConfig::preset(&self.model.preset, vocab_size)?
            .with_overrides(&self.model.overrides);
        if self.model.overrides.vocab_size.is_none() {
            config.vocab_size = vocab_size;
        }
        config.validate()?;
        if config.max_seq_len < self.train.seq_len {
            anyhow::bail!(
                "`train.seq_len` = {} exceeds the model's `max_seq_len` = {}",
                self.train.seq_len,
                config.max_seq_len
            );
        }
        Ok(config)
    }

    /// The model config for the dataset this recipe trains on.
    pub fn model_config_for(&self, manifest: &DatasetManifest) -> anyhow::Result<TritterConfig> {
        let config = self.model_config(manifest.vocab_size)?;
        if config.vocab_size < manifest.vocab_size {
            anyhow::bail!(
                "model vocab_size {} is smaller than the dataset tokenizer's {}",
                config.vocab_size,
                manifest.vocab_size
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_recipes_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
        let mut loaded = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                TrainRecipe::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
                loaded += 1;
            }
        }
        assert!(loaded >= 3, "{loaded} recipes in {}", dir.display());
    }

    /// The fields a training recipe must give, and no more.
    const MINIMAL: &str = r#"
name = "r"
data = "data.toml"
[model]
preset = "test"
[train]
steps = 1
batch_size = 1
seq_len = 16
checkpoint_every = 1
"#;

    #[test]
    fn optimizer_settings_out_of_range_are_refused() {
        type Set = dyn Fn(&mut OptimSection);
        let base: TrainRecipe = toml::from_str(MINIMAL).unwrap();
        let with = |set: &Set| {
            let mut recipe = base.clone();
            set(&mut recipe.optim);
            recipe.validate()
        };
        assert_eq!(with(&|_| {}), Ok(()));
        let refused: [(&str, &Set); 11] = [
            ("optim.min_lr_ratio", &|o| o.min_lr_ratio = 2.0),
            ("optim.min_lr_ratio", &|o| o.min_lr_ratio = -0.1),
            ("optim.stage2_lr_ratio", &|o| o.stage2_lr_ratio = 0.0),
            ("optim.stage2_lr_ratio", &|o| o.stage2_lr_ratio = 1.5),
            ("optim.weight_decay", &|o| o.weight_decay = -0.1),
            ("optim.weight_decay", &|o| o.weight_decay = f64::NAN),
            ("optim.beta1", &|o| o.beta1 = 1.0),
            ("optim.beta2", &|o| o.beta2 = 1.5),
            ("optim.beta2", &|o| o.beta2 = -0.5),
            ("optim.eps", &|o| o.eps = 0.0),
            ("optim.eps", &|o| o.eps = f64::INFINITY),
        ];
        for (field, set) in refused {
            let err = with(set).unwrap_err();
            assert!(err.starts_with(&format!("`{field}` = ")), "{err}");
        }
        // The meaningful edges stay allowed.
        let allowed: [&Set; 4] = [
            &|o| o.min_lr_ratio = 0.0,
            &|o| o.min_lr_ratio = 1.0,
            &|o| o.stage2_lr_ratio = 1.0,
            &|o| {
                o.weight_decay = 0.0;
                o.beta1 = 0.0;
            },
        ];
        for set in allowed {
            assert_eq!(with(set), Ok(()));
        }
    }

    /// `[inference]` survives the copy of the recipe a run keeps (`recipe.toml`), so
    /// `--recipe runs/<name>/recipe.toml` serves the model as the recipe said.
    #[test]
    fn the_inference_section_round_trips() {
        let text = format!(
            "{MINIMAL}[inference]\ngpu_memory_budget = \"14GiB\"\nlayer_group_size = 4\nkv_cache = \"int4\"\n"
        );
        let recipe: TrainRecipe = toml::from_str(&text).unwrap();
        let expected = InferenceSection {
            gpu_memory_budget: Some(ByteSize(14 << 30)),
            layer_group_size: Some(4),
            kv_cache: Some(KvCacheType::Int4),
        };
        assert_eq!(recipe.inference, expected);
        let copy: TrainRecipe = toml::from_str(&toml::to_string_pretty(&recipe).unwrap()).unwrap();
        assert_eq!(copy.inference, expected);

        // Without the section nothing is written, and a number of bytes is a size too.
        let plain: TrainRecipe = toml::from_str(&text.replace(
            "gpu_memory_budget = \"14GiB\"\nlayer_group_size = 4\nkv_cache = \"int4\"",
            "gpu_memory_budget = 1048576",
        ))
        .unwrap();
        assert_eq!(plain.inference.gpu_memory_budget, Some(ByteSize(1 << 20)));
        let bare = TrainRecipe {
            inference: InferenceSection::default(),
            ..plain
        };
        assert!(!toml::to_string_pretty(&bare).unwrap().contains("inference"));
    }
}

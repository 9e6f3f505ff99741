//! Training metrics: loss, perplexity, tokens/s and gradient norm for the dashboard;
//! `metrics.jsonl` in the run directory; plain progress lines when stdout is no terminal.

use burn::train::logger::MetricLogger;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::store::{EpochSummary, MetricsUpdate, Split};
use burn::train::metric::{
    Adaptor, ItemLazy, Metric, MetricAttributes, MetricDefinition, MetricMetadata, MetricName,
    Numeric, NumericAttributes, NumericEntry, SerializedEntry,
};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What one training or validation step reports.
#[derive(Debug, Clone, Copy)]
pub struct LmStats {
    pub loss: f64,
    pub tokens: usize,
    /// Global L2 norm of this micro-batch's gradients (training only).
    pub grad_norm: Option<f64>,
}

impl ItemLazy for LmStats {
    type ItemSync = LmStats;
    fn sync(self) -> LmStats {
        self
    }
}

impl Adaptor<LmStats> for LmStats {
    fn adapt(&self) -> LmStats {
        *self
    }
}

/// Which number a [`LmMetric`] reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LmQuantity {
    Loss,
    Perplexity,
    TokensPerSecond,
    GradNorm,
}

impl LmQuantity {
    fn name(self) -> &'static str {
        match self {
            Self::Loss => "loss",
            Self::Perplexity => "perplexity",
            Self::TokensPerSecond => "tokens/s",
            Self::GradNorm => "grad_norm",
        }
    }
}

/// A numeric metric over [`LmStats`].
#[derive(Clone)]
pub struct LmMetric {
    quantity: LmQuantity,
    name: Arc<String>,
    state: NumericMetricState,
    /// Token-weighted loss sums, for perplexity = exp(mean loss).
    loss_sum: f64,
    token_sum: f64,
    last: Instant,
}

impl LmMetric {
    pub fn new(quantity: LmQuantity) -> Self {
        Self {
            quantity,
            name: Arc::new(quantity.name().to_string()),
            state: NumericMetricState::default(),
            loss_sum: 0.0,
            token_sum: 0.0,
            last: Instant::now(),
        }
    }
}

impl Metric for LmMetric {
    type Input = LmStats;

    fn update(&mut self, item: &LmStats, _meta: &MetricMetadata) -> SerializedEntry {
        let format = FormatOptions::new(self.name()).precision(3);
        let value = match self.quantity {
            LmQuantity::Loss => item.loss,
            LmQuantity::Perplexity => {
                self.loss_sum += item.loss * item.tokens as f64;
                self.token_sum += item.tokens as f64;
                item.loss.exp()
            }
            LmQuantity::TokensPerSecond => {
                let now = Instant::now();
                let secs = now.duration_since(self.last).as_secs_f64().max(1e-9);
                self.last = now;
                item.tokens as f64 / secs
            }
            LmQuantity::GradNorm => item.grad_norm.unwrap_or(f64::NAN),
        };
        self.state.update(value, 1, format)
    }

    fn clear(&mut self) {
        self.state.reset();
        self.loss_sum = 0.0;
        self.token_sum = 0.0;
        self.last = Instant::now();
    }

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: self.quantity == LmQuantity::TokensPerSecond,
        }
        .into()
    }
}

impl Numeric for LmMetric {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        match self.quantity {
            // Perplexity of the whole epoch: exp of the token-weighted mean loss.
            LmQuantity::Perplexity if self.token_sum > 0.0 => {
                NumericEntry::Value((self.loss_sum / self.token_sum).exp())
            }
            _ => self.state.running_value(),
        }
    }
}

/// Short names for metrics Burn names in prose.
fn display_name(name: &str) -> &str {
    match name {
        "Learning Rate" => "lr",
        other => other,
    }
}

fn format_number(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e5) {
        format!("{v:.2e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn entry_value(entry: &NumericEntry) -> f64 {
    match entry {
        NumericEntry::Value(v) => *v,
        NumericEntry::Aggregated {
            aggregated_value, ..
        } => *aggregated_value,
    }
}

/// Appends every metric to `metrics.jsonl`: one line per training step, one line per
/// validation pass (the pass's means).
pub struct JsonlMetricLogger {
    path: PathBuf,
    file: std::fs::File,
    names: HashMap<String, String>,
    steps_per_epoch: usize,
    total_steps: usize,
    train_items: BTreeMap<usize, usize>,
    valid_running: BTreeMap<String, f64>,
}

impl JsonlMetricLogger {
    pub fn new(path: &Path, steps_per_epoch: usize, total_steps: usize) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            names: HashMap::new(),
            steps_per_epoch,
            total_steps,
            train_items: BTreeMap::new(),
            valid_running: BTreeMap::new(),
        })
    }

    fn write(&mut self, line: serde_json::Value) {
        if let Err(e) = writeln!(self.file, "{line}") {
            log::warn!("cannot append to {}: {e}", self.path.display());
        }
    }

    fn name_of(&self, update: &burn::train::metric::store::NumericMetricUpdate) -> String {
        let id = format!("{:?}", update.entry.metric_id);
        self.names.get(&id).cloned().unwrap_or(id)
    }
}

impl MetricLogger for JsonlMetricLogger {
    fn log(&mut self, update: MetricsUpdate, epoch: usize, split: &Split) {
        match split {
            Split::Train => {
                let item = self.train_items.entry(epoch).or_default();
                *item += 1;
                let step = ((epoch - 1) * self.steps_per_epoch + *item).min(self.total_steps);
                let mut line = serde_json::json!({"split": "train", "epoch": epoch, "step": step});
                for u in &update.entries_numeric {
                    let name = self.name_of(u);
                    line[display_name(&name)] = serde_json::json!(entry_value(&u.numeric_entry));
                }
                self.write(line);
            }
            _ => {
                for u in &update.entries_numeric {
                    let name = self.name_of(u);
                    self.valid_running
                        .insert(name, entry_value(&u.running_entry));
                }
            }
        }
    }

    fn read_numeric(
        &mut self,
        _name: &str,
        _epoch: usize,
        _split: &Split,
    ) -> Result<Vec<NumericEntry>, String> {
        Err("metrics.jsonl is write-only".into())
    }

    fn log_metric_definition(&mut self, definition: MetricDefinition) {
        self.names
            .insert(format!("{:?}", definition.metric_id), definition.name);
    }

    fn log_epoch_summary(&mut self, summary: EpochSummary) {
        if matches!(summary.split, Split::Train) || self.valid_running.is_empty() {
            return;
        }
        let epoch = summary.epoch_number;
        let mut line = serde_json::json!({
            "split": "valid",
            "epoch": epoch,
            "step": (epoch * self.steps_per_epoch).min(self.total_steps),
        });
        for (name, value) in std::mem::take(&mut self.valid_running) {
            line[name] = serde_json::json!(value);
        }
        self.write(line);
    }
}

/// Prints one plain line per `every` training steps and one per validation pass.
pub struct PlainRenderer {
    names: HashMap<String, String>,
    train: BTreeMap<String, String>,
    valid: BTreeMap<String, String>,
    valid_sums: HashMap<String, (f64, usize)>,
    every: usize,
    steps_per_epoch: usize,
    total_steps: usize,
    last_valid_epoch: usize,
}

impl PlainRenderer {
    pub fn new(every: usize, steps_per_epoch: usize, total_steps: usize) -> Self {
        Self {
            names: HashMap::new(),
            train: BTreeMap::new(),
            valid: BTreeMap::new(),
            valid_sums: HashMap::new(),
            every: every.max(1),
            steps_per_epoch,
            total_steps,
            last_valid_epoch: 0,
        }
    }

    fn record(&mut self, state: MetricState, valid: bool) {
        let (entry, value) = match state {
            MetricState::Generic(e) => {
                let v = e.serialized_entry.formatted.clone();
                (e, v)
            }
            MetricState::Numeric(e, n) => {
                let mut v = entry_value(&n);
                if valid {
                    // A validation line shows the mean over the pass.
                    let id = format!("{:?}", e.metric_id);
                    let (sum, count) = self.valid_sums.entry(id).or_default();
                    *sum += v;
                    *count += 1;
                    v = *sum / *count as f64;
                }
                (e, format_number(v))
            }
        };
        let id = format!("{:?}", entry.metric_id);
        let name = self.names.get(&id).cloned().unwrap_or(id);
        let target = if valid {
            &mut self.valid
        } else {
            &mut self.train
        };
        target.insert(display_name(&name).to_string(), value);
    }

    fn line(map: &BTreeMap<String, String>) -> String {
        map.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

impl MetricsRendererTraining for PlainRenderer {
    fn update_train(&mut self, state: MetricState) {
        self.record(state, false);
    }

    fn update_valid(&mut self, state: MetricState) {
        self.record(state, true);
    }

    fn render_train(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let epoch = item.global_progress.items_processed;
        let Some(p) = item.progress else { return };
        let step = (epoch.saturating_sub(1)) * self.steps_per_epoch + p.items_processed;
        if step.is_multiple_of(self.every) || p.items_processed == p.items_total {
            println!(
                "step {step:>6}/{} | {}",
                self.total_steps,
                Self::line(&self.train)
            );
        }
    }

    fn render_valid(&mut self, item: TrainingProgress, _: Vec<ProgressType>) {
        let epoch = item.global_progress.items_processed;
        if let Some(p) = item.progress {
            if p.items_processed == p.items_total && epoch != self.last_valid_epoch {
                self.last_valid_epoch = epoch;
                let step = (epoch * self.steps_per_epoch).min(self.total_steps);
                println!("valid @ {step:>4} | {}", Self::line(&self.valid));
                self.valid_sums.clear();
            }
        }
    }
}

impl MetricsRendererEvaluation for PlainRenderer {
    fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {}
    fn update_test(&mut self, _: EvaluationName, _: MetricState) {}
}

impl MetricsRenderer for PlainRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names
            .insert(format!("{:?}", definition.metric_id), definition.name);
    }
}

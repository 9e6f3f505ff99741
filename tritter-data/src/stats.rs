//! Per-stage counters: what each stage kept and what it dropped, and why.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageCounts {
    pub kept: u64,
    pub kept_bytes: u64,
    /// Dropped documents by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Redactions by kind (documents kept with a placeholder in place of each).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redacted: BTreeMap<String, u64>,
}

impl StageCounts {
    pub fn keep(&mut self, bytes: usize) {
        self.kept += 1;
        self.kept_bytes += bytes as u64;
    }

    pub fn drop(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
    }

    pub fn redact(&mut self, kind: &str) {
        *self.redacted.entry(kind.to_string()).or_default() += 1;
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    /// Adds another part's counts (another input shard's) to these.
    pub fn merge(&mut self, other: &StageCounts) {
        self.kept += other.kept;
        self.kept_bytes += other.kept_bytes;
        for (reason, n) in &other.dropped {
            *self.dropped.entry(reason.clone()).or_default() += n;
        }
        for (kind, n) in &other.redacted {
            *self.redacted.entry(kind.clone()).or_default() += n;
        }
    }
}

/// Counts of every stage, in pipeline order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PipelineStats {
    pub stages: BTreeMap<String, StageCounts>,
}

impl PipelineStats {
    pub fn stage(&mut self, name: &str) -> &mut StageCounts {
        self.stages.entry(name.to_string()).or_default()
    }

    pub fn merge(&mut self, other: &PipelineStats) {
        for (name, counts) in &other.stages {
            self.stage(name).merge(counts);
        }
    }
}

/// Time spent in one stage and the bytes it processed (summed over threads: core-seconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageTime {
    pub seconds: f64,
    pub bytes: u64,
}

impl StageTime {
    /// Megabytes per core-second.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

/// Per-stage timings of a build. Kept out of the manifest, so that rebuilding gives the
/// same manifest; reported in the build's summary.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageTimes {
    pub stages: BTreeMap<String, StageTime>,
}

impl StageTimes {
    /// Counts the time since `start` and `bytes` processed to `stage`.
    pub fn add(&mut self, stage: &str, start: Instant, bytes: usize) {
        let t = self.stages.entry(stage.to_string()).or_default();
        t.seconds += start.elapsed().as_secs_f64();
        t.bytes += bytes as u64;
    }

    pub fn merge(&mut self, other: &StageTimes) {
        for (name, t) in &other.stages {
            let mine = self.stages.entry(name.clone()).or_default();
            mine.seconds += t.seconds;
            mine.bytes += t.bytes;
        }
    }
}

//! Per-stage counters: what each stage kept and what it dropped, and why.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
}

use super::{LatePolicy, Rules};
use serde::Deserialize;

/// Ordering and deduplication (`[order]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderConfig {
    /// How long a reading waits in the buffer before it is sealed, milliseconds. Readings of one series that
    /// arrive within this window of each other leave in event-time order. Default 1000.
    #[serde(default = "default_reorder")]
    pub reorder_window_ms: u64,
    /// Event-time span behind a series' newest reading within which a repeated reading (same series, timestamp
    /// and value) is dropped, milliseconds. Survives restarts. Default 60000.
    #[serde(default = "default_dedup")]
    pub dedup_window_ms: u64,
    /// Readings remembered per series for deduplication, at most. Default 1024.
    #[serde(default = "default_recent")]
    pub max_recent_per_series: usize,
    /// A reading older than one already sent for its series: `flag` (send it with the late flag, default) or
    /// `dead_letter` (keep it in the buffer's dead-letter table, counted).
    #[serde(default)]
    pub late: LatePolicy,
}

fn default_reorder() -> u64 {
    1000
}
fn default_dedup() -> u64 {
    60_000
}
fn default_recent() -> usize {
    1024
}

impl Default for OrderConfig {
    fn default() -> Self {
        Self {
            reorder_window_ms: default_reorder(),
            dedup_window_ms: default_dedup(),
            max_recent_per_series: default_recent(),
            late: LatePolicy::Flag,
        }
    }
}

impl OrderConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.reorder_window_ms > 600_000 {
            p.push(format!(
                "{path}.reorder_window_ms: at most 600000, got {}",
                self.reorder_window_ms
            ));
        }
        if self.dedup_window_ms > 86_400_000 {
            p.push(format!(
                "{path}.dedup_window_ms: at most 86400000, got {}",
                self.dedup_window_ms
            ));
        }
        if !(1..=100_000).contains(&self.max_recent_per_series) {
            p.push(format!(
                "{path}.max_recent_per_series: must be 1..=100000, got {}",
                self.max_recent_per_series
            ));
        }
        p
    }

    /// The release rules.
    pub fn rules(&self) -> Rules {
        Rules {
            dedup_window_ms: self.dedup_window_ms as i64,
            max_recent: self.max_recent_per_series,
            late: self.late,
        }
    }
}

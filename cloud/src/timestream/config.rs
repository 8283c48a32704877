use serde::Deserialize;

/// The Timestream for LiveAnalytics sink (`[timestream]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestreamConfig {
    /// Database name (must exist).
    pub database: String,
    /// Table name (must exist).
    pub table: String,
    /// Measure name of the multi-measure records (1 to 256 characters). Default `metrics`.
    #[serde(default = "default_measure_name")]
    pub measure_name: String,
    /// `WriteRecords` calls of one shard in flight at once. Default 4.
    #[serde(default = "default_in_flight")]
    pub max_calls_in_flight: usize,
    /// Turn on the table's magnetic store writes at startup (if off), so readings older than the memory
    /// store's retention land instead of being dead-lettered. Needs `timestream:UpdateTable`. Default false.
    #[serde(default)]
    pub magnetic_store_writes: bool,
}

fn default_in_flight() -> usize {
    4
}

fn default_measure_name() -> String {
    "metrics".into()
}

impl TimestreamConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        for (field, v) in [("database", &self.database), ("table", &self.table)] {
            if v.len() < 3 || v.len() > 256 {
                p.push(format!(
                    "{path}.{field}: must be 3 to 256 characters, got {v:?}"
                ));
            }
        }
        let max = super::records::limits::MAX_MEASURE_NAME;
        if self.measure_name.is_empty() || self.measure_name.len() > max {
            p.push(format!(
                "{path}.measure_name: must be 1 to {max} characters"
            ));
        }
        if !(1..=64).contains(&self.max_calls_in_flight) {
            p.push(format!("{path}.max_calls_in_flight: must be 1..=64"));
        }
        p
    }
}

use serde::Deserialize;

/// The Timestream for LiveAnalytics sink (`[timestream]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestreamConfig {
    /// Database name (must exist).
    pub database: String,
    /// Table name (must exist).
    pub table: String,
    /// Name of the multi-measure records. Default `metrics`.
    #[serde(default = "default_measure_name")]
    pub measure_name: String,
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
        if self.measure_name.is_empty() || self.measure_name.len() > 256 {
            p.push(format!("{path}.measure_name: must be 1 to 256 characters"));
        }
        p
    }
}

use serde::Deserialize;

/// Kinesis' limits on one `PutRecords` call.
pub const MAX_RECORDS_PER_CALL: usize = 500;
/// 5 MiB per `PutRecords` call, data and partition keys together.
pub const MAX_BYTES_PER_CALL: usize = 5 * 1024 * 1024;

/// The Kinesis stream batches go to (`[kinesis]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisConfig {
    /// Stream name.
    pub stream: String,
    /// Partition key of every record. Default: the agent id, so one agent's batches stay in order on one shard.
    #[serde(default)]
    pub partition_key: Option<String>,
    /// Records per `PutRecords` call, 1..=500. Default 500.
    #[serde(default = "default_max_records")]
    pub max_records_per_call: usize,
    /// At shutdown, how long to keep sending sealed batches before exiting (what is left stays buffered),
    /// milliseconds. Default 5000.
    #[serde(default = "default_drain")]
    pub shutdown_drain_ms: u64,
}

fn default_max_records() -> usize {
    MAX_RECORDS_PER_CALL
}
fn default_drain() -> u64 {
    5000
}

impl KinesisConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        let valid_name = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        if self.stream.is_empty() || self.stream.len() > 128 || !valid_name(&self.stream) {
            p.push(format!(
                "{path}.stream: must be 1 to 128 characters of [A-Za-z0-9._-], got {:?}",
                self.stream
            ));
        }
        if let Some(k) = &self.partition_key {
            if k.is_empty() || k.len() > 256 {
                p.push(format!("{path}.partition_key: must be 1 to 256 characters"));
            }
        }
        if !(1..=MAX_RECORDS_PER_CALL).contains(&self.max_records_per_call) {
            p.push(format!(
                "{path}.max_records_per_call: must be 1..=500, got {}",
                self.max_records_per_call
            ));
        }
        if self.shutdown_drain_ms > 600_000 {
            p.push(format!(
                "{path}.shutdown_drain_ms: at most 600000, got {}",
                self.shutdown_drain_ms
            ));
        }
        p
    }
}

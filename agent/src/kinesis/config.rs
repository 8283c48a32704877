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
    /// Highest send rate, bytes per second. Default 1048576: Kinesis accepts 1 MiB/s per shard, and one agent's
    /// records share a partition key, hence a shard. The sender halves its rate when Kinesis throttles and
    /// raises it again step by step while calls succeed.
    #[serde(default = "default_max_rate")]
    pub max_bytes_per_second: u64,
    /// Lowest send rate the throttling adaptation goes down to, bytes per second. Default 16384.
    #[serde(default = "default_min_rate")]
    pub min_bytes_per_second: u64,
    /// At shutdown, how long to keep sending sealed batches before exiting (what is left stays buffered),
    /// milliseconds. The `PutRecords` call in flight at the stop finishes within it (keep it above the usual call
    /// time, `[aws] attempt_timeout_ms` at most); a call is abandoned, and resent at the next start, only if it is
    /// still running at the deadline. Default 5000.
    #[serde(default = "default_drain")]
    pub shutdown_drain_ms: u64,
}

fn default_max_records() -> usize {
    MAX_RECORDS_PER_CALL
}
fn default_max_rate() -> u64 {
    1024 * 1024
}
fn default_min_rate() -> u64 {
    16 * 1024
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
        if self.min_bytes_per_second == 0 || self.min_bytes_per_second > self.max_bytes_per_second {
            p.push(format!(
                "{path}.min_bytes_per_second: must be 1..=max_bytes_per_second, got {}",
                self.min_bytes_per_second
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

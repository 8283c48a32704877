use serde::Deserialize;

/// Where a shard is read from when there is no checkpoint.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// The oldest record still in the stream (default).
    #[default]
    TrimHorizon,
    /// Only records written after the consumer starts.
    Latest,
}

/// The stream to consume (`[kinesis]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Stream name.
    pub stream: String,
    /// `trim_horizon` (default) or `latest`.
    #[serde(default)]
    pub start: StartPosition,
    /// Records per `GetRecords` call, 1..=10000. Default 1000.
    #[serde(default = "default_limit")]
    pub max_records_per_get: i32,
    /// Wait after an empty `GetRecords`, milliseconds (Kinesis allows 5 calls per second per shard).
    /// Default 1000.
    #[serde(default = "default_idle")]
    pub idle_poll_ms: u64,
    /// How often the shard list is refreshed to pick up new shards, milliseconds. Default 30000.
    #[serde(default = "default_refresh")]
    pub shard_refresh_ms: u64,
    /// Record groups waiting between the shard readers and the sinks. Default 16.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
}

fn default_limit() -> i32 {
    1000
}
fn default_idle() -> u64 {
    1000
}
fn default_refresh() -> u64 {
    30_000
}
fn default_queue() -> usize {
    16
}

impl ConsumerConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.stream.is_empty() || self.stream.len() > 128 {
            p.push(format!("{path}.stream: must be 1 to 128 characters"));
        }
        if !(1..=10_000).contains(&self.max_records_per_get) {
            p.push(format!(
                "{path}.max_records_per_get: must be 1..=10000, got {}",
                self.max_records_per_get
            ));
        }
        if self.idle_poll_ms < 200 {
            p.push(format!(
                "{path}.idle_poll_ms: at least 200 (Kinesis allows 5 reads per second per shard)"
            ));
        }
        if self.shard_refresh_ms < 1000 {
            p.push(format!("{path}.shard_refresh_ms: at least 1000"));
        }
        if !(1..=10_000).contains(&self.queue_capacity) {
            p.push(format!("{path}.queue_capacity: must be 1..=10000"));
        }
        p
    }
}

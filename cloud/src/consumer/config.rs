use serde::Deserialize;

/// Where a shard is read from when there is no checkpoint.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// The oldest record still in the stream (default).
    #[default]
    TrimHorizon,
    /// Only records written after the consumer created the shard's lease (the moment is kept in the lease, so a
    /// restart before the first checkpoint reads from it again, not from the newest record).
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
    /// How often the shard list is refreshed to create leases for new shards, milliseconds (also done
    /// whenever a shard ends). Default 30000.
    #[serde(default = "default_refresh")]
    pub shard_refresh_ms: u64,
    /// A shard commits (writes staged files, then its checkpoint) at least this often while records flow,
    /// milliseconds. Default 300000 (5 minutes): with `commit_idle_ms`, this decides Parquet file sizes.
    #[serde(default = "default_commit_interval")]
    pub commit_interval_ms: u64,
    /// A shard that received nothing for this long commits, milliseconds. Default 30000.
    #[serde(default = "default_commit_idle")]
    pub commit_idle_ms: u64,
    /// `GetRecords` results waiting between a shard's reader and its lander. Default 4.
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
    4
}
fn default_commit_interval() -> u64 {
    300_000
}
fn default_commit_idle() -> u64 {
    30_000
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
        if self.commit_interval_ms < 1000 {
            p.push(format!("{path}.commit_interval_ms: at least 1000"));
        }
        if self.commit_idle_ms < 200 || self.commit_idle_ms > self.commit_interval_ms {
            p.push(format!(
                "{path}.commit_idle_ms: at least 200 and at most commit_interval_ms"
            ));
        }
        if !(1..=10_000).contains(&self.queue_capacity) {
            p.push(format!("{path}.queue_capacity: must be 1..=10000"));
        }
        p
    }
}

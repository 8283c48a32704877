use serde::Deserialize;
use std::path::PathBuf;

/// How hard a commit is pushed to stable storage before the agent acknowledges the data.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced before MQTT acks go out. Survives power loss. Default.
    #[default]
    Full,
    /// `synchronous=NORMAL` in WAL mode, but for seals (fsynced, so a record is sent only once its seal is on the
    /// disk): survives a crash or kill -9 of the agent, but a power loss may take the commits since the last
    /// seal or WAL checkpoint even though they were acknowledged. Faster on SD cards and eMMC.
    Normal,
}

/// What happens when the buffer reaches `max_bytes`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Delete the oldest sealed batches (their readings are counted in `fieldlink_readings_dropped_total`) and
    /// keep taking new data. Default: the newest data is usually the most valuable.
    #[default]
    DropOldest,
    /// Stop taking new data until Kinesis catches up: sources wait, MQTT messages stay unacknowledged at the
    /// broker (which then applies its own limits), Modbus polls pause.
    Backpressure,
}

/// The on-disk buffer (`[buffer]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Path of the SQLite database file. Its directory must exist and be writable.
    pub path: PathBuf,
    /// `full` (default) or `normal`; see the README section "Durability".
    #[serde(default)]
    pub durability: Durability,
    /// Cap on the buffer's counted size (unsealed readings plus sealed records), bytes. Default 268435456
    /// (256 MiB). The file itself can be somewhat larger (SQLite pages, WAL).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// `drop_oldest` (default) or `backpressure`; see [`OverflowPolicy`].
    #[serde(default)]
    pub overflow: OverflowPolicy,
    /// Incoming messages that may wait for the buffer thread; when full, sources wait (and MQTT stops reading).
    /// Default 1024.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// At most this many queued messages are committed in one transaction (group commit). Default 1000.
    #[serde(default = "default_group")]
    pub max_group_commit: usize,
    /// Free space kept on the buffer's filesystem, bytes. Before each commit the agent checks the room left (free
    /// space plus SQLite's free pages); when a commit would eat into this headroom, `drop_oldest` drops the oldest
    /// sealed batches for the shortfall and `backpressure` (or nothing left to drop) pauses intake until sending
    /// frees space. The headroom lets sealing and acknowledgement deletes still write (WAL), so a full disk never
    /// wedges the agent. On a filesystem smaller than four times this, an eighth of it is kept instead (logged).
    /// Default 33554432 (32 MiB).
    #[serde(default = "default_min_free")]
    pub min_free_bytes: u64,
}

fn default_min_free() -> u64 {
    32 * 1024 * 1024
}

fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_queue() -> usize {
    1024
}
fn default_group() -> usize {
    1000
}

impl BufferConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.path.as_os_str().is_empty() {
            p.push(format!("{path}.path: must not be empty"));
        }
        if self.max_bytes < 1024 * 1024 {
            p.push(format!(
                "{path}.max_bytes: at least 1048576 (1 MiB), got {}",
                self.max_bytes
            ));
        }
        if !(1..=1_000_000).contains(&self.queue_capacity) {
            p.push(format!(
                "{path}.queue_capacity: must be 1..=1000000, got {}",
                self.queue_capacity
            ));
        }
        if !(1..=100_000).contains(&self.max_group_commit) {
            p.push(format!(
                "{path}.max_group_commit: must be 1..=100000, got {}",
                self.max_group_commit
            ));
        }
        p
    }
}

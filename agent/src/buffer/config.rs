use serde::Deserialize;
use std::path::PathBuf;

/// How hard a commit is pushed to stable storage before the agent acknowledges the data.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced before MQTT acks go out. Survives power loss. Default.
    #[default]
    Full,
    /// `synchronous=NORMAL` in WAL mode: survives a crash or kill -9 of the agent, but the last commits before a
    /// power loss may be lost even though they were acknowledged. Faster on SD cards and eMMC.
    Normal,
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
    /// Incoming messages that may wait for the buffer thread; when full, sources wait (and MQTT stops reading).
    /// Default 1024.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// At most this many queued messages are committed in one transaction (group commit). Default 1000.
    #[serde(default = "default_group")]
    pub max_group_commit: usize,
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

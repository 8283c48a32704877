use serde::Deserialize;
use std::path::PathBuf;

/// Publishing bronze hours (`[compaction]`); needs `[parquet]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactionConfig {
    /// Whether `fieldlink-cloud run` runs a compactor beside the shard workers (only the replica holding the
    /// compactor lease works; the others stand by). `false`: this process lands files but does not publish
    /// them (run `fieldlink-cloud compact` elsewhere). Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How often the compactor looks for hours to publish, milliseconds. Default 60000.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// An hour is closed, and published, once every live shard's watermark is this many seconds past the
    /// hour's end: room for agents that send a little late (buffering, reconnects) without republishing.
    /// Readings that arrive later still land and republish their hour. Default 900.
    #[serde(default = "default_grace")]
    pub grace_s: u64,
    /// Publish hours that are not closed yet too, and republish them at every round while data arrives
    /// (bronze within a round instead of after the hour plus the grace, at the cost of rewriting the open hour's
    /// file every round). For demos and tests. Default false.
    #[serde(default)]
    pub publish_open_hours: bool,
    /// A published hour is cut into parts of about this size, MiB (`part-00000.parquet`, `part-00001.parquet`,
    /// …); an hour below it is one file. At most 5120. Default 512.
    #[serde(default = "default_max_file")]
    pub max_file_mib: u64,
    /// Memory the compactor may use, MiB: it decides how many files are merged at once (more are merged in rounds
    /// through files in `work_dir`: `(max_memory_mib - 64) / 4` files at once); the hour's size does not matter. At
    /// least 96. Default 256.
    #[serde(default = "default_memory")]
    pub max_memory_mib: u64,
    /// Local scratch directory: downloaded inputs, intermediate and output files of the hour being published
    /// (up to about twice the hour's compressed size), in a subdirectory per process named after the worker id
    /// (`compaction/scratch.rs`). Default
    /// `/tmp/fieldlink-compaction`.
    #[serde(default = "default_work_dir")]
    pub work_dir: PathBuf,
}

fn default_true() -> bool {
    true
}
fn default_interval() -> u64 {
    60_000
}
fn default_grace() -> u64 {
    900
}
fn default_max_file() -> u64 {
    512
}
fn default_memory() -> u64 {
    256
}
fn default_work_dir() -> PathBuf {
    PathBuf::from("/tmp/fieldlink-compaction")
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: default_interval(),
            grace_s: default_grace(),
            publish_open_hours: false,
            max_file_mib: default_max_file(),
            max_memory_mib: default_memory(),
            work_dir: default_work_dir(),
        }
    }
}

/// Memory one merge input takes (its decoded batch, a decompressed page and a dictionary page per column,
/// reader buffers), MiB: measured 2.8 with the bronze schema (`docs/bronze.md`), with room to spare.
pub(super) const MIB_PER_INPUT: u64 = 4;
/// Memory the compactor takes besides its inputs, MiB: the process at rest (~27 measured), the output's page
/// and dictionary buffers and its chunk (~31 measured), with room to spare.
pub(super) const MIB_BASE: u64 = 64;

impl CompactionConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if !(1_000..=86_400_000).contains(&self.interval_ms) {
            p.push(format!(
                "{path}.interval_ms: must be 1000..=86400000, got {}",
                self.interval_ms
            ));
        }
        if self.grace_s > 7 * 86_400 {
            p.push(format!(
                "{path}.grace_s: at most 604800 (7 days), got {}",
                self.grace_s
            ));
        }
        if !(1..=5_120).contains(&self.max_file_mib) {
            p.push(format!(
                "{path}.max_file_mib: must be 1..=5120, got {}",
                self.max_file_mib
            ));
        }
        if !(96..=1_048_576).contains(&self.max_memory_mib) {
            p.push(format!(
                "{path}.max_memory_mib: must be 96..=1048576, got {}",
                self.max_memory_mib
            ));
        }
        if self.work_dir.as_os_str().is_empty() {
            p.push(format!("{path}.work_dir: must not be empty"));
        }
        p
    }

    /// How many files one merge opens at once within `max_memory_mib`.
    pub fn fan_in(&self) -> usize {
        (self.max_memory_mib.saturating_sub(MIB_BASE) / MIB_PER_INPUT).clamp(2, 1024) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_field_is_named_and_the_fan_in_follows_the_memory() {
        let bad = CompactionConfig {
            interval_ms: 10,
            grace_s: 8 * 86_400,
            max_file_mib: 0,
            max_memory_mib: 32,
            work_dir: PathBuf::new(),
            ..CompactionConfig::default()
        };
        let p = bad.validate("compaction").join("\n");
        for field in [
            "compaction.interval_ms",
            "compaction.grace_s",
            "compaction.max_file_mib",
            "compaction.max_memory_mib",
            "compaction.work_dir",
        ] {
            assert!(p.contains(field), "{field} missing in:\n{p}");
        }
        assert!(CompactionConfig::default().validate("c").is_empty());
        let fan_in = |mib| {
            CompactionConfig {
                max_memory_mib: mib,
                ..CompactionConfig::default()
            }
            .fan_in()
        };
        assert_eq!((fan_in(96), fan_in(256), fan_in(64)), (8, 48, 2));
    }
}

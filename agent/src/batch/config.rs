use serde::Deserialize;

/// When a batch is sealed (`[batch]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Close a batch once its estimated compressed size reaches this many bytes. Default 24576 (24 KiB): Kinesis
    /// bills writes in 25 KB PUT payload units, so a record just under one unit uses what it pays for, while
    /// keeping records small enough for fine-grained retries and low latency. Larger targets cut per-batch
    /// overhead (each batch carries its series table) at the cost of latency.
    #[serde(default = "default_target")]
    pub target_record_bytes: usize,
    /// Close a batch at this many readings, 1..=65536. Default 10000.
    #[serde(default = "default_max_readings")]
    pub max_readings: usize,
    /// How often waiting readings are sealed, milliseconds. Default 1000. A reading is sealed once it has waited
    /// `[order] reorder_window_ms`, at the next seal tick.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Largest record, bytes. Kinesis allows 1 MiB for data plus partition key; the default and maximum,
    /// 1048320, leave room for a 256-byte key.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// zstd level, 1..=19. Default 3.
    #[serde(default = "default_level")]
    pub zstd_level: i32,
}

fn default_target() -> usize {
    24 * 1024
}
fn default_max_readings() -> usize {
    10_000
}
fn default_linger_ms() -> u64 {
    1000
}
fn default_max_record_bytes() -> usize {
    MAX_RECORD_BYTES
}

/// Kinesis' 1 MiB per record, less the longest partition key (256 bytes).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024 - 256;

fn default_level() -> i32 {
    3
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            target_record_bytes: default_target(),
            max_readings: default_max_readings(),
            linger_ms: default_linger_ms(),
            max_record_bytes: default_max_record_bytes(),
            zstd_level: default_level(),
        }
    }
}

impl BatchConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        // A batch names at most MAX_SERIES series; capping readings there means any mix of series fits.
        if !(1..=fieldlink_proto::limits::MAX_SERIES).contains(&self.max_readings) {
            p.push(format!(
                "{path}.max_readings: must be 1..=65536, got {}",
                self.max_readings
            ));
        }
        if self.linger_ms == 0 || self.linger_ms > 3_600_000 {
            p.push(format!(
                "{path}.linger_ms: must be 1..=3600000, got {}",
                self.linger_ms
            ));
        }
        if !(1024..=MAX_RECORD_BYTES).contains(&self.max_record_bytes) {
            p.push(format!(
                "{path}.max_record_bytes: must be 1024..={MAX_RECORD_BYTES}, got {}",
                self.max_record_bytes
            ));
        }
        if self.target_record_bytes == 0 || self.target_record_bytes > self.max_record_bytes {
            p.push(format!(
                "{path}.target_record_bytes: must be 1..=max_record_bytes, got {}",
                self.target_record_bytes
            ));
        }
        if !(1..=19).contains(&self.zstd_level) {
            p.push(format!(
                "{path}.zstd_level: must be 1..=19, got {}",
                self.zstd_level
            ));
        }
        p
    }
}

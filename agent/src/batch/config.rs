use serde::Deserialize;

/// When a batch is sealed (`[batch]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Seal once this many readings wait, 1..=65536. Default 10000.
    #[serde(default = "default_max_readings")]
    pub max_readings: usize,
    /// Seal once the oldest waiting reading has waited this long, milliseconds. Default 1000.
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
        if !(1..=19).contains(&self.zstd_level) {
            p.push(format!(
                "{path}.zstd_level: must be 1..=19, got {}",
                self.zstd_level
            ));
        }
        p
    }
}

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
    /// Close a batch at this many readings, 1..=65536. Default 20000: wire format v2 packs about 11,000 readings
    /// of the shared dataset into 24 KiB (about 2.2 bytes each), so the size target, not this cap, closes a
    /// record (down to 1.23 bytes a reading); the cap of 10,000 before v2 closed them near 22 KB. A backlog is
    /// sealed in steps of twice this many readings.
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
    /// Wire format version of the records this agent seals: 2 (default) or 1. Version 2 codes decimal values as
    /// integers and needs about half the bytes; a consumer that reads only version 1 dead-letters its records
    /// (`unsupported_version`), so **upgrade the cloud before the agents**, or set 1 until it is. Records already
    /// sealed keep the version they were sealed with. With 2, a tiny batch may still be written as version 1 when
    /// that is smaller (every version 2 reader reads both).
    #[serde(default = "default_wire_version")]
    pub wire_version: u8,
}

fn default_target() -> usize {
    24 * 1024
}
fn default_max_readings() -> usize {
    20_000
}
fn default_wire_version() -> u8 {
    fieldlink_proto::Version::LATEST as u8
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
            wire_version: default_wire_version(),
        }
    }
}

impl BatchConfig {
    /// The wire format version records are sealed in ([`Self::validate`] checks it is one).
    pub fn version(&self) -> fieldlink_proto::Version {
        fieldlink_proto::Version::from_byte(self.wire_version)
            .unwrap_or(fieldlink_proto::Version::LATEST)
    }

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
        if fieldlink_proto::Version::from_byte(self.wire_version).is_none() {
            p.push(format!(
                "{path}.wire_version: must be 1 or 2, got {}",
                self.wire_version
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

use serde::Deserialize;

/// The Parquet bronze sink (`[parquet]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetConfig {
    /// Where files go: `s3://bucket/prefix`, `file:///path` or a local path.
    pub location: String,
    /// A shard commits (writes its files) when it has staged this many rows, so no file holds more.
    /// Memory: up to this many rows (about 100 bytes each) per shard a worker reads. Default 1000000.
    #[serde(default = "default_max_rows")]
    pub max_rows_per_file: usize,
    /// Rows staged by all the shards this process reads: past it, each shard holding at least the average commits
    /// (at its next record, or within 250 ms if none comes; smaller files, compacted later), so memory does not
    /// grow with the number of shards a worker holds (up to `leases.max_leases_per_worker`). About 100 bytes each.
    /// Default 2000000.
    #[serde(default = "default_max_staged")]
    pub max_staged_rows: usize,
    /// Rows per row group. Default 131072.
    #[serde(default = "default_row_group")]
    pub row_group_rows: usize,
    /// zstd level for column chunks. Default 3.
    #[serde(default = "default_level")]
    pub zstd_level: i32,
}

fn default_max_rows() -> usize {
    1_000_000
}
fn default_max_staged() -> usize {
    2_000_000
}
fn default_row_group() -> usize {
    131_072
}
fn default_level() -> i32 {
    3
}

impl ParquetConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if let Err(e) = crate::store::Location::parse(&self.location) {
            p.push(format!("{path}.location: {e}"));
        }
        if self.max_rows_per_file == 0 {
            p.push(format!("{path}.max_rows_per_file: must be positive"));
        }
        if self.max_staged_rows == 0 {
            p.push(format!("{path}.max_staged_rows: must be positive"));
        }
        if self.row_group_rows == 0 {
            p.push(format!("{path}.row_group_rows: must be positive"));
        }
        if !(1..=22).contains(&self.zstd_level) {
            p.push(format!(
                "{path}.zstd_level: must be 1..=22, got {}",
                self.zstd_level
            ));
        }
        p
    }
}

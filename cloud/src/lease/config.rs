use serde::Deserialize;

/// Lease coordination (`[leases]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseConfig {
    /// DynamoDB table holding leases and checkpoints; created (on-demand capacity) if missing.
    /// Default `fieldlink-cloud-leases`. Use one table per consuming application and stream.
    #[serde(default = "default_table")]
    pub table: String,
    /// This worker's name in `leaseOwner`. Default `<hostname>-<pid>-<random>`, unique per process: leave it
    /// unset. Two running processes under one name take nothing from each other (each works on what it took
    /// first) and look like one worker to the others; a worker restarted under its old name takes its leases
    /// back once they expire.
    #[serde(default)]
    pub worker_id: Option<String>,
    /// A lease not renewed for this long is taken over by another worker, milliseconds. Leases are renewed
    /// every third of it. Default 10000 (the Kinesis Client Library's `failoverTimeMillis`).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Most shards one worker reads at once (memory: each holds up to `parquet.max_rows_per_file` staged
    /// rows). Default 64.
    #[serde(default = "default_max_leases")]
    pub max_leases_per_worker: usize,
}

fn default_table() -> String {
    "fieldlink-cloud-leases".into()
}
fn default_lease_ms() -> u64 {
    10_000
}
fn default_max_leases() -> usize {
    64
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            table: default_table(),
            worker_id: None,
            lease_ms: default_lease_ms(),
            max_leases_per_worker: default_max_leases(),
        }
    }
}

impl LeaseConfig {
    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        let ok_name = |c: char| c.is_ascii_alphanumeric() || "_-.".contains(c);
        if self.table.len() < 3 || self.table.len() > 255 || !self.table.chars().all(ok_name) {
            p.push(format!(
                "{path}.table: 3 to 255 characters of a-z, A-Z, 0-9, '_', '-', '.'; got {:?}",
                self.table
            ));
        }
        if let Some(w) = &self.worker_id {
            if w.is_empty() || w.len() > 256 {
                p.push(format!("{path}.worker_id: must be 1 to 256 characters"));
            }
        }
        if !(1_000..=600_000).contains(&self.lease_ms) {
            p.push(format!(
                "{path}.lease_ms: must be 1000..=600000, got {}",
                self.lease_ms
            ));
        }
        if self.max_leases_per_worker == 0 {
            p.push(format!("{path}.max_leases_per_worker: must be positive"));
        }
        p
    }

    /// The worker id to use: `worker_id`, or `<hostname>-<pid>-<random>`, drawn once per process. The random part
    /// keeps the default unique where hostname and pid are not: containers on the host network share the host's
    /// hostname and each runs as pid 1.
    pub fn worker(&self) -> String {
        static DEFAULT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        self.worker_id.clone().unwrap_or_else(|| {
            DEFAULT
                .get_or_init(|| {
                    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .map(|h| h.trim().to_owned())
                        .unwrap_or_else(|_| "worker".into());
                    format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..))
                })
                .clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_worker_id_is_stable_in_a_process_and_carries_a_random_part() {
        let cfg: LeaseConfig = toml::from_str("").unwrap();
        let a = cfg.worker();
        assert_eq!(a, cfg.worker(), "drawn once per process");
        let parts: Vec<&str> = a.rsplitn(3, '-').collect();
        assert_eq!(parts.len(), 3, "{a}");
        assert_eq!(parts[0].len(), 8, "{a}");
        assert_eq!(parts[1], std::process::id().to_string(), "{a}");
        let named: LeaseConfig = toml::from_str("worker_id = \"cloud-1\"").unwrap();
        assert_eq!(named.worker(), "cloud-1");
    }
}

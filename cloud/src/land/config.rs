use serde::Deserialize;

/// The resend memory (`[dedup]`): which batches were landed, per agent and buffer epoch (see
/// [`crate::land::dedup`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Memory the process may use for it, all agents together, MiB. Past it the least recently seen agents
    /// are forgotten: safe (their next batches are treated as new, nothing unlanded is skipped), but a resend
    /// of a batch landed before lands again (its rows twice in Parquet). An agent at a full window takes about
    /// `8 * window_batches` bytes per buffer epoch: 128 KiB at the default, so 256 MiB hold some 2,000 agents at
    /// full windows (a worker sees only the agents of its shards). 1 to 65536. Default 256.
    #[serde(default = "default_memory")]
    pub max_memory_mib: u64,
    /// Batch sequence numbers remembered per agent epoch below the highest seen; a resend older than that
    /// lands again. Keep it above the agents' `max_bytes / target_record_bytes` (records a full buffer holds:
    /// 10,923 at the agent's defaults), so no resend from a backlog is older. 64 to 1048576. Default 16384.
    #[serde(default = "default_window")]
    pub window_batches: u64,
    /// When a worker takes a shard, it first reads the shard's records of this many seconds before its
    /// checkpoint (without landing them) into the resend memory, so an agent's resend of a batch another process
    /// landed just before a restart, a kill or a lease move is still skipped. 0 turns it off; at most 3600.
    /// Default 300.
    #[serde(default = "default_warmup")]
    pub warmup_s: u64,
}

fn default_warmup() -> u64 {
    300
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            max_memory_mib: default_memory(),
            window_batches: default_window(),
            warmup_s: default_warmup(),
        }
    }
}

fn default_memory() -> u64 {
    256
}
fn default_window() -> u64 {
    16_384
}

impl DedupConfig {
    /// The memory bound in bytes.
    pub fn max_bytes(&self) -> usize {
        usize::try_from(self.max_memory_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }

    /// Problems with this section, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if !(1..=65_536).contains(&self.max_memory_mib) {
            p.push(format!(
                "{path}.max_memory_mib: must be 1..=65536, got {}",
                self.max_memory_mib
            ));
        }
        if !(64..=1_048_576).contains(&self.window_batches) {
            p.push(format!(
                "{path}.window_batches: must be 64..=1048576, got {}",
                self.window_batches
            ));
        }
        if self.warmup_s > 3600 {
            p.push(format!(
                "{path}.warmup_s: at most 3600, got {}",
                self.warmup_s
            ));
        }
        let need = 16
            * super::dedup::agent_bytes_max(self.window_batches, super::dedup::MAX_EPOCHS) as u64;
        if p.is_empty() && self.max_memory_mib << 20 < need {
            p.push(format!(
                "{path}.max_memory_mib: must hold at least 16 agents at a full window ({} MiB for window_batches = {})",
                need.div_ceil(1 << 20),
                self.window_batches
            ));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert!(DedupConfig::default().validate("dedup").is_empty());
        let bad = DedupConfig {
            max_memory_mib: 0,
            window_batches: 1,
            warmup_s: 3601,
        };
        let p = bad.validate("dedup").join("\n");
        assert!(
            p.contains("dedup.max_memory_mib")
                && p.contains("dedup.window_batches")
                && p.contains("dedup.warmup_s"),
            "{p}"
        );
        let small = DedupConfig {
            max_memory_mib: 1,
            window_batches: 1_048_576,
            ..DedupConfig::default()
        };
        assert!(small.validate("dedup")[0].contains("at least 16 agents"));
    }
}

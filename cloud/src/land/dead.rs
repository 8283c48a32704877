//! The dead-letter location: what could not be landed, with the reason, so nothing is dropped silently and
//! no bad record blocks its shard.
//!
//! Layout (keys are deterministic, so a replay rewrites the same objects instead of adding copies):
//! - `kinesis/reason=<reason>/<shard>-<sequence number>.bin`: a Kinesis record that does not decode (garbage,
//!   unknown version, decompression bomb, over a limit), its bytes as received.
//! - `timestream/<agent>-<batch epoch>-<batch seq>-<shard>-<sequence number>.jsonl`: readings Timestream refused
//!   or that break its limits, one JSON object per line with `reason`, `series`, `time_ms` and the record, and
//!   the batch id `agent`, `batch_epoch`, `batch_seq`. The epoch is decimal, 0 for records from before epochs.
//! - `influxdb/<agent>-<batch epoch>-<batch seq>-<shard>-<sequence number>.jsonl`: line-protocol lines InfluxDB
//!   refused (`reason` with the server's message, `line`) and readings line protocol cannot carry (`reason`,
//!   `series`, `time_ms`), with the same batch id.
//!
//! `<agent>` is the record's agent id as one key segment ([`crate::store::segment`]: `%XX` outside
//! `[A-Za-z0-9._-]`), so an id from another producer cannot name a directory or leave the location; past 96
//! escaped bytes it is cut and a hash of the whole id added ([`agent_segment`]).
//!
//! Under a Parquet location the default prefix is `_dead_letter/`, which Athena, Hive and Spark skip.

use crate::land::retry::SinkMonitor;
use crate::land::{Origin, SinkError};
use crate::metrics::CloudMetrics;
use crate::store::Store;
use tokio_util::sync::CancellationToken;

/// Writes dead letters; clones share the store. Writes are retried until they succeed (reported as sink
/// `dead_letter`, see [`crate::land::retry`]) or the worker stops.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    store: Store,
    metrics: CloudMetrics,
    monitor: SinkMonitor,
    cancel: CancellationToken,
}

impl DeadLetters {
    /// Dead letters written to `store`.
    pub fn new(store: Store, metrics: CloudMetrics, monitor: SinkMonitor) -> Self {
        Self {
            store,
            metrics,
            monitor,
            cancel: CancellationToken::new(),
        }
    }

    /// The same location for a shard worker: retries end when `cancel` fires.
    pub fn for_worker(&self, cancel: &CancellationToken) -> Self {
        Self {
            cancel: cancel.clone(),
            ..self.clone()
        }
    }

    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), SinkError> {
        self.store
            .put_until_done(key, bytes, &self.monitor, &self.cancel)
            .await
            .map_err(|e| SinkError {
                sink: self.monitor.sink(),
                message: e.to_string(),
            })
    }

    /// A Kinesis record that cannot be decoded.
    pub async fn record(
        &self,
        origin: &Origin,
        reason: &str,
        data: &[u8],
    ) -> Result<(), SinkError> {
        let key = format!(
            "kinesis/reason={reason}/{}-{}.bin",
            origin.shard, origin.sequence_number
        );
        self.put(&key, data.to_vec()).await?;
        self.metrics.dead_letter(reason).inc();
        tracing::warn!(shard = %origin.shard, sequence_number = %origin.sequence_number, reason, key = %key, "record dead-lettered");
        Ok(())
    }

    /// Readings a sink refused, as JSON lines (each carries its own `reason`).
    pub async fn readings(
        &self,
        sink: &str,
        origin: &Origin,
        agent: &str,
        epoch: u64,
        seq: u64,
        mut lines: Vec<serde_json::Value>,
    ) -> Result<(), SinkError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut body = Vec::new();
        for l in &mut lines {
            if let Some(o) = l.as_object_mut() {
                o.insert("agent".into(), agent.into());
                o.insert("batch_epoch".into(), epoch.into());
                o.insert("batch_seq".into(), seq.into());
            }
            body.extend_from_slice(l.to_string().as_bytes());
            body.push(b'\n');
        }
        // The agent id as one escaped segment: any id a record carries stays one file inside the location.
        let key = format!(
            "{sink}/{}-{epoch}-{seq}-{}-{}.jsonl",
            agent_segment(agent),
            origin.shard,
            origin.sequence_number
        );
        self.put(&key, body).await?;
        for l in &lines {
            let reason = l.get("reason").and_then(|r| r.as_str()).unwrap_or("other");
            self.metrics
                .dead_letter_readings(sink, reason_class(reason))
                .inc();
        }
        tracing::warn!(sink, agent, epoch, seq, readings = lines.len(), key = %key, "readings dead-lettered");
        Ok(())
    }
}

/// A bounded label for a free-text reason (Timestream's messages contain values).
fn reason_class(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("version") {
        "version_conflict"
    } else if r.contains("retention") || r.contains("too old") || r.contains("future") {
        "out_of_retention"
    } else if r.contains("limit") || r.contains("too long") || r.contains("too many") {
        "over_limit"
    } else if r.contains("nan") || r.contains("infinite") || r.contains("value") {
        "bad_value"
    } else {
        "other"
    }
}

/// Escaped agent ids longer than this are cut ([`agent_segment`]).
const MAX_AGENT_SEGMENT: usize = 96;

/// `agent` as one key segment ([`crate::store::segment`]); an escaped id over [`MAX_AGENT_SEGMENT`] bytes (`%XX`
/// triples a byte: a 64-byte id of another alphabet) is cut to its first 64 bytes, `~` and a hash of the whole
/// id, so the file name stays within a local file system's 255 bytes. Deterministic, as every key here.
fn agent_segment(agent: &str) -> String {
    let s = crate::store::segment(agent);
    if s.len() <= MAX_AGENT_SEGMENT {
        return s;
    }
    let hash = agent.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    // The escaped form is ASCII: any byte offset is a character boundary.
    format!("{}~{hash:016x}", &s[..64])
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldlink_ops::metrics::{Health, Registry};

    #[tokio::test]
    async fn any_agent_id_stays_one_file_inside_the_location() {
        let dir = std::env::temp_dir().join(format!("fieldlink-dead-{}", std::process::id()));
        let root = dir.join("dead");
        let metrics = CloudMetrics::new(Registry::new());
        let monitor = SinkMonitor::new(
            "dead_letter",
            Health::new(),
            metrics.clone(),
            std::time::Duration::from_secs(1),
        );
        let dead = DeadLetters::new(Store::Local(root.clone()), metrics, monitor);
        let origin = Origin {
            shard: "shardId-000000000000".into(),
            sequence_number: "49".into(),
        };
        let line = serde_json::json!({"reason": "test"});
        dead.readings("influxdb", &origin, "../../x/y", 1, 2, vec![line])
            .await
            .unwrap();
        let files: Vec<String> = std::fs::read_dir(root.join("influxdb"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files,
            vec!["..%2F..%2Fx%2Fy-1-2-shardId-000000000000-49.jsonl".to_owned()]
        );
        assert!(!dir.join("x").exists() && !root.join("x").exists());
        // 64 bytes of another alphabet escape to 192: cut, and the file is written.
        let long = "é".repeat(32);
        dead.readings(
            "timestream",
            &origin,
            &long,
            1,
            2,
            vec![serde_json::json!({})],
        )
        .await
        .unwrap();
        let name = std::fs::read_dir(root.join("timestream"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        assert!(name.len() < 200, "{name:?}");
        assert_ne!(agent_segment(&long), agent_segment(&"è".repeat(32)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

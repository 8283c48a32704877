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
        let key = format!(
            "{sink}/{agent}-{epoch}-{seq}-{}-{}.jsonl",
            origin.shard, origin.sequence_number
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

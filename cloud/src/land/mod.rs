//! Landing: decoded batches go to every configured [`Sink`], once per `(agent_id, batch_seq)`.
//!
//! Records that do not decode (garbage, unknown version, decompression bombs) are counted by reason and
//! skipped, so one bad record never blocks a shard.

pub mod dedup;

use crate::metrics::CloudMetrics;
use dedup::BatchDedup;
use fieldlink_proto::{decode, peek_header, Batch};
use std::future::Future;
use std::pin::Pin;

/// Where a batch came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Kinesis shard id.
    pub shard: String,
    /// Kinesis sequence number of the record (an opaque string; real ones exceed u128).
    pub sequence_number: String,
}

/// A sink failed in a way its own retries could not fix. The lander logs and counts it.
#[derive(Debug, thiserror::Error)]
#[error("{sink}: {message}")]
pub struct SinkError {
    /// The sink.
    pub sink: &'static str,
    /// What went wrong.
    pub message: String,
}

/// A boxed future, so sinks can be held as trait objects.
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// A destination for decoded batches (Timestream, Parquet, others).
///
/// `write` must be idempotent per `(agent_id, seq)`: the same batch written twice must not produce extra rows
/// downstream (the lander deduplicates too, but only within its memory).
pub trait Sink: Send {
    /// Short name for logs and metrics.
    fn name(&self) -> &'static str;
    /// Lands (or stages) one batch.
    fn write<'a>(&'a mut self, batch: &'a Batch, origin: &'a Origin) -> SinkFuture<'a>;
    /// Called about once a second: time-based work (roll idle files).
    fn tick(&mut self) -> SinkFuture<'_>;
    /// Makes everything staged durable (shutdown).
    fn close(&mut self) -> SinkFuture<'_>;
}

/// Decodes records, deduplicates batches and hands them to the sinks.
pub struct Lander {
    sinks: Vec<Box<dyn Sink>>,
    dedup: BatchDedup,
    metrics: CloudMetrics,
}

impl std::fmt::Debug for Lander {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lander")
            .field(
                "sinks",
                &self.sinks.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Lander {
    /// A lander writing to `sinks`.
    pub fn new(sinks: Vec<Box<dyn Sink>>, metrics: CloudMetrics) -> Self {
        Self {
            sinks,
            dedup: BatchDedup::new(),
            metrics,
        }
    }

    /// Lands one Kinesis record.
    pub async fn land(&mut self, data: &[u8], origin: &Origin) {
        self.metrics.records_in.inc();
        if let Ok(h) = peek_header(data) {
            if self.dedup.seen(h.agent_id, h.seq) {
                self.metrics.batches_duplicate.inc();
                tracing::debug!(agent = h.agent_id, seq = h.seq, "duplicate batch skipped");
                return;
            }
        }
        let batch = match decode(data) {
            Ok(b) => b,
            Err(e) => {
                self.metrics.dead_letter(dead_letter_reason(&e)).inc();
                tracing::warn!(shard = %origin.shard, sequence_number = %origin.sequence_number, error = %e, "undecodable record skipped");
                return;
            }
        };
        for sink in &mut self.sinks {
            if let Err(e) = sink.write(&batch, origin).await {
                self.metrics.sink_errors(sink.name()).inc();
                tracing::error!(error = %e, agent = %batch.agent_id, seq = batch.seq, "sink failed");
            }
        }
        self.dedup.mark(&batch.agent_id, batch.seq);
        self.metrics.batches_landed.inc();
        self.metrics
            .readings_landed
            .add(batch.readings.len() as u64);
    }

    /// Time-based work of every sink.
    pub async fn tick(&mut self) {
        for sink in &mut self.sinks {
            if let Err(e) = sink.tick().await {
                self.metrics.sink_errors(sink.name()).inc();
                tracing::error!(error = %e, "sink tick failed");
            }
        }
    }

    /// Flushes every sink.
    pub async fn close(&mut self) {
        for sink in &mut self.sinks {
            if let Err(e) = sink.close().await {
                self.metrics.sink_errors(sink.name()).inc();
                tracing::error!(error = %e, "sink close failed");
            }
        }
    }
}

fn dead_letter_reason(e: &fieldlink_proto::DecodeError) -> &'static str {
    use fieldlink_proto::DecodeError::*;
    match e {
        BadMagic => "bad_magic",
        UnsupportedVersion(_) => "unsupported_version",
        Truncated { .. } => "truncated",
        RecordTooLarge { .. } | BodyTooLarge { .. } | LimitExceeded { .. } => "over_limit",
        Malformed { .. } => "malformed",
        Decompress(_) => "decompress",
    }
}

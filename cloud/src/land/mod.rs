//! Landing: decoded batches go to every configured [`Sink`], once per `(agent_id, epoch, batch_seq)`.
//!
//! Each shard worker has its own [`Lander`] and its own sinks (so one shard's commit never waits for another
//! shard's data); the resend memory ([`dedup`], bounded by [`DedupConfig`]) is shared by all shards of the process. Records that do not
//! decode (garbage, unknown version, decompression bombs, over a limit) go to the [`dead`]-letter location with
//! the reason and are counted; the shard moves on.
//!
//! # Commit protocol (with [`crate::consumer`])
//! Sinks either land a batch durably in [`Sink::write`] (Timestream, InfluxDB) or stage it until [`Sink::commit`]
//! (Parquet). A commit covers the records from the one after the shard's checkpoint (`first`) to the last one
//! landed; objects it writes are named after `first`, so writing the same commit again replaces them. The
//! worker records the commit's end in the lease before writing and moves the checkpoint after, so a worker
//! that takes the shard over repeats exactly that commit: same records, same object names, same content.

mod config;
pub mod dead;
pub mod dedup;
pub mod retry;

pub use config::DedupConfig;

use crate::metrics::CloudMetrics;
use dead::DeadLetters;
use dedup::BatchDedup;
use fieldlink_proto::alarm::{decode_any, AlarmBatch, Record};
use fieldlink_proto::Batch;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Where a batch came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Kinesis shard id.
    pub shard: String,
    /// Kinesis sequence number of the record (an opaque string; real ones exceed u128).
    pub sequence_number: String,
}

/// A sink gave up: the worker is stopping (its retries, [`retry`], end then), or something its retries cannot
/// fix. The shard worker stops without committing; the shard is read again from its checkpoint.
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

/// A destination for decoded batches (Timestream, Parquet, others). One instance serves one shard.
///
/// Writing the same batch again (a replay) must not add rows downstream: Timestream through deterministic
/// record versions, InfluxDB through points that are a function of the readings, Parquet through deterministic
/// object names.
pub trait Sink: Send {
    /// Short name for logs and metrics.
    fn name(&self) -> &'static str;
    /// Lands or stages one batch. Failures are retried inside until they succeed or the worker stops
    /// ([`retry`]); readings the destination refuses
    /// are dead-lettered inside.
    fn write<'a>(&'a mut self, batch: &'a Batch, origin: &'a Origin) -> SinkFuture<'a>;
    /// Whether the sink takes alarm events ([`Sink::write_alarms`]). Default false.
    fn takes_alarms(&self) -> bool {
        false
    }
    /// Lands or stages the events of one alarm record (only called on sinks that [`Sink::takes_alarms`]); same
    /// rules as [`Sink::write`]. Default: nothing.
    fn write_alarms<'a>(&'a mut self, batch: &'a AlarmBatch, origin: &'a Origin) -> SinkFuture<'a> {
        let _ = (batch, origin);
        Box::pin(async { Ok(()) })
    }
    /// Whether the sink would like a commit now (it staged as much as it should hold).
    fn wants_commit(&self) -> bool {
        false
    }
    /// Makes everything staged durable; objects are named after `first`, the commit's first record.
    fn commit<'a>(&'a mut self, first: &'a Origin) -> SinkFuture<'a>;
    /// Forgets staged data (the shard moved to another worker, which reads it again).
    fn discard(&mut self);
}

/// Builds the sinks of one shard worker; their retries end when the worker's stop token fires.
pub type SinkFactory = Arc<dyn Fn(&CancellationToken) -> Vec<Box<dyn Sink>> + Send + Sync>;

/// Decodes records, skips resent batches and hands the rest to the sinks of one shard.
pub struct Lander {
    sinks: Vec<Box<dyn Sink>>,
    dedup: Arc<Mutex<BatchDedup>>,
    dead: DeadLetters,
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
    pub fn new(
        sinks: Vec<Box<dyn Sink>>,
        dedup: Arc<Mutex<BatchDedup>>,
        dead: DeadLetters,
        metrics: CloudMetrics,
    ) -> Self {
        Self {
            sinks,
            dedup,
            dead,
            metrics,
        }
    }

    /// Lands one Kinesis record.
    pub async fn land(&mut self, data: &[u8], origin: &Origin) -> Result<(), SinkError> {
        self.metrics.records_in.inc();
        let record = match decode_any(data) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(shard = %origin.shard, sequence_number = %origin.sequence_number, error = %e, "undecodable record");
                return self.dead.record(origin, dead_letter_reason(&e), data).await;
            }
        };
        let (agent_id, epoch, seq) = match &record {
            Record::Readings(b) => (b.agent_id.as_str(), b.epoch, b.seq),
            Record::Alarms(a) => {
                if !self.sinks.iter().any(|s| s.takes_alarms()) {
                    tracing::warn!(shard = %origin.shard, sequence_number = %origin.sequence_number, agent = %a.agent_id, "an alarm record, and no [alarms] section to land it");
                    return self.dead.record(origin, "alarm_record", data).await;
                }
                (a.agent_id.as_str(), a.epoch, a.seq)
            }
        };
        let tag = dedup::tag(&origin.shard, &origin.sequence_number);
        let claim = match self.dedup.lock() {
            Ok(mut d) => {
                let c = d.claim(
                    agent_id,
                    epoch,
                    seq,
                    tag,
                    dedup::content_tag(data),
                    fieldlink_ops::unix_ms(),
                );
                self.metrics.dedup_memory.set(d.memory_bytes() as i64);
                c
            }
            // A poisoned memory: land (never skip what may not have landed).
            Err(_) => dedup::Claim {
                verdict: dedup::Verdict::New,
                conflict: None,
                evicted: 0,
            },
        };
        if claim.evicted > 0 {
            self.metrics.dedup_evictions.add(claim.evicted as u64);
        }
        if claim.verdict == dedup::Verdict::Collision {
            self.metrics.batch_id_collisions.inc();
            if claim.conflict.is_some_and(|c| c.report) {
                tracing::error!(
                    agent = %agent_id,
                    epoch = %format!("{:016x}", epoch),
                    seq = seq,
                    "a batch identity landed before arrives with other content: a buffer file restored from a backup or cloned onto another box? landed anyway"
                );
            }
        } else if let Some(c) = claim.conflict {
            self.metrics.agent_id_conflicts.inc();
            if c.report {
                tracing::error!(
                    agent = %agent_id,
                    older_epoch = %format!("{:016x}", c.older),
                    newer_epoch = %format!("{:016x}", c.newer),
                    "two agents send under one agent id (two buffer epochs both landing new batches): give each box its own agent_id; both are landed"
                );
            }
        }
        if !claim.verdict.lands() {
            self.metrics.batches_duplicate.inc();
            tracing::debug!(agent = %agent_id, epoch = epoch, seq = seq, "resent batch skipped");
            return Ok(());
        }
        let batch = match record {
            Record::Readings(b) => b,
            Record::Alarms(a) => {
                for sink in self.sinks.iter_mut().filter(|s| s.takes_alarms()) {
                    sink.write_alarms(&a, origin).await?;
                }
                tracing::debug!(target: "fieldlink_cloud::landed", shard = %origin.shard, agent = %a.agent_id, epoch = a.epoch, seq = a.seq, events = a.events.len(), "alarm record landed");
                self.metrics.batches_landed.inc();
                self.metrics
                    .alarm_events_landed()
                    .add(a.events.len() as u64);
                return Ok(());
            }
        };
        for sink in &mut self.sinks {
            sink.write(&batch, origin).await?;
        }
        tracing::debug!(target: "fieldlink_cloud::landed", shard = %origin.shard, agent = %batch.agent_id, epoch = batch.epoch, seq = batch.seq, readings = batch.readings.len(), "batch landed");
        self.metrics.batches_landed.inc();
        self.metrics
            .readings_landed
            .add(batch.readings.len() as u64);
        Ok(())
    }

    /// Whether any sink wants a commit.
    pub fn wants_commit(&self) -> bool {
        self.sinks.iter().any(|s| s.wants_commit())
    }

    /// Commits every sink.
    pub async fn commit(&mut self, first: &Origin) -> Result<(), SinkError> {
        for sink in &mut self.sinks {
            sink.commit(first).await?;
        }
        Ok(())
    }

    /// Discards what every sink staged.
    pub fn discard(&mut self) {
        for sink in &mut self.sinks {
            sink.discard();
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

//! Kinesis sink: sends sealed records with `PutRecords` and deletes each from the buffer once accepted.
//!
//! - One call at a time, at most 500 records and 5 MiB (Kinesis' limits); the buffer hands out the oldest
//!   pending records first.
//! - A partly failed call is retried with only the entries that failed (per-entry `ErrorCode`), after a capped,
//!   jittered backoff; accepted entries are deleted from the buffer immediately.
//! - A failed call (timeout, network, throttling, missing stream) is retried with backoff; the records stay in
//!   the buffer, so nothing is lost while Kinesis is unreachable.
//! - The partition key is the agent id (configurable), never random: one agent's batches stay on one shard.

mod config;

pub use config::{KinesisConfig, MAX_BYTES_PER_CALL, MAX_RECORDS_PER_CALL};

use crate::buffer::{BufferHandle, Pending};
use crate::metrics::AgentMetrics;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use fieldlink_ops::backoff::Backoff;
use fieldlink_ops::metrics::Health;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const COMPONENT: &str = "kinesis";

/// The sender.
#[derive(Debug)]
pub struct Sender {
    client: aws_sdk_kinesis::Client,
    stream: String,
    partition_key: String,
    max_records: usize,
    buffer: BufferHandle,
    metrics: AgentMetrics,
    health: Health,
    backoff: Backoff,
}

/// What a send attempt ended with.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Every record was accepted.
    Done,
    /// Stopped before that (cancelled or deadline); the rest stays buffered.
    Stopped,
}

impl Sender {
    /// A sender for `cfg.stream`.
    pub fn new(
        cfg: &KinesisConfig,
        agent_id: &str,
        client: aws_sdk_kinesis::Client,
        buffer: BufferHandle,
        metrics: AgentMetrics,
        health: Health,
    ) -> Self {
        Self {
            client,
            stream: cfg.stream.clone(),
            partition_key: cfg
                .partition_key
                .clone()
                .unwrap_or_else(|| agent_id.to_owned()),
            max_records: cfg.max_records_per_call,
            buffer,
            metrics,
            health,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(20)),
        }
    }

    fn max_bytes(&self) -> usize {
        MAX_BYTES_PER_CALL - self.max_records * self.partition_key.len()
    }

    /// Sends until `cancel` fires.
    pub async fn run(&mut self, cancel: &CancellationToken) {
        let sealed = self.buffer.sealed();
        self.health.set(COMPONENT, true, "");
        while !cancel.is_cancelled() {
            let Ok(pending) = self
                .buffer
                .fetch(0, self.max_records, self.max_bytes())
                .await
            else {
                return;
            };
            if pending.is_empty() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = sealed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            if self.send(pending, cancel).await == Outcome::Stopped {
                return;
            }
        }
    }

    /// Sends what is pending until the buffer is empty or `deadline` passes.
    pub async fn drain(&mut self, deadline: Duration) {
        let stop = CancellationToken::new();
        let guard = stop.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            guard.cancel();
        });
        loop {
            let Ok(pending) = self
                .buffer
                .fetch(0, self.max_records, self.max_bytes())
                .await
            else {
                break;
            };
            if pending.is_empty() || self.send(pending, &stop).await == Outcome::Stopped {
                break;
            }
        }
        timer.abort();
    }

    async fn send(&mut self, mut pending: Vec<Pending>, cancel: &CancellationToken) -> Outcome {
        loop {
            let entries: Vec<PutRecordsRequestEntry> = pending
                .iter()
                .filter_map(|p| {
                    PutRecordsRequestEntry::builder()
                        .data(Blob::new(p.record.clone()))
                        .partition_key(&self.partition_key)
                        .build()
                        .ok()
                })
                .collect();
            let call = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries))
                .send();
            let result = tokio::select! {
                r = call => r,
                _ = cancel.cancelled() => return Outcome::Stopped,
            };
            match result {
                Ok(out) => {
                    let mut accepted = Vec::new();
                    let mut failed = Vec::new();
                    let results = out.records();
                    for (i, p) in pending.into_iter().enumerate() {
                        match results.get(i) {
                            Some(r) if r.error_code().is_none() => accepted.push(p),
                            Some(r) => {
                                self.metrics.records_rejected.inc();
                                tracing::debug!(
                                    seq = p.seq,
                                    code = r.error_code().unwrap_or(""),
                                    "record rejected; will retry"
                                );
                                failed.push(p);
                            }
                            None => failed.push(p),
                        }
                    }
                    if !accepted.is_empty() {
                        let seqs: Vec<u64> = accepted.iter().map(|p| p.seq).collect();
                        if self.buffer.ack(seqs).await.is_err() {
                            return Outcome::Stopped;
                        }
                        self.metrics.records_sent.add(accepted.len() as u64);
                        self.metrics
                            .readings_sent
                            .add(accepted.iter().map(|p| p.readings).sum());
                    }
                    self.health.set(COMPONENT, true, "");
                    if failed.is_empty() {
                        self.backoff.reset();
                        return Outcome::Done;
                    }
                    pending = failed;
                }
                Err(e) => {
                    self.metrics.put_calls_failed.inc();
                    let msg = aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string();
                    self.health.set(COMPONENT, false, msg.clone());
                    tracing::warn!(error = %msg, records = pending.len(), "PutRecords failed; records stay buffered");
                }
            }
            let delay = self.backoff.next_delay();
            tokio::select! {
                _ = cancel.cancelled() => return Outcome::Stopped,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

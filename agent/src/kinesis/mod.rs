//! Kinesis sink: sends sealed records with `PutRecords`; the buffer deletes each one Kinesis accepted.
//!
//! - One call at a time, at most 500 records and 5 MiB (Kinesis' limits). When more is pending than one call
//!   holds, a quarter of the call goes to the newest records and the rest to the oldest ([`Buffer::pending`]):
//!   a backlog drains at full speed while live data keeps flowing.
//! - Entries Kinesis accepted are deleted from the buffer immediately; entries it rejected (per-entry
//!   `ErrorCode`) are retried after a capped, jittered backoff — never the accepted ones.
//! - A failed call (timeout, network, throttling, missing stream) is retried with backoff, fetching the records
//!   again; they stay in the buffer, so nothing is lost while Kinesis is unreachable. Records of the call under
//!   way are never dropped by the buffer's overflow policy, so "sent" and "dropped" are counted exactly.
//! - Adaptive rate (AIMD): calls are paced to `rate` bytes per second and hold at most one second of it (a shard
//!   takes 1 MiB/s: a 5 MiB call to one partition key had most of its entries refused even at the full rate, and
//!   every such call halved the rate until it sat at the floor); throttling (an entry or a call refused with
//!   `ProvisionedThroughputExceededException`, or a throttling error) and a call that timed out (an uplink too
//!   slow for its size) halve the rate, down to `min_bytes_per_second`; every clean call raises it by 1/16 of
//!   `max_bytes_per_second`. A call always holds at least one record.
//! - The partition key is the agent id (configurable), never random: one agent's batches stay on one shard.
//! - A stop never drops the call in flight (Kinesis may already hold its records; resending them at the next start
//!   would double them): it finishes and its accepted records are deleted before the process exits, then the sender
//!   drains until `shutdown_drain_ms` after the stop ([`Sender::run`]).
//!
//! [`Buffer::pending`]: crate::buffer::Buffer::pending

mod config;

pub use config::{KinesisConfig, MAX_BYTES_PER_CALL, MAX_RECORDS_PER_CALL};

use crate::buffer::{BufferHandle, Pending};
use crate::metrics::AgentMetrics;
use aws_sdk_kinesis::operation::put_records::PutRecordsError;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use fieldlink_ops::backoff::Backoff;
use fieldlink_ops::metrics::Health;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const COMPONENT: &str = "kinesis";

/// Additive-increase, multiplicative-decrease pacing of the send rate. Pure.
#[derive(Debug, Clone)]
pub struct Pace {
    rate: f64,
    min: f64,
    max: f64,
}

impl Pace {
    /// Starts at `max` bytes per second.
    pub fn new(min: u64, max: u64) -> Self {
        Self {
            rate: max as f64,
            min: min as f64,
            max: max as f64,
        }
    }
    /// Current rate, bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }
    /// Kinesis throttled: halve.
    pub fn throttled(&mut self) {
        self.rate = (self.rate / 2.0).max(self.min);
    }
    /// A clean call: raise by a sixteenth of the maximum.
    pub fn succeeded(&mut self) {
        self.rate = (self.rate + self.max / 16.0).min(self.max);
    }
    /// How long a call of `bytes` occupies the budget.
    pub fn spacing(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.rate)
    }
}

/// The bytes of one call: `limit` (Kinesis'), and at most one second at `rate` bytes per second (at least 1:
/// the buffer hands out one record whatever its size). Pure.
pub fn call_bytes(limit: usize, rate: f64) -> usize {
    limit.min(rate as usize).max(1)
}

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
    pace: Pace,
    next_call: Instant,
    /// How long the sender may keep sending once told to stop (`shutdown_drain_ms`).
    drain: Duration,
    /// Set when the stop was first seen: the drain deadline.
    deadline: Option<Instant>,
    /// How long the last completed call took: a drain starts no call it does not expect to finish.
    last_call: Duration,
}

/// What a send attempt ended with.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Every record was accepted.
    Done,
    /// Some or all records failed: fetch again after the backoff.
    Refetch,
    /// Stopped before that (cancelled or deadline); the rest stays buffered.
    Stopped,
}

fn is_throttle_code(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "LimitExceededException"
            | "KMSThrottlingException"
    )
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
        let pace = Pace::new(cfg.min_bytes_per_second, cfg.max_bytes_per_second);
        metrics.send_rate.set(pace.rate() as i64);
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
            pace,
            next_call: Instant::now(),
            drain: Duration::from_millis(cfg.shutdown_drain_ms),
            deadline: None,
            last_call: Duration::ZERO,
        }
    }

    /// The bytes one call may carry: Kinesis' limit, and one second at the current rate.
    fn max_bytes(&self) -> usize {
        call_bytes(
            MAX_BYTES_PER_CALL - self.max_records * self.partition_key.len(),
            self.pace.rate(),
        )
    }

    /// Sends until `cancel` fires, then drains: the call in flight finishes (or times out) and its accepted
    /// records are deleted from the buffer, then pending records are sent until the buffer is empty or
    /// `shutdown_drain_ms` after the stop; a call is only started if the time left is at least twice the last
    /// call's duration, and one still running at the deadline is abandoned (its records are sent again at the next
    /// start, so Kinesis may hold them twice). What is left stays buffered.
    pub async fn run(&mut self, cancel: &CancellationToken) {
        let sealed = self.buffer.sealed();
        self.health.set(COMPONENT, true, "");
        let mut unreadable = false;
        while !cancel.is_cancelled() {
            let pending = match self.buffer.fetch(self.max_records, self.max_bytes()).await {
                Err(_) => return,
                Ok(Err(why)) => {
                    // Nothing can be sent while the oldest records cannot be read (a damaged page under them):
                    // say so rather than look idle.
                    unreadable = true;
                    self.health.set(
                        COMPONENT,
                        false,
                        format!("cannot read the buffer's pending records: {why}; retried"),
                    );
                    let delay = self.backoff.next_delay();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
                Ok(Ok(p)) => p,
            };
            if std::mem::take(&mut unreadable) {
                // Readable again. (The backoff is the calls' too: a successful call resets it.)
                self.health.set(COMPONENT, true, "");
            }
            if pending.is_empty() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = sealed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            if self.send(pending, cancel).await == Outcome::Stopped {
                break;
            }
        }
        self.drain_until_deadline(cancel).await;
    }

    /// The drain deadline, fixed when the stop is first seen.
    fn deadline(&mut self) -> Instant {
        let drain = self.drain;
        *self.deadline.get_or_insert_with(|| Instant::now() + drain)
    }

    /// Sends what is pending until the buffer is empty, the deadline passes or a call could not finish before it.
    async fn drain_until_deadline(&mut self, cancel: &CancellationToken) {
        let deadline = self.deadline();
        tracing::info!(
            deadline_ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
            "draining sealed batches to Kinesis"
        );
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || left < self.last_call * 2 {
                break;
            }
            let Ok(Ok(pending)) = self.buffer.fetch(self.max_records, self.max_bytes()).await
            else {
                break;
            };
            if pending.is_empty() || self.send(pending, cancel).await == Outcome::Stopped {
                break;
            }
        }
    }

    /// Waits until `until`; false if stopped first. Once stopping, waits only if `until` is before the deadline.
    async fn wait(&mut self, until: Instant, cancel: &CancellationToken) -> bool {
        if self.deadline.is_none() {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep_until(until) => return true,
            }
        }
        if until > self.deadline() {
            return false;
        }
        tokio::time::sleep_until(until).await;
        true
    }

    /// One `PutRecords` attempt. Accepted records are deleted from the buffer; after any failure the records
    /// are released (the overflow policy may drop them from now on), the sender backs off and fetches again,
    /// which retries exactly the records that failed (they are still the oldest) and never the accepted ones.
    async fn send(&mut self, pending: Vec<Pending>, cancel: &CancellationToken) -> Outcome {
        if !self.wait(self.next_call, cancel).await {
            return Outcome::Stopped;
        }
        let bytes: usize = pending
            .iter()
            .map(|p| p.record.len() + self.partition_key.len())
            .sum();
        self.next_call = Instant::now() + self.pace.spacing(bytes);
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
        let started = Instant::now();
        // A stop does not drop the call in flight (Kinesis may already hold its records: resending them at the
        // next start would double them); it finishes, or its attempt times out, before the drain deadline.
        tokio::pin!(call);
        let result = tokio::select! {
            r = &mut call => r,
            _ = cancel.cancelled() => match tokio::time::timeout_at(self.deadline(), call).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(records = pending.len(), "PutRecords call abandoned at the drain deadline; its records are sent again at the next start");
                    return Outcome::Stopped;
                }
            },
        };
        self.last_call = started.elapsed();
        let throttled;
        let mut timed_out = false;
        match result {
            Ok(out) => {
                let results = out.records();
                let mut accepted = Vec::new();
                let mut rejected = 0u64;
                let mut throttled_entry = false;
                let mut first_code = None;
                for (i, p) in pending.iter().enumerate() {
                    match results.get(i).map(|r| r.error_code()) {
                        Some(None) => accepted.push(p.seq),
                        code => {
                            rejected += 1;
                            let code = code.flatten();
                            first_code = first_code.or(code);
                            throttled_entry |= code.is_some_and(is_throttle_code);
                            tracing::debug!(
                                seq = p.seq,
                                code = code.unwrap_or("missing"),
                                "record rejected; will retry"
                            );
                        }
                    }
                }
                let progressed = !accepted.is_empty();
                if progressed && self.buffer.ack(accepted).await.is_err() {
                    return Outcome::Stopped;
                }
                // Kinesis answered, but a call whose every entry it rejected (a hot shard throttling them all, an
                // internal failure) moved nothing: as sick as a failed call until one entry goes through.
                if progressed || rejected == 0 {
                    self.health.set(COMPONENT, true, "");
                } else {
                    self.health.set(
                        COMPONENT,
                        false,
                        format!(
                            "PutRecords: all {rejected} records rejected ({}); records stay buffered",
                            first_code.unwrap_or("no error code")
                        ),
                    );
                }
                if rejected == 0 {
                    self.backoff.reset();
                    self.pace.succeeded();
                    self.metrics.send_rate.set(self.pace.rate() as i64);
                    return Outcome::Done;
                }
                self.metrics.records_rejected.add(rejected);
                throttled = throttled_entry;
            }
            Err(e) => {
                self.metrics.put_calls_failed.inc();
                let error = fieldlink_ops::aws_error::CallError::of_sdk(&e);
                // An attempt that timed out (not a connection that could not be made: an outage) was too large
                // for the link (a slow uplink): the next calls are smaller.
                timed_out = matches!(e, aws_sdk_kinesis::error::SdkError::TimeoutError(_));
                throttled = matches!(
                    e.as_service_error(),
                    Some(
                        PutRecordsError::ProvisionedThroughputExceededException(_)
                            | PutRecordsError::KmsThrottlingException(_)
                    )
                ) || e
                    .as_service_error()
                    .and_then(|s| aws_sdk_kinesis::error::ProvideErrorMetadata::code(s))
                    .is_some_and(is_throttle_code);
                let msg = aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string();
                // /health: one short sentence, not the SDK's nested structures (those go to the log).
                let line = error.sentence("PutRecords");
                self.health
                    .set(COMPONENT, false, format!("{line}; records stay buffered"));
                tracing::warn!(error = %msg, records = pending.len(), "PutRecords failed; records stay buffered");
            }
        }
        if throttled || timed_out {
            self.pace.throttled();
            self.metrics.send_rate.set(self.pace.rate() as i64);
        }
        if throttled {
            self.metrics.throttled.inc();
        }
        if self.buffer.release().await.is_err() {
            return Outcome::Stopped;
        }
        let delay = self.backoff.next_delay();
        if !self.wait(Instant::now() + delay, cancel).await {
            return Outcome::Stopped;
        }
        Outcome::Refetch
    }
}

#[cfg(test)]
mod tests {
    use super::Pace;

    #[test]
    fn a_call_holds_at_most_one_second_at_the_current_rate() {
        use super::call_bytes;
        let limit = 5 * 1024 * 1024;
        assert_eq!(call_bytes(limit, 1024.0 * 1024.0), 1024 * 1024);
        assert_eq!(call_bytes(limit, 64.0 * 1024.0 * 1024.0), limit);
        assert_eq!(call_bytes(limit, 0.0), 1);
        // After throttling the call shrinks with the rate, so a call can go through clean again and the rate
        // recovers (with calls of Kinesis' 5 MiB every call to one shard was throttled).
        let mut p = Pace::new(16 * 1024, 1024 * 1024);
        p.throttled();
        assert_eq!(call_bytes(limit, p.rate()), 512 * 1024);
    }

    #[test]
    fn pace_halves_on_throttling_and_recovers_additively() {
        let mut p = Pace::new(1000, 16_000);
        p.throttled();
        p.throttled();
        assert_eq!(p.rate(), 4000.0);
        for _ in 0..3 {
            p.throttled();
        }
        assert_eq!(p.rate(), 1000.0, "floor");
        p.succeeded();
        assert_eq!(p.rate(), 2000.0);
        for _ in 0..100 {
            p.succeeded();
        }
        assert_eq!(p.rate(), 16_000.0, "ceiling");
        assert_eq!(p.spacing(8000).as_millis(), 500);
    }
}

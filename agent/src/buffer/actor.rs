//! The buffer's thread: owns the SQLite connection and serves commands from a bounded channel.
//!
//! Appends are group-committed: the thread takes every append already queued (up to `max_group_commit`),
//! commits them in one transaction, and only then runs their acknowledgement callbacks, in arrival order.
//! Sealing happens when `max_readings` wait or the oldest unsealed reading has waited `linger_ms`.

use super::{Buffer, BufferConfig, BufferError, NewReading};
use crate::batch::BatchConfig;
use crate::metrics::AgentMetrics;
use fieldlink_ops::backoff::Backoff;
use fieldlink_proto::Encoder;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{oneshot, Notify};

/// Called once the readings it came with are durably committed (sends the MQTT PUBACK).
pub type AckFn = Box<dyn FnOnce() + Send>;

/// A sealed record waiting for Kinesis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Its batch sequence number.
    pub seq: u64,
    /// Readings inside.
    pub readings: u64,
    /// The record bytes.
    pub record: Vec<u8>,
}

enum Command {
    Append {
        readings: Vec<NewReading>,
        ack: Option<AckFn>,
    },
    Fetch {
        after: u64,
        max_records: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Result<Vec<Pending>, String>>,
    },
    Ack {
        seqs: Vec<u64>,
        reply: oneshot::Sender<()>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
}

/// The buffer thread stopped (after a shutdown, or a fatal error it logged).
#[derive(Debug, thiserror::Error)]
#[error("the buffer is closed")]
pub struct Closed;

/// Cheap, cloneable access to the buffer thread.
#[derive(Debug, Clone)]
pub struct BufferHandle {
    tx: flume::Sender<Command>,
    sealed: Arc<Notify>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Append { .. } => "Append",
            Command::Fetch { .. } => "Fetch",
            Command::Ack { .. } => "Ack",
            Command::Flush { .. } => "Flush",
        })
    }
}

impl BufferHandle {
    /// Queues readings; `ack` runs after they are committed. Waits while the queue is full (backpressure).
    pub async fn append(
        &self,
        readings: Vec<NewReading>,
        ack: Option<AckFn>,
    ) -> Result<(), Closed> {
        self.tx
            .send_async(Command::Append { readings, ack })
            .await
            .map_err(|_| Closed)
    }

    /// Sealed records after `after`, bounded by count and bytes.
    pub async fn fetch(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Pending>, Closed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Command::Fetch {
                after,
                max_records,
                max_bytes,
                reply,
            })
            .await
            .map_err(|_| Closed)?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading pending batches failed");
                Ok(Vec::new())
            }
            Err(_) => Err(Closed),
        }
    }

    /// Deletes records Kinesis accepted; returns once deleted.
    pub async fn ack(&self, seqs: Vec<u64>) -> Result<(), Closed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Command::Ack { seqs, reply })
            .await
            .map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Seals everything unsealed now (used at shutdown); returns once done.
    pub async fn flush(&self) -> Result<(), Closed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Command::Flush { reply })
            .await
            .map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Notified whenever a batch is sealed.
    pub fn sealed(&self) -> Arc<Notify> {
        self.sealed.clone()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Opens the buffer and starts its thread. The thread ends when every handle is dropped, after sealing what
/// is left.
pub fn spawn(
    cfg: &BufferConfig,
    batch: &BatchConfig,
    agent_id: &str,
    metrics: AgentMetrics,
) -> Result<(BufferHandle, std::thread::JoinHandle<()>), BufferError> {
    let buffer = Buffer::open(&cfg.path, cfg.durability, agent_id)?;
    let encoder = Encoder::new(batch.zstd_level)?;
    let (tx, rx) = flume::bounded(cfg.queue_capacity);
    let sealed = Arc::new(Notify::new());
    let mut worker = Worker {
        buffer,
        encoder,
        rx,
        sealed: sealed.clone(),
        metrics,
        cfg: cfg.clone(),
        batch: batch.clone(),
        oldest_unsealed: None,
    };
    worker.publish_stats();
    if worker.buffer.stats().unsealed_readings > 0 {
        worker.oldest_unsealed = Some(Instant::now());
    }
    let join = std::thread::Builder::new()
        .name("buffer".into())
        .spawn(move || worker.run())
        .map_err(|e| BufferError::Incompatible {
            path: cfg.path.display().to_string(),
            why: format!("cannot start thread: {e}"),
        })?;
    Ok((BufferHandle { tx, sealed }, join))
}

struct Worker {
    buffer: Buffer,
    encoder: Encoder,
    rx: flume::Receiver<Command>,
    sealed: Arc<Notify>,
    metrics: AgentMetrics,
    cfg: BufferConfig,
    batch: BatchConfig,
    oldest_unsealed: Option<Instant>,
}

impl Worker {
    fn run(mut self) {
        let linger = Duration::from_millis(self.batch.linger_ms);
        loop {
            let wait = self.oldest_unsealed.map_or(Duration::from_secs(1), |t| {
                linger.saturating_sub(t.elapsed())
            });
            match self.rx.recv_timeout(wait) {
                Ok(cmd) => self.handle(cmd),
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => {
                    self.seal_all();
                    tracing::info!(stats = ?self.buffer.stats(), "buffer closed");
                    return;
                }
            }
            self.seal_due(linger);
        }
    }

    fn handle(&mut self, first: Command) {
        match first {
            Command::Append { readings, ack } => {
                let mut group = vec![(readings, ack)];
                let mut deferred = Vec::new();
                while group.len() < self.cfg.max_group_commit {
                    match self.rx.try_recv() {
                        Ok(Command::Append { readings, ack }) => group.push((readings, ack)),
                        Ok(other) => {
                            deferred.push(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                self.commit(group);
                for cmd in deferred {
                    self.handle(cmd);
                }
            }
            Command::Fetch {
                after,
                max_records,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(
                    self.buffer
                        .pending(after, max_records, max_bytes)
                        .map_err(|e| e.to_string()),
                );
            }
            Command::Ack { seqs, reply } => {
                let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
                while let Err(e) = self.buffer.ack(&seqs) {
                    self.metrics.buffer_errors.inc();
                    tracing::error!(error = %e, "deleting acknowledged batches failed; retrying");
                    std::thread::sleep(backoff.next_delay());
                }
                self.publish_stats();
                let _ = reply.send(());
            }
            Command::Flush { reply } => {
                self.seal_all();
                let _ = reply.send(());
            }
        }
    }

    /// Commits a group of appends, retrying on errors (disk full, I/O) with backoff while the sources wait.
    /// Acknowledgements run only after a successful commit.
    fn commit(&mut self, group: Vec<(Vec<NewReading>, Option<AckFn>)>) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            match self.buffer.append(group.iter().map(|(r, _)| r.as_slice())) {
                Ok(n) => {
                    self.metrics.readings_buffered.add(n);
                    break;
                }
                Err(e) => {
                    self.metrics.buffer_errors.inc();
                    tracing::error!(error = %e, messages = group.len(), "buffer commit failed; sources wait and the commit is retried");
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
        if self.oldest_unsealed.is_none() && self.buffer.stats().unsealed_readings > 0 {
            self.oldest_unsealed = Some(Instant::now());
        }
        for (_, ack) in group {
            if let Some(ack) = ack {
                ack();
            }
        }
        self.publish_stats();
    }

    fn seal_due(&mut self, linger: Duration) {
        loop {
            let unsealed = self.buffer.stats().unsealed_readings;
            let full = unsealed >= self.batch.max_readings as u64;
            let lingered =
                unsealed > 0 && self.oldest_unsealed.is_some_and(|t| t.elapsed() >= linger);
            if !(full || lingered) || !self.seal_one() {
                break;
            }
        }
        if self.buffer.stats().unsealed_readings == 0 {
            self.oldest_unsealed = None;
        } else if self.oldest_unsealed.is_some_and(|t| t.elapsed() >= linger) {
            self.oldest_unsealed = Some(Instant::now());
        }
    }

    fn seal_all(&mut self) {
        while self.buffer.stats().unsealed_readings > 0 && self.seal_one() {}
        self.oldest_unsealed = None;
    }

    /// Seals one batch; false if nothing was sealed (empty, or an error that was logged).
    fn seal_one(&mut self) -> bool {
        match self.buffer.seal(
            &mut self.encoder,
            self.batch.max_readings,
            self.batch.max_record_bytes,
            now_ms(),
        ) {
            Ok(Some(s)) => {
                self.metrics.batches_sealed.inc();
                self.metrics.readings_sealed.add(s.readings as u64);
                self.metrics.bytes_sealed.add(s.bytes as u64);
                tracing::debug!(
                    seq = s.seq,
                    readings = s.readings,
                    bytes = s.bytes,
                    "sealed batch"
                );
                self.publish_stats();
                self.sealed.notify_one();
                true
            }
            Ok(None) => false,
            Err(e) => {
                self.metrics.buffer_errors.inc();
                tracing::error!(error = %e, "sealing a batch failed");
                false
            }
        }
    }

    fn publish_stats(&self) {
        let s = self.buffer.stats();
        self.metrics
            .unsealed_readings
            .set(s.unsealed_readings as i64);
        self.metrics.pending_batches.set(s.pending_batches as i64);
        self.metrics.pending_readings.set(s.pending_readings as i64);
        self.metrics.pending_bytes.set(s.pending_bytes as i64);
    }
}

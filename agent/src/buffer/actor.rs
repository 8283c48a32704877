//! The buffer's thread: owns the SQLite connection and serves two bounded channels, data (appends) and control
//! (fetch, acknowledge, flush). Under the `backpressure` overflow policy it stops reading the data channel while
//! the buffer is over its cap, but keeps serving control, so Kinesis acknowledgements can bring it back.
//!
//! Appends are group-committed: the thread takes every append already queued (up to `max_group_commit`),
//! commits them in one transaction, and only then runs their acknowledgement callbacks, in arrival order.
//! Every `linger_ms` it seals the rows committed at least `reorder_window_ms` ago.

use super::{Buffer, BufferConfig, BufferError, Ledger, NewReading, OverflowPolicy, Refused};
use crate::batch::BatchConfig;
use crate::metrics::AgentMetrics;
use crate::order::OrderConfig;
use fieldlink_ops::backoff::Backoff;
use fieldlink_proto::Encoder;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

/// Called once the readings it came with are durably committed (queues the MQTT PUBACK).
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

struct Append {
    readings: Vec<NewReading>,
    refused: Option<Box<Refused>>,
    ack: Option<AckFn>,
}

enum Control {
    Fetch {
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
    Release,
    Ping {
        reply: oneshot::Sender<()>,
    },
}

/// The buffer thread stopped (after a shutdown, or a fatal error it logged).
#[derive(Debug, thiserror::Error)]
#[error("the buffer is closed")]
pub struct Closed;

/// Cheap, cloneable access to the buffer thread.
#[derive(Clone)]
pub struct BufferHandle {
    data: flume::Sender<Append>,
    ctl: flume::Sender<Control>,
    sealed: Arc<Notify>,
}

impl std::fmt::Debug for BufferHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferHandle")
            .field("queued", &self.data.len())
            .finish()
    }
}

impl BufferHandle {
    /// Queues readings; `ack` runs after they are committed. Waits while the queue is full (backpressure).
    pub async fn append(
        &self,
        readings: Vec<NewReading>,
        ack: Option<AckFn>,
    ) -> Result<(), Closed> {
        self.data
            .send_async(Append {
                readings,
                refused: None,
                ack,
            })
            .await
            .map_err(|_| Closed)
    }

    /// Queues a refused source message for the dead-letter table; `ack` runs after it is committed.
    pub async fn refuse(&self, refused: Refused, ack: Option<AckFn>) -> Result<(), Closed> {
        self.data
            .send_async(Append {
                readings: Vec::new(),
                refused: Some(Box::new(refused)),
                ack,
            })
            .await
            .map_err(|_| Closed)
    }

    /// Pending records for one `PutRecords` call (see [`Buffer::pending`]).
    pub async fn fetch(
        &self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Pending>, Closed> {
        let (reply, rx) = oneshot::channel();
        self.ctl
            .send_async(Control::Fetch {
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
        self.ctl
            .send_async(Control::Ack { seqs, reply })
            .await
            .map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// The records of the last fetch are no longer in flight (the call failed); the overflow policy may drop them.
    pub async fn release(&self) -> Result<(), Closed> {
        self.ctl
            .send_async(Control::Release)
            .await
            .map_err(|_| Closed)
    }

    /// Seals everything unsealed now, ignoring the reorder window (shutdown); returns once done.
    pub async fn flush(&self) -> Result<(), Closed> {
        let (reply, rx) = oneshot::channel();
        self.ctl
            .send_async(Control::Flush { reply })
            .await
            .map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Answers as soon as the buffer thread takes it: proof that the thread is not stuck (a commit retrying
    /// against a locked or failing disk, a hung `fsync`). Serves the health endpoint and the systemd watchdog.
    pub async fn ping(&self) -> Result<(), Closed> {
        let (reply, rx) = oneshot::channel();
        self.ctl
            .send_async(Control::Ping { reply })
            .await
            .map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Notified whenever a batch is sealed.
    pub fn sealed(&self) -> Arc<Notify> {
        self.sealed.clone()
    }
}

/// Opens the buffer and starts its thread. The thread ends when every handle is dropped, after sealing what
/// is left.
pub fn spawn(
    cfg: &BufferConfig,
    batch: &BatchConfig,
    order: &OrderConfig,
    agent_id: &str,
    metrics: AgentMetrics,
) -> Result<(BufferHandle, std::thread::JoinHandle<()>), BufferError> {
    let buffer = Buffer::open(&cfg.path, cfg.durability, agent_id)?;
    if buffer.moved_aside().is_some() {
        metrics.buffer_corrupt.inc();
    }
    let encoder = Encoder::new(batch.zstd_level)?;
    let (data_tx, data) = flume::bounded(cfg.queue_capacity);
    let (ctl_tx, ctl) = flume::bounded(64);
    let sealed = Arc::new(Notify::new());
    let ready_id = buffer.last_row_id(); // rows from before a restart are ready at once
    let mut worker = Worker {
        buffer,
        encoder,
        data,
        ctl,
        sealed: sealed.clone(),
        metrics,
        cfg: cfg.clone(),
        batch: batch.clone(),
        order: order.clone(),
        commits: VecDeque::new(),
        ready_id,
        published: Ledger::default(),
    };
    worker.publish();
    let join = std::thread::Builder::new()
        .name("buffer".into())
        .spawn(move || worker.run())
        .map_err(|e| BufferError::Incompatible {
            path: cfg.path.display().to_string(),
            why: format!("cannot start thread: {e}"),
        })?;
    Ok((
        BufferHandle {
            data: data_tx,
            ctl: ctl_tx,
            sealed,
        },
        join,
    ))
}

enum Msg {
    Data(Result<Append, flume::RecvError>),
    Ctl(Result<Control, flume::RecvError>),
}

struct Worker {
    buffer: Buffer,
    encoder: Encoder,
    data: flume::Receiver<Append>,
    ctl: flume::Receiver<Control>,
    sealed: Arc<Notify>,
    metrics: AgentMetrics,
    cfg: BufferConfig,
    batch: BatchConfig,
    order: OrderConfig,
    /// `(commit time, last row id of that commit)`, oldest first, for commits not yet ready.
    commits: VecDeque<(Instant, i64)>,
    /// Rows with `id <= ready_id` have waited the reorder window.
    ready_id: i64,
    published: Ledger,
}

impl Worker {
    fn run(mut self) {
        let linger = Duration::from_millis(self.batch.linger_ms);
        let mut next_seal = Instant::now() + linger;
        loop {
            let accepting = !(self.cfg.overflow == OverflowPolicy::Backpressure && self.over_cap());
            let wait = next_seal.saturating_duration_since(Instant::now());
            let mut sel = flume::Selector::new().recv(&self.ctl, Msg::Ctl);
            if accepting {
                sel = sel.recv(&self.data, Msg::Data);
            }
            match sel.wait_timeout(wait) {
                Ok(Msg::Ctl(Ok(c))) => self.control(c),
                Ok(Msg::Data(Ok(a))) => self.commit(a),
                Ok(Msg::Ctl(Err(_)) | Msg::Data(Err(_))) => {
                    // Every handle is gone: seal what is left and stop.
                    self.seal(true);
                    tracing::info!(stats = ?self.buffer.stats(), "buffer closed");
                    return;
                }
                Err(_) => {}
            }
            if Instant::now() >= next_seal {
                self.seal(false);
                next_seal = Instant::now() + linger;
            }
        }
    }

    fn over_cap(&self) -> bool {
        self.buffer.stats().bytes() > self.cfg.max_bytes
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Fetch {
                max_records,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(
                    self.buffer
                        .pending(max_records, max_bytes)
                        .map_err(|e| e.to_string()),
                );
            }
            Control::Ack { seqs, reply } => {
                let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
                loop {
                    match self.buffer.ack(&seqs) {
                        Ok((records, _)) => {
                            self.metrics.records_sent.add(records);
                            break;
                        }
                        Err(e) => {
                            self.metrics.buffer_errors.inc();
                            tracing::error!(error = %e, "deleting acknowledged batches failed; retrying");
                            std::thread::sleep(backoff.next_delay());
                        }
                    }
                }
                self.publish();
                let _ = reply.send(());
            }
            Control::Flush { reply } => {
                self.seal(true);
                let _ = reply.send(());
            }
            Control::Ping { reply } => {
                let _ = reply.send(());
            }
            Control::Release => {
                self.buffer.release_in_flight();
                self.enforce_cap();
                self.publish();
            }
        }
    }

    /// Commits a group of appends, retrying on errors (disk full, I/O) with backoff while the sources wait.
    /// Acknowledgements run only after a successful commit.
    fn commit(&mut self, first: Append) {
        // Under `backpressure`, a group stops growing at the cap, so intake stops close to it instead of one full
        // group (up to `max_group_commit` messages) beyond it.
        let room = match self.cfg.overflow {
            OverflowPolicy::Backpressure => self
                .cfg
                .max_bytes
                .saturating_sub(self.buffer.stats().bytes()),
            OverflowPolicy::DropOldest => u64::MAX,
        };
        let mut bytes = super::counted_bytes(&first.readings);
        let mut group = vec![first];
        while group.len() < self.cfg.max_group_commit && bytes < room {
            match self.data.try_recv() {
                Ok(a) => {
                    bytes += super::counted_bytes(&a.readings);
                    group.push(a);
                }
                Err(_) => break,
            }
        }
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            match self.buffer.append_with_refused(
                group.iter().map(|a| a.readings.as_slice()),
                group.iter().filter_map(|a| a.refused.as_deref()),
            ) {
                Ok(_) => break,
                Err(e) => {
                    self.metrics.buffer_errors.inc();
                    tracing::error!(error = %e, messages = group.len(), "buffer commit failed; sources wait and the commit is retried");
                    if self.cfg.overflow == OverflowPolicy::DropOldest {
                        // A full disk may be relieved by dropping the oldest batches.
                        let _ = self.buffer.drop_oldest(self.buffer.stats().bytes() / 2);
                    }
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
        self.commits
            .push_back((Instant::now(), self.buffer.last_row_id()));
        for a in group {
            if let Some(ack) = a.ack {
                ack();
            }
        }
        self.enforce_cap();
        self.publish();
    }

    fn enforce_cap(&mut self) {
        if self.cfg.overflow == OverflowPolicy::DropOldest && self.over_cap() {
            match self.buffer.drop_oldest(self.cfg.max_bytes) {
                Ok(n) if n > 0 => tracing::warn!(
                    readings = n,
                    max_bytes = self.cfg.max_bytes,
                    "buffer full: dropped the oldest batches"
                ),
                Ok(_) => {}
                Err(e) => {
                    self.metrics.buffer_errors.inc();
                    tracing::error!(error = %e, "dropping the oldest batches failed");
                }
            }
        }
    }

    /// Seals the ready rows (all rows if `everything`).
    fn seal(&mut self, everything: bool) {
        let cutoff =
            Instant::now().checked_sub(Duration::from_millis(self.order.reorder_window_ms));
        while let Some(&(t, id)) = self.commits.front() {
            if everything || cutoff.is_some_and(|c| t <= c) {
                self.ready_id = self.ready_id.max(id);
                self.commits.pop_front();
            } else {
                break;
            }
        }
        let max_rows = self.batch.max_readings.max(10_000) * 2;
        loop {
            match self.buffer.seal(
                self.ready_id,
                max_rows,
                &mut self.encoder,
                &self.batch,
                self.order.rules(),
                fieldlink_ops::unix_ms(),
            ) {
                Ok(r) if r.rows == 0 => break,
                Ok(r) => {
                    tracing::debug!(
                        rows = r.rows,
                        batches = r.batches,
                        readings = r.readings,
                        "sealed"
                    );
                    if r.batches > 0 {
                        self.sealed.notify_one();
                    }
                    if (r.rows as usize) < max_rows {
                        break;
                    }
                }
                Err(e) => {
                    self.metrics.buffer_errors.inc();
                    tracing::error!(error = %e, "sealing failed; retried at the next tick");
                    break;
                }
            }
        }
        self.enforce_cap();
        self.publish();
    }

    /// Brings the metrics up to date: counters by the ledger's growth, gauges from the stats.
    fn publish(&mut self) {
        let l = self.buffer.ledger();
        let p = self.published;
        let m = &self.metrics;
        m.readings_received.add(l.appended - p.appended);
        m.readings_sent.add(l.sent - p.sent);
        m.readings_deduplicated.add(l.deduplicated - p.deduplicated);
        m.readings_late.add(l.late_flagged - p.late_flagged);
        m.readings_dead_lettered
            .add(l.dead_lettered - p.dead_lettered);
        m.readings_dropped.add(l.dropped - p.dropped);
        m.batches_sealed.add(l.batches_sealed - p.batches_sealed);
        m.bytes_sealed.add(l.bytes_sealed - p.bytes_sealed);
        self.published = l;
        let s = self.buffer.stats();
        m.unsealed_readings.set(s.unsealed_readings as i64);
        m.pending_batches.set(s.pending_batches as i64);
        m.pending_readings.set(s.pending_readings as i64);
        m.buffered_bytes.set(s.bytes() as i64);
    }
}

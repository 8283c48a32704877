//! The buffer's thread: owns the SQLite connection and serves two bounded channels, data (appends) and control
//! (fetch, acknowledge, flush). Under the `backpressure` overflow policy it stops reading the data channel while
//! the buffer is over its cap, but keeps serving control, so Kinesis acknowledgements can bring it back.
//!
//! Appends are group-committed: the thread takes every append already queued (up to `max_group_commit`),
//! commits them in one transaction, and only then runs their acknowledgement callbacks, in arrival order.
//! Every `linger_ms` it seals the groups committed at least `reorder_window_ms` ago (each commit's groups are
//! ready together: `commits` remembers the newest group id of every commit and its time); a seal takes what was
//! ready when it started (`seal_upto`). It works in parts of up to `2 × max(max_readings, 10,000)` readings. The
//! buffer thread takes a part's groups, states and engines out of the buffer and, once more than `OFFLOAD_ROWS`
//! (8,192) readings are involved, hands the part to the **seal thread** (dedup, rules, encoding, compression: no
//! I/O); meanwhile it goes on committing and acknowledging appends, so a seal does not hold the sources back (an MQTT
//! broker keeps only a few dozen messages in flight per client: every millisecond an acknowledgement waits is intake
//! lost). When the part comes back, the buffer thread writes it in one transaction and takes the next. One part is
//! out at a time. Smaller parts are sealed on the buffer thread at once. A flush and the shutdown wait for the part
//! out, then seal the rest on the buffer thread. See `seal.rs`.

use super::seal::{Begun, SealJob, Sealed};
use super::{
    Buffer, BufferConfig, BufferError, ErrorClass, Ledger, Left, NewReading, OverflowPolicy,
    Refused, SealReport,
};
use crate::alarm::{status, AlarmsConfig, Engine, StatusBoard};
use crate::batch::BatchConfig;
use crate::metrics::AgentMetrics;
use crate::order::OrderConfig;
use crate::window::WindowsConfig;
use fieldlink_ops::backoff::Backoff;
use fieldlink_ops::metrics::Health;
use fieldlink_proto::Encoder;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

/// Called once the readings it came with are durably committed (queues the MQTT PUBACK).
pub type AckFn = Box<dyn FnOnce() + Send>;

/// How a source learns that its readings are committed.
pub struct Ack {
    /// Runs once the readings are durably committed (queues the MQTT PUBACK).
    pub on_commit: AckFn,
    /// Set by the source when it can no longer deliver the acknowledgement (its connection stopped): the buffer
    /// then drops the append uncommitted, because the source (the broker) will deliver it again. Committing it
    /// without the acknowledgement would make that redelivery a duplicate the buffer's dedup may not catch (a
    /// replaced buffer file).
    pub cancelled: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ack")
            .field("cancelled", &self.cancelled)
            .finish_non_exhaustive()
    }
}

impl Ack {
    fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

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
    ack: Option<Ack>,
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
    /// A flush that closes every open window too, and every later seal with it ([`Buffer::close_all_windows`]).
    FlushClosingWindows {
        reply: oneshot::Sender<()>,
    },
    Left {
        reply: oneshot::Sender<Result<Left, String>>,
    },
    Release,
    Ping {
        reply: oneshot::Sender<Option<String>>,
    },
    /// Test hook: the buffer's next transaction fails with this SQLite code.
    #[cfg(test)]
    Fault(std::ffi::c_int),
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
    pub async fn append(&self, readings: Vec<NewReading>, ack: Option<Ack>) -> Result<(), Closed> {
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
    pub async fn refuse(&self, refused: Refused, ack: Option<Ack>) -> Result<(), Closed> {
        self.data
            .send_async(Append {
                readings: Vec::new(),
                refused: Some(Box::new(refused)),
                ack,
            })
            .await
            .map_err(|_| Closed)
    }

    /// Pending records for one `PutRecords` call (see [`Buffer::pending`]); `Ok(Err(why))` when the buffer could
    /// not read them (an I/O error, a damaged page): the caller reports it and asks again later.
    pub async fn fetch(
        &self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Result<Vec<Pending>, String>, Closed> {
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
            Ok(Ok(v)) => Ok(Ok(v)),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading pending batches failed");
                Ok(Err(e.to_string()))
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

    /// Seals everything unsealed now, ignoring the reorder window (shutdown); returns once done. Seals nothing while
    /// a commit waits on another process's lock (the close seals after its retry of the commit).
    pub async fn flush(&self) -> Result<(), Closed> {
        let (reply, rx) = oneshot::channel();
        self.ctl
            .send_async(Control::Flush { reply })
            .await
            .map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Closes every open window, with the readings it holds, and seals everything unsealed, ignoring the reorder
    /// window; every later seal closes the windows too (`fieldlink-agent drain`: nothing comes in any more).
    /// Returns once done.
    pub async fn flush_closing_windows(&self) -> Result<(), Closed> {
        let (reply, rx) = oneshot::channel();
        self.ctl
            .send_async(Control::FlushClosingWindows { reply })
            .await
            .map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// What the file holds that Kinesis has not acknowledged, and what only it holds; `Ok(Err(why))` when the
    /// buffer could not count it.
    pub async fn left(&self) -> Result<Result<Left, String>, Closed> {
        let (reply, rx) = oneshot::channel();
        self.ctl
            .send_async(Control::Left { reply })
            .await
            .map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Answers as soon as the buffer thread takes it: proof that the thread is not stuck (a hung `fsync`, a
    /// commit waiting on a lock). The answer is the buffer's current problem in one sentence, if it has one (a
    /// commit being retried, intake paused for disk space). Serves the health endpoint and the systemd watchdog.
    pub async fn ping(&self) -> Result<Option<String>, Closed> {
        let (reply, rx) = oneshot::channel();
        self.ctl
            .send_async(Control::Ping { reply })
            .await
            .map_err(|_| Closed)?;
        rx.await.map_err(|_| Closed)
    }

    /// Test hook: the buffer's next transaction fails with SQLite result `code`.
    #[cfg(test)]
    pub(crate) async fn inject_fault(&self, code: std::ffi::c_int) {
        let _ = self.ctl.send_async(Control::Fault(code)).await;
    }

    /// Notified whenever a batch is sealed.
    pub fn sealed(&self) -> Arc<Notify> {
        self.sealed.clone()
    }
}

/// Opens the buffer and starts its thread, without alarm rules. The thread ends when every handle is dropped,
/// after sealing what is left.
pub fn spawn(
    cfg: &BufferConfig,
    batch: &BatchConfig,
    order: &OrderConfig,
    agent_id: &str,
    metrics: AgentMetrics,
) -> Result<(BufferHandle, std::thread::JoinHandle<()>), BufferError> {
    spawn_with_alarms(
        cfg,
        batch,
        order,
        agent_id,
        metrics,
        &AlarmsConfig::default(),
        None,
    )
}

/// [`spawn`] with alarm rules: seals evaluate them (see "Alarms" in the buffer's doc); with a `status` board,
/// each committed transition's status is posted to it for the local MQTT publisher.
pub fn spawn_with_alarms(
    cfg: &BufferConfig,
    batch: &BatchConfig,
    order: &OrderConfig,
    agent_id: &str,
    metrics: AgentMetrics,
    alarms: &AlarmsConfig,
    status: Option<StatusBoard>,
) -> Result<(BufferHandle, std::thread::JoinHandle<()>), BufferError> {
    spawn_with_rules(
        cfg,
        batch,
        order,
        agent_id,
        metrics,
        (alarms, &WindowsConfig::default()),
        (status, None),
    )
}

/// [`spawn_with_alarms`] with window rules too (see "Windows" in the buffer's doc). `boards`: where alarm
/// statuses go (as in [`spawn_with_alarms`]), and the health board the MQTT connections report to (`mqtt:<name>`):
/// the window rules' intake clock stands still while one that was up is down (the broker keeps their readings).
pub fn spawn_with_rules(
    cfg: &BufferConfig,
    batch: &BatchConfig,
    order: &OrderConfig,
    agent_id: &str,
    metrics: AgentMetrics,
    rules: (&AlarmsConfig, &WindowsConfig),
    (status, sources): (Option<StatusBoard>, Option<Health>),
) -> Result<(BufferHandle, std::thread::JoinHandle<()>), BufferError> {
    let (mut worker, handle) = worker(cfg, batch, order, agent_id, metrics, rules, status)?;
    worker.sources = sources;
    let join = std::thread::Builder::new()
        .name("buffer".into())
        .spawn(move || worker.run())
        .map_err(|e| BufferError::Incompatible {
            path: cfg.path.display().to_string(),
            why: format!("cannot start thread: {e}"),
        })?;
    Ok((handle, join))
}

/// The buffer thread's state, opened and ready to run, and its handle.
fn worker(
    cfg: &BufferConfig,
    batch: &BatchConfig,
    order: &OrderConfig,
    agent_id: &str,
    metrics: AgentMetrics,
    (alarms, windows): (&AlarmsConfig, &WindowsConfig),
    status: Option<StatusBoard>,
) -> Result<(Worker, BufferHandle), BufferError> {
    let mut buffer = Buffer::open(&cfg.path, cfg.durability, agent_id)?;
    buffer.enable_alarms(Engine::from_config(alarms), order.reorder_window_ms)?;
    buffer.enable_windows(crate::window::Engine::from_config(windows))?;
    if buffer.moved_aside().is_some() {
        metrics.buffer_corrupt.inc();
    }
    // A cap lowered below the backlog (a configuration edit): said before the policy acts on it.
    let held = buffer.stats().bytes();
    if held > cfg.max_bytes {
        let what = match cfg.overflow {
            OverflowPolicy::DropOldest => {
                "drop_oldest drops the oldest batches down to it at the first seal"
            }
            OverflowPolicy::Backpressure => {
                "backpressure pauses intake until sending brings it under"
            }
        };
        tracing::warn!(
            buffer_bytes = held,
            max_bytes = cfg.max_bytes,
            "the buffer holds more than [buffer] max_bytes (lowered since the last run?): {what}"
        );
    }
    let encoder = Encoder::new(batch.zstd_level)?;
    let (data_tx, data) = flume::bounded(cfg.queue_capacity);
    let (ctl_tx, ctl) = flume::bounded(64);
    let sealed = Arc::new(Notify::new());
    let ready_id = buffer.last_row_id(); // rows from before a restart are ready at once
                                         // A headroom larger than a quarter of a small filesystem would keep intake paused for good: use an eighth.
    let headroom = match buffer.disk_size() {
        Some(size) if cfg.min_free_bytes > size / 4 => {
            tracing::warn!(
                min_free_bytes = cfg.min_free_bytes,
                filesystem_bytes = size,
                using = size / 8,
                "buffer.min_free_bytes is more than a quarter of the buffer's filesystem; keeping an eighth free instead"
            );
            size / 8
        }
        _ => cfg.min_free_bytes,
    };
    let sealer = Sealer::spawn().map_err(|e| BufferError::Incompatible {
        path: cfg.path.display().to_string(),
        why: format!("cannot start the seal thread: {e}"),
    })?;
    let mut worker = Worker {
        buffer,
        part: Part::Home(encoder),
        sealer,
        data,
        ctl,
        sealed: sealed.clone(),
        metrics,
        cfg: cfg.clone(),
        batch: batch.clone(),
        order: order.clone(),
        commits: VecDeque::new(),
        ready_id,
        seal_upto: ready_id,
        published: Ledger::default(),
        published_windows: crate::window::Counts::default(),
        held: None,
        undeleted_retry: None,
        write_probe: None,
        probe_on_lock: false,
        headroom,
        seal_error: None,
        dropped: None,
        seal_rows: usize::MAX,
        status: status.map(|b| (b, alarms.topic_prefix.clone())),
        intake: IntakeClock::new(
            Instant::now(),
            (2 * Duration::from_millis(batch.linger_ms)).max(Duration::from_secs(1)),
        ),
        sources: None,
        give_back: crate::memory::GiveBack::default(),
    };
    worker.post_all_statuses();
    worker.publish();
    Ok((
        worker,
        BufferHandle {
            data: data_tx,
            ctl: ctl_tx,
            sealed,
        },
    ))
}

enum Msg {
    Data(Result<Append, flume::RecvError>),
    Ctl(Result<Control, flume::RecvError>),
    Sealed(Result<Box<(Sealed, Encoder)>, flume::RecvError>),
}

/// The seal thread: runs one [`SealJob`] at a time (dedup, rules, encoding and compression) while the buffer
/// thread goes on committing and acknowledging appends. It ends when the buffer thread drops `jobs`.
struct Sealer {
    jobs: flume::Sender<(Box<SealJob>, Encoder)>,
    done: flume::Receiver<Box<(Sealed, Encoder)>>,
}

impl Sealer {
    fn spawn() -> std::io::Result<Self> {
        let (jobs, job_rx) = flume::bounded::<(Box<SealJob>, Encoder)>(1);
        let (done_tx, done) = flume::bounded(1);
        std::thread::Builder::new()
            .name("seal".into())
            .spawn(move || {
                let mut give_back = crate::memory::GiveBack::default();
                for (job, mut encoder) in job_rx.iter() {
                    let sealed = job.run(&mut encoder);
                    give_back.tick();
                    if done_tx.send(Box::new((sealed, encoder))).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self { jobs, done })
    }
}

/// Where the record encoder is: here, or out on the seal thread with a part of a seal.
#[expect(
    clippy::large_enum_variant,
    reason = "one per buffer thread, held in place: the encoder moves only with a part"
)]
enum Part {
    /// No part is out.
    Home(Encoder),
    /// A part is out: since when, and how many readings it could take at most (a part that fails for space
    /// halves the next one).
    Out { since: Instant, max_rows: usize },
}

struct Worker {
    buffer: Buffer,
    part: Part,
    sealer: Sealer,
    data: flume::Receiver<Append>,
    ctl: flume::Receiver<Control>,
    sealed: Arc<Notify>,
    metrics: AgentMetrics,
    cfg: BufferConfig,
    batch: BatchConfig,
    order: OrderConfig,
    /// `(commit time, newest group id of that commit)`, oldest first, for commits not yet ready.
    commits: VecDeque<(Instant, i64)>,
    /// Groups with `id <= ready_id` have waited the reorder window.
    ready_id: i64,
    /// What the seal under way takes: the groups ready when it started (`ready_id` then). Groups that become ready
    /// meanwhile wait for the next seal: sealing each part the moment the last one is back would make parts
    /// small, and each part rewrites the dedup state of every series it involves.
    seal_upto: i64,
    published: Ledger,
    /// The window counts last turned into metrics.
    published_windows: crate::window::Counts,
    /// A group of appends taken from the queue but not committed yet (a failed commit, or no disk room): retried
    /// at `retry_at`; no new appends are taken meanwhile, while control (fetch, acknowledge, flush) is served.
    held: Option<Held>,
    /// When the deletion of records Kinesis acknowledged that failed ([`Buffer::note_undeleted`]) is tried again,
    /// and its backoff; `None` while none waits.
    undeleted_retry: Option<(Instant, Backoff)>,
    /// Set while the last write failed on another process's lock (`SQLITE_BUSY`) or on a full disk
    /// (`SQLITE_FULL`): when the writes nobody waits for (seal ticks, retried deletions) may try again, and its
    /// backoff. Each attempt under the lock waits out SQLite's 5 s busy timeout on this thread; back to back, they
    /// held appends back for good (control is served first, then the tick) and a stop for tens of seconds. On a
    /// disk another process filled, each tick's seal failed again at once and logged (ten lines a second into the
    /// full disk's journal). Any write that goes through clears it.
    write_probe: Option<(Instant, Backoff)>,
    /// Whether the write that set [`Worker::write_probe`] last failed on another process's lock (not a full disk).
    probe_on_lock: bool,
    /// Bytes kept free on the buffer's filesystem: `min_free_bytes`, at most an eighth of a small filesystem.
    headroom: u64,
    /// The last seal's error, until a seal succeeds.
    seal_error: Option<String>,
    /// Readings the overflow policy dropped recently: `(last drop, readings since the count began)`; shown in
    /// `/health` for [`DROPS_SHOWN`] after the last drop.
    dropped: Option<(Instant, u64)>,
    /// Rows one seal takes at most: halved after a seal failed for disk space, doubled back after each success.
    seal_rows: usize,
    /// Where committed alarm statuses go for the local MQTT publisher, with the topic prefix.
    status: Option<(StatusBoard, String)>,
    /// The window rules' intake clock (see [`IntakeClock`]).
    intake: IntakeClock,
    /// The health board of the MQTT connections, if any ([`spawn_with_rules`]).
    sources: Option<Health>,
    /// Hands this thread's free heap memory back after parts, once a second at most.
    give_back: crate::memory::GiveBack,
}

/// A monotonic clock, ms, that advances only while the agent takes readings: the buffer accepts appends (no
/// commit held, for disk room or on another process's lock; intake not paused under `backpressure`) and no MQTT
/// connection that was up is down. The window rules time a series' silence on it (`idle_close_ms`), so a pause the
/// agent causes or suffers (intake paused under `backpressure`, a broker out of reach while it queues the
/// readings) is not taken for the series' silence, nor is a step of the wall clock. Advanced at each seal by the
/// time since the one before, if intake runs then (seals come every `linger_ms`), by at most `max_step` (time the
/// buffer thread spent away from its loop, in a commit or a deletion waiting on a lock, is time it took no readings).
/// A down connection holds it for at most [`LINK_WAIT`] from when it was first seen down (a broker gone for good
/// must not stop every window rule's clock). Pure.
#[derive(Debug)]
struct IntakeClock {
    last: Instant,
    ms: i64,
    max_step: Duration,
    /// Since when a source connection has been seen down (continuously), if it is.
    down_since: Option<Instant>,
    /// Whether the end of that wait was said.
    told: bool,
}

/// How long a down source connection holds the intake clock at most.
const LINK_WAIT: Duration = Duration::from_secs(3600);

impl IntakeClock {
    fn new(now: Instant, max_step: Duration) -> Self {
        Self {
            last: now,
            ms: 0,
            max_step,
            down_since: None,
            told: false,
        }
    }

    /// Whether a source connection seen `down` at `now` holds the clock (for [`LINK_WAIT`] from when it was
    /// first seen down), and whether this call is the first past that wait (to say so).
    fn link_holds(&mut self, now: Instant, down: bool) -> (bool, bool) {
        if !down {
            self.down_since = None;
            self.told = false;
            return (false, false);
        }
        let since = *self.down_since.get_or_insert(now);
        if now.saturating_duration_since(since) < LINK_WAIT {
            return (true, false);
        }
        (false, !std::mem::replace(&mut self.told, true))
    }

    /// The clock at `now`, after the time since the last call (at most `max_step`) if `taking` readings.
    fn advance(&mut self, now: Instant, taking: bool) -> i64 {
        if taking {
            let step = now.saturating_duration_since(self.last).min(self.max_step);
            self.ms = self
                .ms
                .saturating_add(step.as_millis().min(i64::MAX as u128) as i64);
        }
        self.last = now;
        self.ms
    }
}

/// A group waiting to be committed. Its acknowledgements have not run: the sources still own the messages.
struct Held {
    group: Vec<Append>,
    /// Messages committed per attempt: the whole group, halved after each `SQLITE_FULL`.
    limit: usize,
    /// When the last error was logged (errors of a held group are logged at most every [`LOG_EVERY`]).
    logged: Option<Instant>,
    since: Instant,
    retry_at: Instant,
    backoff: Backoff,
    why: String,
    /// The last attempt failed on a lock another process holds (`SQLITE_BUSY`): a seal would wait on it too.
    locked: bool,
}

/// How often a held group's repeated failure is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How long `/health` shows the readings the overflow policy dropped, after the last drop.
const DROPS_SHOWN: Duration = Duration::from_secs(60);

/// Readings a seal seals on the buffer thread at once, at most (a few milliseconds of commits held back, less than
/// handing them to the seal thread costs); larger parts, and the parts after these, go to the seal thread.
const OFFLOAD_ROWS: u64 = 8192;

/// A seal part out on the seal thread for longer than this is reported by `/health` (a part takes milliseconds).
const SLOW_PART: Duration = Duration::from_secs(30);

/// Longest wait between two retries of a held group.
const MAX_RETRY: Duration = Duration::from_secs(2);

/// First and longest wait before the deletion of acknowledged records that failed is tried again (nothing waits
/// for it: the records are not sent again meanwhile, they only take room).
const DELETE_RETRY_MIN: Duration = Duration::from_secs(1);
const DELETE_RETRY_MAX: Duration = Duration::from_secs(60);

/// First and longest wait, after a write failed on another process's lock or a full disk, before a seal tick or a
/// retried deletion tries again (a held commit's own retries go on meanwhile: a sealing tick or deletion is not urgent).
const WRITE_PROBE_MIN: Duration = Duration::from_secs(1);
const WRITE_PROBE_MAX: Duration = Duration::from_secs(10);

/// How long the close retries a commit that fails (a lock another process holds, a disk error) before giving up
/// what it holds. systemd is asked for the drain deadline plus 30 s to stop: a last attempt may wait out SQLite's
/// 5 s busy timeout past this, and the final seal follows.
const CLOSE_RETRY: Duration = Duration::from_secs(10);

impl Worker {
    fn run(mut self) {
        let linger = Duration::from_millis(self.batch.linger_ms);
        let mut next_seal = Instant::now() + linger;
        while self.step(&mut next_seal, linger) {}
    }

    /// One turn of the thread's loop: waits for a message, a sealed part, the next seal tick or a held group's
    /// retry, and serves it. `false` once every handle is gone and the thread has closed the buffer.
    fn step(&mut self, next_seal: &mut Instant, linger: Duration) -> bool {
        let accepting = self.accepting();
        let mut until = self
            .held
            .as_ref()
            .map_or(*next_seal, |h| h.retry_at.min(*next_seal));
        if let Some(at) = self.undeleted_due_at() {
            until = until.min(at);
        }
        let wait = until.saturating_duration_since(Instant::now());
        // Served in this order when several are ready (flume's selector without `eventual-fairness`): control,
        // a sealed part, appends. A sealed part before appends: under steady intake there is always an append
        // queued, and the part would wait behind them for good.
        let mut sel = flume::Selector::new().recv(&self.ctl, Msg::Ctl);
        if self.part_out() {
            sel = sel.recv(&self.sealer.done, Msg::Sealed);
        }
        if accepting {
            sel = sel.recv(&self.data, Msg::Data);
        }
        match sel.wait_timeout(wait) {
            Ok(Msg::Ctl(Ok(c))) => self.control(c),
            Ok(Msg::Data(Ok(a))) => {
                let held = self.gather(a);
                self.try_commit(held);
            }
            Ok(Msg::Sealed(Ok(done))) => {
                let (sealed, encoder) = *done;
                self.part_done(sealed, encoder);
            }
            Ok(Msg::Sealed(Err(_))) => panic!("the seal thread stopped (it panicked)"),
            Ok(Msg::Ctl(Err(_)) | Msg::Data(Err(_))) => {
                // Every handle is gone: commit what is still held or queued, then seal what is left and stop.
                self.commit_at_close(Instant::now() + CLOSE_RETRY);
                self.seal_all();
                // Once more unless the last write met another process's lock and its probe is not due (it would wait
                // out the busy timeout on it): what is left is sent again at the next start, and the cloud skips it.
                if self.buffer.has_undeleted() && !self.lock_waits(Instant::now()) {
                    self.delete_undeleted();
                }
                tracing::info!(stats = ?self.buffer.stats(), "buffer closed");
                return false;
            }
            Err(_) => {}
        }
        // Control messages queued meanwhile are served before a held group's retry and the seal tick: under a lock
        // another process holds, each of those waits out SQLite's busy timeout (5 s), and a flush or a stop behind
        // a queue of pings would wait minutes (a stop did: it lasted as long as the lock). Only those queued now:
        // the retry and the tick still get their turn.
        for _ in 0..self.ctl.len() {
            let Ok(c) = self.ctl.try_recv() else { break };
            self.control(c);
        }
        if self
            .held
            .as_ref()
            .is_some_and(|h| Instant::now() >= h.retry_at)
        {
            if let Some(h) = self.held.take() {
                self.try_commit(h);
            }
        }
        if self
            .undeleted_due_at()
            .is_some_and(|at| Instant::now() >= at)
        {
            self.delete_undeleted();
        }
        // No seal while a commit waits on another process's lock, or until the next probe after a write failed on
        // a lock or a full disk: it would wait out the busy timeout on the same lock, holding back control messages
        // (a stop), appends and the commit's retry, or fail again at once on the full disk; it resumes once a write
        // goes in.
        if Instant::now() >= *next_seal {
            if !self.writes_wait(Instant::now()) {
                self.seal_tick();
            } else {
                // The clock stands still while intake waits on the lock (a held commit), runs while it takes.
                self.advance_intake_clock();
            }
            *next_seal = Instant::now() + linger;
        }
        true
    }

    /// At the close (every handle gone): commits the held group and the appends still queued, retrying a failed
    /// commit with its backoff until `deadline`. Appends whose source stopped waiting are dropped (an MQTT broker
    /// delivers them again), but a Modbus reading has no other copy: a commit held by another process's lock or
    /// a disk error at the stop is waited for a little longer ([`CLOSE_RETRY`]) instead of losing it. What is still
    /// held at the deadline is lost, and said so.
    fn commit_at_close(&mut self, deadline: Instant) {
        let mut told = false;
        loop {
            if let Some(mut held) = self.held.take() {
                held.group
                    .retain(|a| !a.ack.as_ref().is_some_and(Ack::is_cancelled));
                if held.group.is_empty() {
                    continue;
                }
                if !told {
                    told = true;
                    tracing::warn!(
                        readings = held.group.iter().map(|a| a.readings.len()).sum::<usize>(),
                        why = %held.why,
                        "closing the buffer with a commit held: retrying it for up to {} s",
                        CLOSE_RETRY.as_secs()
                    );
                }
                let now = Instant::now();
                if now >= deadline {
                    let readings: usize = held.group.iter().map(|a| a.readings.len()).sum();
                    let queued: usize = self.data.drain().map(|a| a.readings.len()).sum();
                    tracing::error!(
                        readings = readings + queued,
                        why = %held.why,
                        "buffer closed with a commit still failing: these readings were not stored (MQTT \
                         messages among them are delivered again by the broker; Modbus polls are lost)"
                    );
                    return;
                }
                std::thread::sleep(held.retry_at.min(deadline).saturating_duration_since(now));
                self.try_commit(held);
                continue;
            }
            let Ok(a) = self.data.try_recv() else { return };
            let held = self.gather(a);
            self.try_commit(held);
        }
    }

    /// Whether appends are taken now: no group is held for room, and under `backpressure` the buffer is not over
    /// its cap.
    fn accepting(&self) -> bool {
        self.held.is_none()
            && !(self.cfg.overflow == OverflowPolicy::Backpressure && self.over_cap())
    }

    /// When the deletion of acknowledged records that failed is due: at its retry, not before the writes' next
    /// probe, never while a commit waits on another process's lock (the deletion would wait out the busy timeout on
    /// it too; it resumes once the commit goes in).
    fn undeleted_due_at(&self) -> Option<Instant> {
        if self.commit_waits_on_lock() || !self.buffer.has_undeleted() {
            return None;
        }
        let at = self.undeleted_retry.as_ref().map(|(at, _)| *at)?;
        Some(
            self.write_probe
                .as_ref()
                .map_or(at, |(probe, _)| at.max(*probe)),
        )
    }

    /// Whether a held commit failed on another process's lock and waits for it.
    fn commit_waits_on_lock(&self) -> bool {
        self.held.as_ref().is_some_and(|h| h.locked)
    }

    /// Sets the next try of the deletion of acknowledged records that failed: after the backoff's next delay,
    /// starting a backoff if none runs.
    fn schedule_delete_retry(&mut self) {
        let (at, backoff) = self.undeleted_retry.get_or_insert_with(|| {
            (
                Instant::now(),
                Backoff::new(DELETE_RETRY_MIN, DELETE_RETRY_MAX),
            )
        });
        *at = Instant::now() + backoff.next_delay();
    }

    /// Whether the writes nobody waits for (a seal tick, a retried deletion) wait at `now`: a commit is held on
    /// another process's lock, or the last write failed on a lock or a full disk and its next probe is later.
    fn writes_wait(&self, now: Instant) -> bool {
        self.commit_waits_on_lock() || self.write_probe.as_ref().is_some_and(|(at, _)| now < *at)
    }

    /// [`Worker::writes_wait`] on another process's lock only, where each attempt waits out SQLite's busy timeout;
    /// on a full disk a write fails at once.
    fn lock_waits(&self, now: Instant) -> bool {
        self.commit_waits_on_lock()
            || (self.probe_on_lock && self.write_probe.as_ref().is_some_and(|(at, _)| now < *at))
    }

    /// Notes how a write ended (`None`: it committed; only writes that reached the database, not a seal that found
    /// nothing to write): one that failed on another process's lock or a full disk sets the next probe (with
    /// backoff); one that went through, or failed for another reason (an I/O error, which no wait is known to
    /// help), ends the wait, and a deletion of acknowledged records that waits is due at once (under
    /// `backpressure` they keep intake paused until deleted).
    fn note_write(&mut self, class: Option<ErrorClass>) {
        if !matches!(class, Some(ErrorClass::Busy | ErrorClass::Full)) {
            if self.write_probe.take().is_some() {
                if let Some((at, backoff)) = &mut self.undeleted_retry {
                    *at = Instant::now();
                    backoff.reset();
                }
            }
            return;
        }
        self.probe_on_lock = class == Some(ErrorClass::Busy);
        let (at, backoff) = self.write_probe.get_or_insert_with(|| {
            (
                Instant::now(),
                Backoff::new(WRITE_PROBE_MIN, WRITE_PROBE_MAX),
            )
        });
        *at = Instant::now() + backoff.next_delay().max(WRITE_PROBE_MIN);
    }

    /// Tries the deletion of acknowledged records that failed once; counts them sent when it goes through, or sets
    /// the next try.
    fn delete_undeleted(&mut self) {
        let res = self.buffer.ack_undeleted();
        self.note_write(res.as_ref().err().map(BufferError::class));
        match res {
            Ok(records) => {
                self.metrics.records_sent.add(records);
                self.undeleted_retry = None;
                if records > 0 {
                    tracing::info!(records, "acknowledged batches deleted after all");
                    self.publish();
                }
            }
            Err(e) => {
                self.metrics.buffer_errors.inc();
                self.schedule_delete_retry();
                if self
                    .undeleted_retry
                    .as_ref()
                    .is_some_and(|(_, b)| b.attempts() % 10 == 0)
                {
                    tracing::error!(error = %e, "deleting acknowledged batches still fails; retried");
                }
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
                let res = self.buffer.ack(&seqs);
                self.note_write(res.as_ref().err().map(BufferError::class));
                match res {
                    Ok((records, _)) => self.metrics.records_sent.add(records),
                    Err(e) => {
                        // Not retried here: under another process's lock each attempt waits out the busy
                        // timeout, and the sender, and a stop behind it, would wait with this thread (a stop
                        // waited 30 s). Kinesis has the records: they are not fetched again, and the loop retries
                        // their deletion.
                        self.metrics.buffer_errors.inc();
                        if !self.buffer.has_undeleted() {
                            self.undeleted_retry = None; // a retry of deletions gone by other ways
                        }
                        if self.undeleted_retry.is_none() {
                            self.schedule_delete_retry();
                        }
                        self.buffer.note_undeleted(&seqs);
                        tracing::error!(
                            error = %e,
                            records = seqs.len(),
                            "deleting acknowledged batches failed; Kinesis has them, so they are not sent again, \
                             and the deletion is retried"
                        );
                    }
                }
                self.publish();
                let _ = reply.send(());
            }
            Control::Flush { reply } => {
                // Not while a commit waits on another process's lock: the seal would wait out the busy timeout on
                // it too, and fail; the close seals after its own retry of the commit. (A lock freed since the
                // commit's last attempt, at most MAX_RETRY ago, leaves the readings of the reorder window for the
                // close to seal and the next start to send.)
                if !self.commit_waits_on_lock() {
                    self.seal_all();
                }
                let _ = reply.send(());
            }
            Control::FlushClosingWindows { reply } => {
                self.buffer.close_all_windows();
                self.seal_all();
                let _ = reply.send(());
            }
            Control::Left { reply } => {
                // The drain's count: a deletion still waiting gets its try first.
                if self.buffer.has_undeleted() {
                    self.delete_undeleted();
                }
                let _ = reply.send(self.buffer.left().map_err(|e| e.to_string()));
            }
            Control::Ping { reply } => {
                let _ = reply.send(self.problem());
            }
            #[cfg(test)]
            Control::Fault(code) => self.buffer.fault = Some(code),
            Control::Release => {
                self.buffer.release_in_flight();
                self.enforce_cap();
                self.publish();
            }
        }
    }

    /// Takes `first` and every append already queued behind it (up to `max_group_commit`) as one group.
    fn gather(&mut self, first: Append) -> Held {
        // Under `backpressure`, a group stops growing at the cap, so intake stops close to it instead of one full
        // group (up to `max_group_commit` messages) beyond it.
        let room = match self.cfg.overflow {
            OverflowPolicy::Backpressure => self
                .cfg
                .max_bytes
                .saturating_sub(self.buffer.stats().bytes()),
            OverflowPolicy::DropOldest => u64::MAX,
        };
        let room = room.min(self.txn_budget());
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
        let now = Instant::now();
        Held {
            limit: group.len(),
            group,
            logged: None,
            since: now,
            retry_at: now,
            backoff: Backoff::new(Duration::from_millis(50), MAX_RETRY),
            why: String::new(),
            locked: false,
        }
    }

    /// Commits a group once there is disk room for it; acknowledgements run only after the commit. A group that
    /// cannot be committed now is held and retried with backoff (see "Errors" in the module doc); nothing is
    /// dropped unless the disk is full and the policy is `drop_oldest`, and then only for the space needed. On a
    /// full disk the group is committed in smaller parts (a smaller transaction needs less WAL).
    fn try_commit(&mut self, mut held: Held) {
        // Appends whose source stopped waiting are dropped, not committed: the source delivers them again.
        held.group
            .retain(|a| !a.ack.as_ref().is_some_and(Ack::is_cancelled));
        if held.group.is_empty() {
            return;
        }
        // Set again below if this attempt fails on the lock: a group then held for disk room must not hold seals
        // back (sealing and sending are what free the room).
        held.locked = false;
        let mut n = held.limit.min(held.group.len());
        let need = loop {
            let bytes: u64 = held.group[..n]
                .iter()
                .map(|a| super::counted_bytes(&a.readings))
                .sum();
            // The WAL holds a copy of each page until the next checkpoint: count the part twice.
            let need = bytes.saturating_mul(2);
            match self.ensure_room(need) {
                Ok(()) => break need,
                // A smaller part may fit where the whole group does not.
                Err(_) if n > 1 => {
                    n = n.div_ceil(2);
                    held.limit = n;
                }
                Err(why) => return self.hold(held, why),
            }
        };
        let part = &held.group[..n];
        let res = self.buffer.append_with_refused(
            part.iter().map(|a| a.readings.as_slice()),
            part.iter().filter_map(|a| a.refused.as_deref()),
        );
        self.note_write(res.as_ref().err().map(BufferError::class));
        if let Err(e) = res {
            self.metrics.buffer_errors.inc();
            let class = e.class();
            held.locked = class == ErrorClass::Busy;
            if class == ErrorClass::Full {
                held.limit = (n / 2).max(1);
                self.buffer.release_wal();
                if self.cfg.overflow == OverflowPolicy::DropOldest {
                    self.drop_for(need);
                }
            }
            let why = match class {
                ErrorClass::Full => format!("commit failed, disk full: {e}"),
                ErrorClass::Busy => {
                    format!("commit waits: another process holds the buffer's lock ({e})")
                }
                ErrorClass::Other => format!("commit failed: {e}"),
            };
            if held.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                held.logged = Some(Instant::now());
                tracing::error!(error = %e, class = ?class, messages = n, "buffer commit failed; sources wait and the commit is retried");
            }
            return self.hold(held, why);
        }
        if held.backoff.attempts() > 0 {
            tracing::info!(
                waited_ms = held.since.elapsed().as_millis() as u64,
                messages = n,
                "held buffer commit went through"
            );
        }
        self.commits
            .push_back((Instant::now(), self.buffer.last_row_id()));
        for a in held.group.drain(..n) {
            if let Some(ack) = a.ack {
                (ack.on_commit)();
            }
        }
        if !held.group.is_empty() {
            // The rest of a group split for disk space: next, right after serving control, in parts twice as large
            // (halved down to one message on a full disk, the rest would otherwise go one message and one fsync at
            // a time while intake waits), with a fresh backoff.
            held.retry_at = Instant::now();
            held.limit = n.saturating_mul(2);
            held.backoff.reset();
            self.held = Some(held);
        }
        self.enforce_cap();
        self.publish();
    }

    fn hold(&mut self, mut held: Held, why: String) {
        held.retry_at = Instant::now() + held.backoff.next_delay();
        held.why = why;
        self.held = Some(held);
    }

    /// Makes sure `need` bytes can be written while keeping the headroom free, dropping the oldest batches
    /// for the shortfall under `drop_oldest`. `Err` says why intake has to wait.
    fn ensure_room(&mut self, need: u64) -> Result<(), String> {
        let want = need + self.headroom;
        let Some(room) = self.buffer.disk_room(want) else {
            return Ok(()); // cannot tell: SQLITE_FULL will say so
        };
        if room >= want {
            return Ok(());
        }
        if self.cfg.overflow == OverflowPolicy::DropOldest {
            self.drop_for(want - room);
            if self.buffer.disk_room(want).is_some_and(|r| r >= want) {
                return Ok(());
            }
        }
        Err(format!(
            "intake paused: {:.1} MiB left on the buffer's filesystem, {:.1} MiB kept free",
            room as f64 / 1048576.0,
            self.headroom as f64 / 1048576.0
        ))
    }

    /// `drop_oldest` for `bytes` of space (a full disk): the oldest sealed batches not in flight, counted.
    fn drop_for(&mut self, bytes: u64) {
        let target = self.buffer.stats().bytes().saturating_sub(bytes);
        match self.buffer.drop_oldest(target) {
            Ok(d) => {
                self.metrics.records_sent.add(d.acknowledged_records);
                if d.readings > 0 {
                    tracing::warn!(
                        readings = d.readings,
                        bytes,
                        "buffer disk full: dropped the oldest batches"
                    );
                    self.note_dropped(d.readings);
                }
            }
            Err(e) => {
                self.metrics.buffer_errors.inc();
                tracing::error!(error = %e, "dropping the oldest batches failed");
            }
        }
        self.publish();
    }

    /// The most one transaction may write (counted bytes): a quarter of the disk headroom (at least 256 KiB, at
    /// most 16 MiB), so a commit or a seal can never eat the space acknowledgement deletes and the WAL need.
    fn txn_budget(&self) -> u64 {
        (self.headroom / 4).clamp(256 * 1024, 16 * 1024 * 1024)
    }

    /// The buffer's problem now, in one sentence (for `/health`), if it has one.
    fn problem(&self) -> Option<String> {
        if let Some(h) = &self.held {
            return Some(format!(
                "{} (for {:.1} s)",
                h.why,
                h.since.elapsed().as_secs_f64()
            ));
        }
        if let Part::Out { since, .. } = &self.part {
            if since.elapsed() >= SLOW_PART {
                return Some(format!(
                    "a seal part has been out on the seal thread for {:.1} s",
                    since.elapsed().as_secs_f64()
                ));
            }
        }
        if let Some(e) = &self.seal_error {
            return Some(e.clone());
        }
        if self.buffer.has_undeleted() && self.undeleted_retry.is_some() {
            // Under another process's lock with nothing else to write, this is the only sign of it.
            return Some(format!(
                "{} records Kinesis acknowledged are still in the buffer: deleting them failed, retried",
                self.buffer.undeleted_records()
            ));
        }
        if let Some((at, n)) = self.dropped {
            if at.elapsed() < DROPS_SHOWN {
                return Some(format!(
                    "drop_oldest dropped {n} readings (cap or full disk), the last {:.0} s ago",
                    at.elapsed().as_secs_f64()
                ));
            }
        }
        (self.cfg.overflow == OverflowPolicy::Backpressure && self.over_cap()).then(|| {
            format!(
                "at its cap (backpressure): {:.1} of {:.1} MiB, intake paused until Kinesis takes the backlog",
                self.buffer.stats().bytes() as f64 / 1048576.0,
                self.cfg.max_bytes as f64 / 1048576.0
            )
        })
    }

    /// Counts readings the overflow policy dropped, for `/health`.
    fn note_dropped(&mut self, n: u64) {
        let since = match self.dropped {
            Some((at, total)) if at.elapsed() < DROPS_SHOWN => total,
            _ => 0,
        };
        self.dropped = Some((Instant::now(), since + n));
    }

    fn enforce_cap(&mut self) {
        if self.cfg.overflow == OverflowPolicy::DropOldest && self.over_cap() {
            match self.buffer.drop_oldest(self.cfg.max_bytes) {
                Ok(d) => {
                    self.metrics.records_sent.add(d.acknowledged_records);
                    if d.readings > 0 {
                        tracing::warn!(
                            readings = d.readings,
                            max_bytes = self.cfg.max_bytes,
                            "buffer full: dropped the oldest batches"
                        );
                        self.note_dropped(d.readings);
                    }
                }
                Err(e) => {
                    self.metrics.buffer_errors.inc();
                    tracing::error!(error = %e, "dropping the oldest batches failed");
                }
            }
        }
    }

    /// The commits that have waited the reorder window become ready (all of them if `everything`).
    fn advance_ready(&mut self, everything: bool) {
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
    }

    /// Readings the next part of a seal may take: 2 × max(`max_readings`, 10,000), less after a seal failed for
    /// space, and no more than one transaction's budget.
    fn max_part_rows(&self) -> usize {
        let full_size = self.full_part_rows();
        let stats = self.buffer.stats();
        let row_bytes = (stats.unsealed_bytes / stats.unsealed_readings.max(1)).max(1);
        let budget_rows = (self.txn_budget() / row_bytes).max(1) as usize;
        self.seal_rows.min(full_size).min(budget_rows)
    }

    /// The most readings a part takes: 2 × max(`max_readings`, 10,000).
    fn full_part_rows(&self) -> usize {
        self.batch.max_readings.max(10_000) * 2
    }

    /// Every `linger_ms`: the commits that have waited the reorder window become ready and, unless the last seal
    /// is still under way (a part is out), a seal of them starts.
    fn seal_tick(&mut self) {
        self.advance_intake_clock();
        self.advance_ready(false);
        if !self.part_out() {
            self.seal_upto = self.ready_id;
            self.next_part();
        }
    }

    /// Gives the next seal the window rules' intake clock.
    fn advance_intake_clock(&mut self) {
        let now = Instant::now();
        let down = self.sources.as_ref().is_some_and(Health::links_down);
        let (holds, expired) = self.intake.link_holds(now, down);
        if expired {
            tracing::warn!(
                waited_s = LINK_WAIT.as_secs(),
                "an MQTT connection has been down for an hour: window rules time silences again (idle_close_ms)"
            );
        }
        let taking = self.accepting() && !holds;
        let ms = self.intake.advance(now, taking);
        self.buffer.set_intake_clock(ms);
    }

    /// Takes the next part of the seal (up to [`Worker::max_part_rows`] ready readings, whole groups). Parts are
    /// sealed here at once while they add up to at most [`OFFLOAD_ROWS`] readings (a millisecond or two of commits
    /// held back, less than the hand-over costs; a gateway at a modest rate never wakes the seal thread); a part
    /// beyond that goes to the seal thread and this thread goes on committing until it comes back
    /// ([`Worker::part_done`]). With nothing ready left, the seal ends.
    fn next_part(&mut self) {
        // Readings sealed here in this call: once they and the next part would pass OFFLOAD_ROWS, the part goes to
        // the seal thread (small parts, after a small transaction budget or halvings for space, would otherwise
        // be sealed back to back with no commit between them).
        let mut in_place = 0u64;
        loop {
            let max_rows = self.max_part_rows();
            let res = match self.buffer.seal_begin(
                self.seal_upto,
                max_rows,
                &self.batch,
                self.order.rules(),
                fieldlink_ops::unix_ms(),
            ) {
                Ok(Begun::Job(job)) => {
                    if in_place + job.rows() > OFFLOAD_ROWS {
                        let encoder = self.send_out(max_rows);
                        self.sealer
                            .jobs
                            .send((job, encoder))
                            .expect("the seal thread stopped (it panicked)");
                        return;
                    }
                    in_place += job.rows();
                    let sealed = job.run(self.encoder());
                    if self.part_written(sealed, max_rows) {
                        continue;
                    }
                    return;
                }
                Ok(Begun::Idle(report)) => Ok(report),
                Err(e) => Err(e),
            };
            self.part_result(res, max_rows);
            self.after_part();
            return;
        }
    }

    /// Whether a part is out on the seal thread.
    fn part_out(&self) -> bool {
        matches!(self.part, Part::Out { .. })
    }

    /// The encoder, here while no part is out.
    fn encoder(&mut self) -> &mut Encoder {
        match &mut self.part {
            Part::Home(encoder) => encoder,
            Part::Out { .. } => unreachable!("a part is sealed here only while none is out"),
        }
    }

    /// A part of at most `max_rows` readings leaves for the seal thread: the encoder goes with it.
    fn send_out(&mut self, max_rows: usize) -> Encoder {
        let out = Part::Out {
            since: Instant::now(),
            max_rows,
        };
        match std::mem::replace(&mut self.part, out) {
            Part::Home(encoder) => encoder,
            Part::Out { .. } => unreachable!("one part out at a time"),
        }
    }

    /// The part out came back with the encoder: the readings it could take at most.
    fn part_back(&mut self, encoder: Encoder) -> usize {
        match std::mem::replace(&mut self.part, Part::Home(encoder)) {
            Part::Out { max_rows, .. } => max_rows,
            Part::Home(_) => unreachable!("a part comes back only when one is out"),
        }
    }

    /// A part came back from the seal thread: writes it, then goes on with the next part.
    fn part_done(&mut self, sealed: Sealed, encoder: Encoder) {
        let max_rows = self.part_back(encoder);
        if self.part_written(sealed, max_rows) {
            self.next_part();
        }
    }

    /// Writes a sealed part that could take at most `max_rows` readings and counts it; whether the seal goes on
    /// with another part.
    fn part_written(&mut self, sealed: Sealed, max_rows: usize) -> bool {
        let res = self.buffer.seal_finish(sealed);
        let more = self.part_result(res, max_rows);
        // After every part, not only at the end of a seal: a large backlog takes many parts, and alarm statuses
        // and metrics should not wait for the last.
        self.after_part();
        self.give_back.tick();
        more
    }

    /// Seals everything committed, on this thread (a flush, the shutdown): the part out is waited for first.
    fn seal_all(&mut self) {
        self.advance_intake_clock();
        if self.part_out() {
            let (sealed, encoder) = *self
                .sealer
                .done
                .recv()
                .expect("the seal thread stopped (it panicked)");
            let max_rows = self.part_back(encoder);
            self.part_written(sealed, max_rows);
        }
        self.advance_ready(true);
        loop {
            let max_rows = self.max_part_rows();
            let Part::Home(encoder) = &mut self.part else {
                unreachable!("the part out came back above")
            };
            let res = self.buffer.seal(
                self.ready_id,
                max_rows,
                encoder,
                &self.batch,
                self.order.rules(),
                fieldlink_ops::unix_ms(),
            );
            if !self.part_result(res, max_rows) {
                break;
            }
        }
        self.after_part();
    }

    /// Counts the outcome of one part of a seal that took at most `max_rows`; whether the seal goes on (it ends
    /// with a part that found nothing ready, or with an error, retried at a later tick: after the probe when it failed on a lock or a full disk).
    fn part_result(&mut self, res: Result<SealReport, BufferError>, max_rows: usize) -> bool {
        match &res {
            // A seal that failed on a full disk and can still be halved tries again, smaller, at the next tick
            // (from 20,000 rows to 1 in ~3 s); the probe's wait starts once it cannot.
            Err(e) if e.class() == ErrorClass::Full && max_rows > 1 => {}
            Err(e) => self.note_write(Some(e.class())),
            Ok(r) if r.rows > 0 || r.batches > 0 || r.alarm_events > 0 => self.note_write(None),
            // Found nothing to write: says nothing of the lock.
            Ok(_) => {}
        }
        let full_size = self.full_part_rows();
        match res {
            Ok(r) if r.rows == 0 => {
                self.seal_error = None;
                if r.alarm_events > 0 || r.batches > 0 {
                    // The stale clock raised alarms, or the clock closed a silent series' windows: send them now.
                    self.sealed.notify_one();
                }
                false
            }
            Ok(r) => {
                self.seal_error = None;
                self.seal_rows = self.seal_rows.saturating_mul(2).min(full_size);
                tracing::debug!(
                    rows = r.rows,
                    batches = r.batches,
                    readings = r.readings,
                    "sealed"
                );
                if r.batches > 0 || r.alarm_events > 0 {
                    self.sealed.notify_one();
                }
                // A seal takes whole groups: fewer rows than `max_rows` does not mean none is left. The seal ends
                // with a part that found nothing ready.
                true
            }
            Err(e) => {
                self.metrics.buffer_errors.inc();
                tracing::error!(error = %e, rows = max_rows, "sealing failed; retried");
                if e.class() == ErrorClass::Full {
                    // A seal writes its records before it deletes the rows: on a full disk, seal less at a
                    // time (and under drop_oldest free the space of the records it would write).
                    self.seal_rows = (max_rows / 2).max(1);
                    self.buffer.release_wal();
                    if self.cfg.overflow == OverflowPolicy::DropOldest {
                        self.drop_for(
                            self.buffer
                                .stats()
                                .unsealed_bytes
                                .min(max_rows as u64 * super::ROW_BYTES * 4),
                        );
                    }
                }
                self.seal_error = Some(format!("sealing fails: {e}"));
                false
            }
        }
    }

    /// After each part of a seal (and after a seal that found nothing ready: the stale clock may have raised
    /// alarms): alarm metrics and statuses, the cap, the metrics.
    fn after_part(&mut self) {
        self.alarm_events();
        self.enforce_cap();
        self.publish();
    }

    /// Counts the alarm events the seals committed and posts their statuses (only after the commit).
    fn alarm_events(&mut self) {
        let events = self.buffer.take_alarm_events();
        if events.is_empty() {
            return;
        }
        for e in &events {
            self.metrics.alarm_events(&e.rule, &e.to.name).inc();
            tracing::info!(rule = %e.rule, series = %e.series.key, from = %e.from.name, to = %e.to.name, ts_ms = e.ts_ms, rule_seq = e.rule_seq, "alarm");
        }
        let Some((board, prefix)) = &self.status else {
            return;
        };
        for e in events {
            if !self
                .buffer
                .alarms()
                .rules()
                .iter()
                .any(|r| r.name == e.rule && r.publish)
            {
                continue;
            }
            board.post(
                status::topic(prefix, &e.rule, &e.series),
                status::payload(
                    &e.rule,
                    &e.series,
                    e.to.severity,
                    &e.to.name,
                    e.ts_ms,
                    e.rule_seq,
                    e.cause.as_ref(),
                ),
            );
        }
    }

    /// At start: the committed status of every `(rule, series)` pair the buffer knows.
    fn post_all_statuses(&mut self) {
        let Some((board, prefix)) = self.status.clone() else {
            return;
        };
        let pairs: Vec<(usize, i64, u8, i64, u64)> = self
            .buffer
            .alarms()
            .states()
            .map(|(&(r, sid), st)| (r, sid, st.level, st.since_ms, st.seq))
            .collect();
        for (r, sid, level, since, seq) in pairs {
            let rule = self.buffer.alarms().rules()[r].clone();
            if !rule.publish {
                continue;
            }
            let Ok(Some(series)) = self.buffer.series(sid) else {
                continue;
            };
            board.post(
                status::topic(&prefix, &rule.name, &series),
                status::payload(
                    &rule.name,
                    &series,
                    level,
                    rule.level_name(level),
                    since,
                    seq,
                    None,
                ),
            );
        }
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
        m.alarm_late_skipped
            .add(l.alarm_late_skipped - p.alarm_late_skipped);
        m.alarm_records_pending
            .set(self.buffer.alarm_records_pending() as i64);
        m.window_derived.add(l.window_derived - p.window_derived);
        m.window_withheld.add(l.window_withheld - p.window_withheld);
        self.published = l;
        if !self.buffer.sealing() {
            // The engines are with the seal thread while a part is out: their figures wait for it.
            m.alarms_active.set(self.buffer.alarms().active() as i64);
            let (c, pc) = (self.buffer.windows().counts(), self.published_windows);
            m.window_late.add(c.late - pc.late);
            m.window_overflow.add(c.overflow - pc.overflow);
            m.window_idle_closed.add(c.idle_closed - pc.idle_closed);
            m.windows_open
                .set(self.buffer.windows().open_windows() as i64);
            self.published_windows = c;
        }
        let s = self.buffer.stats();
        m.unsealed_readings.set(s.unsealed_readings as i64);
        m.pending_batches.set(s.pending_batches as i64);
        m.pending_readings.set(s.pending_readings as i64);
        m.buffered_bytes.set(s.bytes() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldlink_proto::{Quality, Series, Value};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    fn reading(key: String, ts_ms: i64) -> NewReading {
        NewReading {
            series: Series::new(key).into(),
            ts_ms,
            value: Value::F64(ts_ms as f64),
            quality: Quality::Good,
        }
    }

    /// A worker on `dir/b.db` and its handle (no thread: the tests turn its loop).
    fn new_worker(dir: &std::path::Path) -> (Worker, BufferHandle) {
        let cfg: BufferConfig = toml::from_str(&format!(
            "path = {:?}\ndurability = \"normal\"",
            dir.join("b.db").display().to_string()
        ))
        .unwrap();
        let metrics = AgentMetrics::new(fieldlink_ops::metrics::Registry::new());
        worker(
            &cfg,
            &BatchConfig::default(),
            &OrderConfig::default(),
            "edge-1",
            metrics,
            (&AlarmsConfig::default(), &WindowsConfig::default()),
            None,
        )
        .unwrap()
    }

    /// A worker whose buffer another connection holds locked (`BEGIN EXCLUSIVE`, as a `sqlite3` left open), with
    /// SQLite's busy timeout shortened to 100 ms (each failed attempt takes this long); the locking connection.
    fn worker_under_lock(dir: &std::path::Path) -> (Worker, BufferHandle, rusqlite::Connection) {
        let (w, handle) = new_worker(dir);
        let other = lock_out(&w, dir);
        (w, handle, other)
    }

    /// Another connection's lock on `w`'s buffer, `dir/b.db` (`BEGIN EXCLUSIVE`), with `w`'s busy timeout shortened
    /// to 100 ms; the locking connection (dropping it frees the lock).
    fn lock_out(w: &Worker, dir: &std::path::Path) -> rusqlite::Connection {
        w.buffer
            .conn
            .busy_timeout(Duration::from_millis(100))
            .unwrap();
        let other = rusqlite::Connection::open(dir.join("b.db")).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        other
    }

    /// Commits one-reading groups (series `dev{i}/m` at `i` ms for each `i` of `range`) straight to `w`'s buffer,
    /// ready to seal.
    fn commit_ready(w: &mut Worker, range: std::ops::Range<i64>) {
        let readings: Vec<NewReading> = range.map(|i| reading(format!("dev{i}/m"), i)).collect();
        w.buffer.append(readings.chunks(1)).unwrap();
        w.ready_id = w.buffer.last_row_id();
    }

    /// A worker under another connection's lock ([`worker_under_lock`]) holding a Modbus poll's commit on it, its
    /// handle and that connection.
    fn poll_held_on_the_lock(
        dir: &std::path::Path,
    ) -> (Worker, BufferHandle, rusqlite::Connection) {
        let (mut w, handle, other) = worker_under_lock(dir);
        queue_poll(&handle, vec![reading("plc/x".into(), 1)]);
        let linger = Duration::from_secs(3600);
        let mut next_seal = Instant::now() + linger;
        assert!(w.step(&mut next_seal, linger));
        assert!(w.held.as_ref().is_some_and(|h| h.locked));
        (w, handle, other)
    }

    /// Queues a Modbus poll's readings: no acknowledgement, no other copy.
    fn queue_poll(handle: &BufferHandle, readings: Vec<NewReading>) {
        handle
            .data
            .try_send(Append {
                readings,
                refused: None,
                ack: None,
            })
            .unwrap();
    }

    /// [`commit_ready`], sealed; the sequence numbers of the records, fetched (in flight, as the sender holds them).
    fn sealed_and_fetched(w: &mut Worker, range: std::ops::Range<i64>) -> Vec<u64> {
        commit_ready(w, range);
        w.seal_all();
        w.buffer
            .pending(100, usize::MAX)
            .unwrap()
            .iter()
            .map(|p| p.seq)
            .collect()
    }

    /// A worker with a backlog of several seal parts, ready now; returns the backlog's size.
    fn worker_with_backlog(dir: &std::path::Path) -> (Worker, BufferHandle, u64) {
        let (mut w, handle) = new_worker(dir);
        // More than one part whatever limits the part (2 × max(max_readings, 10,000) readings, or the
        // transaction budget): whole groups of 8192 at most, so at least three parts.
        let n = 3 * w.batch.max_readings.max(10_000) * 2;
        let backlog: Vec<NewReading> = (0..n)
            .map(|i| reading(format!("dev{}/m", i % 50), i as i64))
            .collect();
        w.buffer.append(backlog.chunks(1000)).unwrap();
        w.ready_id = w.buffer.last_row_id();
        (w, handle, n as u64)
    }

    /// Queues `n` one-reading appends; returns the count of their acknowledgements.
    fn queue_appends(handle: &BufferHandle, n: usize) -> Arc<AtomicUsize> {
        let committed = Arc::new(AtomicUsize::new(0));
        for k in 0..n {
            let c = committed.clone();
            handle
                .data
                .try_send(Append {
                    readings: vec![reading(format!("late{k}/m"), 1)],
                    refused: None,
                    ack: Some(Ack {
                        on_commit: Box::new(move || {
                            c.fetch_add(1, Ordering::SeqCst);
                        }),
                        cancelled: Arc::new(AtomicBool::new(false)),
                    }),
                })
                .unwrap();
        }
        committed
    }

    /// The first part of a seal, taken as [`Worker::next_part`] takes it, but kept by the test instead of going
    /// to the seal thread.
    fn hold_first_part(w: &mut Worker) -> (Box<SealJob>, Encoder) {
        let max_rows = w.max_part_rows();
        w.seal_upto = w.ready_id;
        match w
            .buffer
            .seal_begin(
                w.ready_id,
                max_rows,
                &w.batch,
                w.order.rules(),
                fieldlink_ops::unix_ms(),
            )
            .unwrap()
        {
            Begun::Job(job) => (job, w.send_out(max_rows)),
            Begun::Idle(_) => panic!("the backlog is ready"),
        }
    }

    /// The buffer thread's view of one seal part's run on the seal thread.
    fn run_part(w: &mut Worker, (job, mut encoder): (Box<SealJob>, Encoder)) {
        let sealed = job.run(&mut encoder);
        w.part_done(sealed, encoder);
    }

    /// An acknowledgement whose deletion fails on another process's lock answers after one attempt (it was retried
    /// in place for 30 s, and the sender and a stop behind it waited: a stop under a lock took over 30 s). Kinesis
    /// has the records: they are not fetched again, the loop's retries wait for the lock's probe and fail while the
    /// lock stays, and once a write goes through the delete follows at once, counted sent.
    #[test]
    fn an_acknowledgement_under_a_lock_answers_at_once_and_the_loop_deletes_its_records_later() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, handle) = new_worker(dir.path());
        let seqs = sealed_and_fetched(&mut w, 0..4);
        let records = seqs.len() as u64;
        assert!(records > 0);

        let other = lock_out(&w, dir.path());
        let t0 = Instant::now();
        let (reply, mut rx) = oneshot::channel();
        w.control(Control::Ack { seqs, reply });
        assert!(rx.try_recv().is_ok(), "answered");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "one attempt, not a retry loop: {:?}",
            t0.elapsed()
        );
        assert_eq!(
            w.buffer.stats().pending_batches,
            records,
            "still in the file"
        );
        assert!(
            w.buffer.pending(100, usize::MAX).unwrap().is_empty(),
            "Kinesis has them: not fetched again"
        );
        assert!(
            w.problem()
                .is_some_and(|p| p.starts_with(&format!("{records} records Kinesis acknowledged"))),
            "/health says so: {:?}",
            w.problem()
        );

        // The retry waits for the lock's probe, which the failed delete set.
        let probe = w.write_probe.as_ref().expect("the delete met the lock").0;
        let retry = w.undeleted_retry.as_ref().unwrap().0;
        assert_eq!(w.undeleted_due_at(), Some(retry.max(probe)));
        w.undeleted_retry.as_mut().unwrap().0 = Instant::now();
        assert!(
            w.undeleted_due_at().unwrap() >= probe,
            "not before the probe"
        );

        // Both due while the lock stays: one attempt, which fails and sets the next.
        let linger = Duration::from_secs(3600);
        let mut next_seal = Instant::now() + linger;
        w.write_probe.as_mut().unwrap().0 = Instant::now();
        assert!(w.step(&mut next_seal, linger));
        assert_eq!(w.buffer.stats().pending_batches, records, "the lock stays");
        assert!(
            w.undeleted_retry.as_ref().unwrap().0 > Instant::now(),
            "retried later"
        );

        // The lock goes; the first write that goes through (a poll's commit) makes the delete due at once, in the
        // same turn (under backpressure the records would keep intake paused until deleted).
        drop(other);
        queue_poll(&handle, vec![reading("plc/x".into(), 9)]);
        assert!(w.step(&mut next_seal, linger));
        assert!(w.held.is_none(), "the poll committed");
        assert_eq!(
            w.buffer.stats().pending_batches,
            0,
            "deleted once the lock went"
        );
        assert_eq!(w.metrics.records_sent.get(), records);
        assert!(w.undeleted_retry.is_none() && !w.buffer.has_undeleted());
        assert_eq!(w.problem(), None);
    }

    /// Acknowledged records whose delete met another process's lock: the drain's count (`Left`) tries the delete
    /// first, and so does the close, once the lock's probe is due; a seal that finds nothing to write says nothing
    /// of the lock (it kept clearing the probe).
    #[test]
    fn the_count_and_the_close_try_a_waiting_delete_first() {
        let dir = tempfile::tempdir().unwrap();
        let acked_under_lock = |w: &mut Worker, readings| {
            let seqs = sealed_and_fetched(w, readings);
            let other = lock_out(w, dir.path());
            let (reply, _rx) = oneshot::channel();
            w.control(Control::Ack { seqs, reply });
            assert!(w.buffer.has_undeleted() && w.write_probe.is_some());
            // A tick with nothing to seal leaves the probe as it is.
            w.seal_tick();
            assert!(w.write_probe.is_some(), "an empty seal cleared the probe");
            drop(other);
        };

        let (mut w, handle) = new_worker(dir.path());
        acked_under_lock(&mut w, 0..2);
        let (reply, mut rx) = oneshot::channel();
        w.control(Control::Left { reply });
        let left = rx.try_recv().unwrap().unwrap();
        assert_eq!((left.acknowledged_undeleted, left.pending_batches), (0, 0));

        acked_under_lock(&mut w, 2..4);
        w.write_probe.as_mut().unwrap().0 = Instant::now();
        drop(handle);
        let linger = Duration::from_secs(3600);
        let mut next_seal = Instant::now() + linger;
        assert!(!w.step(&mut next_seal, linger), "closed");
        assert_eq!(w.buffer.stats().pending_batches, 0);
        assert!(!w.buffer.has_undeleted());
    }

    /// A close while the lock that failed an acknowledgement's delete is still held, its probe not due, tries no
    /// delete (it would wait out the busy timeout, 5 s more of the stop): the records stay, and the next start
    /// sends them again under the same identity. (Keyed on the final seal's error before, which a seal that found
    /// nothing to write left clear.)
    #[test]
    fn a_close_under_the_lock_tries_no_delete_before_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, handle) = new_worker(dir.path());
        let seqs = sealed_and_fetched(&mut w, 0..2);
        let _other = lock_out(&w, dir.path());
        let (reply, _rx) = oneshot::channel();
        w.control(Control::Ack { seqs, reply });
        assert!(w
            .write_probe
            .as_ref()
            .is_some_and(|(at, _)| *at > Instant::now()));
        let errors = w.metrics.buffer_errors.get();
        drop(handle);
        let linger = Duration::from_secs(3600);
        let mut next_seal = Instant::now() + linger;
        assert!(!w.step(&mut next_seal, linger), "closed");
        assert_eq!(w.metrics.buffer_errors.get(), errors, "no delete tried");
        assert!(w.buffer.has_undeleted());
    }

    /// A close after an acknowledgement's delete failed on a full disk, its probe not due, still tries the delete
    /// (on a full disk a write fails at once, no busy timeout to wait out): here the disk has room again and the
    /// records go, instead of being sent again at the next start.
    #[test]
    fn a_close_after_a_delete_failed_on_a_full_disk_tries_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, handle) = new_worker(dir.path());
        let seqs = sealed_and_fetched(&mut w, 0..2);
        w.buffer.fault = Some(rusqlite::ffi::SQLITE_FULL);
        let (reply, _rx) = oneshot::channel();
        w.control(Control::Ack { seqs, reply });
        assert!(w.buffer.has_undeleted());
        assert!(w.writes_wait(Instant::now()) && !w.lock_waits(Instant::now()));
        drop(handle);
        let linger = Duration::from_secs(3600);
        let mut next_seal = Instant::now() + linger;
        assert!(!w.step(&mut next_seal, linger), "closed");
        assert!(!w.buffer.has_undeleted(), "deleted at the close");
        assert_eq!(w.buffer.stats().pending_batches, 0);
    }

    /// A seal tick that failed on another process's lock, with no commit held, keeps the next ticks from trying
    /// until the lock's probe (each attempt waits out the busy timeout: back to back, control was served, then a
    /// tick, and appends never got a turn); appends are taken meanwhile, and once a write goes through the ticks
    /// seal again.
    #[test]
    fn a_seal_that_failed_on_a_lock_waits_for_the_probe_and_appends_get_their_turn() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, handle) = new_worker(dir.path());
        commit_ready(&mut w, 0..4);
        let other = lock_out(&w, dir.path());
        let errors = |w: &Worker| w.metrics.buffer_errors.get();
        let linger = Duration::from_secs(3600);

        let mut due = Instant::now();
        assert!(w.step(&mut due, linger));
        assert_eq!(errors(&w), 1, "the tick's seal failed on the lock");
        assert!(w.writes_wait(Instant::now()));

        // Ticks due again and again: none tries before the probe; the queued poll is taken and held on the lock.
        queue_poll(&handle, vec![reading("plc/x".into(), 9)]);
        // A ping queued before each turn, as the agent's watchdog and the sender's fetches keep it.
        for _ in 0..3 {
            let (reply, _rx) = oneshot::channel();
            handle.ctl.try_send(Control::Ping { reply }).unwrap();
            let mut due = Instant::now();
            assert!(w.step(&mut due, linger));
        }
        assert_eq!(errors(&w), 1, "no tick tried");
        let mut due = Instant::now();
        assert!(w.step(&mut due, linger));
        assert_eq!(errors(&w), 2, "one more error: the poll's commit");
        assert!(w.held.as_ref().is_some_and(|h| h.locked));

        drop(other);
        w.held.as_mut().unwrap().retry_at = Instant::now();
        let mut due = Instant::now();
        assert!(w.step(&mut due, linger));
        assert!(
            w.held.is_none() && w.write_probe.is_none(),
            "the commit went in"
        );
        let mut due = Instant::now();
        assert!(w.step(&mut due, linger));
        let stats = w.buffer.stats();
        assert_eq!(
            (stats.pending_readings, stats.unsealed_readings),
            (4, 1),
            "sealed again (the poll waits its reorder window)"
        );
    }

    /// A seal that failed on a full disk (another process filled it) tries again at the next tick with half the
    /// rows, down to one; then the next ticks wait for the probe (each failed again at once and logged, ten lines a
    /// second into the full disk's journal). At the probe the tick seals again, and a write that goes through ends
    /// the wait.
    #[test]
    fn a_seal_that_failed_on_a_full_disk_halves_then_waits_for_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _handle) = new_worker(dir.path());
        commit_ready(&mut w, 0..4);
        let errors = |w: &Worker| w.metrics.buffer_errors.get();
        let linger = Duration::from_secs(3600);
        let first = w.max_part_rows();
        assert!(first > 1);
        while !w.writes_wait(Instant::now()) {
            assert!(
                errors(&w) < 20,
                "no probe after {} failed seals",
                errors(&w)
            );
            w.buffer.fault = Some(rusqlite::ffi::SQLITE_FULL);
            let mut due = Instant::now();
            assert!(w.step(&mut due, linger));
        }
        assert_eq!(w.max_part_rows(), 1, "halved to one row before the wait");
        let mut sizes = vec![first];
        while sizes[sizes.len() - 1] > 1 {
            sizes.push(sizes[sizes.len() - 1] / 2);
        }
        assert_eq!(
            errors(&w),
            sizes.len() as u64,
            "one failed seal per size: {sizes:?}"
        );
        let failed = errors(&w);
        w.buffer.fault = Some(rusqlite::ffi::SQLITE_FULL);
        for _ in 0..3 {
            let mut due = Instant::now();
            assert!(w.step(&mut due, linger));
        }
        assert_eq!(errors(&w), failed, "no tick tried before the probe");
        assert_eq!(w.buffer.stats().unsealed_readings, 4);

        w.buffer.fault = None;
        w.write_probe.as_mut().unwrap().0 = Instant::now();
        let mut due = Instant::now();
        assert!(w.step(&mut due, linger));
        let stats = w.buffer.stats();
        assert_eq!((stats.pending_readings, stats.unsealed_readings), (4, 0));
        assert!(w.write_probe.is_none(), "the seal went through: no wait");
    }

    /// The window rules' intake clock stands still while the agent takes no readings, whatever the wall clock.
    #[test]
    fn the_intake_clock_stands_still_while_intake_is_paused() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = IntakeClock::new(t0, s(2));
        assert_eq!(c.advance(t0 + s(1), true), 1000);
        assert_eq!(c.advance(t0 + s(3601), false), 1000, "an hour paused");
        assert_eq!(c.advance(t0 + s(3602), true), 2000);
        assert_eq!(c.advance(t0 + s(3602), true), 2000);
        // The buffer thread away from its loop for a minute (a retried deletion): at most one step counts.
        assert_eq!(c.advance(t0 + s(3662), true), 4000);
        // A connection down holds it for an hour from when it was first seen down, then says so once.
        assert_eq!(c.link_holds(t0 + s(4000), true), (true, false));
        assert_eq!(c.link_holds(t0 + s(7599), true), (true, false));
        assert_eq!(c.link_holds(t0 + s(7600), true), (false, true));
        assert_eq!(c.link_holds(t0 + s(7601), true), (false, false));
        assert_eq!(c.link_holds(t0 + s(7602), false), (false, false));
        assert_eq!(c.link_holds(t0 + s(7603), true), (true, false));
    }

    /// While a part of a seal is out on the seal thread, appends are committed and acknowledged (the seal used to
    /// run on the buffer thread and hold every commit back for a part's length); they are newer than what was
    /// ready, so this seal does not take them, and the whole backlog still gets sealed, once.
    #[test]
    fn appends_are_committed_while_a_seal_part_is_out_and_not_sealed_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, handle, n) = worker_with_backlog(dir.path());
        let job = hold_first_part(&mut w);
        assert!(job.0.rows() < n, "the backlog takes several parts");
        let committed = queue_appends(&handle, 5);
        let linger = Duration::from_secs(3600);
        let mut next_seal = Instant::now() + linger;
        assert!(w.step(&mut next_seal, linger));
        assert_eq!(
            committed.load(Ordering::SeqCst),
            5,
            "queued appends acknowledged"
        );
        assert!(w.buffer.sealing(), "...while the part was out");
        // The part comes back; the next ones go to the seal thread.
        run_part(&mut w, job);
        while w.buffer.sealing() {
            assert!(w.step(&mut next_seal, linger));
        }
        let stats = w.buffer.stats();
        assert_eq!(
            stats.unsealed_readings, 5,
            "only the queued appends are left unsealed"
        );
        assert_eq!(stats.pending_readings, n, "the whole backlog sealed once");
        assert_eq!(w.buffer.ledger().appended, n + 5);
        assert_eq!(
            w.buffer.ledger().deduplicated,
            0,
            "no part was sealed twice"
        );
    }

    /// A part whose transaction fails after appends were committed while it was out: nothing of it is kept (its
    /// groups stay, the dedup states and engines are the committed ones), the error shows in `/health`, and the
    /// next seal seals the backlog exactly once. A flush while a part is out waits for it, then seals the rest.
    #[test]
    fn a_part_that_fails_after_commits_during_it_is_sealed_again_once_and_a_flush_waits_for_the_part_out(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, handle, n) = worker_with_backlog(dir.path());
        let job = hold_first_part(&mut w);
        let committed = queue_appends(&handle, 5);
        let linger = Duration::from_secs(3600);
        let mut next_seal = Instant::now() + linger;
        assert!(w.step(&mut next_seal, linger));
        assert_eq!(committed.load(Ordering::SeqCst), 5);
        w.buffer.fault = Some(rusqlite::ffi::SQLITE_IOERR);
        run_part(&mut w, job);
        assert!(!w.buffer.sealing());
        assert!(w.problem().is_some_and(|p| p.contains("sealing fails")));
        let stats = w.buffer.stats();
        assert_eq!(
            (stats.unsealed_readings, stats.pending_readings),
            (n + 5, 0)
        );

        // The next tick sends the first part to the seal thread; a flush then waits for it and seals everything.
        w.seal_tick();
        assert!(w.buffer.sealing());
        let (reply, mut rx) = oneshot::channel();
        w.control(Control::Flush { reply });
        assert!(rx.try_recv().is_ok(), "the flush answered");
        assert!(!w.buffer.sealing());
        assert_eq!(w.problem(), None);
        let stats = w.buffer.stats();
        assert_eq!(
            (stats.unsealed_readings, stats.pending_readings),
            (0, n + 5)
        );
        let ledger = w.buffer.ledger();
        assert_eq!((ledger.appended, ledger.deduplicated), (n + 5, 0));
    }

    /// At its cap the buffer says so in `/health`: what `drop_oldest` dropped (for a minute after the last drop),
    /// or that `backpressure` paused intake (while over the cap).
    #[test]
    fn at_its_cap_the_buffer_reports_drops_or_paused_intake() {
        for policy in [OverflowPolicy::DropOldest, OverflowPolicy::Backpressure] {
            let dir = tempfile::tempdir().unwrap();
            let (mut w, _handle, _) = worker_with_backlog(dir.path());
            let (reply, _rx) = oneshot::channel();
            w.control(Control::Flush { reply });
            assert_eq!(w.problem(), None, "{policy:?}: under the cap");
            w.cfg.overflow = policy;
            w.cfg.max_bytes = w.buffer.stats().bytes() / 2;
            assert!(!w.accepting() || policy == OverflowPolicy::DropOldest);
            w.enforce_cap();
            let problem = w.problem().unwrap_or_default();
            match policy {
                OverflowPolicy::DropOldest => {
                    let dropped = w.buffer.ledger().dropped;
                    assert!(dropped > 0);
                    assert!(
                        problem.contains(&format!("dropped {dropped} readings")),
                        "{problem}"
                    );
                    w.dropped = w.dropped.map(|(_, n)| (Instant::now() - DROPS_SHOWN, n));
                    assert_eq!(w.problem(), None, "shown for a minute after the last drop");
                }
                OverflowPolicy::Backpressure => {
                    assert!(problem.contains("intake paused"), "{problem}");
                    w.cfg.max_bytes *= 4;
                    assert_eq!(w.problem(), None, "back under the cap");
                }
            }
        }
    }

    /// A part of at most [`OFFLOAD_ROWS`] readings is sealed on the buffer thread at once (no hand-over); a larger
    /// one goes to the seal thread.
    #[test]
    fn a_small_part_is_sealed_in_place_and_a_large_one_on_the_seal_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _handle, n) = worker_with_backlog(dir.path());
        w.seal_tick();
        assert!(w.buffer.sealing(), "a large part went to the seal thread");
        let (reply, _rx) = oneshot::channel();
        w.control(Control::Flush { reply });
        let small: Vec<NewReading> = (0..100).map(|i| reading("small/m".into(), i)).collect();
        w.buffer.append([small.as_slice()]).unwrap();
        w.ready_id = w.buffer.last_row_id();
        w.seal_tick();
        assert!(!w.buffer.sealing(), "the small part was sealed in place");
        assert_eq!(w.buffer.stats().pending_readings, n + 100);
        assert_eq!(
            w.buffer.ledger().deduplicated,
            0,
            "no part was sealed twice"
        );
    }

    /// Small parts (here one group of 1,000 readings each, as after halvings for disk space) are sealed in place
    /// only up to [`OFFLOAD_ROWS`] readings in a row; the next one goes to the seal thread, so commits get their
    /// turn.
    #[test]
    fn small_parts_in_a_row_go_to_the_seal_thread_past_the_offload_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _handle, n) = worker_with_backlog(dir.path());
        w.seal_rows = 1000;
        w.seal_tick();
        assert!(w.buffer.sealing(), "a part went to the seal thread");
        let sealed_in_place = w.buffer.stats().pending_readings;
        assert!(sealed_in_place > 0 && sealed_in_place <= OFFLOAD_ROWS);
        let (reply, _rx) = oneshot::channel();
        w.control(Control::Flush { reply });
        assert_eq!(w.buffer.stats().pending_readings, n);
        assert_eq!(
            w.buffer.ledger().deduplicated,
            0,
            "no part was sealed twice"
        );
    }

    /// Another process holds the buffer's write lock (a backup tool, `sqlite3` left open) over the stop, with a
    /// Modbus poll's readings (no acknowledgement: no other copy) in a commit that failed on it. The close waits
    /// for the lock instead of giving the readings up (it did before December 2026), but not for good.
    #[test]
    fn the_close_retries_a_commit_held_by_another_processs_lock_for_a_bounded_time() {
        for lock_freed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (mut w, handle, other) = worker_under_lock(dir.path());
            for k in 0..3 {
                queue_poll(
                    &handle,
                    vec![reading(format!("plc/r{k}"), 1), reading("plc/x".into(), k)],
                );
            }
            let linger = Duration::from_secs(3600);
            let mut next_seal = Instant::now() + linger;
            assert!(w.step(&mut next_seal, linger));
            assert!(w.held.is_some(), "the commit failed on the lock");
            // Queued behind the held group: a Modbus poll (kept), and an MQTT message whose connection stopped
            // waiting (dropped: the broker delivers it again; never committed, never acknowledged).
            queue_poll(&handle, vec![reading("plc/behind".into(), 1)]);
            let acked = Arc::new(AtomicBool::new(false));
            let on_commit = acked.clone();
            handle
                .data
                .try_send(Append {
                    readings: vec![reading("mqtt/gone".into(), 1)],
                    refused: None,
                    ack: Some(Ack {
                        on_commit: Box::new(move || on_commit.store(true, Ordering::SeqCst)),
                        cancelled: Arc::new(AtomicBool::new(true)),
                    }),
                })
                .unwrap();
            drop(handle);
            let t0 = Instant::now();
            if lock_freed {
                let freer = std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(1));
                    other.execute_batch("COMMIT").unwrap();
                });
                while w.step(&mut next_seal, linger) {}
                freer.join().unwrap();
                let stats = w.buffer.stats();
                assert_eq!(
                    (stats.unsealed_readings, stats.pending_readings),
                    (0, 7),
                    "committed once the lock was freed, then sealed"
                );
                assert_eq!(w.buffer.ledger().appended, 7);
                assert!(!acked.load(Ordering::SeqCst), "the stopped MQTT message");
                assert!(t0.elapsed() >= Duration::from_millis(900));
            } else {
                w.commit_at_close(Instant::now() + Duration::from_millis(500));
                assert!(
                    t0.elapsed() < Duration::from_secs(2),
                    "the close gave up at its deadline: {:?}",
                    t0.elapsed()
                );
                assert!(w.held.is_none());
                assert!(w.data.is_empty(), "the queue was given up too");
                assert_eq!(w.buffer.stats().unsealed_readings, 0);
                assert_eq!(w.buffer.ledger().appended, 0);
                assert!(!acked.load(Ordering::SeqCst));
                drop(other);
            }
        }
    }

    /// A stop's flush while a commit waits on another process's lock tries no seal (it waited out the busy timeout
    /// on the same lock and failed: 5 s more of every stop under a lock); once the lock goes, the close commits the
    /// poll and seals everything.
    #[test]
    fn a_flush_while_a_commit_waits_on_the_lock_leaves_the_seal_to_the_close() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, handle) = new_worker(dir.path());
        commit_ready(&mut w, 0..1);
        let other = lock_out(&w, dir.path());
        queue_poll(&handle, vec![reading("plc/x".into(), 2)]);
        let linger = Duration::from_secs(3600);
        let mut next_seal = Instant::now() + linger;
        assert!(w.step(&mut next_seal, linger));
        assert!(w.held.as_ref().is_some_and(|h| h.locked));
        assert_eq!(w.metrics.buffer_errors.get(), 1);

        let (reply, mut rx) = oneshot::channel();
        w.control(Control::Flush { reply });
        assert!(rx.try_recv().is_ok(), "answered");
        assert_eq!(w.metrics.buffer_errors.get(), 1, "no seal tried");
        assert_eq!(w.buffer.stats().unsealed_readings, 1);

        drop(other);
        drop(handle);
        assert!(!w.step(&mut next_seal, linger), "closed");
        let stats = w.buffer.stats();
        assert_eq!((stats.unsealed_readings, stats.pending_readings), (0, 2));
    }

    /// A held group holds seal ticks back only while its last attempt failed on another process's lock: once it
    /// waits for disk room instead (or fails otherwise), seals run again, since sealing and sending are what free
    /// room.
    #[test]
    fn a_held_group_holds_seals_back_only_while_it_waits_on_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _handle, other) = poll_held_on_the_lock(dir.path());
        other.execute_batch("COMMIT").unwrap();
        // The lock is gone, and the disk is short of room (more headroom asked than any disk has).
        w.headroom = u64::MAX / 4;
        let held = w.held.take().unwrap();
        w.try_commit(held);
        assert!(
            w.held
                .as_ref()
                .is_some_and(|h| !h.locked && h.why.contains("intake paused")),
            "held for disk room, not the lock"
        );
        w.headroom = 0;
        w.buffer.fault = Some(rusqlite::ffi::SQLITE_IOERR);
        let held = w.held.take().unwrap();
        w.try_commit(held);
        assert!(
            w.held.as_ref().is_some_and(|h| !h.locked),
            "held for an I/O error, not the lock"
        );
    }

    /// A group split down to one message per commit on a full disk goes in parts twice as large each once the disk
    /// has room again: a few commits, not one per message (and one fsync each) while intake waits.
    #[test]
    fn a_group_split_on_a_full_disk_commits_its_rest_in_growing_parts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, handle) = new_worker(dir.path());
        for i in 0..64 {
            queue_poll(&handle, vec![reading(format!("plc/p{i}"), i)]);
        }
        let linger = Duration::from_secs(3600);
        let mut next_seal = Instant::now() + linger;
        w.buffer.fault = Some(rusqlite::ffi::SQLITE_FULL);
        assert!(w.step(&mut next_seal, linger));
        assert_eq!(
            w.held.as_ref().map(|h| h.group.len()),
            Some(64),
            "one group"
        );
        while w.held.as_ref().is_some_and(|h| h.limit > 1) {
            w.buffer.fault = Some(rusqlite::ffi::SQLITE_FULL);
            let held = w.held.take().unwrap();
            w.try_commit(held);
        }
        let mut commits = 0;
        while let Some(held) = w.held.take() {
            commits += 1;
            assert!(commits <= 64);
            w.try_commit(held);
        }
        assert_eq!(w.buffer.stats().unsealed_readings, 64);
        assert_eq!(
            commits, 7,
            "parts of 1, 2, 4, 8, 16, 32 and the last message"
        );
    }

    /// While a commit waits on another process's lock, no seal tick runs, and the window rules' intake clock stands
    /// still: once the lock goes, the first tick does not count the wait as the series' silence (it did: a lock held
    /// longer than `idle_close_ms` closed the windows whose readings were held behind it, and made them late).
    #[test]
    fn the_intake_clock_stands_still_while_a_commit_waits_on_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _handle, other) = poll_held_on_the_lock(dir.path());
        let linger = Duration::from_secs(3600);
        // The last tick was ten minutes ago; the tick due now finds the commit still waiting on the lock.
        w.intake = IntakeClock::new(
            Instant::now() - Duration::from_secs(600),
            Duration::from_secs(3600),
        );
        let mut next_seal = Instant::now();
        assert!(w.step(&mut next_seal, linger));
        assert!(w.held.as_ref().is_some_and(|h| h.locked));
        other.execute_batch("COMMIT").unwrap();
        let held = w.held.take().unwrap();
        w.try_commit(held);
        assert!(w.held.is_none(), "committed once the lock is gone");
        w.seal_tick();
        assert!(
            w.intake.ms < 1000,
            "the wait counted as intake time: {} ms",
            w.intake.ms
        );
    }
}

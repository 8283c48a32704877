//! Wiring: starts every component, waits for the cancellation token, then shuts down in order:
//! sources stop → unsealed readings are sealed → the sender finishes the `PutRecords` call in flight and drains for
//! `shutdown_drain_ms` → the buffer closes.

use crate::buffer::{self, BufferError, BufferHandle, Closed, Left};
use crate::config::Config;
use crate::kinesis::Sender;
use crate::metrics::AgentMetrics;
use fieldlink_ops::http::{BindError, Telemetry};
use fieldlink_ops::metrics::Health;
use fieldlink_ops::systemd::Notifier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The buffer could not be opened (path, permissions, not a buffer).
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// The metrics endpoint could not bind.
    #[error(transparent)]
    Metrics(#[from] BindError),
    /// A drain could not count what the buffer holds.
    #[error("counting what the buffer holds: {0}")]
    Count(String),
    /// A drain found no buffer file (a wrong path, a mount not up): it does not create one.
    #[error("no buffer file at {0} (check [buffer] path, and that its file system is mounted)")]
    NoBuffer(String),
}

/// Runs the agent until `cancel` fires, then shuts down gracefully.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<(), RunError> {
    let Telemetry {
        registry, health, ..
    } = Telemetry::start(cfg.metrics_listen, cancel.clone()).await?;
    let metrics = AgentMetrics::new(registry.clone());

    // The alarm statuses for the local broker, if a connection publishes them.
    let status = cfg
        .alarms
        .publish_connection
        .as_ref()
        .map(|_| crate::alarm::StatusBoard::new());
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    let notifier = Arc::new(Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "systemd notifications off");
        Notifier::default()
    }));
    // Opening checks the whole file (`quick_check`, and a migration of an older one): on an SD card a buffer of
    // gigabytes left by days offline takes minutes, past the unit's TimeoutStartSec.
    let why = format!(
        "opening the buffer {} (checking it)",
        cfg.buffer.path.display()
    );
    // Not ready until it is open: `/health` answers from the start.
    health.set("buffer", false, why.clone());
    let opened = extending_start(&notifier, why, || {
        open_buffer(
            &cfg,
            metrics.clone(),
            (status.clone(), Some(health.clone())),
        )
    });
    let (buffer, buffer_thread) = opened?;
    health.set("buffer", true, "");

    let kinesis = kinesis_client(&cfg).await;
    let mut sender = Sender::new(
        &cfg.kinesis,
        &cfg.agent_id,
        kinesis,
        buffer.clone(),
        metrics.clone(),
        health.clone(),
    );
    let sender_stop = CancellationToken::new();
    let sender_task = {
        let stop = sender_stop.clone();
        tokio::spawn(async move { sender.run(&stop).await })
    };

    let mut sources = JoinSet::new();
    for m in cfg.mqtt.clone() {
        let publishes = cfg.alarms.publish_connection.as_deref() == Some(m.name.as_str());
        sources.spawn(crate::mqtt::run(
            m,
            publishes.then(|| status.clone()).flatten(),
            cfg.agent_id.clone(),
            buffer.clone(),
            registry.clone(),
            health.clone(),
            cancel.clone(),
        ));
    }
    if !cfg.modbus.is_empty() {
        let plans = cfg.modbus.iter().map(crate::modbus::compile).collect();
        sources.spawn(crate::modbus::run(
            plans,
            buffer.clone(),
            registry.clone(),
            health.clone(),
            cancel.clone(),
        ));
    }
    // Runs through the drain too (systemd may keep the watchdog during a stop); ends before the buffer closes,
    // since the buffer thread stops only when every handle is gone.
    let liveness_stop = CancellationToken::new();
    let liveness_task = tokio::spawn(liveness(
        buffer.clone(),
        notifier.clone(),
        health.clone(),
        liveness_interval(notifier.watchdog_timeout()),
        liveness_stop.clone(),
    ));
    tracing::info!(agent_id = %cfg.agent_id, mqtt = cfg.mqtt.len(), modbus = cfg.modbus.len(), watchdog = ?notifier.watchdog_timeout(), "agent running");
    notifier.ready(&format!(
        "running: {} MQTT connection(s), {} Modbus device(s)",
        cfg.mqtt.len(),
        cfg.modbus.len()
    ));

    cancel.cancelled().await;
    // The stop may take the drain deadline plus sealing and closing the buffer: ask systemd for that much.
    notifier.stopping(
        "stopping: sealing and draining the buffer",
        Duration::from_millis(cfg.kinesis.shutdown_drain_ms) + STOP_MARGIN,
    );
    tracing::info!("shutting down: stopping sources");
    while sources.join_next().await.is_some() {}
    let _ = buffer.flush().await;
    // The sender finishes the call in flight and drains for `shutdown_drain_ms` (see `Sender::run`).
    sender_stop.cancel();
    let _ = sender_task.await;
    liveness_stop.cancel();
    let _ = liveness_task.await;
    drop(buffer);
    let _ = tokio::task::spawn_blocking(move || buffer_thread.join()).await;
    tracing::info!(stats = %metrics.pending_batches.get(), "agent stopped; pending batches stay buffered");
    Ok(())
}

/// Opens the configured buffer with the configured rules and starts its thread ([`buffer::spawn_with_rules`]).
fn open_buffer(
    cfg: &Config,
    metrics: AgentMetrics,
    boards: (Option<crate::alarm::StatusBoard>, Option<Health>),
) -> Result<(BufferHandle, std::thread::JoinHandle<()>), BufferError> {
    buffer::spawn_with_rules(
        &cfg.buffer,
        &cfg.batch,
        &cfg.order,
        &cfg.agent_id,
        metrics,
        (&cfg.alarms, &cfg.windows),
        boards,
    )
}

/// The Kinesis client of the sender. The sender retries (only the failed entries, with backoff) and adapts its rate
/// to throttling itself; SDK retries would hide throttling from it.
async fn kinesis_client(cfg: &Config) -> aws_sdk_kinesis::Client {
    let sdk = cfg.aws.sdk_config().await;
    aws_sdk_kinesis::Client::from_conf(
        aws_sdk_kinesis::config::Builder::from(&sdk)
            .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
            .build(),
    )
}

/// `fieldlink-agent drain`, before a buffer file is given up (a gateway re-imaged, replaced or retired, an SD card
/// swapped): with no source running, closes every open window (see [`crate::window::Engine::close_all`]), seals
/// everything unsealed and sends everything sealed, as the stop's drain does, until nothing is left, `timeout`
/// passes, or `cancel` fires (a signal: a `PutRecords` call in flight then is abandoned and its records are sent
/// again by the next run, same identity, which the cloud skips). Returns what the file still holds. The agent
/// must not be running: the buffer's lock refuses a second process.
pub async fn drain(
    cfg: Config,
    timeout: Duration,
    cancel: CancellationToken,
) -> Result<Left, RunError> {
    if !cfg.buffer.path.exists() {
        return Err(RunError::NoBuffer(cfg.buffer.path.display().to_string()));
    }
    let metrics = AgentMetrics::new(fieldlink_ops::metrics::Registry::new());
    let health = Health::new();
    let (buffer, buffer_thread) = open_buffer(&cfg, metrics.clone(), (None, None))?;
    let _ = buffer.flush_closing_windows().await;
    let kinesis = kinesis_client(&cfg).await;
    let kinesis_cfg = crate::kinesis::KinesisConfig {
        shutdown_drain_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
        ..cfg.kinesis.clone()
    };
    let mut sender = Sender::new(
        &kinesis_cfg,
        &cfg.agent_id,
        kinesis,
        buffer.clone(),
        metrics,
        health,
    );
    // Stopped from the start: the sender goes straight to its drain, which sends until the buffer is empty or the
    // deadline.
    let stopped = CancellationToken::new();
    stopped.cancel();
    tokio::select! {
        () = sender.run(&stopped) => {}
        () = cancel.cancelled() => tracing::warn!("drain interrupted"),
    }
    drop(sender);
    let left = buffer.left().await;
    drop(buffer);
    let _ = tokio::task::spawn_blocking(move || buffer_thread.join()).await;
    match left {
        Ok(Ok(left)) => Ok(left),
        Ok(Err(why)) => Err(RunError::Count(why)),
        Err(Closed) => Err(RunError::Count("the buffer thread stopped".into())),
    }
}

/// What a stop may take beyond `shutdown_drain_ms`, asked of systemd (`EXTEND_TIMEOUT_USEC`). Under a lock another
/// process holds over the stop, every buffer transaction waits out SQLite's 5 s busy timeout: a held commit's
/// retry and an acknowledgement's delete under way (5–10 s; the flush seals nothing while a commit waits on the
/// lock), then the close's retry of a held commit (10 s and a last 5 s attempt) and its final seal (5 s); measured
/// 5–10 s with the lock freed during the close.
const STOP_MARGIN: Duration = Duration::from_secs(60);

/// How much longer than its start timeout systemd is asked to wait while start-up work runs, asked again every
/// third of it.
const START_EXTENSION: Duration = Duration::from_secs(30);

/// How long the start time is extended, at most: a disk hung in the kernel would otherwise hold the start for good
/// (an hour checks tens of gigabytes even on an SD card).
const START_EXTENSION_LIMIT: Duration = Duration::from_secs(3600);

/// Runs `work` (blocking) while asking systemd for more start time (`EXTEND_TIMEOUT_USEC`, status `why`), so a
/// long start-up is not killed at TimeoutStartSec at every start, and a backlog never stranded by it.
fn extending_start<T>(notifier: &Arc<Notifier>, why: String, work: impl FnOnce() -> T) -> T {
    notifier.extend_start(&why, START_EXTENSION);
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (notifier, done) = (notifier.clone(), done.clone());
        std::thread::spawn(move || {
            let since = Instant::now();
            loop {
                std::thread::park_timeout(START_EXTENSION / 3);
                if done.load(Ordering::Acquire) {
                    return;
                }
                if since.elapsed() >= START_EXTENSION_LIMIT {
                    tracing::error!(
                        limit_s = START_EXTENSION_LIMIT.as_secs(),
                        "start-up still running; no more start time asked of systemd: {why}"
                    );
                    return;
                }
                notifier.extend_start(&why, START_EXTENSION);
            }
        })
    };
    let out = work();
    done.store(true, Ordering::Release);
    ticker.thread().unpark();
    let _ = ticker.join();
    out
}

/// How often the buffer thread is pinged: often enough that two answered pings fit in half systemd's watchdog
/// timeout, and at least every 5 s for the health endpoint.
fn liveness_interval(watchdog: Option<Duration>) -> Duration {
    let default = Duration::from_secs(5);
    watchdog.map_or(default, |t| {
        (t / 4).clamp(Duration::from_millis(10), default)
    })
}

/// Pings the buffer thread every `interval`. While it answers within `interval` systemd's watchdog is fed and
/// `/health` shows the problem it reports, if any (a commit retried, intake paused for disk space); while it does
/// not answer (a commit waiting on another process's lock, a hung `fsync`), `/health` says so and the
/// watchdog goes hungry, so systemd restarts a buffer stuck longer than `WatchdogSec`. Ends on `stop` (dropping
/// its buffer handle) or when the buffer closes.
async fn liveness(
    buffer: BufferHandle,
    notifier: Arc<Notifier>,
    health: Health,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let asked = Instant::now();
        let answer = tokio::select! {
            a = tokio::time::timeout(interval, buffer.ping()) => a,
            _ = stop.cancelled() => return,
        };
        match answer {
            Ok(Ok(problem)) => {
                if let Some(since) = stalled_since.take() {
                    tracing::info!(
                        stalled_ms = since.elapsed().as_millis() as u64,
                        "the buffer thread answers again"
                    );
                }
                // The thread answers: it is alive (a restart would not mend a full disk or another process's
                // lock), but a held commit or a failing seal is still a problem worth showing.
                health.set("buffer", problem.is_none(), problem.unwrap_or_default());
                notifier.watchdog();
            }
            Ok(Err(Closed)) => return,
            Err(_) => {
                let since = *stalled_since.get_or_insert(asked);
                let secs = since.elapsed().as_secs_f64();
                tracing::warn!(
                    stalled_s = secs,
                    "the buffer thread does not answer (disk locked, full or hung?)"
                );
                health.set(
                    "buffer",
                    false,
                    format!("the buffer thread has not answered for {secs:.1} s"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_pings_fit_in_half_the_watchdog_timeout() {
        assert_eq!(liveness_interval(None), Duration::from_secs(5));
        assert_eq!(
            liveness_interval(Some(Duration::from_secs(1))),
            Duration::from_millis(250)
        );
        assert_eq!(
            liveness_interval(Some(Duration::from_secs(60))),
            Duration::from_secs(5)
        );
        assert_eq!(
            liveness_interval(Some(Duration::from_micros(1))),
            Duration::from_millis(10)
        );
    }
}

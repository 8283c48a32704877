//! Retrying a sink's calls until they succeed, and telling the operator when they cannot.
//!
//! A shard's checkpoint never passes data a sink has not written, so a failed sink call is retried until it
//! succeeds, whatever the error; what the error means ([`ErrorClass`]) decides how:
//! - transient (throttling, 5xx, timeouts, connection errors): after a capped, jittered backoff, logged as a
//!   warning; `/health` stays ok while the call's failures last less than [`TRANSIENT_FAILING_AFTER`] (a
//!   throttling spell), and fails beyond, as for a permanent error, with the sentence and how long (an
//!   InfluxDB that refuses connections for an hour is a sick sink, whatever the class of its errors);
//! - permanent (access denied, a deleted table or bucket, a request refused as invalid): the sink's `/health`
//!   line fails with one sentence naming the reason (`timestream: FAIL ResourceNotFoundException on
//!   WriteRecords (permanent): …; retrying every 30 s`), `fieldlink_cloud_sink_failing{sink}` is 1, an error is
//!   logged at most once per retry interval per sink, and the call is tried again every
//!   `sink_failing_retry_ms`, so the sink recovers by itself once the operator fixed the cause.
//!
//! Every failure counts in `fieldlink_cloud_sink_errors_total{sink,class}`. A wait ends early when the shard
//! worker is told to stop: a failing sink never holds up SIGTERM (the worker then commits nothing, and the
//! shard is read again from its checkpoint).
//!
//! [`SinkState`] is the pure bookkeeping (how many calls of a sink fail permanently, when an error was last
//! logged); [`SinkMonitor`] is its shared shell, [`Retry`] the state of one call being retried.

use crate::metrics::CloudMetrics;
use fieldlink_ops::aws_error::{CallError, ErrorClass};
use fieldlink_ops::backoff::Backoff;
use fieldlink_ops::metrics::{Gauge, Health};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long one call's transient failures last before its sink fails in `/health`, unless set otherwise
/// (`sink_transient_failing_ms`, [`SinkMonitor::transient_failing_after`]).
pub const TRANSIENT_FAILING_AFTER: Duration = Duration::from_secs(60);

/// The `/health` detail of a sink failing permanently: one sentence.
pub fn failing_line(operation: &str, error: &CallError, retry: Duration) -> String {
    format!(
        "{}; retrying every {} s",
        error.sentence(operation),
        retry.as_secs_f64().round().max(1.0)
    )
}

/// What a sink's permanent failures look like right now. Pure.
#[derive(Debug, Default)]
pub struct SinkState {
    failing: usize,
    last_log: Option<Instant>,
}

impl SinkState {
    /// A call starts failing permanently. Returns whether the sink as a whole just started failing.
    pub fn enter(&mut self) -> bool {
        self.failing += 1;
        self.failing == 1
    }

    /// A call that failed permanently ended (it succeeded, or was stopped). Returns whether no call of the
    /// sink fails any more.
    pub fn leave(&mut self) -> bool {
        self.failing = self.failing.saturating_sub(1);
        self.failing == 0
    }

    /// Whether calls fail permanently.
    pub fn failing(&self) -> bool {
        self.failing > 0
    }

    /// Whether an error log is due at `now`: at most one per `every`.
    pub fn log_due(&mut self, now: Instant, every: Duration) -> bool {
        let due = self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= every);
        if due {
            self.last_log = Some(now);
        }
        due
    }
}

struct Inner {
    sink: &'static str,
    health: Health,
    failing_gauge: Gauge,
    metrics: CloudMetrics,
    retry: Duration,
    transient_after: Duration,
    state: Mutex<SinkState>,
}

/// The failure reporting of one sink, shared by every shard worker of the process (clones share it).
#[derive(Clone)]
pub struct SinkMonitor(Arc<Inner>);

impl std::fmt::Debug for SinkMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkMonitor")
            .field("sink", &self.0.sink)
            .finish()
    }
}

impl SinkMonitor {
    /// Reports `sink` in `health` (ok until a call fails permanently); permanent failures are retried every
    /// `retry`.
    pub fn new(sink: &'static str, health: Health, metrics: CloudMetrics, retry: Duration) -> Self {
        health.set(sink, true, "");
        let failing_gauge = metrics.sink_failing(sink);
        failing_gauge.set(0);
        Self(Arc::new(Inner {
            sink,
            health,
            failing_gauge,
            metrics,
            retry,
            transient_after: TRANSIENT_FAILING_AFTER,
            state: Mutex::new(SinkState::default()),
        }))
    }

    /// The same monitor with transient failures reported after `after` instead of [`TRANSIENT_FAILING_AFTER`].
    /// Call it on a new monitor: one already cloned keeps its setting.
    pub fn transient_failing_after(self, after: Duration) -> Self {
        match Arc::try_unwrap(self.0) {
            Ok(mut inner) => {
                inner.transient_after = after;
                Self(Arc::new(inner))
            }
            Err(shared) => Self(shared),
        }
    }

    /// The sink's name.
    pub fn sink(&self) -> &'static str {
        self.0.sink
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A retry of a call of this sink, waiting on `cancel`, backing off from `base` to `max` on transient errors.
    pub fn retry(&self, cancel: &CancellationToken, base: Duration, max: Duration) -> Retry {
        Retry {
            monitor: self.clone(),
            cancel: cancel.clone(),
            backoff: Backoff::new(base, max),
            failing: false,
            since: None,
        }
    }

    fn permanent(&self, first: bool, operation: &str, error: &CallError) {
        self.fail(first, failing_line(operation, error, self.0.retry));
    }

    /// The sink fails in `/health` with `line`; `first`: this call just started failing.
    fn fail(&self, first: bool, line: String) {
        let log = {
            let mut st = self.state();
            if first {
                st.enter();
            }
            st.log_due(Instant::now(), self.0.retry)
        };
        self.0.health.set(self.0.sink, false, line.clone());
        self.0.failing_gauge.set(1);
        if log {
            tracing::error!(sink = self.0.sink, error = %line, "sink failing; its shards' checkpoints wait until it works again");
        }
    }

    fn leave(&self, recovered: bool) {
        let none_left = self.state().leave();
        if none_left {
            self.0.health.set(self.0.sink, true, "");
            self.0.failing_gauge.set(0);
            if recovered {
                tracing::info!(sink = self.0.sink, "sink works again");
            }
        }
    }
}

/// The calls of a sink were stopped (the shard worker is stopping) before they succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stopped while retrying")]
pub struct Stopped;

/// One call being retried: counts and reports its failures and waits before the next attempt.
#[derive(Debug)]
pub struct Retry {
    monitor: SinkMonitor,
    cancel: CancellationToken,
    backoff: Backoff,
    failing: bool,
    /// When the call's first failure was.
    since: Option<Instant>,
}

impl Retry {
    /// Attempt of `operation` failed with `error`: counts and reports it, then waits (backoff if transient,
    /// the slow cadence if permanent). `Err(Stopped)`: the worker is stopping, give up the call.
    pub async fn failed(&mut self, operation: &str, error: &CallError) -> Result<(), Stopped> {
        self.failed_after(operation, error, None).await
    }

    /// As [`Retry::failed`], but a transient failure waits `after` (the server's `Retry-After`) when given
    /// instead of the backoff's next delay.
    pub async fn failed_after(
        &mut self,
        operation: &str,
        error: &CallError,
        after: Option<Duration>,
    ) -> Result<(), Stopped> {
        let m = &self.monitor;
        m.0.metrics
            .sink_errors(m.0.sink, error.class.as_str())
            .inc();
        let delay = match error.class {
            ErrorClass::Transient => {
                let lasted = self.since.get_or_insert_with(Instant::now).elapsed();
                // Past the limit the sink fails, its line telling how long (updated at every failure).
                if lasted >= m.0.transient_after {
                    m.fail(
                        !self.failing,
                        format!(
                            "{}; failing for {} s, retrying",
                            error.sentence(operation),
                            lasted.as_secs()
                        ),
                    );
                    self.failing = true;
                }
                let d = after.unwrap_or_else(|| self.backoff.next_delay());
                tracing::warn!(sink = m.0.sink, error = %error.sentence(operation), retry_in_ms = d.as_millis() as u64, "sink call failed; retrying");
                d
            }
            ErrorClass::Permanent => {
                m.permanent(!self.failing, operation, error);
                self.failing = true;
                // A little jitter so many shards do not retry in step.
                m.0.retry.mul_f64(1.0 + fastrand::f64() / 10.0)
            }
        };
        if self.cancel.is_cancelled() {
            return Err(Stopped);
        }
        tokio::select! {
            _ = self.cancel.cancelled() => Err(Stopped),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }

    /// The call succeeded.
    pub fn succeeded(mut self) {
        if self.failing {
            self.failing = false;
            self.monitor.leave(true);
        }
    }
}

impl Drop for Retry {
    fn drop(&mut self) {
        if self.failing {
            self.monitor.leave(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldlink_ops::aws_error::classify;
    use fieldlink_ops::metrics::Registry;

    fn denied() -> CallError {
        CallError {
            class: classify(Some("AccessDeniedException"), Some(403)),
            kind: "AccessDeniedException".into(),
            message: "not authorized".into(),
        }
    }

    #[test]
    fn the_sink_fails_while_any_call_fails_and_recovers_when_the_last_one_works() {
        let mut st = SinkState::default();
        assert!(st.enter());
        assert!(!st.enter());
        assert!(!st.leave());
        assert!(st.failing());
        assert!(st.leave());
        assert!(!st.failing());
        assert!(st.leave(), "an extra leave does not underflow");
    }

    #[test]
    fn error_logs_are_rate_limited() {
        let mut st = SinkState::default();
        let t0 = Instant::now();
        let every = Duration::from_secs(30);
        assert!(st.log_due(t0, every));
        assert!(!st.log_due(t0 + Duration::from_secs(29), every));
        assert!(st.log_due(t0 + Duration::from_secs(30), every));
    }

    #[test]
    fn the_health_line_is_one_sentence_naming_the_reason() {
        let line = failing_line("WriteRecords", &denied(), Duration::from_secs(30));
        assert_eq!(
            line,
            "AccessDeniedException on WriteRecords (permanent): not authorized; retrying every 30 s"
        );
    }

    #[tokio::test]
    async fn a_transient_failure_waits_the_servers_retry_after_instead_of_the_backoff() {
        let m = SinkMonitor::new(
            "influxdb",
            Health::new(),
            CloudMetrics::new(Registry::new()),
            Duration::from_secs(30),
        );
        let cancel = CancellationToken::new();
        // A backoff of at most 1 ms: only the server's delay can make the wait last 300 ms.
        let mut r = m.retry(&cancel, Duration::from_millis(1), Duration::from_millis(1));
        let busy = CallError::of_http(429, "slow down");
        let t0 = Instant::now();
        r.failed_after("write", &busy, Some(Duration::from_millis(300)))
            .await
            .unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(300));
        let t1 = Instant::now();
        r.failed_after("write", &busy, None).await.unwrap();
        assert!(t1.elapsed() < Duration::from_millis(250));
    }

    #[tokio::test]
    async fn transient_failures_lasting_past_the_limit_fail_health_until_the_call_works() {
        let health = Health::new();
        let metrics = CloudMetrics::new(Registry::new());
        let m = SinkMonitor::new(
            "influxdb",
            health.clone(),
            metrics.clone(),
            Duration::from_secs(30),
        )
        .transient_failing_after(Duration::from_millis(200));
        let cancel = CancellationToken::new();
        let mut r = m.retry(
            &cancel,
            Duration::from_millis(60),
            Duration::from_millis(60),
        );
        let refused =
            CallError::of_io(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        r.failed("write", &refused).await.unwrap();
        r.failed("write", &refused).await.unwrap();
        assert!(
            health.report().0,
            "a short spell of transient failures leaves /health ok"
        );
        while r
            .since
            .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            r.failed("write", &refused).await.unwrap();
        }
        r.failed("write", &refused).await.unwrap();
        let (ok, body) = health.report();
        assert!(!ok, "{body}");
        assert!(
            body.contains("influxdb: FAIL ConnectionRefused on write (transient)")
                && body.contains("; failing for 0 s, retrying"),
            "{body}"
        );
        assert_eq!(metrics.sink_failing("influxdb").get(), 1);
        std::thread::sleep(Duration::from_millis(1000));
        r.failed("write", &refused).await.unwrap();
        let (_, body) = health.report();
        assert!(
            body.contains("; failing for 1 s, retrying"),
            "the line tells how long: {body}"
        );
        r.succeeded();
        assert!(health.report().0);
        assert_eq!(metrics.sink_failing("influxdb").get(), 0);
    }

    #[tokio::test]
    async fn a_permanent_failure_fails_health_until_the_call_works_and_a_stop_ends_the_wait() {
        let health = Health::new();
        let metrics = CloudMetrics::new(Registry::new());
        let m = SinkMonitor::new(
            "timestream",
            health.clone(),
            metrics.clone(),
            Duration::from_millis(5),
        );
        let cancel = CancellationToken::new();
        let mut a = m.retry(&cancel, Duration::from_millis(100), Duration::from_secs(20));
        let mut b = m.retry(&cancel, Duration::from_millis(100), Duration::from_secs(20));
        a.failed("WriteRecords", &denied()).await.unwrap();
        b.failed("WriteRecords", &denied()).await.unwrap();
        let (ok, body) = health.report();
        assert!(!ok);
        assert!(
            body.contains("timestream: FAIL AccessDeniedException on WriteRecords (permanent)"),
            "{body}"
        );
        assert_eq!(metrics.sink_failing("timestream").get(), 1);
        assert_eq!(metrics.sink_errors("timestream", "permanent").get(), 2);
        a.succeeded();
        assert!(!health.report().0, "b still fails");
        drop(b); // its worker stopped
        assert!(health.report().0);
        assert_eq!(metrics.sink_failing("timestream").get(), 0);

        let slow = SinkMonitor::new(
            "parquet",
            health.clone(),
            metrics,
            Duration::from_secs(3600),
        );
        let mut c = slow.retry(&cancel, Duration::from_millis(100), Duration::from_secs(20));
        let waiting = tokio::spawn(async move { c.failed("WriteRecords", &denied()).await });
        while health.report().0 {
            tokio::task::yield_now().await;
        }
        cancel.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(
            stopped.unwrap().unwrap(),
            Err(Stopped),
            "the hour-long wait ended at the stop"
        );
        assert!(health.report().0, "a stopped call no longer fails the sink");
        assert!(
            health.report().1.contains("timestream: ok")
                && health.report().1.contains("parquet: ok")
        );
    }
}

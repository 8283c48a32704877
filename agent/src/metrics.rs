//! The agent's metrics, created once and passed to every component.
//!
//! The reading counters form a ledger that holds at rest:
//! `received + window_derived = sent + deduplicated + dead_lettered + dropped + window_withheld + unsealed + pending`
//! (gauges for the last two; the window counters are 0 without window rules),
//! where `received` counts readings committed to the buffer since the process started plus what the buffer held
//! at start. Late readings that were sent flagged are counted in `sent` and, in addition, in `late`.

use fieldlink_ops::metrics::{Counter, Gauge, Registry};

/// Handles to every agent-wide metric.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Registry they belong to (per-connection metrics are added by the sources).
    pub registry: Registry,
    /// Readings committed to the buffer.
    pub readings_received: Counter,
    /// Readings in records Kinesis acknowledged.
    pub readings_sent: Counter,
    /// Readings dropped as duplicates.
    pub readings_deduplicated: Counter,
    /// Late readings sent with the late flag.
    pub readings_late: Counter,
    /// Late readings withheld into the dead-letter table.
    pub readings_dead_lettered: Counter,
    /// Readings dropped by the `drop_oldest` overflow policy.
    pub readings_dropped: Counter,
    /// Batches sealed.
    pub batches_sealed: Counter,
    /// Bytes of sealed records (the wire size).
    pub bytes_sealed: Counter,
    /// Records Kinesis accepted.
    pub records_sent: Counter,
    /// Entries of `PutRecords` calls that Kinesis rejected (retried).
    pub records_rejected: Counter,
    /// Whole `PutRecords` calls that failed (timeout, network, throttling of the call); retried.
    pub put_calls_failed: Counter,
    /// Times the sender lowered its rate after throttling.
    pub throttled: Counter,
    /// Buffer errors (commit, seal, delete); each is retried.
    pub buffer_errors: Counter,
    /// Corrupt buffer files moved aside at start.
    pub buffer_corrupt: Counter,
    /// Readings appended but not sealed.
    pub unsealed_readings: Gauge,
    /// Sealed batches waiting for Kinesis.
    pub pending_batches: Gauge,
    /// Readings inside pending batches.
    pub pending_readings: Gauge,
    /// Counted size of the buffer, bytes.
    pub buffered_bytes: Gauge,
    /// The sender's current rate limit, bytes per second.
    pub send_rate: Gauge,
    /// Alarm-event records not yet accepted by Kinesis.
    pub alarm_records_pending: Gauge,
    /// `(rule, series)` pairs not at `ok`.
    pub alarms_active: Gauge,
    /// Late readings the alarm rules did not evaluate.
    pub alarm_late_skipped: Counter,
    /// Readings of derived series (closed windows) sealed into records.
    pub window_derived: Counter,
    /// Raw readings that fed windows and were not sent (`keep_raw = false`).
    pub window_withheld: Counter,
    /// Readings late for a window rule (their window had closed), per rule and reading.
    pub window_late: Counter,
    /// Readings that needed a new window beyond `[windows] max_open_windows`.
    pub window_overflow: Counter,
    /// Windows of silent series closed by the intake clock (`idle_close_ms`).
    pub window_idle_closed: Counter,
    /// Windows open.
    pub windows_open: Gauge,
}

impl AgentMetrics {
    /// Registers every metric in `registry`.
    pub fn new(registry: Registry) -> Self {
        let c = |n: &str, h: &str| registry.counter(n, h, &[]);
        let g = |n: &str, h: &str| registry.gauge(n, h, &[]);
        Self {
            readings_received: c(
                "fieldlink_readings_received_total",
                "Readings committed to the on-disk buffer.",
            ),
            readings_sent: c(
                "fieldlink_readings_sent_total",
                "Readings in records acknowledged by Kinesis.",
            ),
            readings_deduplicated: c(
                "fieldlink_readings_deduplicated_total",
                "Readings dropped as duplicates (same series, time and value).",
            ),
            readings_late: c(
                "fieldlink_readings_late_total",
                "Late readings sent with the late flag.",
            ),
            readings_dead_lettered: c(
                "fieldlink_readings_dead_lettered_total",
                "Late readings withheld into the dead-letter table.",
            ),
            readings_dropped: c(
                "fieldlink_readings_dropped_total",
                "Readings dropped by the drop_oldest overflow policy.",
            ),
            batches_sealed: c(
                "fieldlink_batches_sealed_total",
                "Batches sealed into wire-format records.",
            ),
            bytes_sealed: c(
                "fieldlink_record_bytes_sealed_total",
                "Bytes of sealed records (wire size).",
            ),
            records_sent: c(
                "fieldlink_records_sent_total",
                "Records accepted by Kinesis.",
            ),
            records_rejected: c(
                "fieldlink_records_rejected_total",
                "PutRecords entries rejected by Kinesis (retried).",
            ),
            put_calls_failed: c(
                "fieldlink_put_calls_failed_total",
                "PutRecords calls that failed as a whole (retried).",
            ),
            throttled: c(
                "fieldlink_send_throttled_total",
                "Times the sender halved its rate after Kinesis throttled it.",
            ),
            buffer_errors: c(
                "fieldlink_buffer_errors_total",
                "Buffer operations that failed (retried).",
            ),
            buffer_corrupt: c(
                "fieldlink_buffer_corrupt_total",
                "Corrupt buffer files moved aside at start.",
            ),
            unsealed_readings: g(
                "fieldlink_buffer_unsealed_readings",
                "Readings buffered but not yet sealed.",
            ),
            pending_batches: g(
                "fieldlink_buffer_pending_batches",
                "Sealed batches not yet accepted by Kinesis.",
            ),
            pending_readings: g(
                "fieldlink_buffer_pending_readings",
                "Readings in sealed batches not yet accepted by Kinesis.",
            ),
            buffered_bytes: g(
                "fieldlink_buffer_bytes",
                "Counted size of the buffer (unsealed readings and pending records), bytes.",
            ),
            send_rate: g(
                "fieldlink_send_rate_bytes_per_second",
                "The Kinesis sender's current rate limit.",
            ),
            alarm_records_pending: g(
                "fieldlink_alarm_records_pending",
                "Alarm-event records not yet accepted by Kinesis.",
            ),
            alarms_active: g(
                "fieldlink_alarms_active",
                "Alarm rule and series pairs not at level ok.",
            ),
            alarm_late_skipped: c(
                "fieldlink_alarm_late_readings_skipped_total",
                "Late readings (released after a newer one of their series) the alarm rules did not evaluate.",
            ),
            window_derived: c(
                "fieldlink_window_readings_derived_total",
                "Readings of derived series (closed windows) sealed into records.",
            ),
            window_withheld: c(
                "fieldlink_window_raw_withheld_total",
                "Raw readings that fed windows and were deleted unsent (keep_raw = false).",
            ),
            window_late: c(
                "fieldlink_window_late_readings_total",
                "Readings whose window had closed, per window rule and reading (dropped or sent raw, per the rule).",
            ),
            window_overflow: c(
                "fieldlink_window_overflow_total",
                "Readings that needed a new window beyond max_open_windows (handled like late readings).",
            ),
            window_idle_closed: c(
                "fieldlink_window_idle_closed_total",
                "Windows of silent series closed by the clock (idle_close_ms), not by a reading.",
            ),
            windows_open: g("fieldlink_windows_open", "Windows open (all rules, series and sizes)."),
            registry,
        }
    }

    /// `fieldlink_alarm_events_total{rule, level}`: alarm events committed, by rule and the level entered.
    pub fn alarm_events(&self, rule: &str, level: &str) -> Counter {
        self.registry.counter(
            "fieldlink_alarm_events_total",
            "Alarm events (state changes) committed, by rule and the level entered.",
            &[("rule", rule), ("level", level)],
        )
    }
}

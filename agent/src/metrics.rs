//! The agent's metrics, created once and passed to every component.
//!
//! Reading counters form a ledger: every reading a source accepts is counted once in `readings_received`, and
//! then once in `readings_buffered` (committed), `readings_sealed` (in a batch) and `readings_sent` (accepted by
//! Kinesis). At rest, `received = buffered` and `sealed = sent + pending_readings`.

use fieldlink_ops::metrics::{Counter, Gauge, Registry};

/// Handles to every agent-wide metric.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Registry they belong to (per-connection metrics are added by the sources).
    pub registry: Registry,
    /// Readings committed to the buffer.
    pub readings_buffered: Counter,
    /// Batches sealed.
    pub batches_sealed: Counter,
    /// Readings put into sealed batches.
    pub readings_sealed: Counter,
    /// Bytes of sealed records (the wire size).
    pub bytes_sealed: Counter,
    /// Records Kinesis accepted.
    pub records_sent: Counter,
    /// Readings inside records Kinesis accepted.
    pub readings_sent: Counter,
    /// Entries of `PutRecords` calls that Kinesis rejected (retried).
    pub records_rejected: Counter,
    /// Whole `PutRecords` calls that failed (timeout, network, throttling of the call).
    pub put_calls_failed: Counter,
    /// Buffer errors (commit, seal, delete); each is retried.
    pub buffer_errors: Counter,
    /// Readings appended but not sealed.
    pub unsealed_readings: Gauge,
    /// Sealed batches waiting for Kinesis.
    pub pending_batches: Gauge,
    /// Readings inside pending batches.
    pub pending_readings: Gauge,
    /// Bytes of pending batches.
    pub pending_bytes: Gauge,
}

impl AgentMetrics {
    /// Registers every metric in `registry`.
    pub fn new(registry: Registry) -> Self {
        let c = |n: &str, h: &str| registry.counter(n, h, &[]);
        let g = |n: &str, h: &str| registry.gauge(n, h, &[]);
        Self {
            readings_buffered: c(
                "fieldlink_readings_buffered_total",
                "Readings committed to the on-disk buffer.",
            ),
            batches_sealed: c(
                "fieldlink_batches_sealed_total",
                "Batches sealed into wire-format records.",
            ),
            readings_sealed: c(
                "fieldlink_readings_sealed_total",
                "Readings put into sealed batches.",
            ),
            bytes_sealed: c(
                "fieldlink_record_bytes_sealed_total",
                "Bytes of sealed records (wire size).",
            ),
            records_sent: c(
                "fieldlink_records_sent_total",
                "Records accepted by Kinesis.",
            ),
            readings_sent: c(
                "fieldlink_readings_sent_total",
                "Readings inside records accepted by Kinesis.",
            ),
            records_rejected: c(
                "fieldlink_records_rejected_total",
                "PutRecords entries rejected by Kinesis (retried).",
            ),
            put_calls_failed: c(
                "fieldlink_put_calls_failed_total",
                "PutRecords calls that failed as a whole (retried).",
            ),
            buffer_errors: c(
                "fieldlink_buffer_errors_total",
                "Buffer operations that failed (retried).",
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
            pending_bytes: g(
                "fieldlink_buffer_pending_bytes",
                "Bytes of sealed batches not yet accepted by Kinesis.",
            ),
            registry,
        }
    }
}

//! The cloud service's metrics.

use fieldlink_ops::metrics::{Counter, Gauge, Registry};

/// Handles to the cloud metrics.
#[derive(Debug, Clone)]
pub struct CloudMetrics {
    /// Registry (for labelled metrics created on demand).
    pub registry: Registry,
    /// Kinesis records received.
    pub records_in: Counter,
    /// Batches landed in every sink.
    pub batches_landed: Counter,
    /// Batches skipped as duplicates.
    pub batches_duplicate: Counter,
    /// Readings landed.
    pub readings_landed: Counter,
    /// New batches of an older buffer epoch of an agent id while a newer epoch of it was sending.
    pub agent_id_conflicts: Counter,
    /// Batches whose identity landed before with other content (restored or cloned buffer files).
    pub batch_id_collisions: Counter,
    /// Agents the resend memory forgot to stay under its bound.
    pub dedup_evictions: Counter,
    /// Bytes the resend memory holds.
    pub dedup_memory: Gauge,
    /// Timestream records written.
    pub timestream_records: Counter,
    /// Timestream records Timestream rejected (ours refused before calling count as dead-letter readings).
    pub timestream_rejected: Counter,
    /// Timestream calls throttled (and retried).
    pub timestream_throttled: Counter,
    /// Parquet files written.
    pub parquet_files: Counter,
    /// Leases this worker holds.
    pub leases_held: Gauge,
    /// Checkpoints written.
    pub checkpoints: Counter,
    /// Parquet rows written.
    pub parquet_rows: Counter,
    /// InfluxDB points (lines) the server acknowledged.
    pub influx_points: Counter,
    /// InfluxDB lines refused by the server and dead-lettered.
    pub influx_dead_lines: Counter,
}

impl CloudMetrics {
    /// Registers the metrics.
    pub fn new(registry: Registry) -> Self {
        let c = |n: &str, h: &str| registry.counter(n, h, &[]);
        Self {
            records_in: c("fieldlink_cloud_records_total", "Kinesis records received."),
            batches_landed: c(
                "fieldlink_cloud_batches_landed_total",
                "Batches handed to every sink.",
            ),
            batches_duplicate: c(
                "fieldlink_cloud_batches_duplicate_total",
                "Batches skipped because (agent, epoch, seq) was landed before from another record.",
            ),
            agent_id_conflicts: c(
                "fieldlink_cloud_agent_id_conflicts_total",
                "New batches from an older buffer epoch of an agent id while a newer epoch of the same id was sending: two agents share one agent_id (both are landed).",
            ),
            batch_id_collisions: c(
                "fieldlink_cloud_batch_id_collisions_total",
                "Batches whose (agent, epoch, seq) landed before with other content: a buffer file restored from a backup or cloned onto another box (both are landed).",
            ),
            dedup_evictions: c(
                "fieldlink_cloud_dedup_evictions_total",
                "Agents the resend memory forgot to stay under [dedup] max_memory_mib (a resend of their earlier batches lands again).",
            ),
            dedup_memory: registry.gauge(
                "fieldlink_cloud_dedup_memory_bytes",
                "Bytes the resend memory holds (bounded by [dedup] max_memory_mib).",
                &[],
            ),
            readings_landed: c(
                "fieldlink_cloud_readings_landed_total",
                "Readings handed to every sink.",
            ),
            timestream_records: c(
                "fieldlink_timestream_records_written_total",
                "Timestream records accepted.",
            ),
            timestream_rejected: c(
                "fieldlink_timestream_records_rejected_total",
                "Timestream records rejected by Timestream (RejectedRecords or an invalid call); dead-lettered.",
            ),
            timestream_throttled: c(
                "fieldlink_timestream_throttled_total",
                "WriteRecords calls throttled and retried.",
            ),
            leases_held: registry.gauge(
                "fieldlink_cloud_leases_held",
                "Shard leases this worker holds.",
                &[],
            ),
            checkpoints: c(
                "fieldlink_cloud_checkpoints_total",
                "Shard checkpoints written (each after a commit to every sink).",
            ),
            parquet_files: c("fieldlink_parquet_files_total", "Parquet files written."),
            parquet_rows: c(
                "fieldlink_parquet_rows_total",
                "Rows written to Parquet files.",
            ),
            influx_points: c(
                "fieldlink_influxdb_points_written_total",
                "InfluxDB points (line-protocol lines) the server acknowledged.",
            ),
            influx_dead_lines: c(
                "fieldlink_influxdb_lines_dead_lettered_total",
                "Line-protocol lines InfluxDB refused (400/422 line errors, a single line too large); dead-lettered with the server's message.",
            ),
            registry,
        }
    }

    /// Alarm events handed to the alarm sinks (after the batch deduplication).
    pub fn alarm_events_landed(&self) -> Counter {
        self.registry.counter(
            "fieldlink_cloud_alarm_events_landed_total",
            "Alarm events of new alarm records handed to the alarm sinks (alarm table, SNS).",
            &[],
        )
    }

    /// Alarm events the SNS notifier published (`published`) or found notified before (`skipped`).
    pub fn alarm_notifications(&self, outcome: &str) -> Counter {
        self.registry.counter(
            "fieldlink_cloud_alarm_notifications_total",
            "Alarm events published to SNS (outcome=published) or skipped because their marker said SNS had accepted them before (outcome=skipped).",
            &[("outcome", outcome)],
        )
    }

    /// InfluxDB write requests answered, by status (`204`, `429`, …, or `timeout`, `connection`).
    pub fn influx_requests(&self, status: &str) -> Counter {
        self.registry.counter(
            "fieldlink_influxdb_requests_total",
            "InfluxDB write requests by answer: HTTP status, or timeout / connection for none.",
            &[("status", status)],
        )
    }

    /// InfluxDB requests sent again (whole, split or without refused lines), by the status that caused it.
    pub fn influx_retries(&self, status: &str) -> Counter {
        self.registry.counter(
            "fieldlink_influxdb_retries_total",
            "InfluxDB write requests sent again (whole, in halves, or without the refused lines), by the answer that caused it.",
            &[("status", status)],
        )
    }

    /// Undecodable records by reason.
    pub fn dead_letter(&self, reason: &str) -> Counter {
        self.registry.counter(
            "fieldlink_cloud_dead_letters_total",
            "Kinesis records that could not be decoded, written to the dead-letter location, by reason.",
            &[("reason", reason)],
        )
    }

    /// Readings a sink refused, by sink and reason class.
    pub fn dead_letter_readings(&self, sink: &str, reason: &str) -> Counter {
        self.registry.counter(
            "fieldlink_cloud_dead_letter_readings_total",
            "Records a sink refused, written to the dead-letter location, by sink and reason.",
            &[("sink", sink), ("reason", reason)],
        )
    }

    /// Lease changes by kind (`taken`, `stolen`, `lost`, `released`, `finished`).
    pub fn lease_changes(&self, kind: &str) -> Counter {
        self.registry.counter(
            "fieldlink_cloud_lease_changes_total",
            "Lease changes seen by this worker, by kind.",
            &[("kind", kind)],
        )
    }

    /// 1 while a call of `sink` fails with a permanent error (and is retried slowly), else 0.
    pub fn sink_failing(&self, sink: &str) -> Gauge {
        self.registry.gauge(
            "fieldlink_cloud_sink_failing",
            "1 while a sink fails with a permanent error (access denied, missing table or bucket); retried slowly.",
            &[("sink", sink)],
        )
    }

    /// Failed sink calls by sink and class (`transient`, `permanent`); every one is retried.
    pub fn sink_errors(&self, sink: &str, class: &str) -> Counter {
        self.registry.counter(
            "fieldlink_cloud_sink_errors_total",
            "Failed sink calls (each retried), by sink and class (transient or permanent).",
            &[("sink", sink), ("class", class)],
        )
    }

    /// Milliseconds behind the tip of a shard at its last read.
    pub fn shard_lag(&self, shard: &str) -> Gauge {
        self.registry.gauge(
            "fieldlink_cloud_shard_lag_ms",
            "Milliseconds behind the tip of the shard at the last read.",
            &[("shard", shard)],
        )
    }
}

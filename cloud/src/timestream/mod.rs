//! Timestream sink: a batch's multi-measure records (a device's measures at one time share a record; layout,
//! measure names and versions in [`records`]) are written in calls of at most 100 records, several calls in
//! flight. A failed call is retried for as long as it takes (the shard's checkpoint cannot pass unwritten
//! data): throttling and other transient failures with capped backoff, permanent ones (access denied, a deleted
//! table) slowly while `/health` fails for `timestream` ([`crate::land::retry`]); records Timestream rejects (`RejectedRecords`: version
//! conflicts, times out of retention), records that break Timestream's limits and readings it cannot hold go
//! to the dead-letter location with the reason. Limits are enforced here because emulators do not.

mod config;
pub mod records;

pub use config::TimestreamConfig;

use crate::land::dead::DeadLetters;
use crate::land::retry::SinkMonitor;
use crate::land::{Origin, Sink, SinkError, SinkFuture};
use crate::metrics::CloudMetrics;
use aws_sdk_timestreamwrite::error::DisplayErrorContext;
use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsError;
use aws_sdk_timestreamwrite::types::{
    Dimension, MagneticStoreWriteProperties, MeasureValue, MeasureValueType, Record, TimeUnit,
};
use fieldlink_ops::aws_error::CallError;
use fieldlink_proto::Batch;
use records::{MeasureType, TimeWindow, TsRecord};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// This sink's name in `/health`, metrics and dead letters.
pub const NAME: &str = "timestream";

/// Builds the client: with an endpoint override (an emulator) *without* endpoint discovery, which would send
/// requests to real AWS; otherwise with discovery, as Timestream requires. Discovery is retried with backoff
/// until it answers, `/health` failing for `timestream` meanwhile with the error (a regional outage, credentials
/// not there yet, no route to Timestream): before December 2026 one failed attempt ended the process, and an
/// orchestrator restarted it in a loop. `None` if `cancel` fires first.
pub async fn client(
    sdk: &aws_config::SdkConfig,
    endpoint_override: bool,
    health: &fieldlink_ops::metrics::Health,
    cancel: &CancellationToken,
) -> Option<aws_sdk_timestreamwrite::Client> {
    // The SDK's own retries are off: throttling must reach this sink's backoff (and its metric).
    let conf = aws_sdk_timestreamwrite::config::Builder::from(sdk)
        .retry_config(aws_sdk_timestreamwrite::config::retry::RetryConfig::disabled())
        .build();
    let c = aws_sdk_timestreamwrite::Client::from_conf(conf);
    if endpoint_override {
        return Some(c);
    }
    let mut backoff =
        fieldlink_ops::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        match c.clone().with_endpoint_discovery_enabled().await {
            Ok((c, reload)) => {
                tokio::spawn(reload.reload_task());
                health.set(NAME, true, "");
                return Some(c);
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = ?e, retry_in_ms = wait.as_millis() as u64, "Timestream endpoint discovery failed");
                health.set(
                    NAME,
                    false,
                    format!(
                        "endpoint discovery failed: {}; retrying in {} s, nothing lands meanwhile",
                        fieldlink_ops::aws_error::brief(e.as_ref()),
                        wait.as_secs().max(1)
                    ),
                );
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// The event times the table accepts, read once at startup: the table's retention, after turning on magnetic
/// store writes if `cfg.magnetic_store_writes` is on and the table has them off. `None` if the table cannot be
/// described: then Timestream's own answer decides (rejected records are dead-lettered all the same).
pub async fn time_window(
    client: &aws_sdk_timestreamwrite::Client,
    cfg: &TimestreamConfig,
) -> Option<TimeWindow> {
    let d = match client
        .describe_table()
        .database_name(&cfg.database)
        .table_name(&cfg.table)
        .send()
        .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %DisplayErrorContext(&e), "DescribeTable failed; time limits left to Timestream");
            return None;
        }
    };
    let t = d.table()?;
    let hours = t
        .retention_properties()
        .map_or(6, |r| r.memory_store_retention_period_in_hours());
    let days = t
        .retention_properties()
        .map_or(73_000, |r| r.magnetic_store_retention_period_in_days());
    let mut magnetic = t
        .magnetic_store_write_properties()
        .is_some_and(|m| m.enable_magnetic_store_writes());
    if cfg.magnetic_store_writes && !magnetic {
        let props = MagneticStoreWriteProperties::builder()
            .enable_magnetic_store_writes(true)
            .build();
        match props {
            Ok(p) => match client
                .update_table()
                .database_name(&cfg.database)
                .table_name(&cfg.table)
                .magnetic_store_write_properties(p)
                .send()
                .await
            {
                Ok(_) => {
                    magnetic = true;
                    tracing::info!(table = %cfg.table, "magnetic store writes enabled on the table");
                }
                Err(e) => {
                    tracing::warn!(error = %DisplayErrorContext(&e), "enabling magnetic store writes failed")
                }
            },
            Err(e) => tracing::warn!(error = %e, "magnetic store properties"),
        }
    }
    Some(TimeWindow {
        memory_ms: hours * 3_600_000,
        magnetic_ms: magnetic.then_some(days * 86_400_000),
    })
}

/// The sink (one per shard worker).
#[derive(Debug)]
pub struct TimestreamSink {
    client: aws_sdk_timestreamwrite::Client,
    cfg: TimestreamConfig,
    window: Option<TimeWindow>,
    dead: DeadLetters,
    metrics: CloudMetrics,
    monitor: SinkMonitor,
    cancel: CancellationToken,
}

fn sdk_record(r: &TsRecord) -> Record {
    let dims = r
        .dimensions
        .iter()
        .filter_map(|(k, v)| Dimension::builder().name(k).value(v).build().ok())
        .collect();
    let measures = r
        .measures
        .iter()
        .filter_map(|(name, value, ty)| {
            let t = match ty {
                MeasureType::Double => MeasureValueType::Double,
                MeasureType::Bigint => MeasureValueType::Bigint,
                MeasureType::Boolean => MeasureValueType::Boolean,
                MeasureType::Varchar => MeasureValueType::Varchar,
            };
            MeasureValue::builder()
                .name(name)
                .value(value)
                .r#type(t)
                .build()
                .ok()
        })
        .collect();
    Record::builder()
        .set_dimensions(Some(dims))
        .time(r.time_ms.to_string())
        .time_unit(TimeUnit::Milliseconds)
        .measure_name(&r.measure_name)
        .measure_value_type(MeasureValueType::Multi)
        .set_measure_values(Some(measures))
        .version(r.version)
        .build()
}

fn record_json(r: &TsRecord, reason: &str) -> serde_json::Value {
    serde_json::json!({
        "reason": reason,
        "time_ms": r.time_ms,
        "measure_name": r.measure_name,
        "version": r.version,
        "dimensions": r.dimensions.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str()))).collect::<serde_json::Map<_, _>>(),
        "measures": r.measures.iter().map(|(k, v, _)| (k.clone(), serde_json::Value::from(v.as_str()))).collect::<serde_json::Map<_, _>>(),
    })
}

/// How one call ended.
#[derive(Debug)]
enum CallOutcome {
    /// All records written.
    Written,
    /// Some records rejected: `(index in the call, reason)`.
    Rejected(Vec<(usize, String)>),
    /// The whole call was invalid (our limits should prevent this).
    Invalid(String),
    /// The worker is stopping; the call may not have been written.
    Stopped,
}

/// One `WriteRecords` call, retried until it is answered for good or `cancel` fires.
async fn call(
    client: aws_sdk_timestreamwrite::Client,
    cfg: TimestreamConfig,
    records: Vec<Record>,
    metrics: CloudMetrics,
    monitor: SinkMonitor,
    cancel: CancellationToken,
) -> CallOutcome {
    let mut retry = monitor.retry(&cancel, Duration::from_millis(100), Duration::from_secs(20));
    loop {
        let res = client
            .write_records()
            .database_name(&cfg.database)
            .table_name(&cfg.table)
            .set_records(Some(records.clone()))
            .send()
            .await;
        let e = match res {
            Ok(_) => {
                retry.succeeded();
                return CallOutcome::Written;
            }
            Err(e) => e,
        };
        if let Some(err) = e.as_service_error() {
            match err {
                WriteRecordsError::RejectedRecordsException(rej) => {
                    retry.succeeded();
                    return CallOutcome::Rejected(
                        rej.rejected_records()
                            .iter()
                            .map(|r| {
                                let mut why = r.reason().unwrap_or("rejected").to_owned();
                                if let Some(v) = r.existing_version() {
                                    why.push_str(&format!(" (existing version {v})"));
                                }
                                (r.record_index().max(0) as usize, why)
                            })
                            .collect(),
                    );
                }
                // Timestream refuses these records (their content, not the table): dead-lettered.
                WriteRecordsError::ValidationException(v) => {
                    retry.succeeded();
                    return CallOutcome::Invalid(v.message().to_owned());
                }
                WriteRecordsError::ThrottlingException(_) => metrics.timestream_throttled.inc(),
                _ => {}
            }
        }
        tracing::debug!(error = %DisplayErrorContext(&e), "WriteRecords failed");
        if retry
            .failed("WriteRecords", &CallError::of_sdk(&e))
            .await
            .is_err()
        {
            return CallOutcome::Stopped;
        }
    }
}

impl TimestreamSink {
    /// A sink writing to `cfg.database`.`cfg.table`; failed calls are retried until they succeed or `cancel`
    /// fires, failures reported through `monitor`.
    pub fn new(
        client: aws_sdk_timestreamwrite::Client,
        cfg: TimestreamConfig,
        window: Option<TimeWindow>,
        dead: DeadLetters,
        metrics: CloudMetrics,
        monitor: SinkMonitor,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            client,
            cfg,
            window,
            dead,
            metrics,
            monitor,
            cancel,
        }
    }

    async fn write_batch(&mut self, batch: &Batch, origin: &Origin) -> Result<(), SinkError> {
        let (recs, refused) = records::build(batch, &self.cfg.measure_name);
        let mut dead: Vec<serde_json::Value> = refused
            .iter()
            .map(|r| serde_json::json!({"reason": r.reason, "series": r.series}))
            .collect();
        let recs = match &self.window {
            Some(w) => {
                let (ok, late) = records::split_by_time(recs, w, fieldlink_ops::unix_ms());
                dead.extend(late.iter().map(|(r, why)| record_json(r, why)));
                ok
            }
            None => recs,
        };

        let chunks: Vec<&[TsRecord]> = recs.chunks(records::limits::MAX_RECORDS_PER_CALL).collect();
        let mut next = 0usize;
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.len() < self.cfg.max_calls_in_flight && next < chunks.len() {
                let sdk: Vec<Record> = chunks[next].iter().map(sdk_record).collect();
                let fut = call(
                    self.client.clone(),
                    self.cfg.clone(),
                    sdk,
                    self.metrics.clone(),
                    self.monitor.clone(),
                    self.cancel.clone(),
                );
                let i = next;
                running.spawn(async move { (i, fut.await) });
                next += 1;
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            let (i, outcome) = done.map_err(|e| SinkError {
                sink: NAME,
                message: e.to_string(),
            })?;
            let chunk = chunks[i];
            match outcome {
                CallOutcome::Written => self.metrics.timestream_records.add(chunk.len() as u64),
                CallOutcome::Rejected(rej) => {
                    self.metrics
                        .timestream_records
                        .add(chunk.len().saturating_sub(rej.len()) as u64);
                    self.metrics.timestream_rejected.add(rej.len() as u64);
                    for (idx, why) in rej {
                        if let Some(r) = chunk.get(idx) {
                            dead.push(record_json(r, &why));
                        }
                    }
                }
                CallOutcome::Invalid(why) => {
                    self.metrics.timestream_rejected.add(chunk.len() as u64);
                    dead.extend(chunk.iter().map(|r| record_json(r, &why)));
                }
                CallOutcome::Stopped => {
                    return Err(SinkError {
                        sink: NAME,
                        message: "stopped while retrying WriteRecords".into(),
                    })
                }
            }
        }
        self.dead
            .readings(NAME, origin, &batch.agent_id, batch.epoch, batch.seq, dead)
            .await
    }
}

impl Sink for TimestreamSink {
    fn name(&self) -> &'static str {
        NAME
    }
    fn write<'a>(&'a mut self, batch: &'a Batch, origin: &'a Origin) -> SinkFuture<'a> {
        Box::pin(self.write_batch(batch, origin))
    }
    fn commit<'a>(&'a mut self, _first: &'a Origin) -> SinkFuture<'a> {
        // Every write is durable when it returns.
        Box::pin(async { Ok(()) })
    }
    fn discard(&mut self) {}
}

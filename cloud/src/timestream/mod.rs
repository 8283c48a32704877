//! Timestream sink: writes a batch's multi-measure records in calls of at most 100, retrying throttling and
//! transient errors with backoff; records Timestream rejects are counted and logged with the reason.

mod config;
pub mod records;

pub use config::TimestreamConfig;

use crate::land::{Origin, Sink, SinkError, SinkFuture};
use crate::metrics::CloudMetrics;
use aws_sdk_timestreamwrite::error::{DisplayErrorContext, SdkError};
use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsError;
use aws_sdk_timestreamwrite::types::{Dimension, MeasureValue, MeasureValueType, Record, TimeUnit};
use fieldlink_ops::backoff::Backoff;
use fieldlink_proto::Batch;
use records::{MeasureType, TsRecord};
use std::time::Duration;

/// Attempts per call for retryable errors before the batch's remaining records are counted as failed.
const MAX_ATTEMPTS: u32 = 10;

/// Builds the client: with an endpoint override (an emulator) *without* endpoint discovery, which would send
/// requests to real AWS; otherwise with discovery, as Timestream requires.
pub async fn client(
    sdk: &aws_config::SdkConfig,
    endpoint_override: bool,
) -> Result<aws_sdk_timestreamwrite::Client, String> {
    let c = aws_sdk_timestreamwrite::Client::new(sdk);
    if endpoint_override {
        return Ok(c);
    }
    let (c, reload) = c
        .with_endpoint_discovery_enabled()
        .await
        .map_err(|e| format!("Timestream endpoint discovery: {e}"))?;
    tokio::spawn(reload.reload_task());
    Ok(c)
}

/// The sink.
#[derive(Debug)]
pub struct TimestreamSink {
    client: aws_sdk_timestreamwrite::Client,
    cfg: TimestreamConfig,
    metrics: CloudMetrics,
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
        .measure_value_type(MeasureValueType::Multi)
        .set_measure_values(Some(measures))
        .version(r.version)
        .build()
}

fn retryable(e: &SdkError<WriteRecordsError>) -> bool {
    match e {
        SdkError::ServiceError(s) => matches!(
            s.err(),
            WriteRecordsError::ThrottlingException(_)
                | WriteRecordsError::InternalServerException(_)
        ),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        _ => false,
    }
}

impl TimestreamSink {
    /// A sink writing to `cfg.database`.`cfg.table`.
    pub fn new(
        client: aws_sdk_timestreamwrite::Client,
        cfg: TimestreamConfig,
        metrics: CloudMetrics,
    ) -> Self {
        Self {
            client,
            cfg,
            metrics,
        }
    }

    async fn write_batch(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let (recs, refused) = records::build(batch);
        for r in &refused {
            self.metrics.timestream_rejected.inc();
            tracing::warn!(series = %r.series, reason = %r.reason, agent = %batch.agent_id, seq = batch.seq, "reading refused for Timestream");
        }
        let mut failed = 0usize;
        for chunk in recs.chunks(records::limits::MAX_RECORDS_PER_CALL) {
            let sdk: Vec<Record> = chunk.iter().map(sdk_record).collect();
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
            loop {
                let res = self
                    .client
                    .write_records()
                    .database_name(&self.cfg.database)
                    .table_name(&self.cfg.table)
                    .common_attributes(
                        Record::builder()
                            .measure_name(&self.cfg.measure_name)
                            .build(),
                    )
                    .set_records(Some(sdk.clone()))
                    .send()
                    .await;
                match res {
                    Ok(out) => {
                        let written = out
                            .records_ingested()
                            .map_or(chunk.len() as i32, |r| r.total());
                        self.metrics.timestream_records.add(written.max(0) as u64);
                        break;
                    }
                    Err(SdkError::ServiceError(s))
                        if matches!(s.err(), WriteRecordsError::RejectedRecordsException(_)) =>
                    {
                        if let WriteRecordsError::RejectedRecordsException(rej) = s.err() {
                            let rejected = rej.rejected_records();
                            self.metrics.timestream_rejected.add(rejected.len() as u64);
                            self.metrics
                                .timestream_records
                                .add((chunk.len() - rejected.len()) as u64);
                            for r in rejected {
                                tracing::warn!(index = r.record_index(), reason = r.reason().unwrap_or(""), agent = %batch.agent_id, seq = batch.seq, "Timestream rejected a record");
                            }
                        }
                        break;
                    }
                    Err(e) if retryable(&e) && backoff.attempts() < MAX_ATTEMPTS => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %DisplayErrorContext(&e), retry_in_ms = delay.as_millis() as u64, "WriteRecords failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                    Err(e) => {
                        failed += chunk.len();
                        self.metrics.timestream_rejected.add(chunk.len() as u64);
                        tracing::error!(error = %DisplayErrorContext(&e), records = chunk.len(), "WriteRecords failed");
                        break;
                    }
                }
            }
        }
        if failed > 0 {
            return Err(SinkError {
                sink: "timestream",
                message: format!(
                    "{failed} records not written for {} seq {}",
                    batch.agent_id, batch.seq
                ),
            });
        }
        Ok(())
    }
}

impl Sink for TimestreamSink {
    fn name(&self) -> &'static str {
        "timestream"
    }
    fn write<'a>(&'a mut self, batch: &'a Batch, _origin: &'a Origin) -> SinkFuture<'a> {
        Box::pin(self.write_batch(batch))
    }
    fn tick(&mut self) -> SinkFuture<'_> {
        Box::pin(async { Ok(()) })
    }
    fn close(&mut self) -> SinkFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

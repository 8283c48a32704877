//! Wiring of the cloud service.

use crate::config::Config;
use crate::consumer::{self, ShardRecords};
use crate::land::{Lander, Origin, Sink};
use crate::metrics::CloudMetrics;
use crate::parquet::ParquetSink;
use crate::store::{Location, Store};
use crate::timestream::{self, TimestreamSink};
use fieldlink_ops::http::{BindError, Telemetry};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The metrics endpoint could not bind.
    #[error(transparent)]
    Metrics(#[from] BindError),
    /// A sink could not be set up.
    #[error("{0}")]
    Sink(String),
}

/// Runs until `cancel` fires; then stops reading and closes the sinks (writing staged Parquet files).
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<(), RunError> {
    let Telemetry {
        registry, health, ..
    } = Telemetry::start(cfg.metrics_listen, cancel.clone()).await?;
    let metrics = CloudMetrics::new(registry.clone());

    let sdk = cfg.aws.sdk_config().await;
    let endpoint_override = cfg.aws.endpoint_url.is_some();
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(t) = &cfg.timestream {
        let client = timestream::client(&sdk, endpoint_override)
            .await
            .map_err(RunError::Sink)?;
        sinks.push(Box::new(TimestreamSink::new(
            client,
            t.clone(),
            metrics.clone(),
        )));
    }
    if let Some(p) = &cfg.parquet {
        let location = Location::parse(&p.location).map_err(RunError::Sink)?;
        sinks.push(Box::new(ParquetSink::new(
            Store::open(&location, &sdk, endpoint_override),
            p.clone(),
            metrics.clone(),
        )));
    }
    let mut lander = Lander::new(sinks, metrics.clone());

    let (tx, mut rx) = mpsc::channel::<ShardRecords>(cfg.kinesis.queue_capacity);
    let reader_stop = CancellationToken::new();
    let reader = tokio::spawn(consumer::run(
        aws_sdk_kinesis::Client::new(&sdk),
        cfg.kinesis.clone(),
        tx,
        reader_stop.clone(),
    ));
    let lag = |shard: &str| {
        registry.gauge(
            "fieldlink_cloud_shard_lag_ms",
            "Milliseconds behind the tip of the shard at the last read.",
            &[("shard", shard)],
        )
    };
    health.set("consumer", true, "");
    tracing::info!(stream = %cfg.kinesis.stream, "cloud consumer running");

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => lander.tick().await,
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                lag(&msg.shard).set(msg.millis_behind);
                for (sequence_number, data) in msg.records {
                    let origin = Origin { shard: msg.shard.clone(), sequence_number };
                    lander.land(&data, &origin).await;
                }
            }
        }
    }
    tracing::info!("shutting down: stopping shard readers, closing sinks");
    reader_stop.cancel();
    let _ = reader.await;
    lander.close().await;
    tracing::info!("cloud consumer stopped");
    Ok(())
}

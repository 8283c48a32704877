//! Wiring of the cloud service.

use crate::alarms::sns::SnsSink;
use crate::alarms::AlarmSink;
use crate::compaction;
use crate::config::Config;
use crate::consumer::reader::ReadParams;
use crate::consumer::worker::Shared;
use crate::consumer::{self};
use crate::influx::{InfluxClient, InfluxSink};
use crate::land::dead::DeadLetters;
use crate::land::dedup::BatchDedup;
use crate::land::retry::SinkMonitor;
use crate::land::{Sink, SinkFactory};
use crate::lease::LeaseTable;
use crate::metrics::CloudMetrics;
use crate::parquet::{ParquetSink, StagedRows};
use crate::store::{Location, Store};
use crate::timestream::{self, TimestreamSink};
use fieldlink_ops::http::{BindError, Telemetry};
use std::sync::{Arc, Mutex};
use std::time::Duration;
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

/// Runs until `cancel` fires; then every shard worker commits (writing staged Parquet files and its
/// checkpoint) and releases its lease.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<(), RunError> {
    let Telemetry {
        registry, health, ..
    } = Telemetry::start(cfg.metrics_listen, cancel.clone()).await?;
    let metrics = CloudMetrics::new(registry.clone());

    let sdk = cfg.aws.sdk_config().await;
    let endpoint_override = cfg.aws.endpoint_url.is_some();
    let dead_location = Location::parse(&cfg.dead_letter_location()).map_err(RunError::Sink)?;
    let failing_retry = Duration::from_millis(cfg.sink_failing_retry_ms);
    let transient_failing = Duration::from_millis(cfg.sink_transient_failing_ms);
    let monitor = |sink| {
        SinkMonitor::new(sink, health.clone(), metrics.clone(), failing_retry)
            .transient_failing_after(transient_failing)
    };
    let dead = DeadLetters::new(
        Store::open(&dead_location, &sdk, endpoint_override),
        metrics.clone(),
        monitor("dead_letter"),
    );

    let timestream = match &cfg.timestream {
        Some(t) => {
            let Some(client) = timestream::client(&sdk, endpoint_override, &health, &cancel).await
            else {
                return Ok(());
            };
            let window = timestream::time_window(&client, t).await;
            tracing::info!(window = ?window, "Timestream table");
            Some((client, t.clone(), window, monitor(timestream::NAME)))
        }
        None => None,
    };
    let influx = match &cfg.influxdb {
        Some(i) => Some((
            InfluxClient::new(i).map_err(RunError::Sink)?,
            i.clone(),
            monitor(crate::influx::NAME),
        )),
        None => None,
    };
    let parquet = match &cfg.parquet {
        Some(p) => {
            let location = Location::parse(&p.location).map_err(RunError::Sink)?;
            Some((
                Store::open(&location, &sdk, endpoint_override),
                p.clone(),
                monitor("parquet"),
            ))
        }
        None => None,
    };
    let alarm_store = alarm_store(&cfg, &sdk, endpoint_override)?;
    let alarms = match (&cfg.alarms, &alarm_store, &cfg.parquet) {
        (Some(a), Some(store), Some(p)) => Some((
            store.clone(),
            a.clone(),
            compaction::merge::WriteSettings {
                row_group_rows: p.row_group_rows,
                zstd_level: p.zstd_level,
            },
            monitor(crate::alarms::NAME),
        )),
        _ => None,
    };
    let sns = match (&cfg.alarms, &alarm_store) {
        (Some(a), Some(store)) => a.sns.as_ref().map(|s| {
            (
                aws_sdk_sns::Client::new(&sdk),
                s.clone(),
                store.clone(),
                monitor(crate::alarms::sns::NAME),
            )
        }),
        _ => None,
    };
    let table = LeaseTable::new(aws_sdk_dynamodb::Client::new(&sdk), &cfg.leases.table);
    let lease_cancel = CancellationToken::new();
    let compactor = match (&parquet, cfg.compaction.enabled) {
        (Some((store, p, _)), true) => {
            let (compactor, keeper) = compaction::start(
                store.clone(),
                alarm_store.clone(),
                cfg.compaction.clone(),
                p,
                table.clone(),
                cfg.leases.worker(),
                cfg.leases.lease_ms,
                &registry,
                lease_cancel.clone(),
            );
            let compactor = compactor.with_health(health.clone());
            let c = cancel.clone();
            Some((tokio::spawn(async move { compactor.run(c).await }), keeper))
        }
        _ => None,
    };
    let (m, d) = (metrics.clone(), dead.clone());
    let staged = StagedRows::default();
    let sinks: SinkFactory = Arc::new(move |cancel: &CancellationToken| {
        let mut v: Vec<Box<dyn Sink>> = Vec::new();
        if let Some((client, t, window, monitor)) = &timestream {
            v.push(Box::new(TimestreamSink::new(
                client.clone(),
                t.clone(),
                *window,
                d.for_worker(cancel),
                m.clone(),
                monitor.clone(),
                cancel.clone(),
            )));
        }
        if let Some((client, i, monitor)) = &influx {
            v.push(Box::new(InfluxSink::new(
                client.clone(),
                i.clone(),
                d.for_worker(cancel),
                m.clone(),
                monitor.clone(),
                cancel.clone(),
            )));
        }
        if let Some((store, p, monitor)) = &parquet {
            v.push(Box::new(ParquetSink::new(
                store.clone(),
                p.clone(),
                staged.clone(),
                m.clone(),
                monitor.clone(),
                cancel.clone(),
            )));
        }
        if let Some((store, a, settings, monitor)) = &alarms {
            v.push(Box::new(AlarmSink::new(
                store.clone(),
                a,
                *settings,
                monitor.clone(),
                cancel.clone(),
            )));
        }
        if let Some((client, s, store, monitor)) = &sns {
            v.push(Box::new(SnsSink::new(
                client.clone(),
                s.clone(),
                store.clone(),
                m.clone(),
                monitor.clone(),
                cancel.clone(),
            )));
        }
        v
    });

    let me = cfg.leases.worker();
    let shared = Arc::new(Shared {
        table,
        me: me.clone(),
        kinesis: aws_sdk_kinesis::Client::new(&sdk),
        read: ReadParams {
            stream: cfg.kinesis.stream.clone(),
            max_records: cfg.kinesis.max_records_per_get,
            idle_poll: Duration::from_millis(cfg.kinesis.idle_poll_ms),
            gone_after: 2 * Duration::from_millis(cfg.kinesis.shard_refresh_ms),
        },
        queue_capacity: cfg.kinesis.queue_capacity,
        commit_interval: Duration::from_millis(cfg.kinesis.commit_interval_ms),
        commit_idle: Duration::from_millis(cfg.kinesis.commit_idle_ms),
        sinks,
        warmup: Duration::from_secs(cfg.dedup.warmup_s),
        dedup: Arc::new(Mutex::new(BatchDedup::new(
            cfg.dedup.max_bytes(),
            cfg.dedup.window_batches,
        ))),
        dead,
        metrics,
    });
    health.set("consumer", true, "");
    tracing::info!(stream = %cfg.kinesis.stream, worker = %me, "cloud consumer running");
    consumer::run(
        shared,
        cfg.kinesis.clone(),
        cfg.leases.clone(),
        health,
        cancel,
    )
    .await;
    if let Some((task, keeper)) = compactor {
        let _ = task.await;
        lease_cancel.cancel();
        let _ = keeper.await;
    }
    tracing::info!("cloud consumer stopped");
    Ok(())
}

/// `fieldlink-cloud compact`: runs only the compactor (no shard workers) until `cancel` fires, or one round with
/// `once` (waiting up to three lease durations for the lease). Returns the hours a `once` round published.
pub async fn compact(
    cfg: Config,
    once: bool,
    cancel: CancellationToken,
) -> Result<usize, RunError> {
    let Some(p) = &cfg.parquet else {
        return Err(RunError::Sink(
            "compact needs a [parquet] section (the location to publish)".into(),
        ));
    };
    // One round is a job, not a service: nothing scrapes it, and it must not clash with a `run` on the same host.
    let (registry, health) = if once {
        (fieldlink_ops::metrics::Registry::new(), None)
    } else {
        let t = Telemetry::start(cfg.metrics_listen, cancel.clone()).await?;
        (t.registry, Some(t.health))
    };
    let sdk = cfg.aws.sdk_config().await;
    let location = Location::parse(&p.location).map_err(RunError::Sink)?;
    let store = Store::open(&location, &sdk, cfg.aws.endpoint_url.is_some());
    let alarm_store = alarm_store(&cfg, &sdk, cfg.aws.endpoint_url.is_some())?;
    let table = LeaseTable::new(aws_sdk_dynamodb::Client::new(&sdk), &cfg.leases.table);
    table
        .ensure()
        .await
        .map_err(|e| RunError::Sink(e.to_string()))?;
    let lease_cancel = CancellationToken::new();
    let (compactor, keeper) = compaction::start(
        store,
        alarm_store,
        cfg.compaction.clone(),
        p,
        table,
        cfg.leases.worker(),
        cfg.leases.lease_ms,
        &registry,
        lease_cancel.clone(),
    );
    let result = if once {
        let wait = Duration::from_millis(cfg.leases.lease_ms * 3);
        compactor
            .once(wait, &cancel)
            .await
            .map(|p| p.len())
            .map_err(|e| RunError::Sink(format!("compaction: {e}")))
    } else {
        tracing::info!(location = %p.location, "compactor running");
        let compactor = match health {
            Some(h) => compactor.with_health(h),
            None => compactor,
        };
        compactor.run(cancel).await;
        Ok(0)
    };
    lease_cancel.cancel();
    let _ = keeper.await;
    result
}

/// The alarm table's store, with `[alarms]`.
fn alarm_store(
    cfg: &Config,
    sdk: &aws_config::SdkConfig,
    endpoint_override: bool,
) -> Result<Option<Store>, RunError> {
    cfg.alarms
        .as_ref()
        .map(|a| {
            Location::parse(&a.location)
                .map(|l| Store::open(&l, sdk, endpoint_override))
                .map_err(RunError::Sink)
        })
        .transpose()
}

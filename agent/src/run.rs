//! Wiring: starts every component, waits for the cancellation token, then shuts down in order:
//! sources stop → unsealed readings are sealed → the sender drains for `shutdown_drain_ms` → the buffer closes.

use crate::buffer::{self, BufferError};
use crate::config::Config;
use crate::kinesis::Sender;
use crate::metrics::AgentMetrics;
use fieldlink_ops::http::{BindError, Telemetry};
use std::time::Duration;
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
}

/// Runs the agent until `cancel` fires, then shuts down gracefully.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<(), RunError> {
    let Telemetry {
        registry, health, ..
    } = Telemetry::start(cfg.metrics_listen, cancel.clone()).await?;
    let metrics = AgentMetrics::new(registry.clone());

    let (buffer, buffer_thread) = buffer::spawn(
        &cfg.buffer,
        &cfg.batch,
        &cfg.order,
        &cfg.agent_id,
        metrics.clone(),
    )?;
    health.set("buffer", true, "");

    let sdk = cfg.aws.sdk_config().await;
    // The sender retries (only the failed entries, with backoff) and adapts its rate to throttling itself; SDK
    // retries would hide throttling from it.
    let kinesis = aws_sdk_kinesis::Client::from_conf(
        aws_sdk_kinesis::config::Builder::from(&sdk)
            .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
            .build(),
    );
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
        tokio::spawn(async move {
            sender.run(&stop).await;
            sender
        })
    };

    let mut sources = JoinSet::new();
    for m in cfg.mqtt.clone() {
        sources.spawn(crate::mqtt::run(
            m,
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
    tracing::info!(agent_id = %cfg.agent_id, mqtt = cfg.mqtt.len(), modbus = cfg.modbus.len(), "agent running");

    cancel.cancelled().await;
    tracing::info!("shutting down: stopping sources");
    while sources.join_next().await.is_some() {}
    let _ = buffer.flush().await;
    sender_stop.cancel();
    if let Ok(mut sender) = sender_task.await {
        tracing::info!(
            deadline_ms = cfg.kinesis.shutdown_drain_ms,
            "draining sealed batches to Kinesis"
        );
        sender
            .drain(Duration::from_millis(cfg.kinesis.shutdown_drain_ms))
            .await;
    }
    drop(buffer);
    let _ = tokio::task::spawn_blocking(move || buffer_thread.join()).await;
    tracing::info!(stats = %metrics.pending_batches.get(), "agent stopped; pending batches stay buffered");
    Ok(())
}

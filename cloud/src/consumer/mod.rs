//! Kinesis consumer: one task per shard, each feeding a bounded channel with the records of one `GetRecords`
//! call. The shard list is refreshed periodically so shards created by resharding are read too.
//!
//! Iterators that expire are renewed `AFTER_SEQUENCE_NUMBER` the last record handed on. Sequence numbers are
//! opaque strings. Every call has a timeout (the SDK's attempt timeout) and is retried with backoff.

mod config;

pub use config::{ConsumerConfig, StartPosition};

use aws_sdk_kinesis::error::DisplayErrorContext;
use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::types::ShardIteratorType;
use fieldlink_ops::backoff::Backoff;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The records of one `GetRecords` call.
#[derive(Debug)]
pub struct ShardRecords {
    /// Shard id.
    pub shard: String,
    /// `(sequence number, data)` in shard order.
    pub records: Vec<(String, Vec<u8>)>,
    /// How far behind the tip of the shard this read was.
    pub millis_behind: i64,
}

/// Reads every shard of `cfg.stream` into `tx` until `cancel` fires.
pub async fn run(
    client: aws_sdk_kinesis::Client,
    cfg: ConsumerConfig,
    tx: mpsc::Sender<ShardRecords>,
    cancel: CancellationToken,
) {
    let mut started: HashSet<String> = HashSet::new();
    let mut tasks = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        match list_shards(&client, &cfg.stream).await {
            Ok(shards) => {
                backoff.reset();
                for shard in shards {
                    if started.insert(shard.clone()) {
                        tracing::info!(shard = %shard, "reading shard");
                        tasks.spawn(read_shard(
                            client.clone(),
                            cfg.clone(),
                            shard,
                            tx.clone(),
                            cancel.clone(),
                        ));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, stream = %cfg.stream, "ListShards failed"),
        }
        let wait = if started.is_empty() {
            backoff.next_delay()
        } else {
            Duration::from_millis(cfg.shard_refresh_ms)
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

async fn list_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let req = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let resp = req
            .send()
            .await
            .map_err(|e| DisplayErrorContext(&e).to_string())?;
        out.extend(resp.shards().iter().map(|s| s.shard_id().to_owned()));
        match resp.next_token() {
            Some(t) => token = Some(t.to_owned()),
            None => return Ok(out),
        }
    }
}

async fn iterator(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shard: &str,
    start: StartPosition,
    after: Option<&str>,
) -> Result<Option<String>, String> {
    let mut req = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard);
    req = match (after, start) {
        (Some(seq), _) => req
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(seq),
        (None, StartPosition::TrimHorizon) => {
            req.shard_iterator_type(ShardIteratorType::TrimHorizon)
        }
        (None, StartPosition::Latest) => req.shard_iterator_type(ShardIteratorType::Latest),
    };
    let resp = req
        .send()
        .await
        .map_err(|e| DisplayErrorContext(&e).to_string())?;
    Ok(resp.shard_iterator().map(str::to_owned))
}

async fn read_shard(
    client: aws_sdk_kinesis::Client,
    cfg: ConsumerConfig,
    shard: String,
    tx: mpsc::Sender<ShardRecords>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut last_seq: Option<String> = None;
    let mut it: Option<String> = None;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let current = match it.take() {
            Some(i) => i,
            None => {
                match iterator(&client, &cfg.stream, &shard, cfg.start, last_seq.as_deref()).await {
                    Ok(Some(i)) => i,
                    Ok(None) => {
                        tracing::info!(shard = %shard, "shard has no iterator (closed)");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(shard = %shard, error = %e, "GetShardIterator failed");
                        sleep_or_cancel(backoff.next_delay(), &cancel).await;
                        continue;
                    }
                }
            }
        };
        let resp = tokio::select! {
            _ = cancel.cancelled() => return,
            r = client.get_records().shard_iterator(&current).limit(cfg.max_records_per_get).send() => r,
        };
        match resp {
            Ok(out) => {
                backoff.reset();
                let records: Vec<(String, Vec<u8>)> = out
                    .records()
                    .iter()
                    .map(|r| (r.sequence_number().to_owned(), r.data().as_ref().to_vec()))
                    .collect();
                let empty = records.is_empty();
                if let Some((seq, _)) = records.last() {
                    last_seq = Some(seq.clone());
                }
                if !empty {
                    let msg = ShardRecords {
                        shard: shard.clone(),
                        records,
                        millis_behind: out.millis_behind_latest().unwrap_or(0),
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        sent = tx.send(msg) => if sent.is_err() { return },
                    }
                }
                match out.next_shard_iterator() {
                    Some(next) => it = Some(next.to_owned()),
                    None => {
                        tracing::info!(shard = %shard, "shard closed and fully read");
                        return;
                    }
                }
                if empty {
                    sleep_or_cancel(Duration::from_millis(cfg.idle_poll_ms), &cancel).await;
                }
            }
            Err(e) => {
                let expired = matches!(
                    e.as_service_error(),
                    Some(GetRecordsError::ExpiredIteratorException(_))
                );
                if expired {
                    tracing::debug!(shard = %shard, "iterator expired; renewing");
                } else {
                    tracing::warn!(shard = %shard, error = %DisplayErrorContext(&e), "GetRecords failed");
                    it = Some(current);
                    sleep_or_cancel(backoff.next_delay(), &cancel).await;
                }
            }
        }
    }
}

async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

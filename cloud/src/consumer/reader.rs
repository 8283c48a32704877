//! Reads one shard into a bounded channel, from a checkpoint, until the shard ends or the reader is
//! cancelled. Iterators that expire are renewed `AFTER_SEQUENCE_NUMBER` the last record handed on. Every call
//! has a timeout (the SDK's) and failures are retried with backoff.

use aws_sdk_kinesis::error::DisplayErrorContext;
use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_kinesis::types::ShardIteratorType;
use fieldlink_ops::backoff::Backoff;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a reader hands on.
#[derive(Debug)]
pub(crate) enum ShardItem {
    /// The records of one `GetRecords` call: `(sequence number, data)` in shard order (none when the call
    /// returned none: the position still moves).
    Records {
        records: Vec<(String, Vec<u8>)>,
        millis_behind: i64,
        /// Unix ms before which every record that arrived in the shard is in this call or an earlier one: the
        /// call's start on this host's clock less `MillisBehindLatest` (the call's start when caught up).
        position_ms: i64,
    },
    /// The shard is closed (split or merged) and every record was handed on.
    End,
}

/// Where reading starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Start {
    After(String),
    TrimHorizon,
    /// Records that arrived at this Unix ms or later.
    AtTimestamp(i64),
    Latest,
}

/// Reading parameters.
#[derive(Debug, Clone)]
pub(crate) struct ReadParams {
    pub(crate) stream: String,
    pub(crate) max_records: i32,
    pub(crate) idle_poll: Duration,
    /// How long a shard must stay out of the stream's shard list, while Kinesis answers that it does not exist,
    /// before it is taken as ended (a stale list or a passing error must not end a live shard).
    pub(crate) gone_after: Duration,
}

/// Why `GetShardIterator` failed: the message, and whether Kinesis answered that the shard (or the stream) does not
/// exist.
struct IteratorError {
    not_found: bool,
    message: String,
}

async fn iterator(
    client: &aws_sdk_kinesis::Client,
    p: &ReadParams,
    shard: &str,
    start: &Start,
) -> Result<Option<String>, IteratorError> {
    let req = client
        .get_shard_iterator()
        .stream_name(&p.stream)
        .shard_id(shard);
    let req = match start {
        Start::After(seq) => req
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(seq),
        Start::TrimHorizon => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        Start::AtTimestamp(ms) => req
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(*ms)),
        Start::Latest => req.shard_iterator_type(ShardIteratorType::Latest),
    };
    let resp = req.send().await.map_err(|e| IteratorError {
        not_found: matches!(
            e.as_service_error(),
            Some(GetShardIteratorError::ResourceNotFoundException(_))
        ),
        message: DisplayErrorContext(&e).to_string(),
    })?;
    Ok(resp.shard_iterator().map(str::to_owned))
}

/// Whether `shard` is missing from the stream's shard list (a list that could not be read proves nothing).
async fn gone(client: &aws_sdk_kinesis::Client, stream: &str, shard: &str) -> bool {
    super::list_shards(client, stream)
        .await
        .is_ok_and(|shards| !shards.iter().any(|s| s.id == shard))
}

/// Most records a warm-up reads, and longest it takes: it only makes resends rarer, it must not delay the shard.
const WARM_MAX_RECORDS: usize = 200_000;
const WARM_MAX_TIME: Duration = Duration::from_secs(60);

/// Reads the records of `shard` that arrived since `since_ms` up to and including `checkpoint` — records a
/// previous reader landed — and claims each in `dedup` without landing it, so the resend memory knows them.
/// Best effort and bounded: errors, the time limit or the record limit end it early. Returns the records claimed.
pub(crate) async fn warm(
    client: &aws_sdk_kinesis::Client,
    p: &ReadParams,
    shard: &str,
    checkpoint: &str,
    since_ms: i64,
    dedup: &std::sync::Mutex<crate::land::dedup::BatchDedup>,
    cancel: &CancellationToken,
) -> usize {
    use crate::land::dedup;
    let deadline = tokio::time::Instant::now() + WARM_MAX_TIME;
    let first = client
        .get_shard_iterator()
        .stream_name(&p.stream)
        .shard_id(shard)
        .shard_iterator_type(ShardIteratorType::AtTimestamp)
        .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(since_ms))
        .send();
    let mut it = match tokio::time::timeout_at(deadline, first).await {
        Ok(Ok(r)) => r.shard_iterator().map(str::to_owned),
        Ok(Err(e)) => {
            tracing::warn!(shard = %shard, error = %DisplayErrorContext(&e), "resend memory warm-up: GetShardIterator failed; skipped");
            return 0;
        }
        Err(_) => return 0,
    };
    let mut claimed = 0;
    while let Some(current) = it.take() {
        if cancel.is_cancelled() || claimed >= WARM_MAX_RECORDS {
            break;
        }
        let call = client
            .get_records()
            .shard_iterator(&current)
            .limit(p.max_records)
            .send();
        let out = match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                tracing::warn!(shard = %shard, error = %DisplayErrorContext(&e), "resend memory warm-up: GetRecords failed; ended early");
                break;
            }
            Err(_) => {
                tracing::warn!(shard = %shard, claimed, "resend memory warm-up took too long; ended early");
                break;
            }
        };
        let now = fieldlink_ops::unix_ms();
        let mut past_checkpoint = false;
        {
            let Ok(mut d) = dedup.lock() else { break };
            for r in out.records() {
                let seq = r.sequence_number();
                if crate::lease::plan::cmp_seq(seq, checkpoint) == std::cmp::Ordering::Greater {
                    past_checkpoint = true;
                    break;
                }
                let data = r.data().as_ref();
                if let Ok(h) = fieldlink_proto::peek_header(data) {
                    d.claim(
                        h.agent_id,
                        h.epoch,
                        h.seq,
                        dedup::tag(shard, seq),
                        dedup::content_tag(data),
                        now,
                    );
                    claimed += 1;
                }
            }
        }
        let caught_up = out.records().is_empty() && out.millis_behind_latest().unwrap_or(0) == 0;
        if past_checkpoint || caught_up {
            break;
        }
        it = out.next_shard_iterator().map(str::to_owned);
    }
    claimed
}

/// Reads `shard` from `start` into `tx` until it ends or `cancel` fires.
pub(crate) async fn read(
    client: aws_sdk_kinesis::Client,
    p: ReadParams,
    shard: String,
    mut start: Start,
    tx: mpsc::Sender<ShardItem>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut it: Option<String> = None;
    // Since when Kinesis has said the shard does not exist and the shard list has not had it.
    let mut missing_since: Option<std::time::Instant> = None;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let current = match it.take() {
            Some(i) => i,
            None => match iterator(&client, &p, &shard, &start).await {
                Ok(Some(i)) => i,
                Ok(None) => {
                    let _ = tx.send(ShardItem::End).await;
                    return;
                }
                Err(e) => {
                    let missing = e.not_found && gone(&client, &p.stream, &shard).await;
                    if !missing {
                        missing_since = None;
                    } else if missing_since
                        .get_or_insert_with(std::time::Instant::now)
                        .elapsed()
                        >= p.gone_after
                    {
                        // A closed shard trimmed from the stream (the consumer fell behind by more than the
                        // retention period): nothing in it can be read any more. Read as ended, so that its
                        // children start and the fleet's watermark moves on; retrying would stall both for good.
                        tracing::error!(shard = %shard, error = %e.message, "the shard is no longer in the stream (past the retention period): its records not read are lost; taken as ended");
                        let _ = tx.send(ShardItem::End).await;
                        return;
                    }
                    tracing::warn!(shard = %shard, error = %e.message, "GetShardIterator failed");
                    sleep_or_cancel(backoff.next_delay(), &cancel).await;
                    continue;
                }
            },
        };
        let read_at = fieldlink_ops::unix_ms();
        let resp = tokio::select! {
            _ = cancel.cancelled() => return,
            r = client.get_records().shard_iterator(&current).limit(p.max_records).send() => r,
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
                    start = Start::After(seq.clone());
                }
                let millis_behind = out.millis_behind_latest().unwrap_or(0);
                let item = ShardItem::Records {
                    records,
                    millis_behind,
                    position_ms: read_at - millis_behind.max(0),
                };
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    sent = tx.send(item) => if sent.is_err() { return },
                }
                match out.next_shard_iterator() {
                    Some(next) => it = Some(next.to_owned()),
                    None => {
                        let _ = tx.send(ShardItem::End).await;
                        return;
                    }
                }
                if empty {
                    sleep_or_cancel(p.idle_poll, &cancel).await;
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

pub(crate) async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

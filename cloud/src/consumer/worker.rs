//! One shard worker: reads its shard from the checkpoint, lands every record, and commits.
//!
//! A commit (see [`crate::land`]): record its end as `pendingCheckpoint` in the lease (conditional on the
//! worker's [`Fence`]: a worker whose lease was lost, even if its process took it back since, writes nothing),
//! commit every sink (Parquet writes its files, named after the commit's first record), then
//! move the checkpoint to its end. A worker that starts on a lease with a pending commit reads from the
//! checkpoint and commits exactly at the pending end, whatever its own size and time triggers say, so the
//! repeated commit writes the same objects with the same rows.
//!
//! The checkpoint write also sets the shard's time watermark (`watermarkMs`): the position of the last
//! `GetRecords` call whose records are all in the commit (see [`ShardItem::Records`]), so every record that
//! arrived before it is durable. While nothing is uncommitted, the watermark follows the reads (at most once per
//! `commit_idle`), so an idle shard read to its tip does not hold back the compactor's closed hours.

use super::reader::{self, ReadParams, ShardItem, Start};
use crate::land::dead::DeadLetters;
use crate::land::dedup::BatchDedup;
use crate::land::{Lander, Origin, SinkFactory};
use crate::lease::plan::cmp_seq;
use crate::lease::{Fence, Lease, LeaseTable, AT_TIMESTAMP, LATEST, SHARD_END, TRIM_HORIZON};
use crate::metrics::CloudMetrics;
use fieldlink_ops::backoff::Backoff;
use std::cmp::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What every worker of the process shares.
pub(crate) struct Shared {
    pub(crate) table: LeaseTable,
    pub(crate) me: String,
    pub(crate) kinesis: aws_sdk_kinesis::Client,
    pub(crate) read: ReadParams,
    pub(crate) queue_capacity: usize,
    pub(crate) commit_interval: Duration,
    pub(crate) commit_idle: Duration,
    pub(crate) sinks: SinkFactory,
    pub(crate) dedup: Arc<Mutex<BatchDedup>>,
    /// How far back before the checkpoint a starting worker reads into `dedup`.
    pub(crate) warmup: Duration,
    pub(crate) dead: DeadLetters,
    pub(crate) metrics: CloudMetrics,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("me", &self.me).finish()
    }
}

/// How a worker ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The shard was read to its end and checkpointed `SHARD_END`.
    Finished,
    /// Stopped on request after committing.
    Stopped,
    /// Another worker owns the shard now.
    Lost,
    /// Something failed; nothing past the checkpoint was committed.
    Failed(String),
    /// Stopped on request while a sink was still retrying (failing): nothing past the checkpoint was
    /// committed; a commit it began (`pendingCheckpoint`) is repeated by the shard's next reader.
    Interrupted(String),
}

struct Commit {
    first: Option<Origin>,
    last: Option<String>,
    since: Instant,
    last_record: Instant,
    /// The end of a commit a previous owner started: commit exactly there.
    pending: Option<String>,
    /// What the lease writes of this worker are conditional on.
    fence: Fence,
    /// The position of the last read whose records were all landed (staged): the watermark of a commit now.
    position: Option<i64>,
    /// The watermark last written, and when.
    watermark: Option<(i64, Instant)>,
}

/// Where a lease's `checkpoint` says reading starts; `None` for a shard read to its end.
fn start_of(checkpoint: &str) -> Result<Option<Start>, String> {
    Ok(Some(match checkpoint {
        SHARD_END => return Ok(None),
        TRIM_HORIZON => Start::TrimHorizon,
        LATEST => Start::Latest,
        other => match other.strip_prefix(AT_TIMESTAMP).map(str::parse::<i64>) {
            Some(Ok(ms)) => Start::AtTimestamp(ms),
            Some(Err(_)) => return Err(format!("unreadable checkpoint {other:?}")),
            None => Start::After(other.to_owned()),
        },
    }))
}

/// Runs a worker for `lease` (just taken by this process) until the shard ends, `stop` fires, or it fails.
pub(crate) async fn work(shared: Arc<Shared>, lease: Lease, stop: CancellationToken) -> Outcome {
    let shard = lease.key.clone();
    let Some(fence) = Fence::of(&lease) else {
        return Outcome::Failed("the lease was not taken by this worker".into());
    };
    let start = match start_of(&lease.checkpoint) {
        Ok(Some(start)) => start,
        Ok(None) => return Outcome::Finished,
        Err(e) => return Outcome::Failed(e),
    };
    tracing::info!(shard = %shard, checkpoint = %lease.checkpoint, pending = ?lease.pending, "shard worker starting");
    if let (Start::After(checkpoint), false) = (&start, shared.warmup.is_zero()) {
        // Another process may have landed the records before the checkpoint: learn them, so an agent's resend
        // of one of them after the checkpoint is skipped rather than landed twice.
        let since = warm_since(lease.watermark_ms, fieldlink_ops::unix_ms(), shared.warmup);
        let t = Instant::now();
        let claimed = reader::warm(
            &shared.kinesis,
            &shared.read,
            &shard,
            checkpoint,
            since,
            &shared.dedup,
            &stop,
        )
        .await;
        tracing::info!(shard = %shard, records = claimed, took_ms = t.elapsed().as_millis() as u64, "resend memory warmed with the records before the checkpoint");
    }
    let reader_stop = CancellationToken::new();
    let _stop_reader = reader_stop.clone().drop_guard();
    let (tx, mut rx) = mpsc::channel(shared.queue_capacity);
    tokio::spawn(reader::read(
        shared.kinesis.clone(),
        shared.read.clone(),
        shard.clone(),
        start,
        tx,
        reader_stop,
    ));
    let mut lander = Lander::new(
        (shared.sinks)(&stop),
        shared.dedup.clone(),
        shared.dead.for_worker(&stop),
        shared.metrics.clone(),
    );
    let mut c = Commit {
        first: None,
        last: None,
        since: Instant::now(),
        last_record: Instant::now(),
        pending: lease.pending.clone(),
        fence,
        position: None,
        watermark: None,
    };
    let lag = shared.metrics.shard_lag(&shard);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let outcome = loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                if c.pending.is_none() {
                    if let Err(o) = commit(&shared, &shard, &mut lander, &mut c).await {
                        break o;
                    }
                }
                break Outcome::Stopped;
            }
            item = rx.recv() => match item {
                None => break Outcome::Failed("shard reader stopped".into()),
                Some(ShardItem::End) => {
                    if let Err(o) = commit(&shared, &shard, &mut lander, &mut c).await {
                        break o;
                    }
                    break match table_op(|| shared.table.checkpoint(&shard, SHARD_END, &c.fence)).await {
                        Ok(true) => {
                            tracing::info!(shard = %shard, "shard read to its end");
                            Outcome::Finished
                        }
                        Ok(false) => Outcome::Lost,
                        Err(e) => Outcome::Failed(e),
                    };
                }
                Some(ShardItem::Records { records, millis_behind, position_ms }) => {
                    lag.set(millis_behind);
                    if let Err(o) = land_all(&shared, &shard, &mut lander, &mut c, records).await {
                        break o;
                    }
                    c.position = Some(position_ms);
                }
            },
            _ = tick.tick() => {
                // A sink may want a commit without a new record: the process's staged rows past their budget
                // while this shard, holding its share, gets nothing more to read.
                let due = c.pending.is_none()
                    && c.first.is_some()
                    && (c.since.elapsed() >= shared.commit_interval
                        || c.last_record.elapsed() >= shared.commit_idle
                        || lander.wants_commit());
                if due {
                    if let Err(o) = commit(&shared, &shard, &mut lander, &mut c).await {
                        break o;
                    }
                }
                if let Err(o) = idle_watermark(&shared, &shard, &mut c).await {
                    break o;
                }
            }
        }
    };
    let outcome = match outcome {
        Outcome::Failed(why) if stop.is_cancelled() => Outcome::Interrupted(why),
        o => o,
    };
    if !matches!(outcome, Outcome::Finished | Outcome::Stopped) {
        lander.discard();
    }
    tracing::info!(shard = %shard, outcome = ?outcome, "shard worker ended");
    outcome
}

async fn land_all(
    shared: &Shared,
    shard: &str,
    lander: &mut Lander,
    c: &mut Commit,
    records: Vec<(String, Vec<u8>)>,
) -> Result<(), Outcome> {
    for (seq, data) in records {
        if let Some(p) = &c.pending {
            // The pending end is gone (trimmed): cut where it would have been.
            if cmp_seq(&seq, p) == Ordering::Greater {
                commit(shared, shard, lander, c).await?;
                c.pending = None;
            }
        }
        let origin = Origin {
            shard: shard.to_owned(),
            sequence_number: seq,
        };
        lander
            .land(&data, &origin)
            .await
            .map_err(|e| Outcome::Failed(e.to_string()))?;
        let now = Instant::now();
        if c.first.is_none() {
            c.since = now;
        }
        c.last_record = now;
        c.last = Some(origin.sequence_number.clone());
        let reached = c.pending.as_deref() == Some(origin.sequence_number.as_str());
        c.first.get_or_insert(origin);
        if reached {
            commit(shared, shard, lander, c).await?;
            c.pending = None;
        } else if c.pending.is_none() && lander.wants_commit() {
            commit(shared, shard, lander, c).await?;
        }
    }
    Ok(())
}

/// Commits what was landed since the checkpoint. `Err` ends the worker.
async fn commit(
    shared: &Shared,
    shard: &str,
    lander: &mut Lander,
    c: &mut Commit,
) -> Result<(), Outcome> {
    let (Some(first), Some(last)) = (c.first.take(), c.last.take()) else {
        return Ok(());
    };
    match table_op(|| shared.table.begin_commit(shard, &last, &c.fence)).await {
        Ok(true) => {}
        Ok(false) => return Err(Outcome::Lost),
        Err(e) => return Err(Outcome::Failed(e)),
    }
    lander
        .commit(&first)
        .await
        .map_err(|e| Outcome::Failed(e.to_string()))?;
    let watermark = c.position;
    match table_op(|| {
        shared
            .table
            .checkpoint_at(shard, &last, watermark, &c.fence)
    })
    .await
    {
        Ok(true) => {}
        Ok(false) => return Err(Outcome::Lost),
        Err(e) => return Err(Outcome::Failed(e)),
    }
    if let Some(w) = watermark {
        c.watermark = Some((w, Instant::now()));
    }
    shared.metrics.checkpoints.inc();
    tracing::debug!(shard = %shard, first = %first.sequence_number, last = %last, "checkpoint");
    Ok(())
}

/// Moves the shard's watermark to the reads while nothing is uncommitted (at most once per `commit_idle`), so
/// an idle shard read to its tip does not hold back closed hours. `Err` ends the worker.
async fn idle_watermark(shared: &Shared, shard: &str, c: &mut Commit) -> Result<(), Outcome> {
    let Some(position) = c.position else {
        return Ok(());
    };
    let due = c.first.is_none()
        && c.pending.is_none()
        && c.watermark
            .is_none_or(|(w, at)| position > w && at.elapsed() >= shared.commit_idle);
    if !due {
        return Ok(());
    }
    match table_op(|| shared.table.watermark(shard, position, &c.fence)).await {
        Ok(true) => {
            c.watermark = Some((position, Instant::now()));
            Ok(())
        }
        Ok(false) => Err(Outcome::Lost),
        Err(e) => Err(Outcome::Failed(e)),
    }
}

/// A lease-table call, retried a few times on errors (not on a failed condition, which is an answer).
async fn table_op<F, Fut>(f: F) -> Result<bool, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<bool, crate::lease::TableError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if backoff.attempts() < 5 => {
                tracing::warn!(error = %e, "lease table call failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Where the resend memory's warm-up starts reading: `warmup` before the shard's time watermark (every record
/// that arrived before it is checkpointed), not before now. A shard taken while it is behind (after an outage of
/// the cloud, or with workers added to drain a backlog) has its checkpoint far behind now, and its last landed
/// records with it: counted back from now, the warm-up would start past the checkpoint and learn nothing. Never
/// later than now (Kinesis refuses a timestamp ahead of its clock); from now without a watermark.
fn warm_since(watermark_ms: Option<i64>, now_ms: i64, warmup: Duration) -> i64 {
    watermark_ms.unwrap_or(now_ms).min(now_ms) - warmup.as_millis() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::at_timestamp;

    #[test]
    fn the_warm_up_counts_back_from_the_watermark_not_from_now() {
        let five_min = Duration::from_secs(300);
        let now = 1_764_900_000_000;
        // Two hours behind: the five minutes before the checkpoint, not the last five.
        assert_eq!(
            warm_since(Some(now - 7_200_000), now, five_min),
            now - 7_500_000
        );
        assert_eq!(warm_since(None, now, five_min), now - 300_000);
        assert_eq!(
            warm_since(Some(now + 60_000), now, five_min),
            now - 300_000,
            "a watermark ahead of this host's clock"
        );
    }

    #[test]
    fn every_checkpoint_form_reads_from_where_it_says() {
        assert_eq!(start_of(SHARD_END), Ok(None));
        assert_eq!(start_of(TRIM_HORIZON), Ok(Some(Start::TrimHorizon)));
        assert_eq!(start_of(LATEST), Ok(Some(Start::Latest)));
        assert_eq!(
            start_of(&at_timestamp(1_764_900_000_123)),
            Ok(Some(Start::AtTimestamp(1_764_900_000_123)))
        );
        let seq = "49590338271490256608559692538361571095921575989136588898";
        assert_eq!(start_of(seq), Ok(Some(Start::After(seq.into()))));
        assert!(start_of("AT_TIMESTAMP:soon").is_err());
    }
}

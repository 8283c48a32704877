//! Kinesis consumer with shard leases, the Kinesis Client Library's way.
//!
//! The coordinator (this module) keeps the lease table in step with the stream (a lease per shard, with its
//! parents), and every third of a lease duration: renews the leases it holds (a renewal that fails means the
//! shard has another owner: its worker is stopped without committing), then takes free, expired or, to even
//! out the load, stolen leases ([`crate::lease::plan`]). Each held lease has one [`worker`] task, which reads
//! its shard into a bounded channel, lands records and commits; a shard's children are started only after it
//! is read to its end. On shutdown workers commit (a worker whose sink is failing gives up its retries and
//! commits nothing: [`crate::land::retry`]), then leases are released so other workers take them at once.

mod config;
pub(crate) mod reader;
pub(crate) mod worker;

pub use config::{ConsumerConfig, StartPosition};

use crate::lease::plan::{self, Action, Observer};
use crate::lease::{at_timestamp, Fence, Lease, LeaseConfig, LeaseTable, TRIM_HORIZON};
use aws_sdk_kinesis::error::DisplayErrorContext;
use fieldlink_ops::backoff::Backoff;
use fieldlink_ops::metrics::Health;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::{Outcome, Shared};

/// A shard as `ListShards` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// Shard id.
    pub id: String,
    /// `ParentShardId` and `AdjacentParentShardId`, when set.
    pub parents: Vec<String>,
}

/// `start = "latest"` reads a new shard from this long before the moment the consumer created its lease: the
/// moment is the host's clock, and Kinesis refuses a timestamp later than its own (a host a little ahead would
/// otherwise skip records, or be refused until Kinesis' clock caught up).
pub const LATEST_MARGIN_MS: i64 = 5_000;

/// Every shard of `stream`, with parents.
pub async fn list_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<ShardInfo>, String> {
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
        out.extend(resp.shards().iter().map(|s| {
            ShardInfo {
                id: s.shard_id().to_owned(),
                parents: s
                    .parent_shard_id()
                    .into_iter()
                    .chain(s.adjacent_parent_shard_id())
                    .map(str::to_owned)
                    .collect(),
            }
        }));
        match resp.next_token() {
            Some(t) => token = Some(t.to_owned()),
            None => return Ok(out),
        }
    }
}

struct Held {
    counter: u64,
    fence: Fence,
    renewed: Instant,
    stop: CancellationToken,
    task: JoinHandle<Outcome>,
}

/// Runs the coordinator until `cancel` fires; then stops workers (they commit) and releases their leases.
pub(crate) async fn run(
    shared: Arc<Shared>,
    cfg: ConsumerConfig,
    leases: LeaseConfig,
    health: Health,
    cancel: CancellationToken,
) {
    let table = shared.table.clone();
    let me = shared.me.clone();
    let metrics = shared.metrics.clone();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match table.ensure().await {
            Ok(()) => break,
            Err(e) => {
                health.set("leases", false, e.to_string());
                tracing::warn!(error = %e, "lease table not ready");
                reader::sleep_or_cancel(backoff.next_delay(), &cancel).await;
                if cancel.is_cancelled() {
                    return;
                }
            }
        }
    }
    tracing::info!(worker = %me, table = %leases.table, "lease coordinator running");
    let lease_ms = leases.lease_ms;
    let round = Duration::from_millis(lease_ms / 3);
    let clock = Instant::now();
    let mut observer = Observer::new();
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut known: HashSet<String> = HashSet::new();
    // Shards whose lease vanished from the table, with the lease as last listed (none if never listed): created
    // again as it was.
    let mut vanished: HashMap<String, Option<Lease>> = HashMap::new();
    // Each shard lease as last listed.
    let mut last_listed: HashMap<String, Lease> = HashMap::new();
    let mut next_sync = Instant::now();
    while !cancel.is_cancelled() {
        // New shards get leases (children always from their start: nothing after a split is skipped).
        if Instant::now() >= next_sync {
            match list_shards(&shared.kinesis, &cfg.stream).await {
                Ok(shards) => {
                    for s in &shards {
                        if known.contains(&s.id) {
                            continue;
                        }
                        // `latest` is the moment the lease is created, written as such: a worker taking the
                        // lease after a restart, before the first checkpoint, reads from there too.
                        // A lease that vanished with the table (below) is created again as last listed: from its
                        // checkpoint (durable in every sink: nothing after it is skipped, a finished shard stays
                        // finished) with its begun commit, whatever `start` says (`latest` would skip what arrived
                        // since, the shard's start would replay the whole retention); never listed, from the
                        // shard's start.
                        let start = match cfg.start {
                            StartPosition::Latest
                                if s.parents.is_empty() && !vanished.contains_key(&s.id) =>
                            {
                                at_timestamp(fieldlink_ops::unix_ms() - LATEST_MARGIN_MS)
                            }
                            _ => TRIM_HORIZON.to_owned(),
                        };
                        let res = match vanished.get(&s.id) {
                            Some(Some(last)) => table.create_again(last).await,
                            _ => table.create(&s.id, &s.parents, &start).await,
                        };
                        match res {
                            Ok(created) => {
                                let again = vanished.remove(&s.id);
                                if let (true, Some(last)) = (created, &again) {
                                    let checkpoint = last
                                        .as_ref()
                                        .map_or(start.as_str(), LeaseTable::checkpoint_again);
                                    tracing::warn!(shard = %s.id, checkpoint = %checkpoint, "lease created again: the lease table no longer held it (deleted and recreated?)");
                                    metrics.lease_changes("recreated").inc();
                                } else if created {
                                    tracing::info!(shard = %s.id, parents = ?s.parents, "lease created");
                                }
                                known.insert(s.id.clone());
                            }
                            Err(e) => tracing::warn!(error = %e, "creating lease failed"),
                        }
                    }

                    next_sync = Instant::now() + Duration::from_millis(cfg.shard_refresh_ms);
                }
                Err(e) => {
                    tracing::warn!(error = %e, stream = %cfg.stream, "ListShards failed");
                    next_sync = Instant::now() + Duration::from_secs(2);
                }
            }
        }

        // Workers that ended.
        let ended: Vec<String> = held
            .iter()
            .filter(|(_, h)| h.task.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for k in ended {
            if let Some(h) = held.remove(&k) {
                match h.task.await {
                    Ok(Outcome::Finished) => {
                        metrics.lease_changes("finished").inc();
                        next_sync = Instant::now(); // its children may need leases
                    }
                    Ok(Outcome::Lost) => metrics.lease_changes("lost").inc(),
                    Ok(o) => {
                        tracing::warn!(shard = %k, outcome = ?o, "shard worker failed; the shard will be read again from its checkpoint")
                    }
                    Err(e) => tracing::error!(shard = %k, error = %e, "shard worker panicked"),
                }
            }
        }

        // Renew.
        let mut lost = Vec::new();
        for (k, h) in held.iter_mut() {
            match table.renew(k, h.counter, &me).await {
                Ok(true) => {
                    h.counter += 1;
                    h.renewed = Instant::now();
                }
                Ok(false) => {
                    tracing::info!(shard = %k, "lease lost to another worker; stopping its worker without committing");
                    lost.push(k.clone());
                }
                Err(e) => {
                    tracing::warn!(shard = %k, error = %e, "renewing lease failed");
                    if h.renewed.elapsed() >= Duration::from_millis(lease_ms) {
                        tracing::warn!(shard = %k, "lease could not be renewed in time; stopping its worker");
                        lost.push(k.clone());
                    }
                }
            }
        }
        for k in lost {
            if let Some(h) = held.remove(&k) {
                h.task.abort();
                metrics.lease_changes("lost").inc();
            }
        }

        // Take.
        match table.list().await {
            Ok(all) => {
                health.set("leases", true, "");
                // Leases are never deleted: a known shard without one lost it with the table (deleted and
                // recreated under the running service). Created again at once, at the checkpoint it was last listed
                // with (from the shard's start if never listed); otherwise no worker would ever read its shard
                // again, while every check said ok.
                let listed: HashSet<&str> = all.iter().map(|l| l.key.as_str()).collect();
                let before = known.len();
                known.retain(|k| {
                    let kept = listed.contains(k.as_str());
                    if !kept {
                        vanished.insert(k.clone(), last_listed.get(k).cloned());
                    }
                    kept
                });
                last_listed.clear();
                last_listed.extend(all.iter().map(|l| (l.key.clone(), l.clone())));
                if known.len() < before {
                    tracing::warn!(
                        shards = before - known.len(),
                        "shard leases vanished from the lease table; creating them again"
                    );
                    next_sync = Instant::now();
                }
                let now_ms = clock.elapsed().as_millis() as u64;
                observer.observe(&all, now_ms);
                // A held lease whose owner or take changed was lost even if a renewal has not failed yet.
                for l in &all {
                    if held.get(&l.key).is_some_and(|h| !h.fence.holds(l)) {
                        if let Some(h) = held.remove(&l.key) {
                            tracing::info!(shard = %l.key, "lease taken by another task; stopping its worker without committing");
                            h.task.abort();
                            metrics.lease_changes("lost").inc();
                        }
                    }
                }
                let holding: HashSet<String> = held
                    .iter()
                    .filter(|(_, h)| !h.task.is_finished())
                    .map(|(k, _)| k.clone())
                    .collect();
                let actions = plan::plan(
                    &me,
                    &all,
                    &holding,
                    |l| observer.expired(l, now_ms, lease_ms),
                    leases.max_leases_per_worker,
                );
                for act in actions {
                    let (key, counter, kind) = match &act {
                        Action::Take { key, counter } => (key, *counter, "taken"),
                        Action::Steal { key, counter, .. } => (key, *counter, "stolen"),
                    };
                    match table.take(key, counter, &me).await {
                        Ok(Some(lease)) => {
                            let Some(fence) = Fence::of(&lease) else {
                                tracing::warn!(shard = %key, "a taken lease came back without owner or take counter");
                                continue;
                            };
                            tracing::info!(shard = %key, how = kind, action = ?act, "lease acquired");
                            metrics.lease_changes(kind).inc();
                            let stop = CancellationToken::new();
                            let task = tokio::spawn(worker::work(
                                shared.clone(),
                                lease.clone(),
                                stop.clone(),
                            ));
                            if let Some(old) = held.insert(
                                key.clone(),
                                Held {
                                    counter: lease.counter,
                                    fence,
                                    renewed: Instant::now(),
                                    stop,
                                    task,
                                },
                            ) {
                                old.task.abort();
                            }
                        }
                        Ok(None) => {
                            tracing::debug!(shard = %key, "lease changed before it could be taken")
                        }
                        Err(e) => tracing::warn!(error = %e, "taking lease failed"),
                    }
                }
            }
            Err(e) => {
                health.set("leases", false, e.to_string());
                tracing::warn!(error = %e, "listing leases failed");
                // A table deleted under the running service is created again, as at the start (only then: a table
                // that exists but is busy, or a failed call, is waited out by the next rounds, renewing).
                if table.missing().await {
                    tokio::select! {
                        r = table.ensure() => if let Err(e) = r {
                            tracing::warn!(error = %e, "lease table not ready");
                        },
                        () = cancel.cancelled() => {}
                    }
                }
            }
        }
        metrics.leases_held.set(held.len() as i64);
        reader::sleep_or_cancel(round, &cancel).await;
    }

    tracing::info!(shards = held.len(), "stopping shard workers");
    for h in held.values() {
        h.stop.cancel();
    }
    for (k, h) in held.drain() {
        let abort = h.task.abort_handle();
        let fence = h.fence;
        match tokio::time::timeout(Duration::from_secs(60), h.task).await {
            // Interrupted: stopped while a sink failed; releasing is safe (nothing past the checkpoint was
            // committed, a begun commit is repeated by the next reader) and lets another worker go on at once.
            Ok(Ok(Outcome::Stopped | Outcome::Interrupted(_))) => {
                if let Ok(true) = table.release(&k, &fence).await {
                    metrics.lease_changes("released").inc();
                }
            }
            Ok(other) => {
                tracing::warn!(shard = %k, outcome = ?other, "shard worker ended while stopping")
            }
            Err(_) => {
                abort.abort();
                tracing::warn!(shard = %k, "shard worker did not stop within 60 s; its uncommitted records will be read again");
            }
        }
    }
    metrics.leases_held.set(0);
}

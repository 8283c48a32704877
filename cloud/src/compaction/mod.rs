//! The compactor: publishes the bronze table one file per closed hour from the landing area.
//!
//! Shard workers commit Parquet files into `_landing/dt=…/hour=…/<shard>-<first seq>.parquet` ([`crate::parquet`]),
//! outside the table. Every `interval_ms` the compactor holding the lease ([`lease`]; any replica may, one
//! at a time) lists the landing area, reads the shard watermarks from the lease table and publishes every
//! closed hour that has landing files ([`plan`]):
//!
//! 1. the hour's inputs are its landing files listed now plus its published parts (if it was published before:
//!    late data merges into the hour as a whole) and any file of the layout before compaction in the hour's
//!    directory (merged and deleted like landing files); S3 objects are streamed into `work_dir` first;
//! 2. they are merged ([`merge`]: sorted by series and time, repeats of a reading dropped — of the same batch, or
//!    the same reading carried by another batch —, bounded memory) into `part-00000.parquet` (more parts only above `max_file_mib`);
//! 3. an hour's part boundaries (none for one part) are recorded (`_compaction/dt=…/hour=…/boundaries.json`,
//!    created only where there is none) before its first part is written, and kept for every republish;
//! 4. each part replaces `dt=…/hour=…/part-NNNNN.parquet` in one step (S3 PutObject; locally a rename), on S3
//!    only if it is still the version step 1 read (or still absent): see [`Inputs::expect`];
//! 5. only then are the merged landing (and legacy) files deleted.
//!
//! With `[alarms]` the same compactor, in the same round and under the same lease, publishes the alarm table
//! from its own location the same way (one file per hour, merged in memory by [`crate::alarms::table::merge`]:
//! alarm events are few).
//!
//! # Crash safety
//! Every step can be repeated: a compactor killed anywhere leaves landing files that are not deleted yet and
//! published parts that hold them (or their old version); the next round merges both again, drops the
//! repeats and writes the same rows in the same order — the same bytes. A reader sees each published part
//! either before or after its replacement, and a row never moves between parts, so no reader sees a row twice
//! or misses one it saw before.

mod config;
pub mod lease;
pub mod merge;
pub mod plan;
mod scratch;

pub use config::CompactionConfig;

use crate::lease::LeaseTable;
use crate::parquet::{ParquetConfig, LANDING};
use crate::store::{Expect, Store, StoreError};
use fieldlink_ops::metrics::{Counter, Gauge, Health, Registry};
use lease::Hold;
use merge::{Boundary, MergeError, Merged, Split, WriteSettings};
use plan::{Closing, HourWork};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The compactor's metrics.
#[derive(Debug, Clone)]
pub struct CompactionMetrics {
    /// Hours published (a republish counts again).
    pub hours: Counter,
    /// Hours published again because late data arrived.
    pub republished: Counter,
    /// Rows written into published files.
    pub rows: Counter,
    /// Bytes of published files written.
    pub bytes: Counter,
    /// Repeated rows dropped.
    pub duplicates: Counter,
    /// Rounds that failed (retried at the next round).
    pub failures: Counter,
    /// Seconds the published hours trail the newest closed hour.
    pub lag: Gauge,
    /// The fleet watermark, Unix seconds.
    pub watermark: Gauge,
    /// 1 while this process holds the compactor lease.
    pub leader: Gauge,
}

impl CompactionMetrics {
    /// Registers the metrics.
    pub fn new(registry: &Registry) -> Self {
        let c = |n: &str, h: &str| registry.counter(n, h, &[]);
        let g = |n: &str, h: &str| registry.gauge(n, h, &[]);
        Self {
            hours: c(
                "fieldlink_compaction_hours_published_total",
                "Bronze hours published (written to dt=…/hour=…/); a republish for late data counts again.",
            ),
            republished: c(
                "fieldlink_compaction_hours_republished_total",
                "Bronze hours published again because late data arrived for an hour already published.",
            ),
            rows: c(
                "fieldlink_compaction_rows_total",
                "Rows written into published bronze files (a republish writes the whole hour again).",
            ),
            bytes: c(
                "fieldlink_compaction_bytes_total",
                "Bytes of published bronze files written.",
            ),
            duplicates: c(
                "fieldlink_compaction_duplicates_dropped_total",
                "Rows dropped while publishing as repeats: of a row of the same batch, or of a reading (series, time, value, quality) another batch carried.",
            ),
            failures: c(
                "fieldlink_compaction_failures_total",
                "Hours whose publishing failed (retried at the next round; nothing is lost).",
            ),
            lag: g(
                "fieldlink_compaction_lag_seconds",
                "Seconds from the start of the oldest closed hour not published yet to the end of the newest closed hour; 0 when every closed hour is published.",
            ),
            watermark: g(
                "fieldlink_compaction_watermark_seconds",
                "The lowest watermark of the live shards (Unix seconds): hours ending a grace before it are closed.",
            ),
            leader: g(
                "fieldlink_compaction_leader",
                "1 while this process holds the compactor lease.",
            ),
        }
    }
}

/// Why an hour was not published (it is tried again next round).
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The merge failed.
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// The lease table failed.
    #[error(transparent)]
    Table(#[from] crate::lease::TableError),
    /// The lease is no longer fresh: stop writing.
    #[error("the compactor lease is not held (or not renewed lately): stopped before writing")]
    LeaseLost,
    /// Shutting down.
    #[error("stopped")]
    Stopped,
    /// Something else (scratch directory, a task).
    #[error("{0}")]
    Other(String),
}

/// What publishing one hour did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The hour.
    pub hour: i64,
    /// Whether the hour had published parts before.
    pub republish: bool,
    /// Landing files merged (and deleted).
    pub inputs: usize,
    /// The merge.
    pub merged: Merged,
}

/// Which table a round publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// The bronze readings table (`[parquet] location`).
    Bronze,
    /// The alarm table (`[alarms] location`).
    Alarms,
}

/// The local copies of an hour's inputs.
struct Inputs {
    /// Keys of the hour's published parts.
    published: Vec<String>,
    /// The ETag of each published part as read (S3), which its replacement is conditional on.
    etags: std::collections::HashMap<String, String>,
    /// Keys of the landing files (and files of the layout before compaction) to delete once published.
    landing: Vec<String>,
    /// Local files: the published parts first, then the landing files.
    files: Vec<PathBuf>,
}

impl Inputs {
    /// What the write of published part `key` requires: the version this round read (its ETag), or no object
    /// if the round read none. So a compactor whose lease passed to another while it merged (or whose request
    /// outlived its lease) cannot overwrite a part the other published since: S3 refuses the write
    /// ([`crate::store::StoreError::Changed`]) and the landing files stay for the next round.
    fn expect(&self, key: &str) -> Expect {
        match self.etags.get(key) {
            Some(tag) => Expect::ETag(tag.clone()),
            // Read in place from a local directory (which ignores conditions): no ETag.
            None if self.published.iter().any(|k| k == key) => Expect::Any,
            None => Expect::Absent,
        }
    }
}

/// The compactor of one process.
#[derive(Debug, Clone)]
pub struct Compactor {
    store: Store,
    alarms: Option<Store>,
    cfg: CompactionConfig,
    /// The name of this process's scratch directory under `cfg.work_dir` (see [`scratch`]).
    scratch_name: String,
    /// Claimed at the first round.
    scratch: std::sync::Arc<tokio::sync::OnceCell<scratch::ScratchDir>>,
    settings: WriteSettings,
    table: LeaseTable,
    hold: Hold,
    metrics: CompactionMetrics,
    /// `/health`'s `compaction` line, if this process serves one.
    health: Option<Health>,
    /// The first error of an hour that failed in the current round (the round goes on with the next hours).
    hour_error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// The compactor's line in `/health`.
pub const HEALTH: &str = "compaction";

/// Rounds failed in a row before `/health` says so: one failure may be a passing S3 or DynamoDB error.
const FAILING_ROUNDS: u32 = 3;

/// Counts the compactor's failed rounds in a row and says what `/health` shows (pure). Only `/health` shows a
/// compactor that fails for good, e.g. a `work_dir` it cannot write (a read-only root file system) or one too
/// small for an hour: nothing is lost (the landing files stay), but no hour is published.
#[derive(Debug, Default)]
struct FailingRounds {
    rounds: u32,
}

impl FailingRounds {
    /// After a round that failed with `error` (`None`: it went well, lost the lease or was stopped): `(ok,
    /// detail)`.
    fn after(&mut self, error: Option<&str>, interval: Duration) -> (bool, String) {
        let Some(error) = error else {
            self.rounds = 0;
            return (true, String::new());
        };
        self.rounds += 1;
        if self.rounds < FAILING_ROUNDS {
            return (true, String::new());
        }
        (
            false,
            format!(
                "{error}; {} rounds in a row failed, retried every {} s; landing files kept",
                self.rounds,
                interval.as_secs_f64()
            ),
        )
    }
}

/// The contents of `boundaries.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct BoundaryRecord {
    boundaries: Vec<Boundary>,
}

impl Compactor {
    /// A compactor publishing the bronze files of `store`; writes only while `hold` is fresh.
    pub fn new(
        store: Store,
        cfg: CompactionConfig,
        scratch_name: String,
        parquet: &ParquetConfig,
        table: LeaseTable,
        hold: Hold,
        metrics: CompactionMetrics,
    ) -> Self {
        Self {
            store,
            alarms: None,
            cfg,
            scratch_name,
            scratch: Default::default(),
            settings: WriteSettings {
                row_group_rows: parquet.row_group_rows,
                zstd_level: parquet.zstd_level,
            },
            table,
            hold,
            metrics,
            health: None,
            hour_error: Default::default(),
        }
    }

    /// Reports in `/health` as `compaction`: failing once [`FAILING_ROUNDS`] rounds in a row failed.
    pub fn with_health(mut self, health: Health) -> Self {
        health.set(HEALTH, true, "");
        self.health = Some(health);
        self
    }

    fn hour_errors(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.hour_error.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first error of an hour that failed since the last call.
    fn take_hour_error(&self) -> Option<String> {
        self.hour_errors().take()
    }

    /// Also publishes the alarm table in `alarms` (after the bronze hours of each round).
    pub fn with_alarms(mut self, alarms: Option<Store>) -> Self {
        self.alarms = alarms;
        self
    }

    /// This process's scratch directory, claimed on first use.
    async fn work_dir(&self) -> Result<&Path, CompactError> {
        let claimed = self
            .scratch
            .get_or_try_init(|| async {
                scratch::ScratchDir::claim(&self.cfg.work_dir, &self.scratch_name).map_err(|e| {
                    CompactError::Other(format!("{}: {e}", self.cfg.work_dir.display()))
                })
            })
            .await?;
        Ok(claimed.path())
    }

    fn closing(&self) -> Closing {
        Closing {
            grace_ms: self.cfg.grace_s as i64 * 1000,
            open_hours: self.cfg.publish_open_hours,
        }
    }

    /// Writes the local file `path` at `key`, fenced like every other write: each request that writes (a part of
    /// a large file among them) starts only while the lease is fresh and no stop was asked for; and the write
    /// replaces only the version of the object this round read (`expect`, see [`Inputs::expect`]).
    async fn put_fenced(
        &self,
        store: &Store,
        key: &str,
        path: &Path,
        expect: &Expect,
        cancel: &CancellationToken,
    ) -> Result<(), CompactError> {
        let fresh = || !cancel.is_cancelled() && self.hold.fresh();
        if store.put_file(key, path, expect, &fresh).await? {
            return Ok(());
        }
        self.check(cancel)?;
        Err(CompactError::LeaseLost)
    }

    fn check(&self, cancel: &CancellationToken) -> Result<(), CompactError> {
        if cancel.is_cancelled() {
            return Err(CompactError::Stopped);
        }
        if !self.hold.fresh() {
            return Err(CompactError::LeaseLost);
        }
        Ok(())
    }

    /// One round: publishes every closed hour with landing files, oldest first, of the bronze table and then of
    /// the alarm table. Returns the hours published; an hour that failed is logged, counted and left for the next
    /// round (a lost lease or a stop ends the round).
    pub async fn round(&self, cancel: &CancellationToken) -> Result<Vec<Published>, CompactError> {
        self.check(cancel)?;
        // Scratch files a killed round (or a killed process that held the directory) left behind.
        reset_dir(self.work_dir().await?).await?;
        let leases = self.table.list().await?;
        let watermark = plan::fleet_watermark(&leases);
        if let Some(w) = watermark {
            self.metrics
                .watermark
                .set(w.min(i64::MAX / 1000 * 1000) / 1000);
        }
        let bronze = self
            .round_of(Table::Bronze, &self.store, watermark, cancel)
            .await;
        let Some(alarms) = &self.alarms else {
            return bronze;
        };
        // A bronze round that failed otherwise (its store cannot be listed) does not hold the alarm table back.
        if matches!(bronze, Err(CompactError::LeaseLost | CompactError::Stopped)) {
            return bronze;
        }
        let alarm = self
            .round_of(Table::Alarms, alarms, watermark, cancel)
            .await;
        match (bronze, alarm) {
            (Ok(mut done), Ok(more)) => {
                done.extend(more);
                Ok(done)
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    async fn round_of(
        &self,
        table: Table,
        store: &Store,
        watermark: Option<i64>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Published>, CompactError> {
        let started = Instant::now();
        let landing = store.list(&format!("{LANDING}/")).await?;
        let plan = plan::plan(&landing, watermark, self.closing());
        if !plan.strays.is_empty() {
            tracing::warn!(keys = ?plan.strays.iter().take(5).collect::<Vec<_>>(), count = plan.strays.len(), "files in the landing area that are not landing files; left alone");
        }
        let mut done = Vec::new();
        let mut pending: Vec<i64> = Vec::new();
        let mut result = Ok(());
        for work in &plan.hours {
            if result.is_err() {
                pending.push(work.hour);
                continue;
            }
            match self.publish_hour_of(table, store, work, cancel).await {
                Ok(p) => {
                    self.account(table, &p);
                    done.push(p);
                }
                Err(e @ (CompactError::LeaseLost | CompactError::Stopped)) => {
                    pending.push(work.hour);
                    result = Err(e);
                }
                Err(e) => {
                    self.metrics.failures.inc();
                    tracing::warn!(table = ?table, hour = %plan::published_prefix(work.hour), error = %e, "publishing an hour failed; retried next round");
                    self.hour_errors().get_or_insert_with(|| {
                        format!(
                            "publishing {} failed: {e}",
                            plan::published_prefix(work.hour)
                        )
                    });
                    pending.push(work.hour);
                }
            }
        }
        if table == Table::Bronze {
            self.metrics
                .lag
                .set(plan::lag_seconds(&pending, watermark, self.closing()));
        }
        if !done.is_empty() {
            tracing::info!(
                table = ?table,
                hours = done.len(),
                rows = done.iter().map(|p| p.merged.rows).sum::<u64>(),
                took_ms = started.elapsed().as_millis() as u64,
                peak_rss_kib = peak_rss_kib(),
                "compaction round"
            );
        }
        result.map(|()| done)
    }

    fn account(&self, table: Table, p: &Published) {
        let m = &self.metrics;
        m.hours.inc();
        if p.republish {
            m.republished.inc();
        }
        m.rows.add(p.merged.rows);
        m.bytes.add(p.merged.parts.iter().map(|x| x.bytes).sum());
        m.duplicates.add(p.merged.duplicates());
        tracing::info!(
            table = ?table,
            hour = %plan::published_prefix(p.hour),
            republish = p.republish,
            inputs = p.inputs,
            parts = p.merged.parts.len(),
            rows = p.merged.rows,
            duplicates = p.merged.duplicates(),
            bytes = p.merged.parts.iter().map(|x| x.bytes).sum::<u64>(),
            "hour published"
        );
    }

    /// Publishes one hour of the bronze table (see the module doc).
    pub async fn publish_hour(
        &self,
        work: &HourWork,
        cancel: &CancellationToken,
    ) -> Result<Published, CompactError> {
        self.publish_hour_of(Table::Bronze, &self.store, work, cancel)
            .await
    }

    async fn publish_hour_of(
        &self,
        table: Table,
        store: &Store,
        work: &HourWork,
        cancel: &CancellationToken,
    ) -> Result<Published, CompactError> {
        let hour = work.hour;
        let scratch = self.work_dir().await?.join(format!("hour-{hour}"));
        reset_dir(&scratch).await?;
        let result = match table {
            Table::Bronze => self.publish_in(store, work, &scratch, cancel).await,
            Table::Alarms => self.publish_alarms_in(store, work, &scratch, cancel).await,
        };
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        result.map(|merged| Published {
            hour,
            republish: merged.1,
            inputs: work.inputs.len(),
            merged: merged.0,
        })
    }

    /// The hour's published parts and files of the layout before compaction (one per commit, directly in the
    /// hour: merged like landing files and deleted once the hour is published); local copies of them all.
    async fn inputs(
        &self,
        store: &Store,
        work: &HourWork,
        scratch: &Path,
        cancel: &CancellationToken,
    ) -> Result<Inputs, CompactError> {
        let (published, legacy): (Vec<String>, Vec<String>) = store
            .list(&plan::published_prefix(work.hour))
            .await?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k.ends_with(".parquet"))
            .partition(|k| plan::is_part(k));
        let landing: Vec<String> = legacy
            .into_iter()
            .chain(work.inputs.iter().map(|o| o.key.clone()))
            .collect();
        let mut files: Vec<PathBuf> = Vec::new();
        let mut etags = std::collections::HashMap::new();
        for (i, key) in published.iter().chain(landing.iter()).enumerate() {
            if cancel.is_cancelled() {
                return Err(CompactError::Stopped);
            }
            match store.local_path(key) {
                Some(p) => files.push(p),
                None => {
                    let dest = scratch.join(format!("in-{i:06}.parquet"));
                    let got = store.get_to_file(key, &dest).await?;
                    if i < published.len() {
                        // Without it the part's replacement could not be conditional: refuse rather than
                        // write unfenced (S3 always answers one; an S3-compatible store must too).
                        let tag = got.etag.ok_or_else(|| {
                            CompactError::Other(format!(
                                "{key}: the store answered no ETag; a published part is replaced only \
                                 conditionally on the version read"
                            ))
                        })?;
                        etags.insert(key.clone(), tag);
                    }
                    files.push(dest);
                }
            }
        }
        Ok(Inputs {
            published,
            etags,
            landing,
            files,
        })
    }

    /// Publishes one hour of the alarm table: always one file, merged in memory.
    async fn publish_alarms_in(
        &self,
        store: &Store,
        work: &HourWork,
        scratch: &Path,
        cancel: &CancellationToken,
    ) -> Result<(Merged, bool), CompactError> {
        let inputs = self.inputs(store, work, scratch, cancel).await?;
        let out = scratch.join(merge::part_name(0));
        let (files, settings, target) = (inputs.files.clone(), self.settings, out.clone());
        let count = tokio::task::spawn_blocking(move || {
            crate::alarms::table::merge(
                &files,
                &target,
                settings.row_group_rows,
                settings.zstd_level,
            )
        })
        .await
        .map_err(|e| CompactError::Other(e.to_string()))?
        .map_err(|source| MergeError::Parquet {
            path: out.display().to_string(),
            source,
        })?;
        let key = plan::published_key(work.hour, &merge::part_name(0));
        self.put_fenced(store, &key, &out, &inputs.expect(&key), cancel)
            .await?;
        for key in &inputs.landing {
            self.check(cancel)?;
            store.delete(key).await?;
        }
        let merged = Merged {
            parts: vec![merge::PartFile {
                path: out,
                rows: count.rows,
                bytes: count.bytes,
            }],
            boundaries: Vec::new(),
            input_rows: count.input_rows,
            rows: count.rows,
        };
        Ok((merged, !inputs.published.is_empty()))
    }

    async fn publish_in(
        &self,
        store: &Store,
        work: &HourWork,
        scratch: &Path,
        cancel: &CancellationToken,
    ) -> Result<(Merged, bool), CompactError> {
        let hour = work.hour;
        let mut read = self.inputs(store, work, scratch, cancel).await?;
        let inputs = std::mem::take(&mut read.files);
        let (published, landing) = (&read.published, &read.landing);
        let recorded: Option<Vec<Boundary>> = match store.get(&plan::boundaries_key(hour)).await? {
            Some(bytes) => Some(
                serde_json::from_slice::<BoundaryRecord>(&bytes)
                    .map_err(|e| {
                        CompactError::Other(format!("{}: {e}", plan::boundaries_key(hour)))
                    })?
                    .boundaries,
            ),
            None => None,
        };
        let split = match recorded.clone() {
            Some(b) => Split::Fixed(b),
            // Published before as one file, or its boundaries record is lost: the parts' first rows.
            None if !published.is_empty() => {
                let parts: Vec<PathBuf> = inputs[1..published.len()].to_vec();
                Split::Fixed(
                    tokio::task::spawn_blocking(move || first_keys(&parts))
                        .await
                        .map_err(|e| CompactError::Other(e.to_string()))??,
                )
            }
            None => Split::BySize(self.cfg.max_file_mib * 1024 * 1024),
        };
        let out = scratch.join("out");
        tokio::fs::create_dir_all(&out)
            .await
            .map_err(|e| CompactError::Other(format!("{}: {e}", out.display())))?;
        let (fan_in, settings, scratch2) =
            (self.cfg.fan_in(), self.settings, scratch.to_path_buf());
        let merged = tokio::task::spawn_blocking(move || {
            let name = move |i: usize| out.join(merge::part_name(i));
            merge::merge_in_rounds(&inputs, fan_in, &scratch2, &name, split, settings)
        })
        .await
        .map_err(|e| CompactError::Other(e.to_string()))??;

        // The boundaries are recorded whenever none were read (an empty list for one part): a first
        // publication claims the record, so a late record of a compactor that lost the lease (boundaries from
        // fewer rows, or another `max_file_mib`) is refused instead of landing beside parts it does not match.
        if recorded.is_none() {
            self.check(cancel)?;
            let record = serde_json::to_vec(&BoundaryRecord {
                boundaries: merged.boundaries.clone(),
            })
            .map_err(|e| CompactError::Other(e.to_string()))?;
            // Only if no other compactor recorded the hour's boundaries since this round looked.
            store
                .put_expecting(&plan::boundaries_key(hour), record, &Expect::Absent)
                .await?;
        }
        for (i, part) in merged.parts.iter().enumerate() {
            let key = plan::published_key(hour, &merge::part_name(i));
            self.put_fenced(store, &key, &part.path, &read.expect(&key), cancel)
                .await?;
        }
        for key in landing {
            self.check(cancel)?;
            store.delete(key).await?;
        }
        Ok((merged, !published.is_empty()))
    }

    /// Runs rounds every `interval_ms` while this process holds the lease, until `cancel` fires.
    pub async fn run(&self, cancel: CancellationToken) {
        let interval = Duration::from_millis(self.cfg.interval_ms);
        let mut failing = FailingRounds::default();
        while !cancel.is_cancelled() {
            if self.hold.fresh() {
                let failed = match self.round(&cancel).await {
                    Ok(_) | Err(CompactError::Stopped) => None,
                    Err(CompactError::LeaseLost) => {
                        tracing::warn!(
                            "compactor lease lost or stale during a round; stopped writing"
                        );
                        None
                    }
                    Err(e) => {
                        self.metrics.failures.inc();
                        tracing::warn!(error = %e, "compaction round failed; retried next round");
                        Some(format!("compaction round failed: {e}"))
                    }
                };
                let (ok, detail) =
                    failing.after(failed.or(self.take_hour_error()).as_deref(), interval);
                if let Some(h) = &self.health {
                    h.set(HEALTH, ok, detail);
                }
            } else if !self.hold.held() {
                // Another process compacts: what failed here is not this process's to report any more.
                failing = FailingRounds::default();
                self.take_hour_error();
                if let Some(h) = &self.health {
                    h.set(HEALTH, true, "");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Waits (up to `timeout`) for the lease, then runs one round. For `fieldlink-cloud compact --once`.
    pub async fn once(
        &self,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Vec<Published>, CompactError> {
        let deadline = Instant::now() + timeout;
        while !self.hold.fresh() {
            if Instant::now() >= deadline {
                return Err(CompactError::Other(format!(
                    "the compactor lease was not free within {} s (another compactor holds it)",
                    timeout.as_secs()
                )));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(CompactError::Stopped),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        self.round(cancel).await
    }
}

/// The `(series, time)` of the first row of each file: the boundaries of published parts 1…n.
fn first_keys(parts: &[PathBuf]) -> Result<Vec<Boundary>, MergeError> {
    parts
        .iter()
        .filter_map(|p| merge::first_key(p).transpose())
        .collect()
}

/// Empties (or creates) a scratch directory.
async fn reset_dir(dir: &Path) -> Result<(), CompactError> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(CompactError::Other(format!("{}: {e}", dir.display()))),
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| CompactError::Other(format!("{}: {e}", dir.display())))
}

/// This process's peak resident memory (`VmHWM`), KiB; 0 where unknown.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Starts the compactor lease keeper and returns the compactor; the keeper runs until `lease_cancel` fires (cancel
/// it after the compactor stopped writing: it then releases the lease).
#[allow(clippy::too_many_arguments)]
pub fn start(
    store: Store,
    alarms: Option<Store>,
    cfg: CompactionConfig,
    parquet: &ParquetConfig,
    table: LeaseTable,
    me: String,
    lease_ms: u64,
    registry: &Registry,
    lease_cancel: CancellationToken,
) -> (Compactor, tokio::task::JoinHandle<()>) {
    let metrics = CompactionMetrics::new(registry);
    let hold = Hold::new(Duration::from_millis(lease_ms), metrics.leader.clone());
    // Named after the worker id; two processes never share it (see [`scratch`]).
    let own: String = me
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let keeper = tokio::spawn(lease::keep(table.clone(), me, hold.clone(), lease_cancel));
    (
        Compactor::new(store, cfg, own, parquet, table, hold, metrics).with_alarms(alarms),
        keeper,
    )
}

#[cfg(test)]
mod tests {
    use super::{FailingRounds, FAILING_ROUNDS};
    use std::time::Duration;

    #[test]
    fn health_fails_only_after_rounds_failed_in_a_row_and_recovers_with_one_that_went_well() {
        let mut f = FailingRounds::default();
        let minute = Duration::from_secs(60);
        for _ in 1..FAILING_ROUNDS {
            assert_eq!(f.after(Some("S3: timeout"), minute), (true, String::new()));
        }
        // A round that went well in between starts the count again.
        assert!(f.after(None, minute).0);
        for _ in 1..FAILING_ROUNDS {
            assert!(f.after(Some("x"), minute).0);
        }
        let (ok, detail) = f.after(
            Some("/tmp/fieldlink-compaction: Read-only file system"),
            minute,
        );
        assert!(!ok);
        assert_eq!(
            detail,
            "/tmp/fieldlink-compaction: Read-only file system; 3 rounds in a row failed, retried every 60 s; landing files kept"
        );
        assert!(!f.after(Some("again"), minute).0);
        assert_eq!(f.after(None, minute), (true, String::new()));
    }
}

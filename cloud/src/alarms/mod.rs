//! The cloud side of alarms: alarm-event records (`fieldlink_proto::alarm`) land in their own hourly Parquet
//! table and, with `[alarms.sns]`, each event is published to an SNS topic once.
//!
//! The path of an alarm record is the path of a readings record ([`crate::land`]): decoded with
//! `fieldlink_proto::decode_any`, skipped when its `(agent_id, epoch, seq)` landed before, then handed to the
//! sinks that take alarm events ([`crate::land::Sink::write_alarms`]):
//! - [`AlarmSink`] stages the events by event hour and, at the shard's commit, writes one landing file per hour
//!   into `_landing/dt=…/hour=…/<shard>-<first sequence number>.parquet` under `[alarms] location` — the same
//!   names and the same repeat-exactly commit protocol as bronze, so a repeated commit replaces its files. The
//!   compactor ([`crate::compaction`]) publishes each closed hour as `dt=…/hour=…/part-00000.parquet`, merging
//!   the landing files with the published part and dropping repeats ([`table::merge`]): the published table
//!   holds each event once, after replays, resends read by two processes and `kill -9` anywhere.
//! - [`sns::SnsSink`] publishes each event, deduplicated across processes and restarts by a marker object per
//!   event (see [`sns`] for the exact guarantee).
//!
//! Without `[alarms]`, alarm records are dead-lettered (reason `alarm_record`), not lost.

mod config;
pub mod sns;
pub mod table;

pub use config::{AlarmsConfig, SnsConfig};

use crate::land::retry::SinkMonitor;
use crate::land::{Origin, Sink, SinkError, SinkFuture};
use crate::store::Store;
use fieldlink_proto::alarm::AlarmBatch;
use fieldlink_proto::Batch;
use std::collections::BTreeMap;
use table::AlarmRow;
use tokio_util::sync::CancellationToken;

/// The sink's name in logs, metrics and `/health`.
pub const NAME: &str = "alarms";

/// Adds the events of `batch` to `parts` (event hour → rows); returns how many. Pure.
pub fn stage(parts: &mut BTreeMap<i64, Vec<AlarmRow>>, batch: &AlarmBatch) -> usize {
    for e in &batch.events {
        parts
            .entry(e.ts_ms.div_euclid(crate::compaction::plan::HOUR_MS))
            .or_default()
            .push(AlarmRow {
                agent: batch.agent_id.clone(),
                epoch: batch.epoch,
                batch_seq: batch.seq,
                event: e.clone(),
            });
    }
    batch.events.len()
}

/// The alarm table's landing sink: one instance per shard worker.
#[derive(Debug)]
pub struct AlarmSink {
    store: Store,
    max_rows: usize,
    settings: crate::compaction::merge::WriteSettings,
    parts: BTreeMap<i64, Vec<AlarmRow>>,
    staged: usize,
    monitor: SinkMonitor,
    cancel: CancellationToken,
}

impl AlarmSink {
    /// A sink landing into `store` (the `[alarms] location`), encoded with `settings`.
    pub fn new(
        store: Store,
        cfg: &AlarmsConfig,
        settings: crate::compaction::merge::WriteSettings,
        monitor: SinkMonitor,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            store,
            max_rows: cfg.max_rows_per_file,
            settings,
            parts: BTreeMap::new(),
            staged: 0,
            monitor,
            cancel,
        }
    }

    async fn commit_all(&mut self, first: &Origin) -> Result<(), SinkError> {
        while let Some((hour, mut rows)) = self.parts.pop_first() {
            self.staged -= rows.len();
            let key = crate::parquet::landing_key(hour, first);
            let n = rows.len();
            let s = self.settings;
            let bytes = tokio::task::spawn_blocking(move || {
                table::sort_dedup(&mut rows);
                table::encode(&rows, s.row_group_rows, s.zstd_level)
            })
            .await
            .map_err(|e| SinkError {
                sink: NAME,
                message: e.to_string(),
            })?
            .map_err(|e| SinkError {
                sink: NAME,
                message: format!("encoding {key}: {e}"),
            })?;
            self.store
                .put_until_done(&key, bytes, &self.monitor, &self.cancel)
                .await
                .map_err(|e| SinkError {
                    sink: NAME,
                    message: format!("writing {key}: {e}"),
                })?;
            tracing::info!(key = %key, events = n, "alarm landing file written");
        }
        Ok(())
    }
}

impl Sink for AlarmSink {
    fn name(&self) -> &'static str {
        NAME
    }
    fn takes_alarms(&self) -> bool {
        true
    }
    fn write<'a>(&'a mut self, _batch: &'a Batch, _origin: &'a Origin) -> SinkFuture<'a> {
        Box::pin(async { Ok(()) })
    }
    fn write_alarms<'a>(
        &'a mut self,
        batch: &'a AlarmBatch,
        _origin: &'a Origin,
    ) -> SinkFuture<'a> {
        self.staged += stage(&mut self.parts, batch);
        Box::pin(async { Ok(()) })
    }
    fn wants_commit(&self) -> bool {
        self.staged >= self.max_rows
    }
    fn commit<'a>(&'a mut self, first: &'a Origin) -> SinkFuture<'a> {
        Box::pin(self.commit_all(first))
    }
    fn discard(&mut self) {
        self.parts.clear();
        self.staged = 0;
    }
}

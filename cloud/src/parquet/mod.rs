//! Parquet bronze sink: one instance per shard worker. Rows are staged per event hour; a commit writes one
//! zstd Parquet file per hour partition it touched into the landing area, `_landing/` under the location,
//! outside the table: the compactor ([`crate::compaction`]) publishes each closed hour from there as one file
//! (`dt=…/hour=…/part-00000.parquet`), and readers (Athena, Glue, Hive, pyarrow) skip `_` directories. Commits happen when the staged rows reach
//! `max_rows_per_file` (so no file is larger), and on the shard worker's clock (`kinesis.commit_interval_ms`,
//! `kinesis.commit_idle_ms`), at shutdown and at the end of a shard.
//!
//! Object key: `_landing/dt=YYYY-MM-DD/hour=HH/<shard>-<first sequence number>.parquet`, named after the commit's first
//! Kinesis record. A commit that is repeated after a crash or a lease move covers the same records (see
//! [`crate::land`]), so it writes the same keys with the same rows and replaces rather than adds.
//! Rows of different event hours never share a file: files are cut at the hour boundary by construction.
//! A file that cannot be written is retried until it is (see [`crate::land::retry`]; a permanent failure such
//! as a deleted bucket fails `/health` for `parquet`); the shard's checkpoint waits meanwhile.

mod config;
pub mod encode;

pub use config::ParquetConfig;

use crate::land::retry::SinkMonitor;
use crate::land::{Origin, Sink, SinkError, SinkFuture};
use crate::metrics::CloudMetrics;
use crate::store::Store;
use encode::{Row, SeriesCols};
use fieldlink_proto::Batch;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The directory of the landing area under the location (the `_` keeps Athena, Glue and Hive out of it).
pub const LANDING: &str = "_landing";

/// `dt=YYYY-MM-DD/hour=HH` of event hour `hour` (hours since the Unix epoch, UTC).
pub fn partition(hour: i64) -> String {
    let (day, hh) = encode::hour_partition(hour * 3_600_000);
    format!("dt={day}/hour={hh:02}")
}

/// The landing key of a commit's file for event hour `hour`, named after the commit's first record.
pub fn landing_key(hour: i64, first: &Origin) -> String {
    format!(
        "{LANDING}/{}/{}-{}.parquet",
        partition(hour),
        first.shard,
        first.sequence_number
    )
}

/// Adds the rows of `batch` to `parts` (event hour → rows); returns how many. Pure.
pub fn stage(parts: &mut BTreeMap<i64, Vec<Row>>, batch: &Batch) -> usize {
    let series: Vec<Arc<SeriesCols>> = batch
        .series
        .iter()
        .map(|s| {
            Arc::new(SeriesCols {
                key: s.key.clone(),
                device: s.device().to_owned(),
                measure: s.measure().to_owned(),
                tags: s.tags.clone(),
            })
        })
        .collect();
    let agent: Arc<str> = Arc::from(batch.agent_id.as_str());
    for r in &batch.readings {
        let hour = r.ts_ms.div_euclid(3_600_000);
        parts.entry(hour).or_default().push(Row {
            ts_ms: r.ts_ms,
            series: series[r.series as usize].clone(),
            agent: agent.clone(),
            seq: batch.seq,
            epoch: batch.epoch,
            value: r.value.clone(),
            quality: r.quality,
            late: r.late,
        });
    }
    batch.readings.len()
}

/// Rows staged by every Parquet sink of a process, and how many sinks hold some (see `max_staged_rows`).
#[derive(Debug, Clone, Default)]
pub struct StagedRows(Arc<(AtomicUsize, AtomicUsize)>);

impl StagedRows {
    /// A sink's staged rows went from `before` to `after`.
    fn moved(&self, before: usize, after: usize) {
        let (rows, sinks) = &*self.0;
        if after >= before {
            rows.fetch_add(after - before, Ordering::Relaxed);
        } else {
            rows.fetch_sub(before - after, Ordering::Relaxed);
        }
        match (before, after) {
            (0, a) if a > 0 => {
                sinks.fetch_add(1, Ordering::Relaxed);
            }
            (b, 0) if b > 0 => {
                sinks.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Whether a sink holding `staged` rows should commit to keep the process under `budget`: the total is at
    /// the budget and this sink holds at least the average of the sinks that hold rows. The largest always
    /// does; a shard that just committed does not commit again at every record while others hold the rows (a
    /// commit per record would write a file and two lease-table writes per record).
    fn over(&self, staged: usize, budget: usize) -> bool {
        let (rows, sinks) = &*self.0;
        let total = rows.load(Ordering::Relaxed);
        staged > 0 && total >= budget && staged * sinks.load(Ordering::Relaxed).max(1) >= total
    }

    /// Rows staged now.
    #[cfg(test)]
    fn rows(&self) -> usize {
        self.0 .0.load(Ordering::Relaxed)
    }
}

/// The sink.
#[derive(Debug)]
pub struct ParquetSink {
    store: Store,
    cfg: ParquetConfig,
    parts: BTreeMap<i64, Vec<Row>>,
    staged: usize,
    /// This process's total (this sink's `staged` is part of it).
    total: StagedRows,
    metrics: CloudMetrics,
    monitor: SinkMonitor,
    cancel: CancellationToken,
}

impl ParquetSink {
    /// A sink writing to `store`; writes are retried until they succeed or `cancel` fires, failures reported
    /// through `monitor`.
    pub fn new(
        store: Store,
        cfg: ParquetConfig,
        total: StagedRows,
        metrics: CloudMetrics,
        monitor: SinkMonitor,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            store,
            cfg,
            parts: BTreeMap::new(),
            staged: 0,
            total,
            metrics,
            monitor,
            cancel,
        }
    }

    fn stage(&mut self, batch: &Batch) {
        let before = self.staged;
        self.staged += stage(&mut self.parts, batch);
        self.total.moved(before, self.staged);
    }

    fn unstage(&mut self, n: usize) {
        let before = self.staged;
        self.staged -= n;
        self.total.moved(before, self.staged);
    }

    async fn write_file(
        &mut self,
        hour: i64,
        rows: Vec<Row>,
        first: &Origin,
    ) -> Result<(), SinkError> {
        let n = rows.len();
        let key = landing_key(hour, first);
        let (groups, level) = (self.cfg.row_group_rows, self.cfg.zstd_level);
        let bytes = tokio::task::spawn_blocking(move || encode::encode(&rows, groups, level))
            .await
            .map_err(|e| SinkError {
                sink: "parquet",
                message: e.to_string(),
            })?
            .map_err(|e| SinkError {
                sink: "parquet",
                message: format!("encoding {key}: {e}"),
            })?;
        let size = bytes.len();
        self.store
            .put_until_done(&key, bytes, &self.monitor, &self.cancel)
            .await
            .map_err(|e| SinkError {
                sink: "parquet",
                message: format!("writing {key}: {e}"),
            })?;
        self.metrics.parquet_files.inc();
        self.metrics.parquet_rows.add(n as u64);
        tracing::info!(key = %key, rows = n, bytes = size, "Parquet file written");
        Ok(())
    }

    async fn commit_all(&mut self, first: &Origin) -> Result<(), SinkError> {
        while let Some((hour, rows)) = self.parts.pop_first() {
            // Counted until written: the rows are in memory while the file is encoded and put.
            let n = rows.len();
            let written = self.write_file(hour, rows, first).await;
            self.unstage(n);
            written?;
        }
        Ok(())
    }
}

impl Sink for ParquetSink {
    fn name(&self) -> &'static str {
        "parquet"
    }
    fn write<'a>(&'a mut self, batch: &'a Batch, _origin: &'a Origin) -> SinkFuture<'a> {
        self.stage(batch);
        Box::pin(async { Ok(()) })
    }
    fn wants_commit(&self) -> bool {
        self.staged >= self.cfg.max_rows_per_file
            || self.total.over(self.staged, self.cfg.max_staged_rows)
    }
    fn commit<'a>(&'a mut self, first: &'a Origin) -> SinkFuture<'a> {
        Box::pin(self.commit_all(first))
    }
    fn discard(&mut self) {
        self.parts.clear();
        self.unstage(self.staged);
    }
}

impl Drop for ParquetSink {
    /// A worker that ends (its lease lost, a stop) no longer holds its rows.
    fn drop(&mut self) {
        self.total.moved(self.staged, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::StagedRows;

    #[test]
    fn at_the_budget_the_sinks_holding_at_least_the_average_commit() {
        let total = StagedRows::default();
        let budget = 2_000_000;
        for staged in [900_000, 900_000, 300_000] {
            total.moved(0, staged);
        }
        assert_eq!(total.rows(), 2_100_000);
        assert!(total.over(900_000, budget), "the largest commits");
        assert!(!total.over(300_000, budget), "below the average: it waits");
        // The first commits; the total falls under the budget: nobody else has to.
        total.moved(900_000, 0);
        assert!(!total.over(900_000, budget) && !total.over(300_000, budget));
        // A sink that just committed and took one row does not commit at every record while others hold the rows.
        total.moved(0, 1);
        total.moved(300_000, 1_100_000);
        assert_eq!(total.rows(), 2_000_001);
        assert!(!total.over(1, budget));
        assert!(total.over(1_100_000, budget));
        // Nothing staged, nothing to commit.
        assert!(!total.over(0, budget));
        for (before, after) in [(900_000, 0), (1, 0), (1_100_000, 0)] {
            total.moved(before, after);
        }
        assert_eq!(total.rows(), 0);
        assert!(!total.over(0, 1));
    }
}

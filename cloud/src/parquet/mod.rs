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

/// The sink.
#[derive(Debug)]
pub struct ParquetSink {
    store: Store,
    cfg: ParquetConfig,
    parts: BTreeMap<i64, Vec<Row>>,
    staged: usize,
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
        metrics: CloudMetrics,
        monitor: SinkMonitor,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            store,
            cfg,
            parts: BTreeMap::new(),
            staged: 0,
            metrics,
            monitor,
            cancel,
        }
    }

    fn stage(&mut self, batch: &Batch) {
        self.staged += stage(&mut self.parts, batch);
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
            self.staged -= rows.len();
            self.write_file(hour, rows, first).await?;
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
    }
    fn commit<'a>(&'a mut self, first: &'a Origin) -> SinkFuture<'a> {
        Box::pin(self.commit_all(first))
    }
    fn discard(&mut self) {
        self.parts.clear();
        self.staged = 0;
    }
}

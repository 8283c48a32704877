//! Parquet bronze sink: rows are staged per event hour and written as one zstd Parquet file per partition
//! when the partition reaches `max_rows_per_file`, when it has been idle for `idle_flush_ms`, when memory
//! reaches `max_buffered_rows` (largest partition first), and at shutdown.
//!
//! Object key: `dt=YYYY-MM-DD/hour=HH/<shard>-<sequence number>.parquet`, named after the first Kinesis record
//! staged in that partition since its last file. Staging only happens between whole records, so a key is
//! never reused for different content, and a rewrite after a replay of the same records replaces the file.

mod config;
pub mod encode;

pub use config::ParquetConfig;

use crate::land::{Origin, Sink, SinkError, SinkFuture};
use crate::metrics::CloudMetrics;
use crate::store::Store;
use encode::{Row, SeriesCols};
use fieldlink_ops::backoff::Backoff;
use fieldlink_proto::Batch;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Attempts to write one file before giving up on it.
const MAX_PUT_ATTEMPTS: u32 = 20;

#[derive(Debug)]
struct Partition {
    rows: Vec<Row>,
    first: String,
    last_write: Instant,
}

/// The sink.
#[derive(Debug)]
pub struct ParquetSink {
    store: Store,
    cfg: ParquetConfig,
    parts: BTreeMap<i64, Partition>,
    buffered: usize,
    metrics: CloudMetrics,
}

impl ParquetSink {
    /// A sink writing to `store`.
    pub fn new(store: Store, cfg: ParquetConfig, metrics: CloudMetrics) -> Self {
        Self {
            store,
            cfg,
            parts: BTreeMap::new(),
            buffered: 0,
            metrics,
        }
    }

    fn stage(&mut self, batch: &Batch, origin: &Origin) {
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
        let now = Instant::now();
        for r in &batch.readings {
            let hour = r.ts_ms.div_euclid(3_600_000);
            let part = self.parts.entry(hour).or_insert_with(|| Partition {
                rows: Vec::new(),
                first: format!("{}-{}", origin.shard, origin.sequence_number),
                last_write: now,
            });
            part.last_write = now;
            part.rows.push(Row {
                ts_ms: r.ts_ms,
                series: series[r.series as usize].clone(),
                agent: agent.clone(),
                seq: batch.seq,
                value: r.value.clone(),
                quality: r.quality,
                late: r.late,
            });
        }
        self.buffered += batch.readings.len();
    }

    async fn flush(&mut self, hour: i64) -> Result<(), SinkError> {
        let Some(part) = self.parts.remove(&hour) else {
            return Ok(());
        };
        let mut rows = part.rows;
        let n = rows.len();
        self.buffered -= n;
        let (day, hh) = encode::hour_partition(hour * 3_600_000);
        let key = format!("dt={day}/hour={hh:02}/{}.parquet", part.first);
        let (groups, level) = (self.cfg.row_group_rows, self.cfg.zstd_level);
        let bytes = tokio::task::spawn_blocking(move || encode::encode(&mut rows, groups, level))
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
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.store.put(&key, bytes.clone()).await {
                Ok(()) => break,
                Err(e) if backoff.attempts() < MAX_PUT_ATTEMPTS => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "writing Parquet file failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    return Err(SinkError {
                        sink: "parquet",
                        message: format!("{n} rows lost: {e}"),
                    })
                }
            }
        }
        self.metrics.parquet_files.inc();
        self.metrics.parquet_rows.add(n as u64);
        tracing::info!(key = %key, rows = n, bytes = size, "Parquet file written");
        Ok(())
    }

    async fn write_batch(&mut self, batch: &Batch, origin: &Origin) -> Result<(), SinkError> {
        self.stage(batch, origin);
        let full: Vec<i64> = self
            .parts
            .iter()
            .filter(|(_, p)| p.rows.len() >= self.cfg.max_rows_per_file)
            .map(|(h, _)| *h)
            .collect();
        for h in full {
            self.flush(h).await?;
        }
        while self.buffered > self.cfg.max_buffered_rows {
            let Some(largest) = self
                .parts
                .iter()
                .max_by_key(|(_, p)| p.rows.len())
                .map(|(h, _)| *h)
            else {
                break;
            };
            self.flush(largest).await?;
        }
        Ok(())
    }

    async fn flush_idle(&mut self) -> Result<(), SinkError> {
        let idle = Duration::from_millis(self.cfg.idle_flush_ms);
        let due: Vec<i64> = self
            .parts
            .iter()
            .filter(|(_, p)| p.last_write.elapsed() >= idle)
            .map(|(h, _)| *h)
            .collect();
        for h in due {
            self.flush(h).await?;
        }
        Ok(())
    }

    async fn flush_all(&mut self) -> Result<(), SinkError> {
        let all: Vec<i64> = self.parts.keys().copied().collect();
        for h in all {
            self.flush(h).await?;
        }
        Ok(())
    }
}

impl Sink for ParquetSink {
    fn name(&self) -> &'static str {
        "parquet"
    }
    fn write<'a>(&'a mut self, batch: &'a Batch, origin: &'a Origin) -> SinkFuture<'a> {
        Box::pin(self.write_batch(batch, origin))
    }
    fn tick(&mut self) -> SinkFuture<'_> {
        Box::pin(self.flush_idle())
    }
    fn close(&mut self) -> SinkFuture<'_> {
        Box::pin(self.flush_all())
    }
}

//! Rows → one Parquet file in memory. Pure.
//!
//! # Bronze schema (one row per reading)
//! | column | type | notes |
//! |---|---|---|
//! | `time` | timestamp(ms, UTC) | event time |
//! | `agent_id` | string | producing agent |
//! | `series` | string | full series key, e.g. `plant/meter-a/001/value` |
//! | `device` | string | series key without its last segment |
//! | `measure` | string | last segment of the series key |
//! | `value_double` | double, nullable | set for f64 readings |
//! | `value_bigint` | int64, nullable | set for i64 readings |
//! | `value_boolean` | boolean, nullable | set for bool readings |
//! | `value_string` | string, nullable | set for string readings |
//! | `quality` | string | `good`, `uncertain` or `bad` |
//! | `late` | boolean | arrived after the agent's reorder window |
//! | `tags` | map<string, string> | the series' tags |
//! | `batch_seq` | int64 | the agent's batch sequence number (with `agent_id`, the batch id) |
//!
//! Hive partitions `dt=YYYY-MM-DD/hour=HH` (event time, UTC) are in the object path, not in the file. Rows are
//! sorted by `(series, time)` so each series is contiguous and its timestamps compress well. Compression: zstd.

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int64Builder, MapBuilder, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{Field, Schema};
use fieldlink_proto::{Quality, Value};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use std::sync::Arc;

/// A series' column values, shared by its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesCols {
    /// Full key.
    pub key: String,
    /// Device part.
    pub device: String,
    /// Measure part.
    pub measure: String,
    /// Tags.
    pub tags: Vec<(String, String)>,
}

/// One row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Event time, Unix ms.
    pub ts_ms: i64,
    /// Series columns.
    pub series: Arc<SeriesCols>,
    /// Agent id.
    pub agent: Arc<str>,
    /// Batch sequence number.
    pub seq: u64,
    /// Value.
    pub value: Value,
    /// Quality.
    pub quality: Quality,
    /// Late flag.
    pub late: bool,
}

/// Sorts `rows` by `(series, time)` and encodes them as one Parquet file.
pub fn encode(
    rows: &mut [Row],
    row_group_rows: usize,
    zstd_level: i32,
) -> Result<Vec<u8>, ParquetError> {
    rows.sort_by(|a, b| {
        a.series
            .key
            .cmp(&b.series.key)
            .then(a.ts_ms.cmp(&b.ts_ms))
            .then(a.agent.cmp(&b.agent))
            .then(a.seq.cmp(&b.seq))
    });
    let n = rows.len();
    let mut time = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut agent = StringBuilder::new();
    let mut series = StringBuilder::new();
    let mut device = StringBuilder::new();
    let mut measure = StringBuilder::new();
    let mut vd = Float64Builder::with_capacity(n);
    let mut vi = Int64Builder::with_capacity(n);
    let mut vb = BooleanBuilder::with_capacity(n);
    let mut vs = StringBuilder::new();
    let mut quality = StringBuilder::new();
    let mut late = BooleanBuilder::with_capacity(n);
    let mut tags = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    let mut seq = Int64Builder::with_capacity(n);
    for r in rows.iter() {
        time.append_value(r.ts_ms);
        agent.append_value(&*r.agent);
        series.append_value(&r.series.key);
        device.append_value(&r.series.device);
        measure.append_value(&r.series.measure);
        vd.append_option(if let Value::F64(v) = r.value {
            Some(v)
        } else {
            None
        });
        vi.append_option(if let Value::I64(v) = r.value {
            Some(v)
        } else {
            None
        });
        vb.append_option(if let Value::Bool(v) = r.value {
            Some(v)
        } else {
            None
        });
        vs.append_option(if let Value::Str(v) = &r.value {
            Some(v.as_str())
        } else {
            None
        });
        quality.append_value(r.quality.as_str());
        late.append_value(r.late);
        for (k, v) in &r.series.tags {
            tags.keys().append_value(k);
            tags.values().append_value(v);
        }
        tags.append(true)?;
        seq.append_value(r.seq as i64);
    }
    let columns: Vec<(&str, ArrayRef, bool)> = vec![
        ("time", Arc::new(time.finish()), false),
        ("agent_id", Arc::new(agent.finish()), false),
        ("series", Arc::new(series.finish()), false),
        ("device", Arc::new(device.finish()), false),
        ("measure", Arc::new(measure.finish()), false),
        ("value_double", Arc::new(vd.finish()), true),
        ("value_bigint", Arc::new(vi.finish()), true),
        ("value_boolean", Arc::new(vb.finish()), true),
        ("value_string", Arc::new(vs.finish()), true),
        ("quality", Arc::new(quality.finish()), false),
        ("late", Arc::new(late.finish()), false),
        ("tags", Arc::new(tags.finish()), false),
        ("batch_seq", Arc::new(seq.finish()), false),
    ];
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(name, a, nullable)| Field::new(*name, a.data_type().clone(), *nullable))
            .collect::<Vec<_>>(),
    ));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a, _)| a).collect(),
    )?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level)?))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by(format!("fieldlink-cloud {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut writer = ArrowWriter::try_new(Vec::with_capacity(n * 8), schema, Some(props))?;
    writer.write(&batch)?;
    writer.into_inner()
}

/// `(YYYY-MM-DD, HH)` of the UTC hour containing `ts_ms`.
pub fn hour_partition(ts_ms: i64) -> (String, u32) {
    let hours = ts_ms.div_euclid(3_600_000);
    let days = hours.div_euclid(24);
    let hour = hours.rem_euclid(24) as u32;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (format!("{y:04}-{m:02}-{d:02}"), hour)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    #[test]
    fn hour_partitions_are_utc_calendar_hours() {
        assert_eq!(hour_partition(0), ("1970-01-01".into(), 0));
        assert_eq!(hour_partition(1_772_431_200_000), ("2026-03-02".into(), 6));
        assert_eq!(
            hour_partition(951_782_400_000 - 1),
            ("2000-02-28".into(), 23)
        ); // leap year
        assert_eq!(hour_partition(951_868_800_000), ("2000-03-01".into(), 0));
        assert_eq!(hour_partition(-1), ("1969-12-31".into(), 23));
    }

    #[test]
    fn a_file_holds_every_row_sorted_by_series_and_time() {
        let s = |k: &str| {
            Arc::new(SeriesCols {
                key: k.into(),
                device: "d".into(),
                measure: "m".into(),
                tags: vec![("site".into(), "muc".into())],
            })
        };
        let (a, b) = (s("d/b"), s("d/a"));
        let agent: Arc<str> = Arc::from("edge-1");
        let mut rows: Vec<Row> = (0..1000)
            .map(|i| Row {
                ts_ms: 1_000 - i,
                series: if i % 2 == 0 { a.clone() } else { b.clone() },
                agent: agent.clone(),
                seq: 1,
                value: if i % 3 == 0 {
                    Value::Str("x".into())
                } else {
                    Value::F64(i as f64)
                },
                quality: Quality::Good,
                late: false,
            })
            .collect();
        let bytes = encode(&mut rows, 300, 3).unwrap_or_default();
        let reader =
            SerializedFileReader::new(bytes::Bytes::from(bytes)).unwrap_or_else(|e| panic!("{e}"));
        let meta = reader.metadata();
        assert_eq!(meta.file_metadata().num_rows(), 1000);
        assert_eq!(meta.num_row_groups(), 4);
        assert_eq!(meta.file_metadata().schema_descr().num_columns(), 14); // map = key + value leaves
        assert!(rows
            .windows(2)
            .all(|w| (&w[0].series.key, w[0].ts_ms) <= (&w[1].series.key, w[1].ts_ms)));
    }
}

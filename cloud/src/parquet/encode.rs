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
//! | `batch_seq` | int64 | the agent's batch sequence number within its buffer epoch |
//! | `batch_epoch` | uint64 | the agent buffer's epoch (0: a record from before epochs); `(agent_id, batch_epoch, batch_seq)` is the batch id |
//!
//! A batch is landed once per `(agent_id, batch_epoch, batch_seq)` while the cloud remembers it (see
//! `land::dedup`); a resend it no longer remembers lands again, with the same three values, and the compactor
//! drops those repeated rows when it publishes the hour (`crate::compaction::merge`).
//!
//! Hive partitions `dt=YYYY-MM-DD/hour=HH` (event time, UTC) are in the object path, not in the file. Rows are
//! sorted by `(series, time)` so each series is contiguous and its timestamps compress well (then by batch and
//! value: the compactor's merge order). Compression: zstd.

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int64Builder, MapBuilder, StringBuilder,
    StringDictionaryBuilder, TimestampMillisecondBuilder, UInt64Builder,
};
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, DictionaryArray, Int32Array, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use fieldlink_proto::{Quality, Value};
use parquet::arrow::arrow_writer::ArrowWriterOptions;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use std::collections::HashMap;
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
    /// The agent buffer's epoch.
    pub epoch: u64,
    /// Value.
    pub value: Value,
    /// Quality.
    pub quality: Quality,
    /// Late flag.
    pub late: bool,
}

/// Ranks of the distinct values of `key` over `items`: equal keys get equal ranks, in key order. Items that
/// share one `Arc` are looked at once. Returns the rank of each item and the key of each rank.
fn ranks<'a, T: ?Sized + 'a>(
    items: impl Iterator<Item = &'a Arc<T>>,
    key: impl Fn(&T) -> &str,
) -> (Vec<u32>, Vec<String>) {
    let mut by_ptr: HashMap<*const T, usize> = HashMap::new();
    let mut uniq: Vec<&'a Arc<T>> = Vec::new();
    let slots: Vec<usize> = items
        .map(|it| {
            *by_ptr.entry(Arc::as_ptr(it)).or_insert_with(|| {
                uniq.push(it);
                uniq.len() - 1
            })
        })
        .collect();
    let mut order: Vec<usize> = (0..uniq.len()).collect();
    order.sort_by(|a, b| key(uniq[*a]).cmp(key(uniq[*b])));
    let mut rank_of = vec![0u32; uniq.len()];
    let mut names: Vec<String> = Vec::new();
    for i in order {
        let k = key(uniq[i]);
        if names.last().map(String::as_str) != Some(k) {
            names.push(k.to_owned());
        }
        rank_of[i] = (names.len() - 1) as u32;
    }
    (slots.into_iter().map(|s| rank_of[s]).collect(), names)
}

/// The order of two rows' values, after `(series, time, agent, epoch, batch)`: `value_double` (null first, then
/// IEEE total order), `value_bigint`, `value_boolean`, `value_string`, `quality`, `late` — the column order of the
/// compactor's merge.
fn value_order(a: &Row, b: &Row) -> std::cmp::Ordering {
    fn cols(r: &Row) -> (Option<f64>, Option<i64>, Option<bool>, Option<&str>) {
        match &r.value {
            Value::F64(v) => (Some(*v), None, None, None),
            Value::I64(v) => (None, Some(*v), None, None),
            Value::Bool(v) => (None, None, Some(*v), None),
            Value::Str(v) => (None, None, None, Some(v.as_str())),
        }
    }
    let (x, y) = (cols(a), cols(b));
    let d = match (x.0, y.0) {
        (Some(p), Some(q)) => p.total_cmp(&q),
        (p, q) => p.is_some().cmp(&q.is_some()),
    };
    d.then_with(|| x.1.cmp(&y.1))
        .then_with(|| x.2.cmp(&y.2))
        .then_with(|| x.3.cmp(&y.3))
        .then_with(|| a.quality.as_str().cmp(b.quality.as_str()))
        .then_with(|| a.late.cmp(&b.late))
}

/// Encodes `rows` as one Parquet file, sorted by `(series, time, agent, epoch, batch)` and then by value (see
/// `value_order`; the input order breaks remaining ties, so the file is a pure function of the rows and their
/// order).
pub fn encode(
    rows: &[Row],
    row_group_rows: usize,
    zstd_level: i32,
) -> Result<Vec<u8>, ParquetError> {
    // Sort by integer ranks: string comparisons happen once per distinct series, not per row comparison.
    let (series_rank, series_names) = ranks(rows.iter().map(|r| &r.series), |s| s.key.as_str());
    let (agent_rank, agent_names) = ranks(rows.iter().map(|r| &r.agent), |a| a);
    let mut order: Vec<(u32, i64, u32, u64, u64, u32)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                series_rank[i],
                r.ts_ms,
                agent_rank[i],
                r.epoch,
                r.seq,
                i as u32,
            )
        })
        .collect();
    // Rows equal up to the batch go in value order, so a file is sorted in the compactor's total order
    // (`compaction::merge`), which finds repeats as neighbours.
    order.sort_unstable_by(|a, b| {
        (a.0, a.1, a.2, a.3, a.4)
            .cmp(&(b.0, b.1, b.2, b.3, b.4))
            .then_with(|| value_order(&rows[a.5 as usize], &rows[b.5 as usize]))
            .then(a.5.cmp(&b.5))
    });
    // Device, measure and tags of each series rank.
    let mut per_rank: Vec<Option<&SeriesCols>> = vec![None; series_names.len()];
    for (i, r) in rows.iter().enumerate() {
        per_rank[series_rank[i] as usize].get_or_insert(&r.series);
    }
    let per_rank: Vec<&SeriesCols> = per_rank.into_iter().flatten().collect();

    let n = rows.len();
    let mut time = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut series_keys = Vec::with_capacity(n);
    let mut agent_keys = Vec::with_capacity(n);
    let mut vd = Float64Builder::with_capacity(n);
    let mut vi = Int64Builder::with_capacity(n);
    let mut vb = BooleanBuilder::with_capacity(n);
    let mut vs = StringBuilder::new();
    let mut quality = StringDictionaryBuilder::<Int32Type>::new();
    let mut late = BooleanBuilder::with_capacity(n);
    let mut tags = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    let mut seq = Int64Builder::with_capacity(n);
    let mut epoch = UInt64Builder::with_capacity(n);
    for &(s_rank, ts, a_rank, batch_epoch, batch_seq, i) in &order {
        let r = &rows[i as usize];
        time.append_value(ts);
        series_keys.push(s_rank as i32);
        agent_keys.push(a_rank as i32);
        match &r.value {
            Value::F64(v) => {
                vd.append_value(*v);
                vi.append_null();
                vb.append_null();
                vs.append_null();
            }
            Value::I64(v) => {
                vd.append_null();
                vi.append_value(*v);
                vb.append_null();
                vs.append_null();
            }
            Value::Bool(v) => {
                vd.append_null();
                vi.append_null();
                vb.append_value(*v);
                vs.append_null();
            }
            Value::Str(v) => {
                vd.append_null();
                vi.append_null();
                vb.append_null();
                vs.append_value(v);
            }
        }
        quality.append_value(r.quality.as_str());
        late.append_value(r.late);
        for (k, v) in &per_rank[s_rank as usize].tags {
            tags.keys().append_value(k);
            tags.values().append_value(v);
        }
        tags.append(true)?;
        seq.append_value(batch_seq as i64);
        epoch.append_value(batch_epoch);
    }
    // Series, device, measure and agent are dictionary arrays over the ranks: no per-row string copies.
    let dict = |keys: &[i32], values: Vec<&str>| -> Result<ArrayRef, ParquetError> {
        let d = DictionaryArray::<Int32Type>::try_new(
            Int32Array::from(keys.to_vec()),
            Arc::new(StringArray::from(values)),
        )?;
        Ok(Arc::new(d))
    };
    let series_col = dict(
        &series_keys,
        series_names.iter().map(String::as_str).collect(),
    )?;
    let device_col = dict(
        &series_keys,
        per_rank.iter().map(|s| s.device.as_str()).collect(),
    )?;
    let measure_col = dict(
        &series_keys,
        per_rank.iter().map(|s| s.measure.as_str()).collect(),
    )?;
    let agent_col = dict(
        &agent_keys,
        agent_names.iter().map(String::as_str).collect(),
    )?;
    let columns: Vec<(&str, ArrayRef, bool)> = vec![
        ("time", Arc::new(time.finish()), false),
        ("agent_id", agent_col, false),
        ("series", series_col, false),
        ("device", device_col, false),
        ("measure", measure_col, false),
        ("value_double", Arc::new(vd.finish()), true),
        ("value_bigint", Arc::new(vi.finish()), true),
        ("value_boolean", Arc::new(vb.finish()), true),
        ("value_string", Arc::new(vs.finish()), true),
        ("quality", Arc::new(quality.finish()), false),
        ("late", Arc::new(late.finish()), false),
        ("tags", Arc::new(tags.finish()), false),
        ("batch_seq", Arc::new(seq.finish()), false),
        ("batch_epoch", Arc::new(epoch.finish()), false),
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
    let options = writer_options(row_group_rows, zstd_level)?;
    let mut writer = ArrowWriter::try_new_with_options(Vec::with_capacity(n * 8), schema, options)?;
    writer.write(&batch)?;
    writer.into_inner()
}

/// How every bronze file is written (landing files and published hours alike): zstd at `zstd_level`, row groups
/// of `row_group_rows`, no embedded Arrow schema (readers see plain strings: the dictionaries are an encoding
/// detail). The output is a pure function of the rows and the order they are written in.
pub fn writer_options(
    row_group_rows: usize,
    zstd_level: i32,
) -> Result<ArrowWriterOptions, ParquetError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level)?))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by(format!("fieldlink-cloud {}", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(ArrowWriterOptions::new()
        .with_properties(props)
        .with_skip_arrow_metadata(true))
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

/// The hour (hours since the Unix epoch, UTC) of a partition `dt=YYYY-MM-DD/hour=HH`; the inverse of
/// [`hour_partition`]. `None` if `path` is not such a partition.
pub fn parse_partition(path: &str) -> Option<i64> {
    let (dt, hour) = path.split_once('/')?;
    let date = dt.strip_prefix("dt=")?;
    let hh: i64 = hour.strip_prefix("hour=")?.parse().ok()?;
    let mut it = date.splitn(3, '-');
    let (y, m, d): (i64, i64, i64) = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || !(0..24).contains(&hh) {
        return None;
    }
    // Days since 1970-01-01 from a civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let hour = days * 24 + hh;
    // Reject dates that do not exist (2026-02-30): they do not map back to themselves.
    let (back, _) = hour_partition(hour * 3_600_000);
    (back == date).then_some(hour)
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
    fn partitions_parse_back_to_their_hour() {
        for hour in [-30i64, -1, 0, 1, 263_000, 492_342, 1_000_000] {
            let (day, hh) = hour_partition(hour * 3_600_000);
            assert_eq!(
                parse_partition(&format!("dt={day}/hour={hh:02}")),
                Some(hour)
            );
        }
        assert_eq!(parse_partition("dt=2026-02-30/hour=01"), None);
        assert_eq!(parse_partition("dt=2026-03-02/hour=24"), None);
        assert_eq!(parse_partition("dt=2026-03-02"), None);
        assert_eq!(parse_partition("x=2026-03-02/hour=01"), None);
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
        let rows: Vec<Row> = (0..1000)
            .map(|i| Row {
                ts_ms: 1_000 - i,
                series: if i % 2 == 0 { a.clone() } else { b.clone() },
                agent: agent.clone(),
                seq: 1,
                epoch: 7,
                value: if i % 3 == 0 {
                    Value::Str("x".into())
                } else {
                    Value::F64(i as f64)
                },
                quality: Quality::Good,
                late: false,
            })
            .collect();
        let bytes = encode(&rows, 300, 3).unwrap_or_default();
        let reader =
            SerializedFileReader::new(bytes::Bytes::from(bytes)).unwrap_or_else(|e| panic!("{e}"));
        let meta = reader.metadata();
        assert_eq!(meta.file_metadata().num_rows(), 1000);
        assert_eq!(meta.num_row_groups(), 4);
        assert_eq!(meta.file_metadata().schema_descr().num_columns(), 15); // map = key + value leaves
                                                                           // Sorted by (series, time): read the two columns back.
        use parquet::record::RowAccessor;
        let got: Vec<(String, i64)> = reader
            .get_row_iter(None)
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|r| {
                let r = r.unwrap_or_else(|e| panic!("{e}"));
                (
                    r.get_string(2).cloned().unwrap_or_default(),
                    r.get_timestamp_millis(0).unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(got.len(), 1000);
        assert!(got.windows(2).all(|w| w[0] <= w[1]), "not sorted");
        assert_eq!(got[0], ("d/a".to_string(), 1));
    }
}

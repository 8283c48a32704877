//! Alarm rows ⇄ Parquet, and the merge that publishes an hour of the alarm table. Pure (local bytes and files).
//!
//! # Alarm table schema (one row per alarm event)
//! | column | type | notes |
//! |---|---|---|
//! | `time` | timestamp(ms, UTC) | event time of the transition |
//! | `agent_id` | string | producing agent |
//! | `batch_epoch` | uint64 | the agent buffer's epoch |
//! | `batch_seq` | int64 | the alarm record's batch sequence number |
//! | `rule` | string | the rule's name |
//! | `rule_seq` | int64 | the rule's sequence number (1, 2, … per agent buffer epoch and rule) |
//! | `series` | string | full series key |
//! | `device` | string | series key without its last segment |
//! | `measure` | string | last segment of the series key |
//! | `tags` | map<string, string> | the series' tags |
//! | `from_level`, `from_severity` | string, int32 | the level before (severity 0 = `ok`) |
//! | `to_level`, `to_severity` | string, int32 | the level after |
//! | `cause_time` | timestamp(ms, UTC), nullable | the reading that caused it; null for a stale alarm raised by the clock |
//! | `cause_value_double`, `cause_value_bigint`, `cause_value_boolean`, `cause_value_string` | nullable | its value (one set) |
//! | `cause_quality` | string, nullable | its quality |
//!
//! An event is identified by `(agent_id, batch_epoch, rule, rule_seq)`. A file's rows are sorted by
//! `(time, agent_id, batch_epoch, rule, rule_seq)`, then by the rest of the row ([`sort_dedup`]), so a file
//! is a pure function of its set of rows. [`merge`] drops **repeats** (rows equal in every column: a record
//! landed twice, a commit repeated after a crash, a landing file merged again into the published file); two rows
//! with the same identity but other content are both kept (an identity reused by a buffer file restored from a
//! backup), as the bronze table does.
//!
//! Alarm events are few (a state change, not a reading), so an hour is merged in memory: about 300 bytes per
//! event (an hour of 100,000 events takes about 30 MiB).

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, MapBuilder, StringBuilder,
    TimestampMillisecondBuilder, UInt64Builder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type, TimestampMillisecondType, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{Field, Schema};
use fieldlink_proto::alarm::{encode_alarm_body, AlarmEvent, Cause, Level};
use fieldlink_proto::{Quality, Series, Value};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::errors::ParquetError;
use std::path::Path;
use std::sync::Arc;

/// One alarm event with the record it came in.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmRow {
    /// Producing agent.
    pub agent: String,
    /// Its buffer's epoch.
    pub epoch: u64,
    /// The alarm record's batch sequence number.
    pub batch_seq: u64,
    /// The event.
    pub event: AlarmEvent,
}

impl AlarmRow {
    /// The event's canonical bytes (its alarm-record body encoding): equal rows, equal bytes.
    fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // An event that was decoded from a record encodes again; one that does not sorts by its other columns.
        let _ = encode_alarm_body(std::slice::from_ref(&self.event), &mut out);
        out
    }
}

/// Sorts `rows` in the table order and drops repeats (rows equal in every column). Returns how many were dropped.
pub fn sort_dedup(rows: &mut Vec<AlarmRow>) -> usize {
    let mut keyed: Vec<(Vec<u8>, AlarmRow)> = rows.drain(..).map(|r| (r.canonical(), r)).collect();
    keyed.sort_by(|(ca, a), (cb, b)| {
        (
            a.event.ts_ms,
            a.agent.as_str(),
            a.epoch,
            a.event.rule.as_str(),
            a.event.rule_seq,
            a.batch_seq,
        )
            .cmp(&(
                b.event.ts_ms,
                b.agent.as_str(),
                b.epoch,
                b.event.rule.as_str(),
                b.event.rule_seq,
                b.batch_seq,
            ))
            .then_with(|| ca.cmp(cb))
    });
    let before = keyed.len();
    keyed.dedup_by(|(cb, b), (ca, a)| {
        ca == cb && a.agent == b.agent && a.epoch == b.epoch && a.batch_seq == b.batch_seq
    });
    let dropped = before - keyed.len();
    rows.extend(keyed.into_iter().map(|(_, r)| r));
    dropped
}

fn quality_of(s: &str) -> Option<Quality> {
    [Quality::Good, Quality::Uncertain, Quality::Bad]
        .into_iter()
        .find(|q| q.as_str() == s)
}

/// Encodes `rows` (already in table order: see [`sort_dedup`]) as one zstd Parquet file.
pub fn encode(
    rows: &[AlarmRow],
    row_group_rows: usize,
    zstd_level: i32,
) -> Result<Vec<u8>, ParquetError> {
    let n = rows.len();
    let mut time = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut agent = StringBuilder::new();
    let mut epoch = UInt64Builder::with_capacity(n);
    let mut batch_seq = Int64Builder::with_capacity(n);
    let mut rule = StringBuilder::new();
    let mut rule_seq = Int64Builder::with_capacity(n);
    let mut series = StringBuilder::new();
    let mut device = StringBuilder::new();
    let mut measure = StringBuilder::new();
    let mut tags = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    let mut from_level = StringBuilder::new();
    let mut from_sev = Int32Builder::with_capacity(n);
    let mut to_level = StringBuilder::new();
    let mut to_sev = Int32Builder::with_capacity(n);
    let mut cause_time = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut vd = Float64Builder::with_capacity(n);
    let mut vi = Int64Builder::with_capacity(n);
    let mut vb = BooleanBuilder::with_capacity(n);
    let mut vs = StringBuilder::new();
    let mut cause_quality = StringBuilder::new();
    for r in rows {
        let e = &r.event;
        time.append_value(e.ts_ms);
        agent.append_value(&r.agent);
        epoch.append_value(r.epoch);
        batch_seq.append_value(r.batch_seq as i64);
        rule.append_value(&e.rule);
        rule_seq.append_value(e.rule_seq as i64);
        series.append_value(&e.series.key);
        device.append_value(e.series.device());
        measure.append_value(e.series.measure());
        for (k, v) in &e.series.tags {
            tags.keys().append_value(k);
            tags.values().append_value(v);
        }
        tags.append(true)?;
        from_level.append_value(&e.from.name);
        from_sev.append_value(i32::from(e.from.severity));
        to_level.append_value(&e.to.name);
        to_sev.append_value(i32::from(e.to.severity));
        match &e.cause {
            None => {
                cause_time.append_null();
                vd.append_null();
                vi.append_null();
                vb.append_null();
                vs.append_null();
                cause_quality.append_null();
            }
            Some(c) => {
                cause_time.append_value(c.ts_ms);
                vd.append_option(match c.value {
                    Value::F64(v) => Some(v),
                    _ => None,
                });
                vi.append_option(match c.value {
                    Value::I64(v) => Some(v),
                    _ => None,
                });
                vb.append_option(match c.value {
                    Value::Bool(v) => Some(v),
                    _ => None,
                });
                vs.append_option(match &c.value {
                    Value::Str(v) => Some(v.as_str()),
                    _ => None,
                });
                cause_quality.append_value(c.quality.as_str());
            }
        }
    }
    let columns: Vec<(&str, ArrayRef, bool)> = vec![
        ("time", Arc::new(time.finish()), false),
        ("agent_id", Arc::new(agent.finish()), false),
        ("batch_epoch", Arc::new(epoch.finish()), false),
        ("batch_seq", Arc::new(batch_seq.finish()), false),
        ("rule", Arc::new(rule.finish()), false),
        ("rule_seq", Arc::new(rule_seq.finish()), false),
        ("series", Arc::new(series.finish()), false),
        ("device", Arc::new(device.finish()), false),
        ("measure", Arc::new(measure.finish()), false),
        ("tags", Arc::new(tags.finish()), false),
        ("from_level", Arc::new(from_level.finish()), false),
        ("from_severity", Arc::new(from_sev.finish()), false),
        ("to_level", Arc::new(to_level.finish()), false),
        ("to_severity", Arc::new(to_sev.finish()), false),
        ("cause_time", Arc::new(cause_time.finish()), true),
        ("cause_value_double", Arc::new(vd.finish()), true),
        ("cause_value_bigint", Arc::new(vi.finish()), true),
        ("cause_value_boolean", Arc::new(vb.finish()), true),
        ("cause_value_string", Arc::new(vs.finish()), true),
        ("cause_quality", Arc::new(cause_quality.finish()), true),
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
    let options = crate::parquet::encode::writer_options(row_group_rows, zstd_level)?;
    let mut writer =
        ArrowWriter::try_new_with_options(Vec::with_capacity(n * 64), schema, options)?;
    writer.write(&batch)?;
    writer.into_inner()
}

fn schema_err(path: &Path, what: impl std::fmt::Display) -> ParquetError {
    ParquetError::General(format!("{}: {what}", path.display()))
}

/// Reads every row of an alarm-table file (a landing file or a published part).
pub fn read(path: &Path) -> Result<Vec<AlarmRow>, ParquetError> {
    let file = std::fs::File::open(path).map_err(|e| schema_err(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?
        .with_batch_size(8192)
        .build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| schema_err(path, e))?;
        read_batch(&batch, &mut rows).map_err(|e| schema_err(path, e))?;
    }
    Ok(rows)
}

fn read_batch(b: &RecordBatch, out: &mut Vec<AlarmRow>) -> Result<(), String> {
    let col = |name: &str| {
        b.column_by_name(name)
            .cloned()
            .ok_or_else(|| format!("no column {name}: not an alarm-table file"))
    };
    macro_rules! prim {
        ($name:expr, $t:ty) => {{
            let c = col($name)?;
            c.as_primitive_opt::<$t>()
                .cloned()
                .ok_or_else(|| format!("column {} has type {}", $name, c.data_type()))?
        }};
    }
    macro_rules! string {
        ($name:expr) => {{
            let c = col($name)?;
            c.as_string_opt::<i32>()
                .cloned()
                .ok_or_else(|| format!("column {} has type {}", $name, c.data_type()))?
        }};
    }
    let time = prim!("time", TimestampMillisecondType);
    let agent = string!("agent_id");
    let epoch = prim!("batch_epoch", UInt64Type);
    let batch_seq = prim!("batch_seq", Int64Type);
    let rule = string!("rule");
    let rule_seq = prim!("rule_seq", Int64Type);
    let series = string!("series");
    let tags_col = col("tags")?;
    let tags = tags_col
        .as_map_opt()
        .ok_or("column tags is not a map")?
        .clone();
    let from_level = string!("from_level");
    let from_sev = prim!("from_severity", Int32Type);
    let to_level = string!("to_level");
    let to_sev = prim!("to_severity", Int32Type);
    let cause_time = prim!("cause_time", TimestampMillisecondType);
    let vd = prim!("cause_value_double", Float64Type);
    let vi = prim!("cause_value_bigint", Int64Type);
    let vb_col = col("cause_value_boolean")?;
    let vb = vb_col
        .as_boolean_opt()
        .ok_or("column cause_value_boolean is not boolean")?
        .clone();
    let vs = string!("cause_value_string");
    let cq = string!("cause_quality");
    let tag_keys = tags
        .keys()
        .as_string_opt::<i32>()
        .ok_or("tag keys")?
        .clone();
    let tag_values = tags
        .values()
        .as_string_opt::<i32>()
        .ok_or("tag values")?
        .clone();
    let severity = |v: i32| u8::try_from(v).map_err(|_| format!("severity {v}"));
    for i in 0..b.num_rows() {
        let offsets = tags.value_offsets();
        let (lo, hi) = (offsets[i] as usize, offsets[i + 1] as usize);
        let tag_list = (lo..hi)
            .map(|j| (tag_keys.value(j).to_owned(), tag_values.value(j).to_owned()))
            .collect();
        let cause = if cause_time.is_null(i) {
            None
        } else {
            let value = if !vd.is_null(i) {
                Value::F64(vd.value(i))
            } else if !vi.is_null(i) {
                Value::I64(vi.value(i))
            } else if !vb.is_null(i) {
                Value::Bool(vb.value(i))
            } else if !vs.is_null(i) {
                Value::Str(vs.value(i).to_owned())
            } else {
                return Err(format!("row {i}: a cause without a value"));
            };
            Some(Cause {
                ts_ms: cause_time.value(i),
                value,
                quality: quality_of(cq.value(i))
                    .ok_or_else(|| format!("row {i}: quality {:?}", cq.value(i)))?,
            })
        };
        out.push(AlarmRow {
            agent: agent.value(i).to_owned(),
            epoch: epoch.value(i),
            batch_seq: batch_seq.value(i) as u64,
            event: AlarmEvent {
                rule: rule.value(i).to_owned(),
                rule_seq: rule_seq.value(i) as u64,
                series: Series {
                    key: series.value(i).to_owned(),
                    tags: tag_list,
                },
                from: Level {
                    severity: severity(from_sev.value(i))?,
                    name: from_level.value(i).to_owned(),
                },
                to: Level {
                    severity: severity(to_sev.value(i))?,
                    name: to_level.value(i).to_owned(),
                },
                ts_ms: time.value(i),
                cause,
            },
        });
    }
    Ok(())
}

/// What [`merge`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeCount {
    /// Rows read.
    pub input_rows: u64,
    /// Rows written.
    pub rows: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Merges the alarm-table files `inputs` into one file at `out`: every row once, in table order.
pub fn merge(
    inputs: &[std::path::PathBuf],
    out: &Path,
    row_group_rows: usize,
    zstd_level: i32,
) -> Result<MergeCount, ParquetError> {
    let mut rows = Vec::new();
    for p in inputs {
        rows.extend(read(p)?);
    }
    let input_rows = rows.len() as u64;
    sort_dedup(&mut rows);
    let bytes = encode(&rows, row_group_rows, zstd_level)?;
    crate::store::replace_file(out, |f| {
        use std::io::Write;
        f.write_all(&bytes)
    })
    .map_err(|e| schema_err(out, e))?;
    Ok(MergeCount {
        input_rows,
        rows: rows.len() as u64,
        bytes: bytes.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row(agent: &str, rule: &str, seq: u64, ts: i64, value: Option<Value>) -> AlarmRow {
        AlarmRow {
            agent: agent.into(),
            epoch: 7,
            batch_seq: 3,
            event: AlarmEvent {
                rule: rule.into(),
                rule_seq: seq,
                series: Series {
                    key: "line3/arm/1/vib".into(),
                    tags: vec![("site".into(), "muc".into())],
                },
                from: Level {
                    severity: 0,
                    name: "ok".into(),
                },
                to: Level {
                    severity: 2,
                    name: "critical".into(),
                },
                ts_ms: ts,
                cause: value.map(|value| Cause {
                    ts_ms: ts - 5,
                    value,
                    quality: Quality::Uncertain,
                }),
            },
        }
    }

    #[test]
    fn rows_round_trip_through_parquet_with_every_cause_type() {
        let mut rows = vec![
            row("a", "vib", 1, 10, Some(Value::F64(9.5))),
            row("a", "vib", 2, 20, Some(Value::I64(-4))),
            row("b", "door", 1, 15, Some(Value::Bool(true))),
            row("b", "door", 2, 16, Some(Value::Str("open".into()))),
            row("c", "stale", 1, 30, None),
        ];
        sort_dedup(&mut rows);
        let bytes = encode(&rows, 1024, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.parquet");
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(read(&p).unwrap(), rows);
    }

    #[test]
    fn merging_drops_repeats_but_keeps_a_reused_identity_with_other_content() {
        let dir = tempfile::tempdir().unwrap();
        let a = vec![
            row("a", "vib", 1, 10, Some(Value::F64(9.5))),
            row("a", "vib", 2, 20, Some(Value::F64(1.0))),
        ];
        let mut b = a.clone();
        b.push(row("a", "vib", 3, 5, None));
        // Same identity (agent, epoch, rule, rule_seq), other content: a restored buffer backup. Kept.
        b.push(row("a", "vib", 1, 10, Some(Value::F64(7.0))));
        let mut paths = Vec::new();
        for (i, mut rows) in [a, b].into_iter().enumerate() {
            sort_dedup(&mut rows);
            let p = dir.path().join(format!("{i}.parquet"));
            std::fs::write(&p, encode(&rows, 1024, 3).unwrap()).unwrap();
            paths.push(p);
        }
        let out = dir.path().join("out.parquet");
        let m = merge(&paths, &out, 1024, 3).unwrap();
        assert_eq!((m.input_rows, m.rows), (6, 4));
        let got = read(&out).unwrap();
        let keys: Vec<(u64, i64)> = got
            .iter()
            .map(|r| (r.event.rule_seq, r.event.ts_ms))
            .collect();
        assert_eq!(keys, vec![(3, 5), (1, 10), (1, 10), (2, 20)]);
        // Merging the output again with an input is a no-op: same bytes.
        let again = dir.path().join("again.parquet");
        merge(&[out.clone(), paths[0].clone()], &again, 1024, 3).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    }
}

//! Batch → Timestream multi-measure records. Pure; enforces Timestream's limits (moto does not).
//!
//! # Record layout
//! Readings that share device, tags and time become one multi-measure record:
//! - dimensions: `agent`, `device`, the series' tags (renamed where Timestream would refuse them, below) and
//!   `measure_set`: 16 hex digits of a 64-bit FNV-1a hash of the record's sorted measure names, see
//!   [`measure_set`];
//! - time: the event time, ms;
//! - measures: one per series measure (the last segment of the series key). A reading whose quality is not
//!   good adds a VARCHAR measure `<measure>_quality`; a bad reading without a finite value (a Modbus exception)
//!   lands as that quality measure alone. More than [`limits::MAX_MEASURES`] measures, or measure values of more
//!   than [`limits::MAX_MEASURE_VALUE_BYTES`] together ([`value_bytes`]), are cut into several records (measures
//!   in name order: pieces of [`limits::MAX_MEASURES`] as earlier versions cut them, and a piece over the bytes
//!   cut again as far as they allow, so a piece within both limits keeps the identity earlier versions wrote);
//! - measure name: `measure_name` from the config (default `metrics`), the same for every record;
//! - version: a 63-bit hash of the record's content (dimensions, time, measure name, measures with types and
//!   values), at least 1, see [`content_version`].
//!
//! # Why: Timestream replaces whole records
//! A record's identity is dimensions + time + measure name, and a write to an existing identity with a higher
//! `Version` replaces the record's whole measure set: measures the new write does not carry vanish. One
//! device's measures at one time can be split over batches (the seal's row limit, per-metric Sparkplug DDATA
//! straddling a seal tick, a measure that arrives late) and over the records of one group cut at
//! [`limits::MAX_MEASURES`]. With one identity for all of them each write erased the others. The
//! `measure_set` dimension means two writes share an identity only if they carry the same measure names (a
//! 64-bit hash collision aside), so a replace can change values but never erase a measure. It is a dimension,
//! not part of the measure name, because a table holds at most 8,192 measure names while dimension values are
//! unbounded; queries keep `WHERE measure_name = 'metrics'` and may ignore `measure_set`.
//!
//! The version is a function of the content, not of the batch, so:
//! - a replay or a resend of a batch writes the same versions and values: a no-op;
//! - the same reading landed from two batches (a broker redelivery after a crash or a re-image, a buffer epoch
//!   restarting its sequence numbers at 1) is a no-op too, where a batch-sequence version made the new epoch's
//!   lower number a rejected "version conflict";
//! - two different values for one identity (a device sending one time twice with other values) end the same
//!   way whatever the landing order: the higher version stays, the lower one is replaced or rejected (and
//!   dead-lettered). Parquet keeps both readings.
//!
//! Cost: one more dimension per record (a few dozen bytes), and one Timestream series per device and distinct
//! measure set: a device whose measures always arrive together has one; splits add one per distinct subset.
//!
//! A tag whose name Timestream would refuse as a dimension — `agent` or `device` (taken), `time`,
//! `measure_name`, `measure_value`, a name starting with `ts_` or `measure_value`, or one with a `:` — becomes
//! dimension `tag_<name>` (`:` as `_`). Sources name tags freely (an InfluxDB line's `device=...` is common);
//! Parquet keeps the original names.

use fieldlink_proto::{Batch, Quality, Value};
use std::collections::BTreeMap;

/// Timestream limits (Timestream for LiveAnalytics quotas).
pub mod limits {
    /// Records per `WriteRecords` call.
    pub const MAX_RECORDS_PER_CALL: usize = 100;
    /// Dimensions per record.
    pub const MAX_DIMENSIONS: usize = 128;
    /// Bytes in a dimension name.
    pub const MAX_DIMENSION_NAME: usize = 60;
    /// Bytes in a dimension value.
    pub const MAX_DIMENSION_VALUE: usize = 2048;
    /// Bytes in a measure name.
    pub const MAX_MEASURE_NAME: usize = 256;
    /// Measures in one multi-measure record.
    pub const MAX_MEASURES: usize = 256;
    /// Bytes in a VARCHAR measure value (at least 1: `MeasureValue.Value` is 1 to 2048 characters).
    pub const MAX_VARCHAR: usize = 2048;
    /// Bytes of a series' dimension names and values together ("size of dimension name dimension value pair per
    /// series"); `measure_set` and its 16 hex digits included.
    pub const MAX_SERIES_DIMENSION_BYTES: usize = 2048;
    /// Bytes of one multi-measure record's measure values together ("measure value size per multi-measure
    /// record", counted by [`super::value_bytes`]). 256 DOUBLE measures make exactly 2,048; strings can pass it.
    /// AWS also lists a "maximum record size" of 2 KB; we read it as this limit (a record of 256 doubles could
    /// never be written otherwise, and a reported test against AWS found names, dimensions and time outside it).
    pub const MAX_MEASURE_VALUE_BYTES: usize = 2048;
}

/// The bytes AWS counts for a measure value of type `ty` (as in its metering of writes): 1 for a BOOLEAN, 8 for a
/// BIGINT or DOUBLE, the UTF-8 bytes of a VARCHAR. Pure.
pub fn value_bytes(text: &str, ty: MeasureType) -> usize {
    match ty {
        MeasureType::Boolean => 1,
        MeasureType::Bigint | MeasureType::Double => 8,
        MeasureType::Varchar => text.len(),
    }
}

/// Bytes of the `measure_set` dimension (its name and 16 hex digits).
const MEASURE_SET_BYTES: usize = MEASURE_SET.len() + 16;

/// A measure's Timestream type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureType {
    /// DOUBLE.
    Double,
    /// BIGINT.
    Bigint,
    /// BOOLEAN.
    Boolean,
    /// VARCHAR.
    Varchar,
}

impl MeasureType {
    /// Timestream's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            MeasureType::Double => "DOUBLE",
            MeasureType::Bigint => "BIGINT",
            MeasureType::Boolean => "BOOLEAN",
            MeasureType::Varchar => "VARCHAR",
        }
    }
}

/// One multi-measure record, independent of the SDK's types.
#[derive(Debug, Clone, PartialEq)]
pub struct TsRecord {
    /// Dimensions `(name, value)`.
    pub dimensions: Vec<(String, String)>,
    /// Time, Unix ms.
    pub time_ms: i64,
    /// The record's measure name (the configured one).
    pub measure_name: String,
    /// Measures `(name, value as text, type)`.
    pub measures: Vec<(String, String, MeasureType)>,
    /// Record version.
    pub version: i64,
}

/// Why a reading was not turned into a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Series key.
    pub series: String,
    /// Reason.
    pub reason: String,
}

fn measure(value: &Value) -> Option<(String, MeasureType)> {
    match value {
        Value::F64(v) if v.is_finite() => Some((format!("{v}"), MeasureType::Double)),
        Value::F64(_) => None,
        Value::I64(v) => Some((v.to_string(), MeasureType::Bigint)),
        Value::Bool(v) => Some((v.to_string(), MeasureType::Boolean)),
        Value::Str(s) => Some((s.clone(), MeasureType::Varchar)),
    }
}

/// The dimension name of a tag: the tag's name unless Timestream reserves it or it would collide with `agent` or
/// `device`.
pub fn dimension_name(tag: &str) -> String {
    let reserved = matches!(
        tag,
        "agent" | "device" | "time" | "measure_name" | MEASURE_SET
    ) || tag.starts_with("ts_")
        || tag.starts_with("measure_value")
        || tag.contains(':');
    if reserved {
        format!("tag_{}", tag.replace(':', "_"))
    } else {
        tag.to_owned()
    }
}

/// The dimension naming a record's measure set.
pub const MEASURE_SET: &str = "measure_set";

fn fnv64(parts: impl IntoIterator<Item = impl AsRef<[u8]>>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        // Each part is followed by a 0xff byte (never in UTF-8 text), so part boundaries count.
        for &b in p.as_ref().iter().chain([0xffu8].iter()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The `measure_set` dimension of a record carrying the measures `names` (in any order): 16 hex digits, a
/// function of the set of names alone.
pub fn measure_set<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut names: Vec<&str> = names.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    format!("{:016x}", fnv64(names))
}

/// The version of a record: a hash of everything it carries, in `1..=i64::MAX`.
pub fn content_version(r: &TsRecord) -> i64 {
    let time = r.time_ms.to_string();
    let mut parts: Vec<&str> = vec![&time, &r.measure_name];
    for (k, v) in &r.dimensions {
        parts.extend([k.as_str(), v.as_str()]);
    }
    for (k, v, t) in &r.measures {
        parts.extend([k.as_str(), v.as_str(), t.name()]);
    }
    ((fnv64(parts) >> 1) as i64).max(1)
}

/// Builds the records of one batch, named after `measure_name` (the configured base); readings that break a
/// limit are returned as refused.
pub fn build(batch: &Batch, measure_name: &str) -> (Vec<TsRecord>, Vec<Refused>) {
    let mut refused = Vec::new();
    // Dimensions per series, checked once.
    let dims: Vec<Result<Vec<(String, String)>, String>> = batch
        .series
        .iter()
        .map(|s| {
            let mut d = vec![
                ("agent".to_owned(), batch.agent_id.clone()),
                ("device".to_owned(), s.device().to_owned()),
            ];
            d.extend(
                s.tags
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (dimension_name(k), v.clone())),
            );
            if d.len() + 1 > limits::MAX_DIMENSIONS {
                return Err(format!(
                    "{} dimensions with measure_set, limit {}",
                    d.len() + 1,
                    limits::MAX_DIMENSIONS
                ));
            }
            for (k, v) in &d {
                if k.len() > limits::MAX_DIMENSION_NAME || v.len() > limits::MAX_DIMENSION_VALUE {
                    return Err(format!("dimension {k} too long"));
                }
            }
            let bytes = d.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() + MEASURE_SET_BYTES;
            if bytes > limits::MAX_SERIES_DIMENSION_BYTES {
                return Err(format!(
                    "dimensions of {bytes} bytes together, limit {}",
                    limits::MAX_SERIES_DIMENSION_BYTES
                ));
            }
            if s.measure().len() > limits::MAX_MEASURE_NAME
                || d.iter().any(|(k, _)| k == s.measure())
            {
                return Err(format!(
                    "measure name {:?} too long or equal to a dimension name",
                    s.measure()
                ));
            }
            Ok(d)
        })
        .collect();

    // Group by (dimensions, time); BTreeMap keeps the output deterministic. Within a group, a later reading of
    // the same measure replaces an earlier one (Timestream refuses a repeated measure name in one record).
    type Measures = BTreeMap<String, (String, MeasureType)>;
    let mut groups: BTreeMap<(Vec<(String, String)>, i64), Measures> = BTreeMap::new();
    for r in &batch.readings {
        let s = &batch.series[r.series as usize];
        let d = match &dims[r.series as usize] {
            Ok(d) => d,
            Err(why) => {
                refused.push(Refused {
                    series: s.key.clone(),
                    reason: why.clone(),
                });
                continue;
            }
        };
        // A value Timestream cannot hold: a non-finite double, or an empty string (a VARCHAR is 1 to 2048 bytes).
        let held = measure(&r.value).filter(|(text, _)| !text.is_empty());
        let Some((text, ty)) = held else {
            if r.quality != Quality::Good {
                if let Err(reason) = quality_name_fits(s.measure(), r.quality) {
                    refused.push(Refused {
                        series: s.key.clone(),
                        reason,
                    });
                    continue;
                }
                // A bad reading without a value (e.g. a Modbus exception): record only its quality.
                let m = groups.entry((d.clone(), r.ts_ms)).or_default();
                m.insert(
                    format!("{}{QUALITY_SUFFIX}", s.measure()),
                    (r.quality.as_str().to_owned(), MeasureType::Varchar),
                );
                continue;
            }
            // Refused here: an empty string would have Timestream refuse the whole WriteRecords call (a
            // ValidationException, not a rejected record), and every record of the call be dead-lettered.
            refused.push(Refused {
                series: s.key.clone(),
                reason: match r.value {
                    Value::Str(_) => "string of 0 bytes, allowed 1..=2048".into(),
                    _ => "non-finite double".into(),
                },
            });
            continue;
        };
        if ty == MeasureType::Varchar && text.len() > limits::MAX_VARCHAR {
            refused.push(Refused {
                series: s.key.clone(),
                reason: format!(
                    "string of {} bytes, allowed 1..={}",
                    text.len(),
                    limits::MAX_VARCHAR
                ),
            });
            continue;
        }
        if let Err(reason) = quality_name_fits(s.measure(), r.quality) {
            refused.push(Refused {
                series: s.key.clone(),
                reason,
            });
            continue;
        }
        let m = groups.entry((d.clone(), r.ts_ms)).or_default();
        m.insert(s.measure().to_owned(), (text, ty));
        if r.quality != Quality::Good {
            m.insert(
                format!("{}{QUALITY_SUFFIX}", s.measure()),
                (r.quality.as_str().to_owned(), MeasureType::Varchar),
            );
        }
    }

    let mut records = Vec::with_capacity(groups.len());
    for ((dimensions, time_ms), measures) in groups {
        let measures: Vec<_> = measures.into_iter().map(|(k, (v, t))| (k, v, t)).collect();
        // Split records with more measures or bytes than allowed: each chunk has its own measure set, so its own
        // identity.
        for chunk in measures
            .chunks(limits::MAX_MEASURES)
            .flat_map(within_value_bytes)
        {
            let mut dims = dimensions.clone();
            dims.push((
                MEASURE_SET.to_owned(),
                measure_set(chunk.iter().map(|(k, _, _)| k.as_str())),
            ));
            let mut r = TsRecord {
                dimensions: dims,
                time_ms,
                measure_name: measure_name.to_owned(),
                measures: chunk.to_vec(),
                version: 0,
            };
            r.version = content_version(&r);
            records.push(r);
        }
    }
    (records, refused)
}

/// One record's worth of measures (at most [`limits::MAX_MEASURES`], cut as earlier versions cut them) cut
/// further into records of at most [`limits::MAX_MEASURE_VALUE_BYTES`] of values, each filled as far as that
/// allows, in order: a piece within the limit is exactly the record earlier versions wrote, whatever its
/// neighbours. Every measure fits a record alone (a VARCHAR is at most [`limits::MAX_VARCHAR`] bytes).
fn within_value_bytes(
    measures: &[(String, String, MeasureType)],
) -> impl Iterator<Item = &[(String, String, MeasureType)]> {
    let mut rest = measures;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (mut bytes, mut n) = (0, 0);
        for (_, value, ty) in rest {
            let add = value_bytes(value, *ty);
            if n > 0 && bytes + add > limits::MAX_MEASURE_VALUE_BYTES {
                break;
            }
            bytes += add;
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// Whether the `<measure>_quality` measure a reading of quality `quality` adds (any but good) has a name
/// Timestream takes ([`limits::MAX_MEASURE_NAME`] bytes).
fn quality_name_fits(measure: &str, quality: Quality) -> Result<(), String> {
    let name = measure.len() + QUALITY_SUFFIX.len();
    if quality != Quality::Good && name > limits::MAX_MEASURE_NAME {
        return Err(format!(
            "quality measure name of {name} bytes, limit {}",
            limits::MAX_MEASURE_NAME
        ));
    }
    Ok(())
}

/// The suffix of a quality measure's name.
const QUALITY_SUFFIX: &str = "_quality";

/// The event times a Timestream table accepts: at most [`TimeWindow::MAX_FUTURE_MS`] ahead, and back to the
/// memory store's retention, or to the magnetic store's when magnetic store writes are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// Memory store retention, ms.
    pub memory_ms: i64,
    /// Magnetic store retention, ms, when magnetic store writes are enabled.
    pub magnetic_ms: Option<i64>,
}

impl TimeWindow {
    /// How far ahead of the service's clock a record may be.
    pub const MAX_FUTURE_MS: i64 = 15 * 60 * 1000;

    /// Why a record at `time_ms` would be rejected at `now_ms`, if it would.
    pub fn check(&self, time_ms: i64, now_ms: i64) -> Result<(), String> {
        if time_ms > now_ms + Self::MAX_FUTURE_MS {
            return Err(format!(
                "time is {} ms in the future (limit 15 minutes)",
                time_ms - now_ms
            ));
        }
        let oldest = now_ms - self.magnetic_ms.unwrap_or(self.memory_ms);
        if time_ms < oldest {
            return Err(match self.magnetic_ms {
                Some(_) => "time is before the magnetic store retention".to_owned(),
                None => "time is before the memory store retention (enable timestream.magnetic_store_writes to land late data)".to_owned(),
            });
        }
        Ok(())
    }
}

/// Splits records into those the window accepts and those it does not (with the reason).
pub fn split_by_time(
    records: Vec<TsRecord>,
    window: &TimeWindow,
    now_ms: i64,
) -> (Vec<TsRecord>, Vec<(TsRecord, String)>) {
    let mut ok = Vec::with_capacity(records.len());
    let mut refused = Vec::new();
    for r in records {
        match window.check(r.time_ms, now_ms) {
            Ok(()) => ok.push(r),
            Err(why) => refused.push((r, why)),
        }
    }
    (ok, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldlink_proto::{Reading, Series};

    fn r(series: u32, ts: i64, value: Value, quality: Quality) -> Reading {
        Reading {
            series,
            ts_ms: ts,
            value,
            quality,
            late: false,
        }
    }

    #[test]
    fn tags_timestream_would_refuse_become_tag_dimensions() {
        for (tag, dim) in [
            ("site", "site"),
            ("device", "tag_device"),
            ("agent", "tag_agent"),
            ("time", "tag_time"),
            ("measure_name", "tag_measure_name"),
            ("measure_value::double", "tag_measure_value__double"),
            ("ts_source", "tag_ts_source"),
            ("a:b", "tag_a_b"),
            ("device_kind", "device_kind"),
        ] {
            assert_eq!(dimension_name(tag), dim, "{tag}");
        }
    }

    #[test]
    fn readings_of_one_device_at_one_time_share_a_record() {
        let batch = Batch {
            agent_id: "edge-1".into(),
            epoch: 0,
            seq: 9,
            series: vec![
                Series::new("line3/imu/000/acc_x"),
                Series::new("line3/imu/000/acc_y"),
                Series::new("plant/m/001/value"),
            ],
            readings: vec![
                r(0, 100, Value::F64(0.5), Quality::Good),
                r(1, 100, Value::F64(-1.0), Quality::Bad),
                r(2, 100, Value::I64(7), Quality::Good),
                r(0, 200, Value::F64(0.25), Quality::Good),
            ],
        };
        let (recs, refused) = build(&batch, "metrics");
        assert!(refused.is_empty());
        assert_eq!(recs.len(), 3);
        let first = &recs[0];
        assert_eq!(
            first.dimensions,
            vec![
                ("agent".into(), "edge-1".into()),
                ("device".into(), "line3/imu/000".into()),
                (
                    MEASURE_SET.into(),
                    measure_set(["acc_y_quality", "acc_x", "acc_y"])
                ),
            ]
        );
        assert_eq!(first.time_ms, 100);
        assert_eq!(first.measure_name, "metrics");
        assert_eq!(first.version, content_version(first));
        assert_eq!(
            first.measures,
            vec![
                ("acc_x".into(), "0.5".into(), MeasureType::Double),
                ("acc_y".into(), "-1".into(), MeasureType::Double),
                ("acc_y_quality".into(), "bad".into(), MeasureType::Varchar),
            ]
        );
        assert_eq!(
            recs[2].measures,
            vec![("value".into(), "7".into(), MeasureType::Bigint)]
        );
    }

    fn one_device(seq: u64, epoch: u64, readings: &[(u32, f64)]) -> Batch {
        Batch {
            agent_id: "edge-1".into(),
            epoch,
            seq,
            series: (0..300)
                .map(|k| Series::new(format!("line3/imu/000/m{k:03}")))
                .collect(),
            readings: readings
                .iter()
                .map(|&(s, v)| r(s, 100, Value::F64(v), Quality::Good))
                .collect(),
        }
    }

    /// Timestream identity: dimensions, time, measure name.
    type Identity = (Vec<(String, String)>, i64, String);

    fn identity(r: &TsRecord) -> Identity {
        (r.dimensions.clone(), r.time_ms, r.measure_name.clone())
    }

    #[test]
    fn measures_of_one_time_split_over_batches_or_chunks_never_share_a_record_identity() {
        let (a, _) = build(&one_device(1, 5, &[(0, 1.0), (1, 2.0)]), "metrics");
        let (b, _) = build(&one_device(2, 5, &[(2, 3.0), (3, 4.0)]), "metrics");
        let (c, _) = build(
            &one_device(3, 5, &[(1, 2.0), (0, 1.0), (2, 3.0)]),
            "metrics",
        );
        assert_eq!(
            a[0].dimensions[..2],
            b[0].dimensions[..2],
            "same agent and device"
        );
        assert_ne!(identity(&a[0]), identity(&b[0]));
        assert_ne!(
            identity(&a[0]),
            identity(&c[0]),
            "a superset is another set"
        );
        // More measures than one record holds: each chunk is its own identity.
        let all: Vec<(u32, f64)> = (0..300).map(|k| (k, f64::from(k))).collect();
        let (chunks, refused) = build(&one_device(4, 5, &all), "metrics");
        assert!(refused.is_empty());
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].measures.len(), limits::MAX_MEASURES);
        assert_ne!(identity(&chunks[0]), identity(&chunks[1]));
        // Whatever two records share an identity carry the same measure names.
        let mut seen: BTreeMap<Identity, Vec<String>> = BTreeMap::new();
        for r in a.iter().chain(&b).chain(&c).chain(&chunks) {
            let names: Vec<String> = r.measures.iter().map(|m| m.0.clone()).collect();
            let prev = seen.entry(identity(r)).or_insert_with(|| names.clone());
            assert_eq!(*prev, names);
        }
    }

    #[test]
    fn the_version_follows_the_content_not_the_batch() {
        let (a, _) = build(&one_device(1, 5, &[(0, 1.0), (1, 2.0)]), "metrics");
        // The same readings from another batch of another epoch (a redelivery after a re-image): same record.
        let (b, _) = build(&one_device(1, 9, &[(1, 2.0), (0, 1.0)]), "metrics");
        let (c, _) = build(&one_device(700, 5, &[(0, 1.0), (1, 2.0)]), "metrics");
        assert_eq!(a, b);
        assert_eq!(a, c);
        // Another value for the same identity: another version.
        let (d, _) = build(&one_device(2, 5, &[(0, 1.0), (1, 2.5)]), "metrics");
        assert_eq!(identity(&a[0]), identity(&d[0]));
        assert_ne!(a[0].version, d[0].version);
        assert!(a[0].version >= 1 && d[0].version >= 1);
    }

    #[test]
    fn a_bad_reading_without_a_value_lands_as_its_quality() {
        let batch = Batch {
            agent_id: "a".into(),
            epoch: 0,
            seq: 1,
            series: vec![Series::new("meter/v")],
            readings: vec![r(0, 1, Value::F64(f64::NAN), Quality::Bad)],
        };
        let (recs, refused) = build(&batch, "metrics");
        assert!(refused.is_empty());
        assert_eq!(
            recs[0].measures,
            vec![("v_quality".into(), "bad".into(), MeasureType::Varchar)]
        );
    }

    #[test]
    fn an_empty_string_of_bad_quality_keeps_its_quality() {
        let batch = Batch {
            agent_id: "a".into(),
            epoch: 0,
            seq: 1,
            series: vec![Series::new("d/e")],
            readings: vec![r(0, 1, Value::Str(String::new()), Quality::Bad)],
        };
        let (recs, refused) = build(&batch, "metrics");
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(
            recs[0].measures,
            vec![("e_quality".into(), "bad".into(), MeasureType::Varchar)]
        );
    }

    #[test]
    fn limits_are_enforced_here_because_the_emulator_does_not() {
        let long_tag = Series {
            key: "d/v".into(),
            tags: vec![("site".into(), "x".repeat(3000))],
        };
        // Each dimension within its own limit, together over the series' 2 KB.
        let long_tags = Series {
            key: "d/w".into(),
            tags: vec![
                ("line".into(), "x".repeat(1100)),
                ("cell".into(), "y".repeat(1100)),
            ],
        };
        let batch = Batch {
            agent_id: "a".into(),
            epoch: 0,
            seq: 1,
            series: vec![
                long_tag,
                Series::new("d/device"),
                Series::new("d/s"),
                Series::new("d/ok"),
                long_tags,
                Series::new("d/empty"),
            ],
            readings: vec![
                r(0, 1, Value::F64(1.0), Quality::Good),
                r(1, 1, Value::F64(1.0), Quality::Good),
                r(2, 1, Value::Str("y".repeat(3000)), Quality::Good),
                r(3, 1, Value::F64(f64::NAN), Quality::Good),
                r(4, 1, Value::F64(1.0), Quality::Good),
                r(5, 1, Value::Str(String::new()), Quality::Good),
            ],
        };
        let (recs, refused) = build(&batch, "metrics");
        assert!(recs.is_empty(), "{recs:?}");
        assert_eq!(refused.len(), 6, "{refused:?}");
        assert!(refused[4].reason.contains("bytes together"), "{refused:?}");
        assert!(
            refused[5].reason.contains("string of 0 bytes"),
            "{refused:?}"
        );
    }

    #[test]
    fn measure_values_past_a_records_bytes_are_cut_into_records_within_them() {
        // Ten strings of 300 bytes at one time: 3,000 bytes of values, more than one record takes.
        let batch = Batch {
            agent_id: "a".into(),
            epoch: 0,
            seq: 1,
            series: (0..10).map(|k| Series::new(format!("d/s{k}"))).collect(),
            readings: (0..10)
                .map(|k| r(k, 1, Value::Str(format!("{k}").repeat(300)), Quality::Good))
                .collect(),
        };
        let (recs, refused) = build(&batch, "metrics");
        assert!(refused.is_empty(), "{refused:?}");
        let sizes: Vec<usize> = recs
            .iter()
            .map(|r| r.measures.iter().map(|(_, v, t)| value_bytes(v, *t)).sum())
            .collect();
        // Filled in name order as far as the limit allows.
        assert_eq!(sizes, vec![1800, 1200]);
        let names: Vec<&str> = recs
            .iter()
            .flat_map(|r| r.measures.iter().map(|m| m.0.as_str()))
            .collect();
        assert_eq!(
            names,
            ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9"]
        );
        assert_ne!(identity(&recs[0]), identity(&recs[1]));
        // Within both limits (256 doubles: exactly 2,048 bytes), a record is not cut: the same record as before.
        let all: Vec<(u32, f64)> = (0..256).map(|k| (k, f64::from(k))).collect();
        let (one, _) = build(&one_device(4, 5, &all), "metrics");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].measures.len(), 256);
        // Over 256 measures, the pieces of 256 are cut as before and only a piece over the bytes is cut again: the
        // piece after it keeps its identity (before, an earlier over-limit piece shifted every later cut).
        let mut big = one_device(
            6,
            5,
            &(0..300).map(|k| (k, f64::from(k))).collect::<Vec<_>>(),
        );
        for k in 0..3 {
            big.readings[k].value = Value::Str("s".repeat(700));
        }
        let (recs, refused) = build(&big, "metrics");
        assert!(refused.is_empty());
        let (old, _) = build(
            &one_device(
                6,
                5,
                &(0..300).map(|k| (k, f64::from(k))).collect::<Vec<_>>(),
            ),
            "metrics",
        );
        assert_eq!(old.len(), 2);
        assert_eq!(
            recs.last(),
            old.last(),
            "the piece within the limits is the record it was"
        );
        // 2,100 + 253 × 8 bytes in the first 256: three records there, then the 44 as before.
        assert_eq!(recs.len(), 4);
        // Booleans are one byte each: 256 fit too.
        assert_eq!(value_bytes("true", MeasureType::Boolean), 1);
        assert_eq!(value_bytes("-1", MeasureType::Bigint), 8);
    }

    #[test]
    fn a_quality_measure_name_past_the_limit_refuses_its_reading() {
        let measure = "m".repeat(limits::MAX_MEASURE_NAME - 4);
        let batch = Batch {
            agent_id: "a".into(),
            epoch: 0,
            seq: 1,
            series: vec![Series::new(format!("d/{measure}"))],
            readings: vec![
                r(0, 1, Value::F64(1.0), Quality::Good),
                r(0, 2, Value::F64(1.0), Quality::Uncertain),
                r(0, 3, Value::F64(f64::NAN), Quality::Bad),
            ],
        };
        let (recs, refused) = build(&batch, "metrics");
        // The good reading lands; the two that would add `<measure>_quality` (260 bytes) are refused whole.
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0].time_ms, 1);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0]
            .reason
            .contains("quality measure name of 260 bytes"));
    }

    #[test]
    fn the_time_window_refuses_the_future_and_data_older_than_retention() {
        let hour = 3_600_000;
        let now = 1_700_000_000_000;
        let mem = TimeWindow {
            memory_ms: 6 * hour,
            magnetic_ms: None,
        };
        assert!(mem.check(now, now).is_ok());
        assert!(mem.check(now + 14 * 60_000, now).is_ok());
        assert!(mem.check(now + 16 * 60_000, now).is_err());
        assert!(mem.check(now - 5 * hour, now).is_ok());
        let old = mem.check(now - 7 * hour, now).unwrap_err();
        assert!(old.contains("magnetic_store_writes"), "{old}");
        let mag = TimeWindow {
            memory_ms: 6 * hour,
            magnetic_ms: Some(365 * 24 * hour),
        };
        assert!(mag.check(now - 7 * hour, now).is_ok());
        assert!(mag.check(now - 400 * 24 * hour, now).is_err());
    }
}

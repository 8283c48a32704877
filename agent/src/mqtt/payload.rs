//! Payload mapping: an MQTT message (topic + bytes) to readings. Pure; no I/O.
//!
//! - A JSON object: every scalar field is a reading of series `<topic>/<field>`; nested objects are flattened
//!   with `/` (`{"a":{"b":1}}` gives `<topic>/a/b`). Numbers become f64 (JSON has one number type, and one type
//!   per series keeps Timestream and Parquet columns stable), booleans bool, strings string. `null` and arrays
//!   are skipped and counted. The field named by `timestamp_field` is the event time; without it, arrival time.
//! - A bare JSON number, boolean or string (e.g. `23.5`): one reading of series `<topic>`, at arrival time.

use super::config::{PayloadConfig, TimeUnit};
use crate::buffer::NewReading;
use fieldlink_proto::limits::{MAX_KEY_BYTES, MAX_STRING_BYTES};
use fieldlink_proto::{Quality, Series, Value};
use serde_json::Value as Json;

/// Why a payload (or a part of it) was refused. The variant's `reason()` labels the dead-letter counter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Larger than `max_payload_bytes`.
    #[error("payload of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// Not JSON.
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    /// JSON, but no field gave a reading.
    #[error("payload holds no readings")]
    NoReadings,
    /// The timestamp field is not a number in range.
    #[error("timestamp field is not a usable number")]
    BadTimestamp,
}

impl PayloadError {
    /// Short reason label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PayloadError::TooLarge(_) => "too_large",
            PayloadError::NotJson(_) => "not_json",
            PayloadError::NoReadings => "no_readings",
            PayloadError::BadTimestamp => "bad_timestamp",
        }
    }
}

/// The readings of one message, plus the count of fields that were skipped (null, arrays, over-long names).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// Readings.
    pub readings: Vec<NewReading>,
    /// Fields skipped.
    pub skipped: usize,
}

/// Tags taken from the topic by a `tags_from_topic` pattern (empty if the topic does not match).
pub fn topic_tags(pattern: &str, topic: &str) -> Vec<(String, String)> {
    let (p, t): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), topic.split('/').collect());
    if p.len() != t.len() {
        return Vec::new();
    }
    let mut tags = Vec::new();
    for (pl, tl) in p.iter().zip(&t) {
        if let Some(name) = pl.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
            tags.push((name.to_owned(), (*tl).to_owned()));
        } else if *pl != "+" && pl != tl {
            return Vec::new();
        }
    }
    tags.sort();
    tags
}

fn to_ms(v: &Json, unit: TimeUnit) -> Option<i64> {
    let f = v.as_f64()?;
    let ms = match unit {
        TimeUnit::S => f * 1e3,
        TimeUnit::Ms => f,
        TimeUnit::Us => f / 1e3,
        TimeUnit::Ns => f / 1e6,
    };
    // Years 1970..=9999 only.
    (ms.is_finite() && (0.0..=253_402_300_799_999.0).contains(&ms)).then(|| ms.round() as i64)
}

fn scalar(v: &Json) -> Option<Value> {
    match v {
        Json::Number(n) => n.as_f64().map(Value::F64),
        Json::Bool(b) => Some(Value::Bool(*b)),
        Json::String(s) if s.len() <= MAX_STRING_BYTES => Some(Value::Str(s.clone())),
        _ => None,
    }
}

fn push(out: &mut Parsed, key: String, ts_ms: i64, value: Value) {
    if key.len() > MAX_KEY_BYTES {
        out.skipped += 1;
        return;
    }
    out.readings.push(NewReading {
        series: Series::new(key),
        ts_ms,
        value,
        quality: Quality::Good,
    });
}

fn flatten(
    out: &mut Parsed,
    prefix: &str,
    obj: &serde_json::Map<String, Json>,
    ts_ms: i64,
    ts_field: Option<&str>,
) {
    for (k, v) in obj {
        if ts_field == Some(k.as_str()) {
            continue;
        }
        let key = format!("{prefix}/{k}");
        match v {
            Json::Object(inner) => flatten(out, &key, inner, ts_ms, None),
            other => match scalar(other) {
                Some(value) => push(out, key, ts_ms, value),
                None => out.skipped += 1,
            },
        }
    }
}

/// Maps one message. `arrival_ms` is used when the payload carries no timestamp.
pub fn parse(
    topic: &str,
    payload: &[u8],
    arrival_ms: i64,
    cfg: &PayloadConfig,
) -> Result<Parsed, PayloadError> {
    if payload.len() > cfg.max_payload_bytes {
        return Err(PayloadError::TooLarge(payload.len()));
    }
    let json: Json =
        serde_json::from_slice(payload).map_err(|e| PayloadError::NotJson(e.to_string()))?;
    let mut out = Parsed::default();
    match &json {
        Json::Object(obj) => {
            let ts_ms = match obj.get(&cfg.timestamp_field) {
                // Only a timestamp the payload claims is checked; the agent's own clock is taken as it is.
                Some(v) => match to_ms(v, cfg.timestamp_unit) {
                    Some(ts)
                        if ts >= cfg.min_timestamp_ms
                            && ts <= arrival_ms.saturating_add(cfg.max_future_ms) =>
                    {
                        ts
                    }
                    _ => return Err(PayloadError::BadTimestamp),
                },
                None => arrival_ms,
            };
            flatten(&mut out, topic, obj, ts_ms, Some(&cfg.timestamp_field));
        }
        other => match scalar(other) {
            Some(value) => push(&mut out, topic.to_owned(), arrival_ms, value),
            None => out.skipped += 1,
        },
    }
    if out.readings.is_empty() {
        return Err(PayloadError::NoReadings);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PayloadConfig {
        PayloadConfig::default()
    }

    fn keys_values(p: &Parsed) -> Vec<(String, i64, Value)> {
        p.readings
            .iter()
            .map(|r| (r.series.key.clone(), r.ts_ms, r.value.clone()))
            .collect()
    }

    #[test]
    fn json_object_fields_become_series_under_the_topic() {
        let p = parse("line3/imu/000", br#"{"ts": 1772431200000, "acc_x": -0.74, "ok": true, "mode": "run", "nested": {"t": 3}}"#, 1_772_431_200_005, &cfg()).unwrap_or_default();
        let mut got = keys_values(&p);
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            vec![
                (
                    "line3/imu/000/acc_x".into(),
                    1772431200000,
                    Value::F64(-0.74)
                ),
                (
                    "line3/imu/000/mode".into(),
                    1772431200000,
                    Value::Str("run".into())
                ),
                (
                    "line3/imu/000/nested/t".into(),
                    1772431200000,
                    Value::F64(3.0)
                ),
                ("line3/imu/000/ok".into(), 1772431200000, Value::Bool(true)),
            ]
        );
    }

    #[test]
    fn bare_number_is_one_reading_at_arrival_time() {
        let p = parse("office/env/temp", b"23.5", 42, &cfg()).unwrap_or_default();
        assert_eq!(
            keys_values(&p),
            vec![("office/env/temp".into(), 42, Value::F64(23.5))]
        );
    }

    #[test]
    fn timestamp_units_are_converted_to_milliseconds() {
        let mut c = cfg();
        c.timestamp_unit = TimeUnit::S;
        let p = parse(
            "t",
            br#"{"ts": 1772431200.5, "v": 1}"#,
            1_772_431_200_000,
            &c,
        )
        .unwrap_or_default();
        assert_eq!(p.readings[0].ts_ms, 1772431200500);
        c.timestamp_unit = TimeUnit::Ns;
        let p = parse(
            "t",
            br#"{"ts": 1772431200000000000, "v": 1}"#,
            1_772_431_200_000,
            &c,
        )
        .unwrap_or_default();
        assert_eq!(p.readings[0].ts_ms, 1772431200000);
    }

    #[test]
    fn bad_payloads_are_refused_by_reason() {
        let mut c = cfg();
        c.max_payload_bytes = 10;
        assert_eq!(
            parse("t", b"{\"v\": 1000000000}", 0, &c)
                .map(|_| ())
                .unwrap_err()
                .reason(),
            "too_large"
        );
        let c = cfg();
        let reason_at =
            |p: &[u8], now: i64| parse("t", p, now, &c).map(|_| ()).unwrap_err().reason();
        assert_eq!(reason_at(b"not json", 0), "not_json");
        assert_eq!(reason_at(br#"{"a": null, "b": [1]}"#, 0), "no_readings");
        assert_eq!(
            reason_at(br#"{"ts": "yesterday", "v": 1}"#, 0),
            "bad_timestamp"
        );
        assert_eq!(reason_at(br#"{"ts": -5, "v": 1}"#, 0), "bad_timestamp");
        // Absurdly old, or far in the future of the arrival time.
        let now = 1_772_431_200_000;
        assert_eq!(
            reason_at(br#"{"ts": 86400000, "v": 1}"#, now),
            "bad_timestamp"
        );
        assert_eq!(
            reason_at(br#"{"ts": 1872431200000, "v": 1}"#, now),
            "bad_timestamp"
        );
        assert!(parse("t", br#"{"ts": 1772431100000, "v": 1}"#, now, &c).is_ok());
    }

    #[test]
    fn topic_levels_become_tags() {
        assert_eq!(
            topic_tags("site/{site}/line/{line}/+", "site/muc/line/3/pump-7"),
            vec![("line".into(), "3".into()), ("site".into(), "muc".into())]
        );
        assert!(
            topic_tags("site/{site}/+", "site/muc/line/3").is_empty(),
            "different depth"
        );
        assert!(
            topic_tags("plant/{site}/+", "site/muc/x").is_empty(),
            "literal mismatch"
        );
    }

    #[test]
    fn skipped_fields_are_counted_and_good_ones_kept() {
        let p = parse("t", br#"{"a": null, "b": [1], "c": 2}"#, 0, &cfg()).unwrap_or_default();
        assert_eq!((p.readings.len(), p.skipped), (1, 2));
    }
}

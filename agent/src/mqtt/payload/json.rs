//! JSON payloads.
//!
//! - A JSON object: every scalar field is a reading of series `<topic>/<field>`; nested objects are flattened
//!   with `/` (`{"a":{"b":1}}` gives `<topic>/a/b`). Numbers become f64 (JSON has one number type, and one type
//!   per series keeps Timestream and Parquet columns stable), booleans bool, strings string. `null` and arrays
//!   are skipped and counted (`null`, `wrong_type`). The field named by `timestamp_field` is the event time in
//!   `timestamp_unit`; without it, arrival time. `include` / `exclude` select fields by path.
//! - A bare JSON number, boolean or string (e.g. `23.5`): one reading of series `<topic>`, at arrival time.
//! - `NaN`, `Infinity` and `-Infinity` are not JSON, but common (Python's `json.dumps` writes them): such a field
//!   is skipped as `non_finite` and the rest of the object still passes.

use super::{rfc3339_ms, to_ms, ts_in_range, Parsed, PayloadError, Skip};
use crate::mqtt::config::{PayloadConfig, TimeUnit};
use fieldlink_proto::{Quality, Series, Value};
use serde_json::Value as Json;

/// Stands in for a non-finite number after [`replace_non_finite`]; not a string a device sends.
const NON_FINITE: &str = "\u{0}fieldlink:non-finite\u{0}";

/// Rewrites bare `NaN`, `Infinity` and `-Infinity` tokens (outside strings) into the [`NON_FINITE`] string, so
/// the rest of the payload parses. `None` if there are none.
fn replace_non_finite(payload: &[u8]) -> Option<Vec<u8>> {
    let marker = serde_json::to_string(NON_FINITE).unwrap_or_default();
    let mut out = Vec::with_capacity(payload.len() + 32);
    let (mut i, mut in_str, mut replaced) = (0, false, false);
    while i < payload.len() {
        let b = payload[i];
        if in_str {
            out.push(b);
            if b == b'\\' && i + 1 < payload.len() {
                out.push(payload[i + 1]);
                i += 1;
            } else if b == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        let rest = &payload[i..];
        let token = [&b"-Infinity"[..], b"Infinity", b"NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        match (b, token) {
            (b'"', _) => {
                in_str = true;
                out.push(b);
                i += 1;
            }
            (_, Some(t)) => {
                out.extend_from_slice(marker.as_bytes());
                i += t.len();
                replaced = true;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    replaced.then_some(out)
}

/// A field's path is selected by `include` / `exclude`: a listed path selects itself and everything below it.
fn listed(paths: &[String], path: &str) -> bool {
    paths.iter().any(|p| {
        path == p
            || (path.len() > p.len()
                && path.starts_with(p.as_str())
                && path.as_bytes()[p.len()] == b'/')
    })
}

/// Whether any listed path lies below `path` (so an object at `path` must be walked for `include`).
fn lists_below(paths: &[String], path: &str) -> bool {
    paths
        .iter()
        .any(|p| p.len() > path.len() && p.starts_with(path) && p.as_bytes()[path.len()] == b'/')
}

fn scalar(v: &Json) -> Result<Value, Skip> {
    match v {
        Json::Number(n) => n.as_f64().map(Value::F64).ok_or(Skip::NonFinite),
        Json::Bool(b) => Ok(Value::Bool(*b)),
        Json::String(s) if s == NON_FINITE => Err(Skip::NonFinite),
        Json::String(s) => Ok(Value::Str(s.clone())),
        Json::Null => Err(Skip::Null),
        Json::Array(_) | Json::Object(_) => Err(Skip::WrongType),
    }
}

struct Walk<'a> {
    topic: &'a str,
    cfg: &'a PayloadConfig,
    ts_ms: i64,
    out: Parsed,
}

impl Walk<'_> {
    /// `path` is the field path below the topic ("" at the top).
    fn object(&mut self, path: &str, obj: &serde_json::Map<String, Json>) {
        for (k, v) in obj {
            if path.is_empty() && *k == self.cfg.timestamp_field {
                continue;
            }
            let field = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}/{k}")
            };
            if listed(&self.cfg.exclude, &field) {
                continue;
            }
            let included = self.cfg.include.is_empty() || listed(&self.cfg.include, &field);
            match v {
                Json::Object(inner) => {
                    if included || lists_below(&self.cfg.include, &field) {
                        self.object(&field, inner);
                    }
                }
                _ if !included => {}
                other => match scalar(other) {
                    Ok(value) => self.out.push(
                        Series::new(format!("{}/{field}", self.topic)),
                        self.ts_ms,
                        value,
                        Quality::Good,
                    ),
                    Err(skip) => self.out.skipped.push(skip),
                },
            }
        }
    }
}

/// Maps one JSON message (size already checked).
pub fn parse(
    topic: &str,
    payload: &[u8],
    arrival_ms: i64,
    cfg: &PayloadConfig,
) -> Result<Parsed, PayloadError> {
    let json: Json = match serde_json::from_slice(payload) {
        Ok(j) => j,
        Err(e) => replace_non_finite(payload)
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or_else(|| PayloadError::NotJson(e.to_string()))?,
    };
    let mut out = Parsed::default();
    match &json {
        Json::Object(obj) => {
            let ts_ms = match obj.get(&cfg.timestamp_field) {
                // Only a timestamp the payload claims is checked; the agent's own clock is taken as it is.
                Some(v) => match match cfg.timestamp_unit {
                    TimeUnit::Rfc3339 => v.as_str().and_then(rfc3339_ms),
                    unit => v.as_f64().and_then(|f| to_ms(f, unit)),
                } {
                    Some(ts) if ts_in_range(ts, arrival_ms, cfg) => ts,
                    _ => return Err(PayloadError::BadTimestamp),
                },
                None => arrival_ms,
            };
            let mut walk = Walk {
                topic,
                cfg,
                ts_ms,
                out,
            };
            walk.object("", obj);
            out = walk.out;
        }
        other => match scalar(other) {
            Ok(value) => out.push(Series::new(topic), arrival_ms, value, Quality::Good),
            Err(skip) => out.skipped.push(skip),
        },
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PayloadConfig {
        PayloadConfig::default()
    }

    fn keys_values(p: &Parsed) -> Vec<(String, i64, Value)> {
        let mut v: Vec<_> = p
            .readings
            .iter()
            .map(|r| (r.series.key.clone(), r.ts_ms, r.value.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn keys(topic: &str, payload: &[u8], c: &PayloadConfig) -> Vec<String> {
        keys_values(&parse(topic, payload, 0, c).unwrap_or_default())
            .into_iter()
            .map(|k| k.0)
            .collect()
    }

    #[test]
    fn json_object_fields_become_series_under_the_topic() {
        let p = parse("line3/imu/000", br#"{"ts": 1772431200000, "acc_x": -0.74, "ok": true, "mode": "run", "nested": {"t": 3}}"#, 1_772_431_200_005, &cfg()).unwrap_or_default();
        let t = 1772431200000;
        assert_eq!(
            keys_values(&p),
            vec![
                ("line3/imu/000/acc_x".into(), t, Value::F64(-0.74)),
                ("line3/imu/000/mode".into(), t, Value::Str("run".into())),
                ("line3/imu/000/nested/t".into(), t, Value::F64(3.0)),
                ("line3/imu/000/ok".into(), t, Value::Bool(true)),
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
        c.timestamp_unit = crate::mqtt::TimeUnit::S;
        let now = 1_772_431_200_000;
        let p = parse("t", br#"{"ts": 1772431200.5, "v": 1}"#, now, &c).unwrap_or_default();
        assert_eq!(p.readings[0].ts_ms, 1772431200500);
        c.timestamp_unit = crate::mqtt::TimeUnit::Ns;
        let p = parse("t", br#"{"ts": 1772431200000000000, "v": 1}"#, now, &c).unwrap_or_default();
        assert_eq!(p.readings[0].ts_ms, 1772431200000);
        c.timestamp_unit = crate::mqtt::TimeUnit::Rfc3339;
        for (ts, ms) in [
            ("2026-03-02T06:00:00Z", 1772431200000),
            ("2026-03-02T06:00:00.250Z", 1772431200250),
            ("2026-03-02T07:00:00+01:00", 1772431200000),
        ] {
            let payload = format!(r#"{{"ts": "{ts}", "v": 1}}"#);
            let p = parse("t", payload.as_bytes(), now, &c).unwrap_or_default();
            assert_eq!(p.readings.first().map(|r| r.ts_ms), Some(ms), "{ts}");
        }
        for bad in [
            r#"{"ts": "yesterday", "v": 1}"#,
            r#"{"ts": 1772431200, "v": 1}"#,
        ] {
            let e = parse("t", bad.as_bytes(), now, &c).map(|_| ()).unwrap_err();
            assert_eq!(e.reason(), "bad_timestamp", "{bad}");
        }
    }

    #[test]
    fn include_and_exclude_select_fields_by_path() {
        let payload = br#"{"a": 1, "b": 2, "n": {"x": 3, "y": 4, "deep": {"z": 5}}}"#;
        let mut c = cfg();
        c.include = vec!["a".into(), "n/deep".into(), "n/x".into()];
        assert_eq!(keys("t", payload, &c), ["t/a", "t/n/deep/z", "t/n/x"]);
        c.exclude = vec!["n/deep/z".into()];
        assert_eq!(keys("t", payload, &c), ["t/a", "t/n/x"]);
        let mut c = cfg();
        c.exclude = vec!["n".into(), "b".into()];
        assert_eq!(keys("t", payload, &c), ["t/a"]);
        // A prefix of a name is not a parent path.
        c.exclude = vec!["n/d".into()];
        assert_eq!(keys("t", payload, &c).len(), 5);
    }

    #[test]
    fn non_finite_numbers_are_skipped_and_the_rest_passes() {
        let p = parse(
            "t",
            br#"{"a": NaN, "b": -Infinity, "c": 1.5, "s": "NaN in a string", "d": Infinity}"#,
            0,
            &cfg(),
        )
        .unwrap_or_default();
        assert_eq!(
            keys_values(&p),
            vec![
                ("t/c".into(), 0, Value::F64(1.5)),
                ("t/s".into(), 0, Value::Str("NaN in a string".into()))
            ]
        );
        assert_eq!(p.skipped, vec![Skip::NonFinite; 3]);
        let e = parse("t", br#"{"a": NaN}"#, 0, &cfg()).unwrap_err();
        assert_eq!(e.reason(), "non_finite");
    }

    #[test]
    fn bad_payloads_are_refused_by_reason() {
        let c = cfg();
        let reason_at =
            |p: &[u8], now: i64| parse("t", p, now, &c).map(|_| ()).unwrap_err().reason();
        assert_eq!(reason_at(b"not json", 0), "not_json");
        assert_eq!(reason_at(b"{\"a\": 1", 0), "not_json");
        assert_eq!(reason_at(br#"{"a": null, "b": [1]}"#, 0), "null");
        assert_eq!(reason_at(br#"[1, 2]"#, 0), "wrong_type");
        assert_eq!(reason_at(br#"{}"#, 0), "no_readings");
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
        let long = format!(r#"{{"{}": 1}}"#, "k".repeat(2000));
        assert_eq!(reason_at(long.as_bytes(), 0), "too_long");
    }

    #[test]
    fn skipped_fields_are_counted_and_good_ones_kept() {
        let p = parse("t", br#"{"a": null, "b": [1], "c": 2}"#, 0, &cfg()).unwrap_or_default();
        assert_eq!(p.readings.len(), 1);
        assert_eq!(p.skipped, vec![Skip::Null, Skip::WrongType]);
    }

    #[test]
    fn topic_levels_become_tags() {
        use super::super::topic_tags;
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
}

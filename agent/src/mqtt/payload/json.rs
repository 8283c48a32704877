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
//! - A field named twice in one object counts once, whole, with its last copy (what a parser that builds a map
//!   keeps: an earlier copy's readings and skips do not count, nested objects included).
//!
//! The payload is walked as it is parsed (serde's visitor interface over `serde_json`'s reader), not built into
//! a document tree first: field paths are written into one reused buffer, and a reading's series key is copied
//! out of it once.

use super::{rfc3339_ms, to_ms, ts_in_range, Interner, Out, Parsed, PayloadError, Skip};
use crate::mqtt::config::{PayloadConfig, TimeUnit};
use fieldlink_proto::{Quality, Value};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

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

/// Walks one JSON message as the parser reads it (no document tree): each field's path is built in one reused
/// buffer, and a reading's key is copied out of it once.
struct Walk<'a> {
    cfg: &'a PayloadConfig,
    /// `<topic>/<field path>` of the field being read (the caller's buffer, reused from message to message).
    key: &'a mut String,
    /// Length of `<topic>/`: a field's path starts there (the key is `<topic>` alone between fields).
    path_start: usize,
    /// The top-level timestamp field: `None` if absent, `Some(None)` if present but not a usable time.
    ts: Option<Option<i64>>,
    out: Out<'a>,
    /// Hashes of the names read so far in each object being read (a stack: an object's start to the end; the
    /// caller's buffer).
    names: &'a mut Vec<u64>,
    /// An object may name a field twice (equal name hashes, or too many names to compare).
    repeated: bool,
}

/// Objects with more names than this are not checked for repeats one by one: they are taken as repeating.
const MAX_NAMES_COMPARED: usize = 64;

/// FNV-1a of a field name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Walk<'_> {
    fn reading(&mut self, v: Result<Value, Skip>) {
        match v {
            // The event time is set once the whole object is read (the timestamp field may come last).
            Ok(value) => self.out.push(self.key.as_str(), 0, value, Quality::Good),
            Err(skip) => self.out.skipped.push(skip),
        }
    }

    /// Reads the fields of an object at the current path.
    fn object<'de, A: MapAccess<'de>>(&mut self, mut map: A, top: bool) -> Result<(), A::Error> {
        let base = self.key.len();
        let first_name = self.names.len();
        while map.next_key_seed(KeySeed(self.key))?.is_some() {
            let h = name_hash(&self.key[base + 1..]);
            let names = &self.names[first_name..];
            if names.len() >= MAX_NAMES_COMPARED || names.contains(&h) {
                self.repeated = true;
            }
            self.names.push(h);
            let (cfg, field) = (self.cfg, &self.key[self.path_start..]);
            if top && field == cfg.timestamp_field {
                self.ts = Some(map.next_value_seed(TimeSeed(cfg.timestamp_unit))?);
            } else if listed(&cfg.exclude, field) {
                map.next_value::<IgnoredAny>()?;
            } else {
                let included = cfg.include.is_empty() || listed(&cfg.include, field);
                let descend = included || lists_below(&cfg.include, field);
                map.next_value_seed(FieldSeed {
                    walk: self,
                    included,
                    descend,
                    top: false,
                })?;
            }
            self.key.truncate(base);
        }
        self.names.truncate(first_name);
        Ok(())
    }
}

/// Appends `/<key>` to the path buffer.
struct KeySeed<'k>(&'k mut String);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, k: &str) -> Result<(), E> {
        self.0.push('/');
        self.0.push_str(k);
        Ok(())
    }
}

/// The timestamp field's value as Unix ms (`None`: not a usable time in `unit`).
struct TimeSeed(TimeUnit);

impl<'de> DeserializeSeed<'de> for TimeSeed {
    type Value = Option<i64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<i64>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TimeSeed {
    type Value = Option<i64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a timestamp")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<i64>, E> {
        Ok(to_ms(v, self.0))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<i64>, E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<i64>, E> {
        self.visit_f64(v as f64)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<i64>, E> {
        Ok(match self.0 {
            TimeUnit::Rfc3339 => rfc3339_ms(v),
            _ => None,
        })
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<i64>, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<i64>, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<i64>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<i64>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

/// One field's value: a reading if it is an included scalar, a walk if it is an object to descend into. At the
/// top (the whole message), a bare scalar is one reading of the topic's own series (the key holds `<topic>`).
struct FieldSeed<'w, 'a> {
    walk: &'w mut Walk<'a>,
    included: bool,
    descend: bool,
    top: bool,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl FieldSeed<'_, '_> {
    fn scalar(self, v: Result<Value, Skip>) {
        if self.included {
            self.walk.reading(v);
        }
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(Ok(Value::F64(v)));
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(Ok(Value::Bool(v)));
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(if v == NON_FINITE {
            Err(Skip::NonFinite)
        } else {
            Ok(Value::Str(v.to_owned()))
        });
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar(Err(Skip::Null));
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.scalar(Err(Skip::WrongType));
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.descend {
            return self.walk.object(map, self.top);
        }
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// What a walk found: the timestamp field (see [`Walk::ts`]), the readings, and whether a name may repeat.
type Walked = (Option<Option<i64>>, Parsed, bool);

/// Reads one payload into a fresh walk working in `scratch`; the parser's message if it is not JSON.
fn walk<'a>(
    topic: &str,
    payload: &[u8],
    cfg: &'a PayloadConfig,
    scratch: &'a mut Scratch,
    series: &'a mut Interner,
) -> Result<Walked, String> {
    let Scratch { key, names } = scratch;
    names.clear();
    key.clear();
    key.push_str(topic);
    let mut w = Walk {
        cfg,
        path_start: key.len() + 1,
        key,
        ts: None,
        out: Out::new(series),
        names,
        repeated: false,
    };
    let mut de = serde_json::Deserializer::from_slice(payload);
    let top = FieldSeed {
        walk: &mut w,
        included: true,
        descend: true,
        top: true,
    };
    top.deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| e.to_string())?;
    Ok((w.ts, w.out.into_parsed(), w.repeated))
}

/// [`walk`], with a field named twice in one object counting once, whole, with its last copy (what a parser
/// that builds a map keeps, nested objects included): such a payload is walked again as its map re-serialized.
fn walk_payload(
    topic: &str,
    payload: &[u8],
    cfg: &PayloadConfig,
    scratch: &mut Scratch,
    series: &mut Interner,
) -> Result<(Option<Option<i64>>, Parsed), String> {
    let (ts, out, repeated) = walk(topic, payload, cfg, scratch, series)?;
    if !repeated {
        return Ok((ts, out));
    }
    let tree: serde_json::Value = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let unique = serde_json::to_vec(&tree).map_err(|e| e.to_string())?;
    let (ts, out, _) = walk(topic, &unique, cfg, scratch, series)?;
    Ok((ts, out))
}

/// Maps one JSON message (size already checked).
pub fn parse(
    topic: &str,
    payload: &[u8],
    arrival_ms: i64,
    cfg: &PayloadConfig,
) -> Result<Parsed, PayloadError> {
    let mut series = Interner::default();
    parse_with(
        &mut Scratch::default(),
        &mut series,
        topic,
        payload,
        arrival_ms,
        cfg,
    )
}

/// The buffers a walk works in, kept by a mapper from message to message.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    key: String,
    names: Vec<u64>,
}

/// [`parse`] working in `scratch` (a mapper keeps one, so a message allocates no path buffer), its readings'
/// series from `series` (with its topic tags).
pub(crate) fn parse_with(
    scratch: &mut Scratch,
    series: &mut Interner,
    topic: &str,
    payload: &[u8],
    arrival_ms: i64,
    cfg: &PayloadConfig,
) -> Result<Parsed, PayloadError> {
    let walked = walk_payload(topic, payload, cfg, scratch, series).or_else(|e| {
        replace_non_finite(payload)
            .and_then(|p| walk_payload(topic, &p, cfg, scratch, series).ok())
            .ok_or(PayloadError::NotJson(e))
    });
    if scratch.key.capacity() > 4096 || scratch.names.capacity() > 4096 {
        // A payload of huge field names or objects does not keep its buffers.
        *scratch = Scratch::default();
    }
    let (ts, mut out) = walked?;
    let ts_ms = match ts {
        // Only a timestamp the payload claims is checked; the agent's own clock is taken as it is.
        Some(Some(ts)) if ts_in_range(ts, arrival_ms, cfg) => ts,
        Some(_) => return Err(PayloadError::BadTimestamp),
        None => arrival_ms,
    };
    for r in &mut out.readings {
        r.ts_ms = ts_ms;
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
    fn the_timestamp_may_come_last_and_a_repeated_field_counts_once_with_its_last_value() {
        let p = parse(
            "t",
            br#"{"a": 1, "b": {"c": true}, "a": 2, "ts": 1772431200000}"#,
            1_772_431_200_005,
            &cfg(),
        )
        .unwrap_or_default();
        let t = 1772431200000;
        assert_eq!(
            keys_values(&p),
            vec![
                ("t/a".into(), t, Value::F64(2.0)),
                ("t/b/c".into(), t, Value::Bool(true))
            ]
        );
        // Many fields (the map path of the repeat check): the last of each name is kept.
        let fields: Vec<String> = (0..100).map(|i| format!(r#""f{}": {i}"#, i % 40)).collect();
        let p = parse(
            "t",
            format!("{{{}}}", fields.join(",")).as_bytes(),
            0,
            &cfg(),
        )
        .unwrap_or_default();
        assert_eq!(p.readings.len(), 40);
        assert!(p.readings.iter().all(|r| {
            let i: usize = r.series.key[3..].parse().unwrap_or(usize::MAX);
            r.value == Value::F64((i + 80 - if i >= 20 { 40 } else { 0 }) as f64)
        }));
        // The last copy counts whole: an earlier copy's readings and skips do not, nested objects included.
        let c = cfg();
        let reason = |p: &[u8]| parse("t", p, 0, &c).map(|_| ()).unwrap_err().reason();
        assert_eq!(reason(br#"{"v": 1, "v": null}"#), "null");
        assert_eq!(reason(br#"{"v": 1, "v": [2]}"#), "wrong_type");
        let got = |p: &[u8]| keys_values(&parse("t", p, 0, &c).unwrap_or_default());
        assert_eq!(
            got(br#"{"n": {"a": 1}, "n": {"b": 2}}"#),
            vec![("t/n/b".into(), 0, Value::F64(2.0))]
        );
        assert_eq!(
            got(br#"{"a": {"x": 1}, "a": 2}"#),
            vec![("t/a".into(), 0, Value::F64(2.0))]
        );
        assert_eq!(
            got(br#"{"a": 1, "a": {"x": 2}}"#),
            vec![("t/a/x".into(), 0, Value::F64(2.0))]
        );
        assert_eq!(
            got(br#"{"n": {"a": 1, "a": NaN, "b": 3}}"#),
            vec![("t/n/b".into(), 0, Value::F64(3.0))]
        );
        let p = parse("t", br#"{"a": null, "a": 1}"#, 0, &c).unwrap_or_default();
        assert_eq!(p.skipped, vec![], "the earlier copy's skip does not count");
    }

    /// The streaming walk gives what flattening a parsed document tree gives, on generated nested objects.
    #[test]
    fn the_walk_equals_flattening_the_document_tree() {
        fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, i64, Value)>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        flatten(&format!("{prefix}/{k}"), v, out);
                    }
                }
                serde_json::Value::Number(n) => {
                    out.push((prefix.into(), 7, Value::F64(n.as_f64().unwrap_or(f64::NAN))))
                }
                serde_json::Value::Bool(b) => out.push((prefix.into(), 7, Value::Bool(*b))),
                serde_json::Value::String(s) => out.push((prefix.into(), 7, Value::Str(s.clone()))),
                _ => {}
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            fn object(next: &mut dyn FnMut(u64) -> u64, depth: u32) -> serde_json::Value {
                let mut m = serde_json::Map::new();
                for _ in 0..1 + next(6) {
                    // A quote in some names: the parser unescapes those (not borrowed from the payload).
                    let k = format!("k{}é{}", next(8), ["", "\"", "\\n"][next(3) as usize]);
                    let v = match next(if depth < 3 { 7 } else { 6 }) {
                        0 => serde_json::json!(next(1 << 20) as f64 / 64.0 - 1000.0),
                        1 => {
                            let max = [1000, u64::MAX][next(2) as usize];
                            serde_json::json!(next(max))
                        }
                        2 => serde_json::json!(-(next(1000) as i64)),
                        3 => serde_json::json!(next(2) == 1),
                        4 => serde_json::json!(format!("s{}", next(100))),
                        5 => serde_json::Value::Null,
                        _ => object(next, depth + 1),
                    };
                    m.insert(k, v);
                }
                serde_json::Value::Object(m)
            }
            let doc = object(&mut next, 0);
            let mut want = Vec::new();
            flatten("d", &doc, &mut want);
            want.sort_by(|a, b| a.0.cmp(&b.0));
            let got = parse("d", doc.to_string().as_bytes(), 7, &cfg())
                .map(|p| keys_values(&p))
                .unwrap_or_default();
            assert_eq!(got, want, "{doc}");
        }
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

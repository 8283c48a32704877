//! Alarm-event records (`proto/FORMAT.md`, "Alarm-event records").
//!
//! An alarm record has the same header as a readings record (magic, version, flags, agent id, epoch, batch
//! sequence number, body length) with the flag bit [`FLAG_ALARMS`] set; its zstd body holds alarm events instead of
//! series and readings. Its sequence number comes from the agent's one batch sequence, so a consumer deduplicates
//! alarm records and readings records alike by `(agent_id, epoch, seq)`.
//!
//! [`crate::decode`] refuses an alarm record with [`DecodeError::Malformed`] (`what = "record"`): a consumer that
//! only knows readings dead-letters it cleanly. [`decode_any`] reads both kinds.

use crate::codec::{decompressed_body, peek_header, DecodeError, EncodeError};
use crate::limits::{MAX_AGENT_ID_BYTES, MAX_KEY_BYTES, MAX_STRING_BYTES, MAX_TAGS};
use crate::limits::{MAX_TAG_NAME_BYTES, MAX_TAG_VALUE_BYTES};
use crate::model::{Batch, Quality, Series, Value};
use crate::varint::{put_str, put_svarint, put_uvarint, Reader};
use crate::Version;

/// Header flag: the body holds alarm events.
pub const FLAG_ALARMS: u8 = 0b0000_0010;
/// Alarm events per record, at most.
pub const MAX_EVENTS: usize = 10_000;
/// Bytes in a rule name or a level name.
pub const MAX_NAME_BYTES: usize = 256;

/// A level of an alarm rule: `severity` 0 is always `ok`; the rule's configured levels are 1, 2, …
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// 0 = ok, then the rule's levels in their configured order.
    pub severity: u8,
    /// Its name (`ok`, `warning`, `critical`, …).
    pub name: String,
}

/// The reading that caused a transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// Its event time, Unix ms.
    pub ts_ms: i64,
    /// Its value.
    pub value: Value,
    /// Its quality.
    pub quality: Quality,
}

/// One state change of one rule on one series.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmEvent {
    /// The rule's name.
    pub rule: String,
    /// Per-rule sequence number: 1, 2, … for the rule's transitions on every series, never reused.
    pub rule_seq: u64,
    /// The series.
    pub series: Series,
    /// The level before.
    pub from: Level,
    /// The level after.
    pub to: Level,
    /// Event time of the transition, Unix ms: the causing reading's time, or for a stale alarm the time the
    /// series became stale (its last reading's time plus the level's `after_ms`).
    pub ts_ms: i64,
    /// The reading that caused it (none for a stale alarm raised by the clock).
    pub cause: Option<Cause>,
}

/// What one alarm record carries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AlarmBatch {
    /// The producing agent's id.
    pub agent_id: String,
    /// Its buffer's epoch (non-zero).
    pub epoch: u64,
    /// Batch sequence number (the same sequence as readings records).
    pub seq: u64,
    /// The events, in the order the agent produced them.
    pub events: Vec<AlarmEvent>,
}

/// Any record: readings or alarm events.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A readings record ([`crate::decode`]).
    Readings(Batch),
    /// An alarm-event record.
    Alarms(AlarmBatch),
}

fn invalid(what: &'static str, why: impl Into<String>) -> EncodeError {
    EncodeError::Invalid {
        what,
        why: why.into(),
    }
}

fn check(what: &'static str, s: &str, min: usize, max: usize) -> Result<(), EncodeError> {
    if s.len() < min || s.len() > max {
        return Err(invalid(
            what,
            format!("{} bytes, allowed {min}..={max}", s.len()),
        ));
    }
    Ok(())
}

fn kind(value: &Value, quality: Quality) -> u8 {
    let t = match value {
        Value::F64(_) => 0,
        Value::I64(_) => 1,
        Value::Bool(_) => 2,
        Value::Str(_) => 3,
    };
    t | ((quality as u8) << 4)
}

/// Writes the uncompressed body of an alarm record into `out` (cleared first).
pub fn encode_alarm_body(events: &[AlarmEvent], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.clear();
    if events.is_empty() || events.len() > MAX_EVENTS {
        return Err(invalid(
            "events",
            format!("{} events, allowed 1..={MAX_EVENTS}", events.len()),
        ));
    }
    put_uvarint(out, events.len() as u64);
    for e in events {
        check("rule name", &e.rule, 1, MAX_NAME_BYTES)?;
        put_str(out, &e.rule);
        put_uvarint(out, e.rule_seq);
        check("series key", &e.series.key, 1, MAX_KEY_BYTES)?;
        if e.series.tags.len() > MAX_TAGS {
            return Err(invalid("tags", format!("{} tags", e.series.tags.len())));
        }
        put_str(out, &e.series.key);
        put_uvarint(out, e.series.tags.len() as u64);
        for (k, v) in &e.series.tags {
            check("tag name", k, 1, MAX_TAG_NAME_BYTES)?;
            check("tag value", v, 0, MAX_TAG_VALUE_BYTES)?;
            put_str(out, k);
            put_str(out, v);
        }
        for l in [&e.from, &e.to] {
            check("level name", &l.name, 1, MAX_NAME_BYTES)?;
            out.push(l.severity);
            put_str(out, &l.name);
        }
        put_svarint(out, e.ts_ms);
        match &e.cause {
            None => out.push(0),
            Some(c) => {
                out.push(1);
                put_svarint(out, c.ts_ms);
                out.push(kind(&c.value, c.quality));
                match &c.value {
                    Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
                    Value::I64(v) => put_svarint(out, *v),
                    Value::Bool(b) => out.push(u8::from(*b)),
                    Value::Str(s) => {
                        check("string value", s, 0, MAX_STRING_BYTES)?;
                        put_str(out, s);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reusable encoder of alarm records: keeps a zstd context set up as the format requires.
pub struct AlarmEncoder {
    compressor: zstd::bulk::Compressor<'static>,
    body: Vec<u8>,
}

impl std::fmt::Debug for AlarmEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlarmEncoder").finish_non_exhaustive()
    }
}

impl AlarmEncoder {
    /// An encoder compressing at zstd `level`.
    pub fn new(level: i32) -> Result<Self, EncodeError> {
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        compressor.include_checksum(true)?;
        compressor.include_contentsize(true)?;
        Ok(Self {
            compressor,
            body: Vec::new(),
        })
    }

    /// Encodes a whole alarm record (header with [`FLAG_ALARMS`] and the epoch, zstd body).
    pub fn encode(&mut self, batch: &AlarmBatch) -> Result<Vec<u8>, EncodeError> {
        let id = batch.agent_id.as_bytes();
        if id.is_empty() || id.len() > MAX_AGENT_ID_BYTES {
            return Err(invalid(
                "agent id",
                format!("{} bytes, allowed 1..={MAX_AGENT_ID_BYTES}", id.len()),
            ));
        }
        if batch.epoch == 0 {
            return Err(invalid("epoch", "an alarm record needs a non-zero epoch"));
        }
        encode_alarm_body(&batch.events, &mut self.body)?;
        let compressed = self.compressor.compress(&self.body)?;
        // The alarm body has one layout in every version.
        let out = crate::codec::record(
            Version::V1 as u8,
            crate::codec::FLAG_EPOCH | FLAG_ALARMS,
            id,
            batch.epoch,
            batch.seq,
            self.body.len(),
            &compressed,
        );
        if out.len() > crate::limits::MAX_RECORD_BYTES {
            return Err(invalid(
                "record",
                format!("{} bytes, above 1 MiB", out.len()),
            ));
        }
        Ok(out)
    }
}

fn malformed(what: &'static str, why: &'static str) -> DecodeError {
    DecodeError::Malformed { what, why }
}

fn level(r: &mut Reader<'_>) -> Result<Level, DecodeError> {
    let severity = r.u8("level severity")?;
    let name = r.string("level name", MAX_NAME_BYTES)?;
    if name.is_empty() {
        return Err(malformed("level name", "empty"));
    }
    Ok(Level { severity, name })
}

/// Decodes an uncompressed alarm body.
pub fn decode_alarm_body(body: &[u8]) -> Result<Vec<AlarmEvent>, DecodeError> {
    let mut r = Reader::new(body);
    // An event takes at least 12 bytes: rule (2), rule_seq (1), key (2), tags (1), two levels (2 × 2), ts (1),
    // cause tag (1).
    let n = r.count("event_count", MAX_EVENTS, 12)?;
    if n == 0 {
        return Err(malformed("event_count", "zero events"));
    }
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        let rule = r.string("rule name", MAX_NAME_BYTES)?;
        if rule.is_empty() {
            return Err(malformed("rule name", "empty"));
        }
        let rule_seq = r.uvarint("rule_seq")?;
        let key = r.string("series key", MAX_KEY_BYTES)?;
        if key.is_empty() {
            return Err(malformed("series key", "empty"));
        }
        let nt = r.count("tag_count", MAX_TAGS, 2)?;
        let mut tags = Vec::with_capacity(nt);
        for _ in 0..nt {
            let k = r.string("tag name", MAX_TAG_NAME_BYTES)?;
            if k.is_empty() {
                return Err(malformed("tag name", "empty"));
            }
            tags.push((k, r.string("tag value", MAX_TAG_VALUE_BYTES)?));
        }
        let from = level(&mut r)?;
        let to = level(&mut r)?;
        let ts_ms = r.svarint("event ts")?;
        let cause = match r.u8("cause")? {
            0 => None,
            1 => {
                let ts = r.svarint("cause ts")?;
                let k = r.u8("cause kind")?;
                if k & 0b1100_1000 != 0 {
                    return Err(malformed("cause kind", "reserved bit set"));
                }
                let quality = match (k >> 4) & 0b11 {
                    0 => Quality::Good,
                    1 => Quality::Uncertain,
                    2 => Quality::Bad,
                    _ => return Err(malformed("cause kind", "unknown quality")),
                };
                let value = match k & 0b111 {
                    0 => Value::F64(f64::from_le_bytes(
                        r.bytes(8, "cause f64")?.try_into().unwrap_or_default(),
                    )),
                    1 => Value::I64(r.svarint("cause i64")?),
                    2 => match r.u8("cause bool")? {
                        0 => Value::Bool(false),
                        1 => Value::Bool(true),
                        _ => return Err(malformed("cause bool", "byte is not 0 or 1")),
                    },
                    3 => Value::Str(r.string("cause string", MAX_STRING_BYTES)?),
                    _ => return Err(malformed("cause kind", "unknown value type")),
                };
                Some(Cause {
                    ts_ms: ts,
                    value,
                    quality,
                })
            }
            _ => return Err(malformed("cause", "tag is not 0 or 1")),
        };
        events.push(AlarmEvent {
            rule,
            rule_seq,
            series: Series { key, tags },
            from,
            to,
            ts_ms,
            cause,
        });
    }
    if r.remaining() != 0 {
        return Err(malformed("body", "trailing bytes after the last event"));
    }
    Ok(events)
}

/// Decodes a record of either kind, checking every limit before allocating.
pub fn decode_any(record: &[u8]) -> Result<Record, DecodeError> {
    let h = peek_header(record)?;
    if !h.alarms {
        return crate::codec::decode(record).map(Record::Readings);
    }
    if h.epoch == 0 {
        return Err(malformed("epoch", "an alarm record needs the epoch flag"));
    }
    let body = decompressed_body(&h)?;
    Ok(Record::Alarms(AlarmBatch {
        agent_id: h.agent_id.to_owned(),
        epoch: h.epoch,
        seq: h.seq,
        events: decode_alarm_body(&body)?,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> AlarmBatch {
        AlarmBatch {
            agent_id: "edge-1".into(),
            epoch: 0x0102_0304_0506_0708,
            seq: 42,
            events: vec![
                AlarmEvent {
                    rule: "arm-vibration".into(),
                    rule_seq: 7,
                    series: Series {
                        key: "line3/robot-imu-b/000/vib".into(),
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
                    ts_ms: 1_772_431_200_000,
                    cause: Some(Cause {
                        ts_ms: 1_772_431_200_000,
                        value: Value::F64(9.5),
                        quality: Quality::Good,
                    }),
                },
                AlarmEvent {
                    rule: "meter-stale".into(),
                    rule_seq: 1,
                    series: Series::new("plant/meter-a/001/value"),
                    from: Level {
                        severity: 0,
                        name: "ok".into(),
                    },
                    to: Level {
                        severity: 1,
                        name: "stale".into(),
                    },
                    ts_ms: 1_772_431_260_000,
                    cause: None,
                },
            ],
        }
    }

    #[test]
    fn alarm_records_round_trip_and_plain_decode_refuses_them() {
        let b = sample();
        let rec = AlarmEncoder::new(3).unwrap().encode(&b).unwrap();
        assert_eq!(decode_any(&rec).unwrap(), Record::Alarms(b.clone()));
        let h = peek_header(&rec).unwrap();
        assert!(h.alarms);
        assert_eq!((h.agent_id, h.epoch, h.seq), ("edge-1", b.epoch, 42));
        assert!(matches!(
            crate::decode(&rec),
            Err(DecodeError::Malformed { what: "record", .. })
        ));
    }

    #[test]
    fn every_value_type_round_trips_as_a_cause() {
        for v in [
            Value::I64(-5),
            Value::Bool(true),
            Value::Str("door".into()),
            Value::F64(f64::NAN),
        ] {
            let mut b = sample();
            b.events[0].cause = Some(Cause {
                ts_ms: -1,
                value: v,
                quality: Quality::Bad,
            });
            let rec = AlarmEncoder::new(1).unwrap().encode(&b).unwrap();
            assert_eq!(decode_any(&rec).unwrap(), Record::Alarms(b));
        }
    }

    #[test]
    fn truncated_or_garbled_bodies_are_errors_not_panics() {
        let mut body = Vec::new();
        encode_alarm_body(&sample().events, &mut body).unwrap();
        for cut in 0..body.len() {
            assert!(decode_alarm_body(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode_alarm_body(&longer).is_err());
        // A huge event count is refused before allocating.
        assert!(matches!(
            decode_alarm_body(&[0xff, 0xff, 0xff, 0x7f]),
            Err(DecodeError::LimitExceeded { .. })
        ));
    }
}

//! Sparkplug B (Eclipse Sparkplug 3.0): topics `spBv1.0/<group>/<type>/<edge node>[/<device>]`, payloads in
//! the `org.eclipse.tahu.protobuf.Payload` protobuf message.
//!
//! Each metric is a reading of series `<group>/<edge node>[/<device>]/<metric name>` at the metric's
//! timestamp (else the payload's, else arrival time).
//!
//! State kept per connection, bounded by `max_sparkplug_metrics` (a birth that would pass it is refused as
//! `sparkplug_limit`):
//! - **Births** (NBIRTH, DBIRTH) name every metric, its data type and optionally an alias. Later NDATA/DDATA
//!   may carry only the alias; an alias no birth named is skipped as `unknown_alias`. An NBIRTH starts the edge
//!   node afresh (its devices too); a DBIRTH starts that device afresh.
//! - **Deaths** (NDEATH, DDEATH) mark series stale: every metric the node (with its devices) or device had is
//!   written once more with its last value and quality `bad` at the death's time. An NDEATH whose `bdSeq`
//!   metric differs from that of the node's current birth is a late will of an older session and ignored.
//! - **Sequence numbers** (0..=255, wrapping) of everything an edge node sends after its NBIRTH; a jump is
//!   counted (`seq_gap`): messages were lost on the way and the edge node's values may be out of date until its
//!   next birth.
//! - **Rebirth requests**: data or a DBIRTH from an edge node whose NBIRTH this connection has not seen (the
//!   agent started or reconnected after it), an alias no birth named, or a sequence gap make the state ask for a
//!   Rebirth ([`State::take_rebirth`]: an NCMD with `Node Control/Rebirth` = true, which the connection
//!   publishes), at most once per `sparkplug_rebirth_ms` per edge node. The edge node answers with fresh births,
//!   after which its alias-only data maps again.
//!
//! Values: Int8/16/32 (sign-extended from `int_value`), Int64, UInt8..64 (UInt64 above `i64::MAX` as f64),
//! DateTime (ms, as i64) → i64; Float, Double → f64; Boolean → bool; String, Text, UUID → string. Data sets,
//! templates, bytes, files and arrays are skipped as `wrong_type`; `is_null` as `null`. NCMD, DCMD and STATE
//! messages carry no readings and are passed over.
//!
//! The protobuf decoder is written out here (the payload is three small messages): it reads only the fields
//! above, skips unknown ones, and refuses truncated or malformed input as `bad_sparkplug`.

use super::{ts_in_range, Interner, Out, Parsed, PayloadError, Skip};
use crate::mqtt::config::PayloadConfig;
use fieldlink_proto::{Quality, Value};
use std::collections::HashMap;

/// Sparkplug metric data types (Sparkplug 3.0 section 6.4.16).
mod datatype {
    pub(super) const INT8: u32 = 1;
    pub(super) const INT16: u32 = 2;
    pub(super) const INT32: u32 = 3;
    pub(super) const INT64: u32 = 4;
    pub(super) const UINT8: u32 = 5;
    pub(super) const UINT16: u32 = 6;
    pub(super) const UINT32: u32 = 7;
    pub(super) const UINT64: u32 = 8;
    pub(super) const FLOAT: u32 = 9;
    pub(super) const DOUBLE: u32 = 10;
    pub(super) const BOOLEAN: u32 = 11;
    pub(super) const STRING: u32 = 12;
    pub(super) const DATETIME: u32 = 13;
    pub(super) const TEXT: u32 = 14;
    pub(super) const UUID: u32 = 15;
}

// ---- protobuf wire format --------------------------------------------------------------------------------

struct Reader<'a> {
    buf: &'a [u8],
}

#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err("truncated field".into());
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    /// The next `(field number, value)`, or `None` at the end.
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let f = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed64(u64::from_le_bytes(
                self.take(8)?.try_into().map_err(|_| "fixed64")?,
            )),
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length")?;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().map_err(|_| "fixed32")?,
            )),
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((key >> 3, f)))
    }
}

/// A metric's value as sent.
#[derive(Debug, Clone, PartialEq)]
enum Raw {
    Int(u32),
    Long(u64),
    Float(f32),
    Double(f64),
    Bool(bool),
    Str(String),
    /// Bytes, data set, template, extension.
    Other,
    None,
}

#[derive(Debug, Clone, PartialEq)]
struct Metric {
    name: Option<String>,
    alias: Option<u64>,
    timestamp: Option<u64>,
    datatype: u32,
    is_null: bool,
    value: Raw,
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Payload {
    timestamp: Option<u64>,
    seq: Option<u64>,
    metrics: Vec<Metric>,
}

impl Payload {
    /// The `bdSeq` metric of a birth or death: which MQTT session of the edge node it belongs to.
    fn bd_seq(&self) -> Option<u64> {
        let m = self
            .metrics
            .iter()
            .find(|m| m.name.as_deref() == Some("bdSeq"))?;
        match m.value {
            Raw::Long(v) => Some(v),
            Raw::Int(v) => Some(u64::from(v)),
            _ => None,
        }
    }
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "string not UTF-8".into())
}

fn decode_metric(buf: &[u8]) -> Result<Metric, String> {
    let mut m = Metric {
        name: None,
        alias: None,
        timestamp: None,
        datatype: 0,
        is_null: false,
        value: Raw::None,
    };
    let mut r = Reader { buf };
    while let Some((n, f)) = r.next()? {
        m.value = match (n, f) {
            (1, Field::Bytes(b)) => {
                m.name = Some(text(b)?);
                continue;
            }
            (2, Field::Varint(v)) => {
                m.alias = Some(v);
                continue;
            }
            (3, Field::Varint(v)) => {
                m.timestamp = Some(v);
                continue;
            }
            (4, Field::Varint(v)) => {
                m.datatype = v as u32;
                continue;
            }
            (7, Field::Varint(v)) => {
                m.is_null = v != 0;
                continue;
            }
            // uint32 on the wire is a varint; the value is its low 32 bits.
            (10, Field::Varint(v)) => Raw::Int(v as u32),
            (11, Field::Varint(v)) => Raw::Long(v),
            (12, Field::Fixed32(v)) => Raw::Float(f32::from_bits(v)),
            (13, Field::Fixed64(v)) => Raw::Double(f64::from_bits(v)),
            (14, Field::Varint(v)) => Raw::Bool(v != 0),
            (15, Field::Bytes(b)) => Raw::Str(text(b)?),
            (16..=19, Field::Bytes(_)) => Raw::Other,
            (1..=19, _) => return Err(format!("metric field {n} has the wrong wire type")),
            _ => continue, // is_historical, is_transient, metadata, properties, unknown
        };
    }
    Ok(m)
}

fn decode(buf: &[u8]) -> Result<Payload, String> {
    let mut p = Payload::default();
    let mut r = Reader { buf };
    while let Some((n, f)) = r.next()? {
        match (n, f) {
            (1, Field::Varint(v)) => p.timestamp = Some(v),
            (2, Field::Bytes(b)) => p.metrics.push(decode_metric(b)?),
            (3, Field::Varint(v)) => p.seq = Some(v),
            (1..=3, _) => return Err(format!("payload field {n} has the wrong wire type")),
            _ => {} // uuid, body, extensions
        }
    }
    Ok(p)
}

// ---- values ------------------------------------------------------------------------------------------------

fn value(datatype: u32, raw: &Raw) -> Result<Value, Skip> {
    use datatype::*;
    Ok(match (datatype, raw) {
        (INT8, Raw::Int(v)) => Value::I64(i64::from(*v as u8 as i8)),
        (INT16, Raw::Int(v)) => Value::I64(i64::from(*v as u16 as i16)),
        (INT32, Raw::Int(v)) => Value::I64(i64::from(*v as i32)),
        (UINT8 | UINT16 | UINT32 | 0, Raw::Int(v)) => Value::I64(i64::from(*v)),
        (INT64, Raw::Long(v)) => Value::I64(*v as i64),
        (UINT64 | DATETIME | 0, Raw::Long(v)) => match i64::try_from(*v) {
            Ok(i) => Value::I64(i),
            Err(_) => Value::F64(*v as f64),
        },
        (FLOAT | 0, Raw::Float(v)) => Value::F64(f64::from(*v)),
        (DOUBLE | 0, Raw::Double(v)) => Value::F64(*v),
        (BOOLEAN | 0, Raw::Bool(v)) => Value::Bool(*v),
        (STRING | TEXT | UUID | 0, Raw::Str(s)) => Value::Str(s.clone()),
        (_, Raw::None) => return Err(Skip::Null),
        _ => return Err(Skip::WrongType),
    })
}

// ---- state -----------------------------------------------------------------------------------------------

/// What is known of one metric.
#[derive(Debug, Clone)]
struct Known {
    name: String,
    datatype: u32,
    last: Option<Value>,
}

/// One device, or the edge node itself (device `None`).
#[derive(Debug, Default)]
struct Unit {
    metrics: Vec<Known>,
    by_name: HashMap<String, usize>,
}

impl Unit {
    /// What it counts against `max_sparkplug_metrics`: its metrics and itself.
    fn weight(&self) -> usize {
        self.metrics.len() + 1
    }
}

#[derive(Debug, Default)]
struct Node {
    units: HashMap<Option<String>, Unit>,
    /// Alias → (device, index in that unit's metrics).
    aliases: HashMap<u64, (Option<String>, usize)>,
    next_seq: Option<u8>,
    bd_seq: Option<u64>,
}

impl Node {
    /// What the node counts against `max_sparkplug_metrics`: its metrics, and each of its units (the node's own
    /// and each device's, empty ones too) as one more.
    fn metric_count(&self) -> usize {
        self.units.values().map(Unit::weight).sum()
    }
}

/// Edge nodes remembered for rate-limiting Rebirth requests, at most.
const MAX_ASKED: usize = 4096;

/// A Rebirth request to publish: an NCMD to the edge node (QoS 0, not retained).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebirth {
    /// `spBv1.0/<group>/NCMD/<edge node>`.
    pub topic: String,
    /// The payload: metric `Node Control/Rebirth` = true.
    pub payload: Vec<u8>,
}

/// Sparkplug state of one connection.
#[derive(Debug)]
pub struct State {
    nodes: HashMap<(String, String), Node>,
    metrics: usize,
    max_metrics: usize,
    /// Least time between two Rebirth requests to one edge node, ms; 0 never asks.
    rebirth_ms: i64,
    /// When each edge node was last asked to rebirth (at most `MAX_ASKED`).
    asked: HashMap<(String, String), i64>,
    /// The request the last message called for, until taken.
    rebirth: Option<Rebirth>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NBirth,
    NData,
    NDeath,
    DBirth,
    DData,
    DDeath,
    Ignored,
}

struct Topic<'a> {
    group: &'a str,
    kind: Kind,
    node: &'a str,
    device: Option<&'a str>,
}

fn topic(t: &str) -> Result<Topic<'_>, PayloadError> {
    let bad = || {
        PayloadError::BadSparkplug(format!(
            "topic {t:?} is not spBv1.0/<group>/<type>/<node>[/<device>]"
        ))
    };
    let l: Vec<&str> = t.split('/').collect();
    if l.first() != Some(&"spBv1.0") || l.len() < 2 {
        return Err(bad());
    }
    if l[1] == "STATE" {
        return Ok(Topic {
            group: "",
            kind: Kind::Ignored,
            node: "",
            device: None,
        });
    }
    let kind = match l.get(2) {
        Some(&"NBIRTH") => Kind::NBirth,
        Some(&"NDATA") => Kind::NData,
        Some(&"NDEATH") => Kind::NDeath,
        Some(&"DBIRTH") => Kind::DBirth,
        Some(&"DDATA") => Kind::DData,
        Some(&"DDEATH") => Kind::DDeath,
        Some(&"NCMD") | Some(&"DCMD") => Kind::Ignored,
        _ => return Err(bad()),
    };
    let device_topic = matches!(kind, Kind::DBirth | Kind::DData | Kind::DDeath);
    let want = if device_topic { 5 } else { 4 };
    if kind != Kind::Ignored && (l.len() != want || l[1..].iter().any(|x| x.is_empty())) {
        return Err(bad());
    }
    Ok(Topic {
        group: l[1],
        kind,
        node: l.get(3).copied().unwrap_or_default(),
        device: if device_topic {
            l.get(4).copied()
        } else {
            None
        },
    })
}

impl State {
    /// Empty state remembering at most `max_metrics` metrics, asking an edge node to rebirth at most every
    /// `rebirth_ms` (0: never).
    pub fn new(max_metrics: usize, rebirth_ms: u64) -> Self {
        Self {
            nodes: HashMap::new(),
            metrics: 0,
            max_metrics,
            rebirth_ms: i64::try_from(rebirth_ms).unwrap_or(i64::MAX),
            asked: HashMap::new(),
            rebirth: None,
        }
    }

    /// The Rebirth request the messages applied so far called for, if any (taken once).
    pub fn take_rebirth(&mut self) -> Option<Rebirth> {
        self.rebirth.take()
    }

    /// Asks `group`/`node` to rebirth unless it was asked less than `rebirth_ms` ago.
    fn want_rebirth(&mut self, group: &str, node: &str, now_ms: i64) {
        if self.rebirth_ms == 0 {
            return;
        }
        let key = (group.to_owned(), node.to_owned());
        // (A clock that went back asks again.)
        if let Some(&t) = self.asked.get(&key) {
            if now_ms >= t && now_ms - t < self.rebirth_ms {
                return;
            }
        }
        if self.asked.len() >= MAX_ASKED && !self.asked.contains_key(&key) {
            let horizon = now_ms.saturating_sub(self.rebirth_ms);
            self.asked.retain(|_, t| *t > horizon);
            if self.asked.len() >= MAX_ASKED {
                return;
            }
        }
        self.asked.insert(key, now_ms);
        self.rebirth = Some(Rebirth {
            topic: format!("spBv1.0/{group}/NCMD/{node}"),
            payload: rebirth_payload(now_ms),
        });
    }

    /// Metrics remembered now.
    pub fn metrics(&self) -> usize {
        self.metrics
    }

    /// Applies one message: updates births, aliases and sequence numbers, and returns its readings.
    pub fn apply(
        &mut self,
        series: &mut Interner,
        topic_name: &str,
        payload: &[u8],
        arrival_ms: i64,
        cfg: &PayloadConfig,
    ) -> Result<Parsed, PayloadError> {
        let t = topic(topic_name)?;
        if t.kind == Kind::Ignored {
            return Ok(Parsed::default());
        }
        let p = decode(payload).map_err(PayloadError::BadSparkplug)?;
        let msg_ts = match p.timestamp {
            Some(ts) => match i64::try_from(ts) {
                Ok(ms) if ts_in_range(ms, arrival_ms, cfg) => ms,
                _ => return Err(PayloadError::BadTimestamp),
            },
            None => arrival_ms,
        };
        let key = (t.group.to_owned(), t.node.to_owned());
        let device = t.device.map(str::to_owned);
        let prefix = series_prefix(t.group, t.node, t.device);
        let mut out = Out::new(series);

        // Sparkplug names each metric once in a birth. A birth repeating names would hold an alias per copy while
        // the limit counts the name once: memory beyond `max_sparkplug_metrics`. Refused like a birth over the
        // limit: what was known of the node (or device) before it is forgotten too.
        let repeated = if matches!(t.kind, Kind::NBirth | Kind::DBirth) {
            let mut names = std::collections::HashSet::new();
            p.metrics
                .iter()
                .filter_map(|m| m.name.as_deref())
                .find(|n| !names.insert(*n))
                .map(|n| PayloadError::BadSparkplug(format!("birth names metric {n:?} twice")))
        } else {
            None
        };
        match t.kind {
            Kind::NBirth => {
                let n = self.nodes.remove(&key).map_or(0, |n| n.metric_count());
                self.metrics -= n;
                if let Some(e) = repeated {
                    return Err(e);
                }
                let births = p
                    .metrics
                    .iter()
                    .filter(|m| m.name.as_deref() != Some("bdSeq"))
                    .count();
                // The births, the node's unit, the node and every other remembered node count against the limit.
                if self.metrics + births + 1 + self.nodes.len() + 1 > self.max_metrics {
                    return Err(PayloadError::SparkplugLimit(self.max_metrics));
                }
                let mut node = Node {
                    next_seq: p.seq.map(|s| (s as u8).wrapping_add(1)),
                    bd_seq: p.bd_seq(),
                    ..Node::default()
                };
                self.birth(
                    &mut node, None, &p, &prefix, msg_ts, arrival_ms, cfg, &mut out,
                );
                self.nodes.insert(key, node);
            }
            Kind::DBirth => {
                // A device birth without its node's birth is taken too (names, and the sequence starts here).
                let existed = self.nodes.contains_key(&key);
                let mut node = self.nodes.remove(&key).unwrap_or_default();
                out.seq_gap = check_seq(&mut node, p.seq);
                if let Some(old) = node.units.remove(&device) {
                    self.metrics -= old.weight();
                    node.aliases.retain(|_, (d, _)| *d != device);
                }
                if let Some(e) = repeated {
                    if existed {
                        self.nodes.insert(key, node);
                    }
                    return Err(e);
                }
                // Every remembered node, and the device's unit, count against the limit like a metric.
                if self.metrics + p.metrics.len() + 1 + self.nodes.len() + 1 > self.max_metrics {
                    if existed {
                        self.nodes.insert(key, node);
                    }
                    return Err(PayloadError::SparkplugLimit(self.max_metrics));
                }
                self.birth(
                    &mut node,
                    device.clone(),
                    &p,
                    &prefix,
                    msg_ts,
                    arrival_ms,
                    cfg,
                    &mut out,
                );
                self.nodes.insert(key, node);
                if !existed || out.seq_gap {
                    self.want_rebirth(t.group, t.node, arrival_ms);
                }
            }
            Kind::NData | Kind::DData => {
                // Data of a node no birth was seen of: named metrics still map; nothing is remembered (so
                // unknown node names cannot grow the state).
                let mut unborn = Node::default();
                let born = self.nodes.contains_key(&key);
                let node = self.nodes.get_mut(&key).unwrap_or(&mut unborn);
                out.seq_gap = check_seq(node, p.seq);
                for m in &p.metrics {
                    let known = match (&m.name, m.alias) {
                        (Some(name), _) => node
                            .units
                            .get(&device)
                            .and_then(|u| u.by_name.get(name).map(|&i| (device.clone(), i))),
                        (None, Some(alias)) => node.aliases.get(&alias).cloned(),
                        (None, None) => None,
                    };
                    let known_metric = known
                        .as_ref()
                        .and_then(|(d, i)| node.units.get(d)?.metrics.get(*i));
                    let (name, datatype) = match (known_metric, &m.name) {
                        (Some(k), _) => (k.name.clone(), k.datatype),
                        // A named metric no birth announced: taken with the type its value has.
                        (None, Some(name)) => (name.clone(), m.datatype),
                        (None, None) => {
                            out.skipped.push(Skip::UnknownAlias);
                            continue;
                        }
                    };
                    let dt = if m.datatype != 0 {
                        m.datatype
                    } else {
                        datatype
                    };
                    if let Some(v) =
                        reading(m, dt, &prefix, &name, msg_ts, arrival_ms, cfg, &mut out)
                    {
                        if let Some((d, i)) = known {
                            if let Some(u) = node.units.get_mut(&d) {
                                if let Some(k) = u.metrics.get_mut(i) {
                                    k.last = Some(v);
                                }
                            }
                        }
                    }
                }
                // What this host knows of the node is missing or may be out of date: ask for its births.
                if !born || out.seq_gap || out.skipped.contains(&Skip::UnknownAlias) {
                    self.want_rebirth(t.group, t.node, arrival_ms);
                }
            }
            Kind::NDeath => {
                let stale_will = matches!((p.bd_seq(), self.nodes.get(&key).and_then(|n| n.bd_seq)), (Some(a), Some(b)) if a != b);
                if stale_will {
                    return Ok(Parsed::default());
                }
                if let Some(node) = self.nodes.remove(&key) {
                    self.metrics -= node.metric_count();
                    let mut units: Vec<_> = node.units.into_iter().collect();
                    units.sort_by(|a, b| a.0.cmp(&b.0));
                    for (d, unit) in units {
                        let prefix = series_prefix(t.group, t.node, d.as_deref());
                        stale(&unit, &prefix, msg_ts, &mut out);
                    }
                }
                return Ok(out.into_parsed());
            }
            Kind::DDeath => {
                if let Some(node) = self.nodes.get_mut(&key) {
                    out.seq_gap = check_seq(node, p.seq);
                    if let Some(unit) = node.units.remove(&device) {
                        self.metrics -= unit.weight();
                        node.aliases.retain(|_, (d, _)| *d != device);
                        stale(&unit, &prefix, msg_ts, &mut out);
                    }
                }
                return Ok(out.into_parsed());
            }
            Kind::Ignored => {}
        }
        // A birth with no values is still a good message: its names are what later messages need.
        if matches!(t.kind, Kind::NBirth | Kind::DBirth) && out.readings.is_empty() {
            return Ok(out.into_parsed());
        }
        out.finish()
    }

    /// Records a birth's metrics in `node` under `device` and maps their values.
    #[allow(clippy::too_many_arguments)]
    fn birth(
        &mut self,
        node: &mut Node,
        device: Option<String>,
        p: &Payload,
        prefix: &str,
        msg_ts: i64,
        arrival_ms: i64,
        cfg: &PayloadConfig,
        out: &mut Out<'_>,
    ) {
        let mut unit = Unit::default();
        for m in &p.metrics {
            let Some(name) = m.name.clone() else {
                out.skipped.push(Skip::UnknownAlias);
                continue;
            };
            if name == "bdSeq" {
                continue;
            }
            let last = reading(m, m.datatype, prefix, &name, msg_ts, arrival_ms, cfg, out);
            let i = match unit.by_name.get(&name) {
                Some(&i) => i,
                None => {
                    unit.metrics.push(Known {
                        name: name.clone(),
                        datatype: m.datatype,
                        last: None,
                    });
                    self.metrics += 1;
                    unit.by_name.insert(name, unit.metrics.len() - 1);
                    unit.metrics.len() - 1
                }
            };
            unit.metrics[i].last = last;
            unit.metrics[i].datatype = m.datatype;
            if let Some(a) = m.alias {
                node.aliases.insert(a, (device.clone(), i));
            }
        }
        self.metrics += 1; // the unit itself
        node.units.insert(device, unit);
    }
}

/// `<group>/<edge node>[/<device>]`: the series key of a metric without its name.
fn series_prefix(group: &str, node: &str, device: Option<&str>) -> String {
    match device {
        Some(d) => format!("{group}/{node}/{d}"),
        None => format!("{group}/{node}"),
    }
}

/// Checks and advances an edge node's sequence number; true on a jump.
/// A Rebirth request (Sparkplug 3.0, "Node Control/Rebirth"): a payload with its timestamp and one Boolean
/// metric `Node Control/Rebirth` = true.
pub fn rebirth_payload(ts_ms: i64) -> Vec<u8> {
    fn field_varint(out: &mut Vec<u8>, field: u64, v: u64) {
        put_key(out, field, 0);
        put_varint(out, v);
    }
    let ts = u64::try_from(ts_ms).unwrap_or(0);
    let mut metric = Vec::with_capacity(32);
    put_bytes(&mut metric, 1, b"Node Control/Rebirth");
    field_varint(&mut metric, 3, ts);
    field_varint(&mut metric, 4, u64::from(datatype::BOOLEAN));
    field_varint(&mut metric, 14, 1);
    let mut payload = Vec::with_capacity(48);
    field_varint(&mut payload, 1, ts);
    put_bytes(&mut payload, 2, &metric);
    payload
}

/// Protobuf encoding: a varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Protobuf encoding: a field key (`wire` 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

/// Protobuf encoding: a length-delimited field.
fn put_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn check_seq(node: &mut Node, seq: Option<u64>) -> bool {
    let Some(seq) = seq else { return false };
    let got = seq as u8;
    let gap = node.next_seq.is_some_and(|want| want != got);
    node.next_seq = Some(got.wrapping_add(1));
    gap
}

/// Maps one metric's value; returns it for the "last value" memory.
#[allow(clippy::too_many_arguments)]
fn reading(
    m: &Metric,
    datatype: u32,
    prefix: &str,
    name: &str,
    msg_ts: i64,
    arrival_ms: i64,
    cfg: &PayloadConfig,
    out: &mut Out<'_>,
) -> Option<Value> {
    if m.is_null {
        out.skipped.push(Skip::Null);
        return None;
    }
    let ts = match m.timestamp {
        Some(t) => match i64::try_from(t) {
            Ok(ms) if ts_in_range(ms, arrival_ms, cfg) => ms,
            _ => {
                out.skipped.push(Skip::BadTimestamp);
                return None;
            }
        },
        None => msg_ts,
    };
    match value(datatype, &m.value) {
        Ok(v) => {
            let before = out.readings.len();
            out.push(&format!("{prefix}/{name}"), ts, v.clone(), Quality::Good);
            (out.readings.len() > before).then_some(v)
        }
        Err(skip) => {
            out.skipped.push(skip);
            None
        }
    }
}

/// Marks a unit's metrics stale: their last values again, with quality `bad`, at the death's time.
fn stale(unit: &Unit, prefix: &str, ts: i64, out: &mut Out<'_>) {
    for k in &unit.metrics {
        if let Some(v) = &k.last {
            out.push(&format!("{prefix}/{}", k.name), ts, v.clone(), Quality::Bad);
        }
    }
}

#[cfg(test)]
mod tests;

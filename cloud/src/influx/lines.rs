//! Batch → InfluxDB line protocol. Pure.
//!
//! # Schema
//! One line per (series tag set, event time) of a batch:
//! ```text
//! <measurement>,agent=<agent id>,device=<device>[,<tag>=<value>…] <measure>=<value>[,<measure>_quality="bad"…] <time ms>
//! ```
//! - measurement: one fixed name from the config (`influxdb.measurement`, default `fieldlink`), not one per
//!   device. A measurement is a table in InfluxDB 3 (Timestream for InfluxDB 3) with a per-database table limit
//!   (2,000 by default in InfluxDB 3 Core) that a fleet of devices would exceed, and cross-device queries
//!   (`GROUP BY device`, one Grafana panel for all meters) need one measurement. Device keys also contain `/`,
//!   which needs quoting as a measurement name in InfluxQL and SQL but not as a tag value. The cost: one field
//!   name used with two types by different devices is a field type conflict; InfluxDB refuses those lines
//!   and the sink dead-letters them with the server's message (Parquet still has them).
//! - tags: `agent` (the agent id), `device` (the series key without its last segment) and the series' tags, in
//!   name order. Tags with an empty value are left out (line protocol cannot carry them). A series tag named
//!   `agent`, `device` or `time`, or starting with `_` (InfluxDB 2 reserves `_measurement`, `_field`, …) is
//!   written as `tag_<name>`.
//! - fields: one per measure (the series key's last segment) with the reading's value: float (shortest text
//!   that parses back to the same `f64`), integer (`<n>i`), boolean, or string. A reading whose quality is not
//!   good adds a string field `<measure>_quality` (`"uncertain"` or `"bad"`); a bad reading without a finite
//!   value (a Modbus exception) is that quality field alone. A measure named `time` or starting with `_` is
//!   written as `field_<name>`. Within one line a later reading of a measure replaces an earlier one.
//! - time: the event time in milliseconds, sent with `precision=ms`, exact.
//!
//! # Why a replay overwrites
//! InfluxDB identifies a point by measurement + tag set + time, and a write to an existing point sets the
//! fields it carries (other fields stay). Everything in a line is a function of the readings alone (not of the
//! batch, the shard or the time of landing), so a replayed or resent batch writes the same points with the
//! same values: the database is unchanged. Readings of one device and time split over batches become lines
//! with the same identity and disjoint fields, which merge instead of erasing each other.
//!
//! # Escaping and what is refused
//! Per the line-protocol spec: the measurement escapes `,` and space; tag keys, tag values and field keys escape
//! `,`, `=` and space; string field values escape `"` and `\`. Line protocol has no escape for a newline in any
//! element and gives a backslash before an escapable character two readings, so a reading whose measurement,
//! tag key, tag value or field key contains `\`, `\n` or `\r`, or whose string value contains `\n` or `\r`,
//! is refused (dead-lettered with the reason), as is a non-finite float with good quality.

use fieldlink_proto::{Batch, Quality, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A reading not turned into line protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Series key.
    pub series: String,
    /// Event time, ms.
    pub time_ms: i64,
    /// Reason.
    pub reason: String,
}

/// The lines of one batch (each without its `\n`) and the readings refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lines {
    /// Line-protocol lines, in (tag set, time) order.
    pub lines: Vec<String>,
    /// Readings refused.
    pub refused: Vec<Refused>,
}

/// The tag name of a series tag.
pub fn tag_name(tag: &str) -> String {
    if matches!(tag, "agent" | "device" | "time") || tag.starts_with('_') {
        format!("tag_{tag}")
    } else {
        tag.to_owned()
    }
}

/// The field name of a measure.
pub fn field_name(measure: &str) -> String {
    if measure == "time" || measure.starts_with('_') {
        format!("field_{measure}")
    } else {
        measure.to_owned()
    }
}

fn unwritable(s: &str) -> bool {
    s.contains(['\\', '\n', '\r'])
}

fn escape_into(out: &mut String, s: &str, specials: &[char]) {
    for c in s.chars() {
        if specials.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// `s` escaped as a measurement name.
pub fn escape_measurement(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    escape_into(&mut o, s, &[',', ' ']);
    o
}

/// `s` escaped as a tag key, tag value or field key.
pub fn escape_key(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    escape_into(&mut o, s, &[',', '=', ' ']);
    o
}

/// A field value's text.
#[derive(Debug, Clone, PartialEq)]
enum FieldValue {
    Float(f64),
    Int(i64),
    Bool(bool),
    Str(String),
}

impl FieldValue {
    fn write(&self, out: &mut String) {
        match self {
            // `{:?}` is the shortest text that parses back to the same f64 (`1.0`, `0.1`, `1e300`, `-0.0`).
            FieldValue::Float(v) => {
                let _ = write!(out, "{v:?}");
            }
            FieldValue::Int(v) => {
                let _ = write!(out, "{v}i");
            }
            FieldValue::Bool(v) => out.push_str(if *v { "true" } else { "false" }),
            FieldValue::Str(s) => {
                out.push('"');
                escape_into(out, s, &['"', '\\']);
                out.push('"');
            }
        }
    }
}

/// The tag part of a series (`,k=v…` after the measurement), or why it cannot be written.
fn tag_set(agent: &str, s: &fieldlink_proto::Series) -> Result<String, String> {
    let mut tags: Vec<(String, &str)> = vec![
        ("agent".to_owned(), agent),
        ("device".to_owned(), s.device()),
    ];
    tags.extend(
        s.tags
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (tag_name(k), v.as_str())),
    );
    tags.sort();
    tags.dedup_by(|a, b| a.0 == b.0);
    let mut out = String::new();
    for (k, v) in &tags {
        if k.is_empty() || v.is_empty() {
            continue;
        }
        if unwritable(k) || unwritable(v) {
            return Err(format!(
                "tag {k:?}={v:?} contains a backslash or a line break (line protocol cannot carry it)"
            ));
        }
        out.push(',');
        out.push_str(&escape_key(k));
        out.push('=');
        out.push_str(&escape_key(v));
    }
    Ok(out)
}

/// Builds the lines of one batch under `measurement` (already checked by the config).
pub fn build(batch: &Batch, measurement: &str) -> Lines {
    let mut refused = Vec::new();
    let tags: Vec<Result<String, String>> = batch
        .series
        .iter()
        .map(|s| tag_set(&batch.agent_id, s))
        .collect();
    // (tag set, time) → field name → value; BTreeMaps keep the output deterministic.
    let mut points: BTreeMap<(&str, i64), BTreeMap<String, FieldValue>> = BTreeMap::new();
    for r in &batch.readings {
        let Some(s) = batch.series.get(r.series as usize) else {
            continue;
        };
        let refuse = |reason: String| Refused {
            series: s.key.clone(),
            time_ms: r.ts_ms,
            reason,
        };
        let t = match &tags[r.series as usize] {
            Ok(t) => t.as_str(),
            Err(why) => {
                refused.push(refuse(why.clone()));
                continue;
            }
        };
        let field = field_name(s.measure());
        if field.is_empty() || unwritable(&field) {
            refused.push(refuse(format!(
                "measure {field:?} is empty or contains a backslash or a line break"
            )));
            continue;
        }
        let value = match &r.value {
            Value::F64(v) if v.is_finite() => Some(FieldValue::Float(*v)),
            Value::F64(_) => None,
            Value::I64(v) => Some(FieldValue::Int(*v)),
            Value::Bool(v) => Some(FieldValue::Bool(*v)),
            Value::Str(v) if v.contains(['\n', '\r']) => {
                refused.push(refuse(
                    "string contains a line break (line protocol cannot carry it)".into(),
                ));
                continue;
            }
            Value::Str(v) => Some(FieldValue::Str(v.clone())),
        };
        if value.is_none() && r.quality == Quality::Good {
            refused.push(refuse("non-finite double".into()));
            continue;
        }
        let fields = points.entry((t, r.ts_ms)).or_default();
        if let Some(v) = value {
            fields.insert(field.clone(), v);
        }
        let quality = format!("{field}_quality");
        if r.quality == Quality::Good {
            // A later good reading of the measure replaces an earlier bad one in this line.
            fields.remove(&quality);
        } else {
            fields.insert(quality, FieldValue::Str(r.quality.as_str().to_owned()));
        }
    }
    let m = escape_measurement(measurement);
    let lines = points
        .into_iter()
        .filter(|(_, f)| !f.is_empty())
        .map(|((tags, time), fields)| {
            let mut l = String::with_capacity(m.len() + tags.len() + 32 * fields.len() + 16);
            l.push_str(&m);
            l.push_str(tags);
            for (i, (k, v)) in fields.iter().enumerate() {
                l.push(if i == 0 { ' ' } else { ',' });
                l.push_str(&escape_key(k));
                l.push('=');
                v.write(&mut l);
            }
            let _ = write!(l, " {time}");
            l
        })
        .collect();
    Lines { lines, refused }
}

/// Cuts `lines` into requests of at most `max_lines` lines and `max_bytes` bytes (newlines included); a line
/// longer than `max_bytes` goes alone. Returns index ranges.
pub fn chunks(lines: &[String], max_lines: usize, max_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (i, l) in lines.iter().enumerate() {
        let n = l.len() + 1;
        if i > start && (i - start >= max_lines || bytes + n > max_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += n;
    }
    if start < lines.len() {
        out.push(start..lines.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldlink_proto::{Reading, Series};
    use proptest::prelude::*;

    fn reading(series: u32, ts_ms: i64, value: Value, quality: Quality) -> Reading {
        Reading {
            series,
            ts_ms,
            value,
            quality,
            late: false,
        }
    }

    fn batch(series: Vec<Series>, readings: Vec<Reading>) -> Batch {
        Batch {
            agent_id: "gw-1".into(),
            epoch: 7,
            seq: 3,
            series,
            readings,
        }
    }

    #[test]
    fn a_device_and_time_become_one_line_with_one_field_per_measure() {
        let mut temp = Series::new("plant/meter-a/temp");
        temp.tags = vec![("site".into(), "muc".into())];
        let mut count = Series::new("plant/meter-a/count");
        count.tags = temp.tags.clone();
        let b = batch(
            vec![temp, count, Series::new("plant/meter-a/state")],
            vec![
                reading(0, 1000, Value::F64(21.5), Quality::Good),
                reading(1, 1000, Value::I64(-4), Quality::Uncertain),
                reading(2, 1000, Value::Str("a \"b\" \\c".into()), Quality::Good),
                reading(0, 2000, Value::F64(f64::NAN), Quality::Bad),
                reading(0, 3000, Value::F64(1e300), Quality::Good),
                reading(1, 3000, Value::Bool(true), Quality::Good),
            ],
        );
        let l = build(&b, "fieldlink");
        assert_eq!(
            l.lines,
            vec![
                "fieldlink,agent=gw-1,device=plant/meter-a state=\"a \\\"b\\\" \\\\c\" 1000",
                "fieldlink,agent=gw-1,device=plant/meter-a,site=muc count=-4i,count_quality=\"uncertain\",temp=21.5 1000",
                "fieldlink,agent=gw-1,device=plant/meter-a,site=muc temp_quality=\"bad\" 2000",
                "fieldlink,agent=gw-1,device=plant/meter-a,site=muc count=true,temp=1e300 3000",
            ]
        );
        assert!(l.refused.is_empty());
    }

    #[test]
    fn separators_are_escaped_and_unwritable_readings_refused() {
        let mut s = Series::new("hall 1/m,e=t/v a=l");
        s.tags = vec![
            ("li ne".into(), "a,b=c".into()),
            ("agent".into(), "x".into()),
            ("_field".into(), "y".into()),
            ("empty".into(), String::new()),
        ];
        let mut bad = Series::new("dev/v");
        bad.tags = vec![("k".into(), "back\\slash".into())];
        let b = batch(
            vec![s, bad, Series::new("dev/time"), Series::new("dev/s")],
            vec![
                reading(0, 5, Value::F64(-0.0), Quality::Good),
                reading(1, 5, Value::F64(1.0), Quality::Good),
                reading(2, 5, Value::F64(f64::INFINITY), Quality::Good),
                reading(2, 6, Value::I64(i64::MIN), Quality::Good),
                reading(3, 6, Value::Str("two\nlines".into()), Quality::Good),
            ],
        );
        let l = build(&b, "my m,x");
        assert_eq!(
            l.lines,
            vec![
                r#"my\ m\,x,agent=gw-1,device=dev field_time=-9223372036854775808i 6"#,
                r#"my\ m\,x,agent=gw-1,device=hall\ 1/m\,e\=t,li\ ne=a\,b\=c,tag__field=y,tag_agent=x v\ a\=l=-0.0 5"#,
            ]
        );
        let reasons: Vec<&str> = l.refused.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(l.refused.len(), 3, "{reasons:?}");
        assert!(reasons[0].contains("backslash"));
        assert_eq!(reasons[1], "non-finite double");
        assert!(reasons[2].contains("line break"));
    }

    #[test]
    fn a_replayed_batch_builds_the_same_lines() {
        let b = batch(
            vec![Series::new("d/a"), Series::new("d/b")],
            vec![
                reading(1, 9, Value::F64(0.1), Quality::Good),
                reading(0, 9, Value::I64(1), Quality::Good),
            ],
        );
        let mut other = b.clone();
        other.seq = 99;
        other.epoch = 1;
        assert_eq!(build(&b, "m"), build(&other, "m"));
    }

    #[test]
    fn requests_are_cut_by_lines_and_bytes() {
        let lines: Vec<String> = ["aaaa", "bb", "c", "dddddddddd", "e"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(chunks(&lines, 2, 100), vec![0..2, 2..4, 4..5]);
        assert_eq!(chunks(&lines, 10, 8), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(chunks(&[], 10, 8), Vec::<std::ops::Range<usize>>::new());
    }

    type Tags = Vec<(String, String)>;
    type Points = BTreeMap<(Tags, i64), BTreeMap<String, FieldValue>>;

    /// A line-protocol parser (the subset the builder writes), for checking that lines parse back.
    fn parse(line: &str) -> (String, Tags, Vec<(String, FieldValue)>, i64) {
        fn split<'a>(s: &'a str, seps: &[char], quotes: bool) -> (String, Option<char>, &'a str) {
            let mut out = String::new();
            let mut it = s.char_indices();
            let mut in_str = false;
            while let Some((i, c)) = it.next() {
                if c == '\\' {
                    let (_, n) = it.next().expect("dangling backslash");
                    if in_str || seps.contains(&n) || n == '=' || n == ',' || n == ' ' {
                        if in_str {
                            out.push('\\');
                        }
                        out.push(n);
                        continue;
                    }
                    panic!("backslash before {n:?}");
                }
                if quotes && c == '"' {
                    in_str = !in_str;
                    out.push(c);
                    continue;
                }
                if !in_str && seps.contains(&c) {
                    return (out, Some(c), &s[i + 1..]);
                }
                out.push(c);
            }
            (out, None, "")
        }
        let (measurement, mut sep, mut rest) = split(line, &[',', ' '], false);
        let mut tags = Vec::new();
        while sep == Some(',') {
            let (k, _, r) = split(rest, &['='], false);
            let (v, s, r) = split(r, &[',', ' '], false);
            tags.push((k, v));
            sep = s;
            rest = r;
        }
        let mut fields = Vec::new();
        loop {
            let (k, _, r) = split(rest, &['='], false);
            let (v, s, r) = split(r, &[',', ' '], true);
            let value = if let Some(q) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                let mut o = String::new();
                let mut cs = q.chars();
                while let Some(c) = cs.next() {
                    o.push(if c == '\\' {
                        cs.next().expect("escape")
                    } else {
                        c
                    });
                }
                FieldValue::Str(o)
            } else if let Some(i) = v.strip_suffix('i') {
                FieldValue::Int(i.parse().expect("int"))
            } else if v == "true" || v == "false" {
                FieldValue::Bool(v == "true")
            } else {
                FieldValue::Float(v.parse().expect("float"))
            };
            fields.push((k, value));
            rest = r;
            if s != Some(',') {
                break;
            }
        }
        (measurement, tags, fields, rest.parse().expect("time"))
    }

    fn text() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-z ,=\"\\\\_\n/é]{1,8}").expect("regex")
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<f64>().prop_map(Value::F64),
            any::<i64>().prop_map(Value::I64),
            any::<bool>().prop_map(Value::Bool),
            text().prop_map(Value::Str),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn lines_parse_back_to_the_readings(
            series in proptest::collection::vec((text(), text(), proptest::collection::vec((text(), text()), 0..3)), 1..4),
            readings in proptest::collection::vec((0usize..4, 0i64..3, value(), 0u8..3), 1..12),
            measurement in "[a-z ,]{1,6}",
        ) {
            let series: Vec<Series> = series.into_iter().map(|(d, m, tags)| Series { key: format!("{d}/{m}"), tags }).collect();
            let readings: Vec<Reading> = readings.into_iter().map(|(s, t, v, q)| reading(
                (s % series.len()) as u32, t, v, [Quality::Good, Quality::Uncertain, Quality::Bad][q as usize])).collect();
            let b = batch(series.clone(), readings.clone());
            let out = build(&b, &measurement);
            // Expected: the last writable reading of each (tag set, time, field), by the same rules.
            let mut expected: Points = BTreeMap::new();
            let mut refused = 0;
            for r in &readings {
                let s = &series[r.series as usize];
                let mut tags: Vec<(String, String)> = vec![("agent".into(), "gw-1".into()), ("device".into(), s.device().into())];
                tags.extend(s.tags.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (tag_name(k), v.clone())));
                tags.sort();
                tags.dedup_by(|a, b| a.0 == b.0);
                let field = field_name(s.measure());
                tags.retain(|(k, v)| !k.is_empty() && !v.is_empty());
                let bad_text = tags.iter().any(|(k, v)| unwritable(k) || unwritable(v)) || unwritable(&field) || field.is_empty();
                let value = match &r.value {
                    Value::F64(v) if v.is_finite() => Some(FieldValue::Float(*v)),
                    Value::F64(_) => None,
                    Value::I64(v) => Some(FieldValue::Int(*v)),
                    Value::Bool(v) => Some(FieldValue::Bool(*v)),
                    Value::Str(v) => Some(FieldValue::Str(v.clone())),
                };
                let bad_str = matches!(&r.value, Value::Str(v) if v.contains(['\n', '\r']));
                if bad_text || bad_str || (value.is_none() && r.quality == Quality::Good) {
                    refused += 1;
                    continue;
                }
                let f = expected.entry((tags, r.ts_ms)).or_default();
                if let Some(v) = value { f.insert(field.clone(), v); }
                if r.quality == Quality::Good { f.remove(&format!("{field}_quality")); }
                else { f.insert(format!("{field}_quality"), FieldValue::Str(r.quality.as_str().into())); }
            }
            prop_assert_eq!(out.refused.len(), refused);
            let mut got = BTreeMap::new();
            for l in &out.lines {
                let (m, tags, fields, time) = parse(l);
                prop_assert_eq!(&m, &measurement);
                let fields: BTreeMap<String, FieldValue> = fields.into_iter().collect();
                prop_assert!(got.insert((tags, time), fields).is_none(), "two lines for one point");
            }
            expected.retain(|_, f| !f.is_empty());
            // Floats compare bitwise (so -0.0 and 0.0 differ).
            let bits = |m: &Points| -> Vec<String> {
                m.iter().map(|(k, f)| format!("{k:?} {:?}", f.iter().map(|(n, v)| match v {
                    FieldValue::Float(x) => format!("{n}=f{:x}", x.to_bits()),
                    other => format!("{n}={other:?}"),
                }).collect::<Vec<_>>())).collect()
            };
            prop_assert_eq!(bits(&got), bits(&expected));
        }
    }
}

//! InfluxDB line protocol: `measurement[,tag=value...] field=value[,field=value...] [timestamp]`, one point
//! per line (<https://docs.influxdata.com/influxdb/v2/reference/syntax/line-protocol/>).
//!
//! Each field is a reading of series `<measurement>/<field>` with the line's tags. Field values: floats
//! (`1.5`, `1`, `-2e3`), integers (`12i`), unsigned integers (`12u`, kept as i64 up to `i64::MAX`, else
//! refused), strings (`"on"`, with `\"` and `\\` escapes) and booleans (`t`, `true`, `f`, `False`, ...).
//! The timestamp is in `influx_timestamp_unit` (nanoseconds by default); without one, arrival time. Escapes
//! with `\` of commas, spaces and `=` in names as the protocol defines. Empty lines and `#` comments are
//! skipped. In a payload of several lines, a malformed line is skipped as `bad_line` and the others pass; a
//! payload whose only lines are malformed is refused as `bad_line_protocol`.

use super::{to_ms, ts_in_range, Interner, Out, Parsed, PayloadError, Skip};
use crate::mqtt::config::PayloadConfig;
use fieldlink_proto::{Quality, Value};

/// Splits `s` at the first unescaped byte in `stops` (outside double quotes when `quotes`), returning the part
/// before (escapes still in) and the byte found (`None` at the end).
fn split_at_unescaped<'a>(
    s: &'a str,
    stops: &[u8],
    quotes: bool,
) -> (&'a str, Option<u8>, &'a str) {
    let b = s.as_bytes();
    let (mut i, mut in_q) = (0, false);
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'"' if quotes => in_q = !in_q,
            c if !in_q && stops.contains(&c) => return (&s[..i], Some(c), &s[i + 1..]),
            _ => {}
        }
        i += 1;
    }
    (s, None, "")
}

/// Removes backslash escapes of `, =` and space (and `\\`).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(&n) = chars.peek() {
                if matches!(n, ',' | '=' | ' ' | '\\' | '"') {
                    out.push(n);
                    chars.next();
                    continue;
                }
            }
        }
        out.push(c);
    }
    out
}

fn field_value(raw: &str) -> Result<Value, String> {
    if let Some(inner) = raw.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or_else(|| format!("unterminated string {raw:?}"))?;
        return Ok(Value::Str(unescape(inner)));
    }
    match raw {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
        _ => {}
    }
    if let Some(i) = raw.strip_suffix('i') {
        return i
            .parse::<i64>()
            .map(Value::I64)
            .map_err(|_| format!("bad integer {raw:?}"));
    }
    if let Some(u) = raw.strip_suffix('u') {
        let n = u
            .parse::<u64>()
            .map_err(|_| format!("bad unsigned {raw:?}"))?;
        return i64::try_from(n)
            .map(Value::I64)
            .map_err(|_| format!("unsigned {raw:?} above {}", i64::MAX));
    }
    // Rust's float parser also takes "inf" and "NaN", which the protocol does not; they are refused below
    // (`non_finite`) rather than here so they are counted as such.
    if raw.is_empty()
        || !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Err(format!("bad field value {raw:?}"));
    }
    raw.parse::<f64>()
        .map(Value::F64)
        .map_err(|_| format!("bad field value {raw:?}"))
}

/// Parses one line into `out`; `Err` describes a malformed line (nothing of it is kept).
fn line(text: &str, arrival_ms: i64, cfg: &PayloadConfig, out: &mut Out<'_>) -> Result<(), String> {
    let (series_part, sep, rest) = split_at_unescaped(text, b" ", false);
    if sep.is_none() || series_part.is_empty() {
        return Err("no fields".into());
    }
    let mut parts = Vec::new();
    let mut s = series_part;
    loop {
        let (p, sep, rest) = split_at_unescaped(s, b",", false);
        parts.push(p);
        if sep.is_none() {
            break;
        }
        s = rest;
    }
    let measurement = unescape(parts[0]);
    if measurement.is_empty() {
        return Err("empty measurement".into());
    }
    let mut tags = Vec::with_capacity(parts.len() - 1);
    for t in &parts[1..] {
        let (k, sep, v) = split_at_unescaped(t, b"=", false);
        if sep.is_none() || k.is_empty() || v.is_empty() {
            return Err(format!("bad tag {t:?}"));
        }
        tags.push((unescape(k), unescape(v)));
    }
    tags.sort();
    // A series has one value per tag name: rules match on it (a window rule refused for writing another's derived
    // series could otherwise be met through a second value of the same tag).
    if let Some(w) = tags.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!("tag {:?} repeated", w[0].0));
    }
    let (fields_part, sep, ts_part) = split_at_unescaped(rest.trim_start(), b" ", true);
    let ts_ms = match (sep, ts_part.trim()) {
        (None, _) | (Some(_), "") => arrival_ms,
        (Some(_), ts) => {
            let n: i64 = ts.parse().map_err(|_| format!("bad timestamp {ts:?}"))?;
            match to_ms(n as f64, cfg.influx_timestamp_unit) {
                Some(ms) if ts_in_range(ms, arrival_ms, cfg) => ms,
                _ => return Err(format!("timestamp {ts} out of range")),
            }
        }
    };
    let mut fields = Vec::new();
    let mut s = fields_part;
    loop {
        let (f, sep, rest) = split_at_unescaped(s, b",", true);
        let (k, eq, v) = split_at_unescaped(f, b"=", true);
        if eq.is_none() || k.is_empty() {
            return Err(format!("bad field {f:?}"));
        }
        fields.push((unescape(k), field_value(v)?));
        if sep.is_none() {
            break;
        }
        s = rest;
    }
    let tags = out.merged(&tags);
    for (k, v) in fields {
        out.push_tagged(
            &format!("{measurement}/{k}"),
            &tags,
            ts_ms,
            v,
            Quality::Good,
        );
    }
    Ok(())
}

/// Maps one line-protocol message (size already checked).
pub fn parse(payload: &[u8], arrival_ms: i64, cfg: &PayloadConfig) -> Result<Parsed, PayloadError> {
    parse_with(&mut Interner::default(), payload, arrival_ms, cfg)
}

/// [`parse`], the readings' series from `series` (with its topic tags).
pub(crate) fn parse_with(
    series: &mut Interner,
    payload: &[u8],
    arrival_ms: i64,
    cfg: &PayloadConfig,
) -> Result<Parsed, PayloadError> {
    let text = std::str::from_utf8(payload).map_err(|e| PayloadError::BadLineProtocol {
        line: 1,
        why: format!("not UTF-8: {e}"),
    })?;
    let mut out = Out::new(series);
    let mut first_error = None;
    for (n, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if let Err(why) = line(l, arrival_ms, cfg, &mut out) {
            out.skipped.push(Skip::BadLine);
            first_error.get_or_insert(PayloadError::BadLineProtocol { line: n + 1, why });
        }
    }
    if out.readings.is_empty() {
        if let Some(e) = first_error {
            return Err(e);
        }
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_772_431_200_000;

    type Point = (String, Vec<(String, String)>, i64, Value);

    fn ok(payload: &str) -> Vec<Point> {
        let p = parse(payload.as_bytes(), NOW, &PayloadConfig::default())
            .unwrap_or_else(|e| panic!("{payload}: {e}"));
        p.readings
            .into_iter()
            .map(|r| {
                (
                    r.series.key.clone(),
                    r.series.tags.clone(),
                    r.ts_ms,
                    r.value,
                )
            })
            .collect()
    }

    fn tags(t: &[(&str, &str)]) -> Vec<(String, String)> {
        t.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
    }

    #[test]
    fn fields_become_series_with_the_line_tags() {
        assert_eq!(
            ok("weather,site=muc,loc=roof temp=21.5,hum=40i,ok=t,state=\"on\" 1772431200000000000"),
            vec![
                (
                    "weather/temp".into(),
                    tags(&[("loc", "roof"), ("site", "muc")]),
                    NOW,
                    Value::F64(21.5)
                ),
                (
                    "weather/hum".into(),
                    tags(&[("loc", "roof"), ("site", "muc")]),
                    NOW,
                    Value::I64(40)
                ),
                (
                    "weather/ok".into(),
                    tags(&[("loc", "roof"), ("site", "muc")]),
                    NOW,
                    Value::Bool(true)
                ),
                (
                    "weather/state".into(),
                    tags(&[("loc", "roof"), ("site", "muc")]),
                    NOW,
                    Value::Str("on".into())
                ),
            ]
        );
    }

    #[test]
    fn escapes_quotes_and_missing_timestamps() {
        assert_eq!(
            ok(r#"my\ meas,tag\,x=a\ b f\=1="a, \"q\" b",g=12u"#),
            vec![
                (
                    "my meas/f=1".into(),
                    tags(&[("tag,x", "a b")]),
                    NOW,
                    Value::Str(r#"a, "q" b"#.into())
                ),
                (
                    "my meas/g".into(),
                    tags(&[("tag,x", "a b")]),
                    NOW,
                    Value::I64(12)
                ),
            ]
        );
    }

    #[test]
    fn several_lines_comments_and_a_bad_line() {
        let p = parse(
            b"# comment\nm v=1 1772431200000000000\n\nm v=oops\nm v=2 1772431201000000000\n",
            NOW,
            &PayloadConfig::default(),
        )
        .unwrap_or_default();
        assert_eq!(p.readings.len(), 2);
        assert_eq!(p.readings[1].ts_ms, NOW + 1000);
        assert_eq!(p.skipped, vec![Skip::BadLine]);
    }

    #[test]
    fn timestamp_unit_is_configurable() {
        let c = PayloadConfig {
            influx_timestamp_unit: crate::mqtt::TimeUnit::S,
            ..PayloadConfig::default()
        };
        let p = parse(b"m v=1 1772431200", NOW, &c).unwrap_or_default();
        assert_eq!(p.readings[0].ts_ms, NOW);
    }

    #[test]
    fn bad_payloads_are_refused_by_reason() {
        let c = PayloadConfig::default();
        let reason = |p: &str| {
            parse(p.as_bytes(), NOW, &c)
                .map(|_| ())
                .unwrap_err()
                .reason()
        };
        for bad in [
            "just_a_name",
            "m v=",
            "m v=1 yesterday",
            "m v=\"open",
            "m v=1x",
            "m,t v=1",
            "m v=18446744073709551615u",
            "m v=1 86400000000000",
            "m v=1 2872431200000000000",
            "m,site=muc,site=ber v=1",
        ] {
            assert_eq!(reason(bad), "bad_line_protocol", "{bad}");
        }
        assert_eq!(reason("m v=NaN"), "non_finite");
        assert_eq!(reason("m v=inf"), "non_finite");
        assert_eq!(
            parse(&[0xff, 0xfe], NOW, &c)
                .map(|_| ())
                .unwrap_err()
                .reason(),
            "bad_line_protocol"
        );
    }
}

//! Payload mapping: an MQTT message (topic + bytes) to readings. Pure and synchronous; no I/O.
//!
//! Formats (chosen per subscription, see [`Format`]):
//! - [`json`]: a JSON object (fields → series `<topic>/<field>`, nested objects flattened with `/`, include and
//!   exclude lists, a timestamp field with a unit) or a bare JSON scalar (series `<topic>`).
//! - [`influx`]: InfluxDB line protocol (series `<measurement>/<field>`, the line's tags as tags).
//! - [`sparkplug`]: Sparkplug B (series `<group>/<edge node>[/<device>]/<metric>`), with per-connection state:
//!   birth certificates' aliases, sequence numbers, and deaths that mark series stale.
//!
//! A message either gives readings (possibly with some fields skipped, counted by [`Skip`] reason: the good
//! fields of a partly bad payload still pass) or is refused with a [`PayloadError`] whose `reason()` labels the
//! dead-letter counter and the dead-letter row. Topic tags (`tags_from_topic`) are merged into each reading's
//! series (a tag the payload sets wins; a name the topic gives twice keeps its first value) before its limits
//! are checked. The readings of a series share one `Arc<Series>` from a mapper's bounded [`Interner`]:
//! mapping a JSON field allocates no key and no tags (line protocol and Sparkplug still format each key).
//!
//! Every timestamp a payload claims must lie in `[min_timestamp_ms, arrival + max_future_ms]`; a value must be
//! finite; keys, tags and strings must fit the wire format's limits.

pub mod influx;
mod intern;
pub mod json;
pub mod sparkplug;

use super::config::{Format, PayloadConfig, TimeUnit};
use crate::buffer::NewReading;
use fieldlink_proto::limits::MAX_STRING_BYTES;
use fieldlink_proto::{Quality, Series, Value};
pub use intern::Interner;
use std::sync::Arc;

/// Why a whole message was refused. `reason()` labels the dead-letter counter and row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Larger than `max_payload_bytes`.
    #[error("payload of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// Not JSON.
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    /// Not valid InfluxDB line protocol.
    #[error("line {line}: {why}")]
    BadLineProtocol {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// Not a Sparkplug B payload or topic.
    #[error("not Sparkplug B: {0}")]
    BadSparkplug(String),
    /// The payload parsed but no field gave a reading; the reason of the first skipped field, if any.
    #[error("payload holds no readings{}", .0.map(|s| format!(" (fields skipped: {})", s.reason())).unwrap_or_default())]
    NoReadings(Option<Skip>),
    /// The message's timestamp is not a number in range.
    #[error("timestamp is not a usable number in range")]
    BadTimestamp,
    /// A Sparkplug birth would exceed `max_sparkplug_metrics`.
    #[error("Sparkplug metrics limit of {0} reached")]
    SparkplugLimit(usize),
}

impl PayloadError {
    /// Short reason label for metrics and dead letters. A payload without readings is labelled by why its fields
    /// were skipped (`wrong_type`, `non_finite`, ...), else `no_readings`.
    pub fn reason(&self) -> &'static str {
        match self {
            PayloadError::TooLarge(_) => "too_large",
            PayloadError::NotJson(_) => "not_json",
            PayloadError::BadLineProtocol { .. } => "bad_line_protocol",
            PayloadError::BadSparkplug(_) => "bad_sparkplug",
            PayloadError::NoReadings(Some(s)) => s.reason(),
            PayloadError::NoReadings(None) => "no_readings",
            PayloadError::BadTimestamp => "bad_timestamp",
            PayloadError::SparkplugLimit(_) => "sparkplug_limit",
        }
    }
}

/// Why one field of a message gave no reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// `null`, or a Sparkplug metric marked null.
    Null,
    /// Not a scalar (array, data set, template, bytes).
    WrongType,
    /// NaN or an infinity.
    NonFinite,
    /// A key, tag or string longer than the wire format allows.
    TooLong,
    /// A per-field timestamp out of range.
    BadTimestamp,
    /// A Sparkplug metric whose alias no birth certificate named.
    UnknownAlias,
    /// One line of a multi-line InfluxDB payload is malformed (the others pass).
    BadLine,
}

impl Skip {
    /// All reasons, for metrics.
    pub const ALL: [Skip; 7] = [
        Skip::Null,
        Skip::WrongType,
        Skip::NonFinite,
        Skip::TooLong,
        Skip::BadTimestamp,
        Skip::UnknownAlias,
        Skip::BadLine,
    ];

    /// Short label.
    pub fn reason(self) -> &'static str {
        match self {
            Skip::Null => "null",
            Skip::WrongType => "wrong_type",
            Skip::NonFinite => "non_finite",
            Skip::TooLong => "too_long",
            Skip::BadTimestamp => "bad_timestamp",
            Skip::UnknownAlias => "unknown_alias",
            Skip::BadLine => "bad_line",
        }
    }
}

/// The readings of one message, and the fields skipped, by reason.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// Readings.
    pub readings: Vec<NewReading>,
    /// Skipped fields in order of appearance (a message rarely has many).
    pub skipped: Vec<Skip>,
    /// Sparkplug: the sequence number was not the one expected (a message of this edge node was lost or
    /// reordered on the way).
    pub seq_gap: bool,
}

impl Parsed {
    /// Adds a reading of a series already checked against the wire format's limits, after checking the value.
    fn push(&mut self, series: Arc<Series>, ts_ms: i64, value: Value, quality: Quality) {
        if matches!(&value, Value::Str(s) if s.len() > MAX_STRING_BYTES) {
            return self.skipped.push(Skip::TooLong);
        }
        if matches!(value, Value::F64(f) if !f.is_finite()) {
            return self.skipped.push(Skip::NonFinite);
        }
        self.readings.push(NewReading {
            series,
            ts_ms,
            value,
            quality,
        });
    }

    /// The message's result: refused when nothing passed.
    fn finish(self) -> Result<Parsed, PayloadError> {
        if self.readings.is_empty() {
            return Err(PayloadError::NoReadings(self.skipped.first().copied()));
        }
        Ok(self)
    }
}

/// A parser's result being built: what [`Parsed`] holds, each reading's series shared through the mapper's
/// [`Interner`] (which holds the message's topic tags), and checked against the wire format's limits with its
/// tags merged, so a long topic level that pushes a tag over them skips the reading as `too_long`.
#[derive(Debug)]
pub(crate) struct Out<'a> {
    parsed: Parsed,
    series: &'a mut Interner,
}

impl<'a> Out<'a> {
    /// An empty result whose series come from `series`.
    pub(crate) fn new(series: &'a mut Interner) -> Self {
        Self {
            parsed: Parsed {
                // At least what the vector's first push would take (4 readings).
                readings: Vec::with_capacity(series.readings_hint.max(4)),
                ..Parsed::default()
            },
            series,
        }
    }

    /// Adds a reading of series `key` with the message's topic tags. A series over the wire format's limits is
    /// skipped before it is looked up (the interner keeps only series that can be sent).
    pub(crate) fn push(&mut self, key: &str, ts_ms: i64, value: Value, quality: Quality) {
        if too_long(key, self.series.tags()) {
            return self.parsed.skipped.push(Skip::TooLong);
        }
        let series = self.series.get(key);
        self.parsed.push(series, ts_ms, value, quality);
    }

    /// Adds a reading of series `key` with exactly `tags` (a payload's own tags, [`Interner::merged`] with the
    /// topic's).
    pub(crate) fn push_tagged(
        &mut self,
        key: &str,
        tags: &[(String, String)],
        ts_ms: i64,
        value: Value,
        quality: Quality,
    ) {
        if too_long(key, tags) {
            return self.parsed.skipped.push(Skip::TooLong);
        }
        let series = self.series.get_tagged(key, tags);
        self.parsed.push(series, ts_ms, value, quality);
    }

    /// The payload's own `tags` merged with the message's topic tags.
    pub(crate) fn merged(&self, tags: &[(String, String)]) -> Vec<(String, String)> {
        self.series.merged(tags)
    }

    /// What was built.
    pub(crate) fn into_parsed(self) -> Parsed {
        self.series.readings_hint = self.parsed.readings.len().min(intern::MAX_READINGS_HINT);
        self.parsed
    }

    /// The message's result: refused when nothing passed.
    pub(crate) fn finish(self) -> Result<Parsed, PayloadError> {
        self.into_parsed().finish()
    }
}

impl std::ops::Deref for Out<'_> {
    type Target = Parsed;
    fn deref(&self) -> &Parsed {
        &self.parsed
    }
}

impl std::ops::DerefMut for Out<'_> {
    fn deref_mut(&mut self) -> &mut Parsed {
        &mut self.parsed
    }
}

/// Whether a series key or its tags break the wire format's limits (the encoder would refuse the batch): over
/// them, or empty where they must not be.
fn too_long(key: &str, tags: &[(String, String)]) -> bool {
    fieldlink_proto::check_series(key, tags).is_err()
}

/// Converts a number in `unit` to Unix milliseconds; `None` outside years 1970..=9999, not finite, or for the
/// string unit `rfc3339`.
pub(crate) fn to_ms(v: f64, unit: TimeUnit) -> Option<i64> {
    let ms = match unit {
        TimeUnit::S => v * 1e3,
        TimeUnit::Ms => v,
        TimeUnit::Us => v / 1e3,
        TimeUnit::Ns => v / 1e6,
        TimeUnit::Rfc3339 => return None,
    };
    (ms.is_finite() && (0.0..=253_402_300_799_999.0).contains(&ms)).then(|| ms.round() as i64)
}

/// Parses an RFC 3339 date-time (with `Z` or an offset) to Unix milliseconds.
pub(crate) fn rfc3339_ms(s: &str) -> Option<i64> {
    use aws_smithy_types::date_time::{DateTime, Format};
    let ms = DateTime::from_str(s, Format::DateTimeWithOffset)
        .ok()?
        .to_millis()
        .ok()?;
    (0..=253_402_300_799_999).contains(&ms).then_some(ms)
}

/// Whether a timestamp a payload claims is acceptable at `arrival_ms`.
fn ts_in_range(ts_ms: i64, arrival_ms: i64, cfg: &PayloadConfig) -> bool {
    ts_ms >= cfg.min_timestamp_ms && ts_ms <= arrival_ms.saturating_add(cfg.max_future_ms)
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

/// Maps messages of one connection; holds the state some formats need (Sparkplug births).
#[derive(Debug)]
pub struct Mapper {
    cfg: PayloadConfig,
    sparkplug: sparkplug::State,
    /// The JSON walk's buffers, reused from message to message.
    json: json::Scratch,
    /// The series of the readings, shared from message to message.
    series: Interner,
}

impl Mapper {
    /// A mapper with empty state.
    pub fn new(cfg: PayloadConfig) -> Self {
        let sparkplug = sparkplug::State::new(cfg.max_sparkplug_metrics, cfg.sparkplug_rebirth_ms);
        Self {
            cfg,
            sparkplug,
            json: json::Scratch::default(),
            series: Interner::default(),
        }
    }

    /// A Sparkplug Rebirth request the messages mapped so far called for (taken once; see [`sparkplug`]).
    pub fn take_rebirth(&mut self) -> Option<sparkplug::Rebirth> {
        self.sparkplug.take_rebirth()
    }

    /// Maps one message of `format` and adds `topic_tags` to its readings. `arrival_ms` is used when the payload
    /// carries no timestamp.
    pub fn map(
        &mut self,
        format: Format,
        topic: &str,
        payload: &[u8],
        arrival_ms: i64,
        topic_tags: &[(String, String)],
    ) -> Result<Parsed, PayloadError> {
        if payload.len() > self.cfg.max_payload_bytes {
            return Err(PayloadError::TooLarge(payload.len()));
        }
        self.series.begin(topic_tags);
        let series = &mut self.series;
        match format {
            Format::Json => json::parse_with(
                &mut self.json,
                series,
                topic,
                payload,
                arrival_ms,
                &self.cfg,
            ),
            Format::Influx => influx::parse_with(series, payload, arrival_ms, &self.cfg),
            Format::SparkplugB => self
                .sparkplug
                .apply(series, topic, payload, arrival_ms, &self.cfg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldlink_proto::limits::{MAX_KEY_BYTES, MAX_TAG_VALUE_BYTES};

    fn tags(t: &[(&str, &str)]) -> Vec<(String, String)> {
        t.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
    }

    #[test]
    fn the_next_message_starts_with_room_for_the_last_ones_readings_up_to_a_bound() {
        let mut m = Mapper::new(PayloadConfig::default());
        let six = br#"{"a":1,"b":2,"c":3,"d":4,"e":5,"f":6}"#;
        assert_eq!(
            m.map(Format::Json, "t", six, 0, &[])
                .map(|p| p.readings.len()),
            Ok(6)
        );
        let next = m
            .map(Format::Json, "t", br#"{"a":1}"#, 0, &[])
            .unwrap_or_default();
        assert!(
            next.readings.capacity() >= 6,
            "{}",
            next.readings.capacity()
        );
        assert_eq!(m.series.readings_hint, 1);
        let fields: Vec<String> = (0..400).map(|i| format!("\"f{i}\":{i}")).collect();
        let big = format!("{{{}}}", fields.join(","));
        let p = m
            .map(Format::Json, "t", big.as_bytes(), 0, &[])
            .unwrap_or_default();
        assert_eq!(p.readings.len(), 400);
        assert_eq!(m.series.readings_hint, intern::MAX_READINGS_HINT);
    }

    #[test]
    fn topic_tags_merge_and_payload_tags_win() {
        let mut m = Mapper::new(PayloadConfig::default());
        let p = m
            .map(
                Format::Influx,
                "t",
                b"m,site=ham v=1",
                0,
                &tags(&[("site", "muc"), ("line", "3")]),
            )
            .unwrap_or_default();
        assert_eq!(
            p.readings[0].series.tags,
            tags(&[("line", "3"), ("site", "ham")])
        );
    }

    #[test]
    fn a_series_over_the_limits_is_skipped_before_it_is_cached_and_a_repeated_topic_tag_keeps_its_first_value(
    ) {
        let mut m = Mapper::new(PayloadConfig::default());
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let e = m
            .map(
                Format::Json,
                "t",
                format!("{{\"{long}\": 1}}").as_bytes(),
                0,
                &[],
            )
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.reason(), "too_long");
        assert_eq!(m.series.cached(), 0);
        let p = m
            .map(
                Format::Json,
                "t",
                br#"{"v": 1}"#,
                0,
                &topic_tags("{site}/{site}/+", "muc/ham/dev1"),
            )
            .unwrap_or_default();
        assert_eq!(p.readings[0].series.tags, tags(&[("site", "ham")]));
    }

    #[test]
    fn a_topic_tag_over_the_wire_limits_is_refused_not_sealed() {
        let mut m = Mapper::new(PayloadConfig::default());
        let long = "x".repeat(MAX_TAG_VALUE_BYTES + 1);
        let e = m
            .map(
                Format::Json,
                "t",
                br#"{"a": 1, "b": 2}"#,
                0,
                &tags(&[("site", &long)]),
            )
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.reason(), "too_long");
    }
}

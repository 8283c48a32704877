//! SNS notifications: every alarm event landed is published to the `[alarms.sns]` topic, once.
//!
//! # Deduplication
//! An event is identified by `(agent_id, batch_epoch, rule, rule_seq)` and its content: a buffer file restored
//! from a backup, or cloned onto another box, numbers *other* events with identities already used, and those
//! must be notified too. Its **marker**, the object
//! `_notified/<agent>/<epoch hex>/<rule>/<rule_seq, 20 digits>-<content hash, 16 hex>` in the alarm table's
//! location (S3 or a local directory; outside the table), holding SNS's message id, records that SNS accepted
//! it. For each event of a landed alarm record the notifier reads
//! the marker; if it exists the event is skipped, else it is published (retried until SNS accepts it) and then
//! the marker is written (retried until durable). The shard's checkpoint moves only after that, like any sink.
//!
//! The markers live beside the data, not in the process, so they hold across restarts, `kill -9`, lease
//! handovers and other processes: a replay from the checkpoint, an agent's resend and a record read by a second
//! process all find the marker and notify nobody. What they cannot cover is the time **between SNS accepting
//! the message and the marker being written**: a process that dies there, a lease lost to a paused process (both
//! holders may publish) and a lost answer to an accepted `Publish` (retried) publish the event again. So delivery
//! to SNS is at least once; every message carries its identity (the `event_id` attribute) so a subscriber can
//! drop such a repeat. Publishing is never skipped for an event whose marker is missing: a crash never loses a
//! notification. Markers must outlive any replay: the stack's bucket expires them after 400 days, longer than
//! Kinesis's longest retention (365 days).
//!
//! The content hash is over the alarm body encoding of wire format v1 ([`content_hash`], pinned by a test): a
//! change of that encoding must keep hashing the v1 bytes, or markers written before it no longer match.
//!
//! # Message
//! Body: JSON ([`message`]), at most [`MAX_BODY_BYTES`] ([`body`] shortens a long string cause, then drops the
//! tags). Attributes for subscription filter policies: `rule`, `level` (the level entered), `from_level`,
//! `severity` (Number), `device`, `series`, `agent`, `event_id`; an attribute with an empty value (`device` of the
//! key `/temp`) is left out, and characters SNS/SQS do not carry in attributes (controls other than tab and line
//! ends) become U+FFFD. With that, every event decoded from the wire is a valid Publish; SNS refusing one anyway
//! is retried slowly with `/health` failing, like any permanent error of a sink.

use super::config::SnsConfig;
use crate::land::retry::SinkMonitor;
use crate::land::{Origin, Sink, SinkError, SinkFuture};
use crate::metrics::CloudMetrics;
use crate::store::{segment, Store};
use aws_sdk_sns::types::MessageAttributeValue;
use fieldlink_ops::aws_error::CallError;
use fieldlink_proto::alarm::{AlarmBatch, AlarmEvent};
use fieldlink_proto::{Batch, Value};
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The sink's name in logs, metrics and `/health`.
pub const NAME: &str = "sns";

/// At most this many bytes of JSON body (SNS allows 256 KiB for body and attributes together).
pub const MAX_BODY_BYTES: usize = 200 * 1024;

/// A string cause longer than this is cut (at a character boundary) when the body would be too long.
const SHORT_CAUSE_BYTES: usize = 1024;

/// A stable 64-bit hash of an event's content (FNV-1a over its wire encoding): the same event read again, from
/// any record or process, hashes the same; another event given the same identity does not.
pub fn content_hash(event: &AlarmEvent) -> u64 {
    let mut bytes = Vec::new();
    // An event decoded from the wire always encodes (the decoder enforces the encoder's limits); were it not to,
    // the hash covers the bytes written before the error, still the same for the same event.
    let _ = fieldlink_proto::alarm::encode_alarm_body(std::slice::from_ref(event), &mut bytes);
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The identity of an event with its content hash: `<agent>/<epoch, 16 hex digits>/<rule>/<rule_seq>-<hash, 16
/// hex digits>`. Two messages with one `event_id` are one event.
pub fn event_id(agent: &str, epoch: u64, event: &AlarmEvent) -> String {
    format!(
        "{}/{epoch:016x}/{}/{}-{:016x}",
        segment(agent),
        segment(&event.rule),
        event.rule_seq,
        content_hash(event)
    )
}

/// The marker key of an event (zero-padded sequence, so a listing is in order).
pub fn marker_key(agent: &str, epoch: u64, event: &AlarmEvent) -> String {
    format!(
        "_notified/{}/{epoch:016x}/{}/{:020}-{:016x}",
        segment(agent),
        segment(&event.rule),
        event.rule_seq,
        content_hash(event)
    )
}

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::F64(x) if x.is_finite() => json!(x),
        Value::F64(_) => serde_json::Value::Null,
        Value::I64(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::Str(x) => json!(x),
    }
}

/// The message body of an event. Pure.
pub fn message(agent: &str, epoch: u64, batch_seq: u64, e: &AlarmEvent) -> serde_json::Value {
    let tags: serde_json::Map<String, serde_json::Value> = e
        .series
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "event_id": event_id(agent, epoch, e),
        "agent_id": agent,
        "batch_epoch": format!("{epoch:016x}"),
        "batch_seq": batch_seq,
        "rule": e.rule,
        "rule_seq": e.rule_seq,
        "series": e.series.key,
        "device": e.series.device(),
        "measure": e.series.measure(),
        "tags": tags,
        "from": {"level": e.from.name, "severity": e.from.severity},
        "to": {"level": e.to.name, "severity": e.to.severity},
        "time_ms": e.ts_ms,
        "cause": e.cause.as_ref().map(|c| json!({
            "time_ms": c.ts_ms,
            "value": value_json(&c.value),
            "quality": c.quality.as_str(),
        })),
    })
}

/// The JSON body of an event, at most [`MAX_BODY_BYTES`]: if [`message`] is longer (a string cause of up to 64 KiB
/// and 64 tags of up to 1.3 KiB each, JSON-escaped, can reach several hundred KiB), a string cause is cut to 1 KiB
/// (`"cause_truncated": true`), then the tags are dropped (`"tags_truncated": true`). Pure.
pub fn body(agent: &str, epoch: u64, batch_seq: u64, e: &AlarmEvent) -> String {
    let mut m = message(agent, epoch, batch_seq, e);
    let mut text = m.to_string();
    if text.len() > MAX_BODY_BYTES {
        if let Some(Value::Str(s)) = e.cause.as_ref().map(|c| &c.value) {
            let mut end = s.len().min(SHORT_CAUSE_BYTES);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            if end < s.len() {
                m["cause"]["value"] = json!(&s[..end]);
                m["cause_truncated"] = json!(true);
                text = m.to_string();
            }
        }
    }
    if text.len() > MAX_BODY_BYTES {
        m["tags"] = json!({});
        m["tags_truncated"] = json!(true);
        text = m.to_string();
    }
    text
}

/// `s` with the characters SNS and SQS refuse in attribute values (controls other than tab, LF and CR, and the
/// non-characters U+FFFE/U+FFFF) replaced by U+FFFD.
fn attribute_text(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if c < ' ' || c == '\u{fffe}' || c == '\u{ffff}' => '\u{fffd}',
            c => c,
        })
        .collect()
}

/// The message attributes of an event, `(name, data type, value)`. Pure. SNS refuses empty values, so an attribute
/// that would be empty (`device` of a key without `/` before its measure) is left out.
pub fn attributes(
    agent: &str,
    epoch: u64,
    e: &AlarmEvent,
) -> Vec<(&'static str, &'static str, String)> {
    let all = vec![
        ("rule", "String", e.rule.clone()),
        ("level", "String", e.to.name.clone()),
        ("from_level", "String", e.from.name.clone()),
        ("severity", "Number", e.to.severity.to_string()),
        ("device", "String", e.series.device().to_owned()),
        ("series", "String", e.series.key.clone()),
        ("agent", "String", agent.to_owned()),
        ("event_id", "String", event_id(agent, epoch, e)),
    ];
    all.into_iter()
        .filter(|a| !a.2.is_empty())
        .map(|(name, data_type, value)| (name, data_type, attribute_text(&value)))
        .collect()
}

/// The notifier of one shard worker.
#[derive(Debug)]
pub struct SnsSink {
    client: aws_sdk_sns::Client,
    cfg: SnsConfig,
    markers: Store,
    metrics: CloudMetrics,
    monitor: SinkMonitor,
    cancel: CancellationToken,
}

impl SnsSink {
    /// A notifier publishing to `cfg.topic_arn` with markers in `markers` (the alarm table's store).
    pub fn new(
        client: aws_sdk_sns::Client,
        cfg: SnsConfig,
        markers: Store,
        metrics: CloudMetrics,
        monitor: SinkMonitor,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            client,
            cfg,
            markers,
            metrics,
            monitor,
            cancel,
        }
    }

    /// `op` until it succeeds, each attempt bounded by `timeout_ms`, failures retried with backoff (transient) or
    /// slowly with `/health` failing (permanent). `Err`: the worker is stopping.
    async fn until_done<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, SinkError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, CallError>>,
    {
        let mut retry = self.monitor.retry(
            &self.cancel,
            Duration::from_millis(self.cfg.backoff_initial_ms),
            Duration::from_millis(self.cfg.backoff_max_ms),
        );
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        loop {
            let result = match tokio::time::timeout(timeout, f()).await {
                Ok(r) => r,
                Err(_) => Err(CallError::of_transport(
                    true,
                    &format!("no answer within {} ms", self.cfg.timeout_ms),
                )),
            };
            match result {
                Ok(v) => {
                    retry.succeeded();
                    return Ok(v);
                }
                Err(e) => retry.failed(op, &e).await.map_err(|_| SinkError {
                    sink: NAME,
                    message: format!("{op}: stopped while retrying: {}", e.sentence(op)),
                })?,
            }
        }
    }

    async fn publish(
        &self,
        agent: &str,
        epoch: u64,
        seq: u64,
        e: &AlarmEvent,
    ) -> Result<String, CallError> {
        let mut req = self
            .client
            .publish()
            .topic_arn(&self.cfg.topic_arn)
            .message(body(agent, epoch, seq, e));
        for (name, data_type, value) in attributes(agent, epoch, e) {
            let attr = MessageAttributeValue::builder()
                .data_type(data_type)
                .string_value(value)
                .build()
                .map_err(|b| CallError::of_transport(false, &b.to_string()))?;
            req = req.message_attributes(name, attr);
        }
        let out = req.send().await.map_err(|e| CallError::of_sdk(&e))?;
        Ok(out.message_id.unwrap_or_default())
    }

    async fn notify(&mut self, batch: &AlarmBatch) -> Result<(), SinkError> {
        for e in &batch.events {
            let key = marker_key(&batch.agent_id, batch.epoch, e);
            let seen = self
                .until_done("GetObject (SNS marker)", || async {
                    self.markers.get(&key).await.map_err(|e| e.call_error())
                })
                .await?;
            if seen.is_some() {
                self.metrics.alarm_notifications("skipped").inc();
                tracing::debug!(event = %event_id(&batch.agent_id, batch.epoch, e), "alarm event notified before; not published again");
                continue;
            }
            let id = self
                .until_done("Publish", || {
                    self.publish(&batch.agent_id, batch.epoch, batch.seq, e)
                })
                .await?;
            self.until_done("PutObject (SNS marker)", || async {
                self.markers
                    .put(&key, id.clone().into_bytes())
                    .await
                    .map_err(|e| e.call_error())
            })
            .await?;
            self.metrics.alarm_notifications("published").inc();
            tracing::info!(event = %event_id(&batch.agent_id, batch.epoch, e), level = %e.to.name, message_id = %id, "alarm event published to SNS");
        }
        Ok(())
    }
}

impl Sink for SnsSink {
    fn name(&self) -> &'static str {
        NAME
    }
    fn takes_alarms(&self) -> bool {
        true
    }
    fn write<'a>(&'a mut self, _batch: &'a Batch, _origin: &'a Origin) -> SinkFuture<'a> {
        Box::pin(async { Ok(()) })
    }
    fn write_alarms<'a>(
        &'a mut self,
        batch: &'a AlarmBatch,
        _origin: &'a Origin,
    ) -> SinkFuture<'a> {
        Box::pin(self.notify(batch))
    }
    fn commit<'a>(&'a mut self, _first: &'a Origin) -> SinkFuture<'a> {
        Box::pin(async { Ok(()) })
    }
    fn discard(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldlink_proto::alarm::{Cause, Level};
    use fieldlink_proto::{Quality, Series};

    fn event() -> AlarmEvent {
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
                ts_ms: 1_772_431_199_000,
                value: Value::F64(f64::NAN),
                quality: Quality::Good,
            }),
        }
    }

    #[test]
    fn the_identity_and_marker_keep_any_agent_id_in_one_segment() {
        let e = event();
        let h = format!("{:016x}", content_hash(&e));
        assert_eq!(
            event_id("edge-1", 0x0102, &e),
            format!("edge-1/0000000000000102/arm-vibration/7-{h}")
        );
        assert_eq!(
            marker_key("a/b c", 1, &e),
            format!("_notified/a%2Fb%20c/0000000000000001/arm-vibration/00000000000000000007-{h}")
        );
        assert_eq!(segment(".."), "%2E%2E", "no parent directory");
        assert_eq!(segment("."), "%2E");
        assert_eq!(segment(""), "%");
        assert_eq!(segment("a.b"), "a.b");
    }

    #[test]
    fn the_content_hash_is_pinned() {
        // Markers already written name this hash: a change of the alarm body encoding must not change it.
        assert_eq!(content_hash(&event()), PINNED_HASH);
    }

    /// `content_hash(&event())` as first released.
    const PINNED_HASH: u64 = 0xeae2_31da_a07c_186f;

    #[test]
    fn another_event_with_the_same_identity_has_another_marker_and_the_same_event_the_same() {
        // A buffer file restored from a backup numbers a new event like one already notified.
        let e = event();
        let mut other = event();
        other.to.name = "warning".into();
        other.to.severity = 1;
        assert_ne!(marker_key("edge-1", 1, &e), marker_key("edge-1", 1, &other));
        assert_ne!(event_id("edge-1", 1, &e), event_id("edge-1", 1, &other));
        assert_eq!(
            marker_key("edge-1", 1, &e),
            marker_key("edge-1", 1, &event())
        );
    }

    #[test]
    fn no_attribute_is_empty_or_carries_a_control_character() {
        let mut e = event();
        e.series.key = "/te\u{1}mp".into();
        let a = attributes("edge-1", 5, &e);
        assert!(a.iter().all(|x| x.0 != "device"), "{a:?}");
        assert!(a.iter().all(|x| !x.2.is_empty()));
        let series = a.iter().find(|x| x.0 == "series").unwrap();
        assert_eq!(series.2, "/te\u{fffd}mp");
    }

    #[test]
    fn the_longest_event_the_wire_allows_fits_one_message() {
        let mut e = event();
        e.series.tags = (0..fieldlink_proto::limits::MAX_TAGS)
            .map(|i| (format!("{i:0>255}"), "\u{1}".repeat(1024)))
            .collect();
        let long = "\u{1}".repeat(fieldlink_proto::limits::MAX_STRING_BYTES);
        e.cause.as_mut().unwrap().value = Value::Str(long);
        assert!(message("edge-1", 5, 42, &e).to_string().len() > 700_000);
        let b = body("edge-1", 5, 42, &e);
        assert!(b.len() <= MAX_BODY_BYTES, "{} bytes", b.len());
        let m: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(m["cause_truncated"], true);
        assert_eq!(m["tags_truncated"], true);
        assert_eq!(m["cause"]["value"].as_str().unwrap().len(), 1024);
        // A short event is sent whole.
        let short = body("edge-1", 5, 42, &event());
        assert_eq!(short, message("edge-1", 5, 42, &event()).to_string());
    }

    #[test]
    fn the_message_carries_every_field_and_the_attributes_name_rule_level_device_and_agent() {
        let e = event();
        let m = message("edge-1", 5, 42, &e);
        assert_eq!(m["rule"], "arm-vibration");
        assert_eq!(m["to"]["level"], "critical");
        assert_eq!(m["device"], "line3/robot-imu-b/000");
        assert_eq!(m["tags"]["site"], "muc");
        assert_eq!(m["batch_seq"], 42);
        assert_eq!(m["cause"]["value"], serde_json::Value::Null, "NaN is null");
        let a = attributes("edge-1", 5, &e);
        let get = |n: &str| {
            a.iter()
                .find(|x| x.0 == n)
                .map(|x| x.2.clone())
                .unwrap_or_default()
        };
        assert_eq!(get("level"), "critical");
        assert_eq!(get("severity"), "2");
        assert_eq!(get("device"), "line3/robot-imu-b/000");
        assert_eq!(get("agent"), "edge-1");
        assert!(a.len() <= 10, "SNS allows 10 attributes");
        assert!(a.iter().all(|x| !x.2.is_empty()));
    }
}

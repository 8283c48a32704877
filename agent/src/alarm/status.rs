//! The local status of alarm rules: the newest state of each `(rule, series)` pair, as a retained MQTT message
//! for an HMI, a stack light or a PLC on site.
//!
//! The buffer thread posts a status after the transition that produced it is committed; the MQTT connection named
//! by `[alarms] publish_connection` takes what is posted and publishes it (QoS 1, retained) on
//! `<topic_prefix>/<rule>/<series key>`. The board holds one payload per topic, so it is bounded by the number
//! of pairs and the newest state wins: posting never blocks sealing, whatever the broker does. A status that
//! could not be queued to the client goes back on the board unless a newer one came meanwhile. At start the
//! agent posts the committed state of every pair it knows, so a broker that lost its retained messages gets them
//! back.

use fieldlink_proto::alarm::Cause;
use fieldlink_proto::{Series, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Newest status payload per topic, shared by the buffer thread (posts) and one MQTT connection (publishes).
#[derive(Debug, Clone, Default)]
pub struct StatusBoard {
    topics: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    posted: Arc<Notify>,
}

impl StatusBoard {
    /// An empty board.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the topic's status and wakes the publisher.
    pub fn post(&self, topic: String, payload: Vec<u8>) {
        self.topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic, payload);
        self.posted.notify_one();
    }

    /// Takes every status posted since the last call.
    pub fn take(&self) -> Vec<(String, Vec<u8>)> {
        std::mem::take(&mut *self.topics.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect()
    }

    /// Puts back a status that could not be published, unless a newer one was posted meanwhile.
    pub fn put_back(&self, topic: String, payload: Vec<u8>) {
        self.topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(topic)
            .or_insert(payload);
    }

    /// Wakes the publisher (to try statuses put back again).
    pub fn wake(&self) {
        self.posted.notify_one();
    }

    /// Statuses waiting.
    pub fn len(&self) -> usize {
        self.topics.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when something was posted (at once if something was posted since the last wait).
    pub async fn posted(&self) {
        self.posted.notified().await;
    }
}

/// The status topic of a rule on a series.
pub fn topic(prefix: &str, rule: &str, series: &Series) -> String {
    format!("{prefix}/{rule}/{}", series.key)
}

/// A status message: `{"rule", "series", "tags", "level", "severity", "since_ms", "seq", "value", "quality"}`
/// (`seq` the rule's sequence number of the transition into this level, 0 if none was seen by this process;
/// `value` and `quality` those of the reading that caused it, absent for a stale alarm).
pub fn payload(
    rule: &str,
    series: &Series,
    severity: u8,
    level: &str,
    since_ms: i64,
    seq: u64,
    cause: Option<&Cause>,
) -> Vec<u8> {
    let tags: serde_json::Map<String, serde_json::Value> = series
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let mut o = serde_json::json!({
        "rule": rule,
        "series": series.key,
        "tags": tags,
        "level": level,
        "severity": severity,
        "since_ms": since_ms,
        "seq": seq,
    });
    if let Some(c) = cause {
        o["value"] = match &c.value {
            Value::F64(f) => serde_json::json!(f),
            Value::I64(i) => serde_json::json!(i),
            Value::Bool(b) => serde_json::json!(b),
            Value::Str(s) => serde_json::json!(s),
        };
        o["quality"] = serde_json::json!(c.quality.as_str());
    }
    o.to_string().into_bytes()
}

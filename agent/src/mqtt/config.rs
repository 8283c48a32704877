use serde::Deserialize;

/// A secret (password): never printed, in logs or in `Debug` output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// One topic subscription.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// MQTT topic filter, e.g. `plant/+/+` or `sensors/#`.
    pub filter: String,
    /// Extract tags from topic levels: a pattern with one entry per level, `{name}` capturing that level into tag
    /// `name`, `+` or a literal for the rest, e.g. `site/{site}/line/{line}/+` on `site/muc/line/3/pump-7` gives
    /// `site=muc, line=3`. The series key stays as the format makes it. A message takes the format and the
    /// pattern of the first subscription whose filter matches its topic; a topic the pattern does not fit gets no
    /// tags.
    #[serde(default)]
    pub tags_from_topic: Option<String>,
    /// Subscription QoS: 0, 1 (default) or 2. With QoS 1 and 2 the agent acknowledges a message only after its
    /// readings are committed to the buffer.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Payload format of the messages on this subscription: `json` (default; a JSON object or a bare JSON
    /// scalar), `influx` (InfluxDB line protocol) or `sparkplug_b` (Sparkplug B protobuf on `spBv1.0/...` topics).
    #[serde(default)]
    pub format: Format,
}

/// A payload format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// A JSON object (fields → readings) or a bare JSON number, boolean or string.
    #[default]
    Json,
    /// InfluxDB line protocol, one or more lines.
    Influx,
    /// Sparkplug B.
    SparkplugB,
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum Protocol {
    /// MQTT 3.1.1.
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

fn default_qos() -> u8 {
    1
}

/// How a payload becomes readings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// JSON field holding the event time; absent from a payload means "arrival time". Default `ts`.
    #[serde(default = "default_ts_field")]
    pub timestamp_field: String,
    /// Unit of that field: `ms` (default), `s`, `us` or `ns` for numbers, `rfc3339` for date-time strings.
    #[serde(default)]
    pub timestamp_unit: TimeUnit,
    /// Timestamps before this (Unix ms) are refused as `bad_timestamp`. Default 946684800000 (2000-01-01).
    #[serde(default = "default_min_ts")]
    pub min_timestamp_ms: i64,
    /// Timestamps more than this ahead of the agent's clock are refused as `bad_timestamp`, milliseconds.
    /// Default 86400000 (one day).
    #[serde(default = "default_max_future")]
    pub max_future_ms: i64,
    /// Payloads larger than this are refused (counted as `too_large`). Default 262144 (256 KiB). Packets over this
    /// plus 64 KiB are not read at all: with MQTT 5 the broker does not send them; with 3.1.1 such a packet fails
    /// the connection, so set the broker's `message_size_limit` to at most this.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// JSON only: keep only these fields (paths as in series names, `a/b` for `{"a":{"b":..}}`; a path keeps
    /// everything under it). Empty (default) keeps all.
    #[serde(default)]
    pub include: Vec<String>,
    /// JSON only: drop these fields (same paths; applied after `include`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Unit of InfluxDB line-protocol timestamps: `ns` (default, as InfluxDB), `us`, `ms` or `s`.
    #[serde(default = "default_influx_unit")]
    pub influx_timestamp_unit: TimeUnit,
    /// Sparkplug B metrics remembered per connection (names, aliases, last values for stale marking). A birth
    /// that would exceed it is refused as `sparkplug_limit`. Default 100000.
    #[serde(default = "default_sparkplug_metrics")]
    pub max_sparkplug_metrics: usize,
    /// Sparkplug B: ask an edge node to rebirth (publish an NCMD `Node Control/Rebirth`) when its data cannot be
    /// mapped fully — no NBIRTH seen since the agent connected, an unknown alias, a sequence gap — at most once
    /// per this many ms per edge node. 0 never asks (when another host application is in charge of rebirths, or
    /// the broker's ACL forbids publishing). Default 10000.
    #[serde(default = "default_rebirth_ms")]
    pub sparkplug_rebirth_ms: u64,
}

fn default_influx_unit() -> TimeUnit {
    TimeUnit::Ns
}
fn default_sparkplug_metrics() -> usize {
    100_000
}
fn default_rebirth_ms() -> u64 {
    10_000
}

fn default_ts_field() -> String {
    "ts".into()
}
fn default_min_ts() -> i64 {
    946_684_800_000
}
fn default_max_future() -> i64 {
    86_400_000
}
fn default_max_payload() -> usize {
    256 * 1024
}

impl Default for PayloadConfig {
    fn default() -> Self {
        Self {
            timestamp_field: default_ts_field(),
            timestamp_unit: TimeUnit::Ms,
            min_timestamp_ms: default_min_ts(),
            max_future_ms: default_max_future(),
            max_payload_bytes: default_max_payload(),
            include: Vec::new(),
            exclude: Vec::new(),
            influx_timestamp_unit: default_influx_unit(),
            max_sparkplug_metrics: default_sparkplug_metrics(),
            sparkplug_rebirth_ms: default_rebirth_ms(),
        }
    }
}

/// A timestamp unit.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    /// Seconds (fractions allowed).
    S,
    /// Milliseconds.
    #[default]
    Ms,
    /// Microseconds.
    Us,
    /// Nanoseconds.
    Ns,
    /// An RFC 3339 string, e.g. `2026-03-02T06:00:00.250Z` or `2026-03-02T07:00:00+01:00` (JSON only).
    Rfc3339,
}

/// One MQTT broker connection (`[[mqtt]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Name of this connection in logs and metrics.
    pub name: String,
    /// Broker host name or address.
    pub host: String,
    /// MQTT protocol version: `"3.1.1"` (default) or `"5"`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Broker port. Default 1883, or 8883 with `[mqtt.tls]`.
    #[serde(default)]
    pub port: Option<u16>,
    /// MQTT client id. Default `fieldlink-<agent_id>-<name>`. Must be stable for persistent sessions.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name (optional).
    #[serde(default)]
    pub username: Option<String>,
    /// Password. Prefer `password_env`; either way it is never logged.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Name of an environment variable holding the password (keeps it out of the file).
    #[serde(default)]
    pub password_env: Option<String>,
    /// Start a clean session on connect. Default `false`: the broker keeps the session and queues QoS 1/2
    /// messages while the agent is away.
    #[serde(default)]
    pub clean_session: bool,
    /// MQTT 5 only: how long the broker keeps the session (subscriptions and queued messages) after the
    /// connection drops, seconds. Default 604800 (a week). Ignored with `clean_session`.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_s: u32,
    /// Keep-alive interval, seconds. Default 30.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// Unacknowledged incoming QoS 1/2 messages the broker may have in flight. Default 100.
    #[serde(default = "default_inflight")]
    pub max_inflight: u16,
    /// Subscriptions.
    pub topics: Vec<TopicConfig>,
    /// Payload mapping.
    #[serde(default)]
    pub payload: PayloadConfig,
    /// TLS (`[mqtt.tls]`); absent = plain TCP.
    #[serde(default)]
    pub tls: Option<super::tls::TlsConfig>,
}

fn default_session_expiry() -> u32 {
    604_800
}
fn default_keep_alive() -> u64 {
    30
}
fn default_inflight() -> u16 {
    100
}

impl MqttConfig {
    /// The broker port: as configured, else 8883 with TLS and 1883 without.
    pub fn port(&self) -> u16 {
        self.port
            .unwrap_or(if self.tls.is_some() { 8883 } else { 1883 })
    }

    /// Problems with this connection, prefixed by `path`.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.name.is_empty() {
            p.push(format!("{path}.name: must not be empty"));
        }
        if self.host.is_empty() {
            p.push(format!("{path}.host: must not be empty"));
        }
        if self.keep_alive_s < 5 || self.keep_alive_s > 3600 {
            p.push(format!(
                "{path}.keep_alive_s: must be 5..=3600, got {}",
                self.keep_alive_s
            ));
        }
        if self.max_inflight == 0 {
            p.push(format!("{path}.max_inflight: must be at least 1"));
        }
        if self.password.is_some() && self.password_env.is_some() {
            p.push(format!(
                "{path}.password: set password or password_env, not both"
            ));
        }
        if (self.password.is_some() || self.password_env.is_some()) && self.username.is_none() {
            p.push(format!("{path}.username: required with a password"));
        }
        if self.topics.is_empty() {
            p.push(format!("{path}.topics: at least one topic is required"));
        }
        for (i, t) in self.topics.iter().enumerate() {
            if t.qos > 2 {
                p.push(format!(
                    "{path}.topics[{i}].qos: must be 0, 1 or 2, got {}",
                    t.qos
                ));
            }
            if let Some(problem) = subscription_problem(&t.filter) {
                p.push(format!("{path}.topics[{i}].filter: {problem}"));
            }
            if let Some(pattern) = &t.tags_from_topic {
                if pattern
                    .split('/')
                    .any(|l| l.starts_with('{') != l.ends_with('}') || l == "{}")
                {
                    p.push(format!("{path}.topics[{i}].tags_from_topic: levels are {{name}}, + or literals, got {pattern:?}"));
                }
            }
        }
        if self.payload.max_payload_bytes == 0 || self.payload.max_payload_bytes > 64 * 1024 * 1024
        {
            p.push(format!(
                "{path}.payload.max_payload_bytes: must be 1..=67108864, got {}",
                self.payload.max_payload_bytes
            ));
        }
        if let Some(t) = &self.tls {
            if let Err(e) = super::tls::client_config(t) {
                p.push(format!("{path}.tls: {e}"));
            }
        }
        for (name, paths) in [
            ("include", &self.payload.include),
            ("exclude", &self.payload.exclude),
        ] {
            for (i, f) in paths.iter().enumerate() {
                if f.is_empty() || f.starts_with('/') || f.ends_with('/') {
                    p.push(format!(
                        "{path}.payload.{name}[{i}]: a field path like \"a\" or \"a/b\", got {f:?}"
                    ));
                }
            }
        }
        if self.payload.influx_timestamp_unit == TimeUnit::Rfc3339 {
            p.push(format!(
                "{path}.payload.influx_timestamp_unit: line-protocol timestamps are integers: s, ms, us or ns"
            ));
        }
        if self.payload.max_sparkplug_metrics < 3 {
            p.push(format!(
                "{path}.payload.max_sparkplug_metrics: must be at least 3 (a node, its unit and one metric)"
            ));
        }
        if self.payload.timestamp_field.is_empty() {
            p.push(format!("{path}.payload.timestamp_field: must not be empty"));
        }
        p
    }
}

/// The topic filter of a subscription: a shared subscription's (`$share/<group>/<filter>`, MQTT 5 and Mosquitto's
/// 3.1.1; `$queue/<filter>`, EMQX) without its prefix. The broker delivers its messages under their own topics, so
/// this is what a message's topic is matched against.
pub(crate) fn topic_filter(subscription: &str) -> &str {
    if let Some(rest) = subscription.strip_prefix("$share/") {
        return rest.split_once('/').map_or("", |(_, filter)| filter);
    }
    subscription.strip_prefix("$queue/").unwrap_or(subscription)
}

/// Checks a subscription's filter: a shared subscription's group, then the filter's wildcards.
fn subscription_problem(subscription: &str) -> Option<String> {
    if let Some(rest) = subscription.strip_prefix("$share/") {
        let group = rest.split('/').next().unwrap_or_default();
        if group.is_empty() || group.contains(['+', '#']) || !rest.contains('/') {
            return Some(format!(
                "a shared subscription is $share/<group>/<filter>, with a group of no wildcards, got {subscription:?}"
            ));
        }
    }
    filter_problem(topic_filter(subscription))
}

/// Checks an MQTT topic filter's wildcards (MQTT 3.1.1 section 4.7).
pub(crate) fn filter_problem(filter: &str) -> Option<String> {
    if filter.is_empty() {
        return Some("must not be empty".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return Some(format!("'#' must be a whole last level in {filter:?}"));
        }
        if l.contains('+') && *l != "+" {
            return Some(format!("'+' must be a whole level in {filter:?}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{filter_problem, subscription_problem, topic_filter};

    #[test]
    fn shared_subscriptions_match_on_their_filter() {
        assert_eq!(topic_filter("$share/fleet/spBv1.0/#"), "spBv1.0/#");
        assert_eq!(topic_filter("$queue/plant/+/power"), "plant/+/power");
        assert_eq!(topic_filter("plant/#"), "plant/#");
        for ok in ["$share/g/a/#", "$queue/a/+", "$share/g/#"] {
            assert_eq!(subscription_problem(ok), None, "{ok}");
        }
        for bad in [
            "$share/g",
            "$share//a",
            "$share/+/a",
            "$share/g/",
            "$share/g/a/#/b",
        ] {
            assert!(subscription_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn topic_filters_follow_mqtt_wildcard_rules() {
        for ok in ["a/b", "a/+/c", "a/#", "#", "+"] {
            assert_eq!(filter_problem(ok), None, "{ok}");
        }
        for bad in ["", "a/#/c", "a/b#", "a+/b"] {
            assert!(filter_problem(bad).is_some(), "{bad}");
        }
    }
}

use serde::Deserialize;

/// One topic subscription.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// MQTT topic filter, e.g. `plant/+/+` or `sensors/#`.
    pub filter: String,
    /// Subscription QoS: 0, 1 (default) or 2. With QoS 1 and 2 the agent acknowledges a message only after its
    /// readings are committed to the buffer.
    #[serde(default = "default_qos")]
    pub qos: u8,
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
    /// Unit of that field: `ms` (default), `s`, `us` or `ns`.
    #[serde(default)]
    pub timestamp_unit: TimeUnit,
    /// Payloads larger than this are refused (counted as `too_large`). Default 262144 (256 KiB).
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
}

fn default_ts_field() -> String {
    "ts".into()
}
fn default_max_payload() -> usize {
    256 * 1024
}

impl Default for PayloadConfig {
    fn default() -> Self {
        Self {
            timestamp_field: default_ts_field(),
            timestamp_unit: TimeUnit::Ms,
            max_payload_bytes: default_max_payload(),
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
}

/// One MQTT broker connection (`[[mqtt]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Name of this connection in logs and metrics.
    pub name: String,
    /// Broker host name or address.
    pub host: String,
    /// Broker port. Default 1883.
    #[serde(default = "default_port")]
    pub port: u16,
    /// MQTT client id. Default `fieldlink-<agent_id>-<name>`. Must be stable for persistent sessions.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Start a clean session on connect. Default `false`: the broker keeps the session and queues QoS 1/2
    /// messages while the agent is away.
    #[serde(default)]
    pub clean_session: bool,
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
}

fn default_port() -> u16 {
    1883
}
fn default_keep_alive() -> u64 {
    30
}
fn default_inflight() -> u16 {
    100
}

impl MqttConfig {
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
            if let Some(problem) = filter_problem(&t.filter) {
                p.push(format!("{path}.topics[{i}].filter: {problem}"));
            }
        }
        if self.payload.max_payload_bytes == 0 || self.payload.max_payload_bytes > 64 * 1024 * 1024
        {
            p.push(format!(
                "{path}.payload.max_payload_bytes: must be 1..=67108864, got {}",
                self.payload.max_payload_bytes
            ));
        }
        if self.payload.timestamp_field.is_empty() {
            p.push(format!("{path}.payload.timestamp_field: must not be empty"));
        }
        p
    }
}

/// Checks an MQTT topic filter's wildcards (MQTT 3.1.1 section 4.7).
fn filter_problem(filter: &str) -> Option<String> {
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
    use super::filter_problem;

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

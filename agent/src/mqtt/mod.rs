//! MQTT source: one task per broker connection, MQTT 3.1.1 or 5 (`session.rs` wraps rumqttc's two clients).
//!
//! Messages are mapped to readings ([`payload`], with the format of the first subscription whose filter
//! matches) and queued to the buffer together with an acknowledgement callback; the buffer thread runs the
//! callback (which sends the PUBACK) only after the readings are committed. Manual acks are on, so the broker
//! redelivers anything the agent had not committed when it died. A payload that gives no reading is counted by
//! reason and queued to the buffer's bounded `refused` table through the same ordered path (so PUBACKs leave in
//! arrival order), and acknowledged after that commit: redelivering it would not make it parseable.
//!
//! Acknowledgements never block and are never dropped while their connection lasts: the buffer thread's callback only records
//! `(qos, packet id)` in this connection's [`AckQueue`] and wakes the connection task, which moves queued acks
//! into rumqttc's request channel between polls of the event loop (the loop drains that channel). A full
//! channel leaves the rest queued for the next turn. The queue holds at most one entry per unacknowledged
//! message, which the broker's in-flight window bounds.
//!
//! When the buffer queue is full the task stops polling the connection, the broker's in-flight window fills,
//! and the broker holds further messages: backpressure reaches the publisher without losing anything.

mod config;
pub mod payload;
mod session;
pub mod tls;

pub use config::{Format, MqttConfig, PayloadConfig, Protocol, Secret, TimeUnit, TopicConfig};

use crate::buffer::{AckFn, BufferHandle, Refused};
use fieldlink_ops::backoff::Backoff;
use fieldlink_ops::metrics::{Counter, Gauge, Health, Registry};
use payload::{Mapper, Skip};
use session::{Session, SessionEvent};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Per-connection metrics.
#[derive(Debug, Clone)]
struct ConnMetrics {
    connected: Gauge,
    messages: Counter,
    bytes: Counter,
    readings: Counter,
    skipped: Vec<(Skip, Counter)>,
    seq_gaps: Counter,
    rebirths: Counter,
    reconnects: Counter,
    acks: Counter,
    registry: Registry,
    name: String,
}

impl ConnMetrics {
    fn new(registry: &Registry, name: &str) -> Self {
        let l = [("connection", name)];
        Self {
            connected: registry.gauge(
                "fieldlink_mqtt_connected",
                "1 while the MQTT connection is up.",
                &l,
            ),
            messages: registry.counter(
                "fieldlink_mqtt_messages_total",
                "MQTT messages received.",
                &l,
            ),
            bytes: registry.counter(
                "fieldlink_mqtt_bytes_total",
                "MQTT payload bytes received.",
                &l,
            ),
            readings: registry.counter(
                "fieldlink_mqtt_readings_total",
                "Readings mapped from MQTT messages.",
                &l,
            ),
            skipped: Skip::ALL
                .iter()
                .map(|s| {
                    let c = registry.counter(
                        "fieldlink_mqtt_skipped_fields_total",
                        "Fields of accepted MQTT messages that gave no reading, by reason.",
                        &[("connection", name), ("reason", s.reason())],
                    );
                    (*s, c)
                })
                .collect(),
            seq_gaps: registry.counter(
                "fieldlink_mqtt_sparkplug_seq_gaps_total",
                "Sparkplug B messages whose sequence number was not the next one (messages lost upstream).",
                &l,
            ),
            rebirths: registry.counter(
                "fieldlink_mqtt_sparkplug_rebirth_requests_total",
                "Sparkplug B Rebirth requests (NCMD Node Control/Rebirth) published to edge nodes.",
                &l,
            ),
            reconnects: registry.counter(
                "fieldlink_mqtt_reconnects_total",
                "MQTT connection failures followed by a reconnect.",
                &l,
            ),
            acks: registry.counter(
                "fieldlink_mqtt_acks_total",
                "QoS 1/2 acknowledgements handed to the MQTT client after the durable commit.",
                &l,
            ),
            registry: registry.clone(),
            name: name.to_owned(),
        }
    }

    fn dead_letter(&self, reason: &str) -> Counter {
        self.registry.counter(
            "fieldlink_mqtt_dead_letters_total",
            "MQTT messages refused by the payload mapping, by reason (kept in the buffer's refused table).",
            &[("connection", &self.name), ("reason", reason)],
        )
    }

    fn skipped(&self, s: Skip) {
        if let Some((_, c)) = self.skipped.iter().find(|(k, _)| *k == s) {
            c.inc();
        }
    }
}

/// Acknowledgements waiting to be handed to the MQTT client, in commit order.
#[derive(Debug, Default)]
pub struct AckQueue {
    /// `(connection generation, qos, packet id)`.
    pending: Mutex<VecDeque<(u64, u8, u16)>>,
    ready: Notify,
}

impl AckQueue {
    /// Records a committed message's acknowledgement (called on the buffer thread; never blocks for long).
    /// `generation` is the connection the message arrived on.
    pub fn push(&self, generation: u64, qos: u8, pkid: u16) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((generation, qos, pkid));
        self.ready.notify_one();
    }

    /// Hands queued acknowledgements of connection `generation` to `send` until it refuses one (the client's
    /// request channel is full), and discards those of earlier connections: after a reconnect the broker may
    /// have given their packet ids to other messages, so acking them could acknowledge a message not yet
    /// committed. The broker redelivers the discarded ones; dedup drops the copies. Returns how many went.
    fn flush(&self, generation: u64, mut send: impl FnMut(u8, u16) -> bool) -> u64 {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut sent = 0;
        while let Some(&(g, qos, pkid)) = pending.front() {
            if g != generation {
                pending.pop_front();
                continue;
            }
            if !send(qos, pkid) {
                break;
            }
            pending.pop_front();
            sent += 1;
        }
        sent
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (lit, Some(level)) if lit == level => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// The password to connect with, if any.
fn credentials(cfg: &MqttConfig) -> Option<(String, String)> {
    let user = cfg.username.as_ref()?;
    let password = match (&cfg.password, &cfg.password_env) {
        (Some(p), _) => p.expose().to_owned(),
        (None, Some(var)) => std::env::var(var).unwrap_or_else(|_| {
            tracing::error!(connection = %cfg.name, variable = %var, "password_env is not set; connecting without a password");
            String::new()
        }),
        (None, None) => String::new(),
    };
    Some((user.clone(), password))
}

/// Runs one connection until `cancel` fires. Reconnects forever with capped, jittered backoff.
pub async fn run(
    cfg: MqttConfig,
    agent_id: String,
    buffer: BufferHandle,
    registry: Registry,
    health: Health,
    cancel: CancellationToken,
) {
    let m = ConnMetrics::new(&registry, &cfg.name);
    let component = format!("mqtt:{}", cfg.name);
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("fieldlink-{agent_id}-{}", cfg.name));
    let tls = match cfg.tls.as_ref().map(tls::client_config).transpose() {
        Ok(t) => t.map(|c| rumqttc::TlsConfiguration::Rustls(Arc::new(c))),
        Err(e) => {
            // Checked by `validate` before anything started; a file changed since then is reported here.
            tracing::error!(connection = %cfg.name, error = %e, "TLS configuration failed; connection not started");
            health.set(&component, false, format!("tls: {e}"));
            return;
        }
    };
    let mut session = Session::new(&cfg, client_id, credentials(&cfg), tls);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let acks = Arc::new(AckQueue::default());
    let mut mapper = Mapper::new(cfg.payload.clone());
    let mut generation = 0u64;
    health.set(&component, false, "connecting");

    loop {
        m.acks
            .add(acks.flush(generation, |q, id| session.try_ack(q, id)));
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = acks.ready.notified() => continue,
            ev = session.poll() => ev,
        };
        match event {
            Ok(SessionEvent::Connected { session_present }) => {
                generation += 1;
                backoff.reset();
                m.connected.set(1);
                health.set(&component, false, "connected, subscribing");
                tracing::info!(connection = %cfg.name, session_present, protocol = ?cfg.protocol, "MQTT connected");
                // Subscribing again is harmless with a present session and required without one.
                if let Err(e) = session.subscribe(&cfg.topics) {
                    tracing::error!(connection = %cfg.name, error = %e, "cannot queue subscribe");
                }
            }
            Ok(SessionEvent::Subscribed { refused }) => {
                if refused > 0 {
                    tracing::error!(connection = %cfg.name, refused, "broker refused subscriptions");
                    health.set(
                        &component,
                        false,
                        format!("{refused} subscription(s) refused"),
                    );
                } else {
                    health.set(&component, true, "subscribed");
                }
            }
            Ok(SessionEvent::Message(msg)) => {
                m.messages.inc();
                m.bytes.add(msg.payload.len() as u64);
                let now = fieldlink_ops::unix_ms();
                // The first subscription whose filter matches decides the format and the topic tags.
                let sub = cfg
                    .topics
                    .iter()
                    .find(|t| topic_matches(&t.filter, &msg.topic));
                let format = sub.map(|t| t.format).unwrap_or_default();
                let ack: Option<AckFn> = (msg.qos != 0).then(|| {
                    let (queue, qos, pkid, g) = (acks.clone(), msg.qos, msg.pkid, generation);
                    Box::new(move || queue.push(g, qos, pkid)) as AckFn
                });
                let tags = sub
                    .and_then(|t| t.tags_from_topic.as_deref())
                    .map(|pattern| payload::topic_tags(pattern, &msg.topic))
                    .unwrap_or_default();
                let mapped = mapper.map(format, &msg.topic, &msg.payload, now, &tags);
                if let Some(r) = mapper.take_rebirth() {
                    let sent = session.try_publish_qos0(&r.topic, r.payload);
                    if sent {
                        m.rebirths.inc();
                    }
                    tracing::info!(connection = %cfg.name, topic = %r.topic, queued = sent, "Sparkplug: asking the edge node to rebirth (its births are needed to map its data)");
                }
                let mapped = match mapped {
                    Ok(parsed) => {
                        m.readings.add(parsed.readings.len() as u64);
                        for s in &parsed.skipped {
                            m.skipped(*s);
                        }
                        if parsed.seq_gap {
                            m.seq_gaps.inc();
                            tracing::warn!(connection = %cfg.name, topic = %msg.topic, "Sparkplug sequence number jumped: messages were lost upstream");
                        }
                        Ok(parsed.readings)
                    }
                    Err(e) => {
                        m.dead_letter(e.reason()).inc();
                        tracing::debug!(connection = %cfg.name, topic = %msg.topic, error = %e, "payload refused");
                        let refused = Refused {
                            at_ms: now,
                            source: component.clone(),
                            topic: msg.topic,
                            reason: e.reason().to_owned(),
                            detail: e.to_string(),
                            payload: msg.payload.to_vec(),
                        };
                        Err(refused)
                    }
                };
                let queued = async {
                    match mapped {
                        Ok(readings) => buffer.append(readings, ack).await,
                        Err(refused) => buffer.refuse(refused, ack).await,
                    }
                };
                // A full buffer queue blocks here: the broker's in-flight window fills and it holds further
                // messages (backpressure). Shutdown does not wait for room: the message stays unacknowledged and
                // the broker redelivers it.
                let send = tokio::select! {
                    r = queued => r,
                    _ = cancel.cancelled() => break,
                };
                if send.is_err() {
                    tracing::error!(connection = %cfg.name, "buffer closed; stopping MQTT connection");
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                m.connected.set(0);
                m.reconnects.inc();
                health.set(&component, false, e.clone());
                let delay = backoff.next_delay();
                tracing::warn!(connection = %cfg.name, error = %e, retry_in_ms = delay.as_millis() as u64, "MQTT connection failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    m.connected.set(0);
    // Committed messages whose acks are still queued are redelivered by the broker next time (duplicates,
    // never losses).
    m.acks
        .add(acks.flush(generation, |q, id| session.try_ack(q, id)));
    session.disconnect().await;
    tracing::info!(connection = %cfg.name, "MQTT connection stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_match_like_the_broker() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("#", "a"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(!topic_matches("a/b", "a/c"));
    }

    #[test]
    fn passwords_never_appear_in_debug_output() {
        let cfg: MqttConfig = toml::from_str("name = \"x\"\nhost = \"h\"\nusername = \"u\"\npassword = \"hunter2\"\n[[topics]]\nfilter = \"#\"").unwrap_or_else(|e| panic!("{e}"));
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert_eq!(cfg.password.as_ref().map(Secret::expose), Some("hunter2"));
    }
}

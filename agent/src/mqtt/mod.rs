//! MQTT source: one task per broker connection.
//!
//! Messages are mapped to readings ([`payload`]) and queued to the buffer together with an acknowledgement
//! callback; the buffer thread runs the callback (which sends the PUBACK) only after the readings are
//! committed. Manual acks are on, so the broker redelivers anything the agent had not committed when it died.
//! A payload that cannot be mapped is counted by reason and acknowledged (through the same ordered path, so
//! PUBACKs leave in arrival order): redelivering it would not make it parseable.
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
pub mod tls;

pub use config::{MqttConfig, PayloadConfig, Secret, TimeUnit, TopicConfig};

use crate::buffer::{AckFn, BufferHandle};
use fieldlink_ops::backoff::Backoff;
use fieldlink_ops::metrics::{Counter, Gauge, Health, Registry};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
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
    skipped_fields: Counter,
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
            skipped_fields: registry.counter(
                "fieldlink_mqtt_skipped_fields_total",
                "Payload fields that gave no reading (null, arrays).",
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
            "MQTT messages refused by the payload mapping, by reason.",
            &[("connection", &self.name), ("reason", reason)],
        )
    }
}

/// Acknowledgements waiting to be handed to the MQTT client, in commit order.
#[derive(Debug, Default)]
pub struct AckQueue {
    /// `(connection generation, qos, packet id)`.
    pending: Mutex<VecDeque<(u64, QoS, u16)>>,
    ready: Notify,
}

impl AckQueue {
    /// Records a committed message's acknowledgement (called on the buffer thread; never blocks for long).
    /// `generation` is the connection the message arrived on.
    pub fn push(&self, generation: u64, qos: QoS, pkid: u16) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((generation, qos, pkid));
        self.ready.notify_one();
    }

    /// Hands queued acknowledgements of connection `generation` to `client` until its request channel is full,
    /// and discards those of earlier connections: after a reconnect the broker may have given their packet ids
    /// to other messages, so acking them could acknowledge a message not yet committed. The broker redelivers
    /// the discarded ones; dedup drops the copies. Returns how many went.
    fn flush(&self, client: &AsyncClient, generation: u64) -> u64 {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut sent = 0;
        while let Some(&(g, qos, pkid)) = pending.front() {
            if g != generation {
                pending.pop_front();
                continue;
            }
            let publish = rumqttc::Publish {
                dup: false,
                qos,
                retain: false,
                topic: String::new(),
                pkid,
                payload: Default::default(),
            };
            if client.try_ack(&publish).is_err() {
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

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
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
    let mut opts = MqttOptions::new(client_id, cfg.host.clone(), cfg.port());
    opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_s));
    opts.set_clean_session(cfg.clean_session);
    opts.set_manual_acks(true);
    opts.set_inflight(cfg.max_inflight);
    if let Some(user) = &cfg.username {
        let password = match (&cfg.password, &cfg.password_env) {
            (Some(p), _) => p.expose().to_owned(),
            (None, Some(var)) => std::env::var(var).unwrap_or_else(|_| {
                tracing::error!(connection = %cfg.name, variable = %var, "password_env is not set; connecting without a password");
                String::new()
            }),
            (None, None) => String::new(),
        };
        opts.set_credentials(user.clone(), password);
    }
    if let Some(t) = &cfg.tls {
        // Checked by `validate` before anything started; a file changed since then is reported here.
        match tls::client_config(t) {
            Ok(c) => opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(c)),
            )),
            Err(e) => {
                tracing::error!(connection = %cfg.name, error = %e, "TLS configuration failed; connection not started");
                health.set(&component, false, format!("tls: {e}"));
                return;
            }
        };
    }
    let max_packet = cfg.payload.max_payload_bytes + 64 * 1024;
    opts.set_max_packet_size(max_packet, max_packet);
    // Requests are only acks and subscribes; room for a full in-flight window of acks.
    let (client, mut eventloop) = AsyncClient::new(opts, usize::from(cfg.max_inflight) * 2 + 16);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let acks = Arc::new(AckQueue::default());
    let tag_patterns: Vec<(&str, &str)> = cfg
        .topics
        .iter()
        .filter_map(|t| Some((t.filter.as_str(), t.tags_from_topic.as_deref()?)))
        .collect();
    let mut generation = 0u64;
    health.set(&component, false, "connecting");

    loop {
        m.acks.add(acks.flush(&client, generation));
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = acks.ready.notified() => continue,
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                generation += 1;
                backoff.reset();
                m.connected.set(1);
                health.set(&component, false, "connected, subscribing");
                tracing::info!(connection = %cfg.name, session_present = ack.session_present, "MQTT connected");
                // Subscribing again is harmless with a present session and required without one. One SUBSCRIBE
                // for all filters, so one SUBACK says whether all of them are active.
                let filters = cfg
                    .topics
                    .iter()
                    .map(|t| rumqttc::SubscribeFilter::new(t.filter.clone(), qos(t.qos)));
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::error!(connection = %cfg.name, error = %e, "cannot queue subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .count();
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
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                m.messages.inc();
                m.bytes.add(publish.payload.len() as u64);
                let topic = publish.topic.clone();
                let readings = match payload::parse(
                    &topic,
                    &publish.payload,
                    fieldlink_ops::unix_ms(),
                    &cfg.payload,
                ) {
                    Ok(mut parsed) => {
                        // The first subscription with a pattern whose filter matches (no work without patterns).
                        if let Some((_, pattern)) = tag_patterns
                            .iter()
                            .find(|(filter, _)| topic_matches(filter, &topic))
                        {
                            let tags = payload::topic_tags(pattern, &topic);
                            if !tags.is_empty() {
                                for r in &mut parsed.readings {
                                    r.series.tags = tags.clone();
                                }
                            }
                        }
                        m.readings.add(parsed.readings.len() as u64);
                        m.skipped_fields.add(parsed.skipped as u64);
                        parsed.readings
                    }
                    Err(e) => {
                        m.dead_letter(e.reason()).inc();
                        tracing::debug!(connection = %cfg.name, topic = %topic, error = %e, "payload refused");
                        Vec::new()
                    }
                };
                let ack: Option<AckFn> = (publish.qos != QoS::AtMostOnce).then(|| {
                    let (queue, qos, pkid, g) =
                        (acks.clone(), publish.qos, publish.pkid, generation);
                    Box::new(move || queue.push(g, qos, pkid)) as AckFn
                });
                let send = buffer.append(readings, ack);
                let sent = tokio::select! {
                    r = send => r,
                    _ = cancel.cancelled() => break,
                };
                if sent.is_err() {
                    tracing::error!(connection = %cfg.name, "buffer closed; stopping MQTT connection");
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                m.connected.set(0);
                m.reconnects.inc();
                health.set(&component, false, e.to_string());
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
    m.acks.add(acks.flush(&client, generation));
    let _ = client.try_disconnect();
    // Let the DISCONNECT go out; bounded.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
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

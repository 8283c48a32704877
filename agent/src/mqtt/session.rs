//! One MQTT client session, 3.1.1 or 5, behind one small interface: the connection task does not care which.
//!
//! rumqttc has a separate client and event loop per protocol version; [`Session`] wraps either and turns their
//! events into the few the connection task acts on. Both run with manual acknowledgements.

use super::config::{MqttConfig, Protocol, TopicConfig};
use bytes::Bytes;
use rumqttc::v5;
use std::time::Duration;

/// What the connection task acts on.
#[derive(Debug)]
pub(super) enum SessionEvent {
    /// CONNACK received.
    Connected { session_present: bool },
    /// SUBACK received; `refused` filters were not granted.
    Subscribed { refused: usize },
    /// An application message.
    Message(Message),
    /// A PINGREQ went out.
    Pinged,
    /// Anything else (ping responses, acks going out).
    Other,
    /// The outgoing DISCONNECT left.
    Disconnected,
}

/// How a session's acknowledgements leave ([`Session::ack_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AckPath {
    /// Written to the connection in batches.
    Direct,
    /// Queued to the client's request channel.
    Client,
}

/// An incoming PUBLISH.
#[derive(Debug)]
pub(super) struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    pub pkid: u16,
}

/// A rumqttc client and event loop of either protocol version.
pub(super) enum Session {
    V4(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(v5::AsyncClient, Box<v5::EventLoop>),
}

fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => rumqttc::QoS::AtLeastOnce,
    }
}

fn qos5(q: u8) -> v5::mqttbytes::QoS {
    match q {
        0 => v5::mqttbytes::QoS::AtMostOnce,
        2 => v5::mqttbytes::QoS::ExactlyOnce,
        _ => v5::mqttbytes::QoS::AtLeastOnce,
    }
}

/// Largest packet the agent reads: the payload limit plus room for the topic and properties. A larger payload
/// than `max_payload_bytes` but within this is read and refused as `too_large`.
fn max_packet(cfg: &MqttConfig) -> usize {
    cfg.payload.max_payload_bytes + 64 * 1024
}

impl Session {
    /// Builds the client; nothing is connected until the first [`Session::poll`].
    pub(super) fn new(
        cfg: &MqttConfig,
        client_id: String,
        credentials: Option<(String, String)>,
        tls: Option<rumqttc::TlsConfiguration>,
    ) -> Self {
        // Requests are only acks and subscribes: room for a full in-flight window of acks.
        let cap = usize::from(cfg.max_inflight) * 2 + 16;
        let keep_alive = Duration::from_secs(cfg.keep_alive_s);
        match cfg.protocol {
            Protocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, cfg.host.clone(), cfg.port());
                o.set_keep_alive(keep_alive)
                    .set_clean_session(cfg.clean_session)
                    .set_manual_acks(true)
                    .set_inflight(cfg.max_inflight)
                    .set_max_packet_size(max_packet(cfg), max_packet(cfg));
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                if let Some(t) = tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(t));
                }
                let (c, e) = rumqttc::AsyncClient::new(o, cap);
                Session::V4(c, Box::new(e))
            }
            Protocol::V5 => {
                let mut o = v5::MqttOptions::new(client_id, cfg.host.clone(), cfg.port());
                o.set_keep_alive(keep_alive)
                    .set_clean_start(cfg.clean_session)
                    .set_manual_acks(true)
                    // MQTT 5 flow control: the broker sends at most this many unacknowledged QoS 1/2 messages.
                    .set_receive_maximum(Some(cfg.max_inflight))
                    // The broker does not send larger packets (it discards them, MQTT 5 section 3.1.2.11.4).
                    .set_max_packet_size(Some(max_packet(cfg) as u32))
                    // Without an expiry interval an MQTT 5 session ends with the connection.
                    .set_session_expiry_interval(
                        (!cfg.clean_session).then_some(cfg.session_expiry_s),
                    );
                if let Some((u, p)) = credentials {
                    o.set_credentials(u, p);
                }
                if let Some(t) = tls {
                    o.set_transport(rumqttc::Transport::tls_with_config(t));
                }
                let (c, e) = v5::AsyncClient::new(o, cap);
                Session::V5(c, Box::new(e))
            }
        }
    }

    /// The next event; an error means the connection is down (the next poll reconnects).
    pub(super) async fn poll(&mut self) -> Result<SessionEvent, String> {
        match self {
            Session::V4(_, events) => {
                use rumqttc::{Event, Outgoing, Packet};
                Ok(match events.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(a)) => SessionEvent::Connected {
                        session_present: a.session_present,
                    },
                    Event::Incoming(Packet::SubAck(a)) => SessionEvent::Subscribed {
                        refused: a
                            .return_codes
                            .iter()
                            .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                            .count(),
                    },
                    Event::Incoming(Packet::Publish(p)) => SessionEvent::Message(Message {
                        topic: p.topic,
                        payload: p.payload,
                        qos: p.qos as u8,
                        pkid: p.pkid,
                    }),
                    Event::Outgoing(Outgoing::Disconnect) => SessionEvent::Disconnected,
                    Event::Outgoing(Outgoing::PingReq) => SessionEvent::Pinged,
                    _ => SessionEvent::Other,
                })
            }
            Session::V5(_, events) => {
                use v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                use v5::Event;
                Ok(match events.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(a)) => SessionEvent::Connected {
                        session_present: a.session_present,
                    },
                    Event::Incoming(Packet::SubAck(a)) => SessionEvent::Subscribed {
                        refused: a
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .count(),
                    },
                    Event::Incoming(Packet::Publish(p)) => SessionEvent::Message(Message {
                        // MQTT requires UTF-8 topic names.
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        qos: p.qos as u8,
                        pkid: p.pkid,
                    }),
                    Event::Outgoing(rumqttc::Outgoing::Disconnect) => SessionEvent::Disconnected,
                    Event::Outgoing(rumqttc::Outgoing::PingReq) => SessionEvent::Pinged,
                    _ => SessionEvent::Other,
                })
            }
        }
    }

    /// Forgets that a PINGRESP is due. Called when polling resumes after a pause: the broker's answer to the last
    /// PINGREQ may still sit unread behind the messages it sent meanwhile, and rumqttc would otherwise take its next
    /// keep-alive tick, which may come before it reads that answer, for a dead broker. A dead broker is then noticed
    /// one keep-alive interval later.
    pub(super) fn forget_ping(&mut self) {
        match self {
            Session::V4(_, events) => events.state.await_pingresp = false,
            Session::V5(_, events) => events.state.await_pingresp = false,
        }
    }

    /// Queues one SUBSCRIBE for all `topics`, so one SUBACK says whether all of them are active.
    pub(super) fn subscribe(&self, topics: &[TopicConfig]) -> Result<(), String> {
        match self {
            Session::V4(c, _) => c
                .try_subscribe_many(
                    topics
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.filter.clone(), qos4(t.qos))),
                )
                .map_err(|e| e.to_string()),
            Session::V5(c, _) => c
                .try_subscribe_many(
                    topics
                        .iter()
                        .map(|t| v5::mqttbytes::v5::Filter::new(t.filter.clone(), qos5(t.qos))),
                )
                .map_err(|e| e.to_string()),
        }
    }

    /// How this session's acknowledgements leave. rumqttc's event loop takes one queued request per poll and
    /// flushes after each: a write system call per PUBACK (rumqttc issue #810). A 3.1.1 session has them written
    /// straight to its connection in batches ([`Session::write_acks`]); the 5 event loop keeps its connection
    /// private, so a 5 session queues them to the client ([`Session::try_ack`]).
    pub(super) fn ack_path(&self) -> AckPath {
        match self {
            Session::V4(..) => AckPath::Direct,
            Session::V5(..) => AckPath::Client,
        }
    }

    /// Writes the acknowledgements (`(qos, packet id)`, QoS 1 or 2) to a connected 3.1.1 connection and flushes
    /// once, within `timeout`. Only between polls (no poll is under way). On an error or a timeout the connection
    /// is dropped (the next poll reconnects): the acks it may not have sent are lost with it, and the broker
    /// redelivers those messages on the next connection, where dedup drops the copies. A connection kept after a
    /// timeout would keep them unacknowledged for good, each holding a slot of the broker's in-flight window.
    pub(super) async fn write_acks(
        &mut self,
        acks: &[(u8, u16)],
        timeout: Duration,
    ) -> Result<(), String> {
        use rumqttc::{Packet, PubAck, PubRec};
        let Session::V4(_, events) = self else {
            return Err("acks of an MQTT 5 session go through the client".into());
        };
        let written = tokio::time::timeout(timeout, async {
            let net = events.network.as_mut().ok_or("not connected")?;
            for &(qos, pkid) in acks {
                // What rumqttc's own `ack` sends: PUBACK for QoS 1, PUBREC for QoS 2 (its PUBREL answer stays
                // with the event loop).
                let p = if qos == 2 {
                    Packet::PubRec(PubRec::new(pkid))
                } else {
                    Packet::PubAck(PubAck::new(pkid))
                };
                net.write(p).await.map_err(|e| e.to_string())?;
            }
            net.flush().await.map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err(format!("writing acknowledgements took over {timeout:?}")));
        if written.is_err() {
            events.clean();
        }
        written
    }

    /// Queues the acknowledgement of message `pkid` received with `qos` (1 or 2); false when the request channel
    /// is full.
    pub(super) fn try_ack(&self, qos: u8, pkid: u16) -> bool {
        match self {
            Session::V4(c, _) => {
                let p = rumqttc::Publish {
                    dup: false,
                    qos: qos4(qos),
                    retain: false,
                    topic: String::new(),
                    pkid,
                    payload: Bytes::new(),
                };
                c.try_ack(&p).is_ok()
            }
            Session::V5(c, _) => {
                let mut p = v5::mqttbytes::v5::Publish::new("", qos5(qos), Bytes::new(), None);
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
        }
    }

    /// Queues a QoS 0, non-retained PUBLISH (Sparkplug commands); false when the request channel is full.
    pub(super) fn try_publish_qos0(&self, topic: &str, payload: Vec<u8>) -> bool {
        match self {
            Session::V4(c, _) => c
                .try_publish(topic, rumqttc::QoS::AtMostOnce, false, payload)
                .is_ok(),
            Session::V5(c, _) => c.try_publish(topic, qos5(0), false, payload).is_ok(),
        }
    }

    /// Queues a QoS 1, retained PUBLISH (alarm statuses); false when the request channel is full.
    pub(super) fn try_publish_retained(&self, topic: &str, payload: Vec<u8>) -> bool {
        match self {
            Session::V4(c, _) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
                .is_ok(),
            Session::V5(c, _) => c.try_publish(topic, qos5(1), true, payload).is_ok(),
        }
    }

    /// Sends DISCONNECT behind every request already queued (acknowledgements) and waits (bounded) until the
    /// broker closed the connection; false if the DISCONNECT did not leave. The DISCONNECT is queued as soon as the request channel has room, polling the
    /// client meanwhile: a channel full of acks must drain first, or those acks would be lost with the session
    /// (and their messages redelivered).
    pub(super) async fn disconnect(&mut self) -> bool {
        tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                let queued = match self {
                    Session::V4(c, _) => c.try_disconnect().is_ok(),
                    Session::V5(c, _) => c.try_disconnect().is_ok(),
                };
                if queued {
                    break;
                }
                if self.poll().await.is_err() {
                    return false;
                }
            }
            while let Ok(ev) = self.poll().await {
                if matches!(ev, SessionEvent::Disconnected) {
                    // Read on until the broker closes the connection: closing it ourselves with unread data in
                    // the socket (messages the broker kept sending) sends a TCP reset, and a reset makes the
                    // broker's kernel discard what it had not read yet — our last acks and the DISCONNECT.
                    while self.poll().await.is_ok() {}
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false)
    }
}

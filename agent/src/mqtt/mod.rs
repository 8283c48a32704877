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
//! `(qos, packet id)` in this connection's [`AckQueue`] and wakes the connection task, which, between polls of
//! the event loop, writes queued acks straight to a 3.1.1 connection in batches with one flush each (rumqttc's
//! loop would flush after every PUBACK), or moves them into rumqttc's request channel for an MQTT 5 session (a
//! full channel leaves the rest queued for the next turn). A write that fails or takes over 5 s drops the
//! connection: the broker redelivers what those acks covered, and dedup drops the copies. The queue holds at most
//! one entry per unacknowledged message, which the broker's in-flight window bounds.
//!
//! When the buffer queue is full the message being queued waits, but the session keeps being polled, so PINGREQs
//! and PUBACKs keep leaving and the broker never drops the connection for a missed keep-alive (which would discard
//! the queued acks and bring the messages back). Messages read meanwhile are held in order, unacknowledged
//! ([`Held`]): the broker's in-flight window fills and it holds further messages, so backpressure reaches the
//! publisher without losing anything. With `max_inflight` QoS 1/2 messages held (a broker whose window is larger;
//! Mosquitto was seen sending more than its `max_inflight_messages`), reading pauses and the session is polled only
//! when a keep-alive is due; past four times that, not even then. QoS 0 messages beyond `max_inflight` held are
//! dropped and counted (`fieldlink_mqtt_qos0_dropped_total`).

mod config;
pub mod payload;
mod session;
pub mod tls;

pub(crate) use config::{filter_problem, topic_filter};
pub use config::{Format, MqttConfig, PayloadConfig, Protocol, Secret, TimeUnit, TopicConfig};

use crate::buffer::{Ack, BufferHandle, Closed, Refused};
use fieldlink_ops::backoff::Backoff;
use fieldlink_ops::metrics::{Counter, Gauge, Health, Registry};
use payload::{Mapper, Skip};
use session::{AckPath, Message, Session, SessionEvent};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
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
    qos0_dropped: Counter,
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
                "QoS 1/2 acknowledgements written to the connection (or handed to the MQTT client) after the durable commit.",
                &l,
            ),
            qos0_dropped: registry.counter(
                "fieldlink_mqtt_qos0_dropped_total",
                "QoS 0 messages dropped while intake waited for buffer room with max_inflight of them already held.",
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
    /// Acknowledgement callbacks handed out whose append has not been committed (nor dropped) yet.
    outstanding: std::sync::atomic::AtomicUsize,
    /// Set when the connection stops for good: the buffer drops its appends not yet committed.
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

/// One outstanding acknowledgement: counted from the callback's creation until it ran or was dropped unrun (its
/// append never got into the buffer, or the buffer gave it up).
struct Outstanding(Arc<AckQueue>);

impl Outstanding {
    fn new(queue: Arc<AckQueue>) -> Self {
        queue
            .outstanding
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(queue)
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0
            .outstanding
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.ready.notify_one();
    }
}

impl AckQueue {
    /// The acknowledgement callback of a message received on connection `generation`.
    fn callback(self: &Arc<Self>, generation: u64, qos: u8, pkid: u16) -> Ack {
        let outstanding = Outstanding::new(self.clone());
        Ack {
            on_commit: Box::new(move || {
                outstanding.0.push(generation, qos, pkid);
                drop(outstanding);
            }),
            cancelled: self.stopped.clone(),
        }
    }

    /// The connection stops: appends not committed yet are dropped by the buffer (the broker redelivers them).
    fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether no acknowledgement waits to be handed to the client.
    fn is_empty(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Messages handed to the buffer whose commit has not happened yet.
    fn outstanding(&self) -> usize {
        self.outstanding.load(std::sync::atomic::Ordering::SeqCst)
    }

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

    /// Takes up to `max` queued acknowledgements of connection `generation`, oldest first (discarding those of
    /// earlier connections, as [`AckQueue::flush`]).
    fn take(&self, generation: u64, max: usize) -> Vec<(u8, u16)> {
        let mut out = Vec::new();
        self.flush(generation, |qos, pkid| {
            if out.len() == max {
                return false;
            }
            out.push((qos, pkid));
            true
        });
        out
    }
}

/// Acknowledgements written to the connection at once, at most (a few KiB of PUBACKs).
const ACK_BATCH: usize = 1024;
/// How long writing acknowledgements to the connection may take before the connection counts as stuck (rumqttc's
/// own flush timeout).
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Hands the queued acknowledgements of connection `generation` to the session ([`Session::ack_path`]): written
/// to the connection in batches with one flush each, or queued to the client until its request channel is full,
/// or, with the connection down (`link_up` false: the last poll failed and no CONNACK came since), left queued:
/// handed to the client then, they would go out on the next connection, where their packet ids may name
/// messages not committed yet; that connection's generation discards them. Returns how many went, and the error
/// that dropped the connection if a write failed.
async fn hand_acks(
    session: &mut Session,
    acks: &AckQueue,
    generation: u64,
    link_up: bool,
) -> (u64, Option<String>) {
    if !link_up {
        return (0, None);
    }
    match session.ack_path() {
        AckPath::Client => (acks.flush(generation, |q, id| session.try_ack(q, id)), None),
        AckPath::Direct => {
            let mut sent = 0u64;
            loop {
                let batch = acks.take(generation, ACK_BATCH);
                if batch.is_empty() {
                    return (sent, None);
                }
                if let Err(e) = session.write_acks(&batch, ACK_WRITE_TIMEOUT).await {
                    return (sent, Some(e));
                }
                sent += batch.len() as u64;
            }
        }
    }
}

/// How long a stopping connection waits for the buffer to commit the messages it already took.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(5);
/// How soon alarm statuses the client could not take are tried again.
const STATUS_RETRY: Duration = Duration::from_millis(200);

/// A queued append to the buffer (waits while its queue is full).
type Intake<'a> = Pin<Box<dyn Future<Output = Result<(), Closed>> + Send + 'a>>;

/// What a connection needs to turn a message into an append to the buffer.
struct Route<'a> {
    cfg: &'a MqttConfig,
    m: &'a ConnMetrics,
    component: &'a str,
    acks: &'a Arc<AckQueue>,
    buffer: &'a BufferHandle,
}

impl<'a> Route<'a> {
    /// Maps `msg` (received on connection `generation`) with the format of the first matching subscription and
    /// returns the append of its readings, or of its refusal, with the callback that acknowledges it.
    fn start(
        &self,
        mapper: &mut Mapper,
        session: &Session,
        generation: u64,
        msg: Message,
    ) -> Intake<'a> {
        let (cfg, m) = (self.cfg, self.m);
        let now = fieldlink_ops::unix_ms();
        // The first subscription whose filter matches decides the format and the topic tags.
        let sub = cfg
            .topics
            .iter()
            .find(|t| topic_matches(config::topic_filter(&t.filter), &msg.topic));
        let format = sub.map(|t| t.format).unwrap_or_default();
        let ack: Option<Ack> =
            (msg.qos != 0).then(|| self.acks.callback(generation, msg.qos, msg.pkid));
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
        let buffer = self.buffer;
        match mapped {
            Ok(parsed) => {
                m.readings.add(parsed.readings.len() as u64);
                for s in &parsed.skipped {
                    m.skipped(*s);
                }
                if parsed.seq_gap {
                    m.seq_gaps.inc();
                    tracing::warn!(connection = %cfg.name, topic = %msg.topic, "Sparkplug sequence number jumped: messages were lost upstream");
                }
                Box::pin(buffer.append(parsed.readings, ack))
            }
            Err(e) => {
                m.dead_letter(e.reason()).inc();
                tracing::debug!(connection = %cfg.name, topic = %msg.topic, error = %e, "payload refused");
                let refused = Refused {
                    at_ms: now,
                    source: self.component.to_owned(),
                    topic: msg.topic,
                    reason: e.reason().to_owned(),
                    detail: e.to_string(),
                    payload: msg.payload.to_vec(),
                };
                Box::pin(buffer.refuse(refused, ack))
            }
        }
    }
}

/// What [`Held::push`] did with a message.
#[derive(Debug, PartialEq, Eq)]
enum Hold {
    /// Held; reading goes on.
    Held,
    /// A QoS 0 message beyond the cap: dropped (at most once, no window holds it back at the broker).
    DroppedQos0,
}

/// Messages read while intake waits, oldest first. Pure.
///
/// QoS 1/2 messages stay unacknowledged here, so the broker's in-flight window (MQTT 5: `max_inflight` as Receive
/// Maximum; 3.1.1: the broker's own setting) should bound them; `cap` (= `max_inflight`) guards against a broker
/// that sends more: at `cap` reading pauses (keep-alive polls only, up to [`Held::ceiling`]). QoS 0 messages have no
/// window: beyond `cap` of them they are dropped and counted.
#[derive(Debug)]
struct Held {
    queue: VecDeque<(u64, Message)>,
    cap: usize,
    qos0: usize,
}

impl Held {
    fn new(cap: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            cap: cap.max(1),
            qos0: 0,
        }
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether the session may be read freely (fewer than `cap` QoS 1/2 messages held).
    fn may_poll(&self) -> bool {
        self.queue.len() - self.qos0 < self.cap
    }

    /// Hard bound: with this many held, not even keep-alive polls read on (each may bring a few more messages).
    fn ceiling(&self) -> usize {
        self.cap * 4
    }

    fn push(&mut self, generation: u64, msg: Message) -> Hold {
        if msg.qos == 0 {
            if self.qos0 >= self.cap {
                return Hold::DroppedQos0;
            }
            self.qos0 += 1;
        }
        self.queue.push_back((generation, msg));
        Hold::Held
    }

    fn pop(&mut self) -> Option<(u64, Message)> {
        let (g, msg) = self.queue.pop_front()?;
        if msg.qos == 0 {
            self.qos0 -= 1;
        }
        Some((g, msg))
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
    status: Option<crate::alarm::StatusBoard>,
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
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    // Checked by `validate` before anything started; a file changed since then (a certificate being renewed) is
    // reported and read again with backoff: the connection starts once it reads.
    let tls = loop {
        match cfg.tls.as_ref().map(tls::client_config).transpose() {
            Ok(t) => break t.map(|c| rumqttc::TlsConfiguration::Rustls(Arc::new(c))),
            Err(e) => {
                tracing::error!(connection = %cfg.name, error = %e, "TLS configuration failed; connection not started, trying again");
                health.set(&component, false, format!("tls: {e}"));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    };
    backoff.reset();
    let mut session = Session::new(&cfg, client_id, credentials(&cfg), tls);
    let acks = Arc::new(AckQueue::default());
    let mut mapper = Mapper::new(cfg.payload.clone());
    let mut generation = 0u64;
    health.set(&component, false, "connecting");
    // Messages read while intake waits for buffer room, oldest first, with the connection they came on.
    let mut held = Held::new(usize::from(cfg.max_inflight));
    // The message being queued to the buffer (waits while its queue is full).
    let mut intake: Option<Intake<'_>> = None;
    let keep_alive = Duration::from_secs(cfg.keep_alive_s);
    // When the last PINGREQ went out (or the connection came up), and whether reading is paused.
    let mut last_ping = Instant::now();
    let mut paused = false;
    // Whether the connection of `generation` is up: from its CONNACK to the poll error that ends it.
    let mut link_up = false;
    // When alarm statuses that did not fit into the client's request channel are tried again.
    let mut status_retry: Option<Instant> = None;
    let route = Route {
        cfg: &cfg,
        m: &m,
        component: &component,
        acks: &acks,
        buffer: &buffer,
    };

    loop {
        let (sent, failed) = hand_acks(&mut session, &acks, generation, link_up).await;
        m.acks.add(sent);
        if let Some(e) = failed {
            // The session dropped the connection; the next poll reconnects.
            link_up = false;
            // A clean session's broker keeps nothing for it: nothing to wait for.
            health.set_link(&component, cfg.clean_session);
            m.connected.set(0);
            m.reconnects.inc();
            health.set(&component, false, e.clone());
            tracing::warn!(connection = %cfg.name, error = %e, "acknowledgements could not be written: reconnecting (the broker redelivers what they acknowledged)");
        }
        if intake.is_none() {
            if let Some((g, msg)) = held.pop() {
                intake = Some(route.start(&mut mapper, &session, g, msg));
            }
        }
        // The session is polled while intake waits too: pings and acks keep flowing, and what the broker sends
        // meanwhile is held, unacknowledged, so its in-flight window still throttles it. With `max_inflight` QoS 1/2
        // messages held (a broker whose window is larger), reading pauses and the session is polled only when a
        // keep-alive is due, until its PINGREQ is out; past `held.ceiling()` not even then.
        let reading = held.may_poll();
        let ping_at = last_ping + keep_alive;
        let poll_now = reading || (Instant::now() >= ping_at && held.len() < held.ceiling());
        if !poll_now {
            if !paused {
                tracing::warn!(connection = %cfg.name, held = held.len(), "the broker sends more unacknowledged messages than max_inflight while intake waits: reading paused, keep-alive only (set max_inflight to at least the broker's in-flight window)");
            }
            paused = true;
        } else if paused {
            paused = false;
            session.forget_ping();
        }
        let event = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = async { intake.as_mut().expect("guarded").await }, if intake.is_some() => {
                intake = None;
                if r.is_err() {
                    tracing::error!(connection = %cfg.name, "buffer closed; stopping MQTT connection");
                    break;
                }
                continue;
            }
            _ = acks.ready.notified() => continue,
            _ = async { status.as_ref().expect("guarded").posted().await }, if status.is_some() => {
                // Alarm statuses, newest per topic: queued to the client without waiting; what does not fit
                // goes back on the board for the next turn (a newer status posted meanwhile wins).
                if let Some(board) = &status {
                    for (topic, payload) in board.take() {
                        if !session.try_publish_retained(&topic, payload.clone()) {
                            board.put_back(topic, payload);
                            status_retry.get_or_insert(Instant::now() + STATUS_RETRY);
                        }
                    }
                }
                continue;
            }
            _ = async { tokio::time::sleep_until(status_retry.expect("guarded")).await }, if status_retry.is_some() => {
                status_retry = None;
                if let Some(board) = &status {
                    board.wake();
                }
                continue;
            }
            _ = tokio::time::sleep_until(ping_at), if !poll_now && held.len() < held.ceiling() => continue,
            ev = session.poll(), if poll_now => ev,
        };
        match event {
            Ok(SessionEvent::Pinged) => last_ping = Instant::now(),
            Ok(SessionEvent::Connected { session_present }) => {
                last_ping = Instant::now();
                generation += 1;
                link_up = true;
                health.set_link(&component, true);
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
                if intake.is_none() && held.is_empty() {
                    intake = Some(route.start(&mut mapper, &session, generation, msg));
                } else {
                    if held.push(generation, msg) == Hold::DroppedQos0 {
                        m.qos0_dropped.inc();
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                // (Before the first CONNACK nothing was up: a connection that never came up is not waited for.)
                if generation > 0 {
                    health.set_link(&component, cfg.clean_session);
                }
                link_up = false;
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
    // Shutdown does not wait for buffer room: the message being queued and the held ones stay unacknowledged and
    // the broker redelivers them (they were not committed: no duplicate).
    drop(intake);
    // Messages already in the buffer's queue are committed by the buffer thread in a moment: wait (bounded) for
    // their acknowledgements, so the broker does not redeliver what the buffer holds. A redelivery would be caught
    // by the buffer's dedup, but not after the buffer file is replaced (a re-image after a graceful stop).
    let deadline = tokio::time::Instant::now() + SHUTDOWN_ACK_WAIT;
    while acks.outstanding() > 0 {
        tokio::select! {
            _ = acks.ready.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(connection = %cfg.name, outstanding = acks.outstanding(), "stopping before the buffer committed every message taken: they are dropped uncommitted and the broker redelivers them");
                break;
            }
        }
    }
    // From here the buffer commits none of this connection's appends; a commit under way when the flag is set
    // ends before the buffer thread answers the ping, and its acks are flushed below.
    acks.stop();
    let _ = tokio::time::timeout(Duration::from_secs(10), buffer.ping()).await;
    // Hand every queued ack over: written at once to a 3.1.1 connection; queued to an MQTT 5 client, polling it so
    // its request channel drains (what arrives meanwhile is not taken: redelivered, never committed). The acks go
    // out before the DISCONNECT; any still missing at the deadline, or on a connection that went down, are
    // redelivered by the broker next time (duplicates the buffer's dedup drops, never losses).
    loop {
        let (sent, failed) = hand_acks(&mut session, &acks, generation, link_up).await;
        m.acks.add(sent);
        if failed.is_some()
            || acks.is_empty()
            || !link_up
            || session.ack_path() != AckPath::Client
            || tokio::time::Instant::now() >= deadline
        {
            // Written acks went out at once; a connection that is down takes none of them.
            break;
        }
        // Not under a timeout: a poll cancelled while it writes can lose the request it took (an ack). It
        // returns as soon as it sent a queued request or read a packet; a new connection (the old one dropped
        // meanwhile) ends the wait, its packet ids are not the acks'.
        match session.poll().await {
            Ok(SessionEvent::Connected { .. }) | Err(_) => break,
            Ok(_) => {}
        }
    }
    m.connected.set(0);
    let clean = session.disconnect().await;
    tracing::info!(connection = %cfg.name, clean, "MQTT connection stopped");
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
        // A shared subscription's messages come under their own topics (before: none matched, so every message
        // of `$share/g/spBv1.0/#` was mapped as JSON and refused, and topic tags were lost).
        assert!(topic_matches(
            config::topic_filter("$share/g/spBv1.0/#"),
            "spBv1.0/plant/NDATA/edge1"
        ));
    }

    /// TLS files that fail to load when the connection starts (a certificate being renewed after `check-config`
    /// passed) are reported in `/health` and read again with backoff until they load; the task does not end.
    #[test]
    fn tls_files_that_fail_to_load_are_read_again_until_they_do() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cfg: MqttConfig = toml::from_str(&format!(
            "name = \"edge\"\nhost = \"127.0.0.1\"\nport = 1\n[tls]\nca_file = {:?}\n[[topics]]\nfilter = \"#\"\n",
            ca.display().to_string()
        ))
        .unwrap();
        let buffer: crate::buffer::BufferConfig = toml::from_str(&format!(
            "path = {:?}",
            dir.path().join("b.db").display().to_string()
        ))
        .unwrap();
        let registry = Registry::new();
        let (handle, thread) = crate::buffer::spawn(
            &buffer,
            &crate::batch::BatchConfig::default(),
            &crate::order::OrderConfig::default(),
            "edge-1",
            crate::metrics::AgentMetrics::new(registry.clone()),
        )
        .unwrap();
        let health = Health::new();
        let line = |h: &Health| {
            h.report()
                .1
                .lines()
                .find(|l| l.starts_with("mqtt:edge:"))
                .unwrap_or_default()
                .to_owned()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let cancel = CancellationToken::new();
            let task = tokio::spawn(run(
                cfg,
                None,
                "edge-1".into(),
                handle,
                registry,
                health.clone(),
                cancel.clone(),
            ));
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert!(
                line(&health).contains("FAIL tls: ca_file"),
                "{}",
                line(&health)
            );
            assert!(!task.is_finished(), "the connection task ended");
            std::fs::copy("/etc/ssl/certs/ca-certificates.crt", &ca).unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while line(&health).contains("FAIL tls:") {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the TLS files were not read again: {}",
                    line(&health)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            cancel.cancel();
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the task stops on cancel")
                .unwrap();
        });
        thread.join().unwrap();
    }

    fn msg(qos: u8, pkid: u16) -> Message {
        Message {
            topic: "t".into(),
            payload: bytes::Bytes::new(),
            qos,
            pkid,
        }
    }

    #[test]
    fn held_messages_keep_their_order_pause_reading_at_the_cap_and_drop_only_qos0() {
        let mut h = Held::new(2);
        assert_eq!(h.push(1, msg(1, 10)), Hold::Held);
        assert_eq!(h.push(1, msg(0, 0)), Hold::Held);
        assert_eq!(h.push(1, msg(0, 0)), Hold::Held);
        assert_eq!(h.push(1, msg(0, 0)), Hold::DroppedQos0, "beyond cap QoS 0");
        assert!(h.may_poll(), "one QoS 1 held of 2");
        assert_eq!(h.push(2, msg(2, 11)), Hold::Held);
        assert!(!h.may_poll(), "two QoS 1/2 held: reading pauses");
        assert_eq!(h.ceiling(), 8);
        let order: Vec<_> = std::iter::from_fn(|| h.pop())
            .map(|(g, m)| (g, m.qos, m.pkid))
            .collect();
        assert_eq!(order, [(1, 1, 10), (1, 0, 0), (1, 0, 0), (2, 2, 11)]);
        assert!(h.is_empty() && h.may_poll());
    }

    #[test]
    fn an_acknowledgement_is_outstanding_until_it_ran_or_was_dropped_unrun() {
        let q = Arc::new(AckQueue::default());
        let (a, b) = (q.callback(1, 1, 10), q.callback(1, 1, 11));
        assert_eq!(q.outstanding(), 2);
        (a.on_commit)();
        assert_eq!(q.outstanding(), 1);
        assert!(!q.is_empty(), "the ack waits to be handed to the client");
        drop(b); // its append never reached the buffer: the broker redelivers it
        assert_eq!(q.outstanding(), 0);
        let mut sent = Vec::new();
        assert_eq!(
            q.flush(1, |_, id| {
                sent.push(id);
                true
            }),
            1
        );
        assert_eq!(sent, [10]);
        assert!(q.is_empty());
    }

    #[test]
    fn acks_are_taken_in_batches_of_the_current_connection_only() {
        let q = AckQueue::default();
        q.push(1, 1, 7); // an earlier connection's: its packet id may name another message now
        for id in 10..15 {
            q.push(2, if id == 12 { 2 } else { 1 }, id);
        }
        assert_eq!(q.take(2, 3), [(1, 10), (1, 11), (2, 12)]);
        assert_eq!(q.take(2, 3), [(1, 13), (1, 14)]);
        assert!(q.take(2, 3).is_empty() && q.is_empty());
    }

    #[test]
    fn passwords_never_appear_in_debug_output() {
        let cfg: MqttConfig = toml::from_str("name = \"x\"\nhost = \"h\"\nusername = \"u\"\npassword = \"hunter2\"\n[[topics]]\nfilter = \"#\"").unwrap_or_else(|e| panic!("{e}"));
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert_eq!(cfg.password.as_ref().map(Secret::expose), Some("hunter2"));
    }
}

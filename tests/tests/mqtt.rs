//! The MQTT source against real Mosquitto brokers: MQTT 3.1.1 and 5 connections to two brokers at once, every
//! payload format (JSON with topic tags and exclusions, InfluxDB line protocol, a bare number, Sparkplug B made by
//! pysparkplug), and a table of bad payloads, each counted and kept under its reason while everything else
//! passes and the connection stays up.
#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

/// `(series, ts_ms, value as kinesis_dump prints it, quality, tags)`.
type Row = (String, i64, String, u8, Vec<(String, String)>);
/// A [`Row`] as `publish_formats.py` expects it: no timestamp for arrival time.
type Expected = (String, Option<i64>, String, u8, Vec<(String, String)>);

fn dumped_rows(endpoint: &str, stream: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    for r in kinesis_dump(endpoint, stream) {
        for (i, (series, ts, value, _late)) in r.readings.iter().enumerate() {
            rows.push((
                series.clone(),
                *ts,
                value.clone(),
                r.quality[i],
                r.tags[i].clone(),
            ));
        }
    }
    rows
}

/// Publishes `(topic, payload)` at QoS 1 with rumqttc and waits for every PUBACK.
fn publish_raw(port: u16, messages: Vec<(String, Vec<u8>)>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut opts = MqttOptions::new(format!("raw-{}", free_port()), "127.0.0.1", port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev) = AsyncClient::new(opts, messages.len() + 10);
        let n = messages.len();
        for (t, p) in messages {
            client.publish(t, QoS::AtLeastOnce, false, p).await.unwrap();
        }
        let mut acked = 0;
        tokio::time::timeout(Duration::from_secs(30), async {
            while acked < n {
                if let Event::Incoming(Packet::PubAck(_)) = ev.poll().await.unwrap() {
                    acked += 1;
                }
            }
        })
        .await
        .unwrap();
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while ev.poll().await.is_ok() {}
        })
        .await;
    });
}

/// Two of the subscriptions are shared (`$share/<group>/…`, as agents side by side subscribe): their messages come
/// under their own topics and must still take the subscription's format and topic tags (before December 2026 no
/// shared subscription matched: Sparkplug was refused as `not_json` and topic tags were lost).
#[test]
fn v311_and_v5_on_two_brokers_with_every_payload_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (da, db) = (d.join("a"), d.join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let broker_a = Mosquitto::start(&da);
    let broker_b = Mosquitto::start(&db);
    let moto = Moto::start(d);
    moto.create("formats", 1, "unused-db", "unused-table", "unused-bucket");
    let sources = format!(
        r#"
[[mqtt]]
name = "a"
host = "127.0.0.1"
port = {}
protocol = "3.1.1"
keep_alive_s = 5
[mqtt.payload]
exclude = ["debug"]
[[mqtt.topics]]
filter = "$share/fleet/site/#"
tags_from_topic = "site/{{site}}/line/{{line}}/+"
[[mqtt.topics]]
filter = "influx/#"
format = "influx"
[[mqtt.topics]]
filter = "plain/#"

[[mqtt]]
name = "b"
host = "127.0.0.1"
port = {}
protocol = "5"
keep_alive_s = 5
[[mqtt.topics]]
filter = "$share/fleet/spBv1.0/#"
format = "sparkplug_b"
qos = 2
[[mqtt.topics]]
filter = "v5/#"
"#,
        broker_a.port, broker_b.port
    );
    let mut agent = AgentProc::with_sources(d, "formats", &moto.endpoint, "formats", "", &sources);
    agent.start();
    let health = http_get(agent.metrics_port, "/health").unwrap();
    assert!(
        health.contains("mqtt:a: ok") && health.contains("mqtt:b: ok"),
        "{health}"
    );

    let out = run_python(&[
        script("publish_formats.py").to_str().unwrap(),
        &broker_a.port.to_string(),
        &broker_b.port.to_string(),
    ]);
    let expected: Vec<Expected> = serde_json::from_str(&out).unwrap();
    wait_for("every reading committed", Duration::from_secs(30), || {
        (agent.metric("fieldlink_readings_received_total") >= expected.len() as f64).then_some(())
    });
    let m = http_get(agent.metrics_port, "/metrics").unwrap();
    assert_eq!(
        metric_with(&m, "fieldlink_mqtt_messages_total", "connection=\"a\""),
        Some(3.0)
    );
    assert_eq!(
        metric_with(&m, "fieldlink_mqtt_messages_total", "connection=\"b\""),
        Some(8.0)
    );
    assert_eq!(
        metric_with(&m, "fieldlink_mqtt_dead_letters_total", ""),
        None,
        "nothing refused"
    );
    assert_eq!(
        metric_with(
            &m,
            "fieldlink_mqtt_sparkplug_seq_gaps_total",
            "connection=\"b\""
        ),
        Some(0.0)
    );
    agent.stop();

    let mut got = dumped_rows(&moto.endpoint, "formats");
    // The bare number has the arrival time: take it from what landed, after checking it is recent.
    let mut want: Vec<Row> = expected
        .into_iter()
        .map(|(s, ts, v, q, t)| {
            let ts = ts.unwrap_or_else(|| {
                let landed = got.iter().find(|r| r.0 == s).map(|r| r.1).unwrap();
                assert!(
                    (fieldlink_ops::unix_ms() - landed).abs() < 120_000,
                    "{s} at {landed}"
                );
                landed
            });
            (s, ts, v, q, t)
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

/// Bytes of a Sparkplug payload with one metric that has only an alias (no birth named it).
fn sparkplug_alias_only(alias: u8) -> Vec<u8> {
    // Payload.metrics (field 2) = Metric { alias (2) = alias, long_value (11) = 1 }
    vec![0x12, 0x04, 0x10, alias, 0x58, 0x01]
}

#[test]
fn bad_payloads_are_counted_and_kept_by_reason_and_nothing_else_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = Mosquitto::start(d);
    let moto = Moto::start(d);
    moto.create("bad", 1, "unused-db", "unused-table", "unused-bucket");
    let sources = format!(
        r##"
[[mqtt]]
name = "local"
host = "127.0.0.1"
port = {}
keep_alive_s = 5
[mqtt.payload]
max_payload_bytes = 1024
[[mqtt.topics]]
filter = "i/#"
format = "influx"
[[mqtt.topics]]
filter = "spBv1.0/#"
format = "sparkplug_b"
[[mqtt.topics]]
filter = "#"
"##,
        broker.port
    );
    let mut agent = AgentProc::with_sources(d, "bad", &moto.endpoint, "bad", "", &sources);
    agent.start();

    let now = fieldlink_ops::unix_ms();
    let big = format!("{{\"v\": 1, \"pad\": \"{}\"}}", "x".repeat(2000));
    // (topic, payload, reason under which it is refused)
    let table: Vec<(&str, Vec<u8>, &str)> = vec![
        ("j/truncated", b"{\"v\": 1".to_vec(), "not_json"),
        ("j/binary", vec![0xff, 0xfe, 0x00], "not_json"),
        ("j/array", b"[1, 2, 3]".to_vec(), "wrong_type"),
        ("j/null", b"{\"v\": null}".to_vec(), "null"),
        ("j/nan", b"{\"v\": NaN}".to_vec(), "non_finite"),
        ("i/inf", b"m v=inf".to_vec(), "non_finite"),
        (
            "j/old",
            b"{\"ts\": 86400000, \"v\": 1}".to_vec(),
            "bad_timestamp",
        ),
        (
            "j/future",
            format!("{{\"ts\": {}, \"v\": 1}}", now + 10 * 86_400_000).into_bytes(),
            "bad_timestamp",
        ),
        (
            "j/ts-text",
            b"{\"ts\": \"noon\", \"v\": 1}".to_vec(),
            "bad_timestamp",
        ),
        ("j/big", big.clone().into_bytes(), "too_large"),
        ("i/nofield", b"m v=".to_vec(), "bad_line_protocol"),
        ("i/type", b"m v=12x".to_vec(), "bad_line_protocol"),
        ("spBv1.0/g/NDATA/n", vec![0xff, 0xff, 0xff], "bad_sparkplug"),
        (
            "spBv1.0/g/NDATA/n",
            sparkplug_alias_only(9),
            "unknown_alias",
        ),
        (
            "spBv1.0/g/BOGUS/n",
            sparkplug_alias_only(1),
            "bad_sparkplug",
        ),
        ("j/empty", b"{}".to_vec(), "no_readings"),
    ];
    // Partly bad: the good fields pass, the others are counted as skipped fields.
    let partly: Vec<(&str, Vec<u8>)> = vec![
        (
            "j/partly",
            b"{\"a\": 1, \"b\": null, \"c\": [1], \"d\": NaN}".to_vec(),
        ),
        ("i/partly", b"m v=1\nm v=\nm w=2\n".to_vec()),
    ];
    // Every bad message sits between good ones.
    let mut messages = Vec::new();
    let mut good = 0;
    for (i, (topic, payload, _)) in table.iter().enumerate() {
        messages.push((format!("good/{i}"), format!("{{\"v\": {i}}}").into_bytes()));
        good += 1;
        messages.push(((*topic).to_owned(), payload.clone()));
    }
    for (topic, payload) in &partly {
        messages.push(((*topic).to_owned(), payload.clone()));
    }
    good += 3; // j/partly a, i/partly v and w
    messages.push(("good/last".into(), b"{\"v\": -1}".to_vec()));
    good += 1;
    publish_raw(broker.port, messages.clone());

    wait_for("every message handled", Duration::from_secs(30), || {
        let m = http_get(agent.metrics_port, "/metrics")?;
        (metric_with(&m, "fieldlink_mqtt_acks_total", "connection=\"local\"")?
            >= messages.len() as f64)
            .then_some(())
    });
    let m = http_get(agent.metrics_port, "/metrics").unwrap();
    let mut want: BTreeMap<&str, f64> = BTreeMap::new();
    for (_, _, reason) in &table {
        *want.entry(reason).or_default() += 1.0;
    }
    for (reason, n) in &want {
        let got = metric_with(
            &m,
            "fieldlink_mqtt_dead_letters_total",
            &format!("reason=\"{reason}\""),
        );
        assert_eq!(got, Some(*n), "dead letters of reason {reason}");
    }
    for (reason, n) in [
        ("null", 1.0),
        ("wrong_type", 1.0),
        ("non_finite", 1.0),
        ("bad_line", 1.0),
    ] {
        let got = metric_with(
            &m,
            "fieldlink_mqtt_skipped_fields_total",
            &format!("reason=\"{reason}\""),
        );
        assert_eq!(got, Some(n), "skipped fields of reason {reason}");
    }
    assert_eq!(
        metric(&m, "fieldlink_readings_received_total"),
        Some(good as f64)
    );
    assert_eq!(
        metric_with(
            &m,
            "fieldlink_mqtt_reconnects_total",
            "connection=\"local\""
        ),
        Some(0.0),
        "the connection never dropped"
    );

    // Every refused message is kept with its topic and reason.
    let out = Command::new(bin("fieldlink-agent"))
        .args(["refused", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kept: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["topic"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let table_pairs: Vec<(String, String)> = table
        .iter()
        .map(|(t, _, r)| ((*t).to_owned(), (*r).to_owned()))
        .collect();
    assert_eq!(kept, table_pairs, "in arrival order");
    let big_row = rows.iter().find(|r| r["topic"] == "j/big").unwrap();
    assert_eq!(big_row["size"], big.len());
    assert_eq!(big_row["payload"].as_str(), Some(big.as_str()));
    let bin_row = rows.iter().find(|r| r["topic"] == "j/binary").unwrap();
    assert_eq!(bin_row["payload_hex"], "fffe00");

    // The good readings reached Kinesis, all of them.
    agent.stop();
    let rows = dumped_rows(&moto.endpoint, "bad");
    assert_eq!(rows.len(), good);
    let goods = rows.iter().filter(|r| r.0.starts_with("good/")).count();
    assert_eq!(goods, table.len() + 1);
}

/// Numbers in a file of one number per line.
fn numbers_file(path: &std::path::Path) -> BTreeSet<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

#[test]
fn a_broker_restart_mid_stream_loses_nothing_the_broker_kept_v311() {
    broker_fault("3.1.1", BrokerFault::Restart);
}

#[test]
fn a_broker_restart_mid_stream_loses_nothing_the_broker_kept_v5() {
    broker_fault("5", BrokerFault::Restart);
}

#[test]
fn a_broker_frozen_for_four_keep_alives_loses_and_doubles_nothing_v311() {
    broker_fault("3.1.1", BrokerFault::Freeze);
}

#[test]
fn a_broker_frozen_for_four_keep_alives_loses_and_doubles_nothing_v5() {
    broker_fault("5", BrokerFault::Freeze);
}

/// What happens to the broker mid-stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BrokerFault {
    /// SIGTERM, then a new broker on the same port and store.
    Restart,
    /// SIGSTOP for 20 s (the agent's keep-alive is 5 s: its pings go unanswered and its reconnects hang in the
    /// listen backlog, as with a hung broker or a paused VM), then SIGCONT.
    Freeze,
}

/// Mosquitto (persistent) is restarted or frozen while a publisher sends 6000 numbered QoS 1 readings at 1500/s:
/// every reading the broker acknowledged must reach Kinesis exactly once, the agent must reconnect into its kept
/// session.
fn broker_fault(protocol: &str, fault: BrokerFault) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let mut broker = Mosquitto::start_persistent(d, port);
    let moto = Moto::start(d);
    moto.create("restart", 1, "unused-db", "unused-table", "unused-bucket");
    // A reference subscriber (paho, persistent session) tells what the broker delivered at all.
    let (ready, reference_out) = (d.join("ref-ready"), d.join("ref-got"));
    let mut reference = Proc::spawn(
        "reference subscriber",
        {
            let mut c = Command::new(python());
            c.arg(script("subscribe_numbered.py"))
                .args(["127.0.0.1", &port.to_string()])
                .arg(&ready)
                .arg(&reference_out)
                .arg(if fault == BrokerFault::Freeze {
                    "45"
                } else {
                    "15"
                });
            c
        },
        &d.join("reference.log"),
    );
    wait_for("the reference subscriber", Duration::from_secs(20), || {
        ready.exists().then_some(())
    });
    let sources = format!(
        "[[mqtt]]\nname = \"local\"\nhost = \"127.0.0.1\"\nport = {port}\nprotocol = \"{protocol}\"\nkeep_alive_s = 5\n[[mqtt.topics]]\nfilter = \"crash/#\"\n"
    );
    let mut agent =
        AgentProc::with_sources(d, "restart-agent", &moto.endpoint, "restart", "", &sources);
    agent.start();

    let path = d.to_path_buf();
    let publisher = std::thread::spawn(move || publish_numbered(port, 6000, 1500.0, 0, &path));
    std::thread::sleep(Duration::from_millis(1500));
    match fault {
        BrokerFault::Restart => {
            // SIGTERM: Mosquitto saves its sessions and queued messages, then comes back on the same port.
            broker.proc.terminate(Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(500));
            broker = Mosquitto::start_persistent(d, port);
        }
        BrokerFault::Freeze => {
            assert!(broker.proc.signal("-STOP"), "SIGSTOP to the broker");
            // rumqttc notices an unanswered ping at its next tick: 5–10 s after the stop, with 10 s to spare.
            std::thread::sleep(Duration::from_secs(20));
            assert!(broker.proc.signal("-CONT"), "SIGCONT to the broker");
        }
    }
    let acked: BTreeSet<u64> = publisher.join().unwrap().into_iter().collect();
    assert!(
        acked.len() > 3000,
        "the broker acknowledged only {}",
        acked.len()
    );

    // Wait (bounded) for every acknowledged reading, then compare with what the broker delivered at all.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let got: BTreeSet<u64> = loop {
        let got: BTreeSet<u64> = numbers_in(&kinesis_dump(&moto.endpoint, "restart"))
            .into_iter()
            .collect();
        if acked.is_subset(&got) || std::time::Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let m = http_get(agent.metrics_port, "/metrics").unwrap();
    let reconnects = metric_with(
        &m,
        "fieldlink_mqtt_reconnects_total",
        "connection=\"local\"",
    )
    .unwrap();
    let deduplicated = metric(&m, "fieldlink_readings_deduplicated_total").unwrap_or(0.0);
    let healthy = http_get(agent.metrics_port, "/health")
        .unwrap()
        .contains("mqtt:local: ok");
    let ledger = agent.ledger();
    agent.stop();
    // Each acknowledged reading exactly once (a batch resent counts once): a redelivery after the restart is
    // deduplicated by the agent.
    let acked_list: Vec<u64> = acked.iter().copied().collect();
    let problem = exactly_once(
        &acked_list,
        &numbers_in(&unique_batches(&kinesis_dump(&moto.endpoint, "restart"))),
    );
    assert!(problem.is_empty(), "after a broker {fault:?}: {problem}");
    // It writes its numbers (atomically) and exits by itself after its 15 (45) s.
    reference.wait(Duration::from_secs(60));
    let reference_got = numbers_file(&reference_out);
    let missing: Vec<&u64> = acked.difference(&got).collect();
    let broker_lost: Vec<&u64> = acked.difference(&reference_got).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged readings missing in Kinesis (first {:?}); the reference subscriber missed {} (first {:?}); ledger {:?}",
        missing.len(),
        &missing[..missing.len().min(10)],
        broker_lost.len(),
        &broker_lost[..broker_lost.len().min(10)],
        ledger
    );
    assert!(reconnects >= 1.0, "the agent did not notice the {fault:?}");
    assert!(healthy, "not resubscribed");
    // The broker kept the agent's session over its restart (what makes "nothing lost" possible at all).
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        log.lines()
            .filter(|l| l.contains("MQTT connected"))
            .skip(1)
            .any(|l| l.contains("session_present=true")),
        "no reconnect found the session present:\n{log}"
    );
    drop(broker);
    eprintln!(
        "broker {fault:?} (MQTT {protocol}): {} readings acknowledged by the broker, all {} in Kinesis ({} of them reached the reference subscriber); {reconnects} reconnect(s), {deduplicated} redelivered reading(s) dropped by the agent",
        acked.len(),
        got.len(),
        reference_got.intersection(&acked).count()
    );
}

/// An edge node born before the agent connected (pysparkplug + paho): its alias-only data cannot be mapped, so the
/// agent publishes one Rebirth request (decoded by pysparkplug), the node answers with fresh births, and its data
/// maps again.
#[test]
fn sparkplug_data_of_a_node_born_before_the_agent_gets_one_rebirth_request_and_then_maps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = Mosquitto::start(d);
    let moto = Moto::start(d);
    moto.create("rebirth", 1, "unused-db", "unused-table", "unused-bucket");
    let (born, go, out) = (d.join("born"), d.join("go"), d.join("edge.json"));
    let mut edge = Proc::spawn(
        "sparkplug edge node",
        {
            let mut c = Command::new(python());
            c.arg(script("sparkplug_edge_node.py"))
                .arg(broker.port.to_string())
                .args([&born, &go, &out]);
            c
        },
        &d.join("edge.log"),
    );
    wait_for("the edge node's births", Duration::from_secs(20), || {
        born.exists().then_some(())
    });
    let sources = format!(
        "[[mqtt]]\nname = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nprotocol = \"5\"\nkeep_alive_s = 5\n[[mqtt.topics]]\nfilter = \"spBv1.0/plant/+/gw9/#\"\nformat = \"sparkplug_b\"\n",
        broker.port
    );
    let mut agent = AgentProc::with_sources(d, "rebirth", &moto.endpoint, "rebirth", "", &sources);
    agent.start();
    std::fs::write(&go, "go").unwrap();
    edge.wait(Duration::from_secs(60));

    // Exactly one request (three unmappable messages, one interval), a Boolean `Node Control/Rebirth` = true.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let commands = report["commands"].as_array().unwrap();
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(commands[0]["topic"], "spBv1.0/plant/NCMD/gw9");
    assert_eq!(
        commands[0]["metrics"],
        serde_json::json!([["Node Control/Rebirth", "BOOLEAN", true]])
    );
    let t = report["T"].as_i64().unwrap();

    // What lands: the births after the rebirth and the data after them; the three messages before are refused.
    let want: BTreeSet<(String, i64, String)> = [
        ("plant/gw9/uptime", t + 10, "10"),
        ("plant/gw9/pump/temp", t + 10, "20.0"),
        ("plant/gw9/pump/temp", t + 11, "10.0"),
    ]
    .iter()
    .map(|(s, ts, v)| (s.to_string(), *ts, v.to_string()))
    .collect();
    let got = wait_for(
        "the reborn node's readings",
        Duration::from_secs(30),
        || {
            let got: BTreeSet<(String, i64, String)> = dumped_rows(&moto.endpoint, "rebirth")
                .into_iter()
                .map(|(s, ts, v, _, _)| (s, ts, v))
                .collect();
            want.is_subset(&got).then_some(got)
        },
    );
    assert_eq!(got, want, "only what the births made mappable");
    let m = http_get(agent.metrics_port, "/metrics").unwrap();
    let c = |name: &str, label: &str| metric_with(&m, name, label).unwrap_or(0.0);
    assert_eq!(
        c(
            "fieldlink_mqtt_sparkplug_rebirth_requests_total",
            "connection=\"local\""
        ),
        1.0
    );
    assert_eq!(
        c(
            "fieldlink_mqtt_dead_letters_total",
            "reason=\"unknown_alias\""
        ),
        3.0
    );
    agent.stop();
}

#[test]
fn backpressure_held_for_three_keep_alives_keeps_the_connection_and_doubles_nothing_v311() {
    keep_alive_under_backpressure("3.1.1");
}

#[test]
fn backpressure_held_for_three_keep_alives_keeps_the_connection_and_doubles_nothing_v5() {
    keep_alive_under_backpressure("5");
}

/// Kinesis unreachable and a 1 MiB buffer under the `backpressure` policy: intake waits for room for more than three
/// keep-alive intervals while a QoS 1 publisher sends numbered readings. The session must keep being polled (pings
/// and acks out, no new messages taken into the buffer): Mosquitto never drops the agent for a missed keep-alive,
/// the agent never reconnects, no message comes back, and after the outage every reading the broker acknowledged
/// is in Kinesis exactly once.
fn keep_alive_under_backpressure(protocol: &str) {
    const KEEP_ALIVE_S: u64 = 5;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = Mosquitto::start(d);
    let moto = Moto::start(d);
    moto.create("keepalive", 1, "unused-db", "unused-table", "unused-bucket");
    let proxy = FaultProxy::start(d, &moto.endpoint);
    let sources = format!(
        "[[mqtt]]\nname = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nprotocol = \"{protocol}\"\nkeep_alive_s = {KEEP_ALIVE_S}\n[[mqtt.topics]]\nfilter = \"crash/#\"\nqos = 1\n",
        broker.port
    );
    let mut agent = AgentProc::with_sources(
        d,
        "keepalive-agent",
        &proxy.endpoint,
        "keepalive",
        "max_bytes = 1048576\noverflow = \"backpressure\"",
        &sources,
    );
    agent.start();
    proxy.set("down=1");
    let acked = publish_numbered(broker.port, 3000, 3000.0, 1000, d);
    wait_for("the cap to be reached", Duration::from_secs(30), || {
        (agent.metric("fieldlink_buffer_bytes") >= 1_048_576.0 * 0.9).then_some(())
    });
    let taken = agent.metric("fieldlink_readings_received_total");
    // Hold the backpressure for more than three keep-alive intervals (the broker gives up after 1.5).
    let hold = Duration::from_secs(3 * KEEP_ALIVE_S + 2);
    std::thread::sleep(hold);
    let taken_after = agent.metric("fieldlink_readings_received_total");
    assert!(
        taken_after < 2.0 * acked.len() as f64 * 0.8,
        "backpressure did not hold: {taken_after} readings taken"
    );
    let reconnects = |agent: &AgentProc| {
        http_get(agent.metrics_port, "/metrics")
            .and_then(|m| {
                metric_with(
                    &m,
                    "fieldlink_mqtt_reconnects_total",
                    "connection=\"local\"",
                )
            })
            .unwrap_or(0.0)
    };
    let timed_out = |broker: &Mosquitto| broker.proc.log_text().contains("exceeded timeout");
    assert!(
        !timed_out(&broker),
        "Mosquitto dropped the agent for a missed keep-alive while intake waited:\n{}\nagent log:\n{}",
        broker.proc.log_text(),
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );

    proxy.set("down=0");
    let records = wait_for(
        "every acknowledged reading in Kinesis",
        Duration::from_secs(120),
        || {
            let done = agent.metric("fieldlink_readings_received_total")
                >= 2.0 * acked.len() as f64
                && agent.metric("fieldlink_buffer_pending_readings") == 0.0
                && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0;
            done.then(|| kinesis_dump(&moto.endpoint, "keepalive"))
        },
    );
    let got = numbers_in(&records);
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for n in &got {
        *counts.entry(*n).or_insert(0) += 1;
    }
    let missing: Vec<_> = acked
        .iter()
        .filter(|n| !counts.contains_key(n))
        .take(5)
        .collect();
    let doubled: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(
        missing.is_empty() && doubled.is_empty() && got.len() == acked.len(),
        "Kinesis holds {} numbers for {} acknowledged: missing e.g. {missing:?}, doubled e.g. {doubled:?}",
        got.len(),
        acked.len()
    );
    let m = http_get(agent.metrics_port, "/metrics").unwrap();
    let messages =
        metric_with(&m, "fieldlink_mqtt_messages_total", "connection=\"local\"").unwrap_or(0.0);
    assert_eq!(
        (reconnects(&agent), timed_out(&broker)),
        (0.0, false),
        "the connection was dropped during the backpressure; broker log:\n{}",
        broker.proc.log_text()
    );
    assert_eq!(
        messages,
        acked.len() as f64,
        "messages came back (redelivered) after the backpressure"
    );
    assert_eq!(agent.metric("fieldlink_readings_deduplicated_total"), 0.0);
    let (received, accounted) = agent.ledger();
    assert_eq!(received, accounted, "ledger");
    agent.stop();
    eprintln!(
        "keep-alive under backpressure (MQTT {protocol}): intake held at {taken} readings for {hold:?} (keep-alive {KEEP_ALIVE_S} s), 0 reconnects, {} readings acknowledged by the broker, each in Kinesis once",
        acked.len()
    );
}

/// QoS 2 end to end (the publisher and the subscription at 2) while the agent is killed with SIGKILL and started
/// again: the broker resends, into the kept session, the releases (PUBREL) of messages whose PUBREC the dead agent
/// sent. Every reading the broker acknowledged (PUBCOMP to the publisher) must reach Kinesis exactly once, and
/// the connection must carry on after the restart.
fn qos2_through_a_kill(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = Mosquitto::start(d);
    let moto = Moto::start(d);
    moto.create("qos2", 1, "unused-db", "unused-table", "unused-bucket");
    let sources = format!(
        "[[mqtt]]\nname = \"local\"\nhost = \"127.0.0.1\"\nport = {}\nprotocol = \"{protocol}\"\nkeep_alive_s = 5\n[[mqtt.topics]]\nfilter = \"crash/#\"\nqos = 2\n",
        broker.port
    );
    let mut agent = AgentProc::with_sources(d, "qos2-agent", &moto.endpoint, "qos2", "", &sources);
    agent.start();
    let publisher = NumberedPublisher::spawn(broker.port, "crash", 0, 4000, 1000.0, 0, d, 2);
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(fastrand::u64(800..1500)));
        agent.kill9();
        agent.start();
    }
    let acked = publisher.finish(Duration::from_secs(120));
    assert!(
        acked.len() > 3000,
        "the broker acknowledged only {}",
        acked.len()
    );
    let missing = || {
        let got: BTreeSet<u64> = numbers_in(&kinesis_dump(&moto.endpoint, "qos2"))
            .into_iter()
            .collect();
        acked
            .iter()
            .filter(|n| !got.contains(n))
            .copied()
            .collect::<Vec<u64>>()
    };
    wait_for_or(
        "every acknowledged reading in Kinesis",
        Duration::from_secs(60),
        || missing().is_empty().then_some(()),
        || {
            let m = missing();
            format!(
                "{} of {} acknowledged missing, e.g. {:?}; {}",
                m.len(),
                acked.len(),
                &m[..m.len().min(10)],
                agent.diagnosis()
            )
        },
    );
    let health = http_get(agent.metrics_port, "/health").unwrap();
    assert!(health.contains("mqtt:local: ok"), "{health}");
    // Judged once the agent has stopped: a copy sent after the first complete dump counts too.
    agent.stop();
    let got = numbers_in(&unique_batches(&kinesis_dump(&moto.endpoint, "qos2")));
    let problem = exactly_once(&acked, &got);
    assert!(
        problem.is_empty(),
        "QoS 2 through kill -9 (MQTT {protocol}): {problem}"
    );
    eprintln!(
        "QoS 2 (MQTT {protocol}): {} readings acknowledged by the broker through two SIGKILLs, each in Kinesis once",
        acked.len()
    );
}

#[test]
fn qos_2_flows_exactly_once_through_sigkills_v311() {
    qos2_through_a_kill("3.1.1");
}

#[test]
fn qos_2_flows_exactly_once_through_sigkills_v5() {
    qos2_through_a_kill("5");
}

//! Alarm rules through the real agent: crafted sequences published with paho-mqtt to a real Mosquitto (JSON and
//! Sparkplug B), alarm events read back from Kinesis on moto with the independent Python decoder, compared with
//! what the independent Python model (`tests/python/alarm_model.py`) predicts from the readings the agent
//! delivered; the retained status messages on the local broker; alarms ahead of a backlog; kill -9 rounds.
#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

/// The rules of the crafted-sequence test (the model reads the same text).
const RULES: &str = r##"
[alarms]
publish_connection = "local"
topic_prefix = "status/alarms"

[[alarms.rules]]
name = "vib"
series = "line3/+/+/vib"
condition = "above"
levels = [{ name = "warning", limit = 4.0 }, { name = "critical", limit = 8.0 }]
hysteresis = 0.5
on_delay_ms = 1000
off_delay_ms = 1500

[[alarms.rules]]
name = "vib-low"
series = "line3/+/+/vib"
condition = "below"
levels = [{ name = "low", limit = 1.0 }]
hysteresis = 0.2

[[alarms.rules]]
name = "oven-ramp"
series = "line3/oven/+/temp"
condition = "rate"
span_ms = 1500
levels = [{ name = "fast", limit = 2.0 }, { name = "very-fast", limit = 5.0 }]
hysteresis = 0.5

[[alarms.rules]]
name = "meter-silent"
series = "plant/meter/+/kwh"
condition = "stale"
levels = [{ name = "late", after_ms = 2000 }, { name = "dead", after_ms = 5000 }]

[[alarms.rules]]
name = "pump-quality"
series = "plant/gw1/pump/#"
condition = "quality"
levels = [{ name = "bad", quality = "bad" }]
"##;

fn sources(mqtt_port: u16) -> String {
    format!(
        r##"
[[mqtt]]
name = "local"
host = "127.0.0.1"
port = {mqtt_port}
keep_alive_s = 5
[[mqtt.topics]]
filter = "spBv1.0/#"
format = "sparkplug_b"
[[mqtt.topics]]
filter = "line3/#"
[[mqtt.topics]]
filter = "plant/#"
"##
    )
}

/// `(rule, series, from, to, ts, cause ts)` of an alarm event as the Python decoder gives it.
type Key = (String, String, u64, u64, i64, Option<i64>);

fn event_key(e: &Json) -> Key {
    (
        e["rule"].as_str().unwrap().to_owned(),
        e["series"].as_str().unwrap().to_owned(),
        e["from"][0].as_u64().unwrap(),
        e["to"][0].as_u64().unwrap(),
        e["ts_ms"].as_i64().unwrap(),
        e["cause"].as_array().map(|c| c[0].as_i64().unwrap()),
    )
}

/// The model's transitions as sorted keys, series named through `names` (series id → key).
fn model_keys(events: &[Json], names: &BTreeMap<i64, String>) -> Vec<Key> {
    let mut keys: Vec<Key> = events
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap().to_owned(),
                names[&e[2].as_i64().unwrap()].clone(),
                e[3].as_u64().unwrap(),
                e[4].as_u64().unwrap(),
                e[5].as_i64().unwrap(),
                e[6].as_i64(),
            )
        })
        .collect();
    keys.sort();
    keys
}

/// Every alarm event in the stream (each batch once) with its rule sequence number.
fn alarm_events(records: &[DumpedRecord]) -> Vec<(Key, u64)> {
    unique_batches(records)
        .iter()
        .flat_map(|r| r.alarms.iter())
        .map(|e| (event_key(e), e["rule_seq"].as_u64().unwrap()))
        .collect()
}

/// Each rule's sequence numbers are exactly 1..=n, each once: nothing repeated, nothing skipped.
fn assert_sequences_complete(events: &[(Key, u64)]) {
    let mut by_rule: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (k, seq) in events {
        by_rule.entry(k.0.as_str()).or_default().push(*seq);
    }
    for (rule, mut seqs) in by_rule {
        seqs.sort_unstable();
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, want,
            "rule {rule}: sequence numbers repeated or skipped"
        );
    }
}

fn retained_statuses(port: u16, prefix: &str) -> BTreeMap<String, Json> {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", &format!("{prefix}/#"), "-v", "-W", "2"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (topic, payload) = l.split_once(' ')?;
            Some((topic.to_owned(), serde_json::from_str(payload).ok()?))
        })
        .collect()
}

#[test]
fn alarm_events_through_the_real_agent_are_exactly_what_the_model_predicts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    let stream = "alarms-e2e";
    moto.create(stream, 1, "fieldlink", "readings", "alarms-e2e");
    let mut agent = AgentProc::with_sources(
        dir.path(),
        "alarm-agent",
        &moto.endpoint,
        stream,
        "",
        &format!("{RULES}\n{}", sources(broker.port)),
    );
    agent.start();

    let t0 = fieldlink_ops::unix_ms() + 3000;
    let published: Vec<Json> = serde_json::from_str(&run_python(&[
        script("publish_alarm_sequences.py").to_str().unwrap(),
        "127.0.0.1",
        &broker.port.to_string(),
        &t0.to_string(),
    ]))
    .unwrap();
    // The meter's last reading is at t0 + 12261: both stale levels are due by t0 + 17261 on the stale clock.
    let end = t0 + 12_261 + 5_000 + 1_500;
    while fieldlink_ops::unix_ms() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    let rules: Json = toml::from_str::<Json>(RULES).unwrap()["alarms"]["rules"].clone();
    let records = wait_for("every reading delivered", Duration::from_secs(60), || {
        let records = kinesis_dump(&moto.endpoint, stream);
        let delivered: usize = unique_batches(&records)
            .iter()
            .map(|r| r.readings.len())
            .sum();
        (delivered >= published.len()).then_some(records)
    });
    let items = {
        let batches = unique_batches(&records);
        // The readings the agent delivered are exactly those published; the late ones the rules skip.
        let mut late = BTreeMap::new();
        let mut got: Vec<(String, i64, String, u64)> = Vec::new();
        for r in &batches {
            for (i, (s, ts, v, l)) in r.readings.iter().enumerate() {
                late.insert((s.clone(), *ts), *l);
                got.push((s.clone(), *ts, v.clone(), u64::from(r.quality[i])));
            }
        }
        let mut want: Vec<(String, i64, String, u64)> = published
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_owned(),
                    p[1].as_i64().unwrap(),
                    p[2][1].as_str().unwrap().to_owned(),
                    p[3].as_u64().unwrap(),
                )
            })
            .collect();
        got.sort();
        want.sort();
        assert_eq!(
            got, want,
            "the delivered readings are not the published ones"
        );
        // The model's input: each series in event-time order, late readings left out, then the final clock.
        let mut sorted: Vec<&Json> = published.iter().collect();
        sorted.sort_by_key(|p| (p[0].as_str().unwrap().to_owned(), p[1].as_i64().unwrap()));
        let mut ids: BTreeMap<String, i64> = BTreeMap::new();
        let mut items: Vec<Json> = Vec::new();
        let mut skipped = 0;
        for p in sorted {
            let key = p[0].as_str().unwrap().to_owned();
            let ts = p[1].as_i64().unwrap();
            if late[&(key.clone(), ts)] {
                skipped += 1;
                continue;
            }
            let n = ids.len() as i64 + 1;
            let sid = *ids.entry(key.clone()).or_insert(n);
            items.push(json!({"obs": [sid, key, [], ts, p[2], p[3]]}));
        }
        eprintln!(
            "{} readings, {skipped} late (skipped by the rules)",
            published.len()
        );
        items.push(json!({"tick": end}));
        items
    };
    let want = alarm_model(&rules, &items);
    let names: BTreeMap<i64, String> = items
        .iter()
        .filter_map(|i| Some((i["obs"][0].as_i64()?, i["obs"][1].as_str()?.to_owned())))
        .collect();
    let want = model_keys(&want, &names);
    // Wait for the clock's stale alarms too, then compare.
    let records = wait_for("the alarm events", Duration::from_secs(30), || {
        let records = kinesis_dump(&moto.endpoint, stream);
        (alarm_events(&records).len() >= want.len()).then_some(records)
    });
    let events = alarm_events(&records);
    let mut got: Vec<Key> = events.iter().map(|(k, _)| k.clone()).collect();
    got.sort();
    for k in &want {
        eprintln!("model: {k:?}");
    }
    assert_eq!(
        got, want,
        "the agent's alarm events differ from the model's"
    );
    assert_sequences_complete(&events);
    // Every kind of rule fired.
    for rule in [
        "vib",
        "vib-low",
        "oven-ramp",
        "meter-silent",
        "pump-quality",
    ] {
        assert!(
            want.iter().any(|k| k.0 == rule),
            "no {rule} event: the sequence does not exercise it"
        );
    }
    // Metrics: events by rule and level, and nothing left pending.
    let m = http_get(agent.metrics_port, "/metrics").unwrap();
    let warnings = want.iter().filter(|k| k.0 == "vib" && k.3 == 1).count();
    assert_eq!(
        metric_with(
            &m,
            "fieldlink_alarm_events_total",
            "level=\"warning\",rule=\"vib\""
        )
        .or_else(|| metric_with(
            &m,
            "fieldlink_alarm_events_total",
            "rule=\"vib\",level=\"warning\""
        )),
        Some(warnings as f64),
        "{m}"
    );
    // The local status: one retained message per rule and series, at the level of its last event.
    let statuses = retained_statuses(broker.port, "status/alarms");
    let mut by_seq = events.clone();
    by_seq.sort_by_key(|(_, seq)| *seq);
    let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (k, _) in &by_seq {
        last.insert((k.0.clone(), k.1.clone()), k.3);
    }
    for ((rule, series), level) in &last {
        let topic = format!("status/alarms/{rule}/{series}");
        let s = statuses
            .get(&topic)
            .unwrap_or_else(|| panic!("no retained status on {topic}: {statuses:?}"));
        assert_eq!(s["severity"].as_u64(), Some(*level), "{topic}: {s}");
    }
    agent.stop();
}

/// Rewrites a key of the agent's config (e.g. `[batch]`'s `linger_ms = 200` line) in place.
fn edit_config(agent: &AgentProc, from: &str, to: &str) {
    let text = std::fs::read_to_string(&agent.config).unwrap();
    assert!(text.contains(from), "{from} not in the config");
    std::fs::write(&agent.config, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn an_alarm_jumps_a_50000_reading_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    let stream = "alarms-backlog";
    moto.create(stream, 1, "unused-db", "unused-table", "unused-bucket");
    let proxy = FaultProxy::start(dir.path(), &moto.endpoint);
    proxy.set("down=1");
    let mut agent = AgentProc::new(
        dir.path(),
        "backlog-agent",
        broker.port,
        &proxy.endpoint,
        stream,
        "durability = \"normal\"",
        r#"max_records_per_call = 5
[[alarms.rules]]
name = "arm-vibration"
series = "line3/+/+/vib"
condition = "above"
levels = [{ name = "critical", limit = 8.0 }]
"#,
    );
    edit_config(
        &agent,
        "linger_ms = 200",
        "linger_ms = 200\nmax_readings = 100",
    );
    agent.start();

    // The backlog: 50,000 readings while Kinesis is unreachable.
    let acked = publish_numbered(broker.port, 50_000, 20_000.0, 0, dir.path());
    wait_for("the backlog sealed", Duration::from_secs(120), || {
        (agent.metric("fieldlink_buffer_unsealed_readings") == 0.0
            && agent.metric("fieldlink_buffer_pending_readings") as usize >= acked.len())
        .then_some(())
    });
    let backlog = agent.metric("fieldlink_buffer_pending_batches");
    // Kinesis comes back slow: every PutRecords call takes 300 ms more, 5 records a call, so the backlog takes
    // about 30 calls (9 s) to drain while the alarm needs a few calls' time to reach the sender (with 20 records a
    // call the whole backlog drained in about 7 calls, and on a loaded machine the alarm came after half of it).
    proxy.set("down=0&delay_ms=300");
    wait_for("the drain to start", Duration::from_secs(60), || {
        (agent.metric("fieldlink_records_sent_total") >= 5.0).then_some(())
    });
    let ts = fieldlink_ops::unix_ms();
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1"])
        .args(["-t", "line3/robot-arm/007"])
        .args(["-m", &format!("{{\"ts\": {ts}, \"vib\": 9.5}}")])
        .output()
        .unwrap();
    assert!(out.status.success());
    wait_for("the backlog drained", Duration::from_secs(300), || {
        (agent.metric("fieldlink_buffer_pending_batches") == 0.0
            && agent.metric("fieldlink_alarm_records_pending") == 0.0
            && agent.metric("fieldlink_alarms_active") == 1.0)
            .then_some(())
    });
    let records = kinesis_dump(&moto.endpoint, stream);
    let problem = exactly_once(&acked, &numbers_in(&unique_batches(&records)));
    assert!(problem.is_empty(), "{problem}");
    let alarm: Vec<&DumpedRecord> = records.iter().filter(|r| !r.alarms.is_empty()).collect();
    assert_eq!(alarm.len(), 1, "one alarm record");
    let e = &alarm[0].alarms[0];
    assert_eq!(
        (
            e["rule"].as_str(),
            e["to"][1].as_str(),
            e["cause"][0].as_i64()
        ),
        (Some("arm-vibration"), Some("critical"), Some(ts))
    );
    let arrived = alarm[0].arrival_ms;
    let behind = records
        .iter()
        .filter(|r| r.alarms.is_empty() && r.arrival_ms > arrived)
        .count();
    let last = records.iter().map(|r| r.arrival_ms).max().unwrap();
    let first = records.iter().map(|r| r.arrival_ms).min().unwrap();
    eprintln!(
        "backlog {backlog} records ({} readings); alarm from reading to Kinesis in {} ms; {behind} backlog records \
         reached Kinesis after it; the backlog took {} ms to drain",
        acked.len(),
        arrived - ts,
        last - first
    );
    assert!(
        behind as f64 > backlog * 0.5,
        "the alarm did not overtake the backlog: only {behind} of {backlog} records came after it"
    );
    assert!(arrived - ts < 5_000, "alarm latency {} ms", arrived - ts);
    agent.stop();
}

/// The model's items for the readings the agent delivered (each batch once): per series in event-time order,
/// late ones left out. `value_of` turns a dumped value into the model's `[type, value]`.
fn items_from_dump(records: &[DumpedRecord]) -> (Vec<Json>, BTreeMap<i64, String>) {
    let mut readings: Vec<(String, i64, String, u8)> = Vec::new();
    for r in unique_batches(records) {
        for (i, (s, ts, v, late)) in r.readings.iter().enumerate() {
            if !late {
                readings.push((s.clone(), *ts, v.clone(), r.quality[i]));
            }
        }
    }
    readings.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut ids: BTreeMap<String, i64> = BTreeMap::new();
    let items = readings
        .into_iter()
        .map(|(s, ts, v, q)| {
            let n = ids.len() as i64 + 1;
            let sid = *ids.entry(s.clone()).or_insert(n);
            json!({"obs": [sid, s, [], ts, ["f64", v], q]})
        })
        .collect();
    (items, ids.into_iter().map(|(k, v)| (v, k)).collect())
}

#[test]
fn kill_9_rounds_neither_repeat_nor_skip_an_alarm_transition() {
    let rounds: usize = std::env::var("FIELDLINK_ALARM_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    let stream = "alarms-crash";
    moto.create(stream, 1, "unused-db", "unused-table", "unused-bucket");
    // Every device's counter climbs through the levels of one rule: one transition per 60, on every device.
    let levels: Vec<String> = (1..=254)
        .map(|k| format!("{{ name = \"l{k}\", limit = {}.0 }}", 60 * k))
        .collect();
    let rules = format!(
        "[[alarms.rules]]\nname = \"climb\"\nseries = \"crash/+/n\"\ncondition = \"above\"\nlevels = [{}]\n",
        levels.join(", ")
    );
    let mut agent = AgentProc::new(
        dir.path(),
        "alarm-crash-agent",
        broker.port,
        &moto.endpoint,
        stream,
        "durability = \"full\"",
        &rules,
    );
    agent.start();
    let rate = 1500.0;
    let count = (rate * 0.45 * rounds as f64) as usize + 1000;
    let (port, path) = (broker.port, dir.path().to_path_buf());
    let publisher = std::thread::spawn(move || publish_numbered(port, count, rate, 0, &path));
    sigkill_rounds(&mut agent, rounds);
    let acked = publisher.join().unwrap();
    let records = wait_for(
        "every acknowledged reading in Kinesis",
        Duration::from_secs(120),
        || {
            let records = kinesis_dump(&moto.endpoint, stream);
            let got: std::collections::BTreeSet<u64> = numbers_in(&records).into_iter().collect();
            (acked.iter().all(|n| got.contains(n))
                && agent.metric("fieldlink_alarm_records_pending") == 0.0
                && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0)
                .then_some(records)
        },
    );
    let problem = exactly_once(&acked, &numbers_in(&unique_batches(&records)));
    assert!(problem.is_empty(), "{problem}");
    let (items, names) = items_from_dump(&records);
    let rules_json = toml::from_str::<Json>(&rules).unwrap()["alarms"]["rules"].clone();
    let want = model_keys(&alarm_model(&rules_json, &items), &names);
    let events = alarm_events(&records);
    let mut got: Vec<Key> = events.iter().map(|(k, _)| k.clone()).collect();
    got.sort();
    let extra: Vec<&Key> = got.iter().filter(|k| !want.contains(k)).take(5).collect();
    let lost: Vec<&Key> = want.iter().filter(|k| !got.contains(k)).take(5).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "transitions: agent {} model {}; not in the model {extra:?}, lost {lost:?}",
        got.len(),
        want.len()
    );
    assert_eq!(got, want, "not in the model {extra:?}, lost {lost:?}");
    assert_sequences_complete(&events);
    let alarm_records = records.iter().filter(|r| !r.alarms.is_empty()).count();
    eprintln!(
        "{rounds} SIGKILL rounds: {} readings acknowledged, {} alarm transitions each exactly once (per-rule \
         sequence 1..={}), in {alarm_records} alarm records (resends included)",
        acked.len(),
        got.len(),
        got.len()
    );
    // The readings judged again once the agent has stopped: a copy sent after the first complete dump counts
    // too.
    agent.stop();
    let last = kinesis_dump(&moto.endpoint, stream);
    let problem = exactly_once(&acked, &numbers_in(&unique_batches(&last)));
    assert!(problem.is_empty(), "after the stop: {problem}");
}

#[test]
fn a_status_broker_that_is_down_blocks_nothing_and_gets_the_newest_state() {
    let dir = tempfile::tempdir().unwrap();
    let readings = Mosquitto::start(dir.path());
    let status_port = free_port();
    let mut status = Mosquitto::start_persistent(dir.path(), status_port);
    let moto = Moto::start(dir.path());
    let stream = "alarms-status";
    moto.create(stream, 1, "unused-db", "unused-table", "unused-bucket");
    let sections = format!(
        r#"
[alarms]
publish_connection = "hmi"
topic_prefix = "hmi/alarms"

[[alarms.rules]]
name = "vib"
series = "line3/+/+/vib"
condition = "above"
levels = [{{ name = "critical", limit = 8.0 }}]

[[mqtt]]
name = "in"
host = "127.0.0.1"
port = {}
[[mqtt.topics]]
filter = "line3/#"

[[mqtt]]
name = "hmi"
host = "127.0.0.1"
port = {status_port}
keep_alive_s = 5
[[mqtt.topics]]
filter = "hmi/commands/#"
"#,
        readings.port
    );
    let mut agent = AgentProc::with_sources(
        dir.path(),
        "status-agent",
        &moto.endpoint,
        stream,
        "",
        &sections,
    );
    agent.start();
    status.proc.kill();

    // Five transitions while the status broker is down.
    let t0 = fieldlink_ops::unix_ms();
    for (i, v) in [9.0, 1.0, 9.5, 2.0, 10.0].iter().enumerate() {
        let out = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &readings.port.to_string(),
                "-q",
                "1",
            ])
            .args(["-t", "line3/robot/001"])
            .args([
                "-m",
                &format!("{{\"ts\": {}, \"vib\": {v}}}", t0 + i as i64 * 100),
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let records = wait_for(
        "the alarm events in Kinesis while the status broker is down",
        Duration::from_secs(30),
        || {
            let records = kinesis_dump(&moto.endpoint, stream);
            (alarm_events(&records).len() >= 5).then_some(records)
        },
    );
    let events = alarm_events(&records);
    assert_eq!(events.len(), 5, "{events:?}");
    assert_sequences_complete(&events);
    assert_eq!(agent.metric("fieldlink_alarms_active"), 1.0);

    // The broker comes back empty (killed: no retained messages saved): it gets the newest state.
    let _status = Mosquitto::start_persistent(dir.path(), status_port);
    let topic = "hmi/alarms/vib/line3/robot/001/vib";
    let s = wait_for("the retained status", Duration::from_secs(30), || {
        retained_statuses(status_port, "hmi/alarms").remove(topic)
    });
    assert_eq!(
        (s["level"].as_str(), s["seq"].as_u64(), s["value"].as_f64()),
        (Some("critical"), Some(5), Some(10.0)),
        "{s}"
    );
    agent.stop();
}

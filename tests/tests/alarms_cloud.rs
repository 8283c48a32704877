//! The cloud side of alarms against moto server (Kinesis, DynamoDB, S3, SNS, SQS): alarm-event records land in the
//! alarm table (read back with pyarrow) and are published to SNS (read back from SQS subscriptions, one with a
//! filter policy on a message attribute), each event exactly once, through a `kill -9` of the cloud worker after it
//! notified but before it checkpointed, the replay that follows, and agent resends.
//!
//! Alarm records are made here with `fieldlink_proto::alarm::AlarmEncoder` (as the agent seals them) and put by
//! boto3, so the test knows every event; `alarms.rs` covers what the agent puts in them.
#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use fieldlink_proto::alarm::{AlarmBatch, AlarmEncoder, AlarmEvent, Cause, Level};
use fieldlink_proto::{Quality, Series, Value};
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn level(severity: u8) -> Level {
    let name = ["ok", "warning", "critical"][severity as usize];
    Level {
        severity,
        name: name.into(),
    }
}

/// One Kinesis record: partition key and bytes.
struct Rec {
    pk: String,
    data: Vec<u8>,
}

fn put(dir: &Path, endpoint: &str, stream: &str, recs: &[Rec]) {
    let file = dir.join(format!("records-{}.jsonl", free_port()));
    let text: String = recs
        .iter()
        .map(|r| {
            let hex: String = r.data.iter().map(|b| format!("{b:02x}")).collect();
            format!("{}\n", json!({"pk": r.pk, "hex": hex}))
        })
        .collect();
    std::fs::write(&file, text).unwrap();
    run_python(&[
        script("put_records.py").to_str().unwrap(),
        endpoint,
        stream,
        file.to_str().unwrap(),
    ]);
}

/// The alarm records of agent `agent` (epoch `epoch`), batch sequence numbers `seqs`: each holds two events, a
/// `vib` transition on one of four devices (through ok → warning → critical → ok, causes of every value type) and
/// every third record a `meter-silent` stale event without a cause. Event times alternate between the previous and
/// the current hour (from one second after each hour's start, 10 ms apart), so exactly two hour partitions are
/// published whenever the test runs.
fn alarm_records(
    agent: &str,
    epoch: u64,
    seqs: std::ops::RangeInclusive<u64>,
) -> Vec<(Rec, AlarmBatch)> {
    assert!(*seqs.end() < 300_000, "event times stay inside their hour");
    let t0 = (now_ms().div_euclid(3_600_000) - 1) * 3_600_000 + 1_000;
    let mut enc = AlarmEncoder::new(3).unwrap();
    seqs.map(|seq| {
        let k = seq as usize;
        let from = (k % 3) as u8;
        let to = ((k + 1) % 3) as u8;
        let ts = t0 + (k as i64 % 2) * 3_600_000 + k as i64 * 10;
        let value = match k % 4 {
            0 => Value::F64(4.25 + k as f64),
            1 => Value::I64(-(k as i64)),
            2 => Value::Bool(k.is_multiple_of(3)),
            _ => Value::Str(format!("state-{k}")),
        };
        let mut events = vec![AlarmEvent {
            rule: "vib".into(),
            rule_seq: seq,
            series: Series {
                key: format!("line3/arm-{}/000/vib", k % 4),
                tags: vec![("site".into(), "muc".into())],
            },
            from: level(from),
            to: level(to),
            ts_ms: ts,
            cause: Some(Cause {
                ts_ms: ts - 3,
                value,
                quality: Quality::Good,
            }),
        }];
        if k.is_multiple_of(3) {
            events.push(AlarmEvent {
                rule: "meter-silent".into(),
                rule_seq: seq / 3,
                series: Series::new(format!("plant/meter-{k}/kwh")),
                from: level(0),
                to: level(2),
                ts_ms: ts + 1,
                cause: None,
            });
        }
        let b = AlarmBatch {
            agent_id: agent.into(),
            epoch,
            seq,
            events,
        };
        (
            Rec {
                pk: agent.into(),
                data: enc.encode(&b).unwrap(),
            },
            b,
        )
    })
    .collect()
}

/// The identity of an event (`alarms::sns::event_id` without its content hash).
fn event_id(agent: &str, epoch: u64, e: &AlarmEvent) -> String {
    format!("{agent}/{epoch:016x}/{}/{}", e.rule, e.rule_seq)
}

/// `(event id, series, from, to, time, cause time)` of an event.
type Key = (String, String, String, String, i64, Option<i64>);

fn key_of(agent: &str, epoch: u64, e: &AlarmEvent) -> Key {
    (
        event_id(agent, epoch, e),
        e.series.key.clone(),
        e.from.name.clone(),
        e.to.name.clone(),
        e.ts_ms,
        e.cause.as_ref().map(|c| c.ts_ms),
    )
}

fn table_key(r: &Json) -> Key {
    let epoch = r["batch_epoch"].as_u64().unwrap();
    (
        format!(
            "{}/{epoch:016x}/{}/{}",
            r["agent_id"].as_str().unwrap(),
            r["rule"].as_str().unwrap(),
            r["rule_seq"]
        ),
        r["series"].as_str().unwrap().to_owned(),
        r["from_level"].as_str().unwrap().to_owned(),
        r["to_level"].as_str().unwrap().to_owned(),
        r["time"].as_i64().unwrap(),
        r["cause_time"].as_i64(),
    )
}

/// `event_id` is the identity and `-<content hash, 16 hex digits>`; the key holds the identity.
fn message_key(m: &Json) -> Key {
    let msg = &m["message"];
    let (id, hash) = msg["event_id"].as_str().unwrap().rsplit_once('-').unwrap();
    assert!(
        hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "{msg}"
    );
    (
        id.to_owned(),
        msg["series"].as_str().unwrap().to_owned(),
        msg["from"]["level"].as_str().unwrap().to_owned(),
        msg["to"]["level"].as_str().unwrap().to_owned(),
        msg["time_ms"].as_i64().unwrap(),
        msg["cause"]["time_ms"].as_i64(),
    )
}

fn counted(keys: impl IntoIterator<Item = Key>) -> BTreeMap<Key, usize> {
    let mut m = BTreeMap::new();
    for k in keys {
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

fn difference(what: &str, want: &BTreeMap<Key, usize>, got: &BTreeMap<Key, usize>) -> String {
    let mut lines = vec![format!(
        "{what}: want {} events, got {}",
        want.len(),
        got.values().sum::<usize>()
    )];
    for (k, n) in got {
        if want.get(k) != Some(n) {
            lines.push(format!(
                "  got {n}× {k:?} (want {})",
                want.get(k).unwrap_or(&0)
            ));
        }
    }
    for k in want.keys() {
        if !got.contains_key(k) {
            lines.push(format!("  missing {k:?}"));
        }
    }
    lines.join("\n")
}

/// What the alarm table holds: rows and the number of landing files left.
fn alarm_table(moto: &Moto, prefix: &str) -> (Vec<Json>, u64) {
    let v: Json = serde_json::from_str(&run_python(&[
        script("alarm_table.py").to_str().unwrap(),
        &moto.endpoint,
        CLOUD_BUCKET,
        prefix,
    ]))
    .unwrap();
    (
        v["rows"].as_array().unwrap().clone(),
        v["landing"].as_u64().unwrap(),
    )
}

fn drain(moto: &Moto, queue_url: &str) -> Vec<Json> {
    serde_json::from_str::<Json>(&run_python(&[
        script("sns_sqs.py").to_str().unwrap(),
        &moto.endpoint,
        "drain",
        queue_url,
    ]))
    .unwrap()
    .as_array()
    .unwrap()
    .clone()
}

/// The test configuration of [`Cloud`] plus `[alarms]` and `[alarms.sns]`; `slow_commits` keeps the worker from
/// committing (so a `kill -9` leaves everything it landed unchecked).
fn config(
    moto: &Moto,
    stream: &str,
    name: &str,
    port: u16,
    topic_arn: &str,
    slow_commits: bool,
    extra: &str,
) -> String {
    let mut c = cloud_toml(
        port,
        &moto.endpoint,
        stream,
        name,
        &format!("s3://{CLOUD_BUCKET}/{stream}"),
        "",
    );
    if slow_commits {
        c = c
            .replace("commit_interval_ms = 2000", "commit_interval_ms = 600000")
            .replace("commit_idle_ms = 1000", "commit_idle_ms = 600000");
    }
    c.push_str(&format!(
        r#"
[alarms]
location = "s3://{CLOUD_BUCKET}/{stream}-alarms"
[alarms.sns]
topic_arn = "{topic_arn}"
timeout_ms = 5000
backoff_initial_ms = 100
backoff_max_ms = 2000
{extra}"#
    ));
    c
}

fn notifications(cloud: &Cloud, outcome: &str) -> f64 {
    http_get(cloud.port, "/metrics")
        .and_then(|m| {
            metric_with(
                &m,
                "fieldlink_cloud_alarm_notifications_total",
                &format!("outcome=\"{outcome}\""),
            )
        })
        .unwrap_or(0.0)
}

#[test]
fn alarm_events_land_in_their_table_and_reach_sns_once_through_a_kill_9_replay_and_resends() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "alarms-cloud";
    let moto = Moto::start(dir.path());
    moto.create(stream, 1, CLOUD_DB, CLOUD_TABLE, CLOUD_BUCKET);
    let sns: Json = serde_json::from_str(&run_python(&[
        script("sns_sqs.py").to_str().unwrap(),
        &moto.endpoint,
        "setup",
        "fieldlink-alarms",
        "all=",
        r#"critical={"level": ["critical"]}"#,
    ]))
    .unwrap();
    let topic_arn = sns["topic_arn"].as_str().unwrap();

    // Two agents; records 1-4 first, then 5-8 with resends of 2 and 3 (same bytes, new Kinesis records).
    let (ea, eb) = (0x0a0a_0a0a_0a0a_0a0a_u64, 0x0b0b_0b0b_0b0b_0b0b_u64);
    let a = alarm_records("edge-a", ea, 1..=8);
    let b = alarm_records("edge-b", eb, 1..=8);
    let mut want = BTreeMap::new();
    let mut first_events = 0;
    for (batch, epoch, agent) in a
        .iter()
        .map(|x| (&x.1, ea, "edge-a"))
        .chain(b.iter().map(|x| (&x.1, eb, "edge-b")))
    {
        for e in &batch.events {
            want.insert(key_of(agent, epoch, e), 1);
            if batch.seq <= 4 {
                first_events += 1;
            }
        }
    }
    // A buffer file of edge-a restored from a backup numbers other events with the identities of record 2's: they
    // are landed and notified too (an SNS marker names the content, not only the identity).
    let restored = {
        let mut batch = a[1].1.clone();
        for e in &mut batch.events {
            e.to = level((e.to.severity + 1) % 3);
            e.ts_ms += 5;
        }
        let data = AlarmEncoder::new(3).unwrap().encode(&batch).unwrap();
        for e in &batch.events {
            want.insert(key_of("edge-a", ea, e), 1);
        }
        Rec {
            pk: "edge-a".into(),
            data,
        }
    };
    let critical: BTreeMap<Key, usize> = want
        .iter()
        .filter(|(k, _)| k.3 == "critical")
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    assert!(critical.len() > 3 && critical.len() < want.len());
    let mut readings = Vec::new();
    for (i, agent) in ["edge-a", "edge-b"].into_iter().enumerate() {
        let rows: Vec<(String, i64, f64)> = (0..50)
            .map(|j| {
                (
                    format!("line3/arm-{i}/000/vib"),
                    now_ms() - 60_000 + j,
                    j as f64,
                )
            })
            .collect();
        let mut batch = batch_of(&rows, agent, 100);
        batch.epoch = [ea, eb][i];
        readings.push(Rec {
            pk: agent.into(),
            data: fieldlink_proto::encode(&batch, 3).unwrap(),
        });
    }

    // Worker 1 lands and notifies the first records but never commits; kill -9.
    let mut first: Vec<Rec> = Vec::new();
    for i in 0..4 {
        for recs in [&a, &b] {
            first.push(Rec {
                pk: recs[i].0.pk.clone(),
                data: recs[i].0.data.clone(),
            });
        }
    }
    first.extend(readings);
    put(dir.path(), &moto.endpoint, stream, &first);
    let port = free_port();
    let mut w1 = Cloud::start_config(
        dir.path(),
        "w1",
        port,
        &config(&moto, stream, "w1", port, topic_arn, true, ""),
    );
    wait_for(
        "worker 1 to publish the first records' events",
        Duration::from_secs(60),
        || (notifications(&w1, "published") as usize == first_events).then_some(()),
    );
    w1.proc.kill();
    let (rows, landing) = alarm_table(&moto, &format!("{stream}-alarms"));
    assert_eq!(
        (rows.len(), landing),
        (0, 0),
        "worker 1 committed nothing: the replay has to land everything"
    );

    // Worker 2 reads the shard from the start (no checkpoint): the events are landed and committed, none is
    // notified again.
    let prefix = format!("{stream}-alarms");
    let first_want: BTreeMap<Key, usize> = want
        .iter()
        .filter(|(k, _)| first_keys(&a, &b, ea, eb).contains(k))
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    let port = free_port();
    let mut w2 = Cloud::start_config(
        dir.path(),
        "w2",
        port,
        &config(&moto, stream, "w2", port, topic_arn, false, ""),
    );
    wait_table(&moto, &prefix, &first_want, "after the replay");
    wait_for(
        "worker 2 to replay the first records",
        Duration::from_secs(30),
        || (notifications(&w2, "skipped") as usize == first_events).then_some(()),
    );
    assert_eq!(
        notifications(&w2, "published"),
        0.0,
        "nothing notified twice"
    );
    w2.proc.kill();

    // Resends of records 2-4 (same bytes, new Kinesis records), records 5-8 and the restored record, read by
    // worker 3, which has no memory of what worker 2 landed (warmup 0): the resent events land a second time (the
    // compactor drops the repeats) and are not notified again; the restored record's are.
    let mut second: Vec<Rec> = Vec::new();
    let mut resent_events = 0;
    for i in [1, 4, 2, 5, 3, 6, 7] {
        for recs in [&a, &b] {
            if i < 4 {
                resent_events += recs[i].1.events.len();
            }
            second.push(Rec {
                pk: recs[i].0.pk.clone(),
                data: recs[i].0.data.clone(),
            });
        }
    }
    second.push(restored);
    put(dir.path(), &moto.endpoint, stream, &second);
    let port = free_port();
    let w3 = Cloud::start_config(
        dir.path(),
        "w3",
        port,
        &config(
            &moto,
            stream,
            "w3",
            port,
            topic_arn,
            false,
            "[dedup]\nwarmup_s = 0\n",
        ),
    );
    let rows = wait_table(&moto, &prefix, &want, "after the resends");
    wait_for(
        "worker 3 to handle every event",
        Duration::from_secs(30),
        || {
            let handled = notifications(&w3, "published") + notifications(&w3, "skipped");
            (handled as usize == want.len() - first_events + resent_events).then_some(())
        },
    );
    let landed_again = http_get(w3.port, "/metrics")
        .and_then(|m| metric(&m, "fieldlink_cloud_alarm_events_landed_total"))
        .unwrap_or(0.0) as usize;
    assert_eq!(
        landed_again,
        want.len() - first_events + resent_events,
        "worker 3 landed the resends again (the table dropped the repeats)"
    );
    for r in &rows {
        let hour = r["time"].as_i64().unwrap().div_euclid(3_600_000) % 24;
        assert_eq!(
            r["hour"].as_str().unwrap().parse::<i64>().unwrap(),
            hour,
            "{r}"
        );
        assert_eq!(
            r["device"].as_str().unwrap(),
            r["series"].as_str().unwrap().rsplit_once('/').unwrap().0
        );
    }
    assert!(
        rows.iter().any(|r| r["cause_value_string"].is_string())
            && rows.iter().any(|r| r["cause_value_bigint"].is_i64())
            && rows.iter().any(|r| r["cause_value_boolean"].is_boolean())
            && rows.iter().any(|r| r["cause_value_double"].is_f64())
            && rows.iter().any(|r| r["cause_time"].is_null()),
        "every kind of cause round-trips"
    );
    let hours: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["hour"].as_str().unwrap()).collect();
    assert_eq!(hours.len(), 2, "two hour partitions: {hours:?}");

    let all = drain(&moto, sns["queues"]["all"].as_str().unwrap());
    let got = counted(all.iter().map(message_key));
    assert!(got == want, "{}", difference("SQS (all)", &want, &got));
    let crit = drain(&moto, sns["queues"]["critical"].as_str().unwrap());
    let got = counted(crit.iter().map(message_key));
    assert!(
        got == critical,
        "{}",
        difference("SQS (level = critical)", &critical, &got)
    );
    for m in &all {
        let (msg, at) = (&m["message"], &m["attributes"]);
        assert_eq!(at["rule"], msg["rule"]);
        assert_eq!(at["level"], msg["to"]["level"]);
        assert_eq!(at["device"], msg["device"]);
        assert_eq!(at["series"], msg["series"]);
        assert_eq!(at["agent"], msg["agent_id"]);
        assert_eq!(at["event_id"], msg["event_id"]);
        assert_eq!(
            at["severity"].as_str().unwrap(),
            msg["to"]["severity"].to_string()
        );
    }
    assert_eq!(
        notifications(&w3, "skipped") as usize,
        resent_events,
        "the resent events were found notified"
    );
    eprintln!(
        "{} events ({} critical): {} notified before the kill -9 and skipped on replay, {} resent events landed again and skipped",
        want.len(),
        critical.len(),
        first_events,
        resent_events
    );
}

/// The keys of the events of records 1-4 of both agents.
fn first_keys(a: &[(Rec, AlarmBatch)], b: &[(Rec, AlarmBatch)], ea: u64, eb: u64) -> Vec<Key> {
    let mut v = Vec::new();
    for (recs, epoch) in [(a, ea), (b, eb)] {
        for (_, batch) in &recs[..4] {
            for e in &batch.events {
                v.push(key_of(&batch.agent_id, epoch, e));
            }
        }
    }
    v
}

/// Waits until the published alarm table holds `want` (nothing in the landing area), then checks it holds exactly
/// that (multisets); returns the rows.
fn wait_table(moto: &Moto, prefix: &str, want: &BTreeMap<Key, usize>, what: &str) -> Vec<Json> {
    let rows = wait_for(
        &format!("{what}: every alarm event in the published alarm table, no landing file left"),
        Duration::from_secs(90),
        || {
            let (rows, landing) = alarm_table(moto, prefix);
            (rows.len() >= want.values().sum::<usize>() && landing == 0).then_some(rows)
        },
    );
    let got = counted(rows.iter().map(table_key));
    assert!(
        got == *want,
        "{}",
        difference(&format!("alarm table {what}"), want, &got)
    );
    rows
}

#[test]
fn without_an_alarms_section_alarm_records_are_dead_lettered_and_readings_still_land() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "alarms-unconfigured";
    let moto = Moto::start(dir.path());
    moto.create(stream, 1, CLOUD_DB, CLOUD_TABLE, CLOUD_BUCKET);
    let recs: Vec<Rec> = alarm_records("edge-a", 7, 1..=2)
        .into_iter()
        .map(|x| x.0)
        .collect();
    put(dir.path(), &moto.endpoint, stream, &recs);
    let cloud = Cloud::start(dir.path(), "solo", &moto.endpoint, stream, "");
    wait_for(
        "two dead-lettered alarm records",
        Duration::from_secs(30),
        || {
            let m = http_get(cloud.port, "/metrics")?;
            (metric_with(
                &m,
                "fieldlink_cloud_dead_letters_total",
                "reason=\"alarm_record\"",
            )? == 2.0)
                .then_some(())
        },
    );
}

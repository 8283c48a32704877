//! Cloud ingest at scale, against moto server (Kinesis, DynamoDB, Timestream, S3) with Parquet read back by
//! pyarrow: two processes sharing shard leases (one SIGKILLed), producer resends, resharding while data flows,
//! dead letters, and Timestream faults moto cannot produce (through a fault-injecting proxy).
//!
//! Records are made here with `fieldlink-proto` (as an agent would) and put by boto3 (`put_records.py`), so
//! each test controls exactly what is in the stream.

#![allow(clippy::unwrap_used)]

use fieldlink_cloud::lease::Fence;
use fieldlink_e2e::*;
use fieldlink_proto::{Batch, Quality, Reading, Series, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const DB: &str = CLOUD_DB;
const TABLE: &str = CLOUD_TABLE;

/// One test record: partition key, bytes, optional explicit hash key.
struct Rec {
    pk: String,
    data: Vec<u8>,
    hash: Option<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Batch `seq` of agent `a`: `n` double readings over four series of one device, unique `(series, time)`,
/// values that say where they come from. Times lie in the last hour (inside Timestream's memory store).
fn batch(a: usize, seq: u64, n: usize, t0: i64) -> Batch {
    let series = (0..4)
        .map(|k| Series::new(format!("site/dev-{a}/m{k}")))
        .collect();
    let readings = (0..n)
        .map(|i| Reading {
            series: (i % 4) as u32,
            ts_ms: t0 + seq as i64 * 1000 + (i / 4) as i64,
            value: Value::F64((a * 1_000_000 + seq as usize * 1000 + i) as f64),
            quality: Quality::Good,
            late: false,
        })
        .collect();
    Batch {
        agent_id: format!("agent-{a}"),
        epoch: 0,
        seq,
        series,
        readings,
    }
}

/// The Kinesis record of a batch of double readings, whose readings are added to `expected`.
fn record_of(b: &Batch, expected: &mut BTreeMap<Key, usize>) -> Rec {
    for r in &b.readings {
        let Value::F64(v) = r.value else {
            unreachable!()
        };
        let key = (
            b.series[r.series as usize].key.clone(),
            r.ts_ms,
            v.to_bits(),
        );
        *expected.entry(key).or_insert(0) += 1;
    }
    Rec {
        pk: b.agent_id.clone(),
        data: fieldlink_proto::encode(b, 3).unwrap(),
        hash: None,
    }
}

/// `agents` × `per_agent` batches of `n` readings, interleaved by sequence number; and the readings they hold.
fn workload(agents: usize, per_agent: u64, n: usize) -> (Vec<Rec>, BTreeMap<Key, usize>) {
    workload_of(0..agents, per_agent, n)
}

/// [`workload`] of the agents numbered `agents`.
fn workload_of(
    agents: std::ops::Range<usize>,
    per_agent: u64,
    n: usize,
) -> (Vec<Rec>, BTreeMap<Key, usize>) {
    let t0 = now_ms() - 3_000_000;
    let mut recs = Vec::new();
    let mut expected = BTreeMap::new();
    for seq in 1..=per_agent {
        for a in agents.clone() {
            recs.push(record_of(&batch(a, seq, n, t0), &mut expected));
        }
    }
    (recs, expected)
}

fn put(dir: &Path, endpoint: &str, stream: &str, recs: &[Rec], args: &[&str]) -> serde_json::Value {
    let file = dir.join(format!("records-{}.jsonl", free_port()));
    let mut text = String::new();
    for r in recs {
        let mut o = serde_json::json!({"pk": r.pk, "hex": hex(&r.data)});
        if let Some(h) = &r.hash {
            o["hash"] = h.clone().into();
        }
        text.push_str(&o.to_string());
        text.push('\n');
    }
    std::fs::write(&file, text).unwrap();
    let mut a = vec![
        script("put_records.py").to_str().unwrap().to_owned(),
        endpoint.to_owned(),
        stream.to_owned(),
        file.to_str().unwrap().to_owned(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    serde_json::from_str(&run_python(&a)).unwrap()
}

/// Waits until Parquet holds `n` rows and Timestream (rewrites collapsed) `ts` readings.
fn wait_landed(
    moto: &Moto,
    stream: &str,
    n: usize,
    ts: usize,
    timeout: Duration,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        last = landed(moto, stream);
        let pq = last["parquet"].as_array().map_or(0, Vec::len);
        let t = last["timestream"].as_array().map_or(0, Vec::len);
        if pq >= n && t >= ts {
            return last;
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    panic!(
        "timed out: parquet {} of {n}, timestream {} of {ts}",
        last["parquet"].as_array().map_or(0, Vec::len),
        last["timestream"].as_array().map_or(0, Vec::len)
    );
}

fn assert_exactly_once(v: &serde_json::Value, expected: &BTreeMap<Key, usize>) {
    let ts = counted(landed_rows(v, "timestream"));
    let pq = counted(landed_rows(v, "parquet"));
    assert!(
        ts == *expected,
        "{}",
        describe_difference("timestream", expected, &ts)
    );
    assert!(
        pq == *expected,
        "{}",
        describe_difference("parquet", expected, &pq)
    );
    assert_eq!(
        v["timestream_conflicts"], 0,
        "a Timestream record was rewritten with different content"
    );
    assert_eq!(
        v["timestream_erased_measures"], 0,
        "a Timestream write replaced a record and erased measures another batch wrote"
    );
}

/// A worker's configuration for `stream` on moto, Parquet under the test bucket, metrics on `port`.
fn worker_toml(port: u16, moto: &Moto, stream: &str, worker: &str) -> String {
    cloud_toml(
        port,
        &moto.endpoint,
        stream,
        worker,
        &format!("s3://{CLOUD_BUCKET}/{stream}"),
        "",
    )
}

/// Two agents per shard of a four-shard stream (explicit hash keys: the four shards split the hash range evenly).
fn spread_over_four_shards(recs: &mut [Rec]) {
    for r in recs.iter_mut() {
        let a: u128 = r.pk.trim_start_matches("agent-").parse().unwrap();
        r.hash = Some(((a % 4) * (1u128 << 126) + 1).to_string());
    }
}

fn setup(dir: &Path, stream: &str, shards: u32) -> Moto {
    let moto = Moto::start(dir);
    moto.create(stream, shards, DB, TABLE, CLOUD_BUCKET);
    moto
}

#[test]
fn two_workers_share_four_shards_and_the_survivor_takes_over_after_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "scale";
    let moto = setup(dir.path(), stream, 4);
    let mut a = Cloud::start(dir.path(), "a", &moto.endpoint, stream, "");
    wait_for(
        "worker a to take all four shards",
        Duration::from_secs(30),
        || (a.metric("fieldlink_cloud_leases_held") == 4.0).then_some(()),
    );
    let mut b = Cloud::start(dir.path(), "b", &moto.endpoint, stream, "");
    // b steals one lease per round until the load is even.
    wait_for(
        "the leases to be shared 2 and 2",
        Duration::from_secs(30),
        || {
            (a.metric("fieldlink_cloud_leases_held") == 2.0
                && b.metric("fieldlink_cloud_leases_held") == 2.0)
                .then_some(())
        },
    );

    let (mut recs, expected) = workload(8, 50, 200);
    spread_over_four_shards(&mut recs);
    let n = expected.len();
    let (endpoint, path) = (moto.endpoint.clone(), dir.path().to_owned());
    let producer =
        std::thread::spawn(move || put(&path, &endpoint, stream, &recs, &["--rate", "50"]));
    // Kill a mid-stream, once it has committed something.
    wait_for("worker a to checkpoint", Duration::from_secs(30), || {
        (a.metric("fieldlink_cloud_checkpoints_total") >= 2.0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(700));
    a.proc.kill();
    let killed = Instant::now();
    wait_for(
        "worker b to take every shard",
        Duration::from_secs(30),
        || (b.metric("fieldlink_cloud_leases_held") == 4.0).then_some(()),
    );
    let takeover = killed.elapsed();
    eprintln!("b holds all four shards {takeover:?} after a was killed (lease 3 s)");
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?} with a 3 s lease"
    );
    let put_out = producer.join().unwrap();
    assert_eq!(put_out["put"], 400, "{put_out}");
    assert_eq!(
        put_out["by_shard"].as_object().unwrap().len(),
        4,
        "{put_out}"
    );

    let v = wait_landed(&moto, stream, n, n, Duration::from_secs(90));
    b.proc.terminate(Duration::from_secs(30));
    let v2 = landed(&moto, stream);
    assert_eq!(
        v["parquet"], v2["parquet"],
        "rows changed after the last commit"
    );
    assert_exactly_once(&v2, &expected);
    eprintln!(
        "{n} readings exactly once; Timestream rewrites collapsed: {} of {} writes; Parquet files: {}",
        v2["timestream_rewrites"],
        v2["timestream_records"],
        v2["parquet_files"].as_array().unwrap().len()
    );
}

/// One configuration copied to two workers with `worker_id` set in it (as a task definition shares one with every
/// replica): they count as one worker and take nothing from each other, and everything lands once with the
/// checkpoints moving. Before December 2026 each took the other's leases back every round ("ours by name but not
/// worked on"): no commit finished and no checkpoint moved.
#[test]
fn two_workers_with_one_worker_id_take_nothing_from_each_other_and_land_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "twins";
    let moto = setup(dir.path(), stream, 4);
    let start = |file: &str| {
        let port = free_port();
        let config = worker_toml(port, &moto, stream, "shared-id");
        Cloud::start_config(dir.path(), file, port, &config)
    };
    let mut a = start("twin-a");
    wait_for(
        "the first to take the shards",
        Duration::from_secs(30),
        || (a.metric("fieldlink_cloud_leases_held") == 4.0).then_some(()),
    );
    let mut b = start("twin-b");
    let (recs, expected) = workload(8, 20, 100);
    put(
        dir.path(),
        &moto.endpoint,
        stream,
        &recs,
        &["--rate", "100"],
    );
    let n = expected.len();
    let v = wait_landed(&moto, stream, n, n, Duration::from_secs(90));
    // Commits every 2 s: checkpoints moved.
    wait_for("checkpoints", Duration::from_secs(30), || {
        (a.metric("fieldlink_cloud_checkpoints_total") >= 4.0).then_some(())
    });
    let lost = |c: &Cloud| {
        http_get(c.port, "/metrics")
            .and_then(|m| metric_with(&m, "fieldlink_cloud_lease_changes_total", "\"lost\""))
            .unwrap_or(0.0)
    };
    // The compactor lease likewise: never both compacting (before, each took it back from the other every round).
    for _ in 0..12 {
        let leaders =
            a.metric("fieldlink_compaction_leader") + b.metric("fieldlink_compaction_leader");
        assert!(leaders <= 1.0, "both processes hold the compactor lease");
        std::thread::sleep(Duration::from_millis(250));
    }
    let (lost_a, lost_b) = (lost(&a), lost(&b));
    let held = a.metric("fieldlink_cloud_leases_held") + b.metric("fieldlink_cloud_leases_held");
    a.proc.terminate(Duration::from_secs(30));
    b.proc.terminate(Duration::from_secs(30));
    // (A lease may still change hands once if a loaded machine holds a renewal past the 3 s lease: not asserted.)
    assert_eq!(held, 4.0, "every shard worked on");
    assert_exactly_once(&landed(&moto, stream), &expected);
    eprintln!(
        "two processes under one worker id: {n} readings once, leases lost {lost_a} and {lost_b}, {} Parquet files",
        v["parquet_files"].as_array().unwrap().len()
    );
}

/// The sinks of one process share each shard's checkpoint, so a sink that fails holds the others of its process
/// back (`a_deleted_timestream_table_fails_health_holds_the_checkpoint_and_recovers_by_itself_once_recreated`).
/// A sink that must not wait for another runs in its own deployment, with its own lease table: a second consumer
/// of the stream. Here Parquet and Timestream in two processes: with the Timestream
/// table deleted, Parquet lands everything meanwhile; once the table is back, Timestream does too, each once.
#[test]
fn a_sink_in_its_own_deployment_keeps_landing_while_another_fails() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "apart";
    let moto = setup(dir.path(), stream, 1);
    let config = |port: u16, worker: &str| {
        worker_toml(port, &moto, stream, worker).replace(
            "table = \"leases-apart\"",
            &format!("table = \"leases-apart-{worker}\""),
        )
    };
    let (pq_port, ts_port) = (free_port(), free_port());
    let pq_text = config(pq_port, "pq");
    let ts_at = pq_text.find("[timestream]").unwrap();
    let pq_at = pq_text.find("[parquet]").unwrap();
    let parquet_only = format!("{}{}", &pq_text[..ts_at], &pq_text[pq_at..]);
    let ts_text = config(ts_port, "ts");
    let timestream_only = format!(
        "dead_letter = \"s3://{CLOUD_BUCKET}/{stream}-ts-dead\"\n{}",
        &ts_text[..ts_text.find("[parquet]").unwrap()]
    );
    let pq = Cloud::start_config(dir.path(), "pq", pq_port, &parquet_only);
    let ts = Cloud::start_config(dir.path(), "ts", ts_port, &timestream_only);

    let (first, expected_first) = workload_of(0..2, 5, 40);
    put(dir.path(), &moto.endpoint, stream, &first, &[]);
    let n1 = expected_first.len();
    wait_landed(&moto, stream, n1, n1, Duration::from_secs(60));
    timestream_table(&moto, "delete");
    let (second, expected_second) = workload_of(2..4, 5, 40);
    put(dir.path(), &moto.endpoint, stream, &second, &[]);
    let line = wait_sink_failing(&ts, "timestream");
    let n = n1 + expected_second.len();
    // Parquet's deployment goes on: everything in Parquet while Timestream still fails (moto's data dump keeps the
    // deleted table's records: the first part).
    let v = wait_landed(&moto, stream, n, 0, Duration::from_secs(60));
    assert_eq!(
        v["timestream"].as_array().map_or(0, Vec::len),
        n1,
        "Timestream landed while its table was gone"
    );
    let pq_health = http_status(pq.port, "/health").unwrap();
    assert_eq!(pq_health.0, 200, "{pq_health:?}");
    timestream_table(&moto, "create");
    let v = wait_landed(&moto, stream, n, n, Duration::from_secs(90));
    let mut all = expected_first.clone();
    all.extend(expected_second.clone());
    assert_exactly_once(&v, &all);
    eprintln!("sinks apart: Parquet landed all {n} while {line}; Timestream landed the rest once the table was back");
}

/// `[parquet] max_staged_rows` bounds the rows staged by all the shards of a process (memory that would otherwise
/// grow with the shards a worker holds): with time-based commits 10 minutes away, four shards commit on the
/// budget alone, and everything lands once.
#[test]
fn the_process_wide_staged_rows_budget_commits_shards_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "budget";
    let moto = setup(dir.path(), stream, 4);
    let port = free_port();
    let config = worker_toml(port, &moto, stream, "w")
        .replace(
            "commit_interval_ms = 2000\ncommit_idle_ms = 1000",
            "commit_interval_ms = 600000\ncommit_idle_ms = 600000",
        )
        .replace(
            "max_rows_per_file = 5000",
            "max_rows_per_file = 5000\nmax_staged_rows = 1200",
        );
    let cloud = Cloud::start_config(dir.path(), "budget", port, &config);
    let (mut recs, expected) = workload(8, 20, 50);
    spread_over_four_shards(&mut recs);
    let n = expected.len();
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    // Parquet holds what committed on the budget: at most about the budget stays staged (a shard holding its share
    // commits on its tick even when no record comes).
    let v = wait_landed(&moto, stream, n - 1200 - 4 * 50, 0, Duration::from_secs(60));
    let files = cloud.metric("fieldlink_parquet_files_total");
    assert!(files >= 4.0, "{files} files");
    eprintln!(
        "budget 1,200 staged rows over 4 shards: {} of {n} rows committed by the budget alone in {files} files",
        v["parquet"].as_array().unwrap().len()
    );
    // A stop commits the rest; a compaction round publishes it: everything once.
    let mut cloud = cloud;
    cloud.proc.terminate(Duration::from_secs(30));
    compact_once(&dir.path().join("cloud-budget.toml"));
    assert_exactly_once(&landed(&moto, stream), &expected);
}

#[test]
fn a_batch_put_twice_lands_once_even_on_another_shard() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "resend";
    let moto = setup(dir.path(), stream, 2);
    let cloud = Cloud::start(dir.path(), "solo", &moto.endpoint, stream, "");
    let (mut recs, expected) = workload(4, 20, 100);
    let n = expected.len();
    let (low, high) = ("0".to_owned(), (u128::MAX).to_string());
    for (i, r) in recs.iter_mut().enumerate() {
        r.hash = Some(if i % 2 == 0 {
            low.clone()
        } else {
            high.clone()
        });
    }
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    // The resend: the same bytes, each on the other shard.
    for r in recs.iter_mut() {
        r.hash = Some(if r.hash.as_deref() == Some("0") {
            high.clone()
        } else {
            low.clone()
        });
    }
    let out = put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    assert_eq!(out["by_shard"].as_object().unwrap().len(), 2, "{out}");
    let v = wait_landed(&moto, stream, n, n, Duration::from_secs(60));
    wait_for("every copy to be read", Duration::from_secs(30), || {
        (cloud.metric("fieldlink_cloud_records_total") >= 160.0).then_some(())
    });
    assert_eq!(
        cloud.metric("fieldlink_cloud_batches_duplicate_total"),
        80.0
    );
    assert_eq!(cloud.metric("fieldlink_cloud_batches_landed_total"), 80.0);
    std::thread::sleep(Duration::from_secs(2));
    let last = landed(&moto, stream);
    assert_exactly_once(&last, &expected);
    assert_eq!(v["timestream_rewrites"], 0);
    assert_eq!(
        last["timestream_rewrites"], 0,
        "a resend skipped by the cloud writes nothing to Timestream"
    );
}

#[test]
fn a_resend_read_by_the_next_process_after_a_restart_lands_once() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "restart-resend";
    let moto = setup(dir.path(), stream, 1);
    let (recs, expected) = workload(4, 10, 50);
    let n = expected.len();
    let mut first = Cloud::start(dir.path(), "first", &moto.endpoint, stream, "");
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    wait_landed(&moto, stream, n, n, Duration::from_secs(60));
    // SIGTERM: the worker commits (checkpoint past every record) and releases its lease.
    first.proc.terminate(Duration::from_secs(30));
    // The agents resend everything (their PutRecords answers were lost), and a new process reads the shard.
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    let second = Cloud::start(dir.path(), "second", &moto.endpoint, stream, "");
    wait_for("the resends to be read", Duration::from_secs(60), || {
        (second.metric("fieldlink_cloud_records_total") >= recs.len() as f64).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        second.metric("fieldlink_cloud_batches_duplicate_total"),
        recs.len() as f64,
        "every resend skipped: the new process learned the records before its checkpoint"
    );
    assert_exactly_once(&landed(&moto, stream), &expected);
}

#[test]
fn split_and_merge_while_data_flows_lose_nothing_and_keep_per_series_order() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "reshard";
    let moto = setup(dir.path(), stream, 2);
    let cloud = Cloud::start(dir.path(), "solo", &moto.endpoint, stream, "");
    let (recs, expected) = workload(6, 60, 50);
    let n = expected.len();
    // Split shard 0 into 2 and 3, then merge 3 with its neighbour 1 into 4 (moto's ids are sequential).
    let out = put(
        dir.path(),
        &moto.endpoint,
        stream,
        &recs,
        &[
            "--rate",
            "60",
            "--at",
            "120:split:shardId-000000000000",
            "--at",
            "240:merge:shardId-000000000003:shardId-000000000001",
        ],
    );
    assert_eq!(out["reshards"].as_array().unwrap().len(), 2, "{out}");
    assert!(out["by_shard"].as_object().unwrap().len() >= 4, "{out}");
    let v = wait_landed(&moto, stream, n, n, Duration::from_secs(90));
    assert_exactly_once(&v, &expected);
    // Parents 0, 1 and 3 were read to their end before their children started.
    wait_for("three shards to finish", Duration::from_secs(20), || {
        let m = http_get(cloud.port, "/metrics")?;
        (metric_with(
            &m,
            "fieldlink_cloud_lease_changes_total",
            "kind=\"finished\"",
        )? >= 3.0)
            .then_some(())
    });
    // Every agent's batches landed in the order they were put (partition key = agent).
    let order = cloud.landing_order();
    assert_eq!(order.len(), recs.len(), "batches landed");
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for (agent, seq) in &order {
        let prev = last.insert(agent.clone(), *seq).unwrap_or(0);
        assert_eq!(*seq, prev + 1, "{agent}: batch {seq} landed after {prev}");
    }
}

#[test]
fn garbage_a_decompression_bomb_and_an_over_limit_reading_are_dead_lettered_and_the_rest_lands() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "dead";
    let moto = setup(dir.path(), stream, 1);
    let cloud = Cloud::start(dir.path(), "solo", &moto.endpoint, stream, "");
    let (good, expected) = workload(2, 3, 40);
    // A bomb: a valid header, then a zstd frame of 64 MiB of zeros (64 KiB of input) instead of the body.
    let mut bomb = good[0].data.clone();
    let header = 19 + bomb[6] as usize;
    bomb.truncate(header);
    bomb.extend(zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap());
    assert!(bomb.len() < 64 << 10, "bomb is {} bytes", bomb.len());
    // A batch whose one reading is a string longer than Timestream allows (2,048 bytes).
    let long = Batch {
        agent_id: "agent-long".into(),
        epoch: 0,
        seq: 1,
        series: vec![Series::new("site/dev-long/label")],
        readings: vec![Reading {
            series: 0,
            ts_ms: now_ms() - 60_000,
            value: Value::Str("x".repeat(3000)),
            quality: Quality::Good,
            late: false,
        }],
    };
    let rec = |data: Vec<u8>| Rec {
        pk: "p".into(),
        data,
        hash: None,
    };
    let mut recs = Vec::new();
    let mut good = good.into_iter();
    recs.extend(good.by_ref().take(2));
    recs.push(rec(b"not a fieldlink record at all".to_vec()));
    recs.extend(good.by_ref().take(2));
    recs.push(rec(bomb));
    recs.push(rec(fieldlink_proto::encode(&long, 3).unwrap()));
    recs.extend(good);
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);

    let n = expected.len();
    wait_landed(&moto, stream, n, n, Duration::from_secs(60));
    let v = wait_for("the dead letters", Duration::from_secs(30), || {
        let v = landed(&moto, stream);
        (v["dead_letters"].as_array()?.len() >= 3).then_some(v)
    });
    let dead: Vec<&str> = v["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    eprintln!("dead letters: {dead:?}");
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(dead
        .iter()
        .any(|k| k.contains("/_dead_letter/kinesis/reason=bad_magic/")));
    assert!(dead
        .iter()
        .any(|k| k.contains("/_dead_letter/kinesis/reason=over_limit/")));
    assert!(dead
        .iter()
        .any(|k| k.contains("/_dead_letter/timestream/agent-long-0-1-")));
    let lines = v["dead_letter_lines"].as_array().unwrap();
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0]["reason"]
            .as_str()
            .unwrap()
            .contains("string of 3000 bytes, allowed 1..=2048"),
        "{}",
        lines[0]
    );
    let m = http_get(cloud.port, "/metrics").unwrap();
    assert_eq!(
        metric_with(
            &m,
            "fieldlink_cloud_dead_letters_total",
            "reason=\"bad_magic\""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_with(
            &m,
            "fieldlink_cloud_dead_letters_total",
            "reason=\"over_limit\""
        ),
        Some(1.0)
    );
    // The good readings land once.
    assert_exactly_once(&v, &expected);
}

#[test]
fn timestream_throttling_and_rejected_records_from_a_fault_proxy_are_retried_and_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "faults";
    let moto = setup(dir.path(), stream, 2);
    let proxy = FaultProxy::start(dir.path(), &moto.endpoint);
    proxy.set("ts_throttle=0.3&ts_reject=0.05");
    let cloud = Cloud::start(dir.path(), "solo", &proxy.endpoint, stream, "");
    let (recs, expected) = workload(4, 30, 100);
    let n = expected.len();
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    wait_landed(&moto, stream, n, 0, Duration::from_secs(90));
    let stats = wait_for(
        "every Timestream call to be answered",
        Duration::from_secs(60),
        || {
            let s = proxy.stats();
            let written =
                s["ts_forwarded_records"].as_u64()? + s["ts_rejected_records"].as_u64()?;
            // 25 records per batch (a device's four measures at one time share a record).
            (written >= 120 * 25).then_some(s)
        },
    );
    // Dead letters are written once a batch's calls are all answered.
    let rejected = stats["ts_rejected_records"].as_u64().unwrap();
    let v = wait_for(
        "the rejected records' dead letters",
        Duration::from_secs(30),
        || {
            let v = landed(&moto, stream);
            (v["dead_letter_lines"].as_array()?.len() as u64 >= rejected).then_some(v)
        },
    );
    eprintln!("proxy: {stats}");
    assert!(
        rejected > 0 && stats["ts_throttled_calls"].as_u64().unwrap() > 0,
        "{stats}"
    );
    // Every throttled call was seen and retried by the sink (SDK retries are off for Timestream).
    assert_eq!(
        cloud.metric("fieldlink_timestream_throttled_total"),
        stats["ts_throttled_calls"].as_f64().unwrap()
    );
    // Every rejected record is in the dead-letter location with Timestream's reason.
    let lines = v["dead_letter_lines"].as_array().unwrap();
    assert_eq!(lines.len() as u64, rejected);
    assert!(lines
        .iter()
        .all(|l| l["reason"].as_str().unwrap().contains("fault proxy")));
    // Timestream holds exactly the rest; Parquet holds everything once.
    let mut dead_readings: BTreeMap<Key, usize> = BTreeMap::new();
    for l in lines {
        let dims = l["dimensions"].as_object().unwrap();
        for (m, val) in l["measures"].as_object().unwrap() {
            let key = (
                format!("{}/{m}", dims["device"].as_str().unwrap()),
                l["time_ms"].as_i64().unwrap(),
                val.as_str().unwrap().parse::<f64>().unwrap().to_bits(),
            );
            *dead_readings.entry(key).or_insert(0) += 1;
        }
    }
    let ts = counted(landed_rows(&v, "timestream"));
    let mut want_ts = expected.clone();
    want_ts.retain(|k, _| !dead_readings.contains_key(k));
    assert_eq!(
        want_ts.len() + dead_readings.len(),
        n,
        "dead letters name readings that exist"
    );
    assert!(
        ts == want_ts,
        "{}",
        describe_difference("timestream", &want_ts, &ts)
    );
    let pq = counted(landed_rows(&v, "parquet"));
    assert!(
        pq == expected,
        "{}",
        describe_difference("parquet", &expected, &pq)
    );
}

#[test]
fn a_task_whose_lease_was_lost_and_retaken_can_no_longer_commit_while_the_current_task_can() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let (rt, t) = lease_table(&moto, "leases-fence");
    let shard = "shardId-000000000000";
    rt.block_on(async {
        assert!(t
            .create(shard, &[], fieldlink_cloud::lease::TRIM_HORIZON)
            .await
            .unwrap());
        // Worker w1 takes the lease and starts a task on it; renewals do not fence that task.
        let first = t.take(shard, 0, "w1").await.unwrap().unwrap();
        let f1 = Fence::of(&first).unwrap();
        assert!(t.renew(shard, first.counter, "w1").await.unwrap());
        assert!(t.renew(shard, first.counter + 1, "w1").await.unwrap());
        assert!(t.begin_commit(shard, "10", &f1).await.unwrap());
        assert!(t.checkpoint(shard, "10", &f1).await.unwrap());
        // w1 stalls past its lease: w2 takes the shard, then w1 takes it back with a new task while its
        // first task still runs.
        let stolen = t
            .take(shard, first.counter + 2, "w2")
            .await
            .unwrap()
            .unwrap();
        let second = t.take(shard, stolen.counter, "w1").await.unwrap().unwrap();
        let f2 = Fence::of(&second).unwrap();
        assert!(t.renew(shard, second.counter, "w1").await.unwrap());
        // The stale task is refused, pending checkpoint and checkpoint alike.
        assert!(
            !t.begin_commit(shard, "20", &f1).await.unwrap(),
            "the stale task wrote a pending checkpoint"
        );
        assert!(
            !t.checkpoint(shard, "20", &f1).await.unwrap(),
            "the stale task moved the checkpoint"
        );
        // The current task commits.
        assert!(t.begin_commit(shard, "30", &f2).await.unwrap());
        assert!(t.renew(shard, second.counter + 1, "w1").await.unwrap());
        assert!(t.checkpoint(shard, "30", &f2).await.unwrap());
        let l = t.list().await.unwrap().pop().unwrap();
        assert_eq!((l.checkpoint.as_str(), l.pending), ("30", None));
        // Releasing (graceful stop) is fenced the same way.
        assert!(!t.release(shard, &f1).await.unwrap());
        assert!(t.release(shard, &f2).await.unwrap());
    });
}

/// A lease created again after the table lost it (deleted and recreated under the running service) is the lease as
/// last listed: its checkpoint, its begun commit (the next reader repeats that commit, whose files a paused writer
/// may still be putting) and a counter no fence of the old table holds, so a task fenced on the old table can never
/// commit on the new one, not even one whose take came after the listing.
#[test]
fn a_lease_created_again_keeps_its_checkpoint_and_begun_commit_and_fences_the_old_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let (rt, t) = lease_table(&moto, "leases-again");
    let shard = "shardId-000000000001";
    rt.block_on(async {
        assert!(t
            .create(
                shard,
                &["shardId-000000000000".into()],
                fieldlink_cloud::lease::TRIM_HORIZON
            )
            .await
            .unwrap());
        let mut lease = t.take(shard, 0, "w1").await.unwrap().unwrap();
        for _ in 0..3 {
            assert!(t.renew(shard, lease.counter, "w1").await.unwrap());
            lease.counter += 1;
        }
        let old = Fence::of(&lease).unwrap();
        assert!(t.checkpoint(shard, "10", &old).await.unwrap());
        assert!(t.begin_commit(shard, "20", &old).await.unwrap());
        let last = t.list().await.unwrap().pop().unwrap();
        // After the listing, before the deletion: w1 renews, then w2 steals the lease (its task's fence is newer
        // than the listing by two).
        assert!(t.renew(shard, last.counter, "w1").await.unwrap());
        let stolen = t
            .take(shard, last.counter + 1, "w2")
            .await
            .unwrap()
            .unwrap();
        let newer = Fence::of(&stolen).unwrap();

        // The table is reset; the lease is created again as listed.
        run_python(&[
            script("lease_table.py").to_str().unwrap(),
            &moto.endpoint,
            "leases-again",
            "recreate",
        ]);
        assert!(t.create_again(&last).await.unwrap());
        assert!(!t.create_again(&last).await.unwrap(), "created once");
        let again = t.list().await.unwrap().pop().unwrap();
        assert_eq!(
            (
                again.checkpoint.as_str(),
                again.pending.as_deref(),
                &again.parents,
                &again.owner
            ),
            ("10", Some("20"), &last.parents, &None)
        );
        assert!(again.counter > last.counter);
        // Taken again by either worker, again and again: neither old task (fenced on the listed lease, or on a
        // take after the listing) can commit on the new table.
        let mut counter = again.counter;
        for who in ["w2", "w1", "w2", "w1"] {
            let taken = t.take(shard, counter, who).await.unwrap().unwrap();
            for f in [&old, &newer] {
                assert!(!t.begin_commit(shard, "30", f).await.unwrap());
                assert!(!t.checkpoint(shard, "30", f).await.unwrap());
            }
            counter = taken.counter;
        }
    });
}

fn timestream_table(moto: &Moto, action: &str) {
    run_python(&[
        script("timestream_table.py").to_str().unwrap(),
        &moto.endpoint,
        DB,
        TABLE,
        action,
    ]);
}

/// Waits until `/health` answers 503 with a `sink: FAIL` line; returns that line.
fn wait_sink_failing(cloud: &Cloud, sink: &str) -> String {
    wait_for(
        &format!("/health to fail for {sink}"),
        Duration::from_secs(30),
        || {
            let (status, body) = http_status(cloud.port, "/health")?;
            let line = body
                .lines()
                .find(|l| l.starts_with(&format!("{sink}: FAIL")))?;
            (status == 503).then(|| line.to_owned())
        },
    )
}

fn sink_metric(cloud: &Cloud, name: &str, labels: &str) -> f64 {
    http_get(cloud.port, "/metrics")
        .and_then(|m| metric_with(&m, name, labels))
        .unwrap_or(0.0)
}

#[test]
fn a_deleted_timestream_table_fails_health_holds_the_checkpoint_and_recovers_by_itself_once_recreated(
) {
    let dir = tempfile::tempdir().unwrap();
    let stream = "sinkfail";
    let moto = setup(dir.path(), stream, 1);
    let (rt, leases) = lease_table(&moto, &format!("leases-{stream}"));
    let cloud = Cloud::start(dir.path(), "solo", &moto.endpoint, stream, "");
    let lease = || rt.block_on(leases.list()).unwrap().pop().unwrap();

    let (before, expected_before) = workload_of(0..2, 5, 40);
    put(dir.path(), &moto.endpoint, stream, &before, &[]);
    let n1 = expected_before.len();
    wait_landed(&moto, stream, n1, n1, Duration::from_secs(60));
    // The commit that wrote those rows has moved the checkpoint (its pending end is cleared).
    let checkpoint = wait_for("the checkpoint", Duration::from_secs(20), || {
        let l = lease();
        (l.pending.is_none() && l.checkpoint != fieldlink_cloud::lease::TRIM_HORIZON)
            .then_some(l.checkpoint)
    });

    // The operator deletes the table; data keeps coming.
    timestream_table(&moto, "delete");
    let (after, expected_after) = workload_of(2..4, 5, 40);
    put(dir.path(), &moto.endpoint, stream, &after, &[]);
    let line = wait_sink_failing(&cloud, "timestream");
    eprintln!("/health: {line}");
    assert!(
        line.contains("ResourceNotFoundException")
            && line.contains("WriteRecords")
            && line.contains("permanent"),
        "{line}"
    );
    assert!(
        line.len() < 200 && !line.contains('{'),
        "not one short sentence: {line}"
    );
    assert_eq!(
        sink_metric(
            &cloud,
            "fieldlink_cloud_sink_failing",
            "sink=\"timestream\""
        ),
        1.0
    );
    wait_for("the sink to keep retrying", Duration::from_secs(30), || {
        (sink_metric(
            &cloud,
            "fieldlink_cloud_sink_errors_total",
            "class=\"permanent\"",
        ) >= 3.0)
            .then_some(())
    });
    // Nothing past the unwritten data is checkpointed or committed.
    let l = lease();
    assert_eq!(
        l.checkpoint, checkpoint,
        "the checkpoint moved past unwritten data"
    );
    let v = landed(&moto, stream);
    assert_eq!(
        v["parquet"].as_array().unwrap().len(),
        n1,
        "rows of unwritten batches were committed"
    );

    // The operator recreates the table: the sink recovers by itself.
    timestream_table(&moto, "create");
    let recreated = Instant::now();
    wait_for("/health to recover", Duration::from_secs(30), || {
        let (status, body) = http_status(cloud.port, "/health")?;
        (status == 200 && body.contains("timestream: ok")).then_some(())
    });
    eprintln!(
        "healthy {:?} after the table was recreated (retry every 1 s)",
        recreated.elapsed()
    );
    assert_eq!(
        sink_metric(
            &cloud,
            "fieldlink_cloud_sink_failing",
            "sink=\"timestream\""
        ),
        0.0
    );
    let n2 = expected_after.len();
    let v = wait_landed(&moto, stream, n1 + n2, n1 + n2, Duration::from_secs(60));
    // Every reading exactly once: in Parquet, and in Timestream (moto's data dump keeps the records of the
    // deleted table, so the readings from before the deletion count there once too).
    let mut all = expected_before.clone();
    all.extend(expected_after.clone());
    assert_exactly_once(&v, &all);
    assert_ne!(lease().checkpoint, checkpoint);
}

#[test]
fn sigterm_while_a_sink_fails_stops_promptly_and_the_next_start_lands_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "sinkstop";
    let moto = setup(dir.path(), stream, 2);
    timestream_table(&moto, "delete");
    let mut a = Cloud::start(dir.path(), "a", &moto.endpoint, stream, "");
    let (recs, expected) = workload(4, 5, 40);
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    wait_sink_failing(&a, "timestream");
    let t = Instant::now();
    a.proc.terminate(Duration::from_secs(30));
    let stopped = t.elapsed();
    eprintln!("stopped {stopped:?} after SIGTERM while Timestream failed");
    assert!(
        stopped < Duration::from_secs(10),
        "SIGTERM took {stopped:?}"
    );

    timestream_table(&moto, "create");
    let b = Cloud::start(dir.path(), "b", &moto.endpoint, stream, "");
    let n = expected.len();
    let v = wait_landed(&moto, stream, n, n, Duration::from_secs(60));
    assert_exactly_once(&v, &expected);
    drop(b);
}

// ---- Batch identity across buffers: real agents (Mosquitto in, moto out) in front of the cloud service. ----

/// The readings `publish_numbered` sent for the acknowledged numbers.
fn numbered(acked: &[u64]) -> BTreeMap<Key, usize> {
    counted(acked.iter().map(|&i| {
        (
            format!("crash/dev{}/n", i % 10),
            1_772_431_200_000 + i as i64,
            (i as f64).to_bits(),
        )
    }))
}

/// A one-shard stream and a cloud service for readings of `publish_numbered` (their times are in March 2026:
/// only the magnetic store takes them).
fn moto_and_cloud_for_agents(dir: &Path, stream: &str) -> (Moto, Cloud) {
    let moto = setup(dir, stream, 1);
    let cloud = Cloud::start(
        dir,
        "solo",
        &moto.endpoint,
        stream,
        "magnetic_store_writes = true",
    );
    (moto, cloud)
}

/// Waits until the agent has sent `n` readings.
fn wait_sent(agent: &AgentProc, n: usize) {
    wait_for(
        "the agent to send every reading",
        Duration::from_secs(60),
        || (agent.metric("fieldlink_readings_sent_total") as usize >= n).then_some(()),
    );
}

/// One agent `gw` (started) behind a Mosquitto, sending to a one-shard stream a cloud service lands.
struct Gateway {
    dir: tempfile::TempDir,
    moto: Moto,
    cloud: Cloud,
    broker: Mosquitto,
    agent: AgentProc,
}

impl Gateway {
    fn start(stream: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (moto, cloud) = moto_and_cloud_for_agents(dir.path(), stream);
        let broker = Mosquitto::start(dir.path());
        let mut agent = AgentProc::new(
            dir.path(),
            "gw",
            broker.port,
            &moto.endpoint,
            stream,
            "",
            "",
        );
        agent.start();
        Self {
            dir,
            moto,
            cloud,
            broker,
            agent,
        }
    }
}

/// A re-imaged gateway starts a new buffer file (a new epoch, batches numbered from 1 again) and may receive readings
/// the old image had already sent: messages whose acknowledgement never reached the broker (a kill -9 right after
/// the commit, a connection that dropped first) are redelivered, and a QoS 1 publisher may resend around the
/// swap. The new file cannot know them; the sinks must still hold each reading once.
#[test]
fn a_re_imaged_gateway_numbering_batches_from_one_again_lands_everything_once() {
    let Gateway {
        dir,
        moto,
        cloud,
        broker,
        mut agent,
    } = Gateway::start("reimage");
    let stream = "reimage";
    // The old image: many small batches (slow publishing), so the new image's numbers 1.. were all used.
    let mut acked = publish_numbered_from(broker.port, 0, 600, 200.0, 0, dir.path());
    wait_sent(&agent, acked.len());
    let first_batches = agent.metric("fieldlink_records_sent_total");
    agent.stop();
    // Re-imaged: same config and agent_id, a new buffer file.
    for ext in ["db", "db-wal", "db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("gw.{ext}")));
    }
    agent.start();
    // The old image's last 100 readings arrive again (same payloads: same series, time and value).
    let again = publish_numbered_from(broker.port, 500, 100, 1000.0, 0, dir.path());
    let more = publish_numbered_from(broker.port, 600, 600, 1000.0, 0, dir.path());
    wait_sent(&agent, again.len() + more.len());
    acked.extend(more);
    agent.stop();
    let expected = numbered(&acked);
    assert_eq!(expected.len(), 1200, "every message acknowledged");
    assert_eq!(again.len(), 100);
    let n = expected.len();
    let v = wait_landed(&moto, stream, n, n, Duration::from_secs(60));
    assert_exactly_once(&v, &expected);
    let repeats = cloud.metric("fieldlink_compaction_duplicates_dropped_total");
    eprintln!(
        "{n} readings exactly once across a buffer replacement ({first_batches} batches before it, 100 readings sent again after it); duplicates skipped: {}, repeated readings dropped by the compactor: {repeats}",
        cloud.metric("fieldlink_cloud_batches_duplicate_total")
    );
    assert!(repeats >= 100.0, "{repeats}");
    assert_eq!(
        cloud.metric("fieldlink_cloud_agent_id_conflicts_total"),
        0.0,
        "a re-image is not two agents"
    );
    // The resend memory holds one agent with two epochs: well under a MiB, nothing forgotten.
    let memory = cloud.metric("fieldlink_cloud_dedup_memory_bytes");
    assert!(memory > 0.0 && memory < 1e6, "{memory}");
    assert_eq!(cloud.metric("fieldlink_cloud_dedup_evictions_total"), 0.0);
}

#[test]
fn a_buffer_file_restored_from_a_backup_loses_nothing_and_is_reported() {
    let Gateway {
        dir,
        moto,
        cloud,
        broker,
        mut agent,
    } = Gateway::start("restore");
    let stream = "restore";
    let mut acked = publish_numbered_from(broker.port, 0, 300, 200.0, 0, dir.path());
    wait_sent(&agent, acked.len());
    agent.stop();
    // A backup of the buffer file, taken now (same epoch, numbering at this point).
    let backup = dir.path().join("backup.db");
    std::fs::copy(dir.path().join("gw.db"), &backup).unwrap();
    agent.start();
    let more = publish_numbered_from(broker.port, 300, 300, 200.0, 0, dir.path());
    wait_sent(&agent, more.len());
    acked.extend(more);
    agent.stop();
    // The SD card dies; the backup is restored: the same epoch numbers its batches from the older point again.
    for ext in ["db-wal", "db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("gw.{ext}")));
    }
    std::fs::copy(&backup, dir.path().join("gw.db")).unwrap();
    agent.start();
    let after = publish_numbered_from(broker.port, 600, 300, 200.0, 0, dir.path());
    wait_sent(&agent, after.len());
    acked.extend(after);
    agent.stop();
    let expected = numbered(&acked);
    assert_eq!(expected.len(), 900, "every message acknowledged");
    let v = wait_landed(&moto, stream, 900, 900, Duration::from_secs(60));
    assert_exactly_once(&v, &expected);
    let collisions = cloud.metric("fieldlink_cloud_batch_id_collisions_total");
    assert!(
        collisions > 0.0,
        "the reused batch identities must be reported"
    );
    eprintln!("restored buffer: 900 readings exactly once, {collisions} reused batch identities landed and reported");
}

#[test]
fn two_live_agents_sharing_one_agent_id_land_everything_once_and_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "twins";
    let (moto, cloud) = moto_and_cloud_for_agents(dir.path(), stream);
    // The same config copied to two boxes: one agent_id, two buffer files, each box its own broker.
    let boxes: Vec<(Mosquitto, AgentProc)> = ["box-a", "box-b"]
        .iter()
        .map(|b| {
            let d = dir.path().join(b);
            std::fs::create_dir_all(&d).unwrap();
            let broker = Mosquitto::start(&d);
            let mut agent = AgentProc::new(&d, "gw", broker.port, &moto.endpoint, stream, "", "");
            agent.start();
            (broker, agent)
        })
        .collect();
    let publishers: Vec<_> = boxes
        .iter()
        .enumerate()
        .map(|(k, (broker, _))| {
            let (port, d) = (broker.port, dir.path().to_owned());
            std::thread::spawn(move || {
                publish_numbered_from(port, k as u64 * 10_000, 2000, 250.0, 0, &d)
            })
        })
        .collect();
    let mut acked = Vec::new();
    for (p, (_, agent)) in publishers.into_iter().zip(&boxes) {
        let a = p.join().unwrap();
        wait_sent(agent, a.len());
        acked.extend(a);
    }
    let expected = numbered(&acked);
    assert_eq!(expected.len(), 4000, "every message acknowledged");
    let n = expected.len();
    let v = wait_landed(&moto, stream, n, n, Duration::from_secs(60));
    assert_exactly_once(&v, &expected);
    let conflicts = cloud.metric("fieldlink_cloud_agent_id_conflicts_total");
    eprintln!("{n} readings exactly once from two agents named gw; conflicting batches counted: {conflicts}");
    assert!(conflicts > 0.0, "two live agents with one id not detected");
    let log = std::fs::read_to_string(&cloud.log).unwrap();
    let reports: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("two agents send under one agent id"))
        .collect();
    assert!(
        !reports.is_empty() && reports.len() <= 2,
        "rate-limited error log: {reports:?}"
    );
    assert!(
        reports[0].contains("gw")
            && reports[0].contains("older_epoch")
            && reports[0].contains("newer_epoch"),
        "{}",
        reports[0]
    );
}

// ---- Timestream record identity: a write must never erase measures another batch wrote. ----

#[test]
fn one_device_at_one_time_split_over_two_batches_keeps_every_measure_in_timestream() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "split";
    let moto = setup(dir.path(), stream, 1);
    let _cloud = Cloud::start(dir.path(), "solo", &moto.endpoint, stream, "");
    // What a seal's row limit, per-metric Sparkplug DDATA straddling a seal tick, or a late measure produce:
    // the measures of one device at one time in two batches (m0 and m1 in seq 1, m2 and m3 in seq 2, the
    // time's m4 late in seq 3), for 20 times.
    let t0 = now_ms() - 600_000;
    let series: Vec<Series> = (0..5)
        .map(|k| Series::new(format!("site/dev-split/m{k}")))
        .collect();
    let part = |seq: u64, measures: std::ops::Range<u32>| Batch {
        agent_id: "agent-split".into(),
        epoch: 77,
        seq,
        series: series.clone(),
        readings: (0..20)
            .flat_map(|i| {
                measures.clone().map(move |m| Reading {
                    series: m,
                    ts_ms: t0 + i * 1000,
                    value: Value::F64(f64::from(m) * 1000.0 + i as f64),
                    quality: Quality::Good,
                    late: false,
                })
            })
            .collect(),
    };
    let mut expected = BTreeMap::new();
    let recs: Vec<Rec> = [part(1, 0..2), part(2, 2..4), part(3, 4..5)]
        .iter()
        .map(|b| record_of(b, &mut expected))
        .collect();
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    let n = expected.len();
    // Wait for every write (Timestream keeps fewer readings than were written when one erases another).
    let v = wait_for("every Timestream write", Duration::from_secs(60), || {
        let v = landed(&moto, stream);
        (v["timestream_records"].as_u64()? >= 60 && v["parquet"].as_array()?.len() >= n)
            .then_some(v)
    });
    eprintln!(
        "Timestream writes {}, replaced {}, measures erased {}",
        v["timestream_records"], v["timestream_replaced"], v["timestream_erased_measures"]
    );
    assert_exactly_once(&v, &expected);
}

/// `start = "latest"`: records put before the consumer first saw the shard are not read; the worker is killed with
/// SIGKILL before its first checkpoint, and records keep arriving while it is down. Started again, it reads from the moment its lease was created (kept in the lease), not from
/// the newest record: every record put after that moment lands exactly once (before December 2026 the restart
/// read from `LATEST` again and skipped what it had read but not committed, and what arrived meanwhile).
#[test]
fn latest_killed_before_its_first_checkpoint_reads_again_from_where_it_began() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "latest";
    let moto = setup(dir.path(), stream, 1);
    let (recs, expected) = workload(4, 10, 50);
    let port = free_port();
    let config = |commits: &str| {
        worker_toml(port, &moto, stream, "w")
            .replace("[kinesis]\n", "[kinesis]\nstart = \"latest\"\n")
            .replace("commit_interval_ms = 2000\ncommit_idle_ms = 1000", commits)
    };
    // Put more than the margin (5 s) before the consumer first sees the shard: `latest` never reads these.
    let (before, _) = workload_of(8..10, 5, 50);
    put(dir.path(), &moto.endpoint, stream, &before, &[]);
    std::thread::sleep(Duration::from_millis(
        fieldlink_cloud::consumer::LATEST_MARGIN_MS as u64 + 1500,
    ));
    // No checkpoint before the kill: commits only every ten minutes.
    let mut first = Cloud::start_config(
        dir.path(),
        "first",
        port,
        &config("commit_interval_ms = 600000\ncommit_idle_ms = 600000"),
    );
    wait_for("the shard's lease", Duration::from_secs(30), || {
        (first.metric("fieldlink_cloud_leases_held") >= 1.0).then_some(())
    });
    let half = recs.len() / 2;
    put(dir.path(), &moto.endpoint, stream, &recs[..half], &[]);
    wait_for("the first half read", Duration::from_secs(30), || {
        (first.metric("fieldlink_cloud_records_total") >= half as f64).then_some(())
    });
    first.proc.kill();
    put(dir.path(), &moto.endpoint, stream, &recs[half..], &[]);
    let _second = Cloud::start_config(
        dir.path(),
        "second",
        port,
        &config("commit_interval_ms = 2000\ncommit_idle_ms = 1000"),
    );
    let n = expected.len();
    let v = wait_landed(&moto, stream, n, n, Duration::from_secs(90));
    // Exactly the records put after the start: none of those put before it.
    assert_exactly_once(&v, &expected);
}

/// A lease whose shard is no longer in the stream (a closed shard trimmed after the retention period while the
/// consumer was down, played here by a lease for a shard the stream never had, as ListShards then shows it):
/// its worker takes it as ended instead of retrying `GetShardIterator` for good, so the shard's children could
/// start and the fleet's watermark (which publishes bronze hours) is not held by it. The real shard's records land
/// once meanwhile.
#[test]
fn a_lease_of_a_shard_gone_from_the_stream_is_ended_not_retried_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "gone";
    let moto = setup(dir.path(), stream, 1);
    let ghost = "shardId-000000000099";
    let (rt, leases) = lease_table(&moto, &format!("leases-{stream}"));
    rt.block_on(leases.create(ghost, &[], fieldlink_cloud::lease::TRIM_HORIZON))
        .unwrap();
    let (recs, expected) = workload(2, 5, 20);
    let cloud = Cloud::start(dir.path(), "gone", &moto.endpoint, stream, "");
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    let n = expected.len();
    assert_exactly_once(
        &wait_landed(&moto, stream, n, n, Duration::from_secs(60)),
        &expected,
    );
    wait_for(
        "the gone shard's lease to end",
        Duration::from_secs(30),
        || {
            rt.block_on(leases.get(ghost))
                .unwrap()
                .is_some_and(|l| l.finished())
                .then_some(())
        },
    );
    let log = std::fs::read_to_string(&cloud.log).unwrap();
    assert!(
        log.contains("the shard is no longer in the stream"),
        "no error logged for the gone shard"
    );
}

/// Timestream's endpoint discovery failing at start (a regional outage, the task role's credentials not there yet,
/// no route to Timestream; here real AWS with made-up credentials, or no network at all) leaves the service up,
/// `/health` failing for `timestream` with the error while it retries; a stop ends it cleanly. Before December
/// 2026 one failed attempt ended the process, and an orchestrator restarted it in a loop.
#[test]
fn a_failing_timestream_endpoint_discovery_keeps_the_service_up_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let local = dir.path().join("parquet");
    // No endpoint override: discovery is used, as against AWS.
    let config = cloud_toml(
        port,
        "http://unused",
        "discovery",
        "w",
        local.to_str().unwrap(),
        "",
    )
    .replace(
        "endpoint_url = \"http://unused\"\n",
        "connect_timeout_ms = 2000\nattempt_timeout_ms = 3000\n",
    );
    let mut cloud = Cloud::start_config(dir.path(), "discovery", port, &config);
    let failing = wait_for(
        "/health to fail for timestream",
        Duration::from_secs(60),
        || {
            http_status(port, "/health").filter(|(status, body)| {
                *status == 503 && body.contains("timestream: FAIL endpoint discovery failed")
            })
        },
    );
    // Still up after further attempts (1 s, then about 2 s and 4 s of backoff).
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        cloud.proc.exited().is_none(),
        "the service exited: {}",
        cloud.proc.log_text()
    );
    let attempts = cloud
        .proc
        .log_text()
        .matches("Timestream endpoint discovery failed")
        .count();
    assert!(
        attempts >= 2,
        "{attempts} attempts:\n{}",
        cloud.proc.log_text()
    );
    cloud.proc.terminate(Duration::from_secs(30));
    eprintln!(
        "endpoint discovery failing: {attempts} attempts, /health said {:?}",
        failing.1.trim()
    );
}

/// The lease table deleted under a running cloud service, by an operator resetting it (deleted and created again
/// empty) and by mistake (deleted only). The service creates the table again if it is gone, and its shard's lease
/// at the checkpoint it last listed (not from the shard's start: no replay of the whole retention); the records put
/// after each deletion land, every sink holds every reading once. Before (December 2026) the leases of known shards
/// were never created again: nothing landed after a reset while `/health` said ok, and a deleted table failed
/// `/health` for good.
#[test]
fn a_lease_table_deleted_under_the_running_service_is_recreated_and_everything_lands_once() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "lease-reset";
    let moto = setup(dir.path(), stream, 1);
    let cloud = Cloud::start(dir.path(), "solo", &moto.endpoint, stream, "");
    let table = format!("leases-{stream}");
    let mut expected = BTreeMap::new();
    let mut records = 0usize;
    let lease_table = |action: &str| {
        run_python(&[
            script("lease_table.py").to_str().unwrap(),
            &moto.endpoint,
            &table,
            action,
        ])
    };
    for (phase, action) in [(0, ""), (1, "recreate"), (2, "delete")] {
        if !action.is_empty() {
            // The lease has checkpointed a record, and the service has listed it since (a round is a third of
            // the 3 s lease: three rounds).
            lease_table("checkpointed");
            std::thread::sleep(Duration::from_secs(3));
            lease_table(action);
        }
        let (recs, more) = workload_of(2 * phase..2 * phase + 2, 10, 20);
        records += recs.len();
        expected.extend(more);
        put(dir.path(), &moto.endpoint, stream, &recs, &[]);
        let n = expected.len();
        wait_landed(&moto, stream, n, n, Duration::from_secs(90));
        assert_exactly_once(&landed(&moto, stream), &expected);
    }
    // Created again at the checkpoint it last listed, never from the shard's start (which replays the whole
    // retention); what came after that checkpoint is read again (a replay lands the same rows: bronze drops the
    // equal ones, Timestream takes them as no-ops).
    let log = std::fs::read_to_string(&cloud.log).unwrap();
    let again: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("lease created again"))
        .collect();
    assert_eq!(again.len(), 2, "{log}");
    for l in &again {
        let at = l.split("checkpoint=").nth(1).unwrap_or_default();
        assert!(
            at.starts_with(|c: char| c.is_ascii_digit()),
            "created again at {at}, not at a checkpointed record"
        );
    }
    let landed_batches = cloud.metric("fieldlink_cloud_batches_landed_total");
    assert!(
        landed_batches >= records as f64,
        "{landed_batches} batches landed of {records} records"
    );
    assert_eq!(cloud.metric("fieldlink_cloud_batches_duplicate_total"), 0.0);
    let recreated = http_get(cloud.port, "/metrics")
        .and_then(|m| {
            metric_with(
                &m,
                "fieldlink_cloud_lease_changes_total",
                "kind=\"recreated\"",
            )
        })
        .unwrap_or(0.0);
    assert_eq!(recreated, 2.0, "one shard's lease, created again twice");
    let (status, body) = http_status(cloud.port, "/health").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_exactly_once(&landed(&moto, stream), &expected);
    eprintln!("lease table reset and deleted under the service: {records} records, {landed_batches} batches landed (replays included), every reading once in Parquet and Timestream");
}

/// `start = "latest"` and a lease table reset while the service could not look (stopped with SIGSTOP here, as a
/// suspended VM or a long stall): the records put between the reset and the service noticing it are read, since
/// a vanished lease is created again at its last checkpoint, not at "now" (which would skip them).
#[test]
fn under_start_latest_a_reset_lease_table_skips_nothing_put_before_the_service_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "lease-reset-latest";
    let moto = setup(dir.path(), stream, 1);
    let port = free_port();
    let config = cloud_toml(
        port,
        &moto.endpoint,
        stream,
        "solo",
        &format!("s3://{CLOUD_BUCKET}/{stream}"),
        "",
    )
    .replacen("[kinesis]\n", "[kinesis]\nstart = \"latest\"\n", 1);
    assert!(config.contains("start = \"latest\""));
    let cloud = Cloud::start_config(dir.path(), "solo", port, &config);
    wait_for("the shard's lease", Duration::from_secs(30), || {
        (cloud.metric("fieldlink_cloud_leases_held") >= 1.0).then_some(())
    });
    let (recs, mut expected) = workload_of(0..2, 10, 20);
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    wait_landed(
        &moto,
        stream,
        expected.len(),
        expected.len(),
        Duration::from_secs(60),
    );

    assert!(cloud.proc.signal("-STOP"));
    run_python(&[
        script("lease_table.py").to_str().unwrap(),
        &moto.endpoint,
        &format!("leases-{stream}"),
        "recreate",
    ]);
    let (recs, more) = workload_of(2..4, 10, 20);
    expected.extend(more);
    put(dir.path(), &moto.endpoint, stream, &recs, &[]);
    // Longer than the margin `latest` reads back from.
    std::thread::sleep(Duration::from_secs(7));
    assert!(cloud.proc.signal("-CONT"));
    let n = expected.len();
    wait_landed(&moto, stream, n, n, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    assert_exactly_once(&landed(&moto, stream), &expected);
}

//! Windowed aggregates end to end against real Mosquitto, moto's Kinesis and the independent Python decoder: a
//! slice of the shared dataset (25 meters, one hour at 10 s) published in shuffled order (within the lateness)
//! while the agent is killed with SIGKILL at random moments, then late readings and one reading per series that
//! closes the hour. The derived series in Kinesis must equal what `tests/python/window_feed.py` computes with
//! pyarrow from the same readings — each window exactly once — and the raw readings must be exactly the late ones
//! (rule `meter`, `keep_raw = false`, `late = "raw"`) or all of them (rule `meter-b`, `keep_raw = true`).
#![allow(clippy::unwrap_used)]
use fieldlink_e2e::*;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const RULES: &str = r#"
[[windows.rules]]
name = "meter"
series = "plant/meter/+/value"
sizes_ms = [60000, 300000]
functions = ["count", "min", "max", "mean", "sum", "first", "last"]
allowed_lateness_ms = 30000
late = "raw"
keep_raw = false

[[windows.rules]]
name = "meter-b"
series = "plant/meter-b/+/value"
sizes_ms = [60000]
functions = ["count", "mean"]
allowed_lateness_ms = 30000
late = "drop"
"#;

/// `(series, ts, value)` with a count, from the unique batches of the dump: derived readings and raw ones (with
/// their late flag).
type Row = (String, i64, String);
fn split(records: &[DumpedRecord]) -> (BTreeMap<Row, usize>, BTreeMap<(Row, bool), usize>) {
    let (mut derived, mut raw) = (BTreeMap::new(), BTreeMap::new());
    for r in unique_batches(records) {
        for (s, ts, v, late) in r.readings {
            if s.ends_with("/value") {
                *raw.entry(((s, ts, v), late)).or_insert(0) += 1;
            } else {
                assert!(!late, "a derived reading flagged late: {s} {ts}");
                *derived.entry((s, ts, v)).or_insert(0) += 1;
            }
        }
    }
    (derived, raw)
}

fn publish(port: u16, file: &std::path::Path, rate: u32) -> String {
    run_python(&[
        script("window_feed.py").to_str().unwrap(),
        "publish",
        "127.0.0.1",
        &port.to_string(),
        file.to_str().unwrap(),
        &rate.to_string(),
    ])
}

#[test]
fn windows_over_the_dataset_through_kill_9_rounds_equal_pyarrow_exactly_once() {
    let rounds: usize = std::env::var("FIELDLINK_WINDOW_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("WINDOW_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..1 << 31));
    eprintln!("shuffle seed {seed} (WINDOW_SEED replays it)");
    let dir = tempfile::tempdir().unwrap();
    let reference: Json = serde_json::from_str(&run_python(&[
        script("window_feed.py").to_str().unwrap(),
        "plan",
        dataset_path().to_str().unwrap(),
        dir.path().to_str().unwrap(),
        &seed.to_string(),
    ]))
    .unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    let stream = "windows";
    moto.create(stream, 1, "unused-db", "unused-table", "unused-bucket");
    let mut agent = AgentProc::new(
        dir.path(),
        "windows-agent",
        broker.port,
        &moto.endpoint,
        stream,
        "durability = \"full\"",
        RULES,
    );
    // Redelivered readings are recognised for as long as they could still enter an open window (docs/windows.md).
    let text = std::fs::read_to_string(&agent.config).unwrap().replace(
        "reorder_window_ms = 200",
        "reorder_window_ms = 200\ndedup_window_ms = 330000",
    );
    std::fs::write(&agent.config, text).unwrap();
    agent.start();

    // Phase 1: the hour, shuffled, through SIGKILL rounds.
    let (port, file) = (broker.port, dir.path().join("phase1.json"));
    let publisher = std::thread::spawn(move || publish(port, &file, 400));
    sigkill_rounds(&mut agent, rounds);
    eprintln!("phase 1: {}", publisher.join().unwrap().trim());
    let after1 = reference["after_phase1"].as_u64().unwrap() as usize;
    wait_for(
        "the windows of phase 1 in Kinesis",
        Duration::from_secs(120),
        || {
            let (derived, _) = split(&kinesis_dump(&moto.endpoint, stream));
            (derived.values().sum::<usize>() >= after1
                && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0
                && agent.metric("fieldlink_buffer_pending_readings") == 0.0)
                .then_some(())
        },
    );
    // A clean restart with an empty buffer (and open windows): the last process's ledger covers everything after.
    agent.stop();
    agent.start();

    // Phase 2: late readings and the readings that close the hour.
    eprintln!(
        "phase 2: {}",
        publish(broker.port, &dir.path().join("phase2.json"), 200).trim()
    );
    let want_derived = reference["derived"].as_array().unwrap();
    let records = wait_for(
        "every window and raw reading in Kinesis",
        Duration::from_secs(120),
        || {
            let records = kinesis_dump(&moto.endpoint, stream);
            let (derived, _) = split(&records);
            (derived.values().sum::<usize>() >= want_derived.len()
                && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0
                && agent.metric("fieldlink_buffer_pending_readings") == 0.0)
                .then_some(records)
        },
    );
    let (derived, raw) = split(&records);

    // Derived series: each window once; count/min/max/first/last exact, sum and mean within 1e-12.
    let doubled: Vec<_> = derived.iter().filter(|(_, &n)| n > 1).take(5).collect();
    assert!(doubled.is_empty(), "windows emitted twice: {doubled:?}");
    let mut got: BTreeMap<(String, i64), String> =
        derived.into_keys().map(|(s, ts, v)| ((s, ts), v)).collect();
    let (mut exact, mut rounded, mut problems) = (0, 0, Vec::new());
    for w in want_derived {
        let (s, ts, func, v) = (
            w[0].as_str().unwrap(),
            w[1].as_i64().unwrap(),
            w[2].as_str().unwrap(),
            w[3].as_str().unwrap(),
        );
        match got.remove(&(s.to_owned(), ts)) {
            None => problems.push(format!("lost {s} @ {ts} (want {v})")),
            Some(g) if g == v => exact += 1,
            Some(g) if matches!(func, "sum" | "mean") => {
                let (a, b): (f64, f64) = (g.parse().unwrap(), v.parse().unwrap());
                if (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0) {
                    rounded += 1;
                } else {
                    problems.push(format!("{s} @ {ts}: agent {g}, pyarrow {v}"));
                }
            }
            Some(g) => problems.push(format!("{s} @ {ts}: agent {g}, pyarrow {v}")),
        }
    }
    problems.extend(
        got.iter()
            .take(5)
            .map(|((s, ts), v)| format!("not in the reference: {s} @ {ts} = {v}")),
    );
    assert!(
        problems.is_empty(),
        "{} problems, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );

    // Raw readings: meter's only the late ones, flagged; meter-b's all of them once, the late ones flagged (a
    // shuffled reading released in a later seal than a newer one of its series is flagged by [order] too).
    let row = |r: &Json| {
        (
            r[0].as_str().unwrap().to_owned(),
            r[1].as_i64().unwrap(),
            r[2].as_str().unwrap().to_owned(),
        )
    };
    let late: Vec<Row> = reference["late"]
        .as_array()
        .unwrap()
        .iter()
        .map(row)
        .collect();
    let mut want_raw: BTreeMap<Row, usize> = late.iter().map(|r| (r.clone(), 1)).collect();
    want_raw.extend(
        reference["raw_kept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (row(r), 1)),
    );
    let mut got_raw: BTreeMap<Row, usize> = BTreeMap::new();
    for ((r, _), n) in &raw {
        *got_raw.entry(r.clone()).or_insert(0) += n;
    }
    let extra: Vec<_> = got_raw
        .iter()
        .filter(|(k, n)| want_raw.get(*k) != Some(n))
        .take(5)
        .collect();
    let lost: Vec<_> = want_raw
        .keys()
        .filter(|k| !got_raw.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        got_raw == want_raw,
        "raw readings: {} sent, {} expected; extra or doubled {extra:?}, lost {lost:?}",
        got_raw.len(),
        want_raw.len()
    );
    let unflagged: Vec<_> = late
        .iter()
        .filter(|r| !raw.contains_key(&((*r).clone(), true)))
        .take(5)
        .collect();
    assert!(
        unflagged.is_empty(),
        "late readings sent without the late flag: {unflagged:?}"
    );
    let flagged_meter = raw
        .keys()
        .filter(|(r, late)| *late && r.0.starts_with("plant/meter/"))
        .count();
    assert_eq!(
        flagged_meter,
        late.iter()
            .filter(|r| r.0.starts_with("plant/meter/"))
            .count()
    );

    // The last process (started on an empty buffer) saw every late reading, and its ledger balances.
    assert_eq!(
        agent.metric("fieldlink_window_late_readings_total"),
        late.len() as f64
    );
    let (received, accounted) = agent.ledger();
    assert_eq!(received, accounted, "ledger");
    eprintln!(
        "{rounds} SIGKILL rounds: {} readings, {} windows values each exactly once ({exact} bit-identical, \
         {rounded} sums/means within 1e-12), {} late readings sent raw flagged, {} raw meter-b readings",
        reference["readings"],
        want_derived.len(),
        late.len(),
        want_raw.len() - late.len() + late.iter().filter(|r| r.0.starts_with("plant/meter-b/")).count()
    );
    agent.stop();
}

/// A rule over the numbered readings' series (`crash/dev<k>/n`): 1-second windows (message i, event time T + i,
/// T a whole second: one window per series), count and sum, raw readings withheld, `idle_close_ms` as given.
fn idle_rule(idle_close_ms: u64) -> String {
    format!(
        "[[windows.rules]]\nname = \"idle\"\nseries = \"crash/+/n\"\nsizes_ms = [1000]\nfunctions = [\"count\", \"sum\"]\nkeep_raw = false\nidle_close_ms = {idle_close_ms}\n"
    )
}

/// The derived readings a dump holds, as `series=value` with how often (unique batches); no raw reading, none late.
fn idle_windows(records: &[DumpedRecord]) -> BTreeMap<String, usize> {
    let mut got = BTreeMap::new();
    for r in unique_batches(records) {
        for (s, ts, v, late) in r.readings {
            assert!(!late && ts == 1_772_431_200_000, "{s} {ts} {late}");
            *got.entry(format!("{s}={v}")).or_insert(0) += 1;
        }
    }
    got
}

/// What [`idle_windows`] must find for the acknowledged numbers: each series' window once, with all of them.
fn idle_windows_of(acked: &[u64]) -> BTreeMap<String, usize> {
    let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for n in acked {
        let e = sums.entry(format!("crash/dev{}/n", n % 10)).or_default();
        e.0 += 1;
        e.1 += n;
    }
    sums.iter()
        .flat_map(|(k, (count, sum))| {
            [
                (format!("{k}/count_1s={count}"), 1),
                (format!("{k}/sum_1s={sum}.0"), 1),
            ]
        })
        .collect()
}

/// A series that stops reporting (a meter removed, a sensor broken) under `keep_raw = false`: its readings were
/// acknowledged and folded into open windows, and before `idle_close_ms` no reading ever came to close them, so they
/// never landed. Now the agent's clock closes them: each window lands once with every acknowledged reading in it,
/// and no raw reading is sent.
#[test]
fn the_last_windows_of_series_that_stop_reporting_land_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    moto.create("idle", 1, "unused-db", "unused-table", "unused-bucket");
    // Long enough that a publisher stalled by a loaded machine does not look like a silence.
    let rule = idle_rule(5000);
    let mut agent = AgentProc::new(
        dir.path(),
        "idle-agent",
        broker.port,
        &moto.endpoint,
        "idle",
        "",
        &rule,
    );
    agent.start();
    let acked = publish_numbered(broker.port, 200, 400.0, 0, dir.path());
    assert_eq!(acked.len(), 200);
    wait_for(
        "the silent series' windows in Kinesis",
        Duration::from_secs(60),
        || (idle_windows(&kinesis_dump(&moto.endpoint, "idle")).len() >= 20).then_some(()),
    );
    agent.stop();
    assert_eq!(
        idle_windows(&kinesis_dump(&moto.endpoint, "idle")),
        idle_windows_of(&acked),
        "each window once, with every acknowledged reading, and no raw reading"
    );
}

/// The broker out of reach for longer than `idle_close_ms`: the series are not silent, the agent is cut off (a
/// broker keeps a persistent session's readings for it; here the devices publish after it is back). The silence is
/// timed on the intake clock, which stands still while an MQTT connection that was up is down, so the windows wait
/// for the readings that come after the outage: each lands once with all of them. (Timed on the wall clock, the
/// windows closed during the outage with half their readings, and the rest came late and were deleted unsent.)
#[test]
fn a_broker_outage_longer_than_idle_close_ms_closes_no_window_early() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = Mosquitto::start_persistent(dir.path(), port);
    let moto = Moto::start(dir.path());
    moto.create("pause", 1, "unused-db", "unused-table", "unused-bucket");
    let rule = idle_rule(9000);
    let mut agent = AgentProc::new(
        dir.path(),
        "pause-agent",
        port,
        &moto.endpoint,
        "pause",
        "",
        &rule,
    );
    agent.start();
    let mut acked = publish_numbered_from(port, 0, 100, 400.0, 0, dir.path());
    drop(broker);
    let mqtt = |state: &str| {
        http_get(agent.metrics_port, "/health")
            .is_some_and(|h| h.contains(&format!("mqtt:local: {state}")))
    };
    wait_for(
        "the agent to see the broker gone",
        Duration::from_secs(10),
        || mqtt("FAIL").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(18));
    let _broker = Mosquitto::start_persistent(dir.path(), port);
    wait_for(
        "the agent to subscribe again",
        Duration::from_secs(30),
        || mqtt("ok").then_some(()),
    );
    acked.extend(publish_numbered_from(port, 100, 100, 400.0, 0, dir.path()));
    assert_eq!(acked.len(), 200);
    wait_for("the windows in Kinesis", Duration::from_secs(60), || {
        (idle_windows(&kinesis_dump(&moto.endpoint, "pause")).len() >= 20).then_some(())
    });
    assert_eq!(agent.metric("fieldlink_window_late_readings_total"), 0.0);
    assert_eq!(agent.metric("fieldlink_window_idle_closed_total"), 10.0);
    agent.stop();
    assert_eq!(
        idle_windows(&kinesis_dump(&moto.endpoint, "pause")),
        idle_windows_of(&acked),
        "each window once, with the readings from before and after the outage"
    );
}

/// An operator edits the window rules between two runs of an agent whose windows hold acknowledged readings (under
/// `keep_raw = false`, deleted unsent when they were folded in). Renamed, the rule takes its open windows over and
/// adds the next readings to them; removed, its open windows are sent at the next start with the functions it had.
/// Each window lands once with every acknowledged reading. (Before, the renamed rule started empty windows beside
/// the old ones, which waited in the buffer for a rule of the old name, as the removed rule's did: 300 acknowledged
/// readings never landed.)
#[test]
fn a_window_rule_renamed_then_removed_between_runs_loses_and_doubles_no_window() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    moto.create("edits", 1, "unused-db", "unused-table", "unused-bucket");
    let rule = idle_rule(0);
    let mut agent = AgentProc::new(
        dir.path(),
        "edits-agent",
        broker.port,
        &moto.endpoint,
        "edits",
        "",
        &rule,
    );
    let edit = |agent: &AgentProc, from: &str, to: &str| {
        let text = std::fs::read_to_string(&agent.config).unwrap();
        assert!(text.contains(from), "{from}");
        std::fs::write(&agent.config, text.replace(from, to)).unwrap();
    };
    agent.start();
    let mut acked = publish_numbered_from(broker.port, 0, 200, 400.0, 0, dir.path());
    wait_folded(&agent, 200.0);
    agent.stop();
    edit(&agent, "name = \"idle\"", "name = \"renamed\"");
    agent.start();
    acked.extend(publish_numbered_from(
        broker.port,
        200,
        100,
        400.0,
        0,
        dir.path(),
    ));
    wait_folded(&agent, 100.0);
    agent.stop();
    assert!(
        idle_windows(&kinesis_dump(&moto.endpoint, "edits")).is_empty(),
        "the windows are still open"
    );
    edit(&agent, &rule.replace("\"idle\"", "\"renamed\""), "");
    agent.start();
    wait_for("the windows in Kinesis", Duration::from_secs(60), || {
        (idle_windows(&kinesis_dump(&moto.endpoint, "edits")).len() >= 20).then_some(())
    });
    agent.stop();
    assert_eq!(acked.len(), 300);
    assert_eq!(
        idle_windows(&kinesis_dump(&moto.endpoint, "edits")),
        idle_windows_of(&acked),
        "each window once, with the readings of both runs"
    );
}

/// Waits until `agent` has folded `n` readings into windows (withheld under `keep_raw = false`) and holds none
/// unsealed.
fn wait_folded(agent: &AgentProc, n: f64) {
    wait_for("the readings folded in", Duration::from_secs(60), || {
        (agent.metric("fieldlink_window_raw_withheld_total") == n
            && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0)
            .then_some(())
    })
}

/// Runs `fieldlink-agent drain` on `agent`'s configuration.
fn drain(agent: &AgentProc, timeout_s: u64) -> std::process::Output {
    agent.drain_command(timeout_s).output().unwrap()
}

/// A gateway about to be re-imaged (or replaced, or its SD card swapped) under a `keep_raw = false` rule: its
/// acknowledged readings are folded into open windows, deleted unsent, and the windows wait for later readings
/// that this buffer file will never see. `fieldlink-agent drain`, run with the agent stopped, closes them and sends
/// everything; its exit status says whether the file may go: 3 (and what is left) while Kinesis cannot be reached,
/// 0 once every window landed, each once with every reading. Refused while the agent runs (the buffer's lock).
/// Before it, the operator had no way to flush the windows: the readings in them went with the file.
#[test]
fn drain_sends_the_open_windows_before_a_buffer_file_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    moto.create("drain", 1, "unused-db", "unused-table", "unused-bucket");
    let mut agent = AgentProc::new(
        dir.path(),
        "drain-agent",
        broker.port,
        &moto.endpoint,
        "drain",
        "",
        &idle_rule(0),
    );
    // No buffer file yet (a wrong path, a mount not up): refused, and none created.
    let out = drain(&agent, 5);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no buffer file at"), "{stderr}");
    assert!(!dir.path().join("drain-agent.db").exists());
    agent.start();
    let acked = publish_numbered(broker.port, 200, 400.0, 0, dir.path());
    assert_eq!(acked.len(), 200);
    wait_folded(&agent, 200.0);
    let out = drain(&agent, 5);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("in use by another process"),
        "refused while the agent runs: {stderr}"
    );
    agent.stop();
    let dumped = || kinesis_dump(&moto.endpoint, "drain");
    assert!(idle_windows(&dumped()).is_empty(), "the windows are open");

    // Kinesis out of reach: the windows are closed and sealed, and the records wait in the file.
    let config = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        config.replace(&moto.endpoint, "http://127.0.0.1:9"),
    )
    .unwrap();
    let started = Instant::now();
    let out = drain(&agent, 3);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.starts_with("not drained: ")
            && stdout.contains("holds 0 unsealed readings, ")
            && !stdout.contains("holds 0 unsealed readings, 0 records")
            && stdout.contains(", 0 open windows;"),
        "{stdout}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));

    std::fs::write(&agent.config, &config).unwrap();
    let out = drain(&agent, 60);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.starts_with("drained: "), "{stdout}");
    let want = idle_windows_of(&acked);
    assert_eq!(want.len(), 20);
    assert_eq!(idle_windows(&dumped()), want, "each window once, all 200");
    // Again: nothing left, nothing sent twice.
    let out = drain(&agent, 60);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(dumped().len(), unique_batches(&dumped()).len());
    assert_eq!(idle_windows(&dumped()), want);
}

//! The InfluxDB sink end to end: agent → Kinesis (moto) → cloud → real InfluxDB 1.x (v1 API) and
//! VictoriaMetrics (v2 API with a token), read back through their query APIs and compared exactly as
//! multisets of (series, time, value) with what the publisher got acknowledged; through a cloud worker
//! kill -9 (the replay rewrites the same points); and behind a fault proxy injecting 429 with Retry-After,
//! 503, 413 and partial 400s (nothing lost, every fault counted by the sink); and what operators get wrong: a
//! database that does not exist yet, an HTTPS server whose certificate the system does not trust.

#![allow(clippy::unwrap_used)]

use fieldlink_e2e::influx::{InfluxCloud, InfluxD, InfluxFaultProxy, VictoriaMetrics};
use fieldlink_e2e::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const MEASUREMENT: &str = "fieldlink";

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

fn stream_and_broker(dir: &Path, stream: &str) -> (Moto, Mosquitto) {
    let moto = Moto::start(dir);
    moto.create(stream, 1, "fieldlink", "readings", "unused-bucket");
    (moto, Mosquitto::start(dir))
}

fn agent(dir: &Path, broker: &Mosquitto, moto: &Moto, stream: &str) -> AgentProc {
    let mut a = AgentProc::new(dir, "gw", broker.port, &moto.endpoint, stream, "", "");
    a.start();
    a
}

fn wait_sent(agent: &AgentProc, n: usize) {
    wait_for(
        "the agent to send every reading",
        Duration::from_secs(120),
        || (agent.metric("fieldlink_readings_sent_total") as usize >= n).then_some(()),
    );
}

/// Waits until `read()` equals `expected` as a multiset; panics with the difference at the deadline, followed by
/// `explain(missing readings)` (what the test knows about where they went).
fn wait_exactly(
    what: &str,
    expected: &BTreeMap<Key, usize>,
    timeout: Duration,
    mut read: impl FnMut() -> Vec<Key>,
    explain: impl Fn(&[&Key]) -> String,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = counted(read());
        if got == *expected {
            return;
        }
        if Instant::now() > deadline {
            let missing: Vec<&Key> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
            panic!(
                "{}\n{}",
                describe_difference(what, expected, &got),
                explain(&missing)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits (60 s) until database `plant` holds exactly `expected`; on failure shows the cloud log's tail.
fn wait_influxdb(influx: &InfluxD, cloud: &InfluxCloud, expected: &BTreeMap<Key, usize>) {
    wait_exactly(
        "influxdb",
        expected,
        Duration::from_secs(60),
        || influx.readings("plant", MEASUREMENT),
        |_| cloud_log_tail(cloud, 30),
    );
}

/// The cloud log's lines other than per-batch debug lines, the last `n` of them: lease moves, worker restarts,
/// sink retries.
fn cloud_log_tail(cloud: &InfluxCloud, n: usize) -> String {
    let text = std::fs::read_to_string(&cloud.log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("batch landed") && !l.contains("sink call failed"))
        .collect();
    format!(
        "cloud log (without per-batch and retry lines), last {n}:\n{}",
        lines[lines.len().saturating_sub(n)..].join("\n")
    )
}

#[test]
fn victoria_metrics_over_the_v2_api_with_a_token_holds_every_published_reading_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "influx-vm";
    let (moto, broker) = stream_and_broker(dir.path(), stream);
    let vm = VictoriaMetrics::start(dir.path());
    // A proxy without faults, to see the token header arrive.
    let proxy = InfluxFaultProxy::start(dir.path(), vm.port);
    let mut cloud = InfluxCloud::new(
        dir.path(),
        &moto.endpoint,
        stream,
        &format!(
            "[influxdb]\nurl = \"http://127.0.0.1:{}\"\napi = \"v2\"\norg = \"plant\"\nbucket = \"telemetry\"\ntoken_env = \"FIELDLINK_TEST_TOKEN\"\n",
            proxy.port
        ),
    );
    cloud
        .env
        .push(("FIELDLINK_TEST_TOKEN".into(), "s3cret-token".into()));
    let mut agent = agent(dir.path(), &broker, &moto, stream);
    // A backlog first (the cloud is not running): the write rate of one worker catching up.
    // FIELDLINK_INFLUX_BACKLOG sets its size (default 20,000) for a longer measurement.
    let backlog: usize = std::env::var("FIELDLINK_INFLUX_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let acked = publish_numbered(broker.port, backlog, 10_000.0, 0, dir.path());
    wait_sent(&agent, acked.len());
    agent.stop();
    let expected = numbered(&acked);
    let n = expected.len();
    assert_eq!(n, backlog, "every message acknowledged");
    cloud.start();
    let written = || cloud.metric("fieldlink_influxdb_points_written_total") as usize;
    let mut first: Option<(Instant, usize)> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while written() < n {
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {n} points",
            written()
        );
        if first.is_none() && written() > 0 {
            first = Some((Instant::now(), written()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let requests = cloud.metric("fieldlink_influxdb_requests_total{status=\"204\"}");
    if let Some((t, w)) = first {
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "one worker wrote {} points in {secs:.2} s after its first write: {:.0} points/s ({n} in {requests} requests)",
            n - w,
            (n - w) as f64 / secs
        );
    }
    wait_exactly(
        "victoria-metrics",
        &expected,
        Duration::from_secs(30),
        || vm.readings(MEASUREMENT),
        |_| cloud_log_tail(&cloud, 30),
    );
    assert_eq!(
        proxy.stats()["authorization"].as_str(),
        Some("Token s3cret-token")
    );
    assert_eq!(
        cloud.metric("fieldlink_influxdb_points_written_total") as usize,
        n,
        "one point per reading (one field per line here), nothing written twice"
    );
    assert!(http_get(cloud.port, "/health")
        .unwrap()
        .contains("influxdb: ok"));
}

#[test]
fn influxdb_1x_over_the_v1_api_holds_every_reading_once_through_a_cloud_worker_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "influx-v1";
    let (moto, broker) = stream_and_broker(dir.path(), stream);
    let influx = InfluxD::start(dir.path(), "plant");
    let mut cloud = InfluxCloud::new(
        dir.path(),
        &moto.endpoint,
        stream,
        &format!(
            "[influxdb]\nurl = \"http://127.0.0.1:{}\"\napi = \"v1\"\ndatabase = \"plant\"\nmax_lines_per_request = 100\n",
            influx.port
        ),
    );
    cloud.start();
    let agent = agent(dir.path(), &broker, &moto, stream);
    let port = broker.port;
    let path = dir.path().to_owned();
    let publisher = std::thread::spawn(move || publish_numbered(port, 6_000, 1_000.0, 0, &path));
    wait_for(
        "a third of the points written",
        Duration::from_secs(60),
        || (cloud.metric("fieldlink_influxdb_points_written_total") >= 2_000.0).then_some(()),
    );
    let before = cloud.metric("fieldlink_influxdb_points_written_total");
    cloud.kill9();
    cloud.start();
    let acked = publisher.join().unwrap();
    wait_sent(&agent, acked.len());
    let expected = numbered(&acked);
    let n = expected.len();
    wait_influxdb(&influx, &cloud, &expected);
    let after = cloud.metric("fieldlink_influxdb_points_written_total");
    eprintln!(
        "{n} readings exactly once through a kill -9: {before} points written before it, {after} after (the commit it interrupted replayed: {} rewritten)",
        before + after - n as f64
    );
    assert!(
        before + after >= n as f64,
        "every point written at least once"
    );
}

/// A dead-lettered line of `publish_numbered` readings as the reading it carries.
fn reading_of_line(line: &str) -> Key {
    // fieldlink,agent=gw,device=crash/dev3 n=123.0 1772431200123
    let mut parts = line.split(' ');
    let (series, field, time) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let device = series.split(",device=").nth(1).unwrap();
    let (name, value) = field.split_once('=').unwrap();
    (
        format!("{device}/{name}"),
        time.parse().unwrap(),
        value.parse::<f64>().unwrap().to_bits(),
    )
}

#[test]
fn faults_429_503_413_and_partial_400s_from_a_proxy_are_retried_split_or_dead_lettered_and_each_is_counted(
) {
    let dir = tempfile::tempdir().unwrap();
    let stream = "influx-faults";
    let (moto, broker) = stream_and_broker(dir.path(), stream);
    let influx = InfluxD::start(dir.path(), "plant");
    let proxy = InfluxFaultProxy::start(dir.path(), influx.port);
    proxy.set("r429=0.06&r503=0.06&r413=0.06&r400=0.06&retry_after=1");
    let mut cloud = InfluxCloud::new(
        dir.path(),
        &moto.endpoint,
        stream,
        &format!(
            "[influxdb]\nurl = \"http://127.0.0.1:{}\"\napi = \"v1\"\ndatabase = \"plant\"\nmax_lines_per_request = 25\n",
            proxy.port
        ),
    );
    cloud.start();
    let agent = agent(dir.path(), &broker, &moto, stream);
    let acked = publish_numbered(broker.port, 4_000, 2_000.0, 0, dir.path());
    wait_sent(&agent, acked.len());
    let expected = numbered(&acked);
    let n = expected.len();
    // Every reading ends in InfluxDB or, for the lines the proxy refused, in the dead-letter location.
    let stats = wait_for(
        "every reading written or dead-lettered",
        Duration::from_secs(120),
        || {
            let s = proxy.stats();
            let dropped = s["dropped_lines"].as_array()?.len();
            let dead = cloud.dead_lines().len();
            let written = cloud.metric("fieldlink_influxdb_points_written_total") as usize;
            (dead == dropped && written + dead >= n).then_some(s)
        },
    );
    eprintln!(
        "proxy: {}",
        serde_json::json!({
            "writes": stats["writes"], "429": stats["injected_429"], "503": stats["injected_503"],
            "413": stats["injected_413"], "400": stats["injected_400"],
        })
    );
    let dead = cloud.dead_lines();
    let mut dropped: Vec<String> = stats["dropped_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect();
    let mut dead_text: Vec<String> = dead.iter().map(|(_, l)| l.clone()).collect();
    dropped.sort();
    dead_text.sort();
    assert_eq!(
        dead_text, dropped,
        "exactly the lines the proxy refused are dead-lettered"
    );
    assert!(dead
        .iter()
        .all(|(why, _)| why.contains("injected by the fault proxy")));
    let dead_readings = counted(dead_text.iter().map(|l| reading_of_line(l)));
    let mut want = expected.clone();
    for k in dead_readings.keys() {
        assert!(want.remove(k).is_some(), "a dead letter names {k:?}");
    }
    // The gate above counts points written, and a replay (a worker restarted after losing its lease on a loaded
    // machine) rewrites points and counts them again: the last ones may still be on their way.
    wait_exactly(
        "influxdb",
        &want,
        Duration::from_secs(90),
        || influx.readings("plant", MEASUREMENT),
        |missing| {
            let acknowledged = counted(proxy.acknowledged().iter().map(|l| reading_of_line(l)));
            let by_server = missing
                .iter()
                .filter(|k| acknowledged.contains_key(**k))
                .count();
            format!(
                "of the {} missing, {by_server} were in writes the server answered 2xx; points written {}\n{}",
                missing.len(),
                cloud.metric("fieldlink_influxdb_points_written_total"),
                cloud_log_tail(&cloud, 40)
            )
        },
    );
    // Every injected fault was seen by the sink, by its status.
    for status in ["429", "503", "413", "400"] {
        let injected = stats[format!("injected_{status}")].as_f64().unwrap();
        assert!(injected > 0.0, "no {status} injected: {stats}");
        assert_eq!(
            cloud.metric(&format!(
                "fieldlink_influxdb_requests_total{{status=\"{status}\"}}"
            )),
            injected,
            "answers {status}"
        );
    }
    assert_eq!(
        cloud.metric("fieldlink_influxdb_lines_dead_lettered_total") as usize,
        dead.len()
    );
    // Every request answered 429 came again, and not before its Retry-After (1 s).
    let gaps: Vec<u64> = stats["retry_after_gaps_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_u64().unwrap())
        .collect();
    assert_eq!(gaps.len() as f64, stats["injected_429"].as_f64().unwrap());
    assert!(gaps.iter().all(|&g| g >= 1000), "{gaps:?}");
    eprintln!("429 → next attempt after {:?} ms", gaps);
}

/// Starts an agent, publishes `count` numbered readings through it and waits until `/health` fails for the
/// sink, then checks that no checkpoint was written; the agent, the acknowledged numbers and the health line.
fn publish_until_failing(
    dir: &Path,
    broker: &Mosquitto,
    moto: &Moto,
    stream: &str,
    cloud: &InfluxCloud,
    count: usize,
) -> (AgentProc, Vec<u64>, String) {
    let agent = agent(dir, broker, moto, stream);
    let acked = publish_numbered(broker.port, count, 1_000.0, 0, dir);
    wait_sent(&agent, acked.len());
    let line = wait_for(
        "/health to fail for influxdb",
        Duration::from_secs(30),
        || {
            let (status, body) = http_status(cloud.port, "/health")?;
            let l = body.lines().find(|l| l.starts_with("influxdb: FAIL"))?;
            (status == 503).then(|| l.to_owned())
        },
    );
    eprintln!("{line}");
    assert_eq!(
        cloud.metric("fieldlink_cloud_checkpoints_total"),
        0.0,
        "no checkpoint passes unwritten data"
    );
    (agent, acked, line)
}

/// Waits (30 s) for `/health` to say the sink is ok again.
fn wait_ok_again(cloud: &InfluxCloud) {
    wait_for("/health ok again", Duration::from_secs(30), || {
        http_get(cloud.port, "/health")
            .filter(|b| b.contains("influxdb: ok"))
            .map(|_| ())
    });
}

#[test]
fn a_missing_database_fails_health_holds_the_checkpoint_and_lands_everything_once_after_it_is_created(
) {
    let dir = tempfile::tempdir().unwrap();
    let stream = "influx-nodb";
    let (moto, broker) = stream_and_broker(dir.path(), stream);
    let influx = InfluxD::start(dir.path(), "other");
    let mut cloud = InfluxCloud::new(
        dir.path(),
        &moto.endpoint,
        stream,
        &format!(
            "[influxdb]\nurl = \"http://127.0.0.1:{}\"\napi = \"v1\"\ndatabase = \"plant\"\n",
            influx.port
        ),
    );
    cloud.start();
    let (_agent, acked, line) =
        publish_until_failing(dir.path(), &broker, &moto, stream, &cloud, 1_000);
    assert!(
        line.contains("HTTP 404") && line.contains("database not found"),
        "{line}"
    );
    assert_eq!(
        cloud.metric("fieldlink_cloud_sink_failing{sink=\"influxdb\"}"),
        1.0
    );
    // The operator creates the database: the sink recovers by itself (sink_failing_retry_ms = 1 s).
    influx.query("CREATE DATABASE \"plant\"", "");
    let expected = numbered(&acked);
    wait_influxdb(&influx, &cloud, &expected);
    wait_ok_again(&cloud);
    assert_eq!(
        cloud.metric("fieldlink_cloud_sink_failing{sink=\"influxdb\"}"),
        0.0
    );
    assert!(cloud.metric("fieldlink_influxdb_requests_total{status=\"404\"}") >= 1.0);
}

#[test]
fn an_https_server_with_an_untrusted_certificate_fails_health_naming_the_tls_error() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "influx-tls";
    let (moto, broker) = stream_and_broker(dir.path(), stream);
    let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
    run_ok(std::process::Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]));
    let port = free_port();
    let mut server = std::process::Command::new("openssl");
    server
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(port.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key);
    let _server = Proc::spawn("openssl s_server", server, &dir.path().join("s_server.log"));
    wait_for("the TLS server to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| ())
    });
    let mut cloud = InfluxCloud::new(
        dir.path(),
        &moto.endpoint,
        stream,
        &format!("[influxdb]\nurl = \"https://127.0.0.1:{port}\"\norg = \"o\"\nbucket = \"b\"\n"),
    );
    cloud.start();
    let (_agent, _acked, line) =
        publish_until_failing(dir.path(), &broker, &moto, stream, &cloud, 100);
    assert!(
        line.contains("TLS error") && line.contains("certificate"),
        "{line}"
    );
    assert_eq!(cloud.metric("fieldlink_influxdb_points_written_total"), 0.0);
    assert_eq!(cloud.metric("fieldlink_cloud_checkpoints_total"), 0.0);
}

/// An InfluxDB that is down (nothing listens at its URL): its errors are transient, so they are retried with
/// backoff; once one call's failures have lasted `sink_transient_failing_ms` (here 2 s), `/health` fails for the
/// sink naming the error and how long, and no checkpoint passes the unwritten data. When the server comes up,
/// everything lands exactly once and `/health` is ok again. (Before December 2026 `/health` stayed ok however
/// long transient errors lasted.)
#[test]
fn a_server_down_for_longer_than_the_transient_limit_fails_health_and_everything_lands_once_when_it_is_up(
) {
    let dir = tempfile::tempdir().unwrap();
    let stream = "influx-down";
    let (moto, broker) = stream_and_broker(dir.path(), stream);
    let port = free_port();
    let mut cloud = InfluxCloud::new(
        dir.path(),
        &moto.endpoint,
        stream,
        &format!(
            "[influxdb]\nurl = \"http://127.0.0.1:{port}\"\napi = \"v1\"\ndatabase = \"plant\"\n"
        ),
    );
    let config = std::fs::read_to_string(&cloud.config).unwrap();
    std::fs::write(
        &cloud.config,
        format!("sink_transient_failing_ms = 2000\n{config}"),
    )
    .unwrap();
    cloud.start();
    let (_agent, acked, line) =
        publish_until_failing(dir.path(), &broker, &moto, stream, &cloud, 1_000);
    assert!(
        line.contains("(transient)") && line.contains("failing for"),
        "{line}"
    );
    let influx = InfluxD::start_on(dir.path(), "plant", port);
    wait_influxdb(&influx, &cloud, &numbered(&acked));
    wait_ok_again(&cloud);
}

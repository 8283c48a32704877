//! The InfluxDB sink end to end: agent → Kinesis (moto) → cloud → real InfluxDB 1.x (v1 API) and
//! VictoriaMetrics (v2 API with a token), read back through their query APIs and compared exactly as
//! multisets of (series, time, value) with what the publisher got acknowledged; through a cloud worker
//! kill -9 (the replay rewrites the same points).

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

/// Waits until `read()` equals `expected` as a multiset; panics with the difference at the deadline.
fn wait_exactly(
    what: &str,
    expected: &BTreeMap<Key, usize>,
    timeout: Duration,
    mut read: impl FnMut() -> Vec<Key>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = counted(read());
        if got == *expected {
            return;
        }
        if Instant::now() > deadline {
            panic!("{}", describe_difference(what, expected, &got));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
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
    let acked = publish_numbered(broker.port, 20_000, 20_000.0, 0, dir.path());
    wait_sent(&agent, acked.len());
    agent.stop();
    let expected = numbered(&acked);
    let n = expected.len();
    assert_eq!(n, 20_000, "every message acknowledged");
    let t0 = Instant::now();
    cloud.start();
    wait_for("every point written", Duration::from_secs(120), || {
        (cloud.metric("fieldlink_influxdb_points_written_total") as usize >= n).then_some(())
    });
    let secs = t0.elapsed().as_secs_f64();
    let requests = cloud.metric("fieldlink_influxdb_requests_total{status=\"204\"}");
    eprintln!(
        "one worker wrote {n} points in {secs:.2} s from start (incl. startup and Kinesis reads): {:.0} points/s, {requests} requests",
        n as f64 / secs
    );
    wait_exactly(
        "victoria-metrics",
        &expected,
        Duration::from_secs(30),
        || vm.readings(MEASUREMENT),
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
    wait_exactly("influxdb", &expected, Duration::from_secs(60), || {
        influx.readings("plant", MEASUREMENT)
    });
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

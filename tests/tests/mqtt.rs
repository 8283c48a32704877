//! The MQTT source against a real Mosquitto: restarts, reconnects.

use fieldlink_e2e::*;
use std::collections::BTreeSet;
use std::time::Duration;

#[test]
fn a_broker_restart_mid_stream_loses_no_acknowledged_reading() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = Mosquitto::start_persistent(dir.path(), port);
    let moto = Moto::start(dir.path());
    moto.create("restart", 1, "unused-db", "unused-table", "unused-bucket");
    let mut agent = AgentProc::new(
        dir.path(),
        "restart-agent",
        port,
        &moto.endpoint,
        "restart",
        "",
        "",
    );
    agent.start();

    let path = dir.path().to_path_buf();
    let publisher = std::thread::spawn(move || publish_numbered(port, 6000, 1500.0, 0, &path));
    std::thread::sleep(Duration::from_millis(1500));
    // SIGTERM: Mosquitto saves its sessions and queued messages, then comes back on the same port.
    broker.proc.terminate(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    broker = Mosquitto::start_persistent(dir.path(), port);
    let acked = publisher.join().unwrap();
    assert!(
        acked.len() > 3000,
        "the broker acknowledged only {}",
        acked.len()
    );

    let got = wait_for(
        "every acknowledged reading in Kinesis after the restart",
        Duration::from_secs(40),
        || {
            let got: BTreeSet<u64> = numbers_in(&kinesis_dump(&moto.endpoint, "restart"))
                .into_iter()
                .collect();
            let missing: Vec<u64> = acked.iter().copied().filter(|n| !got.contains(n)).collect();
            if !missing.is_empty() {
                let m = http_get(agent.metrics_port, "/metrics").unwrap_or_default();
                let mqtt: Vec<&str> = m
                    .lines()
                    .filter(|l| {
                        l.starts_with("fieldlink_mqtt")
                            || l.starts_with("fieldlink_readings_received")
                            || l.starts_with("fieldlink_buffer_unsealed")
                    })
                    .collect();
                eprintln!("restart: {} acknowledged readings missing, e.g. {:?}\nmetrics: {:?}\nhealth: {:?}\nbroker log tail: {:?}", missing.len(), &missing[..missing.len().min(8)], mqtt,
                    http_get(agent.metrics_port, "/health"),
                    std::fs::read_to_string(dir.path().join(format!("mosquitto-{port}.log"))).unwrap_or_default().lines().rev().take(6).collect::<Vec<_>>());
            }
            missing.is_empty().then_some(got)
        },
    );
    let reconnects = http_get(agent.metrics_port, "/metrics")
        .and_then(|m| {
            metric_with(
                &m,
                "fieldlink_mqtt_reconnects_total",
                "connection=\"local\"",
            )
        })
        .unwrap_or(0.0);
    assert!(reconnects >= 1.0, "the agent did not notice the restart");
    assert!(
        http_get(agent.metrics_port, "/health")
            .unwrap()
            .contains("mqtt:local: ok"),
        "not resubscribed"
    );
    agent.stop();
    drop(broker);
    eprintln!("broker restart: {} readings acknowledged by the broker, all {} in Kinesis; {reconnects} reconnect(s)", acked.len(), got.len());
}

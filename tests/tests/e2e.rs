//! The first end-to-end path on real services: a real MQTT client (paho) publishes readings from the shared
//! dataset to a real Mosquitto; `fieldlink-agent` buffers and sends them to Kinesis on moto server;
//! `fieldlink-cloud` lands them in moto's Timestream and in Parquet files on moto's S3, read back with pyarrow.
//! Exactly the published readings must land in both: none missing, none doubled.
#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const N: usize = 12_000;

fn agent_config(
    dir: &Path,
    mqtt_port: u16,
    metrics_port: u16,
    endpoint: &str,
    stream: &str,
) -> String {
    format!(
        r##"agent_id = "e2e-agent"
metrics_listen = "127.0.0.1:{metrics_port}"
[log]
level = "info"
[aws]
endpoint_url = "{endpoint}"
[buffer]
path = "{buffer}"
durability = "normal"
[batch]
linger_ms = 200
max_readings = 2000
[kinesis]
stream = "{stream}"
[[mqtt]]
name = "local"
host = "127.0.0.1"
port = {mqtt_port}
[[mqtt.topics]]
filter = "#"
qos = 1
"##,
        buffer = dir.join("agent-buffer.db").display()
    )
}

fn cloud_config(metrics_port: u16, endpoint: &str, stream: &str) -> String {
    // The dataset is months old: only the magnetic store takes it.
    cloud_toml(
        metrics_port,
        endpoint,
        stream,
        "e2e",
        "s3://bronze-e2e/bronze",
        "magnetic_store_writes = true",
    )
}

#[test]
fn mqtt_readings_land_exactly_once_in_timestream_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    let stream = "fieldlink-e2e";
    moto.create(stream, 2, "fieldlink", "readings", "bronze-e2e");

    let (agent_port, cloud_port) = (free_port(), free_port());
    let agent_toml = dir.path().join("agent.toml");
    let cloud_toml = dir.path().join("cloud.toml");
    std::fs::write(
        &agent_toml,
        agent_config(dir.path(), broker.port, agent_port, &moto.endpoint, stream),
    )
    .unwrap();
    std::fs::write(
        &cloud_toml,
        cloud_config(cloud_port, &moto.endpoint, stream),
    )
    .unwrap();

    // check-config accepts both files.
    for (b, cfg) in [
        ("fieldlink-agent", &agent_toml),
        ("fieldlink-cloud", &cloud_toml),
    ] {
        let out = Command::new(bin(b))
            .arg("check-config")
            .arg("--config")
            .arg(cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{b} check-config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let mut cmd = Command::new(bin("fieldlink-cloud"));
    cmd.arg("run").arg("--config").arg(&cloud_toml);
    aws_env(&mut cmd);
    let mut cloud = Proc::spawn("fieldlink-cloud", cmd, &dir.path().join("cloud.log"));

    let mut cmd = Command::new(bin("fieldlink-agent"));
    cmd.arg("run").arg("--config").arg(&agent_toml);
    aws_env(&mut cmd);
    let mut agent = Proc::spawn("fieldlink-agent", cmd, &dir.path().join("agent.log"));
    wait_for("the agent to subscribe", Duration::from_secs(30), || {
        http_get(agent_port, "/health")
            .filter(|b| b.contains("mqtt:local: ok"))
            .map(|_| ())
    });

    let published = run_python(&[
        script("publish.py").to_str().unwrap(),
        "127.0.0.1",
        &broker.port.to_string(),
        dataset_path().to_str().unwrap(),
        &N.to_string(),
    ]);
    eprintln!("published: {published}");

    let expected = counted(
        dataset(N)
            .into_iter()
            .map(|(s, ts, v)| (s, ts, v.to_bits())),
    );
    assert_eq!(expected.len(), N, "dataset slice has duplicate readings");

    // Every reading reaches Kinesis (the agent's ledger) and Timestream.
    wait_for(
        "the agent to send every reading",
        Duration::from_secs(60),
        || {
            let m = http_get(agent_port, "/metrics")?;
            (metric(&m, "fieldlink_readings_sent_total")? as usize >= N).then_some(())
        },
    );
    let landed_now = || {
        read_landed(
            &moto.endpoint,
            "fieldlink",
            "readings",
            "bronze-e2e",
            "bronze",
        )
    };
    wait_for(
        "Timestream to hold every reading",
        Duration::from_secs(90),
        || {
            let v = landed_now();
            (v["timestream"].as_array()?.len() >= N).then_some(())
        },
    );

    // Graceful shutdown writes the staged Parquet files into the landing area, and one compaction round
    // publishes what the running compactor had not; the agent exits cleanly with nothing pending.
    cloud.terminate(Duration::from_secs(30));
    compact_once(&cloud_toml);
    let agent_metrics = http_get(agent_port, "/metrics").unwrap();
    assert_eq!(
        metric(&agent_metrics, "fieldlink_readings_received_total"),
        Some(N as f64)
    );
    assert_eq!(
        metric(&agent_metrics, "fieldlink_buffer_pending_readings"),
        Some(0.0)
    );
    agent.terminate(Duration::from_secs(30));

    let v: serde_json::Value = landed_now();
    let ts = counted(landed_rows(&v, "timestream"));
    let pq = counted(landed_rows(&v, "parquet"));
    assert!(
        ts == expected,
        "{}",
        describe_difference("timestream", &expected, &ts)
    );
    assert!(
        pq == expected,
        "{}",
        describe_difference("parquet", &expected, &pq)
    );
    // Multi-measure grouping: one message (one device, one timestamp, up to six measures) is one record, and
    // the agent never splits a message across batches.
    let messages = serde_json::from_str::<serde_json::Value>(&published).unwrap()["messages"]
        .as_u64()
        .unwrap() as usize;
    let records = v["timestream_records"].as_u64().unwrap() as usize;
    assert_eq!(
        records, messages,
        "Timestream records for {messages} messages"
    );
    // Files are partitioned by event hour.
    let files: Vec<&str> = v["parquet_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(!files.is_empty());
    for f in &files {
        assert!(
            f.starts_with("bronze-e2e/bronze/dt=2026-03-02/hour="),
            "unexpected key {f}"
        );
    }
    eprintln!(
        "landed {N} readings: {records} Timestream records, {} Parquet files",
        files.len()
    );
}

/// Readings polled from a pymodbus device land in Timestream and Parquet like MQTT readings.
#[test]
fn modbus_readings_land_in_timestream_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    moto.create(
        "fieldlink-modbus",
        1,
        "fieldlink",
        "readings",
        "bronze-modbus",
    );
    let device = ModbusDevice::tcp(dir.path(), free_port());
    let modbus = format!(
        "[[modbus]]\nname = \"pump\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:{}\"\nseries_prefix = \"plant/pump-7\"\ntags = {{ site = \"muc\" }}\n\
         [[modbus.groups]]\nname = \"g\"\ninterval_ms = 200\n\
         [[modbus.points]]\nname = \"pressure\"\ngroup = \"g\"\nregister = \"input\"\naddress = 0\ntype = \"f32\"\nunit = \"bar\"\n\
         [[modbus.points]]\nname = \"running\"\ngroup = \"g\"\nregister = \"coil\"\naddress = 0\n",
        device.port
    );
    let mut agent = AgentProc::new(
        dir.path(),
        "modbus-e2e",
        broker.port,
        &moto.endpoint,
        "fieldlink-modbus",
        "",
        &modbus,
    );
    let cloud_toml = dir.path().join("cloud.toml");
    let cloud_port = free_port();
    std::fs::write(
        &cloud_toml,
        cloud_config(cloud_port, &moto.endpoint, "fieldlink-modbus")
            .replace("bronze-e2e", "bronze-modbus"),
    )
    .unwrap();
    let mut cmd = Command::new(bin("fieldlink-cloud"));
    cmd.arg("run").arg("--config").arg(&cloud_toml);
    aws_env(&mut cmd);
    let mut cloud = Proc::spawn("fieldlink-cloud", cmd, &dir.path().join("cloud.log"));
    agent.start();
    let landed_now = || {
        read_landed(
            &moto.endpoint,
            "fieldlink",
            "readings",
            "bronze-modbus",
            "bronze",
        )
    };
    let ts = wait_for(
        "Modbus readings in Timestream",
        Duration::from_secs(60),
        || {
            let v = landed_now();
            let rows = landed_rows(&v, "timestream");
            (rows
                .iter()
                .filter(|r| r.0 == "plant/pump-7/pressure")
                .count()
                >= 5)
                .then_some(rows)
        },
    );
    assert!(ts
        .iter()
        .any(|r| r.0 == "plant/pump-7/pressure" && f64::from_bits(r.2) == 230.5));
    agent.stop();
    // Every pressure reading the agent sent (its stop drains the buffer), each once: what both sinks must hold.
    let sent: BTreeMap<Key, usize> = counted(
        unique_batches(&kinesis_dump(&moto.endpoint, "fieldlink-modbus"))
            .iter()
            .flat_map(|r| r.readings.iter())
            .filter(|r| r.0 == "plant/pump-7/pressure")
            .map(|r| (r.0.clone(), r.1, r.2.parse::<f64>().unwrap().to_bits())),
    );
    assert!(sent.len() >= 5, "{} pressure readings sent", sent.len());
    wait_for(
        "every sent reading in Timestream",
        Duration::from_secs(60),
        || {
            let ts = counted(landed_rows(&landed_now(), "timestream"));
            sent.keys().all(|k| ts.contains_key(k)).then_some(())
        },
    );
    cloud.terminate(Duration::from_secs(30));
    // A one-shot compaction serves no metrics: another process holding the config's port does not stop it.
    let _metrics_port_taken = std::net::TcpListener::bind(("127.0.0.1", cloud_port))
        .expect("the stopped cloud's metrics port");
    compact_once(&cloud_toml);
    let v: serde_json::Value = landed_now();
    let ts = counted(landed_rows(&v, "timestream"));
    let pq = counted(landed_rows(&v, "parquet"));
    let only_pressure = |m: &BTreeMap<Key, usize>| -> BTreeMap<Key, usize> {
        m.iter()
            .filter(|(k, _)| k.0 == "plant/pump-7/pressure")
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    };
    assert_eq!(
        only_pressure(&pq),
        sent,
        "Parquet holds exactly the pressure readings sent, each once"
    );
    assert_eq!(
        only_pressure(&ts),
        sent,
        "Timestream holds exactly the pressure readings sent"
    );
    assert!(
        ts.values().all(|&n| n == 1) && pq.values().all(|&n| n == 1),
        "a reading landed twice"
    );
}

//! fieldlink benchmark: one command (`deploy/bench.sh`), five figures.
//!
//! 1. **Pipeline readings/s on one core**: the whole dataset as JSON MQTT payloads through the agent's own code on
//!    one thread: payload mapping → buffer append (SQLite, group commits of 1000 messages) → seal (dedup, order,
//!    batch, zstd encode), with `durability = normal` and `full`; then one run of the dataset and one of 1,000 dense
//!    series with the rate per second on the CPU and the bytes the buffer wrote per reading (`bench pipeline` runs
//!    only these two).
//!    The same with **100 alarm rules** active, next to none, twice: rules spread over the devices (each device's
//!    readings meet a few rules, as a site would write them), and broad rules (above/below with hysteresis and
//!    delays, rate, stale, quality on whole families of series: every reading is evaluated by dozens of rules).
//!    And **100 window rules** (docs/windows.md), alone and beside the 100 spread alarm rules. `bench rules` runs
//!    only this comparison.
//! 2. **Bytes per reading on the wire**: what that seal produced (and the same pipeline writing wire format v1).
//! 3. **Payload mapping alone**: messages of ten fields as JSON and as InfluxDB line protocol, one thread.
//! 4. **MQTT ingest with durable acks next to a bare subscriber**, same broker, same run: N QoS 1 messages of ten
//!    JSON fields (so the mapping is on) are
//!    queued at Mosquitto for two persistent sessions; then a bare rumqttc subscriber and the agent (release
//!    build, `durability = full`) each drain their queue; rates are messages per second from first to last.
//! 5. **Peak RSS** (VmHWM) of a fresh agent process at 10,000 readings/s, event time advancing in real time: at
//!    15 s and over 75 s (the dedup states fill their 60 s window of event time at 60 s).
#![allow(clippy::unwrap_used)]

// As in fieldlink-agent: a static (musl) build measures the shipped allocator, with the agent's memory settings
// (`fieldlink_agent::memory::tune`, first in `main`; docs/memory.md).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use fieldlink_agent::alarm::{AlarmsConfig, Engine};
use fieldlink_agent::batch::BatchConfig;
use fieldlink_agent::buffer::{Buffer, Durability, NewReading};
use fieldlink_agent::mqtt::payload::Mapper;
use fieldlink_agent::mqtt::{Format, PayloadConfig};
use fieldlink_agent::order::OrderConfig;
use fieldlink_agent::window::WindowsConfig;
use fieldlink_e2e::*;
use fieldlink_proto::Encoder;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant};

fn messages() -> Vec<(String, Vec<u8>)> {
    let rows = dataset(usize::MAX);
    let mut out: Vec<(String, serde_json::Map<String, serde_json::Value>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for (series, ts, v) in rows {
        let (device, measure) = series.rsplit_once('/').unwrap();
        let i = *index.entry((device.to_owned(), ts)).or_insert_with(|| {
            let mut m = serde_json::Map::new();
            m.insert("ts".into(), ts.into());
            out.push((device.to_owned(), m));
            out.len() - 1
        });
        out[i].1.insert(measure.to_owned(), v.into());
    }
    out.into_iter()
        .map(|(t, m)| (t, serde_json::to_vec(&m).unwrap()))
        .collect()
}

/// 100 rules spread over the devices: rule k watches device k of one family (an IMU's six axes, or a meter),
/// cycling through the conditions.
fn per_device_rules() -> AlarmsConfig {
    let mut t = String::new();
    for k in 0..100 {
        let (series, body) = match k % 5 {
            0 => (format!("line3/robot-imu/{:03}/+", k % 40), "condition = \"above\"\nlevels = [{ name = \"warning\", limit = 0.5 }, { name = \"critical\", limit = 1.0 }]\nhysteresis = 0.05\non_delay_ms = 200\noff_delay_ms = 1000"),
            1 => (format!("line3/robot-imu-b/{:03}/+", k % 40), "condition = \"below\"\nlevels = [{ name = \"low\", limit = -0.5 }]\nhysteresis = 0.05"),
            2 => (format!("line3/robot-imu/{:03}/+", (k + 7) % 40), "condition = \"rate\"\nspan_ms = 1000\nlevels = [{ name = \"fast\", limit = 2.0 }]"),
            3 => (format!("plant/meter/{:03}/value", k % 100), "condition = \"stale\"\nlevels = [{ name = \"late\", after_ms = 60000 }, { name = \"dead\", after_ms = 600000 }]"),
            _ => (format!("plant/meter-b/{:03}/value", k % 100), "condition = \"quality\"\nlevels = [{ name = \"bad\", quality = \"bad\" }]"),
        };
        t.push_str(&format!(
            "[[rules]]\nname = \"rule-{k}\"\nseries = \"{series}\"\n{body}\n\n"
        ));
    }
    let cfg: AlarmsConfig = toml::from_str(&t).unwrap();
    assert!(cfg.validate("alarms", &[]).is_empty());
    cfg
}

/// 100 broad rules over the dataset's series (IMU axes, meters, office and utility sensors).
fn hundred_rules() -> AlarmsConfig {
    let mut t = String::new();
    let axes = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"];
    for k in 0..100 {
        let axis = axes[k % 6];
        let family = if k % 2 == 0 {
            "robot-imu"
        } else {
            "robot-imu-b"
        };
        let body = match k % 5 {
            0 => format!(
                "series = \"line3/+/+/{axis}\"\ncondition = \"above\"\nlevels = [{{ name = \"warning\", limit = {} }}, {{ name = \"critical\", limit = {} }}]\nhysteresis = 0.05\non_delay_ms = 200\noff_delay_ms = 1000",
                0.2 + (k as f64) * 0.01,
                0.6 + (k as f64) * 0.01
            ),
            1 => format!(
                "series = \"line3/{family}/+/{axis}\"\ncondition = \"below\"\nlevels = [{{ name = \"low\", limit = {} }}]\nhysteresis = 0.05",
                -0.3 - (k as f64) * 0.01
            ),
            2 => format!(
                "series = \"line3/+/+/{axis}\"\ncondition = \"rate\"\nspan_ms = 1000\nlevels = [{{ name = \"fast\", limit = {} }}]",
                1.0 + (k as f64) * 0.05
            ),
            3 => "series = \"plant/#\"\ncondition = \"stale\"\nlevels = [{ name = \"late\", after_ms = 60000 }, { name = \"dead\", after_ms = 600000 }]".to_owned(),
            _ => "series = \"#\"\ncondition = \"quality\"\nlevels = [{ name = \"bad\", quality = \"bad\" }]".to_owned(),
        };
        t.push_str(&format!("[[rules]]\nname = \"rule-{k}\"\n{body}\n\n"));
    }
    let cfg: AlarmsConfig = toml::from_str(&t).unwrap();
    assert!(cfg.validate("alarms", &[]).is_empty());
    cfg
}

/// 100 window rules spread over the devices like [`per_device_rules`]: IMU axes in 10 s, 1 min and 15 min windows
/// with every function, IMU-b axes in 1 s and 10 s means and maxima, meters in 1 and 15 min means and counts
/// (`meter-b` with `keep_raw = false`).
fn hundred_windows() -> WindowsConfig {
    let mut t = String::new();
    for k in 0..100 {
        let body = match k % 4 {
            // One device per rule (k / 4 is 0..25): two rules on one device would write its derived series twice
            // (check-config refuses that).
            0 => format!("series = \"line3/robot-imu/{:03}/+\"\nsizes_ms = [10000, 60000, 900000]\nfunctions = [\"count\", \"min\", \"max\", \"mean\", \"sum\", \"first\", \"last\"]", k / 4),
            1 => format!("series = \"line3/robot-imu-b/{:03}/+\"\nsizes_ms = [1000, 10000]\nfunctions = [\"mean\", \"max\"]", k / 4),
            2 => format!("series = \"plant/meter/{:03}/value\"\nsizes_ms = [60000, 900000]\nfunctions = [\"mean\", \"count\"]", k % 100),
            _ => format!("series = \"plant/meter-b/{:03}/value\"\nsizes_ms = [60000]\nfunctions = [\"mean\"]\nkeep_raw = false", k % 100),
        };
        t.push_str(&format!(
            "[[rules]]\nname = \"window-{k}\"\n{body}\nallowed_lateness_ms = 2000\n\n"
        ));
    }
    let cfg: WindowsConfig = toml::from_str(&t).unwrap();
    assert!(cfg.validate("windows").is_empty());
    cfg
}

type Rules = (Option<AlarmsConfig>, Option<WindowsConfig>);

fn pipeline(
    msgs: &[(String, Vec<u8>)],
    durability: Durability,
    wire_version: u8,
    (alarms, windows): (Option<&AlarmsConfig>, Option<&WindowsConfig>),
) -> (f64, usize, u64, f64, u64, Option<f64>) {
    let dir = tempfile::tempdir().unwrap();
    let mut buffer = Buffer::open(&dir.path().join("bench.db"), durability, "bench").unwrap();
    if let Some(a) = alarms {
        buffer.enable_alarms(Engine::from_config(a), 0).unwrap();
    }
    if let Some(w) = windows {
        buffer
            .enable_windows(fieldlink_agent::window::Engine::from_config(w))
            .unwrap();
    }
    let mut encoder = Encoder::new(3).unwrap();
    let batch = BatchConfig {
        wire_version,
        ..BatchConfig::default()
    };
    let order = OrderConfig::default();
    let mut mapper = Mapper::new(PayloadConfig::default());
    let now = fieldlink_ops::unix_ms(); // arrival time: payload timestamps are checked against it
    let start = Instant::now();
    let cpu_start = thread_cpu_s();
    let mut readings = 0usize;
    for chunk in msgs.chunks(1000) {
        let groups: Vec<Vec<NewReading>> = chunk
            .iter()
            .map(|(t, p)| mapper.map(Format::Json, t, p, now, &[]).unwrap().readings)
            .collect();
        readings += groups.iter().map(Vec::len).sum::<usize>();
        buffer.append(groups.iter().map(Vec::as_slice)).unwrap();
        if buffer.stats().unsealed_readings >= 20_000 {
            buffer
                .seal(
                    buffer.last_row_id(),
                    100_000,
                    &mut encoder,
                    &batch,
                    order.rules(),
                    0,
                )
                .unwrap();
        }
    }
    while buffer
        .seal(i64::MAX, 100_000, &mut encoder, &batch, order.rules(), 0)
        .unwrap()
        .rows
        > 0
    {}
    let secs = start.elapsed().as_secs_f64();
    let on_cpu = thread_cpu_s().zip(cpu_start).map(|(b, a)| b - a);
    let l = buffer.ledger();
    (
        readings as f64 / secs,
        readings,
        l.bytes_sealed,
        l.batches_sealed as f64,
        l.alarm_events + l.window_derived,
        on_cpu.map(|s| readings as f64 / s),
    )
}

/// One pipeline run (`durability = normal`, no rules) of the shared dataset (686 series, sparse), then of dense
/// series: 100 devices of ten fields, a message every millisecond (each series' dedup window full); with the rate
/// per second on the CPU and the bytes SQLite wrote per reading (WAL and checkpoints).
fn pipeline_written(msgs: &[(String, Vec<u8>)]) {
    let dense: Vec<(String, Vec<u8>)> = (0..200_000)
        .map(|i| {
            (
                format!("plant/dev{:03}", i % 100),
                ten_fields(i).into_bytes(),
            )
        })
        .collect();
    let v2 = BatchConfig::default().wire_version;
    for (name, msgs) in [("dataset", msgs), ("dense", &dense)] {
        let written = thread_written();
        let (rate, readings, .., on_cpu) = pipeline(msgs, Durability::Normal, v2, (None, None));
        let written = thread_written().zip(written).map(|(b, a)| b - a);
        println!(
            "pipeline ({name}), durability=normal, one run: {rate:>10.0} readings/s; per second on the CPU: {}; written to the buffer: {} B/reading",
            on_cpu.map_or("unknown".into(), |r| format!("{r:.0}")),
            written.map_or("unknown".into(), |w| format!("{:.1}", w as f64 / readings as f64))
        );
    }
}

/// Figure 1's rule sets, interleaved three times (the machine's load moves); the best of each.
fn rule_sets(msgs: &[(String, Vec<u8>)], readings: usize) {
    let v2 = BatchConfig::default().wire_version;
    let evaluations = |cfg: &AlarmsConfig| -> f64 {
        let engine = Engine::from_config(cfg);
        let mut n = 0usize;
        for (series, _, _) in dataset(usize::MAX) {
            let s = fieldlink_proto::Series::new(series);
            n += engine.rules().iter().filter(|r| r.matches(&s)).count();
        }
        n as f64 / readings as f64
    };
    let sets: [(&str, Rules); 5] = [
        ("none", (None, None)),
        ("spread over devices", (Some(per_device_rules()), None)),
        ("broad", (Some(hundred_rules()), None)),
        ("100 windows", (None, Some(hundred_windows()))),
        (
            "100 alarms+100 windows",
            (Some(per_device_rules()), Some(hundred_windows())),
        ),
    ];
    let mut best = [(0.0f64, 0u64); 5];
    for _ in 0..3 {
        for (i, (_, (a, w))) in sets.iter().enumerate() {
            let (rate, _, _, _, events, _) =
                pipeline(msgs, Durability::Normal, v2, (a.as_ref(), w.as_ref()));
            if rate > best[i].0 {
                best[i] = (rate, events);
            }
        }
    }
    println!("  alarm and window rules, durability=normal, best of three interleaved runs:");
    for (i, (name, (a, _))) in sets.iter().enumerate() {
        let (rate, events) = best[i];
        let per_reading = a.as_ref().map_or(0.0, &evaluations);
        println!(
            "    {name:<22} ({per_reading:>4.1} alarm evaluations per reading): {rate:>10.0} readings/s ({:>3.0} % of none; {events} alarm events + derived readings)",
            rate / best[0].0 * 100.0
        );
    }
}

/// The ten-field JSON payload of message `i` (IMU-like plus a status), as used by the ingest and mapping
/// figures.
fn ten_fields(i: usize) -> String {
    let v = (i % 997) as f64 * 0.5;
    format!(
        "{{\"ts\":{},\"acc_x\":{v},\"acc_y\":{},\"acc_z\":{},\"gyr_x\":{},\"gyr_y\":{},\"gyr_z\":{},\"temp\":{},\"vbat\":{},\"rssi\":{},\"ok\":true}}",
        1_772_431_200_000i64 + i as i64,
        v + 0.25,
        v - 1.5,
        v * 0.01,
        -v,
        v / 3.0,
        21.5 + (i % 10) as f64,
        3.7,
        -(((i % 40) + 50) as i64)
    )
}

/// The same ten values as one line of InfluxDB line protocol.
fn ten_fields_influx(i: usize) -> String {
    let v = (i % 997) as f64 * 0.5;
    format!(
        "imu,dev=dev{:03} acc_x={v},acc_y={},acc_z={},gyr_x={},gyr_y={},gyr_z={},temp={},vbat=3.7,rssi={}i,ok=t {}",
        i % 100,
        v + 0.25,
        v - 1.5,
        v * 0.01,
        -v,
        v / 3.0,
        21.5 + (i % 10) as f64,
        -(((i % 40) + 50) as i64),
        (1_772_431_200_000i64 + i as i64) * 1_000_000
    )
}

/// Payload mapping alone, one thread: messages/s and readings/s of `format`.
/// Figure 3: payload mapping alone, messages of ten fields as JSON and as InfluxDB line protocol.
fn mapping_figure() {
    let n_map = 200_000;
    let json: Vec<(String, Vec<u8>)> = (0..n_map)
        .map(|i| {
            (
                format!("bench/dev{:03}", i % 100),
                ten_fields(i).into_bytes(),
            )
        })
        .collect();
    let influx: Vec<(String, Vec<u8>)> = (0..n_map)
        .map(|i| ("bench/influx".to_owned(), ten_fields_influx(i).into_bytes()))
        .collect();
    println!("payload mapping alone (1 thread), messages of 10 fields:");
    for (name, format, msgs) in [
        ("JSON", Format::Json, &json),
        ("InfluxDB line protocol", Format::Influx, &influx),
    ] {
        let (m, r) = mapping(format, msgs);
        println!("  {name:<24} {m:>10.0} msgs/s = {r:>10.0} readings/s");
    }
}

fn mapping(format: Format, msgs: &[(String, Vec<u8>)]) -> (f64, f64) {
    let mut mapper = Mapper::new(PayloadConfig::default());
    let now = fieldlink_ops::unix_ms();
    let mut best = (0.0f64, 0.0f64);
    for _ in 0..3 {
        let start = Instant::now();
        let mut readings = 0usize;
        for (t, p) in msgs {
            readings += mapper.map(format, t, p, now, &[]).unwrap().readings.len();
        }
        let secs = start.elapsed().as_secs_f64();
        if msgs.len() as f64 / secs > best.0 {
            best = (msgs.len() as f64 / secs, readings as f64 / secs);
        }
    }
    best
}

async fn preload(port: u16, n: usize, payload: fn(usize) -> String) {
    let mut opts = MqttOptions::new("bench-publisher", "127.0.0.1", port);
    opts.set_inflight(1000);
    let (client, mut ev) = AsyncClient::new(opts, 2000);
    let pump = tokio::spawn(async move {
        let mut acked = 0;
        while acked < n {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = ev.poll().await {
                acked += 1;
            }
        }
    });
    for i in 0..n {
        let payload = payload(i);
        client
            .publish(
                format!("bench/dev{:03}", i % 100),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }
    pump.await.unwrap();
}

async fn bare_session(port: u16, connect_only: bool, n: usize) -> f64 {
    let mut opts = MqttOptions::new("bench-bare", "127.0.0.1", port);
    opts.set_clean_session(false);
    opts.set_inflight(100);
    let (client, mut ev) = AsyncClient::new(opts, 100);
    client.subscribe("bench/#", QoS::AtLeastOnce).await.unwrap();
    let (mut got, mut first) = (0usize, None);
    loop {
        match ev.poll().await.unwrap() {
            Event::Incoming(Packet::SubAck(_)) if connect_only => break,
            Event::Incoming(Packet::Publish(_)) => {
                first.get_or_insert_with(Instant::now);
                got += 1;
                if got == n {
                    break;
                }
            }
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    first.map_or(0.0, |f| n as f64 / f.elapsed().as_secs_f64())
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes this thread has passed to `write`-family calls (Linux `/proc/thread-self/io`, `wchar`): in the pipeline,
/// what SQLite wrote to the buffer file and its WAL.
fn thread_written() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/io").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("wchar:"))?
        .trim()
        .parse()
        .ok()
}

/// Seconds this thread has run on a CPU (Linux `/proc/thread-self/schedstat`): a rate per CPU second does not
/// move with other load on the machine the way a wall-clock rate does.
fn thread_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

fn main() {
    // SAFETY: first in `main`, before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        fieldlink_agent::memory::tune();
    }
    let only = std::env::args().nth(1);
    if matches!(only.as_deref(), Some("rss" | "ingest")) {
        // Only figure 5 (for measuring memory settings): `bench rss`; only figure 4: `bench ingest`.
        let dir = tempfile::tempdir().unwrap();
        let broker = Mosquitto::start(dir.path());
        let moto = Moto::start(dir.path());
        moto.create("bench", 1, "unused-db", "unused-table", "unused-bucket");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        if only.as_deref() == Some("rss") {
            steady_rss(dir.path(), &broker, &moto, &rt);
        } else {
            ingest_figure(dir.path(), &broker, &moto, &rt);
        }
        return;
    }
    let msgs = messages();
    let v2 = BatchConfig::default().wire_version;
    if only.as_deref() == Some("pipeline") {
        // One run of figure 1 without rules, nothing else (for profiles and instruction counts).
        pipeline_written(&msgs);
        return;
    }
    if only.as_deref() == Some("core") {
        // Only figures 1 (without rules) and 3, best of three: `bench core` (for before/after comparisons).
        let best = (0..3)
            .map(|_| pipeline(&msgs, Durability::Normal, v2, (None, None)).0)
            .fold(0.0, f64::max);
        println!("pipeline, durability=normal, best of three: {best:>10.0} readings/s");
        mapping_figure();
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("rules") {
        let readings = msgs.len(); // recounted below
        let (_, readings_n, ..) = pipeline(&msgs, Durability::Normal, v2, (None, None));
        let _ = readings;
        println!("pipeline (1 thread, payload → buffer → dedup/order → windows/alarms → zstd batches), {readings_n} readings:");
        rule_sets(&msgs, readings_n);
        return;
    }
    let (rate_n, readings, bytes, batches, ..) =
        pipeline(&msgs, Durability::Normal, v2, (None, None));
    let (rate_f, ..) = pipeline(&msgs, Durability::Full, v2, (None, None));
    let (rate_1, _, bytes_1, batches_1, ..) = pipeline(&msgs, Durability::Normal, 1, (None, None));
    println!("pipeline (1 thread, payload → buffer → dedup/order → zstd batches), {readings} readings in {} messages:", msgs.len());
    println!("  durability=normal: {rate_n:>10.0} readings/s");
    println!("  durability=full:   {rate_f:>10.0} readings/s");
    pipeline_written(&msgs);
    rule_sets(&msgs, readings);
    println!(
        "  wire: {bytes} bytes in {batches} records = {:.2} bytes/reading (24 KiB target, wire_version = {v2})",
        bytes as f64 / readings as f64,
    );
    println!(
        "  with wire_version = 1: durability=normal {rate_1:.0} readings/s; wire: {bytes_1} bytes in {batches_1} records = {:.2} bytes/reading",
        bytes_1 as f64 / readings as f64,
    );

    mapping_figure();

    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    moto.create("bench", 1, "unused-db", "unused-table", "unused-bucket");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    ingest_figure(dir.path(), &broker, &moto, &rt);
    steady_rss(dir.path(), &broker, &moto, &rt);
}

/// What the environment changes in a benchmarked agent: `FIELDLINK_BENCH_AGENT` starts another command instead of
/// this build's agent (words split on spaces, the agent binary last: a static build, `heaptrack -o /tmp/h
/// target/debug/fieldlink-agent`); `FIELDLINK_BENCH_AGENT_CONFIG` is appended to its config.
fn overrides(agent: &mut AgentProc) {
    if let Ok(extra) = std::env::var("FIELDLINK_BENCH_AGENT_CONFIG") {
        agent.append_config(&format!("\n{extra}\n"));
    }
    if let Ok(cmd) = std::env::var("FIELDLINK_BENCH_AGENT") {
        agent.launcher = cmd.split_whitespace().map(Into::into).collect();
    }
}

/// Figure 4: MQTT ingest of queued QoS 1 messages of 1 and 10 JSON fields, the agent next to a bare subscriber.
fn ingest_figure(
    dir: &std::path::Path,
    broker: &Mosquitto,
    moto: &Moto,
    rt: &tokio::runtime::Runtime,
) {
    let mut agent = AgentProc::new(
        dir,
        "bench-agent",
        broker.port,
        &moto.endpoint,
        "bench",
        "",
        "",
    );
    // `FIELDLINK_BENCH_MAX_INFLIGHT`: the agent's MQTT in-flight window (default 100) for this figure.
    if let Ok(n) = std::env::var("FIELDLINK_BENCH_MAX_INFLIGHT") {
        let config = std::fs::read_to_string(&agent.config).unwrap().replace(
            "keep_alive_s = 5\n",
            &format!("keep_alive_s = 5\nmax_inflight = {n}\n"),
        );
        std::fs::write(&agent.config, config).unwrap();
    }
    overrides(&mut agent);
    // Both persistent sessions exist before the messages are queued.
    rt.block_on(bare_session(broker.port, true, 0));
    agent.start();
    agent.stop();
    let one_field: fn(usize) -> String = |i| {
        format!(
            "{{\"ts\":{},\"value\":{}}}",
            1_772_431_200_000i64 + i as i64,
            (i % 997) as f64 * 0.5
        )
    };
    for (fields, n, payload) in [
        (1usize, 300_000usize, one_field),
        (10, 300_000, ten_fields as fn(usize) -> String),
    ] {
        rt.block_on(preload(broker.port, n, payload));
        let bare = rt.block_on(bare_session(broker.port, false, n));
        // A fresh agent process: its counters start at zero.
        agent.start();
        let mut first = None;
        let last = wait_for(
            "the agent to drain its queue",
            Duration::from_secs(180),
            || {
                // Committed readings, `fields` per message.
                let got = agent.metric("fieldlink_readings_received_total") / fields as f64;
                if got > 0.0 {
                    first.get_or_insert((Instant::now(), got));
                }
                (got >= n as f64).then(Instant::now)
            },
        );
        agent.stop();
        let (t0, n0) = first.unwrap();
        let agent_rate = (n as f64 - n0) / last.duration_since(t0).as_secs_f64().max(1e-3);
        println!("MQTT ingest, {n} queued QoS 1 messages of {fields} JSON field(s) (mapping on), same broker, same run:");
        println!("  bare rumqttc subscriber (no mapping): {bare:>8.0} msgs/s");
        println!(
            "  fieldlink-agent (acks after fsync):   {agent_rate:>8.0} msgs/s = {:.0} readings/s ({:.2}x the bare subscriber's msgs/s)",
            agent_rate * fields as f64,
            agent_rate / bare
        );
    }
}

/// `/proc/<pid>/smaps_rollup` and `status` fields in KiB.
fn proc_kib(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The agent's threads by name (`comm`), with counts.
fn thread_names(pid: u32) -> String {
    let mut names = std::collections::BTreeMap::<String, usize>::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().to_owned()).or_default() += 1;
    }
    names
        .iter()
        .map(|(n, k)| format!("{n} ×{k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Figure 5: 10,000 readings/s for 75 s in a fresh agent process with a fresh buffer (so neither the ingest burst
/// nor its backlog on the way to Kinesis counts): IMU-like messages of 6 readings from 200 devices at 1667
/// messages/s, their timestamps advancing in real time as a site's do (0.6 ms per message), so the dedup states
/// reach their steady size (`dedup_window_ms`, 60 s of event time: 600,000 readings) after 60 s. The peak is
/// read at 15 s too (earlier versions' figure) and at the end. The agent inherits this process's environment
/// (`MALLOC_ARENA_MAX=…`; and see [`overrides`]); `FIELDLINK_BENCH_RSS_SECS` runs longer or shorter.
/// `FIELDLINK_BENCH_RSS_STALL_S=N` stops the agent (SIGSTOP) for N s at 40 s while the publisher goes on, as a
/// busy host or a slow `fsync` would: the seal after it catches up on N s of readings at once.
/// `FIELDLINK_BENCH_TEXT_PAGES=FILE` writes the agent's mapped code pages there before stopping it
/// (`deploy/hot-text.sh`).
fn steady_rss(
    dir: &std::path::Path,
    broker: &Mosquitto,
    moto: &Moto,
    rt: &tokio::runtime::Runtime,
) {
    let mut agent = AgentProc::new(
        dir,
        "bench-steady-agent",
        broker.port,
        &moto.endpoint,
        "bench",
        "",
        "",
    );
    overrides(&mut agent);
    agent.start();
    let pid_agent = agent.proc.as_ref().unwrap().pid();
    let secs = std::env::var("FIELDLINK_BENCH_RSS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(75u64);
    let stall_s: u64 = std::env::var("FIELDLINK_BENCH_RSS_STALL_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if stall_s > 0 && secs > 40 + stall_s {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(40));
            let kill = |sig: &str| {
                let _ = std::process::Command::new("kill")
                    .arg(sig)
                    .arg(pid_agent.to_string())
                    .status();
            };
            kill("-STOP");
            std::thread::sleep(Duration::from_secs(stall_s));
            kill("-CONT");
        });
    }
    let mut trace = Vec::new();
    let mut hwm_15s = None;
    let sent = rt.block_on(async {
        let mut opts = MqttOptions::new("bench-steady", "127.0.0.1", broker.port);
        opts.set_inflight(1000);
        let (client, mut ev) = AsyncClient::new(opts, 2000);
        tokio::spawn(async move { while ev.poll().await.is_ok() {} });
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let start = Instant::now();
        let mut i = 0u64;
        while start.elapsed() < Duration::from_secs(secs) {
            tick.tick().await;
            if start.elapsed() >= Duration::from_secs(5 * (trace.len() as u64 + 1)) {
                trace.push(proc_kib(pid_agent, "status", "VmRSS"));
                if trace.len() == 3 {
                    hwm_15s = Some(vm_hwm_kib(pid_agent));
                }
            }
            let due = (start.elapsed().as_secs_f64() * 1667.0) as u64;
            while i < due {
                let ts = 1_772_500_000_000i64 + (i * 3 / 5) as i64;
                let p = format!("{{\"ts\":{ts},\"acc_x\":{0},\"acc_y\":{0},\"acc_z\":{0},\"gyr_x\":{0},\"gyr_y\":{0},\"gyr_z\":{0}}}", (i % 1000) as f64 / 7.0);
                client.publish(format!("steady/imu{:03}", i % 200), QoS::AtLeastOnce, false, p).await.unwrap();
                i += 1;
            }
        }
        i * 6
    });
    std::thread::sleep(Duration::from_secs(2));
    let hwm = vm_hwm_kib(pid_agent);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let stalled = if stall_s > 0 {
        format!(", stopped for {stall_s} s at 40 s")
    } else {
        String::new()
    };
    println!(
        "agent at 10,000 readings/s for {secs} s{stalled}: peak RSS (VmHWM) {:.1} MiB ({} at 15 s)",
        mib(hwm),
        hwm_15s.map_or("not reached".into(), |k| format!("{:.1} MiB", mib(k)))
    );
    let trace: Vec<String> = trace.iter().map(|&k| format!("{:.1}", mib(k))).collect();
    println!("  RSS every 5 s: {} MiB", trace.join(", "));
    println!(
        "  at the end: RSS {:.1} MiB = anonymous {:.1} + file-backed {:.1} (+ shmem {:.1}); threads: {}",
        mib(proc_kib(pid_agent, "smaps_rollup", "Rss")),
        mib(proc_kib(pid_agent, "smaps_rollup", "Anonymous")),
        mib(proc_kib(pid_agent, "status", "RssFile")),
        mib(proc_kib(pid_agent, "status", "RssShmem")),
        thread_names(pid_agent)
    );
    println!(
        "  readings published {sent}, received {}, sent to Kinesis {}",
        agent.metric("fieldlink_readings_received_total"),
        agent.metric("fieldlink_readings_sent_total")
    );
    if let Ok(out) = std::env::var("FIELDLINK_BENCH_TEXT_PAGES") {
        let pages = text_pages(pid_agent).expect("reading the agent's pagemap");
        std::fs::write(&out, pages).expect("writing FIELDLINK_BENCH_TEXT_PAGES");
        println!("  pages of code mapped in the agent written to {out}");
    }
    agent.stop();
}

/// The pages of executable file mappings present in `pid` (its pagemap), for `deploy/hot-text.sh`: a line
/// `map LO-HI PATH` per mapping, then a hex address per present page. Run on a build whose every function starts
/// on its own 64 KiB (the kernel's fault-around window), a present page is a function the process ran.
fn text_pages(pid: u32) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    const PAGE: u64 = 4096;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut out = String::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || !f[5].starts_with('/') {
            continue;
        }
        let (lo, hi) = f[0].split_once('-').expect("maps range");
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).expect("maps address"),
            u64::from_str_radix(hi, 16).expect("maps address"),
        );
        out += &format!("map {lo:x}-{hi:x} {}\n", f[5]);
        let mut entries = vec![0u8; ((hi - lo) / PAGE * 8) as usize];
        pagemap.seek(SeekFrom::Start(lo / PAGE * 8))?;
        pagemap.read_exact(&mut entries)?;
        for (i, e) in entries.chunks_exact(8).enumerate() {
            if u64::from_le_bytes(e.try_into().expect("8 bytes")) >> 63 == 1 {
                out += &format!("{:x}\n", lo + i as u64 * PAGE);
            }
        }
    }
    Ok(out)
}

//! The ARM agents, run: the aarch64 and armv7 builds (cross-built by the test command before the tests) under
//! qemu-user against real Mosquitto and moto Kinesis. Numbered QoS 1 readings flow while the agent is killed with
//! SIGKILL and started again; every reading the broker acknowledged must be in Kinesis exactly once.

#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use std::time::Duration;

fn delivers_through_a_kill_under_qemu(triple: &str, qemu: &str, sysroot: &str) {
    let binary = cross_bin(triple, "fieldlink-agent");
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    let stream = "arm";
    moto.create(stream, 1, "unused-db", "unused-table", "unused-bucket");
    let mut agent = AgentProc::new(
        dir.path(),
        &format!("arm-{}", triple.split('-').next().unwrap()),
        broker.port,
        &moto.endpoint,
        stream,
        "",
        "",
    );
    agent.launcher = vec![qemu.into(), "-L".into(), sysroot.into(), binary.into()];
    agent.start();

    let (port, path) = (broker.port, dir.path().to_path_buf());
    let publisher = std::thread::spawn(move || publish_numbered(port, 3000, 500.0, 0, &path));
    let seed = fastrand::u64(..);
    let mut rng = fastrand::Rng::with_seed(seed);
    std::thread::sleep(Duration::from_millis(rng.u64(1500..4000)));
    agent.kill9();
    agent.start();
    let acked = publisher.join().unwrap();
    assert!(
        acked.len() > 2700,
        "the broker acknowledged only {}",
        acked.len()
    );

    let records = wait_for(
        "every acknowledged reading in Kinesis",
        Duration::from_secs(120),
        || {
            let records = kinesis_dump(&moto.endpoint, stream);
            let got: std::collections::BTreeSet<u64> = numbers_in(&records).into_iter().collect();
            acked.iter().all(|n| got.contains(n)).then_some(records)
        },
    );
    let problem = exactly_once(&acked, &numbers_in(&unique_batches(&records)));
    assert!(
        problem.is_empty(),
        "{triple} under qemu (kill seed {seed}): {problem}"
    );
    agent.stop();
    eprintln!(
        "{triple} agent under {qemu}: {} acknowledged readings through a SIGKILL, each in Kinesis once ({} records)",
        acked.len(),
        records.len()
    );
}

#[test]
fn the_aarch64_agent_delivers_exactly_once_through_a_sigkill_under_qemu() {
    delivers_through_a_kill_under_qemu(
        "aarch64-unknown-linux-gnu",
        "qemu-aarch64-static",
        "/usr/aarch64-linux-gnu",
    );
}

#[test]
fn the_armv7_agent_delivers_exactly_once_through_a_sigkill_under_qemu() {
    delivers_through_a_kill_under_qemu(
        "armv7-unknown-linux-gnueabihf",
        "qemu-arm-static",
        "/usr/arm-linux-gnueabihf",
    );
}

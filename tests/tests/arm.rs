//! The ARM agents, run: the static aarch64 build (musl) and the armv7 build (glibc 2.28), as shipped in the
//! packages (`deploy/build-static.sh`, which the test command runs before the tests), under qemu-user against real
//! Mosquitto and moto. Numbered QoS 1 readings flow while the agent is killed with SIGKILL and started again; every
//! reading the broker acknowledged must be in Kinesis, and landed by the cloud in Parquet and Timestream, exactly
//! once. Each agent's memory settings (`agent/src/memory.rs`) are checked as it starts: the allocator and the
//! aarch64 build's mimalloc purge delay, and that the huge-page flag it logs is the process's own (qemu-user 7.2
//! refuses the `prctl`, so here the flag stays on and the log must say so).

#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use std::time::Duration;

/// `launcher`: qemu and its options; the binary is appended. `memory`: what the start-up log's `memory settings`
/// line must contain besides the huge-page flag.
fn delivers_through_a_kill_under_qemu(triple: &str, launcher: &[&str], memory: &[&str]) {
    // The huge-page flag is inherited across fork and exec: the agent's own must be told apart from this process's.
    assert_thp_on_here();
    let binary = static_bin(triple, "fieldlink-agent");
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    let stream = "arm";
    moto.create(stream, 1, CLOUD_DB, CLOUD_TABLE, CLOUD_BUCKET);
    // publish_numbered.py's readings are of March 2026: only the magnetic store takes them.
    let _cloud = Cloud::start(
        dir.path(),
        "arm",
        &moto.endpoint,
        stream,
        "magnetic_store_writes = true",
    );
    let mut agent = AgentProc::new(
        dir.path(),
        &format!("arm-{}", triple.split('-').next().unwrap()),
        broker.port,
        &moto.endpoint,
        stream,
        "",
        "",
    );
    agent.launcher = launcher.iter().map(Into::into).collect();
    agent.launcher.push(binary.into());
    agent.start();
    let (line, thp) = agent.memory_settings();
    // qemu-user hands on only the `prctl` options it knows; Debian bookworm's (7.2) refuses PR_SET_THP_DISABLE with
    // EINVAL, as a kernel before 3.15 or a seccomp filter would. The agent then runs with huge pages as the host
    // gives them, and its log must say which it is.
    let off = match thp.as_str() {
        "THP_enabled:\t0" => true,
        "THP_enabled:\t1" => false,
        other => panic!("{triple}: unexpected status line {other:?}"),
    };
    let want_off = format!("huge_pages_off={off}");
    for want in memory.iter().copied().chain([want_off.as_str()]) {
        assert!(line.contains(want), "{triple}: {want} missing from: {line}");
    }

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

    wait_for(
        "every acknowledged reading in Kinesis",
        Duration::from_secs(120),
        || {
            let records = kinesis_dump(&moto.endpoint, stream);
            let got: std::collections::BTreeSet<u64> = numbers_in(&records).into_iter().collect();
            acked.iter().all(|n| got.contains(n)).then_some(())
        },
    );
    // Judged once the agent has stopped: a copy sent after the first complete dump counts too.
    agent.stop();
    let records = kinesis_dump(&moto.endpoint, stream);
    let problem = exactly_once(&acked, &numbers_in(&unique_batches(&records)));
    assert!(
        problem.is_empty(),
        "{triple} under qemu (kill seed {seed}), Kinesis: {problem}"
    );

    // The cloud lands them: every acknowledged number once in Parquet and once in Timestream.
    assert_numbers_landed_once(
        &moto,
        stream,
        &acked,
        Duration::from_secs(120),
        &format!("{triple} under qemu (kill seed {seed})"),
    );
    eprintln!(
        "{triple} agent under {}: {} acknowledged readings through a SIGKILL, each in Kinesis ({} records), \
         Parquet and Timestream once",
        launcher[0],
        acked.len(),
        records.len()
    );
}

#[test]
fn the_static_aarch64_agent_delivers_exactly_once_through_a_sigkill_under_qemu() {
    // Static (musl): no sysroot needed.
    delivers_through_a_kill_under_qemu(
        "aarch64-unknown-linux-musl",
        &["qemu-aarch64-static"],
        &["allocator=\"mimalloc\"", "purge_delay_ms=Some(25)"],
    );
}

#[test]
fn the_armv7_agent_delivers_exactly_once_through_a_sigkill_under_qemu() {
    // glibc >= 2.28, dynamic: Debian's armhf libraries (libc6-armhf-cross) as its root.
    delivers_through_a_kill_under_qemu(
        "armv7-unknown-linux-gnueabihf",
        &["qemu-arm-static", "-L", "/usr/arm-linux-gnueabihf"],
        &["allocator=\"libc\"", "purge_delay_ms=None"],
    );
}

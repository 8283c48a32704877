//! Power cuts under the agent's buffer: the agent runs with `tests/powercut/powercut.c` preloaded, which
//! journals every write to the buffer's files until that file's next fsync; at random moments the agent is killed
//! and the journals are played backwards, so the files hold what a power cut would have left
//! ([`fieldlink_e2e::powercut`]). Every reading the broker acknowledged to the publisher must then reach Kinesis
//! exactly once: the agent acknowledges a message to the broker only after its commit is on the disk, so a message
//! whose commit the cut took is one the broker still holds and sends again.
//!
//! With `durability = "normal"` (no fsync at commit, only at a seal's) the same cuts lose acknowledged readings:
//! the second test shows that the cuts bite and what that setting costs, and that no record was sent before its
//! seal was on the disk (none of its numbers comes back with other content).
//!
//! `FIELDLINK_POWER_CUT_ROUNDS` sets the number of cuts (default 8).

#![allow(clippy::unwrap_used)]

use fieldlink_e2e::powercut::{killed_at_a_write, Keep, PowerCut, Undone};
use fieldlink_e2e::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const RATE: f64 = 1500.0;

/// Runs an agent with `durability`, publishing numbered readings at [`RATE`] while its power is cut `rounds`
/// times (every second cut keeps a random first part of the unsynced writes). Returns the numbers the broker
/// acknowledged, what the cuts undid, the moto server, the agent (running, its writes still journalled, no cut
/// planned), the broker and the directory.
fn publish_through_power_cuts(
    durability: &str,
    rounds: usize,
) -> (
    Vec<u64>,
    Undone,
    Moto,
    AgentProc,
    Mosquitto,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    moto.create("power", 1, "unused-db", "unused-table", "unused-bucket");
    let mut agent = AgentProc::new(
        dir.path(),
        "power-agent",
        broker.port,
        &moto.endpoint,
        "power",
        &format!("durability = \"{durability}\""),
        "",
    );
    let cut = PowerCut::new(dir.path(), &dir.path().join("power-agent.db"));
    agent.env = cut.env();
    agent.start(); // the persistent session exists from here on: the broker queues for the agent while it is down

    let count = (RATE * 1.5 * rounds as f64) as usize + 1000;
    let (port, path) = (broker.port, dir.path().to_path_buf());
    let publisher = std::thread::spawn(move || {
        let acked = publish_numbered(port, count, RATE, 0, &path);
        (acked, Instant::now())
    });
    let seed = fastrand::u64(..);
    eprintln!("power cut schedule seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut undone = Undone::default();
    let mut cuts = Vec::with_capacity(rounds);
    let mut at_a_write = 0;
    for round in 0..rounds {
        // The agent kills itself right after a random write to its buffer (mid-transaction or mid-checkpoint,
        // start-up included); if it has not got that far by a random deadline, the test kills it. The first
        // agent, which had to subscribe before the publisher started, is killed at a random time.
        let deadline = Instant::now() + Duration::from_millis(rng.u64(300..1500));
        if killed_at_a_write(agent.proc.as_mut().unwrap(), deadline, "the agent") {
            at_a_write += 1;
        }
        agent.kill9();
        cuts.push(Instant::now());
        let keep = if round % 2 == 0 {
            Keep::Nothing
        } else {
            Keep::RandomPrefix
        };
        undone += cut.cut(keep, &mut rng);
        if round + 1 < rounds {
            agent.env = cut.env();
            agent
                .env
                .push(("POWERCUT_KILL_AT".into(), rng.u64(1..400).to_string()));
            agent.spawn();
        }
    }
    agent.env = cut.env();
    agent.start();
    eprintln!("{at_a_write} of {rounds} cuts right after a write to the buffer, the rest at a random time");
    assert!(
        at_a_write > 0,
        "no cut came right after a write to the buffer: POWERCUT_KILL_AT did not work"
    );
    let (acked, published) = publisher.join().unwrap();
    assert!(
        acked.len() > count * 9 / 10,
        "the broker acknowledged only {} of {count}",
        acked.len()
    );
    let while_publishing = cuts.iter().filter(|&&c| c < published).count();
    assert!(
        while_publishing >= rounds / 2,
        "only {while_publishing} of {rounds} cuts came while readings were published"
    );
    (acked, undone, moto, agent, broker, dir)
}

#[test]
fn every_acknowledged_reading_survives_power_cuts() {
    let rounds: usize = std::env::var("FIELDLINK_POWER_CUT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let (acked, undone, moto, mut agent, _broker, _dir) =
        publish_through_power_cuts("full", rounds);
    assert!(
        undone.database_writes > 0,
        "the cuts undid no write to the database or its WAL: the test cut nothing ({undone:?})"
    );
    wait_for_or(
        "every acknowledged reading in Kinesis",
        Duration::from_secs(120),
        || {
            let got: BTreeSet<u64> = numbers_in(&kinesis_dump(&moto.endpoint, "power"))
                .into_iter()
                .collect();
            acked.iter().all(|n| got.contains(n)).then_some(())
        },
        || agent.diagnosis(),
    );
    agent.stop();
    let records = kinesis_dump(&moto.endpoint, "power");
    let problem = exactly_once(&acked, &numbers_in(&unique_batches(&records)));
    assert!(problem.is_empty(), "{problem}");
    eprintln!(
        "{rounds} power cuts: {} writes undone ({} to the database and its WAL), {} unsynced writes kept, {} files created since their directory's last sync removed; {} readings acknowledged by the broker, \
         each in Kinesis once; {} records",
        undone.writes,
        undone.database_writes,
        undone.kept,
        undone.files_removed,
        acked.len(),
        records.len()
    );
}

#[test]
fn without_fsync_at_commit_a_power_cut_loses_acknowledged_readings() {
    let (acked, undone, moto, mut agent, _broker, _dir) = publish_through_power_cuts("normal", 6);
    // Let the agent send what survived, then stop it (a graceful stop sends what it holds).
    wait_for_or(
        "the agent to hold nothing unsent",
        Duration::from_secs(120),
        || {
            (agent.metric("fieldlink_buffer_unsealed_readings") == 0.0
                && agent.metric("fieldlink_buffer_pending_readings") == 0.0)
                .then_some(())
        },
        || agent.diagnosis(),
    );
    agent.stop();
    let records = kinesis_dump(&moto.endpoint, "power");
    let got: BTreeSet<u64> = numbers_in(&records).into_iter().collect();
    let lost = acked.iter().filter(|n| !got.contains(n)).count();
    // A seal the cut took after its record was sent would have its readings sealed again under the same number
    // with other content (the cloud lands both and counts a collision): seals are fsynced under `normal` too.
    let mut content = std::collections::HashMap::new();
    let collisions = records
        .iter()
        .filter(|r| {
            content
                .insert((r.epoch, r.seq), r.sha256.clone())
                .is_some_and(|before| before != r.sha256)
        })
        .count();
    eprintln!(
        "durability = \"normal\": 6 power cuts undid {} writes; {lost} of {} acknowledged readings lost; \
         {collisions} batch numbers sent again with other content",
        undone.writes,
        acked.len()
    );
    assert_eq!(
        collisions, 0,
        "a batch number went to Kinesis twice with other content: a record was sent before its seal was on the disk"
    );
    assert!(
        lost > 0,
        "no acknowledged reading was lost without fsync at commit: the cuts did not reach the buffer's commits"
    );
}

//! What an operator's world does to the buffer, end to end against real Mosquitto and moto (Kinesis made
//! unreachable through the fault proxy): another process holding the buffer's write lock over a backlog, and the
//! buffer's filesystem filling up (a tmpfs the test mounts, like a full SD card) by the agent's backlog or to the
//! last byte by another process, and the drain before a buffer file goes, killed, run under a lock, and cut by
//! power failures in its seal and its deletes.

#![allow(clippy::unwrap_used)]

use fieldlink_e2e::powercut::{ended_at_a_write, Keep, PowerCut, Undone};
use fieldlink_e2e::*;
use std::time::{Duration, Instant};

fn numbers_once(moto: &Moto, stream: &str, agent: &str) -> Vec<u64> {
    let records: Vec<DumpedRecord> = kinesis_dump(&moto.endpoint, stream)
        .into_iter()
        .filter(|r| r.agent == agent)
        .collect();
    numbers_in(&unique_batches(&records))
}

fn health(agent: &AgentProc) -> String {
    http_get(agent.metrics_port, "/health").unwrap_or_default()
}

#[test]
fn a_lock_held_for_10_s_over_a_backlog_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "lock", 1);
    let mut agent = AgentProc::new(
        dir.path(),
        "lock-agent",
        broker.port,
        &proxy.endpoint,
        "lock",
        "overflow = \"drop_oldest\"",
        "",
    );
    agent.start();
    proxy.set("down=1");
    let mut acked = publish_numbered(broker.port, 6000, 3000.0, 0, dir.path());
    wait_for("the backlog to be sealed", Duration::from_secs(30), || {
        (agent.metric("fieldlink_buffer_pending_readings") >= acked.len() as f64).then_some(())
    });

    let mut holder = hold_lock(dir.path(), "lock-agent.db", 10);
    let t0 = Instant::now();
    // Readings keep arriving while the lock is held: every commit fails with SQLITE_BUSY. New numbers (and so
    // new times): repeats of the first ones would be dropped by the agent's dedup and prove nothing.
    acked.extend(publish_numbered_from(
        broker.port,
        6000,
        2000,
        1000.0,
        0,
        dir.path(),
    ));
    wait_for("a failed commit", Duration::from_secs(20), || {
        (agent.metric("fieldlink_buffer_errors_total") > 0.0).then_some(())
    });
    holder.wait(Duration::from_secs(30));
    eprintln!("lock held {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(
        agent.metric("fieldlink_readings_dropped_total"),
        0.0,
        "a held lock is not a full disk: nothing may be dropped"
    );
    proxy.set("down=0");
    wait_for("the backlog to drain", Duration::from_secs(120), || {
        (agent.metric("fieldlink_readings_received_total") >= acked.len() as f64
            && agent.metric("fieldlink_buffer_pending_readings") == 0.0
            && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0)
            .then_some(())
    });
    let got = numbers_once(&moto, "lock", "lock-agent");
    let problem = exactly_once(&acked, &got);
    assert!(problem.is_empty(), "after a held lock: {problem}");
    assert_eq!(agent.metric("fieldlink_readings_dropped_total"), 0.0);
    assert_eq!(
        agent.metric("fieldlink_readings_deduplicated_total"),
        0.0,
        "nothing was published twice: a retried commit must not store a group twice"
    );
    let (received, accounted) = agent.ledger();
    assert_eq!(received, accounted, "ledger");
    agent.stop();
    eprintln!(
        "lock: {} acknowledged readings, {} buffer errors while locked, 0 dropped, all landed once",
        acked.len(),
        agent_errors(&dir)
    );
}

fn agent_errors(dir: &tempfile::TempDir) -> usize {
    std::fs::read_to_string(dir.path().join("lock-agent.log"))
        .unwrap_or_default()
        .matches("buffer commit failed")
        .count()
}

/// Headroom the full-disk tests keep free.
const HEADROOM: u64 = 4 * 1024 * 1024;

/// Mosquitto, moto behind the fault proxy, and an agent (not started) whose buffer is on a 24 MiB filesystem.
struct Disk {
    dir: tempfile::TempDir,
    broker: Mosquitto,
    moto: Moto,
    proxy: FaultProxy,
    fs: SmallFs,
    agent: AgentProc,
}

impl Disk {
    fn start(id: &str, overflow: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "disk", 1);
        let fs = SmallFs::mount(dir.path(), "small", 24 * 1024 * 1024);
        let mut agent = AgentProc::new(
            fs.path.as_path(),
            id,
            broker.port,
            &proxy.endpoint,
            "disk",
            &format!(
                "overflow = \"{overflow}\"\nmin_free_bytes = {HEADROOM}\nmax_bytes = 1073741824"
            ),
            "",
        );
        agent.log = dir.path().join(format!("{id}.log"));
        Self {
            dir,
            broker,
            moto,
            proxy,
            fs,
            agent,
        }
    }
}

/// Fills a 24 MiB filesystem with Kinesis down under `backpressure`: intake pauses before the filesystem is full
/// while the agent keeps answering; SIGTERM stops it; after a restart with Kinesis back everything drains and intake
/// resumes by itself.
#[test]
fn a_full_disk_pauses_intake_never_wedges_and_recovers_by_itself() {
    let Disk {
        dir,
        broker,
        moto,
        proxy,
        fs,
        mut agent,
    } = Disk::start("disk-agent", "backpressure");
    agent.start();
    proxy.set("down=1");
    // ~2 KB of incompressible text per reading: ~60 MB offered to a 24 MiB filesystem.
    let acked = publish_numbered(broker.port, 30_000, 5000.0, 2000, dir.path());
    wait_for(
        "intake to pause for disk space",
        Duration::from_secs(60),
        || health(&agent).contains("intake paused").then_some(()),
    );
    let taken = agent.metric("fieldlink_readings_received_total");
    assert!(
        taken < acked.len() as f64 * 2.0,
        "intake did not pause: {taken} readings taken"
    );
    std::thread::sleep(Duration::from_secs(2));
    let h = health(&agent);
    assert!(
        !h.contains("has not answered"),
        "the buffer thread must keep answering on a full disk: {h}"
    );
    // The agent's room is the filesystem's free space plus the pages SQLite keeps free in the file.
    let free_pages: u64 = run_python(&[
        "-c",
        "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=30); print(c.execute('PRAGMA freelist_count').fetchone()[0] * c.execute('PRAGMA page_size').fetchone()[0])",
        fs.path.join("disk-agent.db").to_str().unwrap(),
    ])
    .trim()
    .parse()
    .unwrap();
    let room = fs.free() + free_pages;
    assert!(
        room >= HEADROOM / 2,
        "the filesystem was filled: {} bytes free + {free_pages} in free pages",
        fs.free()
    );
    assert_eq!(agent.metric("fieldlink_readings_dropped_total"), 0.0);

    // SIGTERM while intake is paused: the agent stops within its drain deadline (2 s) plus the seal.
    let t0 = Instant::now();
    agent.stop();
    let stop_s = t0.elapsed().as_secs_f64();
    assert!(stop_s < 15.0, "SIGTERM took {stop_s:.1} s on a full disk");

    // kill -9 would leave the same file: restart on the full filesystem with Kinesis back.
    proxy.set("down=0");
    agent.start();
    let mut polls = 0;
    wait_for("everything to arrive", Duration::from_secs(180), || {
        polls += 1;
        // The dump runs Python: look at the stream every 3 s only, once the buffer is empty.
        (polls % 30 == 0
            && agent.metric("fieldlink_buffer_pending_readings") == 0.0
            && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0
            && numbers_once(&moto, "disk", "disk-agent").len() >= acked.len())
        .then_some(())
    });
    let got = numbers_once(&moto, "disk", "disk-agent");
    let problem = exactly_once(&acked, &got);
    assert!(problem.is_empty(), "after a full disk: {problem}");
    assert_eq!(agent.metric("fieldlink_readings_dropped_total"), 0.0);
    assert!(health(&agent).contains("buffer: ok"), "{}", health(&agent));
    agent.stop();
    eprintln!(
        "full disk (backpressure): intake paused at {taken} readings with {} bytes free, SIGTERM in {stop_s:.1} s, {} acknowledged readings landed once after the restart",
        fs.free(),
        acked.len()
    );
}

/// `drop_oldest` on a full 24 MiB filesystem with Kinesis down: intake goes on, the oldest batches are dropped for
/// the space needed and counted; after the outage the rest drains and the ledger balances.
#[test]
fn a_full_disk_under_drop_oldest_drops_the_oldest_counted_and_keeps_taking() {
    let Disk {
        dir,
        broker,
        moto,
        proxy,
        fs: _fs,
        agent: mut dropper,
    } = Disk::start("drop-agent", "drop_oldest");
    dropper.start();
    proxy.set("down=1");
    let acked = publish_numbered(broker.port, 20_000, 5000.0, 2000, dir.path());
    wait_for(
        "every reading to be taken",
        Duration::from_secs(120),
        || {
            (dropper.metric("fieldlink_readings_received_total") >= acked.len() as f64)
                .then_some(())
        },
    );
    let dropped = dropper.metric("fieldlink_readings_dropped_total");
    if dropped == 0.0 {
        eprintln!(
            "{}",
            std::fs::read_to_string(&dropper.log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(dropped > 0.0, "a full disk under drop_oldest must drop");
    proxy.set("down=0");
    wait_for("the rest to drain", Duration::from_secs(120), || {
        (dropper.metric("fieldlink_buffer_pending_readings") == 0.0
            && dropper.metric("fieldlink_buffer_unsealed_readings") == 0.0)
            .then_some(())
    });
    let (received, accounted) = dropper.ledger();
    eprintln!(
        "{}",
        http_get(dropper.metrics_port, "/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("fieldlink_readings") || l.starts_with("fieldlink_buffer"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(received, accounted, "ledger with drops");
    let sent = dropper.metric("fieldlink_readings_sent_total");
    let records: Vec<DumpedRecord> = kinesis_dump(&moto.endpoint, "disk")
        .into_iter()
        .filter(|r| r.agent == "drop-agent")
        .collect();
    let in_stream: usize = unique_batches(&records)
        .iter()
        .map(|r| r.readings.len())
        .sum();
    assert_eq!(
        in_stream as f64, sent,
        "Kinesis holds exactly what was counted as sent"
    );
    // Read again: sealing what was still unsealed when every reading had been taken can need room and drop more
    // (CI saw 304 more drops after the first read).
    let dropped = dropper.metric("fieldlink_readings_dropped_total");
    assert_eq!(sent + dropped, received, "sent + dropped = received");
    dropper.stop();
    eprintln!(
        "full disk (drop_oldest): {received} taken, {dropped} dropped (counted), {sent} sent"
    );
}

/// Another process fills the buffer's filesystem to the last byte (a runaway log, a core dump) while readings arrive
/// and Kinesis takes them: below the headroom the agent pauses intake and says so in `/health`, keeps answering,
/// and whatever it was writing (a commit, a seal, the delete of records Kinesis acknowledged) fails on the full disk
/// and waits. Once the file is deleted it resumes by itself, without a restart: every acknowledged reading lands
/// in Kinesis once, none is dropped, the ledger balances.
#[test]
fn a_disk_filled_to_the_last_byte_by_another_process_loses_and_doubles_nothing() {
    let Disk {
        dir,
        broker,
        moto,
        proxy: _proxy,
        fs,
        mut agent,
    } = Disk::start("filled-agent", "backpressure");
    agent.start();
    let publisher =
        NumberedPublisher::spawn(broker.port, "crash", 0, 24_000, 1500.0, 200, dir.path(), 1);
    wait_for("readings sent", Duration::from_secs(30), || {
        (agent.metric("fieldlink_readings_sent_total") > 0.0).then_some(())
    });
    let (sent, taken) = (
        agent.metric("fieldlink_readings_sent_total"),
        agent.metric("fieldlink_readings_received_total"),
    );
    let ballast = fs.path.join("ballast");
    fill(&ballast, u64::MAX);
    // A failed seal gives the WAL's blocks back (`wal_checkpoint(TRUNCATE)`): a little may be free again.
    let full = fs.free();
    assert!(
        full < 1 << 20,
        "the filesystem was not filled: {full} B free"
    );
    wait_for(
        "intake to pause for disk space",
        Duration::from_secs(30),
        || health(&agent).contains("intake paused").then_some(()),
    );
    // Seals that fail on the full disk are halved at each tick (~3 s to one row), then tried at a probe backing off
    // from 1 to 10 s: before, each seal tick (every 200 ms) failed again and logged for as long as the disk was
    // full, 25 errors in 5 s.
    std::thread::sleep(Duration::from_secs(4));
    let errors_before = agent.metric("fieldlink_buffer_errors_total");
    std::thread::sleep(Duration::from_secs(5));
    let errors = agent.metric("fieldlink_buffer_errors_total");
    assert!(
        errors - errors_before <= 5.0,
        "{} buffer errors in 5 s on the full disk",
        errors - errors_before
    );
    let h = health(&agent);
    assert!(
        !h.contains("has not answered") && h.contains("intake paused"),
        "on a full disk the buffer thread keeps answering and says why intake waits: {h}"
    );
    let taken_while_full = agent.metric("fieldlink_readings_received_total");
    std::fs::remove_file(&ballast).unwrap();
    let acked = publisher.finish(Duration::from_secs(120));
    wait_for("everything to arrive", Duration::from_secs(120), || {
        (agent.metric("fieldlink_readings_received_total") >= acked.len() as f64
            && agent.metric("fieldlink_buffer_pending_readings") == 0.0
            && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0)
            .then_some(())
    });
    let got = numbers_once(&moto, "disk", "filled-agent");
    let problem = exactly_once(&acked, &got);
    assert!(
        problem.is_empty(),
        "after a disk filled by another process: {problem}"
    );
    assert_eq!(agent.metric("fieldlink_readings_dropped_total"), 0.0);
    let (received, accounted) = agent.ledger();
    assert_eq!(received, accounted, "ledger");
    // The catch-up after the file went can itself meet the headroom of this 24 MiB filesystem for a moment (a
    // commit held, then through once sends free room): the buffer is ok again by itself.
    wait_for("the buffer to be ok", Duration::from_secs(30), || {
        health(&agent).contains("buffer: ok").then_some(())
    });
    agent.stop();
    eprintln!(
        "disk filled by another process: {taken} readings taken ({sent} sent) before, {taken_while_full} when it had been \
         full 9 s, {errors} buffer errors ({} in its last 5 s); after the file went, {} acknowledged readings landed once",
        errors - errors_before,
        acked.len()
    );
}

/// An operator starts a second agent on the buffer file of a running one (a copy of the configuration with another
/// metrics port run by hand beside the service; two containers sharing a volume during an update). Each would seal
/// the other's readings with its own sequence numbers and dedup states. The second is refused at once, naming the
/// file and the running agent's pid; the first loses and doubles nothing; once it is killed (-9), the next start
/// takes the buffer at once.
#[test]
fn a_second_agent_on_a_running_agents_buffer_is_refused_and_the_first_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "shared", 1);
    let mut agent = AgentProc::new(
        dir.path(),
        "shared-agent",
        broker.port,
        &proxy.endpoint,
        "shared",
        "",
        "",
    );
    agent.start();
    let mut acked = publish_numbered(broker.port, 1000, 2000.0, 0, dir.path());

    let second = AgentProc::new(
        dir.path(),
        "by-hand",
        broker.port,
        &proxy.endpoint,
        "shared",
        "",
        "",
    );
    let text = std::fs::read_to_string(&agent.config).unwrap().replace(
        &format!("127.0.0.1:{}", agent.metrics_port),
        &format!("127.0.0.1:{}", second.metrics_port),
    );
    std::fs::write(&second.config, text).unwrap();
    let mut cmd = std::process::Command::new(bin("fieldlink-agent"));
    cmd.arg("run").arg("--config").arg(&second.config);
    let log = dir.path().join("by-hand.out");
    let mut by_hand = Proc::spawn("second agent", cmd, &log);
    let status = wait_for("the second agent to exit", Duration::from_secs(15), || {
        by_hand.exited()
    });
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let pid = agent.proc.as_ref().unwrap().pid();
    assert!(
        !status.success()
            && out.contains("shared-agent.db is in use by another process")
            && out.contains(&format!("pid {pid}")),
        "{status}:\n{out}"
    );

    acked.extend(publish_numbered_from(
        broker.port,
        1000,
        1000,
        2000.0,
        0,
        dir.path(),
    ));
    agent.kill9();
    agent.start();
    acked.extend(publish_numbered_from(
        broker.port,
        2000,
        1000,
        2000.0,
        0,
        dir.path(),
    ));
    wait_for("everything sent", Duration::from_secs(60), || {
        (agent.metric("fieldlink_buffer_pending_readings") == 0.0
            && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0
            && agent.metric("fieldlink_readings_received_total") > 0.0)
            .then_some(())
    });
    agent.stop();
    let problem = exactly_once(&acked, &numbers_once(&moto, "shared", "shared-agent"));
    assert!(
        problem.is_empty(),
        "beside a refused second agent: {problem}"
    );
    eprintln!(
        "second agent refused: {}; {} acknowledged readings each once",
        out.lines()
            .find(|l| l.contains("in use"))
            .unwrap_or_default()
            .trim(),
        acked.len()
    );
}

/// An operator lowers `[buffer] max_bytes` below the backlog between two runs, under `backpressure`: the start
/// says so, intake pauses (nothing dropped) and, once Kinesis is back, every acknowledged reading lands once.
#[test]
fn a_cap_lowered_below_the_backlog_between_runs_is_said_and_drops_nothing_under_backpressure() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "lowered", 1);
    let mut agent = AgentProc::new(
        dir.path(),
        "lowered-agent",
        broker.port,
        &proxy.endpoint,
        "lowered",
        "overflow = \"backpressure\"",
        "",
    );
    agent.start();
    proxy.set("down=1");
    let acked = publish_numbered(broker.port, 3000, 3000.0, 1000, dir.path());
    wait_for("the backlog to be sealed", Duration::from_secs(30), || {
        (agent.metric("fieldlink_buffer_pending_readings") >= acked.len() as f64).then_some(())
    });
    let held = agent.metric("fieldlink_buffer_bytes");
    agent.stop();
    let text = std::fs::read_to_string(&agent.config).unwrap().replace(
        "overflow = \"backpressure\"",
        "overflow = \"backpressure\"\nmax_bytes = 1048576",
    );
    std::fs::write(&agent.config, text).unwrap();
    assert!(held > 1_048_576.0, "{held} bytes buffered");
    agent.start();
    let log = dir.path().join("lowered-agent.log");
    wait_for("the start's warning", Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("the buffer holds more than [buffer] max_bytes")
            .then_some(())
    });
    proxy.set("down=0");
    wait_for("the backlog to drain", Duration::from_secs(120), || {
        (agent.metric("fieldlink_buffer_pending_readings") == 0.0
            && agent.metric("fieldlink_buffer_unsealed_readings") == 0.0)
            .then_some(())
    });
    assert_eq!(agent.metric("fieldlink_readings_dropped_total"), 0.0);
    agent.stop();
    let problem = exactly_once(&acked, &numbers_once(&moto, "lowered", "lowered-agent"));
    assert!(problem.is_empty(), "after the cap was lowered: {problem}");
    eprintln!("cap lowered to 1 MiB under a {held} B backlog: said at the start, nothing dropped, {} readings once", acked.len());
}

/// Another process holding `db`'s write lock for `secs` (returns once it holds it).
fn hold_lock(dir: &std::path::Path, db: &str, secs: u64) -> Proc {
    static HOLDERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = HOLDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let locked = dir.join(format!("locked-{n}"));
    let mut holder = std::process::Command::new(python());
    holder
        .arg(script("hold_write_lock.py"))
        .arg(dir.join(db))
        .arg(secs.to_string())
        .arg(&locked);
    let holder = Proc::spawn("lock holder", holder, &dir.join(format!("holder-{n}.log")));
    wait_for("the lock", Duration::from_secs(10), || {
        locked.exists().then_some(())
    });
    holder
}

/// Groups (committed readings not sealed yet) in a stopped agent's buffer file.
fn groups_in_file(db: &std::path::Path) -> u64 {
    run_python(&[
        "-c",
        "import sqlite3,sys; print(sqlite3.connect(sys.argv[1], timeout=30).execute('SELECT count(*) FROM groups').fetchone()[0])",
        db.to_str().unwrap(),
    ])
    .trim()
    .parse()
    .unwrap()
}

/// Sequence numbers of the records (batches) in a stopped agent's buffer file.
fn records_in_file(db: &std::path::Path) -> Vec<u64> {
    run_python(&[
        "-c",
        "import sqlite3,sys; [print(r[0]) for r in sqlite3.connect(sys.argv[1], timeout=30).execute('SELECT seq FROM batches')]",
        db.to_str().unwrap(),
    ])
    .lines()
    .map(|l| l.trim().parse().unwrap())
    .collect()
}

/// Sealed records waiting in `agent`'s buffer: `n` numbered readings (`pad` bytes of text each) taken while
/// Kinesis was down, then the agent stopped gracefully, as before a re-imaging.
fn backlog_then_stop(
    agent: &mut AgentProc,
    proxy: &FaultProxy,
    broker: &Mosquitto,
    n: usize,
    pad: usize,
    dir: &std::path::Path,
) -> Vec<u64> {
    agent.start();
    proxy.set("down=1");
    let acked = publish_numbered(broker.port, n, 3000.0, pad, dir);
    wait_for("the backlog to be sealed", Duration::from_secs(60), || {
        (agent.metric("fieldlink_buffer_pending_readings") >= acked.len() as f64).then_some(())
    });
    agent.stop();
    acked
}

/// An operator draining a buffer file before it goes (docs/reference.md, "Before a buffer file goes"), in two
/// situations no other test drives: the drain killed (`kill -9`, a lost SSH session's shell, an OOM kill) while
/// its calls are in flight, then run again while another process (`sqlite3` opened to look, a backup) holds the
/// file's write lock. The second run waits the lock out and finishes: every acknowledged reading is in Kinesis
/// once (a call abandoned by the kill is resent under the same batch identity, which the cloud skips), and a
/// third run finds nothing left and sends nothing.
#[test]
fn a_drain_killed_mid_send_then_run_under_a_held_lock_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "drainops", 1);
    let mut agent = AgentProc::new(
        dir.path(),
        "drainops-agent",
        broker.port,
        &proxy.endpoint,
        "drainops",
        "",
        "",
    );
    let acked = backlog_then_stop(&mut agent, &proxy, &broker, 6000, 500, dir.path());
    // A file created is said (it is also what an edited `[buffer] path` looks like); a file reopened is not.
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert_eq!(log.matches("new buffer file").count(), 1, "{log}");

    // A slow Kinesis, limited like one shard: the drain needs several calls, and is killed after the first
    // entries went through.
    proxy.set("down=0&delay_ms=300&shard_bytes_per_s=500000");
    let mut first = Proc::spawn(
        "drain",
        agent.drain_command(120),
        &dir.path().join("drain-1.log"),
    );
    wait_for("the drain's first entries", Duration::from_secs(60), || {
        (proxy.stats()["forwarded_entries"].as_u64() > Some(0)).then_some(())
    });
    first.kill();
    let sent_before = numbers_once(&moto, "drainops", "drainops-agent").len();
    assert!(
        sent_before < acked.len(),
        "the drain was killed after it finished ({sent_before} readings sent): the test proves nothing"
    );

    // Kinesis refuses some entries: only those it accepted may be counted as acknowledged.
    proxy.set("delay_ms=0&shard_bytes_per_s=0&reject=0.3");
    // A lock held past the drain's timeout: the drain gives up in bounded time and says the file is not drained.
    let mut holder = hold_lock(dir.path(), "drainops-agent.db", 60);
    let t0 = Instant::now();
    let out = agent.drain_command(5).output().unwrap();
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("new buffer file"));
    eprintln!(
        "drain --timeout-s 5 under a 60 s lock: exit {:?} after {:.1} s\n{stdout}",
        out.status.code(),
        took.as_secs_f64(),
    );
    // The sending stops at the timeout; each write under the lock (the flush's seal, a delete of what Kinesis
    // acknowledged, the count's retry of that delete) waits out SQLite's 5 s busy timeout once (15.2 s in all
    // here; ~31 s when a delete was retried in place for 30 s; the bound leaves room for a slow start).
    assert!(took < Duration::from_secs(30), "{took:?}");
    holder.wait(Duration::from_secs(90));
    // What Kinesis acknowledged but the lock kept in the file is named, and not counted as unsent.
    let acknowledged: u64 = stdout
        .split(" records Kinesis acknowledged are still in the file")
        .next()
        .and_then(|s| s.rsplit('\n').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no acknowledged records named: {stdout}"));
    assert!(acknowledged > 0, "{stdout}");
    let unsent: u64 = stdout
        .split(" records (")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let in_file = records_in_file(&dir.path().join("drainops-agent.db"));
    assert_eq!(unsent + acknowledged, in_file.len() as u64, "{stdout}");
    let in_kinesis: std::collections::BTreeSet<u64> = kinesis_dump(&moto.endpoint, "drainops")
        .iter()
        .map(|r| r.seq)
        .collect();
    let in_both = in_file.iter().filter(|s| in_kinesis.contains(s)).count() as u64;
    assert!(
        acknowledged <= in_both,
        "{acknowledged} records named acknowledged, {in_both} of the file's in Kinesis"
    );
    proxy.set("reject=0");
    assert_eq!(
        out.status.code(),
        Some(if unsent > 0 { 3 } else { 0 }),
        "{stdout}"
    );

    let mut holder = hold_lock(dir.path(), "drainops-agent.db", 8);
    let t0 = Instant::now();
    let out = agent.drain_command(120).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!(
        "drain under an 8 s lock: exit {:?} after {:.1} s\n{stdout}\n{stderr}",
        out.status.code(),
        t0.elapsed().as_secs_f64()
    );
    holder.wait(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("drained: "), "{stdout}");
    let got = numbers_once(&moto, "drainops", "drainops-agent");
    let problem = exactly_once(&acked, &got);
    assert!(
        problem.is_empty(),
        "after a killed drain and a held lock: {problem}"
    );

    let dump = kinesis_dump(&moto.endpoint, "drainops");
    let records = dump.len();
    eprintln!(
        "{sent_before} readings in Kinesis when the first drain was killed; {records} records in the end, {} batches",
        unique_batches(&dump).len()
    );
    let out = agent.drain_command(60).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        kinesis_dump(&moto.endpoint, "drainops").len(),
        records,
        "a drained file sends nothing"
    );
}

/// The drain of a buffer file before it goes (a gateway re-imaged, an SD card swapped) cut by power failures:
/// each drain kills itself right after a random early write to the file and its unsynced writes are undone, as a
/// power cut would leave the card. The agent was killed (-9) with a tail of readings committed but not sealed, so
/// the first drain is cut before its seal of them is done (the test checks a cut left them unsealed); later cuts
/// land on deletes of what Kinesis acknowledged. Records whose delete a cut took are sent again by the next drain
/// under the same batch identity (the cloud skips the copies; the test checks some were); the last drain exits 0,
/// and every acknowledged reading is in Kinesis exactly once. (A cut while a drain closes open windows is not
/// driven: no window rule here.)
#[test]
fn a_drain_through_power_cuts_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, moto, proxy) = broker_and_proxied_stream(dir.path(), "draincut", 1);
    let mut agent = AgentProc::new(
        dir.path(),
        "draincut-agent",
        broker.port,
        &proxy.endpoint,
        "draincut",
        "",
        "",
    );
    let mut acked = backlog_then_stop(&mut agent, &proxy, &broker, 6000, 200, dir.path());
    // A tail committed but not sealed (a reorder window of ten minutes) when the agent is killed.
    let config = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        config.replace("reorder_window_ms = 200", "reorder_window_ms = 600000"),
    )
    .unwrap();
    agent.start();
    acked.extend(publish_numbered_from(
        broker.port,
        6000,
        10,
        1000.0,
        200,
        dir.path(),
    ));
    wait_for("the tail to be committed", Duration::from_secs(30), || {
        (agent.metric("fieldlink_buffer_unsealed_readings") >= 10.0).then_some(())
    });
    agent.kill9();
    let db = dir.path().join("draincut-agent.db");
    let mut groups = groups_in_file(&db);
    assert!(groups > 0, "the tail was sealed before the kill");
    // A Kinesis limited like one shard: the drain needs many calls, each followed by a delete.
    proxy.set("down=0&shard_bytes_per_s=400000");
    let cut = PowerCut::new(dir.path(), &db);
    let seed = fastrand::u64(..);
    eprintln!("drain power cut seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut undone, mut cuts, mut seal_cuts) = (Undone::default(), 0, 0);
    for round in 0..6 {
        let mut cmd = agent.drain_command(120);
        // The first drain is cut before its seal of the tail is done (a cut at its 1st counted write undid no
        // database write in one run; from its 2nd, database and WAL writes); the later drains' cuts reach past
        // the seal, to deletes.
        let kill_at = if round == 0 {
            rng.u64(4..9)
        } else {
            rng.u64(1..48)
        };
        cmd.envs(cut.env())
            .env("POWERCUT_KILL_AT", kill_at.to_string());
        let mut drain = Proc::spawn("drain", cmd, &dir.path().join(format!("drain-{round}.log")));
        let deadline = Instant::now() + Duration::from_secs(60);
        match ended_at_a_write(&mut drain, deadline, "the drain", true) {
            Some(true) => {}
            Some(false) => break, // it finished before its planned write
            None => panic!("the drain neither finished nor reached its planned write in 60 s"),
        }
        cuts += 1;
        let keep = if round % 2 == 0 {
            Keep::Nothing
        } else {
            Keep::RandomPrefix
        };
        let this = cut.cut(keep, &mut rng);
        undone += this;
        let left = groups_in_file(&db);
        if groups > 0 && left > 0 && this.database_writes > 0 {
            seal_cuts += 1;
        }
        groups = left;
    }
    assert!(
        cuts >= 2 && undone.database_writes > 0,
        "{cuts} drains cut, {undone:?}: the cuts did not reach the drain's writes"
    );
    assert!(
        seal_cuts > 0,
        "no cut undid a drain's database writes with the tail left unsealed: none landed before its seal was done"
    );
    let mut cmd = agent.drain_command(120);
    cmd.envs(cut.env());
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.starts_with("drained: "), "{stdout}");
    let dump = kinesis_dump(&moto.endpoint, "draincut");
    let batches = unique_batches(&dump);
    assert!(
        dump.len() > batches.len(),
        "no record was sent twice: no cut undid the delete of a record Kinesis had acknowledged"
    );
    let problem = exactly_once(&acked, &numbers_in(&batches));
    assert!(
        problem.is_empty(),
        "after {cuts} power cuts in drains: {problem}"
    );
    eprintln!(
        "{cuts} drains cut by power failures ({seal_cuts} before their seal was done): {} writes undone ({} to the database and its WAL), {} kept; {} readings \
         in Kinesis once, {} records for {} batches",
        undone.writes,
        undone.database_writes,
        undone.kept,
        acked.len(),
        dump.len(),
        batches.len()
    );
}

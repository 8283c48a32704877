//! The chaos test: the whole pipeline under a seeded random schedule of what operators and the world do to it, then
//! a multiset check that every reading the broker acknowledged landed exactly once in Parquet and in Timestream.
//!
//! The world: Mosquitto (persistent), two QoS 1 publishers of numbered readings with payload timestamps
//! (`publish_numbered.py`, topics `chaos-a/…` and `chaos-b/…`), one agent whose buffer is on a 64 MiB tmpfs, Kinesis
//! (moto, 2 shards) behind the fault proxy, two cloud workers sharing the shards, Timestream and Parquet on moto.
//! One event every 1–4 s, chosen by `fastrand` from the seed: kill -9 the agent; cut the power under it (it is
//! killed right after its next write to the buffer and the writes not yet synced are undone, all or a later part
//! of them: [`fieldlink_e2e::powercut`]); restart the broker; Kinesis throttles,
//! rejects entries, resets connections (before or after moto took the call) or is down for 10 s; another process holds
//! the buffer's write lock; the buffer's filesystem is filled; the buffer file is replaced (as an operator re-images
//! a box: intake stopped, the buffer drained to Kinesis, a graceful stop, the files deleted, a start under the same
//! agent_id with a new epoch); kill -9 one cloud worker; restart the cloud; step the agent's wall clock (as NTP does,
//! by 1 minute to 2 hours either way, through libfaketime; the proxy refuses signatures more than 5 minutes off, as
//! AWS does). Faults with a duration overlap the events that follow them.
//!
//! Checked: every acknowledged number exactly once in Parquet and in Timestream (numbers the agent took but the
//! broker never acknowledged to the publisher at most once), nothing else landed, no Timestream conflict or erased
//! measure, no dead letter, nothing dropped, and the agent's ledger balances for each process lifetime (received +
//! the backlog the process found in its file = sent + deduplicated + dead-lettered + dropped + still buffered) before
//! every kill and stop and at the end.
//!
//! `FIELDLINK_CHAOS_SECONDS` (default 150) sets the schedule's length, `FIELDLINK_CHAOS_SEED` replays a schedule
//! (the seed is printed at the start and with every failure; the events replay, the machine's timing does not),
//! `FIELDLINK_CHAOS_RATE` sets each publisher's messages per second (default 100) and `FIELDLINK_CHAOS_EVENTS`
//! (e.g. `KillAgent,ReplaceBuffer`) narrows the schedule to some kinds of event.
//! `deploy/chaos.sh SECONDS [SEED]` runs it longer. Needs root (the tmpfs mount), as CI runs.

#![allow(clippy::unwrap_used)]

use fieldlink_e2e::powercut::{killed_at_a_write, Keep, PowerCut};
use fieldlink_e2e::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const STREAM: &str = "chaos";
const AGENT: &str = "chaos-agent";
const PREFIXES: [&str; 2] = ["chaos-a", "chaos-b"];
/// Messages per second of each publisher (`FIELDLINK_CHAOS_RATE` overrides).
const RATE: u64 = 100;
/// `publish_numbered.py`'s first timestamp (reading n is at TS0 + n).
const TS0: i64 = 1_772_431_200_000;
/// The buffer's `min_free_bytes` on its 64 MiB filesystem.
const HEADROOM: u64 = 4 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    KillAgent,
    CutPower,
    RestartBroker,
    KinesisThrottle,
    KinesisReject,
    KinesisReset,
    KinesisDown,
    HoldLock,
    FillDisk,
    ReplaceBuffer,
    KillWorker,
    RestartCloud,
    StepClock,
}

const EVENTS: [Event; 13] = [
    Event::KillAgent,
    Event::CutPower,
    Event::RestartBroker,
    Event::KinesisThrottle,
    Event::KinesisReject,
    Event::KinesisReset,
    Event::KinesisDown,
    Event::HoldLock,
    Event::FillDisk,
    Event::ReplaceBuffer,
    Event::KillWorker,
    Event::RestartCloud,
    Event::StepClock,
];

/// The end of a fault with a duration.
#[derive(Debug)]
enum Undo {
    ProxyNormal,
    RemoveBallast,
    StartWorker(usize),
    ReleaseLock,
}

#[derive(Default)]
struct Stats {
    events: BTreeMap<String, usize>,
    agent_starts: usize,
    agent_start_ms: Vec<u128>,
    drain_ms: Vec<u128>,
    /// Sampled before each agent kill or stop and at the end: lower bounds for the kill -9 lifetimes.
    agent_received: f64,
    agent_deduplicated: f64,
    cloud_duplicates: f64,
    ledger_checks: usize,
    /// Power cuts that came right after a write to the buffer (the rest: at a moment without writes for 5 s).
    cuts_at_a_write: usize,
    /// Unsynced writes to the database and its WAL the cuts undid.
    cut_writes_undone: usize,
}

struct Chaos {
    seed: u64,
    dir: PathBuf,
    moto: Moto,
    proxy: FaultProxy,
    broker: Mosquitto,
    fs: SmallFs,
    agent: AgentProc,
    /// The agent's configuration without intake (its MQTT connection subscribes to a topic nobody uses, under
    /// another client id): drains the buffer while the broker queues for the real session.
    drain_config: PathBuf,
    /// Readings in the buffer file when the running agent process started.
    backlog: f64,
    workers: [Option<Cloud>; 2],
    lock: Option<Proc>,
    ballast: PathBuf,
    /// The agent's wall-clock offset in seconds (libfaketime reads it at every call).
    clock: PathBuf,
    /// The journals of unsynced writes to the buffer's files, and the file whose existence makes the agent kill
    /// itself at its next write to them.
    power: PowerCut,
    cut_now: PathBuf,
    /// Faults under way and when they end.
    undos: Vec<(Instant, Undo)>,
    /// When the schedule started.
    t0: Instant,
    stats: Stats,
}

impl Chaos {
    fn db(&self) -> PathBuf {
        self.fs.path.join(format!("{AGENT}.db"))
    }

    /// Readings in the buffer file (unsealed groups and the readings of sealed batches); the agent must not be running.
    fn read_backlog(&self) -> f64 {
        let db = self.db();
        if !db.exists() {
            return 0.0;
        }
        // Journalled like the agent: closing the last connection checkpoints and syncs the file.
        run_ok(
            std::process::Command::new(python())
                .args([
                    "-c",
                    "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=60); print(c.execute('SELECT coalesce(sum(readings), 0) FROM groups').fetchone()[0] + c.execute('SELECT coalesce(sum(readings), 0) FROM batches').fetchone()[0])",
                    db.to_str().unwrap(),
                ])
                .envs(self.power.env_keeping()),
        )
        .trim()
        .parse()
        .unwrap()
    }

    fn start_agent(&mut self) {
        self.backlog = self.read_backlog();
        let t = Instant::now();
        self.agent.start();
        self.stats.agent_start_ms.push(t.elapsed().as_millis());
        self.stats.agent_starts += 1;
    }

    /// The running process's ledger balances (polled: a scrape can fall between two counter updates) and nothing
    /// was dropped; samples its counters for the summary.
    fn check_ledger(agent: &AgentProc, backlog: f64, seed: u64, when: &str, stats: &mut Stats) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let last = loop {
            let l = agent.ledger();
            if l.0 + backlog == l.1 || Instant::now() >= deadline {
                break l;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            last.0 + backlog,
            last.1,
            "seed {seed}: the agent's ledger does not balance {when}: received {} + backlog at start {backlog} != accounted {}",
            last.0,
            last.1
        );
        let dropped = agent.metric("fieldlink_readings_dropped_total");
        assert_eq!(
            dropped, 0.0,
            "seed {seed}: {dropped} readings dropped under backpressure {when}"
        );
        stats.agent_received += last.0;
        stats.agent_deduplicated += agent.metric("fieldlink_readings_deduplicated_total");
        stats.ledger_checks += 1;
    }

    fn sample_worker(&mut self, i: usize) {
        if let Some(w) = &self.workers[i] {
            self.stats.cloud_duplicates += w.metric("fieldlink_cloud_batches_duplicate_total");
        }
    }

    fn start_worker(&mut self, i: usize) {
        self.workers[i] = Some(Cloud::start(
            &self.dir,
            &format!("w{i}"),
            &self.moto.endpoint,
            STREAM,
            "magnetic_store_writes = true",
        ));
    }

    /// Whether fault `u` must end before `e` runs (one proxy fault, lock, ballast at a time; both workers up before
    /// one is killed or the cloud restarted). Ending it early instead of skipping `e` keeps the schedule a function
    /// of the seed alone.
    fn conflicts(e: Event, u: &Undo) -> bool {
        match e {
            Event::KinesisThrottle
            | Event::KinesisReject
            | Event::KinesisReset
            | Event::KinesisDown => matches!(u, Undo::ProxyNormal),
            // The lock holder is on the same box: rather than die with the power (its open connection would keep
            // the next opener from rebuilding the WAL index), it is waited out first.
            Event::HoldLock | Event::ReplaceBuffer | Event::CutPower => {
                matches!(u, Undo::ReleaseLock)
            }
            Event::FillDisk => matches!(u, Undo::RemoveBallast),
            Event::KillWorker | Event::RestartCloud => matches!(u, Undo::StartWorker(_)),
            Event::KillAgent | Event::RestartBroker | Event::StepClock => false,
        }
    }

    /// Runs `e` with its parameter `p` (0..1000: where its duration falls in its range, which worker); returns the
    /// fault's end if it has one.
    fn run(&mut self, e: Event, p: u64) -> Option<(Duration, Undo)> {
        let secs = |lo: u64, hi: u64| Duration::from_millis(lo * 1000 + p * (hi - lo));
        match e {
            Event::KillAgent => {
                Self::check_ledger(
                    &self.agent,
                    self.backlog,
                    self.seed,
                    "before a kill -9",
                    &mut self.stats,
                );
                self.agent.kill9();
                self.start_agent();
                None
            }
            Event::CutPower => {
                self.cut_power(p);
                None
            }
            Event::RestartBroker => {
                let port = self.broker.port;
                self.broker.proc.terminate(Duration::from_secs(30));
                self.broker = Mosquitto::start_persistent(&self.dir, port);
                None
            }
            Event::KinesisThrottle
            | Event::KinesisReject
            | Event::KinesisReset
            | Event::KinesisDown => {
                let (query, d) = match e {
                    Event::KinesisThrottle => ("throttle=0.6", secs(3, 8)),
                    Event::KinesisReject => ("reject=0.4", secs(3, 8)),
                    Event::KinesisReset => ("reset=0.4", secs(3, 8)),
                    _ => ("down=1", Duration::from_secs(10)),
                };
                self.proxy.set(query);
                Some((d, Undo::ProxyNormal))
            }
            Event::HoldLock => {
                let d = secs(2, 6);
                let locked = self.dir.join(format!("locked-{}", free_port()));
                let mut cmd = std::process::Command::new(python());
                cmd.arg(script("hold_write_lock.py"))
                    .arg(self.db())
                    .arg(format!("{:.1}", d.as_secs_f64()))
                    .arg(&locked)
                    .envs(self.power.env_keeping());
                self.lock = Some(Proc::spawn(
                    "lock holder",
                    cmd,
                    &self.dir.join("lock-holder.log"),
                ));
                wait_for("the write lock", Duration::from_secs(30), || {
                    locked.exists().then_some(())
                });
                Some((d, Undo::ReleaseLock))
            }
            Event::FillDisk => {
                // Leave less than the headroom: intake pauses until the ballast goes.
                let size = self.fs.free().saturating_sub(HEADROOM / 4);
                fill(&self.ballast, size);
                Some((secs(3, 9), Undo::RemoveBallast))
            }
            Event::ReplaceBuffer => {
                self.replace_buffer();
                None
            }
            Event::KillWorker => {
                let i = (p % 2) as usize;
                self.sample_worker(i);
                self.workers[i].take().unwrap().proc.kill();
                Some((secs(1, 6), Undo::StartWorker(i)))
            }
            Event::StepClock => {
                // 1 minute to about 2 hours, back for p < 500, forward above; from real time, so the step from
                // the clock before is anything up to 4 hours either way.
                let secs = 60 + (p % 500) as i64 * 14;
                let offset = if p < 500 { -secs } else { secs };
                set_clock_offset(&self.clock, &format!("{offset:+}"));
                None
            }
            Event::RestartCloud => {
                for i in 0..2 {
                    self.sample_worker(i);
                    self.workers[i]
                        .take()
                        .unwrap()
                        .proc
                        .terminate(Duration::from_secs(30));
                }
                for i in 0..2 {
                    self.start_worker(i);
                }
                None
            }
        }
    }

    fn log(&self, what: &str) {
        eprintln!("[{:6.1} s] {what}", self.t0.elapsed().as_secs_f64());
    }

    /// Ends the faults whose time has come (all of them with `all`).
    fn end_faults(&mut self, all: bool) {
        let now = Instant::now();
        while let Some(k) = (0..self.undos.len())
            .filter(|k| all || self.undos[*k].0 <= now)
            .min_by_key(|k| self.undos[*k].0)
        {
            let (_, u) = self.undos.remove(k);
            self.log(&format!("end of fault: {u:?}"));
            self.undo(u);
        }
    }

    /// Ends the faults that must end before `e` runs.
    fn end_conflicting(&mut self, e: Event) {
        while let Some(k) = self.undos.iter().position(|(_, u)| Self::conflicts(e, u)) {
            let (_, u) = self.undos.remove(k);
            self.log(&format!("early end of fault: {u:?}"));
            self.undo(u);
        }
    }

    fn undo(&mut self, u: Undo) {
        match u {
            Undo::ProxyNormal => {
                self.proxy.set("throttle=0&reject=0&reset=0&down=0");
            }
            Undo::RemoveBallast => std::fs::remove_file(&self.ballast).unwrap(),
            Undo::StartWorker(i) => self.start_worker(i),
            Undo::ReleaseLock => self.lock.take().unwrap().wait(Duration::from_secs(60)),
        }
    }

    /// The agent dies right after its next write to the buffer (or after 5 s without one) and the buffer's
    /// files lose the writes not yet synced: all of them for an even `p`, else a random later part of them.
    fn cut_power(&mut self, p: u64) {
        Self::check_ledger(
            &self.agent,
            self.backlog,
            self.seed,
            "before a power cut",
            &mut self.stats,
        );
        std::fs::write(&self.cut_now, b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let what = format!("seed {}: the agent", self.seed);
        if killed_at_a_write(self.agent.proc.as_mut().unwrap(), deadline, &what) {
            self.stats.cuts_at_a_write += 1;
        }
        self.agent.kill9();
        std::fs::remove_file(&self.cut_now).unwrap();
        // Undoing a truncation writes bytes back, which a disk needs no room for: a ballast filling the buffer's
        // filesystem is set aside for the cut and put back.
        let ballast = std::fs::metadata(&self.ballast).map(|m| m.len()).ok();
        if ballast.is_some() {
            std::fs::remove_file(&self.ballast).unwrap();
        }
        let keep = if p.is_multiple_of(2) {
            Keep::Nothing
        } else {
            Keep::RandomPrefix
        };
        let undone = self
            .power
            .cut(keep, &mut fastrand::Rng::with_seed(self.seed ^ p));
        self.stats.cut_writes_undone += undone.database_writes;
        if let Some(len) = ballast {
            fill(&self.ballast, len);
        }
        self.start_agent();
    }

    /// What an operator re-imaging a box does: stop intake, let the buffer drain to Kinesis, stop gracefully, delete
    /// the buffer, start again under the same agent_id (a new epoch). Meanwhile the broker queues for the session.
    fn replace_buffer(&mut self) {
        Self::check_ledger(
            &self.agent,
            self.backlog,
            self.seed,
            "before a graceful stop",
            &mut self.stats,
        );
        self.agent.stop();
        let t = Instant::now();
        let mut drain = AgentProc {
            config: self.drain_config.clone(),
            metrics_port: self.agent.metrics_port,
            log: self.agent.log.clone(),
            proc: None,
            // Journalled as the agent, but never cut.
            env: self
                .agent
                .env
                .iter()
                .filter(|(k, _)| k != "POWERCUT_KILL_FILE")
                .cloned()
                .collect(),
            launcher: Vec::new(),
        };
        self.backlog = self.read_backlog();
        drain.start();
        // Faults under way end on time meanwhile (a Kinesis outage would otherwise outlast the drain).
        let deadline = Instant::now() + Duration::from_secs(180);
        while drain.metric("fieldlink_buffer_pending_readings") != 0.0
            || drain.metric("fieldlink_buffer_unsealed_readings") != 0.0
        {
            assert!(
                Instant::now() < deadline,
                "seed {}: the buffer did not drain to Kinesis within 180 s",
                self.seed
            );
            self.end_faults(false);
            std::thread::sleep(Duration::from_millis(100));
        }
        Self::check_ledger(
            &drain,
            self.backlog,
            self.seed,
            "after draining for a buffer replacement",
            &mut self.stats,
        );
        drain.stop();
        self.stats.drain_ms.push(t.elapsed().as_millis());
        for ext in ["db", "db-wal", "db-shm"] {
            let _ = std::fs::remove_file(self.fs.path.join(format!("{AGENT}.{ext}")));
        }
        self.power.forget();
        let db = self.fs.path.join(format!("{AGENT}.db"));
        assert!(
            !db.exists(),
            "seed {}: the buffer file was not replaced",
            self.seed
        );
        self.start_agent();
    }
}

/// Numbers landed in `store` ("parquet" or "timestream") per publisher prefix, and rows that are no numbered reading
/// (wrong series or time for their number).
fn numbers_landed(v: &serde_json::Value, store: &str) -> (BTreeMap<String, Vec<u64>>, Vec<Key>) {
    let mut by_prefix: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut unexpected = Vec::new();
    for (series, ts, bits) in landed_rows(v, store) {
        let n = f64::from_bits(bits) as u64;
        let prefix = series.split('/').next().unwrap_or_default().to_owned();
        if PREFIXES.contains(&prefix.as_str())
            && series == format!("{prefix}/dev{}/n", n % 10)
            && ts == TS0 + n as i64
        {
            by_prefix.entry(prefix).or_default().push(n);
        } else {
            unexpected.push((series, ts, bits));
        }
    }
    (by_prefix, unexpected)
}

/// Every acknowledged number present in both stores.
fn complete(v: &serde_json::Value, acked: &[Vec<u64>]) -> bool {
    ["parquet", "timestream"].iter().all(|store| {
        let (got, _) = numbers_landed(v, store);
        PREFIXES.iter().zip(acked).all(|(p, a)| {
            let have: std::collections::HashSet<u64> =
                got.get(*p).into_iter().flatten().copied().collect();
            a.iter().all(|n| have.contains(n))
        })
    })
}

/// What is wrong with the landed data: missing or doubled numbers, unexpected rows, Timestream conflicts or erased
/// measures, dead letters. Empty if all is well.
fn problems(v: &serde_json::Value, acked: &[Vec<u64>]) -> Vec<String> {
    let mut out = Vec::new();
    for store in ["parquet", "timestream"] {
        let (got, unexpected) = numbers_landed(v, store);
        for (p, a) in PREFIXES.iter().zip(acked) {
            let problem = exactly_once(a, got.get(*p).map_or(&[][..], Vec::as_slice));
            if !problem.is_empty() {
                out.push(format!("{store} {p}: {problem}"));
            }
        }
        if !unexpected.is_empty() {
            out.push(format!(
                "{store}: {} unexpected rows, e.g. {:?}",
                unexpected.len(),
                &unexpected[..unexpected.len().min(5)]
            ));
        }
    }
    for k in ["timestream_conflicts", "timestream_erased_measures"] {
        if v[k] != 0 {
            out.push(format!("{k}: {}", v[k]));
        }
    }
    if v["dead_letters"].as_array().is_some_and(|d| !d.is_empty()) {
        out.push(format!("dead letters: {}", v["dead_letters"]));
    }
    out
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

#[test]
fn every_acknowledged_reading_lands_exactly_once_under_a_random_fault_schedule() {
    let seconds = env_u64("FIELDLINK_CHAOS_SECONDS").unwrap_or(150);
    let seed = env_u64("FIELDLINK_CHAOS_SEED").unwrap_or_else(|| fastrand::u64(..));
    eprintln!("chaos seed {seed}, {seconds} s (replay: deploy/chaos.sh {seconds} {seed})");
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("chaos seed {seed}: replay with deploy/chaos.sh {seconds} {seed}");
    }));
    // FIELDLINK_CHAOS_EVENTS=KillAgent,ReplaceBuffer narrows the schedule to those kinds (to chase one finding).
    let events: Vec<Event> = match std::env::var("FIELDLINK_CHAOS_EVENTS") {
        Ok(list) => list
            .split(',')
            .map(|name| {
                *EVENTS
                    .iter()
                    .find(|e| format!("{e:?}") == name.trim())
                    .unwrap_or_else(|| {
                        panic!("FIELDLINK_CHAOS_EVENTS: no event {name}; events: {EVENTS:?}")
                    })
            })
            .collect(),
        Err(_) => EVENTS.to_vec(),
    };
    let wall = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let moto = Moto::start(&dir);
    moto.create(STREAM, 2, CLOUD_DB, CLOUD_TABLE, CLOUD_BUCKET);
    let proxy = FaultProxy::start(&dir, &moto.endpoint);
    let broker = Mosquitto::start_persistent(&dir, free_port());
    let fs = SmallFs::mount(&dir, "buffer-fs", 64 << 20);
    let mut agent = AgentProc::new(
        &fs.path,
        AGENT,
        broker.port,
        &proxy.endpoint,
        STREAM,
        &format!("overflow = \"backpressure\"\nmin_free_bytes = {HEADROOM}"),
        "",
    );
    agent.log = dir.join(format!("{AGENT}.log"));
    let clock = dir.join("agent-clock-offset");
    set_clock_offset(&clock, "+0");
    agent.env = faketime_env(("FAKETIME_TIMESTAMP_FILE", clock.to_str().unwrap()));
    // Power cuts: the journals live beside, not on the buffer's small filesystem (filling it must not stop them).
    let power = PowerCut::new(&dir, &fs.path.join(format!("{AGENT}.db")));
    let cut_now = dir.join("cut-power-now");
    for (k, v) in power.env() {
        match agent.env.iter_mut().find(|(key, _)| *key == k) {
            Some((_, preload)) => *preload = format!("{preload}:{v}"),
            None => agent.env.push((k, v)),
        }
    }
    agent
        .env
        .push(("POWERCUT_KILL_FILE".into(), cut_now.display().to_string()));
    proxy.set("max_skew_s=300");
    let config = std::fs::read_to_string(&agent.config).unwrap();
    let drain = config
        .replacen("name = \"local\"", "name = \"drain\"", 1)
        .replacen(
            "filter = \"#\"",
            "filter = \"fieldlink-chaos/drain-only\"",
            1,
        );
    assert!(drain.contains("\"drain\"") && drain.contains("drain-only"));
    let drain_config = dir.join(format!("{AGENT}-drain.toml"));
    std::fs::write(&drain_config, drain).unwrap();

    let mut world = Chaos {
        seed,
        dir: dir.clone(),
        moto,
        proxy,
        broker,
        ballast: fs.path.join("ballast"),
        fs,
        agent,
        drain_config,
        backlog: 0.0,
        workers: [None, None],
        lock: None,
        clock,
        power,
        cut_now,
        undos: Vec::new(),
        t0: Instant::now(),
        stats: Stats::default(),
    };
    world.start_worker(0);
    world.start_worker(1);
    world.start_agent();
    let rate = env_u64("FIELDLINK_CHAOS_RATE").unwrap_or(RATE) as f64;
    let count = (rate * seconds as f64) as usize;
    let publishers: Vec<NumberedPublisher> = PREFIXES
        .iter()
        .map(|p| NumberedPublisher::spawn(world.broker.port, p, 0, count, rate, 0, &dir, 1))
        .collect();
    let setup_s = wall.elapsed().as_secs_f64();

    // The schedule.
    world.t0 = Instant::now();
    let t0 = world.t0;
    let end = t0 + Duration::from_secs(seconds);
    let mut next = t0 + Duration::from_millis(rng.u64(1000..4000));
    loop {
        let now = Instant::now();
        if now >= end {
            world.end_faults(true);
            break;
        }
        world.end_faults(false);
        if now >= next {
            // A fixed number of draws per event: the events and their parameters depend on the seed only.
            let e = events[rng.usize(0..events.len())];
            let p = rng.u64(0..1000);
            next = now + Duration::from_millis(rng.u64(1000..4000));
            world.end_conflicting(e);
            world.log(&format!("{e:?} ({p})"));
            *world.stats.events.entry(format!("{e:?}")).or_insert(0) += 1;
            if let Some((d, u)) = world.run(e, p) {
                world.undos.push((Instant::now() + d, u));
            }
            continue;
        }
        let wake = world
            .undos
            .iter()
            .map(|(at, _)| *at)
            .fold(next.min(end), Instant::min);
        std::thread::sleep(
            wake.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200)),
        );
    }
    let chaos_s = t0.elapsed().as_secs_f64();

    // Faults are off. Everything acknowledged must arrive.
    let acked: Vec<Vec<u64>> = publishers
        .into_iter()
        .map(|p| p.finish(Duration::from_secs(seconds + 180)))
        .collect();
    let t_end = Instant::now();
    let mut polls = 0;
    let mut last = serde_json::Value::Null;
    let caught_up = Instant::now() + Duration::from_secs(240);
    loop {
        let drained = world.agent.metric("fieldlink_buffer_pending_readings") == 0.0
            && world.agent.metric("fieldlink_buffer_unsealed_readings") == 0.0;
        if drained {
            last = landed(&world.moto, STREAM);
            polls += 1;
            if complete(&last, &acked) {
                break;
            }
        }
        assert!(
            Instant::now() < caught_up,
            "seed {seed}: not everything landed within 240 s of the end: {}",
            problems(&last, &acked).join("; ")
        );
        std::thread::sleep(Duration::from_millis(if drained { 2000 } else { 300 }));
    }
    let catch_up_s = t_end.elapsed().as_secs_f64();
    // Let resends still on their way land (they must be skipped) before the final look.
    let landed_total = |w: &Chaos| -> f64 {
        w.workers
            .iter()
            .flatten()
            .map(|c| c.metric("fieldlink_cloud_records_total"))
            .sum()
    };
    let mut seen = landed_total(&world);
    wait_for("the cloud to be idle", Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_secs(3));
        let now = landed_total(&world);
        let idle = now == seen;
        seen = now;
        idle.then_some(())
    });
    let v = landed(&world.moto, STREAM);
    let found = problems(&v, &acked);
    Chaos::check_ledger(
        &world.agent,
        world.backlog,
        seed,
        "at the end",
        &mut world.stats,
    );
    world.agent.stop();
    for i in 0..2 {
        world.sample_worker(i);
    }

    let acked_n: usize = acked.iter().map(Vec::len).sum();
    let proxy = world.proxy.stats();
    let mean = |v: &[u128]| v.iter().sum::<u128>() / v.len().max(1) as u128;
    eprintln!(
        "chaos summary: seed {seed}; schedule {chaos_s:.0} s, setup {setup_s:.0} s, catch-up {catch_up_s:.1} s, wall {:.0} s; events {:?}; readings published {}, acked {acked_n}, in parquet {}, in timestream {} ({} records written, {} rewrites); agent processes {} (start mean {} ms, max {} ms), drains before a replacement {:?} ms, power cuts right after a write {} (unsynced writes undone {}), ledger checks {}, readings received >= {}, deduplicated by the agent >= {}; batches skipped as duplicates by the cloud >= {}; proxy: {} PutRecords calls, {} throttled, {} entries rejected, {}+{} reset before/after, {} refused; {} landed.py polls",
        wall.elapsed().as_secs_f64(),
        world.stats.events,
        count * PREFIXES.len(),
        v["parquet"].as_array().map_or(0, Vec::len),
        v["timestream"].as_array().map_or(0, Vec::len),
        v["timestream_records"],
        v["timestream_rewrites"],
        world.stats.agent_starts,
        mean(&world.stats.agent_start_ms),
        world.stats.agent_start_ms.iter().max().unwrap_or(&0),
        world.stats.drain_ms,
        world.stats.cuts_at_a_write,
        world.stats.cut_writes_undone,
        world.stats.ledger_checks,
        world.stats.agent_received,
        world.stats.agent_deduplicated,
        world.stats.cloud_duplicates,
        proxy["calls"],
        proxy["throttled_calls"],
        proxy["rejected_entries"],
        proxy["reset_before"],
        proxy["reset_after"],
        proxy["refused_connections"],
        polls,
    );
    assert!(
        acked_n > count * PREFIXES.len() / 2,
        "seed {seed}: the broker acknowledged only {acked_n} of {} messages",
        count * PREFIXES.len()
    );
    if !found.is_empty() {
        eprintln!("{}", explain(&world.moto, &v, &acked));
        eprintln!("logs kept in {}", tmp.keep().display());
    }
    assert!(found.is_empty(), "seed {seed}: {}", found.join("; "));
}

/// For each number that is doubled or missing somewhere (the first few): the Kinesis records holding it.
fn explain(moto: &Moto, v: &serde_json::Value, acked: &[Vec<u64>]) -> String {
    let records = kinesis_dump(&moto.endpoint, STREAM);
    let mut out = String::new();
    for store in ["parquet", "timestream"] {
        let (got, _) = numbers_landed(v, store);
        for (p, a) in PREFIXES.iter().zip(acked) {
            let got = got.get(*p).cloned().unwrap_or_default();
            let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
            for n in &got {
                *counts.entry(*n).or_insert(0) += 1;
            }
            let odd = counts
                .iter()
                .filter(|(_, c)| **c > 1)
                .map(|(n, _)| *n)
                .chain(a.iter().copied().filter(|n| !counts.contains_key(n)));
            for n in odd.take(5) {
                let series = format!("{p}/dev{}/n", n % 10);
                let holders: Vec<String> = records
                    .iter()
                    .filter(|r| {
                        r.readings
                            .iter()
                            .any(|(s, ts, _, _)| *s == series && *ts == TS0 + n as i64)
                    })
                    .map(|r| format!("{}/{:016x}/{}", r.agent, r.epoch, r.seq))
                    .collect();
                out.push_str(&format!(
                    "{store}: {series} number {n} landed {} times (acknowledged: {}); Kinesis records holding it (agent/epoch/seq): {holders:?}\n",
                    counts.get(&n).unwrap_or(&0),
                    a.contains(&n)
                ));
            }
        }
    }
    out
}

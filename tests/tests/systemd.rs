//! The agent as a systemd service. The test plays the service manager's side of `sd_notify`: it binds the
//! `$NOTIFY_SOCKET` datagram socket, sets `$WATCHDOG_USEC`, and reads what the real agent binary sends while it
//! runs against a real Mosquitto and moto Kinesis. A second test runs `systemd-analyze verify` on the shipped unit.
#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Messages = Arc<Mutex<Vec<(Instant, String)>>>;

/// Receives notifications on `path` until `stop`, with their arrival times.
fn manager(
    path: &std::path::Path,
    stop: Arc<AtomicBool>,
) -> (Messages, std::thread::JoinHandle<()>) {
    let socket = UnixDatagram::bind(path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let got: Messages = Arc::default();
    let sink = got.clone();
    let join = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(n) = socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push((Instant::now(), msg));
            }
        }
    });
    (got, join)
}

fn watchdogs_between(got: &Messages, from: Instant, to: Instant) -> Vec<Instant> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(t, m)| m == "WATCHDOG=1" && *t >= from && *t <= to)
        .map(|(t, _)| *t)
        .collect()
}

fn largest_gap(times: &[Instant]) -> Duration {
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

#[test]
fn ready_then_a_watchdog_fed_only_while_the_buffer_answers_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let broker = Mosquitto::start(d);
    let moto = Moto::start(d);
    moto.create("sd", 1, "unused-db", "unused-table", "unused-bucket");
    let socket = d.join("notify.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let (got, listener) = manager(&socket, stop.clone());
    let mut agent = AgentProc::new(d, "sd-agent", broker.port, &moto.endpoint, "sd", "", "");
    // systemd would kill a service that stays silent for 1 s.
    agent.env = vec![
        ("NOTIFY_SOCKET".into(), socket.display().to_string()),
        ("WATCHDOG_USEC".into(), "1000000".into()),
    ];
    assert_thp_on_here(); // the agent checked below must turn them off itself
    let spawned = Instant::now();
    agent.start();

    // READY=1 once it runs, with a status line.
    let ready = wait_for("READY=1", Duration::from_secs(10), || {
        got.lock()
            .unwrap()
            .iter()
            .find(|(_, m)| m.starts_with("READY=1\n"))
            .cloned()
    });
    assert!(
        ready.1.contains("STATUS=running: 1 MQTT connection(s)"),
        "{}",
        ready.1
    );
    assert!(ready.0 >= spawned);
    // Before it, while the buffer opened (a whole-file check: minutes for a large backlog on an SD card), it asked
    // systemd for more than TimeoutStartSec.
    let extend = got
        .lock()
        .unwrap()
        .iter()
        .find(|(_, m)| m.contains("EXTEND_TIMEOUT_USEC="))
        .cloned();
    let extend = extend.expect("no EXTEND_TIMEOUT_USEC while opening the buffer");
    assert!(
        extend.0 <= ready.0
            && extend.1.contains("STATUS=opening the buffer")
            && extend.1.contains("EXTEND_TIMEOUT_USEC=30000000"),
        "{extend:?}"
    );
    // It turned transparent huge pages off for itself (agent/src/memory.rs: with `transparent_hugepage=always` they
    // nearly tripled the static agent's RSS).
    let pid = agent.proc.as_ref().unwrap().pid();
    assert_eq!(
        thp_enabled_line(&pid.to_string()),
        "THP_enabled:\t0",
        "transparent huge pages left on"
    );

    // Healthy: fed well inside the 1 s timeout.
    let steady_from = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let steady = watchdogs_between(&got, steady_from, Instant::now());
    assert!(
        steady.len() >= 4,
        "{} watchdog messages in 2 s",
        steady.len()
    );
    assert!(
        largest_gap(&steady) < Duration::from_millis(900),
        "healthy, yet the watchdog went {:?} unfed",
        largest_gap(&steady)
    );

    // Another process holds the buffer's write lock for 3 s while readings arrive: the buffer thread waits on it,
    // so the watchdog must go hungry (systemd would restart the agent) and /health must say why.
    let locked = d.join("locked");
    let mut holder = Proc::spawn(
        "lock holder",
        {
            let mut c = Command::new(python());
            c.arg(script("hold_write_lock.py"))
                .arg(d.join("sd-agent.db"))
                .arg("3")
                .arg(&locked);
            c
        },
        &d.join("lock.log"),
    );
    wait_for("the write lock", Duration::from_secs(10), || {
        locked.exists().then_some(())
    });
    let lock_from = Instant::now();
    let path = d.to_path_buf();
    let port = broker.port;
    let publisher = std::thread::spawn(move || publish_numbered(port, 300, 150.0, 0, &path));
    let unhealthy = wait_for(
        "/health to report the stall",
        Duration::from_secs(10),
        || {
            http_get(agent.metrics_port, "/health")
                .filter(|h| h.contains("buffer: FAIL the buffer thread has not answered"))
        },
    );
    holder.wait(Duration::from_secs(20));
    let lock_to = Instant::now();
    let acked: BTreeSet<u64> = publisher.join().unwrap().into_iter().collect();
    assert_eq!(acked.len(), 300);

    // Fed again once the lock is gone, and healthy.
    let healthy = wait_for("/health to recover", Duration::from_secs(15), || {
        http_get(agent.metrics_port, "/health").filter(|h| h.contains("buffer: ok"))
    });
    let after = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let stalled = watchdogs_between(&got, lock_from - Duration::from_millis(300), after);
    let resumed = watchdogs_between(&got, after, Instant::now());
    assert!(
        largest_gap(&stalled) >= Duration::from_millis(1500),
        "the watchdog was fed while the buffer was locked ({:?} largest gap over {:?} of lock)",
        largest_gap(&stalled),
        lock_to - lock_from
    );
    assert!(resumed.len() >= 2, "the watchdog did not resume");

    // Nothing was lost by the stall.
    let deadline = Instant::now() + Duration::from_secs(30);
    let landed: BTreeSet<u64> = loop {
        let landed: BTreeSet<u64> = numbers_in(&kinesis_dump(&moto.endpoint, "sd"))
            .into_iter()
            .collect();
        if acked.is_subset(&landed) || Instant::now() > deadline {
            break landed;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(acked.difference(&landed).count(), 0);
    let acked_list: Vec<u64> = acked.iter().copied().collect();
    let problem = exactly_once(
        &acked_list,
        &numbers_in(&unique_batches(&kinesis_dump(&moto.endpoint, "sd"))),
    );
    assert!(problem.is_empty(), "after the stall: {problem}");

    // SIGTERM: STOPPING=1, asking for the drain deadline (2 s in this config) + 60 s.
    agent.stop();
    stop.store(true, Ordering::Relaxed);
    listener.join().unwrap();
    let all = got.lock().unwrap();
    let stopping = all
        .iter()
        .find(|(_, m)| m.starts_with("STOPPING=1\n"))
        .map(|(_, m)| m.clone())
        .unwrap_or_else(|| panic!("no STOPPING=1 among {} messages", all.len()));
    assert!(
        stopping.contains("EXTEND_TIMEOUT_USEC=62000000"),
        "{stopping}"
    );
    eprintln!(
        "sd_notify: READY after {:?}; {} watchdog messages in 2 s healthy (largest gap {:?}); buffer locked {:?}: \
         largest gap {:?}, /health said {:?}, then {:?}; {} readings all landed",
        ready.0 - spawned,
        steady.len(),
        largest_gap(&steady),
        lock_to - lock_from,
        largest_gap(&stalled),
        unhealthy.lines().find(|l| l.starts_with("buffer")).unwrap_or(""),
        healthy.lines().find(|l| l.starts_with("buffer")).unwrap_or(""),
        acked.len()
    );
}

/// `systemd-analyze verify` accepts the shipped units, the agent's and the drain's, side by side (with `ExecStart`
/// pointed at the built binary): no unknown keys, no bad values, commands that exist. It warns without failing, so
/// any output is a failure here.
#[test]
fn the_shipped_unit_files_verify() {
    let dir = tempfile::tempdir().unwrap();
    let agent = bin("fieldlink-agent");
    let units = ["fieldlink-agent.service", "fieldlink-agent-drain.service"].map(|name| {
        let text = std::fs::read_to_string(root().join("deploy/systemd").join(name)).unwrap();
        let path = dir.path().join(name);
        let local = text.replace("/usr/bin/fieldlink-agent", agent.to_str().unwrap());
        std::fs::write(&path, &local).unwrap();
        (text, path)
    });
    let [(unit, path), (drain, drain_path)] = &units;
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    // Starting the drain stops the agent first, and runs the drain command.
    assert!(
        drain.contains("Conflicts=fieldlink-agent.service")
            && drain.contains("After=fieldlink-agent.service")
            && drain.contains(
                "ExecStart=/usr/bin/fieldlink-agent drain --config /etc/fieldlink/agent.toml"
            )
            && drain.contains("Type=oneshot")
    );
    let verify = |paths: &[&std::path::Path]| {
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(paths)
            .output()
            .expect("systemd-analyze (deploy/setup.sh installs systemd)")
    };
    let out = verify(&[path, drain_path]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    // And the check catches a mistake.
    std::fs::write(path, unit.replace("ProtectClock=", "ProtectClok=")).unwrap();
    let out = verify(&[path]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ProtectClok"));
}

//! The shipped static x86_64 agent's memory settings (`agent/src/memory.rs`, docs/memory.md), run as built
//! (`deploy/build-static.sh`, which the test command runs before the tests): transparent huge pages off for the
//! process, mimalloc with a 25 ms purge delay by default, and an operator's `MIMALLOC_PURGE_DELAY` winning over
//! that default.

#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use std::time::Duration;

/// Starts the static agent with `env`, waits for its start-up log's memory line, and returns that line and the
/// process's `THP_enabled` status line.
fn memory_settings(env: &[(&str, &str)]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    moto.create("mem", 1, CLOUD_DB, CLOUD_TABLE, CLOUD_BUCKET);
    let mut agent = AgentProc::new(
        dir.path(),
        "mem-agent",
        broker.port,
        &moto.endpoint,
        "mem",
        "",
        "",
    );
    agent.launcher = vec![static_bin("x86_64-unknown-linux-musl", "fieldlink-agent").into()];
    agent.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    agent.start();
    let line = wait_for(
        "the memory settings log line",
        Duration::from_secs(20),
        || {
            agent
                .proc
                .as_ref()
                .unwrap()
                .log_text()
                .lines()
                .find(|l| l.contains("memory settings"))
                .map(str::to_owned)
        },
    );
    let pid = agent.proc.as_ref().unwrap().pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let thp = thp_line(&status);
    agent.stop();
    (line, thp)
}

/// The `THP_enabled` line of a `/proc/<pid>/status`.
fn thp_line(status: &str) -> String {
    status
        .lines()
        .find(|l| l.starts_with("THP_enabled"))
        .unwrap_or("no THP_enabled line")
        .to_owned()
}

#[test]
fn the_static_agent_turns_huge_pages_off_and_an_operators_purge_delay_beats_its_default() {
    // The agent inherits both from this process: the flag across fork and exec, the variable through the
    // environment. With either set here the checks below would pass without the agent's own settings.
    assert_eq!(
        thp_line(&std::fs::read_to_string("/proc/self/status").unwrap()),
        "THP_enabled:\t1",
        "this test process already has transparent huge pages off: the agent's flag cannot be told apart"
    );
    assert!(
        std::env::var_os("MIMALLOC_PURGE_DELAY").is_none(),
        "MIMALLOC_PURGE_DELAY is set for the tests: the agent's default cannot be told apart"
    );
    let (line, thp) = memory_settings(&[]);
    assert!(
        thp.split_whitespace().eq(["THP_enabled:", "0"]),
        "transparent huge pages left on in the static agent: {thp}"
    );
    for want in [
        "huge_pages_off=true",
        "allocator=\"mimalloc\"",
        "purge_delay_ms=Some(25)",
    ] {
        assert!(line.contains(want), "{want} missing from: {line}");
    }

    let (line, _) = memory_settings(&[("MIMALLOC_PURGE_DELAY", "100")]);
    assert!(
        line.contains("purge_delay_ms=Some(100)"),
        "MIMALLOC_PURGE_DELAY=100 did not win over the default: {line}"
    );
}

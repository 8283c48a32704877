//! The shipped static x86_64 agent's memory settings (`agent/src/memory.rs`, docs/memory.md), run as built
//! (`deploy/build-static.sh`, which the test command runs before the tests): transparent huge pages off for the
//! process, mimalloc with a 25 ms purge delay by default, and an operator's `MIMALLOC_PURGE_DELAY` winning over
//! that default.

#![allow(clippy::unwrap_used)]

use fieldlink_e2e::*;
use std::path::Path;

/// Starts the static agent `id` with `env` against `broker` and `moto`, waits for its start-up log's memory line,
/// and returns that line and the process's `THP_enabled` status line.
fn memory_settings(
    dir: &Path,
    broker: &Mosquitto,
    moto: &Moto,
    id: &str,
    env: &[(&str, &str)],
) -> (String, String) {
    let mut agent = AgentProc::new(dir, id, broker.port, &moto.endpoint, "mem", "", "");
    agent.launcher = vec![static_bin("x86_64-unknown-linux-musl", "fieldlink-agent").into()];
    agent.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    agent.start();
    let (line, thp) = agent.memory_settings();
    agent.stop();
    (line, thp)
}

#[test]
fn the_static_agent_turns_huge_pages_off_and_an_operators_purge_delay_beats_its_default() {
    // The agent inherits both from this process: the flag across fork and exec, the variable through the
    // environment. With either set here the checks below would pass without the agent's own settings.
    assert_thp_on_here();
    assert!(
        std::env::var_os("MIMALLOC_PURGE_DELAY").is_none(),
        "MIMALLOC_PURGE_DELAY is set for the tests: the agent's default cannot be told apart"
    );
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let moto = Moto::start(dir.path());
    moto.create("mem", 1, CLOUD_DB, CLOUD_TABLE, CLOUD_BUCKET);

    let (line, thp) = memory_settings(dir.path(), &broker, &moto, "mem-default", &[]);
    assert_eq!(
        thp, "THP_enabled:\t0",
        "transparent huge pages left on in the static agent"
    );
    for want in [
        "huge_pages_off=true",
        "allocator=\"mimalloc\"",
        "purge_delay_ms=Some(25)",
    ] {
        assert!(line.contains(want), "{want} missing from: {line}");
    }

    let (line, _) = memory_settings(
        dir.path(),
        &broker,
        &moto,
        "mem-env",
        &[("MIMALLOC_PURGE_DELAY", "100")],
    );
    assert!(
        line.contains("purge_delay_ms=Some(100)"),
        "MIMALLOC_PURGE_DELAY=100 did not win over the default: {line}"
    );
}

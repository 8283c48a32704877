//! Compaction benchmark: one hour of landing files (written with the cloud's encoder into a local directory)
//! published by `fieldlink-cloud compact --once` of the same build profile, against moto's DynamoDB for the lease.
//! Prints the rows per second of the round (from its log) and the compactor's peak resident memory, beside the
//! peak of a round with nothing to do.
//!
//! Usage: `compaction-bench [FILES] [ROWS_PER_FILE] [MAX_MEMORY_MIB]` (default 40 × 50,000 rows, 96 MiB); build
//! the binaries first (`cargo build --bins`, or `--release` for release figures).

use fieldlink_e2e::bronze::*;
use fieldlink_e2e::{run_ok, Moto};
use std::time::Instant;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn peak(out: &str) -> u64 {
    out.split("peak RSS ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let (files, per_file, cap) = (arg(1, 40), arg(2, 50_000), arg(3, 96));
    let dir = tempfile::tempdir().expect("temporary directory");
    let moto = Moto::start(dir.path());
    let table = "leases-bench";
    let root = dir.path().join("bronze");
    let config = compactor_setup(
        dir.path(),
        &moto.endpoint,
        &root.display().to_string(),
        table,
        None,
        &format!("max_memory_mib = {cap}"),
    );
    let idle = run_ok(&mut compact_cmd(&config, true));
    let (decoded, bytes) = land_big_hour(&root, files, per_file);
    let rows = (files * per_file) as f64;
    let t = Instant::now();
    let run = compact_cmd(&config, true)
        .output()
        .expect("fieldlink-cloud compact");
    let wall = t.elapsed().as_secs_f64();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "compact failed:\n{out}");
    let took_ms: f64 = out
        .lines()
        .find(|l| l.contains("compaction round"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("took_ms="))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(wall * 1000.0);
    println!(
        "compaction: {rows} rows in {files} landing files ({:.1} MiB on disk, {:.0} MiB decoded), max_memory_mib {cap}: \
         round {:.2} s = {:.0} rows/s (process {wall:.2} s); peak RSS {:.1} MiB (an idle round: {:.1} MiB)",
        bytes as f64 / 1048576.0,
        decoded as f64 / 1048576.0,
        took_ms / 1000.0,
        rows / (took_ms / 1000.0),
        peak(&out) as f64 / 1024.0,
        peak(&idle) as f64 / 1024.0,
    );
}

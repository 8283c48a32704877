//! Cloud decode + Parquet benchmark on one core: the whole of `shared/datasets/sensors.csv.gz` is sealed into
//! records as an agent would (4,000 readings per batch, zstd level 3), then, timed on this thread: every record
//! decoded, its rows staged by event hour, and every hour partition encoded as a zstd Parquet file in the bronze
//! schema — exactly the cloud's code path minus the network. Repeated `PASSES` times; the best pass counts.
//! The same readings are then written to Parquet by pyarrow (`parquet_bench.py`: table already in memory,
//! same columns, same sort, zstd level 3) in the same run, for comparison.
//!
//! Run: `cargo run --release -p fieldlink-e2e --bin cloud-bench` (part of `deploy/bench.sh`).
#![allow(clippy::unwrap_used)]

use fieldlink_cloud::parquet::{encode, stage};
use std::collections::BTreeMap;
use std::time::Instant;

// As in fieldlink-cloud: a static (musl) build measures what ships.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PER_BATCH: usize = 4000;
const PASSES: usize = 5;

fn main() {
    let rows = fieldlink_e2e::dataset(usize::MAX);
    let n = rows.len();
    let mut enc = fieldlink_proto::Encoder::new(3).unwrap();
    let records: Vec<Vec<u8>> = rows
        .chunks(PER_BATCH)
        .enumerate()
        .map(|(i, c)| {
            enc.encode(&fieldlink_e2e::batch_of(c, "edge-bench-1", i as u64))
                .unwrap()
        })
        .collect();
    let wire: usize = records.iter().map(Vec::len).sum();

    // One pass: decode every record, stage rows by partition, encode every partition. `hourly`: the
    // readings' real event hours (the dataset spans 53 days thinly: a catch-up of 1,268 small files);
    // otherwise one partition (dense hours, as a live fleet fills them; comparable to pyarrow's one file).
    let pass = |hourly: bool| {
        let t = Instant::now();
        let batches: Vec<_> = records
            .iter()
            .map(|r| fieldlink_proto::decode(r).unwrap())
            .collect();
        let decoded = t.elapsed().as_secs_f64();
        let mut parts = BTreeMap::new();
        for b in &batches {
            stage(&mut parts, b);
        }
        drop(batches);
        if !hourly {
            let all: Vec<_> = std::mem::take(&mut parts).into_values().flatten().collect();
            parts.insert(0, all);
        }
        let (mut bytes, mut files) = (0, 0);
        for (_, rows) in parts {
            bytes += encode::encode(&rows, 131_072, 3).unwrap().len();
            files += 1;
        }
        (decoded, t.elapsed().as_secs_f64(), bytes, files)
    };
    let best = |hourly: bool| {
        (0..PASSES)
            .map(|_| pass(hourly))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap()
    };
    let (decode, dense, dense_bytes, _) = best(false);
    let (_, hourly, hourly_bytes, files) = best(true);
    let rate = |secs: f64| n as f64 / secs;
    println!(
        "cloud-bench: {n} readings in {} records ({:.2} B/reading on the wire); one core, best of {PASSES}",
        records.len(),
        wire as f64 / n as f64
    );
    println!(
        "  decode only:                                  {:>10.0} readings/s",
        rate(decode)
    );
    println!(
        "  decode + stage + Parquet, one file:           {:>10.0} readings/s  ({:.2} B/reading)",
        rate(dense),
        dense_bytes as f64 / n as f64
    );
    println!(
        "  decode + stage + Parquet, real event hours:   {:>10.0} readings/s  ({files} files, {:.2} B/reading)",
        rate(hourly),
        hourly_bytes as f64 / n as f64
    );

    let csv = std::env::temp_dir().join(format!("cloud-bench-{}.csv", std::process::id()));
    let mut text = String::from("series,ts,value\n");
    for (s, ts, v) in &rows {
        text.push_str(&format!("{s},{ts},{v:?}\n"));
    }
    std::fs::write(&csv, text).unwrap();
    let out = fieldlink_e2e::run_python(&[
        fieldlink_e2e::script("parquet_bench.py").to_str().unwrap(),
        csv.to_str().unwrap(),
        &PASSES.to_string(),
    ]);
    let _ = std::fs::remove_file(&csv);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    println!(
        "  pyarrow {:<7} one file, from a table in memory: {:>7.0} readings/s  ({:.2} B/reading)",
        v["pyarrow"].as_str().unwrap(),
        v["readings_per_s"].as_f64().unwrap(),
        v["bytes"].as_f64().unwrap() / n as f64
    );
}

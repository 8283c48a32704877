//! Bytes per reading on the wire: replays `shared/datasets/sensors.csv.gz` in batches of N seconds of event
//! time (default 1 s; pass other window lengths as arguments) through the real v1 encoder, exactly as the agent
//! seals them (agent id, sequence number, self-describing series table, zstd level 3), and prints the totals
//! next to the size of the same readings as CSV and as one JSON object per reading.
//!
//! Run: `cargo run --release -p fieldlink-e2e --bin wire-size [SECONDS ...]`
#![allow(clippy::unwrap_used)]

use fieldlink_proto::Encoder;

fn main() {
    let windows: Vec<i64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let windows = if windows.is_empty() { vec![1] } else { windows };
    let rows = fieldlink_e2e::dataset(usize::MAX);
    let csv_bytes: usize = rows
        .iter()
        .map(|(s, ts, v)| format!("{ts},{s},{v}\n").len())
        .sum();
    let json_bytes: usize = rows
        .iter()
        .map(|(s, ts, v)| format!("{{\"series\":\"{s}\",\"ts\":{ts},\"value\":{v}}}").len())
        .sum();
    let n = rows.len() as f64;
    println!(
        "dataset: {} readings; CSV {:.2} B/reading, JSON object per reading {:.2} B/reading",
        rows.len(),
        csv_bytes as f64 / n,
        json_bytes as f64 / n
    );
    let mut enc = Encoder::new(3).unwrap();
    for w in windows {
        let (mut bytes, mut batches, mut seq) = (0usize, 0usize, 0u64);
        let mut start = 0;
        while start < rows.len() {
            let second = rows[start].1.div_euclid(w * 1000);
            let mut end = start;
            while end < rows.len() && rows[end].1.div_euclid(w * 1000) == second {
                end += 1;
            }
            let batch = fieldlink_e2e::batch_of(&rows[start..end], "edge-demo-1", seq);
            bytes += enc.encode(&batch).unwrap().len();
            batches += 1;
            seq += 1;
            start = end;
        }
        println!(
            "{w:>5} s batches: {batches} records, {bytes} bytes, {:.2} B/reading, {:.0} readings/record on average",
            bytes as f64 / n,
            n / batches as f64
        );
    }
}

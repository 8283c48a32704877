//! Wire format v1 against v2 on `shared/datasets/sensors.csv.gz`, in one run:
//!
//! - **bytes per reading** of the whole dataset in 1-second batches (every reading of one second of event time in
//!   one record, as a live agent at the dataset's rate seals them) and in 24 KiB records (the agent's own batch
//!   builder, `fieldlink_agent::batch::Builder`, over seals of `2 × max_readings` readings in time order, grouped
//!   by device as the buffer groups them: what an agent sends while it catches up), beside the same batches as
//!   sorted CSV text (`ts,series,value` as published, sorted by series and time) compressed by zstd level 3;
//!   and the number of batches where v2 is larger than v1;
//! - the **series table** in 1-second batches: what it adds to the compressed v2 records, and what a per-agent
//!   series dictionary (records naming series by a small id the consumer already knows) would leave of it;
//! - **encode and decode readings/s** on one core (this thread) for both versions, best of several passes, and
//!   the share zstd takes of each.
//!
//! Run: `cargo run --release -p fieldlink-e2e --bin wire-size` (part of `deploy/bench.sh`).
#![allow(clippy::unwrap_used)]

use fieldlink_agent::batch::{device_key, BatchConfig, Builder, Row};
use fieldlink_proto::{
    decode, encode_body, Batch, Encoder, Quality, Reading, Series, Value, Version,
};
use std::collections::HashMap;
use std::io::Read;
use std::time::Instant;

/// One reading of the dataset with its value as published.
struct Text {
    series: String,
    ts: i64,
    value: String,
}

fn dataset() -> Vec<Text> {
    let mut gz =
        flate2::read::GzDecoder::new(std::fs::File::open(fieldlink_e2e::dataset_path()).unwrap());
    let mut text = String::new();
    gz.read_to_string(&mut text).unwrap();
    text.lines()
        .skip(1)
        .map(|l| {
            let mut f = l.splitn(3, ',');
            let ts = f.next().unwrap().parse().unwrap();
            let series = f.next().unwrap().to_owned();
            let value = f.next().unwrap().to_owned();
            Text { series, ts, value }
        })
        .collect()
}

fn batch_of(rows: &[&Text], seq: u64) -> Batch {
    let mut index: HashMap<&str, u32> = HashMap::new();
    let mut batch = Batch {
        agent_id: "edge-demo-1".into(),
        epoch: 0x5eed_0000_0000_0001,
        seq,
        series: Vec::new(),
        readings: Vec::with_capacity(rows.len()),
    };
    for r in rows {
        let next = index.len() as u32;
        let i = *index.entry(r.series.as_str()).or_insert_with(|| {
            batch.series.push(Series::new(r.series.clone()));
            next
        });
        batch.readings.push(Reading {
            series: i,
            ts_ms: r.ts,
            value: Value::F64(r.value.parse().unwrap()),
            quality: Quality::Good,
            late: false,
        });
    }
    batch
}

/// Sorted CSV of the readings, zstd level 3 (no record header).
fn csv_zstd(rows: &[&Text]) -> usize {
    let mut sorted: Vec<&&Text> = rows.iter().collect();
    sorted.sort_by(|a, b| (&a.series, a.ts).cmp(&(&b.series, b.ts)));
    let mut text = String::new();
    for r in sorted {
        text.push_str(&format!("{},{},{}\n", r.ts, r.series, r.value));
    }
    zstd::bulk::compress(text.as_bytes(), 3).unwrap().len()
}

/// The readings in 1-second batches of event time.
fn seconds(rows: &[Text]) -> Vec<Vec<&Text>> {
    let mut out: Vec<Vec<&Text>> = Vec::new();
    let mut key = None;
    for r in rows {
        let k = r.ts.div_euclid(1000);
        if key != Some(k) {
            out.push(Vec::new());
            key = Some(k);
        }
        out.last_mut().unwrap().push(r);
    }
    out
}

/// The records an agent builds from the dataset toward 24 KiB in `version`, with the default batch settings.
fn agent_records(rows: &[Text], version: Version) -> Vec<(Vec<u8>, Vec<&Text>)> {
    let cfg = BatchConfig {
        wire_version: version as u8,
        ..BatchConfig::default()
    };
    let mut ids: HashMap<&str, i64> = HashMap::new();
    let mut series: Vec<Series> = Vec::new();
    for r in rows {
        ids.entry(r.series.as_str()).or_insert_with(|| {
            series.push(Series::new(r.series.clone()));
            series.len() as i64 - 1
        });
    }
    let lookup = |id: i64| series.get(id as usize).cloned();
    let mut encoder = Encoder::new(cfg.zstd_level).unwrap();
    let mut builder = Builder {
        encoder: &mut encoder,
        agent_id: "edge-demo-1",
        epoch: 0x5eed_0000_0000_0001,
        series_of: &lookup,
        cfg: &cfg,
    };
    let mut ratio = 10.0; // where the buffer starts its estimate
    let mut seq = 1;
    let mut out = Vec::new();
    for seal in rows.chunks(2 * cfg.max_readings.max(10_000)) {
        // The buffer's grouping: by device key and measure, each series in time order.
        let mut chunk: Vec<&Text> = seal.iter().collect();
        chunk.sort_by_cached_key(|r| {
            let s = Series::new(r.series.clone());
            (device_key(&s), s.measure().to_owned())
        });
        let rows_of: Vec<Row> = chunk
            .iter()
            .map(|r| Row {
                series_id: ids[r.series.as_str()],
                reading: Reading {
                    series: 0,
                    ts_ms: r.ts,
                    value: Value::F64(r.value.parse().unwrap()),
                    quality: Quality::Good,
                    late: false,
                },
            })
            .collect();
        let built = builder.build(&rows_of, seq, &mut ratio).unwrap();
        let mut at = 0;
        for b in built {
            out.push((b.record, chunk[at..at + b.readings].to_vec()));
            at += b.readings;
            seq += 1;
        }
    }
    out
}

struct Sizes {
    v1: usize,
    v2: usize,
    csv: usize,
    larger: usize,
    batches: usize,
}

impl Sizes {
    fn describe(&self, n: usize) -> String {
        format!(
            "v1 {:.2} B/reading, v2 {:.2} B/reading ({:.3}x v1), sorted CSV + zstd {:.2}; v2 larger than v1 in {} of {} batches",
            per(self.v1, n),
            per(self.v2, n),
            self.v2 as f64 / self.v1 as f64,
            per(self.csv, n),
            self.larger,
            self.batches
        )
    }
}

fn compare(batches: &[Vec<&Text>], enc: &mut Encoder) -> Sizes {
    let mut s = Sizes {
        v1: 0,
        v2: 0,
        csv: 0,
        larger: 0,
        batches: batches.len(),
    };
    for (i, rows) in batches.iter().enumerate() {
        let b = batch_of(rows, i as u64 + 1);
        let r1 = enc.encode_version(&b, Version::V1).unwrap().len();
        let r2 = enc.encode_version(&b, Version::V2).unwrap().len();
        s.v1 += r1;
        s.v2 += r2;
        s.larger += usize::from(r2 > r1);
        s.csv += csv_zstd(rows);
    }
    s
}

fn per(bytes: usize, n: usize) -> f64 {
    bytes as f64 / n as f64
}

/// Best of `passes` timings of `f`, in seconds.
fn best(passes: usize, mut f: impl FnMut()) -> f64 {
    (0..passes)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let rows = dataset();
    let n = rows.len();
    let mut enc = Encoder::new(3).unwrap();
    println!("wire-size: {n} readings of shared/datasets/sensors.csv.gz; zstd level 3; record header 38 bytes");

    // 1-second batches.
    let secs = seconds(&rows);
    let s = compare(&secs, &mut enc);
    println!(
        "  1-second batches ({} records): {}",
        s.batches,
        s.describe(n)
    );

    // 24 KiB records, built by the agent's builder in each version; both versions also encoded on the other's
    // batches, so "larger" compares like with like.
    for (label, version) in [("v1", Version::V1), ("v2", Version::V2)] {
        let built = agent_records(&rows, version);
        let bytes: usize = built.iter().map(|(r, _)| r.len()).sum();
        let batches: Vec<Vec<&Text>> = built.into_iter().map(|(_, rows)| rows).collect();
        let s = compare(&batches, &mut enc);
        println!(
            "  24 KiB records as the agent builds them with wire_version = {} ({} records, {:.0} readings each): {label} {:.2} B/reading; on these batches: {}",
            version as u8,
            s.batches,
            per(n, s.batches),
            per(bytes, n),
            s.describe(n)
        );
    }

    // The series table in 1-second batches: compressed v2 body with and without it, and with a dictionary id per
    // series in its place (one varint each, in table order: what a per-agent series dictionary would send).
    let (mut with, mut without, mut dict, mut raw_table, mut series) = (0, 0, 0, 0, 0);
    let mut dictionary: HashMap<String, i64> = HashMap::new();
    for (i, rows) in secs.iter().enumerate() {
        let b = batch_of(rows, i as u64 + 1);
        let mut body = Vec::new();
        encode_body(&b, Version::V2, &mut body).unwrap();
        let table = series_table_len(&body);
        raw_table += table;
        series += b.series.len();
        let z = |x: &[u8]| zstd::bulk::compress(x, 3).unwrap().len();
        with += z(&body);
        without += z(&body[table..]);
        let mut ids = Vec::new();
        let mut prev = 0i64;
        for s in &b.series {
            // Ids in order of first sight, as an agent would hand them out; each as the zigzag difference to the
            // previous id (a device's series, and devices seen together, get neighbouring ids).
            let next = dictionary.len() as i64;
            let id = *dictionary.entry(s.key.clone()).or_insert(next);
            put_varint(&mut ids, (((id - prev) << 1) ^ ((id - prev) >> 63)) as u64);
            prev = id;
        }
        ids.extend_from_slice(&body[table..]);
        dict += z(&ids);
    }
    println!(
        "  series table in 1-second batches: {} series named, {:.2} B/reading before zstd; it adds {:.2} B/reading to the compressed v2 body ({:.0}% of v2's bytes); a per-agent dictionary id per series instead would add {:.2} B/reading (v2 with a dictionary: about {:.2} B/reading)",
        series,
        per(raw_table, n),
        per(with - without, n),
        100.0 * (with - without) as f64 / s.v2 as f64,
        per(dict - without, n),
        per(s.v2 - (with - dict), n)
    );

    // Speed on one core: the 24 KiB batches (as the agent builds them), encode whole records and decode them.
    let batches: Vec<Batch> = agent_records(&rows, Version::V2)
        .into_iter()
        .enumerate()
        .map(|(i, (_, rows))| batch_of(&rows, i as u64 + 1))
        .collect();
    for version in [Version::V1, Version::V2] {
        let records: Vec<Vec<u8>> = batches
            .iter()
            .map(|b| enc.encode_version(b, version).unwrap())
            .collect();
        let mut bodies = Vec::new();
        for b in &batches {
            let mut body = Vec::new();
            encode_body(b, version, &mut body).unwrap();
            bodies.push(body);
        }
        let frames: Vec<Vec<u8>> = bodies
            .iter()
            .map(|b| zstd::bulk::compress(b, 3).unwrap())
            .collect();
        let passes = 7;
        let t_enc = best(passes, || {
            for b in &batches {
                std::hint::black_box(enc.encode_version(b, version).unwrap());
            }
        });
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        let t_zc = best(passes, || {
            for b in &bodies {
                std::hint::black_box(c.compress(b).unwrap());
            }
        });
        let t_dec = best(passes, || {
            for r in &records {
                std::hint::black_box(decode(r).unwrap());
            }
        });
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let t_zd = best(passes, || {
            for (f, b) in frames.iter().zip(&bodies) {
                std::hint::black_box(d.decompress(f, b.len()).unwrap());
            }
        });
        println!(
            "  {version:?} on one core, {} records of {:.0} readings: encode {:.2} M readings/s (zstd {:.0}% of it), decode {:.2} M readings/s (zstd {:.0}% of it)",
            batches.len(),
            per(n, batches.len()),
            n as f64 / t_enc / 1e6,
            100.0 * t_zc / t_enc,
            n as f64 / t_dec / 1e6,
            100.0 * t_zd / t_dec
        );
    }
}

/// Length of the series table at the start of a v2 body.
fn series_table_len(body: &[u8]) -> usize {
    let mut pos = 0;
    let varint = |pos: &mut usize| {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = body[*pos];
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return v;
            }
            shift += 7;
        }
    };
    let ns = varint(&mut pos);
    for _ in 0..ns {
        varint(&mut pos); // shared
        let rest = varint(&mut pos) as usize;
        pos += rest;
        let tags = varint(&mut pos);
        for _ in 0..tags.saturating_sub(1) * 2 {
            let l = varint(&mut pos) as usize;
            pos += l;
        }
    }
    pos
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

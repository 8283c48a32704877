//! Helpers of the bronze compaction tests and benchmark: landing files written with the cloud's own encoder,
//! compactor configurations, and what a reader of the published table sees (`tests/python/bronze.py`).

use crate::{aws_env, bin, run_python, script};
use fieldlink_cloud::parquet::encode::{encode, Row, SeriesCols};
use fieldlink_cloud::parquet::partition;
use fieldlink_proto::{Quality, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// 2026-03-02T00:00Z, in hours since the epoch.
pub const H0: i64 = 492_336;
pub const HOUR_MS: i64 = 3_600_000;

/// One row as a reader identifies it: (series, time, agent, epoch, seq, value bits).
pub type Id = (String, i64, String, u64, u64, u64);

pub fn rows_of(ids: &[Id]) -> Vec<Row> {
    let mut series: BTreeMap<&str, Arc<SeriesCols>> = BTreeMap::new();
    ids.iter()
        .map(|(s, t, a, e, q, v)| Row {
            ts_ms: *t,
            series: series
                .entry(s.as_str())
                .or_insert_with(|| {
                    let (device, measure) = s.rsplit_once('/').unwrap();
                    Arc::new(SeriesCols {
                        key: s.clone(),
                        device: device.into(),
                        measure: measure.into(),
                        tags: vec![("site".into(), "muc".into())],
                    })
                })
                .clone(),
            agent: Arc::from(a.as_str()),
            seq: *q,
            epoch: *e,
            value: Value::F64(f64::from_bits(*v)),
            quality: Quality::Good,
            late: false,
        })
        .collect()
}

/// Writes a landing file of `ids` (all in `hour`) under `root` as a shard commit would; returns its key.
pub fn land(root: &Path, hour: i64, name: &str, ids: &[Id]) -> String {
    let key = format!("_landing/{}/{name}.parquet", partition(hour));
    let path = root.join(&key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, encode(&rows_of(ids), 131_072, 3).unwrap()).unwrap();
    key
}

/// `n` distinct readings of `agent` in `hour`, batch sequence numbers from `seq0`, values drawn from `rng`.
pub fn readings(rng: &mut fastrand::Rng, agent: &str, hour: i64, seq0: u64, n: usize) -> Vec<Id> {
    (0..n)
        .map(|i| {
            (
                format!("plant/dev-{}/m{}", i % 7, i % 3),
                hour * HOUR_MS + (seq0 as i64 * 1000 + i as i64) % HOUR_MS,
                agent.to_owned(),
                42,
                seq0 + (i / 100) as u64,
                (rng.f64() * 1000.0).to_bits(),
            )
        })
        .collect()
}

/// A compactor configuration: only `[parquet]`, `[leases]` and `[compaction]` matter to `compact`.
pub fn compactor_toml(
    endpoint: &str,
    location: &str,
    table: &str,
    work: &Path,
    extra: &str,
) -> String {
    format!(
        r#"metrics_listen = "127.0.0.1:0"
[log]
level = "info"
format = "text"
[aws]
endpoint_url = "{endpoint}"
[kinesis]
stream = "unused"
[leases]
table = "{table}"
worker_id = "compactor"
lease_ms = 3000
[parquet]
location = "{location}"
[compaction]
interval_ms = 1000
grace_s = 0
work_dir = "{work}"
{extra}
"#,
        work = work.display()
    )
}

/// Writes the lease of a shard into `table` (created if missing): read to its end (`SHARD_END`) with no
/// `watermark`, else live and checkpointed up to `watermark` (Unix ms).
pub fn shard_lease(endpoint: &str, table: &str, watermark: Option<i64>) {
    let w = watermark.map(|w| w.to_string());
    let mut args = vec!["lease", endpoint, table, "shardId-000000000000"];
    match &w {
        Some(w) => args.extend(["49000", w.as_str()]),
        None => args.push("SHARD_END"),
    }
    bronze(&args);
}

/// A shard lease ([`shard_lease`]) and a compactor configuration for `location` in `dir` (work directory
/// `dir/work`; `extra` lines replace defaults of `[compaction]`); returns the configuration's path.
pub fn compactor_setup(
    dir: &Path,
    endpoint: &str,
    location: &str,
    table: &str,
    watermark: Option<i64>,
    extra: &str,
) -> PathBuf {
    shard_lease(endpoint, table, watermark);
    let mut text = compactor_toml(endpoint, location, table, &dir.join("work"), "");
    for line in extra.lines() {
        let key = line.split('=').next().unwrap_or_default().trim();
        match text.lines().find(|l| l.starts_with(&format!("{key} ="))) {
            Some(old) => text = text.replace(old, line),
            None => text.push_str(&format!("{line}\n")),
        }
    }
    let path = dir.join("compact.toml");
    std::fs::write(&path, text).expect("writing the compactor configuration");
    path
}

/// One hour ([`H0`]) of `files` landing files of `per_file` distinct readings each under `root` (seeded, so
/// every call writes the same). Returns the memory the hour takes decoded (the first file's Arrow size times
/// the number of files: they are alike) and its size on disk.
pub fn land_big_hour(root: &Path, files: usize, per_file: usize) -> (u64, u64) {
    let mut rng = fastrand::Rng::with_seed(11);
    let (mut decoded, mut on_disk) = (0, 0);
    for f in 0..files {
        let ids = readings(
            &mut rng,
            &format!("agent-{f}"),
            H0,
            f as u64 * 1000,
            per_file,
        );
        let path = root.join(land(root, H0, &format!("shardId-000000000000-{f}"), &ids));
        if f == 0 {
            decoded = decoded_bytes(&path) * files as u64;
        }
        on_disk += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    }
    (decoded, on_disk)
}

/// What a reader of the table sees (`bronze.py read`).
pub struct Seen {
    pub rows: Vec<Id>,
    pub files: BTreeMap<String, String>,
    pub landing_files: usize,
    pub landing_rows: u64,
}

pub fn read_table(location: &str, endpoint: &str) -> Seen {
    let v: serde_json::Value = serde_json::from_str(&run_python(&[
        script("bronze.py").to_str().unwrap(),
        "read",
        location,
        endpoint,
    ]))
    .unwrap();
    let rows = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let value: f64 = r[5].as_str().unwrap().parse().unwrap();
            (
                r[0].as_str().unwrap().to_owned(),
                r[1].as_i64().unwrap(),
                r[2].as_str().unwrap().to_owned(),
                r[3].as_u64().unwrap(),
                r[4].as_u64().unwrap(),
                value.to_bits(),
            )
        })
        .collect();
    let files = v["files"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, m)| (k.clone(), m.as_str().unwrap().to_owned()))
        .collect();
    Seen {
        rows,
        files,
        landing_files: v["landing_files"].as_array().unwrap().len(),
        landing_rows: v["landing_rows"].as_u64().unwrap(),
    }
}

pub fn bronze(args: &[&str]) -> String {
    let mut a = vec![script("bronze.py").to_str().unwrap().to_owned()];
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run_python(&a)
}

/// Every row of `seen` exactly once, and nothing else; else a description of the difference.
pub fn check_exactly_once(seen: &[Id], expected: &BTreeSet<Id>) -> Result<(), String> {
    let mut counts: BTreeMap<&Id, usize> = BTreeMap::new();
    for r in seen {
        *counts.entry(r).or_insert(0) += 1;
    }
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(3).collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|r| !counts.contains_key(r))
        .take(3)
        .collect();
    let extra: Vec<_> = counts
        .keys()
        .filter(|r| !expected.contains(*r))
        .take(3)
        .collect();
    if doubled.is_empty() && missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} rows ({} distinct) for {} expected; doubled e.g. {doubled:?}; missing e.g. {missing:?}; unexpected e.g. {extra:?}",
        seen.len(),
        counts.len(),
        expected.len()
    ))
}

pub fn compact_cmd(config: &Path, once: bool) -> Command {
    let mut cmd = Command::new(bin("fieldlink-cloud"));
    cmd.arg("compact").arg("--config").arg(config);
    if once {
        cmd.arg("--once");
    }
    aws_env(&mut cmd);
    cmd
}

/// A long-running `compact` named `name` (its `worker_id`, config and log under `dir`) on `endpoint`, with its
/// metrics on a free port; the process and that port.
pub fn start_compactor(
    dir: &Path,
    endpoint: &str,
    location: &str,
    table: &str,
    name: &str,
) -> (crate::Proc, u16) {
    let port = crate::free_port();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        compactor_toml(endpoint, location, table, &dir.join(name), "")
            .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
            .replace(
                "worker_id = \"compactor\"",
                &format!("worker_id = \"{name}\""),
            ),
    )
    .expect("writing a compactor configuration");
    let p = crate::Proc::spawn(
        name,
        compact_cmd(&config, false),
        &dir.join(format!("{name}.log")),
    );
    (p, port)
}

/// The value of metric `name` of the compactor serving metrics on `port` (0 while it does not answer).
pub fn compactor_metric(port: u16, name: &str) -> f64 {
    crate::http_get(port, "/metrics")
        .and_then(|m| crate::metric(&m, name))
        .unwrap_or(0.0)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The memory a Parquet file takes decoded (its Arrow arrays): what holding the hour in memory would cost.
pub fn decoded_bytes(path: &Path) -> u64 {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(path).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    reader
        .map(|b| b.unwrap().get_array_memory_size() as u64)
        .sum()
}

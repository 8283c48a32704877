use super::*;
use crate::parquet::encode::{encode, Row, SeriesCols};
use fieldlink_proto::{Quality, Value};
use proptest::prelude::*;
use std::sync::Arc;

const SETTINGS: WriteSettings = WriteSettings {
    row_group_rows: 1000,
    zstd_level: 3,
};

/// A reading as the tests see it: (series, time, agent, epoch, seq, value).
type R = (String, i64, String, u64, u64, f64);

fn rows_of(readings: &[R]) -> Vec<Row> {
    readings
        .iter()
        .map(|(s, t, a, e, q, v)| Row {
            ts_ms: *t,
            series: Arc::new(SeriesCols {
                key: s.clone(),
                device: "d".into(),
                measure: "m".into(),
                tags: vec![("site".into(), "muc".into())],
            }),
            agent: Arc::from(a.as_str()),
            seq: *q,
            epoch: *e,
            value: Value::F64(*v),
            quality: Quality::Good,
            late: false,
        })
        .collect()
}

/// Writes a landing file of `readings` (encoded like a shard commit's file).
fn landing(dir: &Path, name: &str, readings: &[R]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        encode(&rows_of(readings), 700, 3).unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    path
}

/// Every row of a file, in file order.
fn read(path: &Path) -> Vec<R> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{e}"));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap_or_else(|e| panic!("{e}"));
        let c = Cols::of(&b, path).unwrap_or_else(|e| panic!("{e}"));
        for i in 0..b.num_rows() {
            out.push((
                c.series.value(i).to_owned(),
                c.time.value(i),
                c.agent.value(i).to_owned(),
                c.epoch.value(i),
                c.seq.value(i) as u64,
                c.vd.value(i),
            ));
        }
    }
    out
}

fn merge_into(dir: &Path, inputs: &[PathBuf], split: Split, fan_in: usize) -> Merged {
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("{e}"));
    let name = move |i: usize| out.join(part_name(i));
    merge_in_rounds(inputs, fan_in, dir, &name, split, SETTINGS).unwrap_or_else(|e| panic!("{e}"))
}

fn r(series: &str, t: i64, agent: &str, seq: u64, v: f64) -> R {
    (series.into(), t, agent.into(), 7, seq, v)
}

/// The model of a merge: the rows sorted, and of the rows with one `(series, time, agent, value)` the first kept.
fn sorted_set(mut v: Vec<R>) -> Vec<R> {
    v.sort_by(|a, b| {
        (&a.0, a.1, &a.2, a.3, a.4)
            .cmp(&(&b.0, b.1, &b.2, b.3, b.4))
            .then(a.5.total_cmp(&b.5))
    });
    let mut seen = std::collections::HashSet::new();
    v.retain(|(s, t, a, _, _, x)| seen.insert((s.clone(), *t, a.clone(), x.to_bits())));
    v
}

#[test]
fn a_resend_landed_by_two_processes_collapses_to_one_row() {
    let dir = tempdir();
    // The same batch (agent a, seq 1) landed in two commits, plus a distinct batch.
    let batch1 = vec![r("s/a", 1, "a", 1, 1.0), r("s/b", 1, "a", 1, 2.0)];
    let x = landing(dir.path(), "shard0-1.parquet", &batch1);
    let mut other = batch1.clone();
    other.push(r("s/a", 2, "a", 2, 3.0));
    let y = landing(dir.path(), "shard1-9.parquet", &other);
    let m = merge_into(dir.path(), &[x, y], Split::BySize(u64::MAX), 64);
    assert_eq!(m.parts.len(), 1);
    assert_eq!((m.input_rows, m.rows, m.duplicates()), (5, 3, 2));
    assert_eq!(
        read(&m.parts[0].path),
        vec![
            r("s/a", 1, "a", 1, 1.0),
            r("s/a", 2, "a", 2, 3.0),
            r("s/b", 1, "a", 1, 2.0)
        ]
    );
}

#[test]
fn the_same_reading_carried_by_batches_of_two_buffer_files_is_published_once() {
    let dir = tempdir();
    // A message the old buffer (epoch 9) had sent was delivered again to the new one (epoch 3, a re-imaged
    // gateway) in its batch 1, beside a new reading; other values at the same time stay.
    let old = [("s/a", 1, 9, 13, 1.0), ("s/a", 2, 9, 13, 2.0)];
    let new = [
        ("s/a", 1, 3, 1, 1.0),
        ("s/a", 1, 3, 1, 4.0),
        ("s/a", 3, 3, 1, 5.0),
    ];
    let rows = |v: &[(&str, i64, u64, u64, f64)]| -> Vec<R> {
        v.iter()
            .map(|(s, t, e, q, x)| ((*s).into(), *t, "a".into(), *e, *q, *x))
            .collect()
    };
    let x = landing(dir.path(), "x.parquet", &rows(&old));
    let y = landing(dir.path(), "y.parquet", &rows(&new));
    let m = merge_into(dir.path(), &[x, y], Split::BySize(u64::MAX), 64);
    assert_eq!((m.input_rows, m.rows), (5, 4));
    assert_eq!(
        read(&m.parts[0].path),
        rows(&[
            ("s/a", 1, 3, 1, 1.0),
            ("s/a", 1, 3, 1, 4.0),
            ("s/a", 2, 9, 13, 2.0),
            ("s/a", 3, 3, 1, 5.0)
        ]),
        "the first copy in merge order is kept"
    );
}

#[test]
fn two_agents_reading_the_same_value_of_the_same_series_at_the_same_time_keep_both_rows() {
    let dir = tempdir();
    // Two sites with one configuration: the same series key, Modbus polls on the same aligned tick, the same
    // value. Timestream and InfluxDB keep both (the agent is a dimension, a tag); so does bronze. Agent b's
    // second batch repeats its own reading: that one goes.
    let x = landing(
        dir.path(),
        "site-a.parquet",
        &[r("inv-1/running", 1, "site-a", 1, 1.0)],
    );
    let y = landing(
        dir.path(),
        "site-b.parquet",
        &[
            r("inv-1/running", 1, "site-b", 4, 1.0),
            r("inv-1/running", 1, "site-b", 5, 1.0),
        ],
    );
    let m = merge_into(dir.path(), &[x, y], Split::BySize(u64::MAX), 64);
    assert_eq!(
        read(&m.parts[0].path),
        vec![
            r("inv-1/running", 1, "site-a", 1, 1.0),
            r("inv-1/running", 1, "site-b", 4, 1.0)
        ]
    );
}

#[test]
fn past_the_readings_compared_per_series_and_time_a_repeat_is_kept_never_a_reading_dropped() {
    let dir = tempdir();
    let n = MAX_READINGS_COMPARED as u64;
    // n + 1 distinct values at one time in batch 1, then all of them again in batch 2.
    let first: Vec<R> = (0..=n).map(|i| r("s/a", 1, "a", 1, i as f64)).collect();
    let again: Vec<R> = (0..=n).map(|i| r("s/a", 1, "a", 2, i as f64)).collect();
    let x = landing(dir.path(), "x.parquet", &first);
    let y = landing(dir.path(), "y.parquet", &again);
    let m = merge_into(dir.path(), &[x, y], Split::BySize(u64::MAX), 64);
    let out = read(&m.parts[0].path);
    let values: std::collections::BTreeSet<u64> = out.iter().map(|x| x.5 as u64).collect();
    assert_eq!(values.len() as u64, n + 1, "every reading is there");
    assert_eq!(m.rows, n + 2, "only the value beyond the cap is kept twice");
}

#[test]
fn the_same_batch_identity_with_other_values_is_kept() {
    let dir = tempdir();
    // A restored buffer file reused (agent, epoch, seq) for other readings at the same time.
    let x = landing(dir.path(), "x.parquet", &[r("s/a", 1, "a", 1, 1.0)]);
    let y = landing(dir.path(), "y.parquet", &[r("s/a", 1, "a", 1, 5.0)]);
    let m = merge_into(dir.path(), &[x, y], Split::BySize(u64::MAX), 64);
    assert_eq!(m.rows, 2);
}

#[test]
fn merging_the_output_with_its_inputs_again_writes_the_same_bytes() {
    let dir = tempdir();
    let a: Vec<R> = (0..3000)
        .map(|i| r(&format!("s/{}", i % 7), i, "a", i as u64 / 100, i as f64))
        .collect();
    let b: Vec<R> = (2000..5000)
        .map(|i| r(&format!("s/{}", i % 7), i, "a", i as u64 / 100, i as f64))
        .collect();
    let x = landing(dir.path(), "x.parquet", &a);
    let y = landing(dir.path(), "y.parquet", &b);
    let first = merge_into(
        dir.path(),
        &[x.clone(), y.clone()],
        Split::BySize(u64::MAX),
        64,
    );
    let published = dir.path().join("published.parquet");
    std::fs::copy(&first.parts[0].path, &published).unwrap_or_else(|e| panic!("{e}"));
    // A rerun after a crash: the published file and every input again, in another order and fan-in.
    let again = merge_into(
        dir.path(),
        &[y, published.clone(), x],
        Split::Fixed(Vec::new()),
        2,
    );
    assert_eq!(again.rows, 5000);
    assert_eq!(
        std::fs::read(&again.parts[0].path).unwrap_or_default(),
        std::fs::read(&published).unwrap_or_default()
    );
}

#[test]
fn a_large_hour_is_split_by_size_and_a_republish_keeps_its_parts() {
    let dir = tempdir();
    let a: Vec<R> = (0..40_000)
        .map(|i| {
            r(
                &format!("s/{:03}", i % 50),
                i / 50,
                "a",
                1,
                (i * 7919 % 10007) as f64,
            )
        })
        .collect();
    let x = landing(dir.path(), "x.parquet", &a);
    let m = merge_into(dir.path(), &[x], Split::BySize(100_000), 64);
    assert!(m.parts.len() >= 3, "{} parts", m.parts.len());
    assert_eq!(m.boundaries.len(), m.parts.len() - 1);
    // Every row once, in order, across the parts; each part starts at its boundary.
    let mut all = Vec::new();
    for (i, p) in m.parts.iter().enumerate() {
        let rows = read(&p.path);
        if i > 0 {
            let b = &m.boundaries[i - 1];
            assert_eq!(
                (rows[0].0.as_str(), rows[0].1),
                (b.series.as_str(), b.time_ms)
            );
        }
        all.extend(rows);
    }
    assert_eq!(all, sorted_set(a.clone()));
    // Late rows below, inside and above the boundaries: the parts are the same, each with its own rows added.
    let published: Vec<PathBuf> = m
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let to = dir.path().join(format!("pub-{i}.parquet"));
            std::fs::copy(&p.path, &to).unwrap_or_else(|e| panic!("{e}"));
            to
        })
        .collect();
    let late = vec![
        r("s/000", 5_000, "late", 1, 1.0),
        r(
            &m.boundaries[0].series,
            m.boundaries[0].time_ms,
            "late",
            1,
            2.0,
        ),
        r("s/049", 5_000, "late", 1, 3.0),
    ];
    let l = landing(dir.path(), "late.parquet", &late);
    let mut inputs = published.clone();
    inputs.push(l);
    let again = merge_into(dir.path(), &inputs, Split::Fixed(m.boundaries.clone()), 64);
    assert_eq!(again.parts.len(), m.parts.len());
    assert_eq!(again.rows, 40_003);
    for (i, p) in again.parts.iter().enumerate() {
        let before = read(&published[i]);
        let now = read(&p.path);
        let added: Vec<R> = now
            .iter()
            .filter(|x| !before.contains(x))
            .cloned()
            .collect();
        assert!(before.iter().all(|x| now.contains(x)), "part {i} lost rows");
        for x in &added {
            let part_of = m
                .boundaries
                .iter()
                .filter(|b| (x.0.as_str(), x.1) >= (b.series.as_str(), b.time_ms))
                .count();
            assert_eq!(part_of, i, "{x:?} in part {i}");
        }
    }
}

#[test]
fn rounds_keep_an_intermediate_file_passed_on_alone() {
    // Six files with a fan-in of two: round 0 makes three intermediate files, round 1 merges two and passes the
    // third on alone; it must survive until the final merge reads it.
    let dir = tempdir();
    let inputs: Vec<PathBuf> = (0..6)
        .map(|f| {
            landing(
                dir.path(),
                &format!("in-{f}.parquet"),
                &[r("s", f, "a", 1, 1.0)],
            )
        })
        .collect();
    let m = merge_into(dir.path(), &inputs, Split::BySize(u64::MAX), 2);
    assert_eq!((m.input_rows, m.rows), (6, 6));
    // And the intermediate files are gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|n| !n.to_string_lossy().starts_with("round-")),
        "{left:?}"
    );
}

#[test]
fn empty_parts_of_fixed_boundaries_are_written() {
    let dir = tempdir();
    let x = landing(dir.path(), "x.parquet", &[r("a", 1, "a", 1, 1.0)]);
    let b = |s: &str| Boundary {
        series: s.into(),
        time_ms: 0,
    };
    let m = merge_into(dir.path(), &[x], Split::Fixed(vec![b("m"), b("z")]), 64);
    assert_eq!(
        m.parts.iter().map(|p| p.rows).collect::<Vec<_>>(),
        vec![1, 0, 0]
    );
    assert!(read(&m.parts[2].path).is_empty());
}

#[test]
fn a_file_that_is_not_bronze_is_refused_by_name() {
    let dir = tempdir();
    let x = landing(dir.path(), "x.parquet", &[r("a", 1, "a", 1, 1.0)]);
    let junk = dir.path().join("junk.parquet");
    std::fs::write(&junk, b"not parquet").unwrap_or_else(|e| panic!("{e}"));
    let out = dir.path().join("o.parquet");
    let err = merge(
        &[x, junk],
        &move |_| out.clone(),
        Split::Fixed(Vec::new()),
        SETTINGS,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("junk.parquet"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any spread of readings (with repeats) over any number of files, merged with any fan-in: the output is
    /// the sorted set of distinct rows, every row once.
    #[test]
    fn a_merge_is_the_sorted_set_of_its_input_rows(
        files in prop::collection::vec(
            prop::collection::vec((0u8..5, 0i64..40, 0u8..3, 0u64..4, 0u8..3), 0..300),
            1..9,
        ),
        fan_in in 2usize..5,
    ) {
        let dir = tempdir();
        let mut all = Vec::new();
        let mut inputs = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let readings: Vec<R> = f
                .iter()
                .map(|(s, t, a, q, v)| r(&format!("s/{s}"), *t, &format!("a{a}"), *q, f64::from(*v)))
                .collect();
            if readings.is_empty() {
                continue;
            }
            all.extend(readings.clone());
            inputs.push(landing(dir.path(), &format!("in-{i}.parquet"), &readings));
        }
        if inputs.is_empty() {
            return Ok(());
        }
        let m = merge_into(dir.path(), &inputs, Split::BySize(u64::MAX), fan_in);
        let want = sorted_set(all.clone());
        prop_assert_eq!(m.input_rows as usize, all.len());
        prop_assert_eq!(m.rows as usize, want.len());
        prop_assert_eq!(read(&m.parts[0].path), want);
    }
}

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "fieldlink-merge-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{e}"));
    TempDir(p)
}

//! Publishing bronze hours (`fieldlink-cloud compact`, `cloud/src/compaction/`) against moto's S3 and DynamoDB and
//! a local directory, read back with pyarrow and DuckDB (`tests/python/bronze.py`).
//!
//! Landing files are written here with the cloud's own encoder (as shard commits write them) so each test
//! controls exactly which rows, repeats and hours the landing area holds; one test lands them through the whole
//! consumer (two processes reading a resend).

#![allow(clippy::unwrap_used)]

use fieldlink_cloud::parquet::partition;
use fieldlink_e2e::bronze::*;
use fieldlink_e2e::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The hours published so far, with every landed row exactly once, through repeated SIGKILLs of the compactor
/// at random moments (seeded: `FIELDLINK_COMPACTION_SEED` replays a run) while late data and resends keep
/// arriving; between kills no reader sees a row twice or loses one it saw. Then a rerun of what a crash before
/// the deletion of the inputs would leave writes byte-identical files.
#[test]
fn hours_are_published_exactly_once_through_compactor_kills_at_random_points() {
    let seed: u64 = std::env::var("FIELDLINK_COMPACTION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let kills: usize = std::env::var("FIELDLINK_COMPACTION_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    eprintln!("compactor kill test: seed {seed} ({kills} kills; replay with FIELDLINK_COMPACTION_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let (bucket, table) = ("bronze-kills", "leases-kills");
    let location = format!("s3://{bucket}/bronze");
    // Small parts, so the big hour is split and its republishes keep the boundaries. A killed compactor keeps
    // the lease until it expires: the shortest lease lets the next process take it within a second.
    let config = compactor_setup(
        dir.path(),
        &moto.endpoint,
        &location,
        table,
        Some(now_ms()),
        "max_file_mib = 1\nlease_ms = 1000",
    );
    let log = dir.path().join("compact.log");
    let taken = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("compactor lease taken")
            .count()
    };

    // Six hours of landing files from three agents, each file repeating part of the one before (resends landed
    // by two processes), and one hour large enough for several parts.
    let mut expected: BTreeSet<Id> = BTreeSet::new();
    let mut batch = 0;
    let upload = |rng_dir: &Path| {
        bronze(&[
            "upload",
            &moto.endpoint,
            bucket,
            "bronze",
            rng_dir.to_str().unwrap(),
        ])
    };
    let initial = dir.path().join("landing-0");
    let mut first_files: Vec<(PathBuf, String)> = Vec::new();
    for h in 0..6 {
        let mut prev: Vec<Id> = Vec::new();
        for f in 0..5 {
            batch += 1;
            let n = if h == 2 { 24_000 } else { 1_500 };
            let mut ids = readings(&mut rng, &format!("agent-{f}"), H0 + h, batch * 1000, n);
            expected.extend(ids.iter().cloned());
            ids.extend(prev.iter().take(300).cloned());
            let key = land(
                &initial,
                H0 + h,
                &format!("shardId-00000000000{}-{batch}", f % 2),
                &ids,
            );
            first_files.push((initial.join(&key), key));
            prev = ids;
        }
    }
    upload(&initial);

    let mut seen_before: BTreeSet<Id> = BTreeSet::new();
    let mut max_parts = 0;
    for k in 0..kills {
        // Late data for one to three hours (published or not), with repeats of rows landed before.
        let late = dir.path().join(format!("landing-{}", k + 1));
        for _ in 0..rng.usize(1..4) {
            batch += 1;
            let hour = H0 + rng.i64(0..6);
            let mut ids = readings(&mut rng, "agent-late", hour, batch * 1000, 400);
            expected.extend(ids.iter().cloned());
            // Repeats of rows of the same hour (a landing file holds the rows of its hour only).
            let old: Vec<Id> = expected
                .iter()
                .filter(|r| r.1.div_euclid(HOUR_MS) == hour)
                .step_by(97)
                .take(150)
                .cloned()
                .collect();
            ids.extend(old);
            land(&late, hour, &format!("shardId-000000000001-{batch}"), &ids);
        }
        upload(&late);
        // Killed at a random moment of its work: after it took the lease (the one it killed holds it until it
        // expires), within the next rounds.
        let delay = rng.u64(0..2500);
        let before = taken();
        let mut p = Proc::spawn("compactor", compact_cmd(&config, false), &log);
        wait_for(
            "the compactor to take the lease",
            Duration::from_secs(30),
            || (taken() > before).then_some(()),
        );
        std::thread::sleep(Duration::from_millis(delay));
        p.kill();
        let seen = read_table(&location, &moto.endpoint);
        let now: BTreeSet<Id> = seen.rows.iter().cloned().collect();
        assert_eq!(
            now.len(),
            seen.rows.len(),
            "seed {seed}, kill {k} after {delay} ms: a reader sees a row twice"
        );
        let lost: Vec<_> = seen_before.difference(&now).take(3).collect();
        assert!(
            lost.is_empty(),
            "seed {seed}, kill {k} after {delay} ms: rows a reader saw are gone: {lost:?}"
        );
        assert!(
            now.is_subset(&expected),
            "seed {seed}, kill {k}: unexpected rows"
        );
        max_parts = max_parts.max(
            seen.files
                .keys()
                .filter(|f| f.starts_with(&partition(H0 + 2)))
                .count(),
        );
        eprintln!(
            "kill {k} after {delay} ms: {} rows published in {} files, {} landing files left",
            now.len(),
            seen.files.len(),
            seen.landing_files
        );
        seen_before = now;
    }

    // A last round without a kill publishes everything.
    let out = run_ok(&mut compact_cmd(&config, true));
    assert!(out.contains("published"), "{out}");
    let seen = read_table(&location, &moto.endpoint);
    check_exactly_once(&seen.rows, &expected)
        .unwrap_or_else(|e| panic!("seed {seed}: after the last round: {e}"));
    assert_eq!(seen.landing_files, 0, "landing files left");
    let hours: BTreeSet<&str> = seen
        .files
        .keys()
        .map(|f| f.rsplit_once('/').unwrap().0)
        .collect();
    assert_eq!(hours.len(), 6, "{hours:?}");
    let parts: Vec<&String> = seen
        .files
        .keys()
        .filter(|f| f.starts_with(&partition(H0 + 2)))
        .collect();
    assert!(parts.len() >= 2, "the big hour is one file: {parts:?}");
    assert!(
        parts
            .iter()
            .all(|p| p.ends_with(".parquet") && p.contains("/part-0000")),
        "{parts:?}"
    );

    // A crash after publishing but before deleting the inputs: the first landing files are there again. The
    // rerun writes the same bytes.
    let again = dir.path().join("landing-again");
    for (path, key) in first_files.iter().step_by(3) {
        let to = again.join(key);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(path, &to).unwrap();
    }
    upload(&again);
    run_ok(&mut compact_cmd(&config, true));
    let rerun = read_table(&location, &moto.endpoint);
    assert_eq!(rerun.landing_files, 0);
    assert_eq!(
        rerun.files, seen.files,
        "a rerun over inputs already published changed the published files"
    );
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "seed {seed}: {} rows in {} files exactly once after {kills} kills ({} hours published by the killed processes, big hour in {} parts)",
        expected.len(),
        seen.files.len(),
        log.matches("hour published").count(),
        parts.len()
    );
}

/// Late data for a published hour (on a local directory): the hour's file is replaced as a whole with the old
/// rows and the late ones, each once (and a file of the layout before compaction is merged in and removed); pyarrow and DuckDB read the table with Hive partitioning, every row in the
/// partition of its time, and see neither the landing area nor the compactor's records.
#[test]
fn late_data_republishes_its_hour_and_readers_see_each_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let table = "leases-late";
    let root = dir.path().join("bronze");
    let location = root.display().to_string();
    let mut rng = fastrand::Rng::with_seed(7);
    // A live shard whose reader is past hour H0+1 plus the grace: H0 and H0+1 are closed, H0+2 is not.
    let config = compactor_setup(
        dir.path(),
        &moto.endpoint,
        &location,
        table,
        Some((H0 + 2) * HOUR_MS + 600_000),
        "grace_s = 300",
    );
    let a = readings(&mut rng, "agent-a", H0, 1000, 2000);
    let b = readings(&mut rng, "agent-b", H0 + 1, 2000, 2000);
    let open = readings(&mut rng, "agent-c", H0 + 2, 3000, 500);
    land(&root, H0, "shardId-000000000000-1", &a);
    land(&root, H0 + 1, "shardId-000000000000-2", &b);
    land(&root, H0 + 2, "shardId-000000000000-3", &open);
    // A file of the layout before compaction (one per commit, directly in the hour), repeating some rows: it is
    // merged into the hour and removed.
    let legacy_rows = readings(&mut rng, "agent-old", H0 + 1, 500, 200);
    let mut legacy = legacy_rows.clone();
    legacy.extend(b.iter().take(50).cloned());
    let legacy_key = land(&root, H0 + 1, "shardId-000000000000-0", &legacy);
    let legacy_path = root.join(legacy_key.trim_start_matches("_landing/"));
    std::fs::create_dir_all(legacy_path.parent().unwrap()).unwrap();
    std::fs::rename(root.join(&legacy_key), &legacy_path).unwrap();
    let out = run_ok(&mut compact_cmd(&config, true));
    assert!(out.contains("published 2 hours"), "{out}");
    assert!(!legacy_path.exists(), "the legacy file was not removed");
    let first = read_table(&location, "");
    let mut expected: BTreeSet<Id> = a.iter().chain(&b).chain(&legacy_rows).cloned().collect();
    check_exactly_once(&first.rows, &expected).unwrap();
    assert_eq!(
        first.files.keys().collect::<Vec<_>>(),
        vec![
            "dt=2026-03-02/hour=00/part-00000.parquet",
            "dt=2026-03-02/hour=01/part-00000.parquet"
        ]
    );
    assert_eq!(
        (first.landing_files, first.landing_rows),
        (1, 500),
        "the open hour waits"
    );

    // Late readings for hour 00 (an agent offline since), with a resend of rows already published.
    let late = readings(&mut rng, "agent-late", H0, 9000, 300);
    let mut with_repeats = late.clone();
    with_repeats.extend(a.iter().take(100).cloned());
    land(&root, H0, "shardId-000000000001-9", &with_repeats);
    let out = run_ok(&mut compact_cmd(&config, true));
    assert!(out.contains("published 1 hours"), "{out}");
    let second = read_table(&location, "");
    expected.extend(late.iter().cloned());
    check_exactly_once(&second.rows, &expected).unwrap();
    assert_eq!(second.files.len(), 2, "{:?}", second.files);
    assert_ne!(
        second.files["dt=2026-03-02/hour=00/part-00000.parquet"],
        first.files["dt=2026-03-02/hour=00/part-00000.parquet"],
        "hour 00 was not republished"
    );
    assert_eq!(
        second.files["dt=2026-03-02/hour=01/part-00000.parquet"],
        first.files["dt=2026-03-02/hour=01/part-00000.parquet"],
        "hour 01 had no late data and must not change"
    );

    // Independent readers with Hive partitioning.
    let v: serde_json::Value =
        serde_json::from_str(&bronze(&["readers", root.to_str().unwrap()])).unwrap();
    for reader in ["pyarrow", "duckdb"] {
        let r = &v[reader];
        assert_eq!(r["rows"], expected.len(), "{reader}: {r}");
        assert_eq!(r["distinct"], expected.len(), "{reader}: {r}");
        assert_eq!(r["wrong_partition"], 0, "{reader}: {r}");
        assert_eq!(r["files"], 2, "{reader}: {r}");
    }
    eprintln!("readers: {v}");
}

/// A batch an agent resent lands twice when two processes read its copies (the resend memory is per process);
/// the published hour holds it once, and the compactor counts the repeats it dropped.
#[test]
fn a_resend_read_by_two_processes_collapses_to_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let stream = "two-readers";
    let moto = Moto::start(dir.path());
    moto.create(stream, 2, CLOUD_DB, CLOUD_TABLE, CLOUD_BUCKET);
    // No warm-up: each process knows only what it landed itself.
    let a = Cloud::start(dir.path(), "a", &moto.endpoint, stream, "");
    let b = Cloud::start(dir.path(), "b", &moto.endpoint, stream, "");
    wait_for(
        "each process to hold one shard",
        Duration::from_secs(30),
        || {
            (a.metric("fieldlink_cloud_leases_held") == 1.0
                && b.metric("fieldlink_cloud_leases_held") == 1.0)
                .then_some(())
        },
    );
    let t0 = now_ms() - 600_000;
    let rows: Vec<(String, i64, f64)> = (0..400)
        .map(|i| (format!("site/dev/m{}", i % 4), t0 + i, i as f64))
        .collect();
    let batch = batch_of(&rows, "agent-resend", 1);
    let data = fieldlink_proto::encode(&batch, 3).unwrap();
    let hex: String = data.iter().map(|x| format!("{x:02x}")).collect();
    // The same record on both shards (explicit hash keys at both ends of the range).
    let file = dir.path().join("records.jsonl");
    std::fs::write(
        &file,
        format!(
            "{{\"pk\": \"agent-resend\", \"hex\": \"{hex}\", \"hash\": \"0\"}}\n{{\"pk\": \"agent-resend\", \"hex\": \"{hex}\", \"hash\": \"{}\"}}\n",
            u128::MAX
        ),
    )
    .unwrap();
    run_python(&[
        script("put_records.py").to_str().unwrap(),
        &moto.endpoint,
        stream,
        file.to_str().unwrap(),
    ]);
    wait_for(
        "both processes to land the batch",
        Duration::from_secs(60),
        || {
            (a.metric("fieldlink_cloud_batches_landed_total") == 1.0
                && b.metric("fieldlink_cloud_batches_landed_total") == 1.0)
                .then_some(())
        },
    );
    let dropped = || {
        a.metric("fieldlink_compaction_duplicates_dropped_total")
            + b.metric("fieldlink_compaction_duplicates_dropped_total")
    };
    let v = wait_for(
        "the hour published with the repeats dropped",
        Duration::from_secs(60),
        || {
            let v = landed(&moto, stream);
            (v["landing_files"].as_array()?.is_empty() && dropped() == 400.0).then_some(v)
        },
    );
    let expected = counted(rows.iter().map(|(s, t, x)| (s.clone(), *t, x.to_bits())));
    let got = counted(landed_rows(&v, "parquet"));
    assert!(
        got == expected,
        "{}",
        describe_difference("published", &expected, &got)
    );
    assert_eq!(a.metric("fieldlink_cloud_batches_duplicate_total"), 0.0);
    assert_eq!(b.metric("fieldlink_cloud_batches_duplicate_total"), 0.0);
}

/// An hour several times larger than the merge's memory cap is published with the process's peak memory under
/// the cap (merging in rounds), every row once.
#[test]
fn memory_stays_bounded_on_an_hour_larger_than_the_cap() {
    let files: usize = std::env::var("FIELDLINK_COMPACTION_BIG_FILES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let per_file = 50_000;
    let cap_mib = 96;
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let table = "leases-big";
    let root = dir.path().join("bronze");
    let config = compactor_setup(
        dir.path(),
        &moto.endpoint,
        &root.display().to_string(),
        table,
        None,
        &format!("max_memory_mib = {cap_mib}"),
    );
    let (raw_bytes, _) = land_big_hour(&root, files, per_file);
    let rows = (files * per_file) as u64;
    assert!(
        raw_bytes > 2 * cap_mib * 1024 * 1024,
        "the hour ({raw_bytes} bytes decoded) must be well above the cap"
    );
    let log = dir.path().join("compact.log");
    let t = Instant::now();
    let mut p = Proc::spawn("compactor", compact_cmd(&config, true), &log);
    p.wait(Duration::from_secs(600));
    let took = t.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap();
    let peak_kib: u64 = text
        .lines()
        .find(|l| l.contains("compaction round"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("peak_rss_kib="))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no round logged:\n{text}"));
    let seen = read_table(&root.display().to_string(), "");
    assert_eq!(seen.rows.len() as u64, rows);
    let distinct: BTreeSet<&Id> = seen.rows.iter().collect();
    assert_eq!(distinct.len() as u64, rows, "a row twice in the hour");
    assert_eq!(seen.landing_files, 0);
    eprintln!(
        "hour of {rows} rows in {files} files ({:.0} MiB decoded, {} MiB published): published in {took:.1} s ({:.0} rows/s with start-up), peak RSS {} MiB, cap {cap_mib} MiB",
        raw_bytes as f64 / 1048576.0,
        std::fs::metadata(root.join(format!("{}/part-00000.parquet", partition(H0))))
            .map(|m| m.len() / 1048576)
            .unwrap_or(0),
        rows as f64 / took,
        peak_kib / 1024
    );
    assert!(
        peak_kib < cap_mib * 1024,
        "peak RSS {peak_kib} KiB above the cap of {cap_mib} MiB"
    );
}

/// Two compactors on one landing area: only the holder of the compactor lease publishes; SIGKILLed, it is
/// replaced by the other within a few lease durations, and every row is published once.
#[test]
fn one_compactor_works_at_a_time_and_another_takes_over_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let table = "leases-two";
    let location = "s3://bronze-two/bronze".to_owned();
    shard_lease(&moto.endpoint, table, None);
    let mut rng = fastrand::Rng::with_seed(5);
    let mut expected: BTreeSet<Id> = BTreeSet::new();
    let mut batch = 0;
    let mut land_some = |name: &str| {
        let d = dir.path().join(name);
        for h in 0..3 {
            batch += 1;
            let ids = readings(&mut rng, name, H0 + h, batch * 1000, 500);
            expected.extend(ids.iter().cloned());
            land(&d, H0 + h, &format!("shardId-000000000000-{batch}"), &ids);
        }
        bronze(&[
            "upload",
            &moto.endpoint,
            "bronze-two",
            "bronze",
            d.to_str().unwrap(),
        ]);
    };
    land_some("first");
    let start = |name: &str| start_compactor(dir.path(), &moto.endpoint, &location, table, name);
    let leader = |port: u16| compactor_metric(port, "fieldlink_compaction_leader");
    let published =
        |port: u16| compactor_metric(port, "fieldlink_compaction_hours_published_total");
    let (a, pa) = start("c1");
    let (b, pb) = start("c2");
    wait_for(
        "one compactor to publish the three hours",
        Duration::from_secs(60),
        || (published(pa) + published(pb) == 3.0).then_some(()),
    );
    // For several lease rounds: never two compactors that may write.
    let mut led = 0;
    for _ in 0..20 {
        let n = leader(pa) + leader(pb);
        assert!(n <= 1.0, "two leaders:\n{}\n{}", a.log_text(), b.log_text());
        led += n as usize;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(led > 0, "no leader");
    // The one that published is the holder; the other published nothing.
    let (mut held, other, other_port) = if published(pa) == 3.0 {
        (a, b, pb)
    } else {
        (b, a, pa)
    };
    assert_eq!(published(other_port), 0.0);
    held.kill();
    let killed = Instant::now();
    land_some("second");
    wait_for(
        "the other compactor to take over and publish",
        Duration::from_secs(60),
        || (published(other_port) == 3.0).then_some(()),
    );
    eprintln!(
        "the second compactor published {:?} after the first was killed (lease 3 s)",
        killed.elapsed()
    );
    let seen = read_table(&location, &moto.endpoint);
    check_exactly_once(&seen.rows, &expected).unwrap();
    assert_eq!(seen.landing_files, 0);
    let mut other = other;
    other.terminate(Duration::from_secs(30));
}

/// A compactor whose upload of a part hangs while it can no longer renew its lease (DynamoDB unreachable, S3
/// not: the fault proxy holds the upload and from then on resets its DynamoDB calls) loses the lease to another,
/// which publishes the hour with a landing file that arrived meanwhile and deletes the landing files. When the
/// held upload finally reaches S3, it must not replace the newer part: it was started in time (the fencing by
/// time let it through), so only S3's conditional write stops it. Twice: at the hour's first publication
/// (`If-None-Match: *`) and at a republish for late data (`If-Match` on the ETag the stale round read). Before
/// that, the late upload overwrote the part and the rows of the file that arrived meanwhile were lost.
#[test]
fn a_compactor_whose_upload_outlives_its_lease_cannot_overwrite_the_next_ones_part() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let proxy = FaultProxy::start(dir.path(), &moto.endpoint);
    let (bucket, table) = ("bronze-late", "leases-late");
    let location = format!("s3://{bucket}/bronze");
    shard_lease(&moto.endpoint, table, None);
    let mut rng = fastrand::Rng::with_seed(9);
    let mut expected: BTreeSet<Id> = BTreeSet::new();
    let mut land_one = |name: &str, seq0: u64, expected: &mut BTreeSet<Id>| {
        let d = dir.path().join(name);
        let ids = readings(&mut rng, name, H0, seq0, 500);
        expected.extend(ids.iter().cloned());
        land(&d, H0, &format!("shardId-000000000000-{seq0}"), &ids);
        bronze(&[
            "upload",
            &moto.endpoint,
            bucket,
            "bronze",
            d.to_str().unwrap(),
        ]);
    };
    let mut published_before = None;
    for (round, what) in ["first publication", "republish"].into_iter().enumerate() {
        let seq0 = 1000 * (2 * round as u64 + 1);
        land_one(&format!("read-{round}"), seq0, &mut expected);
        proxy.set("hold_parts=1&dynamodb_down=0");
        let stale = format!("stale-{round}");
        let (mut a, _) = start_compactor(dir.path(), &proxy.endpoint, &location, table, &stale);
        wait_for(
            &format!("{what}: the first compactor's upload to be held"),
            Duration::from_secs(60),
            || (proxy.stats()["held_parts"].as_u64() > Some(round as u64)).then_some(()),
        );
        // Lands after the first compactor read its inputs.
        land_one(&format!("meanwhile-{round}"), seq0 + 1000, &mut expected);
        let next = format!("next-{round}");
        let (mut b, pb) = start_compactor(dir.path(), &moto.endpoint, &location, table, &next);
        wait_for(
            &format!("{what}: the second compactor to take over and publish the hour"),
            Duration::from_secs(60),
            || {
                (compactor_metric(pb, "fieldlink_compaction_hours_published_total") >= 1.0)
                    .then_some(())
            },
        );
        let before = read_table(&location, &moto.endpoint);
        check_exactly_once(&before.rows, &expected).unwrap();
        assert_eq!(before.landing_files, 0);
        if let Some(earlier) = &published_before {
            assert_ne!(
                &before.files, earlier,
                "{what}: the hour was not republished"
            );
        }

        let held = proxy.stats()["held_parts"].as_u64().unwrap();
        proxy.set("release_parts=1");
        let answers = wait_for(
            &format!("{what}: the held uploads to reach S3"),
            Duration::from_secs(30),
            || {
                let stats = proxy.stats();
                (stats["released_parts"].as_u64() >= Some(held))
                    .then(|| stats["released_answers"].clone())
            },
        );
        // Let the first compactor see its answers, and a round of the second pass.
        proxy.set("dynamodb_down=0");
        std::thread::sleep(Duration::from_secs(3));
        let after = read_table(&location, &moto.endpoint);
        check_exactly_once(&after.rows, &expected)
            .map_err(|e| {
                format!(
                    "{what}: {e} (S3 answered the late uploads {answers})\n{}",
                    a.log_text()
                )
            })
            .unwrap();
        assert_eq!(
            after.files, before.files,
            "{what}: the published part changed"
        );
        assert!(
            answers.as_array().unwrap().iter().all(|s| s == 412),
            "{what}: a late upload was not refused: S3 answered {answers}\n{}",
            a.log_text()
        );
        if round == 0 {
            // The first publication claimed the hour's boundaries record, one part or not: a late record from
            // the stale round (made of fewer rows) could not land beside parts it does not match.
            use fieldlink_cloud::store::{Location, Store};
            let (rt, sdk) = moto_sdk(&moto);
            let store = Store::open(&Location::parse(&location).unwrap(), &sdk, true);
            let key = fieldlink_cloud::compaction::plan::boundaries_key(H0);
            let record = rt.block_on(store.get(&key)).unwrap();
            assert_eq!(
                record.as_deref(),
                Some(&br#"{"boundaries":[]}"#[..]),
                "the boundaries record of a one-part hour"
            );
        }
        // Both stop (the holder releases the lease), so the next round's compactors start afresh.
        a.terminate(Duration::from_secs(30));
        b.terminate(Duration::from_secs(30));
        published_before = Some(after.files);
    }
}

/// A published file larger than one upload part goes to S3 in parts (each one request, within one attempt
/// timeout: one `PutObject` of a 512 MiB hour had to upload at 51 MiB/s within the default 10 s attempt), appears
/// whole and byte-identical; a fence refusing halfway aborts the upload and leaves no object and no unfinished
/// upload behind.
#[test]
fn a_file_larger_than_one_part_is_uploaded_in_parts_and_a_fenced_upload_leaves_nothing() {
    use fieldlink_cloud::store::{Expect, Location, Store, UPLOAD_PART_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    moto.create("unused-mp", 1, "unused-db", "unused-table", "bucket-mp");
    let (rt, sdk) = moto_sdk(&moto);
    let store = Store::open(&Location::parse("s3://bucket-mp/p").unwrap(), &sdk, true);
    // Two whole parts and a short third.
    let size = 2 * UPLOAD_PART_BYTES as usize + 12_345;
    let bytes: Vec<u8> = (0..size).map(|_| fastrand::u8(..)).collect();
    let src = dir.path().join("big.bin");
    std::fs::write(&src, &bytes).unwrap();

    assert!(rt
        .block_on(store.put_file("big.bin", &src, &Expect::Absent, &|| true))
        .unwrap());
    let back = dir.path().join("back.bin");
    let got = rt.block_on(store.get_to_file("big.bin", &back)).unwrap();
    assert_eq!(got.bytes as usize, size);
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "the object differs from the file"
    );
    let s3 = |code: &str| -> String {
        let mut cmd = std::process::Command::new(python());
        cmd.args([
            "-c",
            &format!(
                "import boto3,json,sys; s3=boto3.client('s3', endpoint_url=sys.argv[1]); {code}"
            ),
        ])
        .arg(&moto.endpoint);
        aws_env(&mut cmd);
        String::from_utf8(cmd.output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned()
    };
    let etag = s3("print(s3.head_object(Bucket='bucket-mp', Key='p/big.bin')['ETag'])");
    assert!(etag.ends_with("-3\""), "not a 3-part upload: ETag {etag}");

    // The fence allows the upload's creation and its first part, then refuses.
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let may_write = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2;
    assert!(!rt
        .block_on(store.put_file("fenced.bin", &src, &Expect::Any, &may_write))
        .unwrap());
    assert_eq!(rt.block_on(store.get("fenced.bin")).unwrap(), None);
    // Refused right before CompleteMultipartUpload (creation and three parts allowed): nothing appears either.
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let may_write = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 4;
    assert!(!rt
        .block_on(store.put_file("fenced-late.bin", &src, &Expect::Any, &may_write))
        .unwrap());
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 5);
    assert_eq!(rt.block_on(store.get("fenced-late.bin")).unwrap(), None);
    let uploads =
        s3("print(len(s3.list_multipart_uploads(Bucket='bucket-mp').get('Uploads', [])))");
    assert_eq!(uploads, "0", "an aborted upload was left behind");
}

/// Writes conditional on the version read: a part (one `PutObject`, or a multipart upload completed in one step)
/// replaces only the object of the ETag given, or is created only where there is none; otherwise the store
/// answers `Changed` and the object stays as it was, with no unfinished upload left. moto checks `If-Match` on
/// PutObject and `If-None-Match` on both, not `If-Match` on CompleteMultipartUpload: the fault proxy checks that
/// one as S3 does.
#[test]
fn conditional_writes_replace_only_the_version_read() {
    use fieldlink_cloud::store::{Expect, Location, Store, StoreError, UPLOAD_PART_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let proxy = FaultProxy::start(dir.path(), &moto.endpoint);
    moto.create("unused-cw", 1, "unused-db", "unused-table", "bucket-cw");
    let (rt, sdk) = moto_sdk(&moto);
    let sdk = sdk
        .into_builder()
        .endpoint_url(proxy.endpoint.clone())
        .build();
    let store = Store::open(&Location::parse("s3://bucket-cw/p").unwrap(), &sdk, true);
    let write = |name: &str, size: usize| {
        let bytes: Vec<u8> = (0..size).map(|_| fastrand::u8(..)).collect();
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    };
    let read = |key: &str| {
        let back = dir.path().join("back.bin");
        let got = rt.block_on(store.get_to_file(key, &back)).unwrap();
        (std::fs::read(&back).unwrap(), got.etag.unwrap())
    };
    let changed = |r: Result<bool, StoreError>| matches!(r, Err(StoreError::Changed { .. }));
    let gone = Expect::ETag("\"0123456789abcdef0123456789abcdef\"".into());
    for (key, size) in [
        ("small.bin", 1000),
        ("large.bin", UPLOAD_PART_BYTES as usize + 777),
    ] {
        let (first, first_bytes) = write("first.bin", size);
        let (second, second_bytes) = write("second.bin", size);
        let put =
            |src: &Path, expect: &Expect| rt.block_on(store.put_file(key, src, expect, &|| true));
        // If-Match on a key that is not there.
        assert!(changed(put(&first, &gone)), "{key}: written over nothing");
        assert!(put(&first, &Expect::Absent).unwrap());
        let (back, etag) = read(key);
        assert!(back == first_bytes);
        // Created only where there is none; replaced only as read.
        assert!(
            changed(put(&second, &Expect::Absent)),
            "{key}: created twice"
        );
        assert!(
            changed(put(&second, &gone)),
            "{key}: replaced another version"
        );
        assert!(
            read(key).0 == first_bytes,
            "{key}: a refused write changed the object"
        );
        assert!(put(&second, &Expect::ETag(etag.clone())).unwrap());
        assert!(read(key).0 == second_bytes);
        // The ETag read before is stale now.
        assert!(
            changed(put(&first, &Expect::ETag(etag))),
            "{key}: a stale ETag replaced it"
        );
        assert!(read(key).0 == second_bytes);
    }
    assert!(proxy.stats()["multipart_if_match_refused"].as_u64() >= Some(2));
    let mut cmd = std::process::Command::new(python());
    cmd.args([
        "-c",
        "import boto3,sys; s3=boto3.client('s3', endpoint_url=sys.argv[1]); print(len(s3.list_multipart_uploads(Bucket='bucket-cw').get('Uploads', [])))",
        &moto.endpoint,
    ]);
    aws_env(&mut cmd);
    let uploads = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
    assert_eq!(uploads.trim(), "0", "a refused upload was left behind");
}

/// A compactor that cannot write its `work_dir` (a read-only root file system, a volume not mounted: here the
/// path is a file) publishes nothing; before December 2026 only its log and a counter said so, `/health` stayed ok.
/// Now `/health` fails for `compaction` after three failed rounds in a row, naming the error, and recovers once
/// the directory can be made; the hours are then published with every row once.
#[test]
fn a_compactor_that_cannot_write_its_work_dir_fails_health_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let table = "leases-ro";
    let location = "s3://bronze-ro/bronze".to_owned();
    shard_lease(&moto.endpoint, table, None);
    let mut rng = fastrand::Rng::with_seed(11);
    let landed = dir.path().join("landed");
    let mut expected: BTreeSet<Id> = BTreeSet::new();
    for h in 0..2 {
        let ids = readings(&mut rng, "ro", H0 + h, 1000 * (h as u64 + 1), 300);
        expected.extend(ids.iter().cloned());
        land(&landed, H0 + h, &format!("shardId-000000000000-{h}"), &ids);
    }
    bronze(&[
        "upload",
        &moto.endpoint,
        "bronze-ro",
        "bronze",
        landed.to_str().unwrap(),
    ]);
    // start_compactor's work_dir is <dir>/<name>: a file there cannot be made a directory.
    let blocker = dir.path().join("ro");
    std::fs::write(&blocker, "not a directory").unwrap();
    let (mut c, port) = start_compactor(dir.path(), &moto.endpoint, &location, table, "ro");
    let health = || http_status(port, "/health");
    let failing = wait_for(
        "/health to fail for compaction",
        Duration::from_secs(60),
        || health().filter(|(status, body)| *status == 503 && body.contains("compaction: FAIL")),
    );
    assert!(
        failing.1.contains("rounds in a row failed") && failing.1.contains("landing files kept"),
        "{failing:?}"
    );
    assert_eq!(
        compactor_metric(port, "fieldlink_compaction_hours_published_total"),
        0.0
    );
    std::fs::remove_file(&blocker).unwrap();
    wait_for("the two hours published", Duration::from_secs(60), || {
        (compactor_metric(port, "fieldlink_compaction_hours_published_total") == 2.0).then_some(())
    });
    let ok = wait_for("/health ok again", Duration::from_secs(30), || {
        health().filter(|(status, _)| *status == 200)
    });
    assert!(ok.1.contains("compaction: ok"), "{ok:?}");
    let seen = read_table(&location, &moto.endpoint);
    check_exactly_once(&seen.rows, &expected).unwrap();
    c.terminate(Duration::from_secs(30));
    eprintln!("work_dir unwritable: {}", failing.1.trim());
}

use super::*;
use crate::order::LatePolicy;
use fieldlink_proto::decode;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::path::Path;

fn reading(key: &str, ts: i64, v: f64) -> NewReading {
    NewReading {
        series: Series::new(key).into(),
        ts_ms: ts,
        value: Value::F64(v),
        quality: Quality::Good,
    }
}

fn open(dir: &tempfile::TempDir) -> Buffer {
    open_in(dir.path())
}

fn open_in(dir: &Path) -> Buffer {
    Buffer::open(&dir.join("b.db"), Durability::Normal, "edge-1").unwrap()
}

fn rules() -> Rules {
    Rules {
        dedup_window_ms: 60_000,
        max_recent: 1024,
        late: LatePolicy::Flag,
    }
}

fn cfg(target: usize) -> BatchConfig {
    BatchConfig {
        target_record_bytes: target,
        ..BatchConfig::default()
    }
}

fn seal_all(b: &mut Buffer, enc: &mut Encoder, target: usize) -> SealReport {
    b.seal(i64::MAX, 100_000, enc, &cfg(target), rules(), 0)
        .unwrap()
}

/// `(series, ts, value bits, late)` of every reading in the pending records.
fn pending_readings(b: &mut Buffer) -> Vec<(String, i64, u64, bool)> {
    let mut out = Vec::new();
    for p in b.pending(500, usize::MAX).unwrap() {
        let batch = decode(&p.record).unwrap();
        assert_eq!(batch.seq, p.seq);
        for r in batch.readings {
            let bits = match r.value {
                Value::F64(f) => f.to_bits(),
                _ => 0,
            };
            out.push((
                batch.series[r.series as usize].key.clone(),
                r.ts_ms,
                bits,
                r.late,
            ));
        }
    }
    out
}

#[test]
fn sealed_batches_hold_exactly_the_appended_readings_in_series_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let group: Vec<_> = (0..25)
        .rev()
        .map(|i| reading(&format!("d{}/v", i % 3), i, i as f64))
        .collect();
    b.append([group.as_slice()]).unwrap();
    let r = seal_all(&mut b, &mut Encoder::new(3).unwrap(), 24 * 1024);
    assert_eq!((r.rows, r.readings), (25, 25));
    let got = pending_readings(&mut b);
    let mut expected: Vec<_> = (0..25)
        .map(|i| (format!("d{}/v", i % 3), i, (i as f64).to_bits(), false))
        .collect();
    expected.sort();
    assert_eq!(
        got, expected,
        "grouped by series (device), each in time order"
    );
    assert_eq!(b.stats().pending_readings, 25);
    assert_eq!(b.stats().unsealed_readings, 0);
}

#[test]
fn only_rows_up_to_the_ready_id_are_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    b.append([vec![reading("a/x", 1, 1.0)].as_slice()]).unwrap();
    let first = b.last_row_id();
    b.append([vec![reading("a/x", 2, 2.0)].as_slice()]).unwrap();
    let r = b
        .seal(
            first,
            1000,
            &mut Encoder::new(3).unwrap(),
            &cfg(1024),
            rules(),
            0,
        )
        .unwrap();
    assert_eq!(r.rows, 1);
    assert_eq!(b.stats().unsealed_readings, 1);
}

#[test]
fn duplicates_are_dropped_across_reopen_and_late_readings_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let mut enc = Encoder::new(3).unwrap();
    {
        let mut b = open(&dir);
        b.append([vec![reading("a/x", 100, 1.0), reading("a/x", 200, 2.0)].as_slice()])
            .unwrap();
        seal_all(&mut b, &mut enc, 1024);
    }
    let mut b = open(&dir);
    // A redelivery of both, one new reading and one late reading.
    b.append([vec![
        reading("a/x", 100, 1.0),
        reading("a/x", 200, 2.0),
        reading("a/x", 300, 3.0),
        reading("a/x", 150, 9.0),
    ]
    .as_slice()])
        .unwrap();
    seal_all(&mut b, &mut enc, 1024);
    let l = b.ledger();
    assert_eq!((l.deduplicated, l.late_flagged), (2, 1));
    let got = pending_readings(&mut b);
    assert!(got.contains(&("a/x".into(), 150, 9f64.to_bits(), true)));
    assert_eq!(got.len(), 4);
}

/// `(rows, bytes)` of `state_log`, and the seals whose whole states `series_state` holds, by series key.
fn stored_state(b: &Buffer) -> (i64, i64, Vec<(String, i64)>) {
    let (rows, bytes) = b
        .conn
        .query_row(
            "SELECT count(*), coalesce(sum(length(entries)), 0) FROM state_log",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let whole = b
        .conn
        .prepare(
            "SELECT key, log_seal FROM series_state JOIN series ON id = series_id ORDER BY key",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    (rows, bytes, whole)
}

/// Appends one reading and seals it.
fn seal_one(b: &mut Buffer, enc: &mut Encoder, key: &str, ts: i64, v: f64) {
    b.append([vec![reading(key, ts, v)].as_slice()]).unwrap();
    seal_all(b, enc, 1024);
}

/// 1,000 readings of history within the dedup window for each of `keys`, sealed (stored whole).
fn with_history(b: &mut Buffer, enc: &mut Encoder, keys: &[&str]) {
    for key in keys {
        let history: Vec<NewReading> = (0..1000).map(|i| reading(key, i, 1.0)).collect();
        b.append([history.as_slice()]).unwrap();
    }
    seal_all(b, enc, 1024);
}

/// A buffer with 1,000 readings of `a/x` stored whole (seal 1), then a reading of `a/x` at 1000 committed as a
/// delta (seal 2).
fn with_a_delta() -> (tempfile::TempDir, Encoder, Buffer) {
    let dir = tempfile::tempdir().unwrap();
    let (enc, b) = with_a_delta_in(dir.path());
    (dir, enc, b)
}

/// [`with_a_delta`] in the directory `dir`.
fn with_a_delta_in(dir: &Path) -> (Encoder, Buffer) {
    let mut enc = Encoder::new(3).unwrap();
    let mut b = open_in(dir);
    with_history(&mut b, &mut enc, &["a/x"]);
    seal_one(&mut b, &mut enc, "a/x", 1000, 2.0);
    (enc, b)
}

#[test]
fn a_seal_stores_what_the_dedup_states_remembered_since_in_one_row_and_a_reopen_dedups_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut enc = Encoder::new(3).unwrap();
    let mut b = open(&dir);
    with_history(&mut b, &mut enc, &["a/x", "a/y"]);
    // All of it is new: stored whole, by seal 1.
    assert_eq!(
        stored_state(&b),
        (0, 0, vec![("a/x".into(), 1), ("a/y".into(), 1)])
    );
    // One new reading per series and seal: one row per seal holding both series' deltas (26 bytes each: series
    // id, length, newest time, one (ts, identity) pair), not their 16 KB states again.
    for i in 0..STATE_LOG_SEALS as i64 {
        b.append([vec![reading("a/x", 1000 + i, 2.0), reading("a/y", 1000 + i, 2.0)].as_slice()])
            .unwrap();
        seal_all(&mut b, &mut enc, 1024);
    }
    let rows = STATE_LOG_SEALS as i64;
    assert_eq!(
        stored_state(&b),
        (
            rows,
            2 * 26 * rows,
            vec![("a/x".into(), 1), ("a/y".into(), 1)]
        )
    );
    // Seal 34: both oldest deltas (seal 2) are STATE_LOG_SEALS seals old: the states are stored whole and the row
    // of seal 2 goes (the other rows hold deltas no state needs; they go as they age).
    b.append([vec![reading("a/x", 5000, 3.0), reading("a/y", 5000, 3.0)].as_slice()])
        .unwrap();
    seal_all(&mut b, &mut enc, 1024);
    assert_eq!(
        stored_state(&b),
        (
            rows - 1,
            2 * 26 * (rows - 1),
            vec![("a/x".into(), 34), ("a/y".into(), 34)]
        )
    );
    seal_one(&mut b, &mut enc, "a/x", 5001, 4.0);
    assert_eq!(stored_state(&b).0, rows - 1, "row 35 in, row 3 out");
    let sealed = b.ledger().appended - b.ledger().deduplicated;
    drop(b);

    // Reopened (nothing cached): redeliveries of a reading stored whole, one stored whole after deltas, one from
    // a delta before the whole state and one from the delta after it are all recognised; a new reading is not.
    let mut b = open(&dir);
    b.append([vec![
        reading("a/x", 500, 1.0),
        reading("a/x", 1010, 2.0),
        reading("a/x", 5000, 3.0),
        reading("a/x", 5001, 4.0),
        reading("a/x", 5002, 5.0),
    ]
    .as_slice()])
        .unwrap();
    seal_all(&mut b, &mut enc, 1024);
    assert_eq!(b.ledger().deduplicated, 4);
    assert_eq!(sealed, 2000 + 2 * STATE_LOG_SEALS + 3);
}

#[test]
fn a_quiet_series_is_stored_whole_before_its_delta_leaves_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut enc = Encoder::new(3).unwrap();
    let mut b = open(&dir);
    with_history(&mut b, &mut enc, &["quiet/x", "busy/x"]);
    // Seal 2: the quiet series' last delta. Then only the busy series, long past the log's span.
    seal_one(&mut b, &mut enc, "quiet/x", 1000, 2.0);
    for i in 0..2 * STATE_LOG_SEALS as i64 {
        seal_one(&mut b, &mut enc, "busy/x", 1000 + i, 2.0);
        let (rows, ..) = stored_state(&b);
        assert!(rows <= STATE_LOG_SEALS as i64, "{rows} rows");
    }
    // The quiet series was stored whole by the seal its delta aged in (2 + STATE_LOG_SEALS), though it was not
    // involved; reopened, its delta's reading is still recognised.
    let whole = stored_state(&b).2;
    assert_eq!(whole[1], ("quiet/x".into(), 2 + STATE_LOG_SEALS as i64));
    drop(b);
    let mut b = open(&dir);
    b.append([vec![reading("quiet/x", 1000, 2.0), reading("quiet/x", 999, 1.0)].as_slice()])
        .unwrap();
    seal_all(&mut b, &mut enc, 1024);
    assert_eq!(b.ledger().deduplicated, 2);
}

#[test]
fn a_series_that_gets_only_redeliveries_is_stored_whole_before_its_delta_leaves_the_log() {
    let (dir, mut enc, mut b) = with_a_delta();
    // Seals 3 to 34: only the redelivery of seal 2's delta, so the seal involves the state but remembers nothing.
    for _ in 0..STATE_LOG_SEALS {
        seal_one(&mut b, &mut enc, "a/x", 1000, 2.0);
    }
    assert_eq!(b.ledger().deduplicated, STATE_LOG_SEALS);
    assert_eq!(
        stored_state(&b).2,
        vec![("a/x".into(), 2 + STATE_LOG_SEALS as i64)]
    );
    drop(b);
    let mut b = open(&dir);
    seal_one(&mut b, &mut enc, "a/x", 1000, 2.0);
    assert_eq!(b.ledger().deduplicated, 1);
}

#[test]
fn a_failed_seal_gives_back_the_states_with_their_deltas() {
    let (_dir, mut enc, mut b) = with_a_delta();
    assert_eq!(stored_state(&b).0, 1);
    // A seal that fails: the state it took out (and changed) is dropped; the committed one comes back from its
    // whole row and its delta, so the redelivered reading of seal 2 is still a duplicate afterwards.
    b.append([vec![reading("a/x", 1001, 3.0)].as_slice()])
        .unwrap();
    b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
    assert!(b
        .seal(i64::MAX, 100_000, &mut enc, &cfg(1024), rules(), 0)
        .is_err());
    seal_one(&mut b, &mut enc, "a/x", 1000, 2.0);
    let l = b.ledger();
    assert_eq!((l.deduplicated, l.appended - l.deduplicated), (1, 1002));
}

#[test]
fn under_normal_durability_a_seal_commits_with_fsync_and_the_rest_without() {
    let (_dir, mut enc, mut b) = with_a_delta();
    let synchronous = |b: &Buffer| -> i64 {
        b.conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(synchronous(&b), 1, "normal: NORMAL between seals");
    seal_one(&mut b, &mut enc, "a/x", 2000, 1.0);
    assert_eq!(b.committed_with, 2, "the seal committed with FULL");
    assert_eq!(synchronous(&b), 1, "NORMAL again after the seal");
    b.append([vec![reading("a/x", 2001, 1.0)].as_slice()])
        .unwrap();
    b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
    assert!(b
        .seal(i64::MAX, 100_000, &mut enc, &cfg(1024), rules(), 0)
        .is_err());
    assert_eq!(synchronous(&b), 1, "NORMAL again after a failed seal");
}

/// Set in the child process of the test below: the buffer directory it works in and dies in.
const KILLED_CHILD: &str = "FIELDLINK_TEST_KILLED_WITH_A_PART_OUT";

/// The child's half of the test below: a buffer with a delta and a part out (the seal thread done with it,
/// nothing committed), then `kill -9` of its own process. Never returns.
fn killed_with_a_part_out(dir: &Path) -> ! {
    let (mut enc, mut b) = with_a_delta_in(dir);
    let part: Vec<NewReading> = (1001..1011)
        .map(|t| reading("a/x", t, 3.0))
        .chain((0..5).map(|t| reading("b/y", t, 1.0)))
        .collect();
    b.append([part.as_slice()]).unwrap();
    let seal::Begun::Job(job) = b
        .seal_begin(i64::MAX, 100_000, &cfg(1024), rules(), 0)
        .unwrap()
    else {
        panic!("the part holds readings")
    };
    let _sealed = job.run(&mut enc);
    use rustix::process::{getpid, kill_process, Signal};
    let res = kill_process(getpid(), Signal::KILL);
    panic!("kill -9 of itself failed: {res:?}");
}

/// Runs this test binary again with `args` and the environment variable `env`, and waits for it. Under qemu-user
/// (cargo's runner for the ARM targets, `.cargo/config.toml`) the host cannot execute the binary itself, so it goes
/// through the same emulator.
fn rerun_self(args: &[&str], env: (&str, &Path)) -> std::process::ExitStatus {
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().unwrap();
    let run = |cmd: &mut Command| {
        cmd.args(args)
            .env(env.0, env.1)
            .stdout(Stdio::null())
            .status()
    };
    match run(&mut Command::new(&exe)) {
        // An ARM binary on an x86_64 host without binfmt_misc.
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOEXEC.raw_os_error()) => {
            let qemu = format!("qemu-{}-static", std::env::consts::ARCH);
            run(Command::new(&qemu).arg(&exe)).unwrap_or_else(|e| panic!("{qemu}: {e}"))
        }
        res => res.unwrap(),
    }
}

#[test]
fn a_process_killed_with_a_part_out_seals_that_part_once_after_the_restart() {
    if let Some(dir) = std::env::var_os(KILLED_CHILD) {
        killed_with_a_part_out(Path::new(&dir));
    }
    // A real kill -9 in a child process of this test binary, while a part is out: the seal thread computed it,
    // the buffer thread had not committed it. `seal_begin` writes nothing, so nothing marks the part taken; the
    // file's commits are still in the WAL (under SQLite's 1,000-page checkpoint), so opening it here runs SQLite's
    // WAL recovery, as after a crash. The redelivery of 1000 is then caught by the log's delta.
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let status = rerun_self(
        &[
            "--exact",
            "buffer::tests::a_process_killed_with_a_part_out_seals_that_part_once_after_the_restart",
            "--nocapture",
        ],
        (KILLED_CHILD, dir.path()),
    );
    assert_eq!(
        status.signal(),
        Some(9),
        "the child died of kill -9 ({status})"
    );
    // No checkpoint ran: the database file holds less than a quarter of what the WAL does (a checkpoint would have
    // copied the child's pages into it), so the open below must recover them from the WAL.
    let len = |name: &str| std::fs::metadata(dir.path().join(name)).map_or(0, |m| m.len());
    let (db, wal) = (len("b.db"), len("b.db-wal"));
    assert!(
        4 * db < wal,
        "the child's commits are in the WAL only ({db} B in the file, {wal} B in the WAL)"
    );

    let mut enc = Encoder::new(3).unwrap();
    let mut b = open(&dir);
    b.append([vec![reading("a/x", 1000, 2.0), reading("a/x", 1005, 3.0)].as_slice()])
        .unwrap();
    seal_all(&mut b, &mut enc, 1024);
    assert_eq!(
        b.ledger().deduplicated,
        2,
        "the redeliveries are recognised"
    );
    let mut got: Vec<(String, i64)> = pending_readings(&mut b)
        .into_iter()
        .map(|(k, ts, ..)| (k, ts))
        .collect();
    got.sort();
    let mut want: Vec<(String, i64)> = (0..1011).map(|t| ("a/x".to_string(), t)).collect();
    want.extend((0..5).map(|t| ("b/y".to_string(), t)));
    assert_eq!(got, want, "every reading once, the part's too");
}

#[test]
fn a_downgrade_to_a_version_before_the_log_and_back_merges_what_each_remembered() {
    // The versions before `state_log`: one that stores whole states only (or the next one storing a state whole),
    // with `log_seal` 0, and the next one's delta, a row per series and seal in `series_state_log`.
    for older_writes_a_delta in [false, true] {
        // Seal 1 stored a/x whole (0..999), seals 2 and 3 its deltas (1000, 1003) in `state_log`.
        let (dir, mut enc, mut b) = with_a_delta();
        seal_one(&mut b, &mut enc, "a/x", 1003, 5.0);
        // The older version ran on the file: it loaded the whole row alone (without 1000 and 1003), so the
        // redelivery of 1000 was new to it (sent again, remembered), took 1001, and stored what it remembered,
        // leaving `state_log` as it was.
        let sid: i64 = b
            .conn
            .query_row("SELECT id FROM series WHERE key = 'a/x'", [], |r| r.get(0))
            .unwrap();
        let (st, _) = whole_state(&b.conn, sid).unwrap();
        let mut states: HashMap<i64, SeriesState> = [(sid, st)].into_iter().collect();
        let pending = |ts, v| crate::order::Pending {
            series: sid,
            ts_ms: ts,
            value: Value::F64(v),
            quality: Quality::Good,
        };
        let released = crate::order::release(
            vec![pending(1000, 2.0), pending(1001, 3.0)],
            &mut states,
            rules(),
        );
        if older_writes_a_delta {
            let delta = crate::order::delta_bytes(1001, &released.remembered);
            b.conn
                .execute(
                    "INSERT INTO series_state_log(series_id, n, entries) VALUES (?1, 1, ?2)",
                    params![sid, delta],
                )
                .unwrap();
        } else {
            seal::write_whole(&b.conn, sid, &states[&sid], 0).unwrap();
        }
        drop(b);

        // This version again: the older version's state (its delta folded in) and then the log's deltas. 1000 is
        // in both and counts once.
        let mut b = open(&dir);
        let why = if older_writes_a_delta {
            "its delta"
        } else {
            "its whole state"
        };
        assert_eq!(
            b.states[&sid].remembered(),
            1003,
            "0..=1001 and 1003, each once ({why})"
        );
        b.append([vec![
            reading("a/x", 5, 1.0),
            reading("a/x", 1000, 2.0),
            reading("a/x", 1001, 3.0),
            reading("a/x", 1003, 5.0),
            reading("a/x", 1002, 4.0),
        ]
        .as_slice()])
            .unwrap();
        seal_all(&mut b, &mut enc, 1024);
        assert_eq!(
            b.ledger().deduplicated,
            4,
            "the older version's and the log's readings are recognised ({why})"
        );
        let mut sent: Vec<i64> = pending_readings(&mut b)
            .into_iter()
            .map(|(_, ts, ..)| ts)
            .collect();
        sent.sort();
        let want: Vec<i64> = (0..=1000).chain([1002, 1003]).collect();
        assert_eq!(
            sent, want,
            "every reading sealed once, the new one too ({why})"
        );
    }
}

#[test]
fn deltas_an_earlier_version_left_per_series_are_folded_into_whole_states_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut enc = Encoder::new(3).unwrap();
    let mut b = open(&dir);
    with_history(&mut b, &mut enc, &["a/x"]);
    // What the version before this one wrote for a delta: a row of its own in `series_state_log` (the reading's
    // identity as the release gives it).
    let released = crate::order::release(
        vec![crate::order::Pending {
            series: 1,
            ts_ms: 1000,
            value: Value::F64(2.0),
            quality: Quality::Good,
        }],
        &mut Default::default(),
        rules(),
    );
    let delta = crate::order::delta_bytes(1000, &released.remembered);
    b.conn
        .execute(
            "INSERT INTO series_state_log(series_id, n, entries) VALUES (1, 1, ?1)",
            [delta],
        )
        .unwrap();
    drop(b);
    let mut b = open(&dir);
    let log_rows: i64 = b
        .conn
        .query_row("SELECT count(*) FROM series_state_log", [], |r| r.get(0))
        .unwrap();
    assert_eq!(log_rows, 0);
    seal_one(&mut b, &mut enc, "a/x", 1000, 2.0);
    assert_eq!(b.ledger().deduplicated, 1);
}

#[test]
fn a_shared_series_first_seen_in_a_rolled_back_append_is_stored_when_the_append_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut enc = Encoder::new(3).unwrap();
    let mut b = open(&dir);
    // One interned series for every reading, as the MQTT mapping shares it: looked up by its address.
    let series: Arc<Series> = Series::new("new/x").into();
    let at = |ts| NewReading {
        series: Arc::clone(&series),
        ts_ms: ts,
        value: Value::F64(1.0),
        quality: Quality::Good,
    };
    b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
    assert!(b.append([vec![at(1)].as_slice()]).is_err());
    b.append([vec![at(1), at(2)].as_slice()]).unwrap();
    seal_all(&mut b, &mut enc, 1024);
    let got: Vec<(String, i64)> = pending_readings(&mut b)
        .into_iter()
        .map(|(key, ts, ..)| (key, ts))
        .collect();
    assert_eq!(got, [("new/x".to_owned(), 1), ("new/x".to_owned(), 2)]);
}

#[test]
fn series_looked_up_by_address_stay_bounded_when_the_interner_makes_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    // The same series, a new `Arc` each time (an interner that dropped its cache and made them again).
    let readings: Vec<NewReading> = (0..ARC_CACHE_MAX_SERIES as i64 + 100)
        .map(|i| reading("a/x", i, 1.0))
        .collect();
    b.append([readings.as_slice()]).unwrap();
    assert!(
        b.series_by_arc.len() <= ARC_CACHE_MAX_SERIES,
        "{}",
        b.series_by_arc.len()
    );
    assert!(b.series_by_arc_bytes <= ARC_CACHE_MAX_BYTES);
    assert_eq!(b.series_ids.len(), 1);
}

#[test]
fn late_readings_can_be_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let mut enc = Encoder::new(3).unwrap();
    let dl = Rules {
        late: LatePolicy::DeadLetter,
        ..rules()
    };
    b.append([vec![reading("a/x", 100, 1.0)].as_slice()])
        .unwrap();
    b.seal(i64::MAX, 1000, &mut enc, &cfg(1024), dl, 0).unwrap();
    b.append([vec![reading("a/x", 50, 1.0)].as_slice()])
        .unwrap();
    b.seal(i64::MAX, 1000, &mut enc, &cfg(1024), dl, 0).unwrap();
    assert_eq!(b.ledger().dead_lettered, 1);
    assert_eq!(
        b.dead_letters(10).unwrap(),
        vec![("late".into(), "a/x".into(), 50)]
    );
}

#[test]
fn records_survive_reopen_byte_identical_and_sequence_numbers_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let mut enc = Encoder::new(3).unwrap();
    let before = {
        let mut b = open(&dir);
        b.append([vec![reading("a/x", 1, 1.0), reading("b/y", 2, 2.0)].as_slice()])
            .unwrap();
        seal_all(&mut b, &mut enc, 1024);
        b.append([vec![reading("a/x", 3, 3.0)].as_slice()]).unwrap();
        b.pending(500, usize::MAX).unwrap()
    };
    let mut b = open(&dir);
    assert_eq!(
        b.pending(500, usize::MAX).unwrap(),
        before,
        "sealed records changed across reopen"
    );
    assert_eq!(b.stats().unsealed_readings, 1);
    let acked: Vec<u64> = before.iter().map(|p| p.seq).collect();
    assert_eq!(b.ack(&acked).unwrap().1, 2);
    let next = b.next_seq();
    seal_all(&mut b, &mut enc, 1024);
    assert_eq!(b.pending(500, usize::MAX).unwrap()[0].seq, next);
    drop(b);
    assert_eq!(open(&dir).next_seq(), next + 1);
}

#[test]
fn pending_interleaves_newest_records_into_a_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let mut enc = Encoder::new(3).unwrap();
    for i in 0..20 {
        b.append([vec![reading("a/x", i, i as f64)].as_slice()])
            .unwrap();
        seal_all(&mut b, &mut enc, 1024);
    }
    let seqs: Vec<u64> = b
        .pending(8, usize::MAX)
        .unwrap()
        .iter()
        .map(|p| p.seq)
        .collect();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4, 5, 6, 19, 20],
        "six oldest and the two newest"
    );
    assert_eq!(
        b.pending(500, 1).unwrap().len(),
        1,
        "at least one record whatever the byte budget"
    );
    // With the byte budget binding (records of full size, a call of one second at the current rate), the newest
    // still get their quarter of it: before, the oldest filled the budget and every newest record was skipped.
    let sizes: Vec<usize> = b
        .pending(500, usize::MAX)
        .unwrap()
        .iter()
        .map(|p| p.record.len())
        .collect();
    let size = *sizes.iter().max().unwrap();
    let got = b.pending(500, 8 * size).unwrap();
    let seqs: Vec<u64> = got.iter().map(|p| p.seq).collect();
    assert!(
        seqs.contains(&20),
        "no newest record in a call the bytes limit: {seqs:?}"
    );
    assert!(seqs.contains(&1), "the oldest first: {seqs:?}");
    assert!(
        got.iter().map(|p| p.record.len()).sum::<usize>() <= 8 * size,
        "over the byte budget: {seqs:?}"
    );
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
}

/// `groups` groups of 50 readings of random values (50 series), each appended and sealed (records of about
/// `target` bytes).
fn seal_groups_of_50(b: &mut Buffer, groups: i64, target: usize) {
    let mut enc = Encoder::new(3).unwrap();
    for i in 0..groups {
        let group: Vec<_> = (0..50)
            .map(|j| reading(&format!("d{j}/v"), i * 100 + j, fastrand::f64()))
            .collect();
        b.append([group.as_slice()]).unwrap();
        seal_all(b, &mut enc, target);
    }
}

#[test]
fn drop_oldest_frees_space_and_counts_the_readings() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    seal_groups_of_50(&mut b, 10, 1024);
    let before = b.stats();
    let cap = before.bytes() / 2;
    let dropped = b.drop_oldest(cap).unwrap().readings;
    assert!(b.stats().bytes() <= cap);
    assert_eq!(
        dropped,
        before.pending_readings - b.stats().pending_readings
    );
    assert_eq!(b.ledger().dropped, dropped);
    assert!(
        b.pending(1, usize::MAX).unwrap()[0].seq > 1,
        "the oldest went first"
    );
}

#[test]
fn a_corrupt_file_is_moved_aside_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
    let b = Buffer::open(&path, Durability::Full, "edge-1").unwrap();
    let aside = b.moved_aside().unwrap().to_path_buf();
    assert!(aside.display().to_string().contains("b.db.corrupt-"));
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        vec![0x42u8; 8192],
        "the original bytes are kept"
    );
    assert_eq!(b.stats(), Stats::default());
}

#[test]
fn all_value_types_and_qualities_survive_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let s = Series {
        key: "m/v".into(),
        tags: vec![("site".into(), "muc".into())],
    };
    let values = [
        Value::F64(-0.5),
        Value::I64(i64::MIN),
        Value::Bool(true),
        Value::Str("open".into()),
    ];
    let group: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, v)| NewReading {
            series: s.clone().into(),
            ts_ms: i as i64,
            value: v.clone(),
            quality: [
                Quality::Good,
                Quality::Uncertain,
                Quality::Bad,
                Quality::Good,
            ][i],
        })
        .collect();
    b.append([group.as_slice()]).unwrap();
    seal_all(&mut b, &mut Encoder::new(3).unwrap(), 1024);
    let batch = decode(&b.pending(1, usize::MAX).unwrap()[0].record).unwrap();
    assert_eq!(batch.series, vec![s]);
    let got: Vec<_> = batch
        .readings
        .iter()
        .map(|r| (r.value.clone(), r.quality))
        .collect();
    let want: Vec<_> = group.iter().map(|r| (r.value.clone(), r.quality)).collect();
    assert_eq!(got, want);
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(u8, i64, u8)>),
    Seal,
    Ack(usize),
    Drop(u8),
    Reopen,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0u8..4, 0i64..60, 0u8..3), 1..15).prop_map(Op::Append),
        2 => Just(Op::Seal),
        2 => (0usize..4).prop_map(Op::Ack),
        1 => (0u8..100).prop_map(Op::Drop),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The buffer against a model: nothing appended is lost (every distinct reading is in a record that was sent,
    /// is pending, or was dropped by policy), the ledger balances across restarts, sequence numbers only grow,
    /// and pending records survive a reopen byte for byte.
    #[test]
    fn buffer_state_machine_matches_the_model(ops in prop::collection::vec(arb_op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let mut enc = Encoder::new(1).unwrap();
        let mut b = open(&dir);
        let mut appended = 0u64;
        let mut lifetimes = Ledger::default(); // ledgers of closed lifetimes
        let mut distinct_in: BTreeSet<(String, i64, u64)> = BTreeSet::new();
        let mut distinct_out: BTreeSet<(String, i64, u64)> = BTreeSet::new();
        let mut last_seq = 0u64;
        let note_records = |b: &mut Buffer, out: &mut BTreeSet<(String, i64, u64)>, last: &mut u64| {
            for (s, ts, bits, _) in pending_readings(b) {
                out.insert((s, ts, bits));
            }
            for p in b.pending(500, usize::MAX).unwrap() {
                *last = (*last).max(p.seq);
            }
        };
        for op in ops {
            match op {
                Op::Append(rs) => {
                    let group: Vec<_> = rs.iter().map(|&(s, ts, v)| reading(&format!("d{s}/v"), ts, f64::from(v))).collect();
                    for r in &group {
                        distinct_in.insert((r.series.key.clone(), r.ts_ms, match r.value { Value::F64(f) => f.to_bits(), _ => 0 }));
                    }
                    appended += b.append([group.as_slice()]).unwrap();
                }
                Op::Seal => {
                    let before = b.next_seq();
                    let r = seal_all(&mut b, &mut enc, 256);
                    prop_assert_eq!(b.next_seq(), before + r.batches);
                    note_records(&mut b, &mut distinct_out, &mut last_seq);
                }
                Op::Ack(n) => {
                    let seqs: Vec<u64> = b.pending(500, usize::MAX).unwrap().iter().take(n).map(|p| p.seq).collect();
                    b.ack(&seqs).unwrap();
                }
                Op::Drop(pct) => {
                    let cap = b.stats().bytes() * u64::from(pct) / 100;
                    b.drop_oldest(cap).unwrap();
                }
                Op::Reopen => {
                    let before = b.pending(500, usize::MAX).unwrap();
                    let l = b.ledger();
                    lifetimes = Ledger { sent: lifetimes.sent + l.sent, deduplicated: lifetimes.deduplicated + l.deduplicated, dead_lettered: lifetimes.dead_lettered + l.dead_lettered, dropped: lifetimes.dropped + l.dropped, ..lifetimes };
                    drop(b);
                    b = open(&dir);
                    prop_assert_eq!(b.pending(500, usize::MAX).unwrap(), before);
                }
            }
            let (l, s) = (b.ledger(), b.stats());
            prop_assert_eq!(
                appended,
                lifetimes.sent + l.sent + lifetimes.deduplicated + l.deduplicated + lifetimes.dead_lettered + l.dead_lettered
                    + lifetimes.dropped + l.dropped + s.unsealed_readings + s.pending_readings,
                "ledger out of balance"
            );
            prop_assert!(b.next_seq() > last_seq);
        }
        // Seal the rest: every distinct reading appended has been in some record.
        seal_all(&mut b, &mut enc, 256);
        note_records(&mut b, &mut distinct_out, &mut last_seq);
        prop_assert_eq!(distinct_in, distinct_out);
    }
}

#[test]
fn nan_and_infinite_values_pass_through_the_buffer() {
    // SQLite stores NaN as NULL; a Modbus exception reading is NaN with quality bad.
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let group = vec![
        NewReading {
            series: Series::new("m/a").into(),
            ts_ms: 1,
            value: Value::F64(f64::NAN),
            quality: Quality::Bad,
        },
        NewReading {
            series: Series::new("m/b").into(),
            ts_ms: 1,
            value: Value::F64(f64::INFINITY),
            quality: Quality::Good,
        },
        NewReading {
            series: Series::new("m/c").into(),
            ts_ms: 1,
            value: Value::F64(f64::NEG_INFINITY),
            quality: Quality::Good,
        },
    ];
    b.append([group.as_slice()]).unwrap();
    let r = seal_all(&mut b, &mut Encoder::new(3).unwrap(), 1024);
    assert_eq!(r.readings, 3);
    let batch = decode(&b.pending(1, usize::MAX).unwrap()[0].record).unwrap();
    let values: Vec<f64> = batch
        .readings
        .iter()
        .map(|r| match r.value {
            Value::F64(f) => f,
            _ => 0.0,
        })
        .collect();
    assert!(
        values[0].is_nan() && values[1] == f64::INFINITY && values[2] == f64::NEG_INFINITY,
        "{values:?}"
    );
    assert_eq!(batch.readings[0].quality, Quality::Bad);
}

#[test]
fn an_unreadable_group_is_skipped_and_counted_not_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    b.append([vec![reading("a/x", 1, 1.0), reading("a/x", 2, 2.0)].as_slice()])
        .unwrap();
    b.append([vec![reading("a/x", 3, 3.0)].as_slice()]).unwrap();
    // Someone edits the file: the first group's blob is cut short.
    let raw = rusqlite::Connection::open(dir.path().join("b.db")).unwrap();
    raw.execute(
        "UPDATE groups SET blob = substr(blob, 1, length(blob) - 3) WHERE id = 1",
        [],
    )
    .unwrap();
    drop(raw);
    let r = seal_all(&mut b, &mut Encoder::new(3).unwrap(), 1024);
    assert_eq!((r.rows, r.readings), (3, 1));
    assert_eq!(b.ledger().dead_lettered, 2);
    assert_eq!(b.stats().unsealed_readings, 0);
    assert_eq!(
        pending_readings(&mut b),
        vec![("a/x".into(), 3, 3f64.to_bits(), false)]
    );
}

/// A buffer file as a version-1 agent left it: `readings` holds `rows` (series key, ts, kind, value), one pending
/// record with 7 readings in `batches`, next_seq 5.
fn v1_file(path: &Path, rows: &[(&str, i64, u8, rusqlite::types::Value)]) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE meta(key TEXT PRIMARY KEY, value ANY NOT NULL);
         CREATE TABLE series(id INTEGER PRIMARY KEY, key TEXT NOT NULL, tags TEXT NOT NULL, UNIQUE(key, tags));
         CREATE TABLE readings(id INTEGER PRIMARY KEY, series_id INTEGER NOT NULL, ts_ms INTEGER NOT NULL, kind INTEGER NOT NULL, value ANY);
         CREATE TABLE batches(seq INTEGER PRIMARY KEY, record BLOB NOT NULL, readings INTEGER NOT NULL, sealed_ms INTEGER NOT NULL);
         CREATE TABLE series_state(series_id INTEGER PRIMARY KEY, state BLOB NOT NULL);
         INSERT INTO meta(key, value) VALUES ('schema_version', 1), ('next_seq', 5), ('agent_id', 'edge-1'), ('epoch', 42);
         INSERT INTO batches(seq, record, readings, sealed_ms) VALUES (4, x'00', 7, 0);",
    )
    .unwrap();
    for (i, (key, ts, kind, v)) in rows.iter().enumerate() {
        c.execute(
            "INSERT OR IGNORE INTO series(key, tags) VALUES (?1, '[]')",
            [key],
        )
        .unwrap();
        let sid: i64 = c
            .query_row("SELECT id FROM series WHERE key = ?1", [key], |r| r.get(0))
            .unwrap();
        c.execute(
            "INSERT INTO readings(id, series_id, ts_ms, kind, value) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![i as i64 + 1, sid, ts, kind, v],
        )
        .unwrap();
    }
}

/// `(series, ts, value)` of every reading in the pending records (the version-1 placeholder record left out).
fn pending_values(b: &mut Buffer) -> Vec<(String, i64, String)> {
    let mut out = Vec::new();
    for p in b.pending(10_000, usize::MAX).unwrap() {
        if p.record == [0] {
            continue;
        }
        let batch = decode(&p.record).unwrap();
        for r in batch.readings {
            let v = match r.value {
                Value::F64(f) => format!("f{}", f.to_bits()),
                other => format!("{other:?}"),
            };
            out.push((batch.series[r.series as usize].key.clone(), r.ts_ms, v));
        }
    }
    out.sort();
    out
}

fn v1_rows(n: usize) -> Vec<(&'static str, i64, u8, rusqlite::types::Value)> {
    use rusqlite::types::Value as V;
    let keys = ["d1/f", "d1/i", "d2/b", "d2/s"];
    (0..n)
        .map(|i| {
            let k = i % 4;
            let ts = 1_000 + (i / 4) as i64;
            let v = match k {
                0 if i == 0 => V::Null, // a NaN: SQLite stores it as NULL
                0 => V::Real(i as f64 / 4.0),
                1 => V::Integer(-(i as i64)),
                2 => V::Integer((i % 3 == 0) as i64),
                _ => V::Text(format!("s{i}")),
            };
            // Quality bad on every 5th reading.
            let q = if i % 5 == 0 { 2 << 4 } else { 0 };
            (keys[k], ts, k as u8 | q, v)
        })
        .collect()
}

fn expected_v1(rows: &[(&str, i64, u8, rusqlite::types::Value)]) -> Vec<(String, i64, String)> {
    use rusqlite::types::Value as V;
    let mut out: Vec<_> = rows
        .iter()
        .map(|(key, ts, kind, v)| {
            let v = match (kind & 7, v) {
                (0, V::Null) => format!("f{}", f64::NAN.to_bits()),
                (0, V::Real(f)) => format!("f{}", f.to_bits()),
                (1, V::Integer(i)) => format!("{:?}", Value::I64(*i)),
                (2, V::Integer(i)) => format!("{:?}", Value::Bool(*i != 0)),
                (3, V::Text(s)) => format!("{:?}", Value::Str(s.clone())),
                _ => unreachable!(),
            };
            ((*key).to_owned(), *ts, v)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_version_1_file_with_a_backlog_is_migrated_and_drained_exactly_once() {
    // A gateway upgraded with unsealed readings in the old one-row-per-reading table: none may be lost or doubled.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let rows = v1_rows(3 * MIGRATE_CHUNK + 17);
    v1_file(&path, &rows);
    let mut b = open(&dir);
    assert_eq!(b.epoch(), 42, "the file's epoch is kept");
    assert_eq!(b.next_seq(), 5, "sequence numbers go on");
    let s = b.stats();
    assert_eq!(s.unsealed_readings, rows.len() as u64);
    assert_eq!((s.pending_batches, s.pending_readings), (1, 7));
    let raw = rusqlite::Connection::open(&path).unwrap();
    let (version, legacy): (i64, i64) = raw
        .query_row(
            "SELECT (SELECT value FROM meta WHERE key = 'schema_version'), (SELECT count(*) FROM sqlite_master WHERE name = 'readings')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((version, legacy), (SCHEMA_VERSION, 0));
    drop(raw);
    let mut enc = Encoder::new(3).unwrap();
    while seal_all(&mut b, &mut enc, 24 * 1024).rows > 0 {}
    assert_eq!(b.stats().unsealed_readings, 0);
    assert_eq!(pending_values(&mut b), expected_v1(&rows));
    let quality_bad = b
        .pending(10_000, usize::MAX)
        .unwrap()
        .iter()
        .filter(|p| p.record != [0])
        .flat_map(|p| decode(&p.record).unwrap().readings)
        .filter(|r| r.quality == Quality::Bad)
        .count();
    assert_eq!(quality_bad, rows.len().div_ceil(5));
    assert!(b
        .pending(10_000, usize::MAX)
        .unwrap()
        .iter()
        .any(|p| p.seq == 4));
    assert_eq!(b.ledger().deduplicated + b.ledger().dead_lettered, 0);
}

#[test]
fn an_interrupted_migration_goes_on_where_it_stopped() {
    // The state a crash leaves after the first migration transaction: the oldest rows already in group 1, the rest
    // still in `readings`, the schema still version 1.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let rows = v1_rows(250);
    v1_file(&path, &rows);
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch("CREATE TABLE groups(id INTEGER PRIMARY KEY, committed_ms INTEGER NOT NULL, readings INTEGER NOT NULL, bytes INTEGER NOT NULL, blob BLOB NOT NULL)").unwrap();
    let mut enc = group::Encoder::new();
    let mut bytes = 0;
    {
        let mut stmt = raw
            .prepare(
                "SELECT series_id, ts_ms, kind, value FROM readings WHERE id <= 100 ORDER BY id",
            )
            .unwrap();
        let mut q = stmt.query([]).unwrap();
        while let Some(r) = q.next().unwrap() {
            let kind: u8 = r.get(2).unwrap();
            let v = legacy_value(kind, r.get_ref(3).unwrap()).unwrap();
            bytes += ROW_BYTES + value_bytes(&v);
            enc.push(r.get(0).unwrap(), r.get(1).unwrap(), &v, quality_of(kind));
        }
    }
    raw.execute(
        "INSERT INTO groups VALUES (1, 0, 100, ?1, ?2)",
        rusqlite::params![bytes as i64, enc.finish()],
    )
    .unwrap();
    raw.execute("DELETE FROM readings WHERE id <= 100", [])
        .unwrap();
    drop(raw);
    let mut b = open(&dir);
    assert_eq!(b.stats().unsealed_readings, 250);
    let mut enc = Encoder::new(3).unwrap();
    while seal_all(&mut b, &mut enc, 24 * 1024).rows > 0 {}
    assert_eq!(pending_values(&mut b), expected_v1(&rows));
    assert_eq!(
        b.ledger().deduplicated + b.ledger().dead_lettered,
        0,
        "read in order: nothing late"
    );
}

#[test]
fn a_commit_larger_than_a_group_is_stored_as_several_groups_sealed_together() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let n = MAX_GROUP_READINGS as usize * 2 + 5;
    let readings: Vec<NewReading> = (0..n).map(|i| reading("a/x", i as i64, i as f64)).collect();
    b.append([readings.as_slice()]).unwrap();
    assert_eq!(b.last_row_id(), 3, "three groups");
    let r = b
        .seal(
            b.last_row_id(),
            10,
            &mut Encoder::new(3).unwrap(),
            &cfg(24 * 1024),
            rules(),
            0,
        )
        .unwrap();
    assert_eq!(
        r.rows, MAX_GROUP_READINGS,
        "whole groups: at least one, however small max_rows is"
    );
    while seal_all(&mut b, &mut Encoder::new(3).unwrap(), 24 * 1024).rows > 0 {}
    assert_eq!(b.ledger().appended, n as u64);
    assert_eq!(b.stats().pending_readings, n as u64);
    assert_eq!(b.stats().unsealed_bytes, 0);
}

#[test]
fn refused_messages_are_kept_bounded_with_readings_in_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let refused: Vec<Refused> = (0..MAX_REFUSED + 5)
        .map(|i| Refused {
            at_ms: i,
            source: "mqtt:plant".into(),
            topic: format!("t/{i}"),
            reason: "not_json".into(),
            detail: "payload is not JSON".into(),
            payload: if i == MAX_REFUSED + 4 {
                vec![0xff; MAX_REFUSED_PAYLOAD + 10]
            } else {
                b"oops".to_vec()
            },
        })
        .collect();
    b.append_with_refused([vec![reading("a/x", 1, 1.0)].as_slice()], &refused)
        .unwrap();
    assert_eq!(b.stats().unsealed_readings, 1);
    let rows = read_refused(&dir.path().join("b.db"), 10_000).unwrap();
    assert_eq!(rows.len() as i64, MAX_REFUSED, "bounded");
    assert_eq!(rows[0].topic, "t/5", "the oldest went");
    assert_eq!(rows[0].payload.as_deref(), Some("oops"));
    let last = rows.last().unwrap();
    assert_eq!(last.size as usize, MAX_REFUSED_PAYLOAD + 10);
    assert_eq!(
        last.payload_hex.as_ref().map(String::len),
        Some(2 * MAX_REFUSED_PAYLOAD),
        "truncated"
    );
    assert_eq!(read_refused(&dir.path().join("b.db"), 2).unwrap().len(), 2);
}

#[test]
fn row_ids_keep_growing_after_a_seal_emptied_the_table() {
    // Readiness for the reorder window is `id <= ready_id`; SQLite alone would start again at 1 once the table is
    // empty, putting new rows under the remembered ready id (sealed at once: 4 of 10 slow pairs flagged late).
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let mut enc = Encoder::new(3).unwrap();
    b.append([vec![reading("a/x", 1, 1.0), reading("a/x", 2, 2.0)].as_slice()])
        .unwrap();
    let ready = b.last_row_id();
    seal_all(&mut b, &mut enc, 1024);
    assert_eq!(b.stats().unsealed_readings, 0);
    b.append([vec![reading("a/x", 5, 5.0)].as_slice()]).unwrap();
    assert!(
        b.last_row_id() > ready,
        "new row id {} must exceed {ready}",
        b.last_row_id()
    );
    let r = b
        .seal(ready, 1000, &mut enc, &cfg(1024), rules(), 0)
        .unwrap();
    assert_eq!(r.rows, 0, "a row appended after the ready id is not ready");
}

#[test]
fn the_epoch_is_drawn_once_per_buffer_file_and_travels_in_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let epoch = b.epoch();
    assert_ne!(epoch, 0);
    b.append([vec![reading("a/x", 1, 1.0)].as_slice()]).unwrap();
    seal_all(&mut b, &mut Encoder::new(3).unwrap(), 1024);
    let p = b.pending(10, usize::MAX).unwrap();
    assert_eq!(decode(&p[0].record).unwrap().epoch, epoch);
    drop(b);
    assert_eq!(open(&dir).epoch(), epoch, "reopening keeps the epoch");
    let other = tempfile::tempdir().unwrap();
    let fresh = open(&other);
    assert_ne!(
        fresh.epoch(),
        epoch,
        "a new file (a re-imaged gateway) draws a new one"
    );
    assert_eq!(fresh.next_seq(), 1, "and numbers its batches from 1 again");
}

/// The buffer thread on `dir/b.db` with default settings, and its metrics.
fn buffer_thread(
    dir: &tempfile::TempDir,
) -> (
    BufferHandle,
    std::thread::JoinHandle<()>,
    crate::metrics::AgentMetrics,
) {
    let cfg: BufferConfig = toml::from_str(&format!(
        "path = {:?}",
        dir.path().join("b.db").display().to_string()
    ))
    .unwrap();
    let metrics = crate::metrics::AgentMetrics::new(fieldlink_ops::metrics::Registry::new());
    let (handle, thread) = spawn(
        &cfg,
        &BatchConfig::default(),
        &crate::order::OrderConfig::default(),
        "edge-1",
        metrics.clone(),
    )
    .unwrap();
    (handle, thread, metrics)
}

#[test]
fn an_append_whose_source_stopped_is_dropped_uncommitted_and_the_others_commit() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (handle, thread, metrics) = buffer_thread(&dir);
    let committed = Arc::new(AtomicUsize::new(0));
    let ack = |cancelled: bool| {
        let c = committed.clone();
        Ack {
            on_commit: Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
            cancelled: Arc::new(AtomicBool::new(cancelled)),
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        handle
            .append(vec![reading("a/x", 1, 1.0)], Some(ack(true)))
            .await
            .unwrap();
        handle
            .append(vec![reading("a/x", 2, 2.0)], Some(ack(false)))
            .await
            .unwrap();
        handle
            .append(vec![reading("a/x", 3, 3.0)], None)
            .await
            .unwrap();
        handle.ping().await.unwrap();
    });
    drop(handle);
    thread.join().unwrap();
    assert_eq!(
        committed.load(Ordering::SeqCst),
        1,
        "only the live source's ack ran"
    );
    assert_eq!(
        metrics.readings_received.get(),
        2,
        "the stopped source's reading was not committed (the broker redelivers it)"
    );
}

#[test]
fn appends_still_queued_when_the_last_handle_goes_are_committed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let (handle, thread, metrics) = buffer_thread(&dir);
    let committed = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = 200;
    rt.block_on(async {
        for i in 0..n {
            let c = committed.clone();
            let ack = Ack {
                on_commit: Box::new(move || {
                    c.fetch_add(1, Ordering::SeqCst);
                }),
                cancelled: Default::default(),
            };
            handle
                .append(vec![reading("a/x", i as i64, 1.0)], Some(ack))
                .await
                .unwrap();
        }
    });
    // The handle goes while appends are queued: the closed control channel must not end the thread before them.
    drop(handle);
    thread.join().unwrap();
    assert_eq!(
        committed.load(Ordering::SeqCst),
        n,
        "every live append committed"
    );
    assert_eq!(metrics.readings_received.get(), n as u64);
}

#[test]
fn readings_the_wire_format_refuses_are_dead_lettered_and_the_rest_sealed() {
    // A buffer written by a version that did not check a Modbus series against the wire format's limits holds
    // readings of a series key too long to send: the encoder would refuse every seal that took them, for good.
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let mut enc = Encoder::new(3).unwrap();
    let long = format!("dev/{}", "k".repeat(fieldlink_proto::limits::MAX_KEY_BYTES));
    let empty_tag = NewReading {
        series: Series {
            key: "dev/tagged".into(),
            tags: vec![(String::new(), "x".into())],
        }
        .into(),
        ..reading("unused", 3, 3.0)
    };
    let overlong_string = NewReading {
        value: Value::Str("s".repeat(fieldlink_proto::limits::MAX_STRING_BYTES + 1)),
        ..reading("dev/text", 4, 0.0)
    };
    b.append([vec![
        reading("dev/ok", 1, 1.0),
        reading(&long, 2, 2.0),
        empty_tag,
        overlong_string,
        reading("dev/ok", 5, 5.0),
    ]
    .as_slice()])
        .unwrap();
    let report = seal_all(&mut b, &mut enc, 1024);
    assert_eq!((report.rows, report.readings), (5, 2));
    let sent: Vec<(String, i64)> = pending_readings(&mut b)
        .into_iter()
        .map(|(k, t, ..)| (k, t))
        .collect();
    assert_eq!(sent, vec![("dev/ok".into(), 1), ("dev/ok".into(), 5)]);
    let mut dead = b.dead_letters(10).unwrap();
    dead.sort_by_key(|d| d.2);
    assert_eq!(
        dead,
        vec![
            ("unsendable".into(), long, 2),
            ("unsendable".into(), "dev/tagged".into(), 3),
            ("unsendable".into(), "dev/text".into(), 4)
        ]
    );
    assert_eq!(b.ledger().dead_lettered, 3);
    assert_eq!(
        b.stats().unsealed_readings,
        0,
        "nothing left to stall the next seal"
    );
}

/// One process per buffer file: a second open is refused, naming the holder, until the first is dropped. A buffer
/// moved aside as corrupt keeps the lock of its path.
#[test]
fn a_buffer_open_elsewhere_is_refused_naming_its_holder_until_it_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(&dir);
    let err = Buffer::open(&dir.path().join("b.db"), Durability::Normal, "edge-2").unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, BufferError::InUse { .. })
            && msg.contains(&format!("pid {}", std::process::id()))
            && msg.contains("b.db"),
        "{msg}"
    );
    drop(first);
    let again = open(&dir);
    assert_eq!(
        std::fs::read_to_string(lock_path(&dir.path().join("b.db"))).unwrap(),
        format!("pid {}\n", std::process::id())
    );
    drop(again);

    // A corrupt file is moved aside under the lock; the new buffer holds it.
    std::fs::write(dir.path().join("b.db"), vec![0x55u8; 8192]).unwrap();
    let fresh = open(&dir);
    assert!(fresh.moved_aside.is_some());
    assert!(matches!(
        Buffer::open(&dir.path().join("b.db"), Durability::Normal, "edge-1"),
        Err(BufferError::InUse { .. })
    ));

    // The same file through another name of its directory (a symbolic link) shares its lock.
    let aside = tempfile::tempdir().unwrap();
    let link = aside.path().join("state");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    assert!(matches!(
        Buffer::open(&link.join("b.db"), Durability::Normal, "edge-1"),
        Err(BufferError::InUse { .. })
    ));
    drop(fresh);

    // A lock file that cannot be opened (here a link into a directory that does not exist) does not keep the
    // buffer from opening: it runs without the check.
    let other = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        "/nonexistent-fieldlink/x",
        lock_path(&other.path().join("b.db")),
    )
    .unwrap();
    let unlocked = open(&other);
    assert!(unlocked._lock.is_none());
}

/// Records Kinesis acknowledged whose deletion was given up (another process held the lock) are counted apart by
/// `left`: the drain may report the file drained when nothing else is left. Once deleted, they count nowhere; a
/// sequence number noted that is no longer in the file counts nowhere either.
#[test]
fn left_counts_acknowledged_records_still_in_the_file_apart() {
    let dir = tempfile::tempdir().unwrap();
    let mut enc = Encoder::new(3).unwrap();
    let mut b = open(&dir);
    b.append([vec![reading("a/x", 1, 1.0), reading("b/y", 2, 2.0)].as_slice()])
        .unwrap();
    seal_all(&mut b, &mut enc, 1);
    b.append([vec![reading("a/x", 3, 3.0)].as_slice()]).unwrap();
    seal_all(&mut b, &mut enc, 1);
    let seqs: Vec<u64> = b
        .pending(500, usize::MAX)
        .unwrap()
        .iter()
        .map(|p| p.seq)
        .collect();
    assert_eq!(seqs.len(), 3, "one record per reading");
    let left = b.left().unwrap();
    assert_eq!(
        (
            left.pending_batches,
            left.pending_readings,
            left.acknowledged_undeleted
        ),
        (3, 3, 0)
    );

    b.note_undeleted(&[seqs[0], seqs[2], b.next_seq() + 7]);
    let left = b.left().unwrap();
    assert_eq!(
        (
            left.pending_batches,
            left.pending_readings,
            left.acknowledged_undeleted
        ),
        (1, 1, 2),
        "two records Kinesis has, one it has not; a number not in the file counts nowhere"
    );
    assert!(!left.is_drained());

    b.ack(&[seqs[1]]).unwrap();
    let left = b.left().unwrap();
    assert_eq!((left.pending_batches, left.acknowledged_undeleted), (0, 2));
    assert!(left.is_drained(), "everything in the file is in Kinesis");

    b.ack(&[seqs[0], seqs[2]]).unwrap();
    let left = b.left().unwrap();
    assert_eq!((left.pending_batches, left.acknowledged_undeleted), (0, 0));
    assert!(left.is_drained());
}

/// Records Kinesis acknowledged whose deletion failed are not fetched again, and over the cap they are deleted
/// before any unsent one, counted sent, not dropped (they were counted dropped once the sender let go of them).
#[test]
fn drop_oldest_deletes_acknowledged_records_first_and_counts_them_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    seal_groups_of_50(&mut b, 4, 1 << 20);
    let fetched = |b: &mut Buffer| -> Vec<u64> {
        b.pending(500, usize::MAX)
            .unwrap()
            .iter()
            .map(|p| p.seq)
            .collect()
    };
    let pending = fetched(&mut b);
    assert_eq!(pending.len(), 4);
    let newest = *pending.iter().max().unwrap();
    b.note_undeleted(&[newest]);
    let again = fetched(&mut b);
    assert_eq!(again.len(), 3);
    assert!(!again.contains(&newest), "Kinesis has it: not sent again");
    let kept = b.drop_oldest(0).unwrap();
    assert_eq!(
        (kept, b.ledger().sent, b.stats().pending_batches),
        (
            Dropped {
                readings: 0,
                acknowledged_records: 1
            },
            50,
            3
        ),
        "the acknowledged record deleted, counted sent; records in flight neither deleted nor dropped"
    );
    b.release_in_flight();
    b.note_undeleted(&[again[0]]);
    let before = b.stats();
    let dropped = b.drop_oldest(before.bytes() - 1).unwrap();
    assert_eq!(
        dropped,
        Dropped {
            readings: 0,
            acknowledged_records: 1
        },
        "the acknowledged record was enough"
    );
    assert_eq!(b.ledger().sent, 100);
    assert_eq!(b.ledger().dropped, 0);
    let left = fetched(&mut b);
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&again[0]));
    assert_eq!(b.left().unwrap().acknowledged_undeleted, 0);
}

//! The buffer with window rules: closed windows travel in the sealed records, `keep_raw = false` readings are
//! deleted unsent, the ledger balances, and no window is repeated or lost across failed commits and reopens.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::order::LatePolicy;
use crate::window::WindowsConfig;
use fieldlink_proto::{decode_any, Record};

const RULES: &str = r#"
[[rules]]
name = "mean"
series = "m/+"
sizes_ms = [1000]
functions = ["count", "mean"]
allowed_lateness_ms = 500
late = "raw"
keep_raw = false

[[rules]]
name = "kept"
series = "k/+"
sizes_ms = [1000]
functions = ["max"]
"#;

fn open(path: &Path) -> Buffer {
    open_with(path, RULES)
}

fn open_with(path: &Path, rules: &str) -> Buffer {
    let mut b = Buffer::open(path, Durability::Normal, "edge-1").unwrap();
    let cfg: WindowsConfig = toml::from_str(rules).unwrap();
    b.enable_windows(crate::window::Engine::from_config(&cfg))
        .unwrap();
    b
}

fn append(b: &mut Buffer, key: &str, readings: &[(i64, f64)]) {
    let rs: Vec<NewReading> = readings
        .iter()
        .map(|&(ts, v)| NewReading {
            series: Series::new(key).into(),
            ts_ms: ts,
            value: Value::F64(v),
            quality: Quality::Good,
        })
        .collect();
    b.append([rs.as_slice()]).unwrap();
}

fn seal(b: &mut Buffer) -> Result<SealReport, BufferError> {
    seal_at(b, NOW_MS)
}

/// A seal at `now_ms` on both the wall clock and the intake clock.
fn seal_at(b: &mut Buffer, now_ms: i64) -> Result<SealReport, BufferError> {
    seal_part(b, now_ms, 100_000)
}

/// A seal (or one part of it) of at most `max_rows` readings, at `now_ms` on both clocks.
fn seal_part(b: &mut Buffer, now_ms: i64, max_rows: usize) -> Result<SealReport, BufferError> {
    b.set_intake_clock(now_ms);
    let mut enc = Encoder::new(3).unwrap();
    let rules = Rules {
        dedup_window_ms: 60_000,
        max_recent: 1024,
        late: LatePolicy::Flag,
    };
    b.seal(
        i64::MAX,
        max_rows,
        &mut enc,
        &BatchConfig::default(),
        rules,
        now_ms,
    )
}

/// The seals' wall-clock time: after every event time here (no watermark passes it).
const NOW_MS: i64 = 1_000_000_000;

/// Every pending reading as `(series, ts, value, late)`, acknowledged (so the next call gives only new ones).
type Got = (String, i64, String, bool);
fn drain(b: &mut Buffer) -> Vec<Got> {
    let mut out = Vec::new();
    let pending = b.pending(500, usize::MAX).unwrap();
    for p in &pending {
        let Record::Readings(batch) = decode_any(&p.record).unwrap() else {
            panic!("not a readings record")
        };
        for r in batch.readings {
            let v = match r.value {
                Value::F64(x) => format!("{x}"),
                Value::I64(i) => format!("{i}i"),
                v => format!("{v:?}"),
            };
            out.push((
                batch.series[r.series as usize].key.clone(),
                r.ts_ms,
                v,
                r.late,
            ));
        }
    }
    let seqs: Vec<u64> = pending.iter().map(|p| p.seq).collect();
    b.ack(&seqs).unwrap();
    out.sort();
    out
}

/// A buffer file at `path` whose rule `mean` (`RULES`) holds the window [0, 1000) of `m/a` open with 1 and 3:
/// committed, nothing sent (the readings withheld).
fn with_open_window(path: &Path) {
    let mut b = open(path);
    append(&mut b, "m/a", &[(100, 1.0), (200, 3.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![],
        "[0, 1000) open, the readings withheld"
    );
}

fn got(k: &str, ts: i64, v: &str, late: bool) -> Got {
    (k.into(), ts, v.into(), late)
}

#[test]
fn closed_windows_go_out_in_the_records_and_withheld_readings_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    append(&mut b, "m/a", &[(100, 1.0), (900, 2.0), (1200, 6.0)]);
    append(&mut b, "k/a", &[(100, 1.0), (900, 2.0), (1000, 6.0)]);
    append(&mut b, "x/a", &[(100, 5.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("k/a", 100, "1", false),
            got("k/a", 900, "2", false),
            got("k/a", 1000, "6", false),
            got("k/a/max_1s", 0, "2", false),
            got("x/a", 100, "5", false),
        ],
        "m/a is withheld and its window [0, 1000) still open (lateness 500)"
    );
    append(&mut b, "m/a", &[(1500, 3.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/a/count_1s", 0, "2i", false),
            got("m/a/mean_1s", 0, "1.5", false)
        ]
    );
    // 800 is late for [0, 1000) (watermark 1000): sent raw, flagged, and not aggregated.
    append(&mut b, "m/a", &[(800, 50.0), (2600, 0.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/a", 800, "50", true),
            got("m/a/count_1s", 1000, "2i", false),
            got("m/a/mean_1s", 1000, "4.5", false)
        ]
    );
    let l = b.ledger();
    assert_eq!(b.windows().counts().late, 1);
    assert_eq!((l.window_withheld, l.window_derived), (5, 5));
    let s = b.stats();
    assert_eq!(
        l.appended + l.window_derived,
        l.sent
            + l.deduplicated
            + l.dead_lettered
            + l.dropped
            + l.window_withheld
            + s.unsealed_readings
            + s.pending_readings,
        "ledger"
    );
}

#[test]
fn a_failed_seal_or_a_reopen_neither_repeats_nor_loses_a_window() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let mut b = open(&path);
    append(&mut b, "m/a", &[(100, 1.0), (200, 3.0), (1600, 5.0)]);
    b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
    assert!(seal(&mut b).is_err());
    assert_eq!(drain(&mut b), vec![], "nothing committed");
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/a/count_1s", 0, "2i", false),
            got("m/a/mean_1s", 0, "2", false)
        ]
    );
    append(&mut b, "m/a", &[(1700, 7.0)]);
    seal(&mut b).unwrap();
    assert_eq!(drain(&mut b), vec![]);
    drop(b);
    let mut b = open(&path);
    assert_eq!(b.windows().open_windows(), 1, "the open window came back");
    append(&mut b, "m/a", &[(2600, 0.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/a/count_1s", 1000, "2i", false),
            got("m/a/mean_1s", 1000, "6", false)
        ]
    );
}

/// A rule narrowed while a series' window was open (`m/+` to `m/b`): the next start finds the pair orphaned, the
/// next seal emits its window (final: no reading of `m/a` joins it any more) instead of holding it open for good,
/// and a later start emits nothing again.
#[test]
fn a_window_of_a_series_a_narrowed_rule_no_longer_matches_is_closed_once_at_the_next_seal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    with_open_window(&path);
    let narrowed = RULES.replace("series = \"m/+\"", "series = \"m/b\"");
    let mut b = open_with(&path, &narrowed);
    assert_eq!(b.windows().open_windows(), 1);
    append(&mut b, "m/a", &[(300, 5.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/a", 300, "5", false),
            got("m/a/count_1s", 0, "2i", false),
            got("m/a/mean_1s", 0, "2", false)
        ],
        "the reading goes raw (no rule matches it), the old window closes"
    );
    assert_eq!(b.windows().open_windows(), 0);
    drop(b);
    let mut b = open_with(&path, &narrowed);
    append(&mut b, "k/x", &[(100, 1.0)]);
    seal(&mut b).unwrap();
    assert_eq!(drain(&mut b), vec![got("k/x", 100, "1", false)]);
    // Widened again: a late reading of the emitted window does not open it a second time.
    drop(b);
    let mut b = open(&path);
    append(&mut b, "m/a", &[(900, 7.0), (1100, 1.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![got("m/a", 900, "7", true)],
        "late for the emitted window: sent raw and flagged (late = raw); 1100 joins an open window"
    );
}

/// An orphan closes with the functions its windows were opened with, so its derived keys fit as they did. Where those
/// are unknown (states of a version that did not keep them) the rule's own are used, and a derived key the wire
/// format refuses (the functions changed to a longer name than a long key leaves room for) is left out with a
/// warning: the seal goes through, instead of failing every seal.
#[test]
fn an_orphans_window_whose_key_is_too_long_is_left_out_and_sealing_goes_on() {
    let rule = |f: &str| {
        format!("[[rules]]\nname = \"long\"\nseries = \"m/+\"\nsizes_ms = [1000]\nfunctions = [\"{f}\"]\nkeep_raw = false\n")
    };
    let key = format!("m/{}", "x".repeat(1015)); // with "/max_1s": 1024 bytes, the most a key may have
    for known in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let mut b = open_with(&path, &rule("max"));
        append(&mut b, &key, &[(100, 1.0), (200, 3.0)]);
        seal(&mut b).unwrap();
        assert_eq!(b.windows().open_windows(), 1);
        drop(b);
        if !known {
            rusqlite::Connection::open(&path)
                .unwrap()
                .execute("DELETE FROM window_rule", [])
                .unwrap();
        }
        let mut b = open_with(&path, &rule("count"));
        append(&mut b, "k/x", &[(100, 1.0)]);
        seal(&mut b).expect("the seal goes through");
        let mut want = vec![got("k/x", 100, "1", false)];
        if known {
            want.push(got(&format!("{key}/max_1s"), 0, "3", false));
        }
        assert_eq!(drain(&mut b), want, "functions known: {known}");
        assert_eq!(b.windows().open_windows(), 0);
    }
}

#[test]
fn a_failed_seal_whose_reload_fails_too_reloads_the_windows_before_the_next_seal() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    append(&mut b, "m/a", &[(100, 1.0), (200, 3.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![],
        "[0, 1000) open with 2 committed readings"
    );
    append(&mut b, "m/a", &[(300, 5.0), (1600, 7.0)]);
    // The commit fails, and so does putting the committed window states back (the engine is left empty).
    b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
    b.reload_faults = 1;
    assert!(seal(&mut b).is_err());
    // The next seal reloads them first: the window holds the 2 committed readings and 300 once.
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/a/count_1s", 0, "3i", false),
            got("m/a/mean_1s", 0, "3", false)
        ]
    );
}

/// A series that stopped reporting under `keep_raw = false`: a seal with no reading ready closes its open window
/// once the clock says it is silent for `idle_close_ms` past the window's end (before, the readings folded into it
/// never landed), in a transaction that keeps the state, so neither a failed seal nor a reopen repeats or loses it.
/// A window of a narrowed rule (an orphan) closes without any reading too.
#[test]
fn a_seal_without_readings_closes_the_windows_of_a_silent_series_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let rules = RULES.replace(
        "keep_raw = false",
        "keep_raw = false\nidle_close_ms = 60000",
    );
    let mut b = open_with(&path, &rules);
    append(&mut b, "m/a", &[(100, 1.0), (200, 3.0)]);
    seal(&mut b).unwrap();
    assert_eq!(drain(&mut b), vec![], "[0, 1000) open (lateness 500)");
    // The watermark would reach 1000 at NOW_MS + 1300: silent 60 s beyond that, the window closes.
    let closes = NOW_MS + 1300 + 60_000;
    let r = seal_at(&mut b, closes - 1).unwrap();
    assert_eq!((r.batches, drain(&mut b)), (0, vec![]));
    // (The pairs are scanned once a second of the clock.)
    b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
    assert!(seal_at(&mut b, closes + 1_000).is_err());
    assert_eq!(drain(&mut b), vec![], "nothing committed");
    // The failed seal reloaded the states, and with them the silence's start: timed again from the next scan.
    seal_at(&mut b, closes + 2_000).unwrap();
    assert_eq!(drain(&mut b), vec![]);
    let r = seal_at(&mut b, closes + 2_000 + 61_300).unwrap();
    assert_eq!(r.batches, 1);
    let want = vec![
        got("m/a/count_1s", 0, "2i", false),
        got("m/a/mean_1s", 0, "2", false),
    ];
    assert_eq!(drain(&mut b), want);
    assert_eq!(b.windows().open_windows(), 0);
    let l = b.ledger();
    assert_eq!((l.window_withheld, l.window_derived), (2, 2));
    drop(b);
    let mut b = open_with(&path, &rules);
    assert_eq!(b.windows().open_windows(), 0, "closed for good");
    seal_at(&mut b, closes + 10_000_000).unwrap();
    seal_at(&mut b, closes + 20_000_000).unwrap();
    assert_eq!(drain(&mut b), vec![]);

    // An orphan's window closes at the next seal, readings or not.
    append(&mut b, "m/b", &[(100, 1.0)]);
    seal(&mut b).unwrap();
    drop(b);
    let mut b = open_with(
        &path,
        &rules.replace("series = \"m/+\"", "series = \"m/c\""),
    );
    assert_eq!(b.windows().open_windows(), 1);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/b/count_1s", 0, "1i", false),
            got("m/b/mean_1s", 0, "1", false)
        ]
    );
}

/// A `keep_raw = false` rule removed while a window held readings (deleted unsent when they were folded in): the
/// next seal sends the window's aggregates with the functions the rule had, once, through a failed seal and later
/// starts. Renamed instead, the rule under its new name takes the window over and emits it once with every reading.
#[test]
fn a_removed_or_renamed_rules_open_window_lands_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    with_open_window(&path);
    // The last rule removed: no rule is configured any more.
    let without = "";
    let mut b = open_with(&path, without);
    append(&mut b, "k/x", &[(50, 4.0)]);
    b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
    assert!(seal(&mut b).is_err(), "the first try fails");
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("k/x", 50, "4", false),
            got("m/a/count_1s", 0, "2i", false),
            got("m/a/mean_1s", 0, "2", false)
        ]
    );
    drop(b);
    let mut b = open_with(&path, without);
    append(&mut b, "k/x", &[(1100, 1.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![got("k/x", 1100, "1", false)],
        "not again"
    );
    drop(b);

    let path = dir.path().join("renamed.db");
    with_open_window(&path);
    let renamed = RULES.replace("name = \"mean\"", "name = \"average\"");
    let mut b = open_with(&path, &renamed);
    append(&mut b, "m/a", &[(500, 8.0), (1600, 0.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/a/count_1s", 0, "3i", false),
            got("m/a/mean_1s", 0, "4", false)
        ],
        "one window, every reading"
    );
    drop(b);
    let mut b = open_with(&path, &renamed);
    append(&mut b, "m/a", &[(2600, 2.0)]);
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/a/count_1s", 1000, "1i", false),
            got("m/a/mean_1s", 1000, "0", false)
        ]
    );
}

/// States committed by a version that did not keep the rules' functions (an upgrade): a start with the rule
/// configured writes them at once, so a run that commits no state before the rule is removed still leaves its
/// windows closable.
#[test]
fn a_rules_functions_are_kept_from_the_first_start_after_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    with_open_window(&path);
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("DELETE FROM window_rule", [])
        .unwrap();
    drop(open(&path)); // the upgraded agent's first run: no seal
    let mut b = open_with(&path, "");
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/a/count_1s", 0, "2i", false),
            got("m/a/mean_1s", 0, "2", false)
        ]
    );
}

/// A function moved, at a restart, from a rule that goes on to one with a shorter lateness that had already closed
/// the window: the first seal, with no reading of the series, sends that function's value of the window, named.
#[test]
fn a_function_moved_at_a_restart_is_sent_by_a_seal_without_readings() {
    let rule = |name: &str, funcs: &str, lateness: u32| {
        format!("[[rules]]\nname = \"{name}\"\nseries = \"m/+\"\nsizes_ms = [1000]\nfunctions = [{funcs}]\nallowed_lateness_ms = {lateness}\nkeep_raw = false\n")
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let before = format!(
        "{}{}",
        rule("a", "\"count\"", 2000),
        rule("b", "\"max\"", 0)
    );
    let mut b = open_with(&path, &before);
    append(&mut b, "m/a", &[(100, 4.0), (1500, 2.0)]);
    seal(&mut b).unwrap();
    assert_eq!(drain(&mut b), vec![got("m/a/max_1s", 0, "4", false)]);
    drop(b);
    let after = format!(
        "{}{}",
        rule("a", "\"sum\"", 2000),
        rule("b", "\"max\", \"count\"", 0)
    );
    let mut b = open_with(&path, &after);
    seal(&mut b).unwrap();
    assert_eq!(drain(&mut b), vec![got("m/a/count_1s", 0, "1i", false)]);
}

/// A rule renamed: what the old name emitted stays closed under the new one from the first window it emitted on
/// (kept in `window_since`), so a reading of an earlier window the old name never emitted still gets its value.
/// When another (older) agent sealed the buffer since, `window_since` is not trusted and the old name's whole
/// watermark counts: that reading is late (sent raw and flagged, `late = "raw"`).
#[test]
fn a_renamed_rule_trusts_the_first_emitted_window_only_when_this_version_sealed_last() {
    let rule = |name: &str| {
        format!("[[rules]]\nname = \"{name}\"\nseries = \"m/+\"\nsizes_ms = [1000]\nfunctions = [\"count\"]\nlate = \"raw\"\nkeep_raw = false\n")
    };
    for older_sealed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let mut b = open_with(&path, &rule("a"));
        append(&mut b, "m/a", &[(100, 1.0), (3500, 1.0)]);
        seal(&mut b).unwrap();
        assert_eq!(drain(&mut b), vec![got("m/a/count_1s", 0, "1i", false)]);
        drop(b);
        if older_sealed {
            rusqlite::Connection::open(&path)
                .unwrap()
                .execute(
                    "UPDATE meta SET value = value + 1 WHERE key = 'next_seq'",
                    [],
                )
                .unwrap();
        }
        let mut b = open_with(&path, &rule("b"));
        append(&mut b, "m/a", &[(-500, 1.0), (5000, 1.0)]);
        seal(&mut b).unwrap();
        let want = if older_sealed {
            vec![
                got("m/a", -500, "1", true),
                got("m/a/count_1s", 3000, "1i", false),
            ]
        } else {
            vec![
                got("m/a/count_1s", -1000, "1i", false),
                got("m/a/count_1s", 3000, "1i", false),
            ]
        };
        assert_eq!(
            drain(&mut b),
            want,
            "an older agent sealed since: {older_sealed}"
        );
    }
}

/// `fieldlink-agent drain`: with every window to close, the next seal closes and sends every open window with its
/// readings, without any reading ready, once through a failed seal (which reloads the engine) and a reopen; a
/// reading of such a window arriving later is late. `left` counts what the file holds that Kinesis lacks.
#[test]
fn closing_all_windows_sends_every_open_window_once_and_left_counts_what_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let mut b = open(&path);
    append(&mut b, "m/a", &[(100, 1.0), (200, 3.0)]);
    append(&mut b, "k/a", &[(100, 4.0)]);
    seal(&mut b).unwrap();
    let left = b.left().unwrap();
    assert_eq!(
        (
            left.open_windows,
            left.pending_batches,
            left.pending_readings,
            left.unsealed_readings
        ),
        (2, 1, 1, 0),
        "k/a's raw reading pending, m/a's withheld, both windows open"
    );
    assert!(!left.is_drained());
    append(&mut b, "k/b", &[(100, 7.0)]);
    assert_eq!(b.left().unwrap().unsealed_readings, 1);
    b.close_all_windows();
    b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
    b.reload_faults = 2;
    assert!(seal(&mut b).is_err());
    assert!(
        b.left().is_err(),
        "the states could not be reloaded: nothing to count on"
    );
    b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
    assert!(seal(&mut b).is_err());
    assert_eq!(b.left().unwrap().open_windows, 2, "nothing committed");
    seal(&mut b).unwrap();
    assert_eq!(
        drain(&mut b),
        vec![
            got("k/a", 100, "4", false),
            got("k/a/max_1s", 0, "4", false),
            got("k/b", 100, "7", false),
            got("k/b/max_1s", 0, "7", false),
            got("m/a/count_1s", 0, "2i", false),
            got("m/a/mean_1s", 0, "2", false),
        ]
    );
    let left = b.left().unwrap();
    assert!(left.is_drained(), "{left:?}");
    assert_eq!(left, Left::default());
    // Nothing is sent twice by later seals, and after a reopen the windows stay closed: a reading of one is late
    // (`late = "raw"`: sent raw, flagged).
    seal(&mut b).unwrap();
    assert_eq!(drain(&mut b), vec![]);
    drop(b);
    let mut b = open(&path);
    assert_eq!(b.windows().open_windows(), 0);
    append(&mut b, "m/a", &[(300, 5.0)]);
    seal(&mut b).unwrap();
    assert_eq!(drain(&mut b), vec![got("m/a", 300, "5", true)]);
}

/// A drain's seal in several parts (a backlog of unsealed readings): only the last part closes every window, so
/// each lands named and once; windows of series the first part does not hold are not closed by it (closed there,
/// their values had no series name and were dropped, and later readings of the windows came late).
#[test]
fn a_drain_sealed_in_parts_closes_every_window_once_in_its_last_part() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    append(&mut b, "m/a", &[(100, 1.0), (200, 3.0)]);
    seal(&mut b).unwrap();
    assert_eq!(drain(&mut b), vec![]);
    append(&mut b, "m/b", &[(100, 4.0)]);
    append(&mut b, "m/b", &[(200, 6.0)]);
    append(&mut b, "m/a", &[(300, 5.0)]);
    b.close_all_windows();
    let mut parts = 0;
    while seal_part(&mut b, NOW_MS, 1).unwrap().rows > 0 {
        parts += 1;
    }
    assert_eq!(parts, 3, "one group per part");
    assert_eq!(
        drain(&mut b),
        vec![
            got("m/a/count_1s", 0, "3i", false),
            got("m/a/mean_1s", 0, "3", false),
            got("m/b/count_1s", 0, "2i", false),
            got("m/b/mean_1s", 0, "5", false),
        ]
    );
    assert!(b.left().unwrap().is_drained());
    assert_eq!(b.ledger().window_withheld, 5);
}

/// Memory: without window rules the released readings become rows in their own allocation, not in a vector of
/// their own: a row has a released reading's layout, so the capacity stays the released vector's (a fresh vector's
/// would be the rows' count).
#[test]
fn without_rules_the_rows_take_the_released_readings_allocation() {
    let mut released = Vec::with_capacity(1000);
    released.extend((0..700).map(|i| crate::order::Out {
        series: 1,
        ts_ms: i,
        value: Value::F64(i as f64),
        quality: Quality::Good,
        late: false,
    }));
    let step = windows::window_step(
        &mut crate::window::Engine::default(),
        released,
        &HashMap::new(),
        0,
    );
    assert_eq!(step.rows.len(), 700);
    assert_eq!(
        step.rows.capacity(),
        1000,
        "the rows were not collected in place"
    );
}

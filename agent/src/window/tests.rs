#![allow(clippy::unwrap_used)]
use super::*;
use std::collections::BTreeMap;

fn engine(toml_text: &str) -> Engine {
    let cfg: WindowsConfig = toml::from_str(toml_text).unwrap();
    let problems = cfg.validate("windows");
    assert!(problems.is_empty(), "{problems:?}");
    Engine::from_config(&cfg)
}

fn obs(ts: i64, v: &Value) -> Obs<'_> {
    Obs {
        ts_ms: ts,
        value: v,
        quality: Quality::Good,
    }
}

/// Feeds `(ts, value)` readings of series 1 (`key`); returns the fates and `(derived key, start, value)`.
fn feed(
    e: &mut Engine,
    key: &str,
    readings: &[(i64, f64)],
) -> (Vec<RawFate>, Vec<(String, i64, Value)>) {
    let s = Series::new(key);
    let mut out = Vec::new();
    let fates = readings
        .iter()
        .map(|&(ts, v)| e.observe(1, &s, obs(ts, &Value::F64(v)), &mut out))
        .collect();
    let derived = out
        .iter()
        .map(|x| (e.derived_series(x, &s).key, x.start_ms, x.value.clone()))
        .collect();
    (fates, derived)
}

const POWER: &str = r#"
[[rules]]
name = "power-1m"
series = "plant/+/power"
sizes_ms = [60000]
functions = ["count", "min", "max", "mean", "sum", "first", "last"]
"#;

#[test]
fn a_window_closes_when_the_watermark_reaches_its_end_and_is_stamped_with_its_start() {
    let mut e = engine(POWER);
    let (_, out) = feed(
        &mut e,
        "plant/m1/power",
        &[(60_000, 4.0), (90_000, 1.0), (119_999, 7.0)],
    );
    assert!(out.is_empty(), "nothing closes before 120000: {out:?}");
    let (_, out) = feed(&mut e, "plant/m1/power", &[(120_000, 100.0)]);
    let k = |f: &str| format!("plant/m1/power/{f}_60s");
    assert_eq!(
        out,
        vec![
            (k("count"), 60_000, Value::I64(3)),
            (k("min"), 60_000, Value::F64(1.0)),
            (k("max"), 60_000, Value::F64(7.0)),
            (k("mean"), 60_000, Value::F64(4.0)),
            (k("sum"), 60_000, Value::F64(12.0)),
            (k("first"), 60_000, Value::F64(4.0)),
            (k("last"), 60_000, Value::F64(7.0)),
        ]
    );
    assert_eq!(e.open_windows(), 1);
}

#[test]
fn allowed_lateness_keeps_a_window_open_for_readings_that_come_out_of_order() {
    let mut e = engine(&format!("{POWER}allowed_lateness_ms = 30000\n"));
    // 125000 would close [60000, 120000) without lateness; with 30 s, only 150000 does.
    let (fates, out) = feed(
        &mut e,
        "plant/m1/power",
        &[
            (100_000, 1.0),
            (125_000, 2.0),
            (110_000, 3.0),
            (70_000, 5.0),
        ],
    );
    assert!(out.is_empty());
    assert_eq!(fates, vec![RawFate::Send; 4]);
    let (_, out) = feed(&mut e, "plant/m1/power", &[(150_000, 0.0)]);
    let got: Vec<_> = out
        .iter()
        .map(|(k, _, v)| (k.as_str(), v.clone()))
        .collect();
    assert!(got.contains(&("plant/m1/power/count_60s", Value::I64(3))));
    // first/last by event time, not arrival.
    assert!(got.contains(&("plant/m1/power/first_60s", Value::F64(5.0))));
    assert!(got.contains(&("plant/m1/power/last_60s", Value::F64(3.0))));
    e.committed();
    assert_eq!(e.counts().late, 0);
}

#[test]
fn a_reading_whose_window_closed_is_counted_late_and_dropped_or_sent_raw_flagged() {
    for (policy, keep_raw, fate) in [
        ("drop", true, RawFate::Send),
        ("drop", false, RawFate::Withhold),
        ("raw", false, RawFate::SendLate),
        ("raw", true, RawFate::SendLate),
    ] {
        let mut e = engine(&format!(
            "{POWER}late = \"{policy}\"\nkeep_raw = {keep_raw}\n"
        ));
        let (_, out) = feed(&mut e, "plant/m1/power", &[(10_000, 1.0), (60_000, 2.0)]);
        assert_eq!(out.len(), 7);
        let (fates, out) = feed(&mut e, "plant/m1/power", &[(59_999, 50.0)]);
        assert_eq!(fates, vec![fate], "{policy} keep_raw={keep_raw}");
        assert!(out.is_empty());
        e.committed();
        assert_eq!(e.counts().late, 1);
        // The late value went into no window.
        let (_, out) = feed(&mut e, "plant/m1/power", &[(200_000, 0.0)]);
        assert!(out.contains(&("plant/m1/power/max_60s".into(), 60_000, Value::F64(2.0))));
    }
}

#[test]
fn readings_the_windows_cannot_aggregate_are_always_sent() {
    let mut e = engine(&format!("{POWER}keep_raw = false\n"));
    let s = Series::new("plant/m1/power");
    let mut out = Vec::new();
    for (v, q) in [
        (Value::Str("x".into()), Quality::Good),
        (Value::F64(f64::NAN), Quality::Good),
        (Value::F64(3.0), Quality::Bad),
    ] {
        let fate = e.observe(
            1,
            &s,
            Obs {
                ts_ms: 1,
                value: &v,
                quality: q,
            },
            &mut out,
        );
        assert_eq!(fate, RawFate::Send);
    }
    assert_eq!(e.open_windows(), 0);
    // Integers and booleans are numbers; uncertain quality counts.
    for v in [Value::I64(4), Value::Bool(true)] {
        let fate = e.observe(
            1,
            &s,
            Obs {
                ts_ms: 2,
                value: &v,
                quality: Quality::Uncertain,
            },
            &mut out,
        );
        assert_eq!(fate, RawFate::Withhold);
    }
    e.observe(1, &s, obs(60_000, &Value::F64(0.0)), &mut out);
    let sum = out.iter().find(|x| x.func == Func::Sum).unwrap();
    assert_eq!(sum.value, Value::F64(5.0));
}

#[test]
fn unmatched_series_are_sent_and_untouched() {
    let mut e = engine(&format!("{POWER}keep_raw = false\n"));
    let (fates, out) = feed(&mut e, "plant/m1/voltage", &[(1, 1.0), (100_000, 1.0)]);
    assert_eq!(fates, vec![RawFate::Send; 2]);
    assert!(out.is_empty());
    assert!(e.state(0, 1).is_none());
}

#[test]
fn several_sizes_close_independently_and_are_named_by_size() {
    let mut e = engine(
        r##"
[[rules]]
name = "w"
series = "#"
sizes_ms = [10000, 60000, 250]
functions = ["mean"]
"##,
    );
    let (_, out) = feed(&mut e, "a/b", &[(0, 2.0), (5_000, 4.0), (10_000, 6.0)]);
    assert_eq!(
        out,
        vec![
            ("a/b/mean_250ms".into(), 0, Value::F64(2.0)),
            // One reading closes windows of the sizes in the rule's order.
            ("a/b/mean_10s".into(), 0, Value::F64(3.0)),
            ("a/b/mean_250ms".into(), 5000, Value::F64(4.0)),
        ]
    );
}

#[test]
fn negative_event_times_use_floor_alignment() {
    let mut e = engine(POWER);
    let (_, out) = feed(&mut e, "plant/m/power", &[(-1, 1.0), (0, 2.0)]);
    assert_eq!(out[0].1, -60_000);
}

/// A reading that needs a new window beyond the cap is left out of it and counted; it is sent raw, flagged late
/// under `late = "raw"`, and also under `keep_raw = false` with the default `late = "drop"`, where an aggregated
/// reading is withheld and a late one dropped by choice: the cap is the agent's limit, not the operator's choice.
#[test]
fn beyond_the_cap_a_new_window_is_an_overflow_and_its_reading_is_sent_raw() {
    use RawFate::{Send, SendLate, Withhold};
    for (settings, want) in [
        ("late = \"raw\"", [Send, Send, SendLate, Send]),
        ("keep_raw = false", [Withhold, Withhold, Send, Withhold]),
    ] {
        let mut e = engine(&format!(
            "max_open_windows = 2\n{POWER}{settings}\nallowed_lateness_ms = 600000\n"
        ));
        let (fates, _) = feed(
            &mut e,
            "plant/m/power",
            &[(0, 1.0), (60_000, 1.0), (120_000, 1.0), (1_000, 1.0)],
        );
        assert_eq!(fates, want, "{settings}");
        e.committed();
        assert_eq!(e.counts().overflow, 1);
        assert_eq!(e.open_windows(), 2);
    }
}

/// A reading stamped 20 h ahead (a device clock's glitch) joins its own window but does not move the watermark
/// (it is more than an hour ahead of the series and of the seal's clock): the open window is not closed early and
/// the readings after it are aggregated, not late (under `keep_raw = false` and `late = "drop"` they were deleted
/// for 20 h). An agent clock behind the devices' does not hold windows back.
#[test]
fn a_reading_from_the_future_neither_closes_windows_early_nor_makes_the_next_ones_late() {
    const GLITCH: i64 = 20 * 3_600_000;
    let mut e = engine(&format!(
        "{POWER}keep_raw = false\nallowed_lateness_ms = 5000\n"
    ));
    e.set_clock(119_500);
    let (fates, out) = feed(
        &mut e,
        "plant/m/power",
        &[(60_000, 1.0), (90_000, 2.0), (GLITCH, 9.0), (119_000, 3.0)],
    );
    assert_eq!(fates, vec![RawFate::Withhold; 4]);
    assert!(out.is_empty(), "closed early: {out:?}");
    e.set_clock(126_000);
    let (fates, out) = feed(&mut e, "plant/m/power", &[(125_000, 4.0)]);
    assert_eq!(fates, vec![RawFate::Withhold]);
    let k = |f: &str| format!("plant/m/power/{f}_60s");
    assert!(
        out.contains(&(k("count"), 60_000, Value::I64(3))),
        "{out:?}"
    );
    assert!(
        out.contains(&(k("sum"), 60_000, Value::F64(6.0))),
        "{out:?}"
    );
    e.committed();
    assert_eq!(e.counts().late, 0);

    // An agent clock far behind its devices' (booted with its image's time): steady readings still close windows.
    let mut e = engine(POWER);
    e.set_clock(0);
    let (_, out) = feed(
        &mut e,
        "plant/m/power",
        &[
            (GLITCH, 1.0),
            (GLITCH + 30_000, 2.0),
            (GLITCH + 60_000, 3.0),
        ],
    );
    assert!(
        out.contains(&(k("count"), GLITCH, Value::I64(2))),
        "{out:?}"
    );

    // A device stamping two hours ahead of a right agent clock, silent overnight: its morning readings are more
    // than an hour ahead of both its last reading and the clock; the second one confirms the jump.
    const H: i64 = 3_600_000;
    let mut e = engine(POWER);
    e.set_clock(18 * H);
    feed(
        &mut e,
        "plant/m/power",
        &[(20 * H, 1.0), (20 * H + 30_000, 1.0)],
    );
    e.set_clock(30 * H);
    let (_, out) = feed(
        &mut e,
        "plant/m/power",
        &[
            (32 * H, 1.0),
            (32 * H + 30_000, 2.0),
            (32 * H + 60_000, 3.0),
        ],
    );
    assert!(
        out.contains(&(k("count"), 20 * H, Value::I64(2))),
        "{out:?}"
    );
    assert!(
        out.contains(&(k("count"), 32 * H, Value::I64(2))),
        "{out:?}"
    );

    // A glitch as a pair's first reading: held aside, the next readings set the watermark.
    let mut e = engine(POWER);
    e.set_clock(119_500);
    let (_, out) = feed(
        &mut e,
        "plant/m/power",
        &[(GLITCH, 9.0), (60_000, 1.0), (90_000, 2.0), (125_000, 3.0)],
    );
    assert!(
        out.contains(&(k("count"), 60_000, Value::I64(2))),
        "{out:?}"
    );
    e.committed();
    assert_eq!(e.counts().late, 0);
}

/// Readings ahead of the agent's clock by a steady two hours, two hours apart (each beyond reach of the last):
/// the second confirms the offset and windows close; glitches that do not keep one offset, or that a reading in
/// reach came between, confirm nothing.
#[test]
fn a_steady_clock_offset_is_taken_however_slow_the_series_and_glitches_are_not() {
    const H: i64 = 3_600_000;
    let k = |f: &str| format!("plant/m/power/{f}_60s");
    let mut e = engine(POWER);
    let mut out = Vec::new();
    for i in 0..4 {
        e.set_clock(10 * H + 2 * i * H);
        out.extend(feed(&mut e, "plant/m/power", &[(12 * H + 2 * i * H, 1.0)]).1);
    }
    for start in [12 * H, 14 * H, 16 * H] {
        assert!(
            out.contains(&(k("count"), start, Value::I64(1))),
            "{start}: {out:?}"
        );
    }

    // Two glitches three hours apart at the same clock, then a glitch a second after one a reading in reach
    // came after: nothing closes early, nothing is late.
    let mut e = engine(POWER);
    e.set_clock(100_000);
    let (_, out) = feed(
        &mut e,
        "plant/m/power",
        &[
            (60_000, 1.0),
            (20 * H, 9.0),
            (23 * H, 9.0),
            (70_000, 2.0),
            (23 * H + 1_000, 9.0),
            (90_000, 3.0),
        ],
    );
    assert!(out.is_empty(), "closed early: {out:?}");
    e.set_clock(125_000);
    let (_, out) = feed(&mut e, "plant/m/power", &[(121_000, 4.0)]);
    assert!(
        out.contains(&(k("count"), 60_000, Value::I64(3))),
        "{out:?}"
    );
    e.committed();
    assert_eq!(e.counts().late, 0);
}

#[test]
fn tags_must_match_and_are_carried_to_derived_series() {
    let mut e = engine(&format!("{POWER}tags = {{ site = \"muc\" }}\n"));
    let s = Series {
        key: "plant/m/power".into(),
        tags: vec![("site".into(), "muc".into())],
    };
    let other = Series::new("plant/n/power");
    let mut out = Vec::new();
    for ts in [0, 60_000] {
        e.observe(1, &s, obs(ts, &Value::F64(1.0)), &mut out);
        e.observe(2, &other, obs(ts, &Value::F64(1.0)), &mut out);
    }
    assert_eq!(out.len(), 7);
    assert!(out.iter().all(|x| x.series_id == 1));
    assert_eq!(e.derived_series(&out[0], &s).tags, s.tags);
}

#[test]
fn a_key_too_long_for_its_derived_series_is_not_matched() {
    let e = engine(POWER);
    let long = format!("plant/{}/power", "x".repeat(1020));
    assert!(!e.rules()[0].matches(&Series::new(long)));
}

/// A run cut at random points, each followed by persisting the dirty states and loading them into a fresh
/// engine (what a restart does), emits exactly what an uninterrupted run emits; uncommitted work is redone.
#[test]
fn restarts_from_persisted_states_neither_repeat_nor_lose_a_window() {
    let cfg = r#"
[[rules]]
name = "a"
series = "s/+"
sizes_ms = [1000, 7000]
functions = ["count", "sum", "first", "last", "min", "max"]
allowed_lateness_ms = 2500
late = "raw"
[[rules]]
name = "b"
series = "s/1"
sizes_ms = [3000]
functions = ["mean"]
keep_raw = false
"#;
    for seed in 0..50u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let readings: Vec<(i64, i64, f64)> = (0..400)
            .map(|i| {
                let sid = rng.i64(1..=3);
                let jitter = rng.i64(-4000..=500);
                (sid, i * 100 + jitter, f64::from(rng.i32(-1000..1000)) / 8.0)
            })
            .collect();
        let series = |sid: i64| Series::new(format!("s/{sid}"));
        let run = |cuts: &[usize], fail: &[usize]| {
            let mut db: HashMap<(String, i64), Vec<u8>> = HashMap::new();
            let mut e = engine(cfg);
            let (mut emitted, mut fates) = (Vec::new(), Vec::new());
            let mut i = 0;
            for (c, &end) in cuts.iter().chain([&readings.len()]).enumerate() {
                let mut out = Vec::new();
                let mut f = Vec::new();
                for &(sid, ts, v) in &readings[i..end] {
                    f.push(e.observe(sid, &series(sid), obs(ts, &Value::F64(v)), &mut out));
                }
                let dirty = e.take_dirty();
                if fail.contains(&c) {
                    // The commit failed: reload the committed states and do the chunk again.
                    e.reset();
                    for ((r, sid), b) in &db {
                        assert_eq!(e.load_state(r, *sid, None, b), Loaded::Yes);
                    }
                    out.clear();
                    f.clear();
                    for &(sid, ts, v) in &readings[i..end] {
                        f.push(e.observe(sid, &series(sid), obs(ts, &Value::F64(v)), &mut out));
                    }
                    let dirty = e.take_dirty();
                    db.extend(dirty.into_iter().map(|(r, s, b)| ((r, s), b)));
                } else {
                    db.extend(dirty.into_iter().map(|(r, s, b)| ((r, s), b)));
                }
                e.committed();
                emitted.extend(out.into_iter().map(|x| {
                    (
                        x.rule,
                        x.series_id,
                        x.size,
                        x.func,
                        x.start_ms,
                        format!("{:?}", x.value),
                    )
                }));
                fates.extend(f);
                // A restart: a fresh engine from the committed states.
                let open = e.open_windows();
                e = engine(cfg);
                for ((r, sid), b) in &db {
                    assert_eq!(e.load_state(r, *sid, None, b), Loaded::Yes);
                }
                assert_eq!(e.open_windows(), open);
                i = end;
            }
            (emitted, fates)
        };
        let whole = run(&[], &[]);
        let mut cuts: Vec<usize> = (0..rng.usize(1..8))
            .map(|_| rng.usize(0..readings.len()))
            .collect();
        cuts.sort_unstable();
        let fail: Vec<usize> = (0..cuts.len()).filter(|_| rng.bool()).collect();
        let cut = run(&cuts, &fail);
        assert_eq!(whole, cut, "seed {seed} cuts {cuts:?}");
        assert!(
            whole.1.contains(&RawFate::SendLate),
            "seed {seed}: no late reading"
        );
        assert!(whole.1.contains(&RawFate::Withhold));
    }
}

#[test]
fn state_bytes_round_trip_and_drop_windows_of_removed_sizes() {
    let mut e = engine(
        r##"
[[rules]]
name = "w"
series = "#"
sizes_ms = [1000, 5000]
functions = ["sum"]
allowed_lateness_ms = 10000
"##,
    );
    feed(&mut e, "a/b", &[(100, 1.5), (2500, -2.0), (7000, 3.25)]);
    let st = e.state(0, 1).unwrap().clone();
    let b = st.to_bytes(&[1000, 5000]);
    let back = PairState::from_bytes(&b, &[1000, 5000]).unwrap();
    assert_eq!(back.newest, st.newest);
    assert_eq!(back.closed_to, Some(7000 - 10_000));
    assert_eq!(back.open, st.open);
    // Version 1 (no closed_to) still reads.
    let mut v1 = b.clone();
    v1[0] = 1;
    v1.drain(10..19);
    let old = PairState::from_bytes(&v1, &[1000, 5000]).unwrap();
    assert_eq!((old.newest, old.closed_to), (st.newest, None));
    assert_eq!(old.open, st.open);
    // Version 3: what was emitted beyond closed_to, per size, kept whatever the sizes read.
    let mut ahead = st.clone();
    ahead.emitted_to = vec![
        (1000, Func::Sum, i64::MIN, 9000),
        (60_000, Func::Last, 60_000, 60_000),
    ];
    let b3 = ahead.to_bytes(&[1000, 5000]);
    assert_eq!((b[0], b3[0]), (2, 3));
    assert_eq!(
        PairState::from_bytes(&b3, &[5000]).unwrap().emitted_to,
        ahead.emitted_to
    );
    assert!(PairState::from_bytes(&b3[..b3.len() - 1], &[1000]).is_none());
    let mut bad_func = b3.clone();
    let at = b3.len() - 17; // the last record's function code
    bad_func[at] = 7;
    assert!(PairState::from_bytes(&bad_func, &[1000]).is_none());
    let fewer = PairState::from_bytes(&b, &[5000]).unwrap();
    assert_eq!(fewer.open, vec![st.open[1].clone()]);
    assert!(PairState::from_bytes(&b[..b.len() - 1], &[1000, 5000]).is_none());
    assert!(PairState::from_bytes(&[2], &[1000]).is_none());
    assert!(PairState::from_bytes(&[3, 0, 0, 0], &[1000]).is_none());
    let mut bad_count = b.clone();
    bad_count[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(PairState::from_bytes(&bad_count, &[1000, 5000]).is_none());
}

#[test]
fn every_configuration_problem_is_named_at_once() {
    let cfg: WindowsConfig = toml::from_str(
        r#"
max_open_windows = 0
[[rules]]
name = "bad name"
series = "a/b+/c"
tags = { "" = "x" }
sizes_ms = [50, 60000, 60000]
functions = []
allowed_lateness_ms = 90000000
idle_close_ms = 90000000
[[rules]]
name = "ok"
series = "a/#"
sizes_ms = []
functions = ["mean", "mean"]
[[rules]]
name = "ok"
series = "b"
sizes_ms = [900000]
functions = ["sum"]
"#,
    )
    .unwrap();
    let all = cfg.validate("windows").join("\n");
    for want in [
        "windows.max_open_windows",
        "windows.rules[0].name",
        "windows.rules[0].series",
        "windows.rules[0].tags",
        "windows.rules[0].sizes_ms[0]",
        "windows.rules[0].sizes_ms[2]: 60000 is listed twice",
        "windows.rules[0].functions",
        "windows.rules[0].allowed_lateness_ms",
        "windows.rules[0].idle_close_ms",
        "windows.rules[1].sizes_ms",
        "windows.rules[1].functions[1]: mean is listed twice",
        "windows.rules[2].name: \"ok\" is used twice",
    ] {
        assert!(all.contains(want), "{want} missing from:\n{all}");
    }
    let idle: WindowsConfig = toml::from_str(
        "[[rules]]\nname = \"a\"\nseries = \"#\"\nsizes_ms = [1000]\nfunctions = [\"count\"]\nidle_close_ms = 500\n",
    )
    .unwrap();
    let w = idle.idle_warnings("windows", 1200);
    assert!(
        w.len() == 1 && w[0].starts_with("windows.rules[0].idle_close_ms: 500 is shorter"),
        "{w:?}"
    );
    assert!(idle.idle_warnings("windows", 400).is_empty());
    let warnings = cfg.dedup_warnings("windows", 60_000);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[1].starts_with(
        "windows.rules[2]: allowed_lateness_ms + the largest size (900000 ms) exceeds order.dedup_window_ms"
    ));
    let err = toml::from_str::<WindowsConfig>(
        "[[rules]]\nname = \"a\"\nseries = \"#\"\nsizes_ms = [1000]\nfunctions = [\"avg\"]\n",
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("avg"), "{err}");
    let err = toml::from_str::<WindowsConfig>(
        "[[rules]]\nname = \"a\"\nseries = \"#\"\nsizes_ms = [1000]\nfunctions = [\"sum\"]\nlateness = 5\n",
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("lateness"), "{err}");
}

#[test]
fn the_documented_example_is_valid() {
    let doc = include_str!("../../../docs/windows.md");
    let start = doc.find("```toml\n[windows]").unwrap() + 8;
    let end = start + doc[start..].find("```").unwrap();
    #[derive(serde::Deserialize)]
    struct Doc {
        windows: WindowsConfig,
    }
    let cfg = toml::from_str::<Doc>(&doc[start..end]).unwrap().windows;
    assert!(cfg.validate("windows").is_empty());
    assert!(!cfg.rules.is_empty());
}

#[test]
fn raising_the_lateness_does_not_open_a_window_that_was_emitted() {
    let rule = |lateness: i64| {
        format!(
            "[[rules]]\nname = \"w\"\nseries = \"#\"\nsizes_ms = [1000]\nfunctions = [\"count\"]\nallowed_lateness_ms = {lateness}\n"
        )
    };
    let mut e = engine(&rule(0));
    let (_, out) = feed(&mut e, "a/b", &[(100, 1.0), (1500, 2.0)]);
    assert_eq!(out, vec![("a/b/count_1s".into(), 0, Value::I64(1))]);
    let saved = e.state(0, 1).unwrap().to_bytes(&[1000]);
    // Restarted with 10 s of lateness: the watermark would be 1500 - 10000, but [0, 1000) was emitted.
    let mut e = engine(&rule(10_000));
    assert_eq!(e.load_state("w", 1, None, &saved), Loaded::Yes);
    let (fates, out) = feed(&mut e, "a/b", &[(200, 5.0), (1700, 3.0)]);
    assert_eq!(fates[0], RawFate::Send, "late for the rule, sent raw");
    assert!(out.is_empty(), "nothing emitted twice: {out:?}");
    assert_eq!(e.counts().late, 0, "not committed yet");
    e.committed();
    assert_eq!(e.counts().late, 1);
    // [1000, 2000) closes under the new lateness only.
    let (_, out) = feed(&mut e, "a/b", &[(11_999, 0.0), (12_000, 0.0)]);
    assert_eq!(out, vec![("a/b/count_1s".into(), 1000, Value::I64(2))]);
}

#[test]
fn two_rules_that_would_write_one_derived_series_are_refused() {
    let rules = |second: &str| {
        let text = format!(
            "[[rules]]\nname = \"a\"\nseries = \"plant/+/power\"\ntags = {{ site = \"muc\" }}\nsizes_ms = [60000, 5000]\nfunctions = [\"mean\", \"max\"]\n[[rules]]\nname = \"b\"\n{second}\n"
        );
        let cfg: WindowsConfig = toml::from_str(&text).unwrap();
        cfg.validate("windows")
    };
    let p = rules("series = \"plant/#\"\nsizes_ms = [60000]\nfunctions = [\"max\"]");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("windows.rules[1].series: \"plant/#\" and rules[0]'s \"plant/+/power\"")
            && p[0].contains("max_60s"),
        "{p:?}"
    );
    for disjoint in [
        // Other filters, another tag value, no shared size, no shared function.
        "series = \"plant/+/energy\"\nsizes_ms = [60000]\nfunctions = [\"max\"]",
        "series = \"plant/#\"\ntags = { site = \"ber\" }\nsizes_ms = [60000]\nfunctions = [\"max\"]",
        "series = \"plant/#\"\nsizes_ms = [1000]\nfunctions = [\"max\"]",
        "series = \"plant/#\"\nsizes_ms = [60000]\nfunctions = [\"sum\"]",
        "series = \"plant/m1/power/x\"\nsizes_ms = [60000]\nfunctions = [\"max\"]",
    ] {
        assert_eq!(rules(disjoint), Vec::<String>::new(), "{disjoint}");
    }
    // '#' also matches the parent level, '+' any one level.
    assert!(config::filters_overlap("a/#", "a"));
    assert!(config::filters_overlap("+/b", "a/+"));
    assert!(!config::filters_overlap("a/+", "a"));
    assert!(!config::filters_overlap("a/b", "a/b/c"));
}

/// Closes what `idle_due` finds at the intake clock `now`, as a seal without readings does; `(derived key, start,
/// value)`.
fn idle_close(e: &mut Engine, key: &str, now: i64) -> Vec<(String, i64, Value)> {
    e.set_intake_clock(now);
    let due = e.idle_due(now);
    let mut out = Vec::new();
    e.close_idle(&mut out);
    assert_eq!(
        due.is_empty(),
        out.is_empty(),
        "idle_due and close_idle disagree at {now}"
    );
    let s = Series::new(key);
    out.iter()
        .map(|x| (e.derived_series(x, &s).key, x.start_ms, x.value.clone()))
        .collect()
}

/// Feeds readings of series 1 at the intake clock `now` (and a wall clock far from the readings' times).
fn feed_at(
    e: &mut Engine,
    now: i64,
    readings: &[(i64, f64)],
) -> (Vec<RawFate>, Vec<(String, i64, Value)>) {
    e.set_clock(1_800_000_000_000);
    e.set_intake_clock(now);
    feed(e, "plant/m/power", readings)
}

/// A series that stops reporting (a sensor removed): its open window closes once the intake clock is
/// `idle_close_ms` past the moment its watermark would have reached the window's end, so the readings folded into
/// it land (under `keep_raw = false` they never did: no reading came to close it). A reading of that window
/// arriving later is late; one of the next window opens it as usual. `idle_close_ms = 0` keeps the old behaviour.
#[test]
fn the_clock_closes_the_last_windows_of_a_series_that_stopped_reporting() {
    const IDLE: i64 = 600_000;
    let rule =
        format!("{POWER}keep_raw = false\nallowed_lateness_ms = 5000\nidle_close_ms = {IDLE}\n");
    let mut e = engine(&rule);
    // Event times far from both clocks: the silence is timed by the intake clock, whatever the offset.
    let (fates, out) = feed_at(
        &mut e,
        100_000,
        &[(60_000, 1.0), (65_000, 2.0), (70_000, 3.0)],
    );
    assert_eq!(fates, vec![RawFate::Withhold; 3]);
    assert!(out.is_empty());
    // The watermark would reach 120000 (the window's end) 55 s after the last reading; the window closes IDLE
    // later.
    let closes_at = 100_000 + (120_000 + 5_000 - 70_000) + IDLE;
    assert!(idle_close(&mut e, "plant/m/power", closes_at - 1_000).is_empty());
    let k = |f: &str| format!("plant/m/power/{f}_60s");
    let out = idle_close(&mut e, "plant/m/power", closes_at);
    for want in [(k("count"), Value::I64(3)), (k("sum"), Value::F64(6.0))] {
        assert!(out.contains(&(want.0, 60_000, want.1)), "{out:?}");
    }
    assert_eq!(e.open_windows(), 0);
    assert!(e.take_dirty().len() == 1, "the closed state is persisted");
    assert!(idle_close(&mut e, "plant/m/power", closes_at + 60_000).is_empty());
    // A reading of the closed window is late; one of the next window is aggregated.
    let (_, out) = feed_at(
        &mut e,
        closes_at + 60_000,
        &[(110_000, 4.0), (130_000, 5.0)],
    );
    assert!(out.is_empty());
    e.committed();
    let c = e.counts();
    assert_eq!((c.late, c.aggregated, c.idle_closed), (1, 4, 1));

    // Each reading restarts the silence: readings IDLE apart whose times do not advance (so only the clock could
    // close their window) never let it close; without the restart the second scan would.
    let mut e = engine(&rule);
    for i in 0..5 {
        let now = 100_000 + i * IDLE;
        feed_at(&mut e, now, &[(60_000 + i, 1.0)]);
        assert!(idle_close(&mut e, "plant/m/power", now + IDLE).is_empty());
    }
    assert!(!idle_close(&mut e, "plant/m/power", 100_000 + 5 * IDLE + 70_000).is_empty());

    // A pair whose only reading is held aside for being hours ahead of the clocks has no newest time: the reading
    // stands in, and its window closes too.
    let mut e = engine(&rule);
    e.set_clock(0);
    e.set_intake_clock(0);
    feed(&mut e, "plant/m/power", &[(20 * 3_600_000, 1.0)]);
    assert_eq!(e.open_windows(), 1);
    assert_eq!(
        idle_close(&mut e, "plant/m/power", 60_000 + 5_000 + IDLE).len(),
        7
    );

    // 0: only readings close windows.
    let mut e = engine(&format!("{POWER}idle_close_ms = 0\n"));
    feed_at(&mut e, 100_000, &[(60_000, 1.0)]);
    assert!(idle_close(&mut e, "plant/m/power", i64::MAX / 2).is_empty());
}

/// The silence is timed in memory: after a reload (a restart, a failed commit) it starts at the first scan, so a
/// window is never closed earlier than it would have been without it.
#[test]
fn after_a_reload_the_silence_is_timed_from_the_first_scan() {
    let rule = format!("{POWER}idle_close_ms = 60000\n");
    let mut e = engine(&rule);
    feed_at(&mut e, 100_000, &[(60_000, 1.0)]);
    let (name, sid, bytes) = e.take_dirty().pop().unwrap();
    let mut e = engine(&rule);
    assert_eq!(e.load_state(&name, sid, None, &bytes), Loaded::Yes);
    // Long after the window would have closed without the restart: the first scan only starts the timer.
    assert!(idle_close(&mut e, "plant/m/power", 10_000_000).is_empty());
    assert!(idle_close(&mut e, "plant/m/power", 10_000_000 + 119_000).is_empty());
    let out = idle_close(&mut e, "plant/m/power", 10_000_000 + 120_000);
    assert_eq!(out.len(), 7, "{out:?}");
}

/// The committed rows of `e` (`take_dirty`) merged into `db`.
fn commit(e: &mut Engine, db: &mut BTreeMap<(String, i64), Vec<u8>>) {
    db.extend(e.take_dirty().into_iter().map(|(r, s, b)| ((r, s), b)));
    e.committed();
}

/// The rows an engine of `MEAN` commits after `readings` of `s/a`.
fn committed_after(readings: &[(i64, f64)]) -> BTreeMap<(String, i64), Vec<u8>> {
    let mut db = BTreeMap::new();
    let mut e = engine(MEAN);
    feed(&mut e, "s/a", readings);
    commit(&mut e, &mut db);
    db
}

/// A fresh engine of `cfg` loaded from `db` (series 1 is `key`), the functions of rule `remembered` known; returns
/// it and what each row's load gave.
fn restart(
    cfg: &str,
    db: &BTreeMap<(String, i64), Vec<u8>>,
    key: &str,
    remembered: &[(&str, &[Func])],
) -> (Engine, Vec<Loaded>) {
    let mut e = engine(cfg);
    for (name, funcs) in remembered {
        e.remember_functions(name, funcs.to_vec());
    }
    let s = Series::new(key);
    let loaded = db
        .iter()
        .map(|((r, sid), b)| e.load_state(r, *sid, Some(&s), b))
        .collect();
    (e, loaded)
}

/// Closes the orphans as a seal does; `(derived key, start, value)`.
fn close_orphans(e: &mut Engine, key: &str) -> Vec<(String, i64, Value)> {
    let mut out = Vec::new();
    e.close_orphans(&mut out);
    let s = Series::new(key);
    out.iter()
        .map(|x| (e.derived_series(x, &s).key, x.start_ms, x.value.clone()))
        .collect()
}

const MEAN: &str = r#"
[[rules]]
name = "m"
series = "s/+"
sizes_ms = [1000, 5000]
functions = ["count", "mean"]
allowed_lateness_ms = 2000
keep_raw = false
"#;

const OTHER: &str = r#"
[[rules]]
name = "o"
series = "x/+"
sizes_ms = [1000]
functions = ["max"]
"#;

/// A rule removed between two runs (under `keep_raw = false` its readings were deleted unsent): its open windows
/// close at the next seal with the functions it had, once; then its state stays, with nothing open, so a window
/// it emitted does not open again should the rule come back. Without the functions, they wait.
#[test]
fn a_removed_rules_open_windows_close_once_with_the_functions_they_had() {
    let mut db = BTreeMap::new();
    let mut e = engine(MEAN);
    let (fates, out) = feed(&mut e, "s/a", &[(100, 1.0), (300, 3.0), (1200, 5.0)]);
    assert!(fates.iter().all(|f| *f == RawFate::Withhold));
    assert!(out.is_empty());
    commit(&mut e, &mut db);
    let funcs = [Func::Count, Func::Mean];
    let (mut e, loaded) = restart(OTHER, &db, "s/a", &[("m", &funcs)]);
    assert_eq!(loaded, vec![Loaded::Orphan]);
    assert_eq!(e.open_windows(), 3);
    assert!(e.has_due(), "a seal is due without any reading");
    let k = |f: &str| format!("s/a/{f}");
    assert_eq!(
        close_orphans(&mut e, "s/a"),
        vec![
            (k("count_1s"), 0, Value::I64(2)),
            (k("mean_1s"), 0, Value::F64(2.0)),
            (k("count_1s"), 1000, Value::I64(1)),
            (k("mean_1s"), 1000, Value::F64(5.0)),
            (k("count_5s"), 0, Value::I64(3)),
            (k("mean_5s"), 0, Value::F64(3.0)),
        ]
    );
    assert_eq!(e.open_windows(), 0);
    commit(&mut e, &mut db);
    let (mut e, loaded) = restart(OTHER, &db, "s/a", &[("m", &funcs)]);
    assert_eq!(loaded, vec![Loaded::Closed]);
    assert!(close_orphans(&mut e, "s/a").is_empty());
    // The rule back: a late reading of an emitted window does not open it again.
    let (mut e, _) = restart(MEAN, &db, "s/a", &[]);
    feed(&mut e, "s/a", &[(900, 7.0)]);
    e.committed();
    assert_eq!((e.counts().late, e.open_windows()), (1, 0));
    // Functions unknown (a state committed by a version that did not keep them): the windows wait.
    let db = committed_after(&[(100, 1.0)]);
    let (mut e, loaded) = restart(OTHER, &db, "s/a", &[]);
    assert_eq!(loaded, vec![Loaded::NoRule]);
    assert!(close_orphans(&mut e, "s/a").is_empty());
}

/// A size taken out of a rule: its open windows close at the next seal, the other sizes' stay open and go on, and
/// the state written then has none of the removed size (a later start closes nothing again).
#[test]
fn a_size_taken_out_of_a_rule_closes_its_windows_once_and_keeps_the_others() {
    let mut db = committed_after(&[(100, 1.0), (300, 3.0)]);
    let fewer = MEAN.replace("[1000, 5000]", "[5000]");
    let funcs = [Func::Count, Func::Mean];
    let (mut e, loaded) = restart(&fewer, &db, "s/a", &[("m", &funcs)]);
    assert_eq!(loaded, vec![Loaded::Orphan]);
    assert_eq!(e.open_windows(), 2);
    let k = |f: &str| format!("s/a/{f}");
    assert_eq!(
        close_orphans(&mut e, "s/a"),
        vec![
            (k("count_1s"), 0, Value::I64(2)),
            (k("mean_1s"), 0, Value::F64(2.0)),
        ]
    );
    let (_, out) = feed(&mut e, "s/a", &[(4000, 5.0), (7000, 0.0)]);
    assert_eq!(
        out,
        vec![
            (k("count_5s"), 0, Value::I64(3)),
            (k("mean_5s"), 0, Value::F64(3.0)),
        ]
    );
    commit(&mut e, &mut db);
    let (mut e, loaded) = restart(&fewer, &db, "s/a", &[("m", &funcs)]);
    assert_eq!(loaded, vec![Loaded::Yes]);
    assert_eq!(e.open_windows(), 1, "[5000, 10000)");
    assert!(close_orphans(&mut e, "s/a").is_empty());
}

/// A rule renamed (or its series taken over by another rule writing the same derived series): the open windows go
/// on in the configured rule and close once, with the readings of both, instead of two values for one window.
#[test]
fn a_renamed_rule_takes_over_the_open_windows() {
    let mut db = committed_after(&[(100, 1.0), (300, 3.0)]);
    let renamed = MEAN.replace("name = \"m\"", "name = \"n\"");
    let funcs = [Func::Count, Func::Mean];
    let (mut e, loaded) = restart(&renamed, &db, "s/a", &[("m", &funcs)]);
    assert_eq!(loaded, vec![Loaded::Orphan]);
    assert!(close_orphans(&mut e, "s/a").is_empty(), "handed over");
    assert_eq!(e.open_windows(), 2);
    let (fates, out) = feed(&mut e, "s/a", &[(500, 8.0), (7000, 0.0)]);
    assert_eq!(fates, vec![RawFate::Withhold; 2]);
    let k = |f: &str| format!("s/a/{f}");
    assert_eq!(
        out,
        vec![
            (k("count_1s"), 0, Value::I64(3)),
            (k("mean_1s"), 0, Value::F64(4.0)),
            (k("count_5s"), 0, Value::I64(3)),
            (k("mean_5s"), 0, Value::F64(4.0)),
        ]
    );
    commit(&mut e, &mut db);
    assert_eq!(db.len(), 2);
    let (mut e, loaded) = restart(&renamed, &db, "s/a", &[("m", &funcs)]);
    assert_eq!(
        loaded,
        vec![Loaded::Closed, Loaded::Yes],
        "m emptied (settled again for what it closed: n writes its series), n open"
    );
    assert_eq!(e.open_windows(), 2, "[7000, 8000) and [5000, 10000)");
    assert!(close_orphans(&mut e, "s/a").is_empty());
    assert!(e.take_dirty().is_empty(), "nothing new to write");
    // The heir already has a window of that start: both rules matched the series and saw the same readings, so
    // the heir's window stands, not a sum of both, and the old rule does not emit it.
    let mut db = committed_after(&[(100, 1.0), (200, 2.0)]);
    let mut heir = engine(&renamed);
    feed(&mut heir, "s/a", &[(100, 1.0), (200, 2.0)]);
    commit(&mut heir, &mut db);
    let (mut e, _) = restart(&renamed, &db, "s/a", &[("m", &funcs)]);
    assert!(close_orphans(&mut e, "s/a").is_empty());
    let acc = e.state(0, 1).unwrap().open[0][0].1;
    assert_eq!((acc.count, acc.sum), (2, 3.0));
}

/// Rules on one series, split, merged, or a function moved between them while they ran together: each derived
/// series' window comes out once, with every reading once.
#[test]
fn rules_split_merged_or_trading_functions_emit_each_window_once() {
    let rule = |name: &str, funcs: &str| {
        format!(
            "[[rules]]\nname = \"{name}\"\nseries = \"s/+\"\nsizes_ms = [1000]\nfunctions = [{funcs}]\nallowed_lateness_ms = 2000\n"
        )
    };
    let run = |before: &str, after: &str, remembered: &[(&str, &[Func])]| {
        let mut db = BTreeMap::new();
        let mut e = engine(before);
        feed(&mut e, "s/a", &[(100, 1.0), (300, 3.0)]);
        commit(&mut e, &mut db);
        let (mut e, _) = restart(after, &db, "s/a", remembered);
        let mut out = close_orphans(&mut e, "s/a");
        commit(&mut e, &mut db);
        // Another start settles nothing again.
        let (mut e, _) = restart(after, &db, "s/a", remembered);
        out.extend(close_orphans(&mut e, "s/a"));
        let (_, later) = feed(&mut e, "s/a", &[(500, 5.0), (4000, 0.0)]);
        out.extend(later);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    };
    let k = |f: &str| format!("s/a/{f}_1s");
    let (count, mean, max) = (
        (k("count"), 0, Value::I64(3)),
        (k("mean"), 0, Value::F64(3.0)),
        (k("max"), 0, Value::F64(5.0)),
    );
    let (c, m, x) = (Func::Count, Func::Mean, Func::Max);
    // Merged: a {count} and b {max} into a new c {count, max}.
    let before = format!("{}{}", rule("a", "\"count\""), rule("b", "\"max\""));
    let after = rule("c", "\"count\", \"max\"");
    assert_eq!(
        run(&before, &after, &[("a", &[c]), ("b", &[x])]),
        vec![count.clone(), max.clone()]
    );
    // Split, the name kept: a {count, mean} into a {mean} and a new d {count}.
    let before = rule("a", "\"count\", \"mean\"");
    let after = format!("{}{}", rule("a", "\"mean\""), rule("d", "\"count\""));
    assert_eq!(
        run(&before, &after, &[("a", &[c, m])]),
        vec![count.clone(), mean.clone()]
    );
    // A function moved to a rule that ran beside: a {count}, b {mean} into b {count, mean}.
    let before = format!("{}{}", rule("a", "\"count\""), rule("b", "\"mean\""));
    let after = rule("b", "\"count\", \"mean\"");
    assert_eq!(
        run(&before, &after, &[("a", &[c]), ("b", &[m])]),
        vec![count.clone(), mean.clone()]
    );
    // Split into two new rules: a {count, mean} into e {count} and f {mean, max}.
    let before = rule("a", "\"count\", \"mean\"");
    let after = format!(
        "{}{}",
        rule("e", "\"count\""),
        rule("f", "\"mean\", \"max\"")
    );
    assert_eq!(
        run(&before, &after, &[("a", &[c, m])]),
        vec![count, max, mean],
        "f's max from the handed window too"
    );
}

/// A size taken out and put back, or a rule removed and added again: a window emitted at the removal does not open
/// again (it would come out twice), and a window of another size that was never open is not taken for closed (its
/// readings would be late, under `keep_raw = false` and `late = "drop"` deleted).
#[test]
fn a_size_or_rule_put_back_neither_reopens_an_emitted_window_nor_drops_readings() {
    let funcs = [Func::Count, Func::Mean];
    let fewer = MEAN.replace("[1000, 5000]", "[1000]");
    for between in [fewer.as_str(), OTHER] {
        let mut db = committed_after(&[(100, 1.0), (300, 3.0)]);
        let (mut e, _) = restart(between, &db, "s/a", &[("m", &funcs)]);
        let closed = close_orphans(&mut e, "s/a");
        assert!(
            closed.contains(&("s/a/count_5s".into(), 0, Value::I64(2))),
            "{closed:?}"
        );
        commit(&mut e, &mut db);
        let (mut e, _) = restart(MEAN, &db, "s/a", &[("m", &funcs)]);
        assert!(close_orphans(&mut e, "s/a").is_empty());
        let (fates, out) = feed(&mut e, "s/a", &[(3000, 4.0), (9000, 0.0)]);
        assert_eq!(fates, vec![RawFate::Withhold; 2], "{between}");
        e.committed();
        assert_eq!(
            e.counts().late,
            1,
            "3000 is late for the emitted [0, 5000): {between}"
        );
        let k = |f: &str| format!("s/a/{f}");
        assert!(
            out.contains(&(k("count_1s"), 3000, Value::I64(1))),
            "[3000, 4000) was never open: {out:?}"
        );
        assert!(
            !out.iter()
                .any(|(key, start, _)| key.ends_with("_5s") && *start == 0),
            "[0, 5000) was emitted at the removal, not again: {out:?}"
        );
    }
}

/// A rule renamed after its windows closed: what the old name emitted stays closed under the new one (a late
/// reading of such a window is late, not a second, partial value).
#[test]
fn a_renamed_rule_keeps_what_the_old_name_emitted_closed() {
    let mut db = committed_after(&[(100, 1.0), (7000, 3.0)]);
    let renamed = MEAN.replace("name = \"m\"", "name = \"n\"");
    let funcs = [Func::Count, Func::Mean];
    let (mut e, loaded) = restart(&renamed, &db, "s/a", &[("m", &funcs)]);
    assert_eq!(loaded, vec![Loaded::Orphan], "its open windows go to n");
    assert!(close_orphans(&mut e, "s/a").is_empty());
    commit(&mut e, &mut db);
    let (mut e, _) = restart(&renamed, &db, "s/a", &[("m", &funcs)]);
    let (fates, out) = feed(&mut e, "s/a", &[(4500, 2.0)]);
    e.committed();
    assert_eq!(
        e.counts().late,
        1,
        "[4000, 5000) and [0, 5000) were emitted under m"
    );
    assert_eq!(fates, vec![RawFate::Withhold], "late = drop");
    assert!(out.is_empty());
    assert_eq!(
        e.open_windows(),
        2,
        "m's [7000, 8000) and [5000, 10000), now n's"
    );
}

/// The buffer as the engine sees it across runs: committed pair states and rules' functions.
#[derive(Default)]
struct Stored {
    states: BTreeMap<(String, i64), Vec<u8>>,
    functions: BTreeMap<String, Vec<Func>>,
    since: BTreeMap<(String, i64, Option<SizeFunc>), i64>,
}

impl Stored {
    /// A start (or the reload after a failed commit) with `cfg`, as `Buffer::reload_windows` does it.
    fn load(&mut self, cfg: &str) -> Engine {
        let mut e = engine(cfg);
        for (name, funcs) in &self.functions {
            e.remember_functions(name, funcs.clone());
        }
        for ((rule, sid, func), since) in &self.since {
            e.remember_since(rule, *sid, *func, *since);
        }
        for ((rule, sid), bytes) in &self.states {
            e.load_state(rule, *sid, Some(&Series::new(format!("s/{sid}"))), bytes);
        }
        e.loaded();
        for r in e.rules() {
            self.functions
                .entry(r.name.clone())
                .or_insert_with(|| r.functions().to_vec());
        }
        e
    }

    /// A seal's commit, as `Buffer::write_windows` does it.
    fn commit(&mut self, e: &mut Engine) {
        let dirty = e.take_dirty();
        if !dirty.is_empty() {
            for r in e.rules() {
                self.functions
                    .insert(r.name.clone(), r.functions().to_vec());
            }
        }
        self.states
            .extend(dirty.into_iter().map(|(r, s, b)| ((r, s), b)));
        for (r, s, f, lo) in e.take_since() {
            let v = self.since.entry((r, s, f)).or_insert(lo);
            *v = (*v).min(lo);
        }
        e.committed();
    }
}

/// Random chains of rule edits between restarts (rules renamed, merged, split, narrowed, given or stripped of sizes
/// and functions, removed and put back) over readings that come partly out of order, with failed commits: no
/// derived window is emitted twice, no count exceeds the readings of its window, every value is named, each
/// withheld reading's windows come out, and once no rule is configured any more, no window is left open. Chain
/// 11210 (`WINDOW_EDIT_SEED=11210`) fails the withheld check by design (docs/windows.md: a function taken out of
/// every rule, and a derived series' watermark that never goes back); the 3,000 chains run here do not reach it.
#[test]
fn random_rule_edits_between_restarts_emit_no_window_twice() {
    // WINDOW_EDIT_SEED=<n> replays one seed and prints what happens.
    let only: Option<u64> = std::env::var("WINDOW_EDIT_SEED")
        .ok()
        .and_then(|v| v.parse().ok());
    let trace = only.is_some();
    for seed in only.map_or(0..3000u64, |s| s..s + 1) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let lateness = 1500;
        let config = |rng: &mut fastrand::Rng| loop {
            let mut text = String::new();
            let mut names = vec!["a", "b", "c"];
            rng.shuffle(&mut names);
            for name in names.iter().take(rng.usize(1..=2)) {
                fn pick(rng: &mut fastrand::Rng, all: &[&'static str]) -> Vec<&'static str> {
                    let mut some: Vec<&str> = all.iter().copied().filter(|_| rng.bool()).collect();
                    if some.is_empty() {
                        some.push(all[rng.usize(0..all.len())]);
                    }
                    some
                }
                let sizes = pick(rng, &["1000", "3000"]).join(", ");
                // Count or sum in every rule (each value is 1: either tells which readings a window took).
                let mut funcs = pick(rng, &["count", "sum"]);
                if rng.bool() {
                    funcs.push("max");
                }
                let funcs: Vec<String> = funcs.iter().map(|f| format!("\"{f}\"")).collect();
                let series = ["s/+", "s/1"][rng.usize(0..2)];
                text.push_str(&format!(
                    "[[rules]]\nname = \"{name}\"\nseries = \"{series}\"\nsizes_ms = [{sizes}]\nfunctions = [{}]\nallowed_lateness_ms = {}\nlate = \"raw\"\nkeep_raw = false\n",
                    funcs.join(", "),
                    [0, 700, lateness][rng.usize(0..3)],
                ));
            }
            let cfg: WindowsConfig = toml::from_str(&text).unwrap();
            if cfg.validate("windows").is_empty() {
                return text;
            }
        };
        let mut stored = Stored::default();
        let mut emitted: BTreeMap<(String, i64), (usize, Value)> = BTreeMap::new();
        let mut readings: Vec<(i64, i64)> = Vec::new();
        // Readings withheld (on time for every matching rule: late ones go raw), with the sizes they joined.
        let mut withheld: Vec<(i64, i64, Vec<i64>)> = Vec::new();
        let mut clock = 0i64;
        let mut cfg = config(&mut rng);
        if trace {
            eprintln!("--- start with\n{cfg}");
        }
        let mut e = stored.load(&cfg);
        let record = |e: &Engine, out: &[Emitted], emitted: &mut BTreeMap<_, _>| {
            for x in out {
                let key = e
                    .derived_series(x, &Series::new(format!("s/{}", x.series_id)))
                    .key;
                if trace {
                    eprintln!(
                        "emitted {key} @{} {:?} by {}",
                        x.start_ms, x.value, e.rules[x.rule].name
                    );
                }
                let seen = emitted
                    .entry((key, x.start_ms))
                    .or_insert((0, x.value.clone()));
                seen.0 += 1;
            }
        };
        for run in 0..6 {
            for _ in 0..rng.usize(1..4) {
                // One seal: the settling of the start, then a chunk of readings.
                let chunk: Vec<(i64, i64)> = (0..rng.usize(0..30))
                    .map(|_| {
                        clock += rng.i64(0..300);
                        (rng.i64(1..=3), clock - rng.i64(0..=lateness + 500))
                    })
                    .collect();
                loop {
                    let mut out = Vec::new();
                    let named = e.close_orphans(&mut out);
                    // As the buffer names them: a value of a series with no reading in the seal needs its name.
                    for x in &out {
                        assert!(
                            named.iter().any(|(sid, _)| *sid == x.series_id)
                                || chunk.iter().any(|(sid, _)| *sid == x.series_id),
                            "seed {seed}: a value of s/{} emitted unnamed",
                            x.series_id
                        );
                    }
                    let mut fates = Vec::new();
                    for &(sid, ts) in &chunk {
                        let s = Series::new(format!("s/{sid}"));
                        let fate = e.observe(sid, &s, obs(ts, &Value::F64(1.0)), &mut out);
                        let sizes: Vec<i64> = e
                            .rules()
                            .iter()
                            .filter(|r| r.matches(&s))
                            .flat_map(|r| r.sizes().to_vec())
                            .collect();
                        fates.push((sid, ts, fate, sizes));
                    }
                    if trace {
                        eprintln!("seal {chunk:?}");
                    }
                    if rng.usize(0..5) == 0 {
                        // The commit fails: the engine is loaded again from what was committed.
                        e = stored.load(&cfg);
                        continue;
                    }
                    stored.commit(&mut e);
                    record(&e, &out, &mut emitted);
                    withheld.extend(
                        fates
                            .into_iter()
                            .filter(|f| f.2 == RawFate::Withhold)
                            .map(|(sid, ts, _, sizes)| (sid, ts, sizes)),
                    );
                    break;
                }
                readings.extend(chunk);
            }
            // A restart, with the configuration edited (the last run: every rule removed).
            cfg = if run == 5 {
                String::new()
            } else {
                config(&mut rng)
            };
            if trace {
                eprintln!("--- restart with\n{cfg}");
                for ((r, sid), b) in &stored.states {
                    let st = PairState::from_bytes(b, &[1000, 3000]).unwrap();
                    let open: Vec<Vec<(i64, u64)>> = st
                        .open
                        .iter()
                        .map(|l| l.iter().map(|w| (w.0, w.1.count)).collect())
                        .collect();
                    eprintln!(
                        "row {r} s/{sid}: closed_to {:?} emitted {:?} open {open:?}",
                        st.closed_to, st.emitted_to
                    );
                }
                eprintln!("functions {:?}", stored.functions);
                eprintln!("since {:?}", stored.since);
            }
            e = stored.load(&cfg);
        }
        let mut out = Vec::new();
        e.close_orphans(&mut out);
        stored.commit(&mut e);
        record(&e, &out, &mut emitted);
        assert_eq!(e.open_windows(), 0, "seed {seed}: a window left open");
        // Nothing lost: each withheld reading's window of each size it joined came out (count or sum).
        for (sid, ts, sizes) in &withheld {
            for &z in sizes {
                let start = ts.div_euclid(z) * z;
                let out = |f: &str| {
                    emitted.contains_key(&(format!("s/{sid}/{f}_{}", size_suffix(z as u64)), start))
                };
                assert!(
                    out("count") || out("sum"),
                    "seed {seed}: s/{sid} at {ts} withheld, its {z} ms window at {start} never emitted"
                );
            }
        }
        for ((key, start), (times, value)) in &emitted {
            assert_eq!(
                *times, 1,
                "seed {seed}: {key} at {start} emitted {times} times"
            );
            if let (Some(rest), &Value::I64(n)) = (key.strip_prefix("s/"), value) {
                let sid: i64 = rest[..1].parse().unwrap();
                let size = if key.ends_with("_1s") { 1000 } else { 3000 };
                let within = readings
                    .iter()
                    .filter(|&&(s, ts)| s == sid && ts.div_euclid(size) * size == *start)
                    .count() as i64;
                assert!(
                    n <= within,
                    "seed {seed}: {key} at {start} counts {n} of {within} readings"
                );
            }
        }
    }
}

/// A rule added in the middle of a window, then given a function of a rule removed: the window that took more
/// readings (the older rule's, there from the start) is the one that goes on, whichever pair is settled first.
#[test]
fn an_heir_added_mid_window_goes_on_with_the_readings_from_its_start() {
    let rule = |name: &str, funcs: &str| {
        format!("[[rules]]\nname = \"{name}\"\nseries = \"s/+\"\nsizes_ms = [1000]\nfunctions = [{funcs}]\nallowed_lateness_ms = 2000\n")
    };
    let mut stored = Stored::default();
    let a = rule("a", "\"count\"");
    let mut e = stored.load(&a);
    feed(&mut e, "s/1", &[(100, 1.0), (200, 2.0)]);
    stored.commit(&mut e);
    let both = format!("{a}{}", rule("b", "\"max\""));
    let mut e = stored.load(&both);
    feed(&mut e, "s/1", &[(300, 3.0)]);
    stored.commit(&mut e);
    let merged = rule("b", "\"count\", \"max\"");
    let mut e = stored.load(&merged);
    let mut out = Vec::new();
    e.close_orphans(&mut out);
    assert!(out.is_empty(), "{out:?}");
    let (_, out) = feed(&mut e, "s/1", &[(4000, 0.0)]);
    assert_eq!(
        out,
        vec![
            ("s/1/count_1s".into(), 0, Value::I64(3)),
            ("s/1/max_1s".into(), 0, Value::F64(3.0)),
        ]
    );
}

/// A function moved from a rule that is still configured to one with a shorter lateness that has already closed
/// some of the windows: those windows' value of it is emitted at the edit (neither rule would later), once.
#[test]
fn a_function_moved_to_a_rule_that_closed_the_window_is_emitted_at_the_edit() {
    let rule = |name: &str, funcs: &str, lateness: u32| {
        format!("[[rules]]\nname = \"{name}\"\nseries = \"s/+\"\nsizes_ms = [1000]\nfunctions = [{funcs}]\nallowed_lateness_ms = {lateness}\n")
    };
    let mut stored = Stored::default();
    let before = format!(
        "{}{}",
        rule("a", "\"count\"", 2000),
        rule("b", "\"max\"", 0)
    );
    let mut e = stored.load(&before);
    let (_, out) = feed(&mut e, "s/1", &[(100, 1.0), (1500, 2.0)]);
    assert_eq!(
        out,
        vec![("s/1/max_1s".into(), 0, Value::F64(1.0))],
        "b closed [0, 1000)"
    );
    stored.commit(&mut e);
    let after = format!(
        "{}{}",
        rule("a", "\"sum\"", 2000),
        rule("b", "\"max\", \"count\"", 0)
    );
    let mut e = stored.load(&after);
    let mut edit = Vec::new();
    e.close_orphans(&mut edit);
    let s = Series::new("s/1");
    let edit: Vec<(String, i64, Value)> = edit
        .iter()
        .map(|x| (e.derived_series(x, &s).key, x.start_ms, x.value.clone()))
        .collect();
    assert_eq!(edit, vec![("s/1/count_1s".into(), 0, Value::I64(1))]);
    stored.commit(&mut e);
    let (_, out) = feed(&mut e, "s/1", &[(5000, 0.0)]);
    assert!(
        !out.iter()
            .any(|(k, start, _)| k == "s/1/count_1s" && *start == 0),
        "not again: {out:?}"
    );
    assert!(
        out.contains(&("s/1/count_1s".into(), 1000, Value::I64(1))),
        "{out:?}"
    );
    assert!(
        out.contains(&("s/1/sum_1s".into(), 0, Value::F64(1.0))),
        "{out:?}"
    );
}

/// The records of emitted windows stay sorted and merged: consecutive windows make one record, a gap two, and a
/// lookup answers for each window end.
#[test]
fn records_of_emitted_windows_merge_and_answer_per_window() {
    let mut st = PairState::default();
    for end in [1000, 2000, 3000, 5000] {
        assert!(st.note_emitted(1000, Func::Max, end, end));
    }
    assert!(!st.note_emitted(1000, Func::Max, 2000, 2000), "known");
    assert!(st.note_emitted(1000, Func::Count, i64::MIN, 500));
    assert!(st.note_emitted(3000, Func::Max, 3000, 3000));
    assert_eq!(
        st.emitted_to,
        vec![
            (1000, Func::Count, i64::MIN, 500),
            (1000, Func::Max, 1000, 3000),
            (1000, Func::Max, 5000, 5000),
            (3000, Func::Max, 3000, 3000),
        ]
    );
    for (end, want) in [
        (0, false),
        (1000, true),
        (3000, true),
        (4000, false),
        (5000, true),
        (6000, false),
    ] {
        assert_eq!(st.emitted(1000, Func::Max, end), want, "{end}");
    }
    assert!(st.emitted(1000, Func::Count, -7000) && !st.emitted(1000, Func::Count, 1000));
    assert!(st.note_emitted(1000, Func::Max, 4000, 4000));
    assert_eq!(
        st.emitted_to[1],
        (1000, Func::Max, 1000, 5000),
        "the gap filled"
    );
    let b = st.to_bytes(&[]);
    assert_eq!(
        PairState::from_bytes(&b, &[]).unwrap().emitted_to,
        st.emitted_to
    );
}

/// `fieldlink-agent drain`: every open window closes, with its readings, whatever the clocks and `idle_close_ms`
/// (0 here: the clock never closes them), every size and several series at once, and no intake clock needed. Closed
/// so, a window stays closed: a reading of it arriving later is late.
#[test]
fn close_all_closes_every_open_window_with_its_readings_and_for_good() {
    let rule = r#"
[[rules]]
name = "m"
series = "plant/+/power"
sizes_ms = [60000, 600000]
functions = ["count", "sum"]
keep_raw = false
idle_close_ms = 0
"#;
    let mut e = engine(rule);
    let (a, b) = (Series::new("plant/a/power"), Series::new("plant/b/power"));
    let mut out = Vec::new();
    for (sid, s, ts, v) in [
        (1, &a, 60_000, 1.0),
        (1, &a, 61_000, 2.0),
        (2, &b, 130_000, 5.0),
    ] {
        assert_eq!(
            e.observe(sid, s, obs(ts, &Value::F64(v)), &mut out),
            RawFate::Withhold
        );
    }
    assert!(out.is_empty());
    assert_eq!(e.open_windows(), 4);
    // Without close_all nothing is due (no rule closes on the clock).
    assert!(e.idle_due(i64::MAX / 2).is_empty());
    let mut due = e.close_all();
    due.sort_unstable();
    assert_eq!(due, vec![1, 2]);
    assert!(e.has_due());
    e.close_idle(&mut out);
    let mut got: Vec<(String, i64, Value)> = out
        .iter()
        .map(|x| {
            let s = if x.series_id == 1 { &a } else { &b };
            (e.derived_series(x, s).key, x.start_ms, x.value.clone())
        })
        .collect();
    got.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    let want = |k: &str, start: i64, v: Value| (k.to_owned(), start, v);
    assert_eq!(
        got,
        vec![
            want("plant/a/power/count_600s", 0, Value::I64(2)),
            want("plant/a/power/count_60s", 60_000, Value::I64(2)),
            want("plant/a/power/sum_600s", 0, Value::F64(3.0)),
            want("plant/a/power/sum_60s", 60_000, Value::F64(3.0)),
            want("plant/b/power/count_600s", 0, Value::I64(1)),
            want("plant/b/power/count_60s", 120_000, Value::I64(1)),
            want("plant/b/power/sum_600s", 0, Value::F64(5.0)),
            want("plant/b/power/sum_60s", 120_000, Value::F64(5.0)),
        ]
    );
    assert_eq!(e.open_windows(), 0);
    let saved = e.take_dirty();
    assert_eq!(saved.len(), 2, "both closed states are persisted");
    e.committed();
    assert_eq!(
        e.counts().idle_closed,
        0,
        "not counted as closed by the clock"
    );
    // Nothing open: nothing due.
    assert!(e.close_all().is_empty());
    e.forget_idle();
    // A reading of a closed window is late, of each size, and opens nothing.
    let mut out = Vec::new();
    e.observe(1, &a, obs(62_000, &Value::F64(9.0)), &mut out);
    assert!(out.is_empty());
    assert_eq!(e.open_windows(), 0);
    e.committed();
    assert_eq!(e.counts().late, 1);
    // A reading of another window is not late for that window, though the pair's largest closed window ends later
    // (10 min): the 1 min window opens and closes by the watermark as usual; the reading is late for the closed
    // 10 min window only.
    e.observe(1, &a, obs(130_000, &Value::F64(4.0)), &mut out);
    assert_eq!(e.open_windows(), 1);
    e.observe(1, &a, obs(700_000, &Value::F64(6.0)), &mut out);
    let got: Vec<(String, i64, Value)> = out
        .iter()
        .map(|x| (e.derived_series(x, &a).key, x.start_ms, x.value.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("plant/a/power/count_60s".to_owned(), 120_000, Value::I64(1)),
            ("plant/a/power/sum_60s".to_owned(), 120_000, Value::F64(4.0)),
        ]
    );
    assert!(
        e.state(0, 1).unwrap().emitted_to.is_empty(),
        "the records go once the watermark passed them"
    );
    e.committed();
    assert_eq!((e.counts().late, e.counts().aggregated), (2, 4));
    // The records are stored with the states: reloaded, a reading of a closed window of `b` is late and opens
    // nothing; one of its next 1 min window opens it.
    let mut reloaded = engine(rule);
    for (r, sid, bytes) in &saved {
        assert_eq!(reloaded.load_state(r, *sid, None, bytes), Loaded::Yes);
    }
    reloaded.loaded();
    assert_eq!(reloaded.open_windows(), 0);
    reloaded.observe(2, &b, obs(125_000, &Value::F64(1.0)), &mut out);
    assert_eq!(reloaded.open_windows(), 0);
    reloaded.observe(2, &b, obs(185_000, &Value::F64(1.0)), &mut out);
    assert_eq!(reloaded.open_windows(), 1);
    reloaded.committed();
    assert_eq!(reloaded.counts().late, 2);
}

#![allow(clippy::unwrap_used)]
use super::*;

fn rules(toml_text: &str) -> Engine {
    let cfg: AlarmsConfig = toml::from_str(toml_text).unwrap();
    let problems = cfg.validate("alarms", &[]);
    assert!(problems.is_empty(), "{problems:?}");
    Engine::from_config(&cfg)
}

/// Feeds `(ts, value)` readings of one series; returns `(ts, from, to)` of each transition.
fn feed(e: &mut Engine, key: &str, readings: &[(i64, f64)]) -> Vec<(i64, u8, u8)> {
    let s = Series::new(key);
    let mut out = Vec::new();
    for &(ts, v) in readings {
        e.observe(
            1,
            &s,
            Obs {
                ts_ms: ts,
                value: &Value::F64(v),
                quality: Quality::Good,
            },
            &mut out,
        );
    }
    out.iter().map(|t| (t.ts_ms, t.from, t.to)).collect()
}

const VIB: &str = r#"
[[rules]]
name = "vib"
series = "line3/+/+/vib"
condition = "above"
levels = [{ name = "warning", limit = 4.0 }, { name = "critical", limit = 8.0 }]
hysteresis = 0.5
"#;

#[test]
fn above_enters_at_the_limit_and_leaves_only_past_the_hysteresis() {
    let mut e = rules(VIB);
    let t = feed(
        &mut e,
        "line3/robot/000/vib",
        &[
            (1, 3.0),
            (2, 4.0), // at the limit: not above
            (3, 4.1), // warning
            (4, 3.6), // inside the hysteresis band: stays
            (5, 3.5), // at limit - hysteresis: leaves
            (6, 9.0), // straight to critical
            (7, 7.8), // critical held (7.5 < 7.8)
            (8, 7.4), // back to warning (still above 4)
            (9, 0.0),
        ],
    );
    assert_eq!(
        t,
        vec![(3, 0, 1), (5, 1, 0), (6, 0, 2), (8, 2, 1), (9, 1, 0)]
    );
}

#[test]
fn a_rule_applies_only_to_matching_series_and_tags() {
    let mut e = rules(
        r#"
[[rules]]
name = "muc"
series = "plant/#"
tags = { site = "muc" }
condition = "above"
levels = [{ name = "high", limit = 1.0 }]
"#,
    );
    let mut out = Vec::new();
    let obs = Obs {
        ts_ms: 1,
        value: &Value::F64(5.0),
        quality: Quality::Good,
    };
    let mut tagged = Series::new("plant/a/b");
    e.observe(1, &tagged, obs, &mut out);
    tagged.tags = vec![("line".into(), "1".into()), ("site".into(), "ham".into())];
    e.observe(2, &tagged, obs, &mut out);
    e.observe(3, &Series::new("other/a"), obs, &mut out);
    assert!(out.is_empty());
    tagged.tags = vec![("line".into(), "1".into()), ("site".into(), "muc".into())];
    e.observe(4, &tagged, obs, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].series_id, 4);
}

#[test]
fn below_mirrors_above() {
    let mut e = rules(
        r#"
[[rules]]
name = "pressure-low"
series = "p"
condition = "below"
levels = [{ name = "low", limit = 2.0 }, { name = "very-low", limit = 1.0 }]
hysteresis = 0.2
"#,
    );
    let t = feed(
        &mut e,
        "p",
        &[(1, 2.5), (2, 1.9), (3, 2.1), (4, 2.2), (5, 0.5), (6, 1.1)],
    );
    assert_eq!(t, vec![(2, 0, 1), (4, 1, 0), (5, 0, 2)]);
}

#[test]
fn on_and_off_delays_count_event_time_from_the_first_reading_that_left_the_level() {
    let mut e = rules(
        r#"
[[rules]]
name = "d"
series = "x"
condition = "above"
levels = [{ name = "warning", limit = 4.0 }, { name = "critical", limit = 8.0 }]
on_delay_ms = 2000
off_delay_ms = 3000
"#,
    );
    let t = feed(
        &mut e,
        "x",
        &[
            (0, 5.0),    // warning pending since 0
            (1000, 3.0), // back: cancelled
            (2000, 5.0), // pending since 2000
            (3000, 9.0), // critical called for, same side: still since 2000
            (4000, 9.0), // 2000 ms: enters critical
            (5000, 1.0), // off pending since 5000
            (7000, 1.0),
            (8000, 1.0), // 3000 ms: ok
        ],
    );
    assert_eq!(t, vec![(4000, 0, 2), (8000, 2, 0)]);
}

#[test]
fn rate_is_measured_against_the_oldest_reading_in_the_span() {
    let mut e = rules(
        r#"
[[rules]]
name = "r"
series = "t"
condition = "rate"
span_ms = 10000
levels = [{ name = "fast", limit = 1.0 }]
"#,
    );
    let t = feed(
        &mut e,
        "t",
        &[
            (0, 0.0),
            (5000, 4.0),   // 0.8/s
            (10000, 11.0), // 1.1/s vs (0, 0)
            (15000, 12.0), // vs (5000, 4): 0.8/s → ok
            (30000, 0.0),  // alone in the span: nothing
        ],
    );
    assert_eq!(t, vec![(10000, 0, 1), (15000, 1, 0)]);
}

const STALE: &str = r#"
[[rules]]
name = "meter-stale"
series = "meter/#"
condition = "stale"
levels = [{ name = "late", after_ms = 60000 }, { name = "dead", after_ms = 300000 }]
"#;

#[test]
fn a_gap_found_by_a_reading_gives_every_level_at_its_time_then_ok() {
    let mut e = rules(STALE);
    let t = feed(
        &mut e,
        "meter/a",
        &[(0, 1.0), (60000, 1.0), (500000, 1.0), (500001, 1.0)],
    );
    assert_eq!(
        t,
        vec![(120000, 0, 1), (360000, 1, 2), (500000, 2, 0)],
        "at exactly after_ms it is not stale yet"
    );
}

#[test]
fn the_clock_raises_stale_levels_and_a_later_reading_does_not_repeat_them() {
    let mut e = rules(STALE);
    feed(&mut e, "meter/a", &[(1000, 1.0)]);
    let mut out = Vec::new();
    e.tick(61000, &mut out);
    assert!(out.is_empty(), "not more than after_ms yet");
    e.tick(61001, &mut out);
    e.tick(70000, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].ts_ms, out[0].to, out[0].cause.is_none()),
        (61000, 1, true)
    );
    let t = feed(&mut e, "meter/a", &[(400000, 1.0)]);
    // The reading finds the gap: only `dead` is new, then ok.
    assert_eq!(t, vec![(301000, 1, 2), (400000, 2, 0)]);
    assert_eq!(e.state(0, 1).unwrap().level, 0);
}

#[test]
fn quality_rules_see_every_reading_and_threshold_rules_skip_bad_ones() {
    let mut e = rules(
        r#"
[[rules]]
name = "q"
series = "m"
condition = "quality"
levels = [{ name = "doubtful", quality = "uncertain" }, { name = "bad", quality = "bad" }]

[[rules]]
name = "hi"
series = "m"
condition = "above"
levels = [{ name = "high", limit = 0.5 }]
"#,
    );
    let s = Series::new("m");
    let mut out = Vec::new();
    for (ts, v, q) in [
        (1, Value::F64(5.0), Quality::Bad),
        (2, Value::Str("x".into()), Quality::Uncertain),
        (3, Value::F64(f64::NAN), Quality::Good),
        (4, Value::I64(0), Quality::Good),
        (5, Value::Bool(true), Quality::Good),
    ] {
        e.observe(
            7,
            &s,
            Obs {
                ts_ms: ts,
                value: &v,
                quality: q,
            },
            &mut out,
        );
    }
    let got: Vec<(usize, i64, u8, u8, u64)> = out
        .iter()
        .map(|t| (t.rule, t.ts_ms, t.from, t.to, t.rule_seq))
        .collect();
    // Bad 5.0: quality → bad, `hi` skips it; the string: uncertain; NaN: good again, `hi` skips it; 0: nothing;
    // true counts as 1 > 0.5.
    assert_eq!(
        got,
        vec![
            (0, 1, 0, 2, 1),
            (0, 2, 2, 1, 2),
            (0, 3, 1, 0, 3),
            (1, 5, 0, 1, 1)
        ]
    );
}

#[test]
fn sequence_numbers_are_per_rule_over_all_series_and_survive_a_reload() {
    let mut e = rules(VIB);
    let mut out = Vec::new();
    for sid in 1..=3 {
        e.observe(
            sid,
            &Series::new("line3/r/0/vib"),
            Obs {
                ts_ms: 1,
                value: &Value::F64(5.0),
                quality: Quality::Good,
            },
            &mut out,
        );
    }
    assert_eq!(
        out.iter().map(|t| t.rule_seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let dirty = e.take_dirty();
    let mut f = rules(VIB);
    for d in &dirty {
        match d {
            Dirty::State(rule, sid, b) => assert!(f.load_state(rule, *sid, b)),
            Dirty::Seq(rule, n) => f.load_seq(rule, *n),
        }
    }
    assert!(e.take_dirty().is_empty(), "taken");
    let mut out = Vec::new();
    f.observe(
        2,
        &Series::new("line3/r/0/vib"),
        Obs {
            ts_ms: 2,
            value: &Value::F64(0.0),
            quality: Quality::Good,
        },
        &mut out,
    );
    assert_eq!((out[0].from, out[0].to, out[0].rule_seq), (1, 0, 4));
    assert_eq!(
        (e.active(), f.active()),
        (3, 2),
        "active pairs, counted across loads"
    );
}

#[test]
fn states_round_trip_and_garbage_is_refused() {
    let st = State {
        level: 2,
        since_ms: -5,
        seq: 9,
        pending: Some((1, 77)),
        last_ts: Some(i64::MAX),
        window: [(1, 2.5), (3, f64::MIN)].into_iter().collect(),
        dirty: false,
    };
    assert_eq!(State::from_bytes(&st.to_bytes()), Some(st.clone()));
    let b = st.to_bytes();
    for cut in 0..b.len() {
        assert_eq!(State::from_bytes(&b[..cut]), None, "cut {cut}");
    }
    assert_eq!(State::from_bytes(&[]), None);
}

#[test]
fn every_problem_of_every_rule_is_reported_at_once() {
    let cfg: AlarmsConfig = toml::from_str(
        r#"
publish_connection = "nope"
[[rules]]
name = "bad name!"
series = "a/#/b"
condition = "above"
levels = [{ name = "high", limit = 5.0 }, { name = "low", limit = 1.0 }]
hysteresis = -1.0
span_ms = 5

[[rules]]
name = "s"
series = "x"
condition = "stale"
levels = [{ name = "ok", limit = 1.0 }]
on_delay_ms = 5

[[rules]]
name = "s"
series = "x"
condition = "rate"
levels = []
"#,
    )
    .unwrap();
    let all = cfg.validate("alarms", &[]).join("\n");
    for needle in [
        "alarms.rules[0].name",
        "alarms.rules[0].series",
        "alarms.rules[0].levels: least severe first",
        "alarms.rules[0].hysteresis",
        "alarms.rules[0].span_ms: not used",
        "alarms.rules[1].levels[0].name",
        "alarms.rules[1].levels[0].after_ms: required",
        "alarms.rules[1].levels[0].limit: not used",
        "alarms.rules[1].on_delay_ms",
        "alarms.rules[2].levels: 1 to 254",
        "alarms.rules[2].span_ms: required",
        "alarms.rules[2].name: \"s\" is used twice",
        "alarms.publish_connection",
    ] {
        assert!(all.contains(needle), "{needle} missing from:\n{all}");
    }
}

#[test]
fn unknown_fields_are_refused() {
    let err = toml::from_str::<AlarmsConfig>(
        r#"
[[rules]]
name = "a"
series = "x"
condition = "above"
levels = [{ name = "high", limt = 5.0 }]
"#,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("limt"), "{err}");
}

#[test]
fn status_topics_the_connection_subscribes_to_are_refused() {
    let cfg: AlarmsConfig =
        toml::from_str("publish_connection = \"local\"\ntopic_prefix = \"site/alarms\"").unwrap();
    let p = cfg.validate("alarms", &[("local".into(), vec!["site/#".into()])]);
    assert!(p.iter().any(|p| p.contains("alarms.topic_prefix")), "{p:?}");
    assert!(cfg
        .validate("alarms", &[("local".into(), vec!["sensors/#".into()])])
        .is_empty());
    // A shared subscription matches on its filter (and MQTT 5 forbids No Local on it).
    let p = cfg.validate(
        "alarms",
        &[("local".into(), vec!["$share/g/site/#".into()])],
    );
    assert!(p.iter().any(|p| p.contains("alarms.topic_prefix")), "{p:?}");
}

#[test]
fn no_alarms_section_is_valid() {
    assert!(AlarmsConfig::default().validate("alarms", &[]).is_empty());
    let parsed: AlarmsConfig = toml::from_str("").unwrap();
    assert_eq!(parsed, AlarmsConfig::default());
}

#[test]
fn a_long_string_cause_is_cut_so_a_full_alarm_record_stays_under_its_limit() {
    // A quality rule judges string readings too: 1,000 transitions whose causes are 64 KiB of random text (base64
    // payloads of a Sparkplug node's string metrics, all marked bad by its NDEATH) would make a record the
    // encoder refuses, and every seal would fail on it.
    let mut e = rules(
        r##"
[[rules]]
name = "q"
series = "#"
condition = "quality"
levels = [{ name = "bad", quality = "bad" }]
"##,
    );
    let mut out = Vec::new();
    let series: Vec<Series> = (0..1000)
        .map(|i| Series::new(format!("node/m{i}")))
        .collect();
    for (i, s) in series.iter().enumerate() {
        let text: String = (0..65_536).map(|_| fastrand::alphanumeric()).collect();
        e.observe(
            i as i64,
            s,
            Obs {
                ts_ms: 1,
                value: &Value::Str(text),
                quality: Quality::Bad,
            },
            &mut out,
        );
    }
    assert_eq!(out.len(), 1000);
    let events: Vec<_> = out
        .iter()
        .map(|t| e.event(t, series[t.series_id as usize].clone()))
        .collect();
    let Some(Value::Str(cause)) = events[0].cause.as_ref().map(|c| c.value.clone()) else {
        panic!("no string cause")
    };
    assert_eq!(cause.len(), MAX_CAUSE_STRING_BYTES + '…'.len_utf8());
    let record = fieldlink_proto::alarm::AlarmEncoder::new(3)
        .unwrap()
        .encode(&fieldlink_proto::alarm::AlarmBatch {
            agent_id: "a".into(),
            epoch: 1,
            seq: 1,
            events,
        })
        .unwrap();
    assert!(
        record.len() < fieldlink_proto::limits::MAX_RECORD_BYTES / 2,
        "{} bytes",
        record.len()
    );
    // Cut at a character boundary.
    let mut s = "é".repeat(200);
    cut_string(&mut s, 255);
    assert_eq!(s, format!("{}…", "é".repeat(127)));
}

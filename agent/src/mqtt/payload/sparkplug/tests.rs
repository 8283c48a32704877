//! State tests with a minimal test-side encoder (on the module's protobuf primitives). The decoder is checked against an independent encoder
//! (pysparkplug) end to end in `tests/tests/mqtt.rs`.

use super::*;
use super::{put_bytes as bytes, put_key as key, put_varint as varint};

const NOW: i64 = 1_772_431_200_000;

/// `(name, alias, datatype, value)`.
fn metric(name: Option<&str>, alias: Option<u64>, datatype: u32, v: &Raw) -> Vec<u8> {
    let mut m = Vec::new();
    if let Some(n) = name {
        bytes(&mut m, 1, n.as_bytes());
    }
    if let Some(a) = alias {
        key(&mut m, 2, 0);
        varint(&mut m, a);
    }
    key(&mut m, 4, 0);
    varint(&mut m, u64::from(datatype));
    match v {
        Raw::Int(i) => {
            key(&mut m, 10, 0);
            varint(&mut m, u64::from(*i));
        }
        Raw::Long(l) => {
            key(&mut m, 11, 0);
            varint(&mut m, *l);
        }
        Raw::Float(f) => {
            key(&mut m, 12, 5);
            m.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Raw::Double(d) => {
            key(&mut m, 13, 1);
            m.extend_from_slice(&d.to_bits().to_le_bytes());
        }
        Raw::Bool(b) => {
            key(&mut m, 14, 0);
            varint(&mut m, u64::from(*b));
        }
        Raw::Str(s) => bytes(&mut m, 15, s.as_bytes()),
        Raw::Other => bytes(&mut m, 16, b"\x01\x02"),
        Raw::None => {
            key(&mut m, 7, 0);
            varint(&mut m, 1);
        }
    }
    m
}

fn payload(ts: Option<u64>, seq: Option<u64>, metrics: &[Vec<u8>]) -> Vec<u8> {
    let mut p = Vec::new();
    if let Some(t) = ts {
        key(&mut p, 1, 0);
        varint(&mut p, t);
    }
    for m in metrics {
        bytes(&mut p, 2, m);
    }
    if let Some(s) = seq {
        key(&mut p, 3, 0);
        varint(&mut p, s);
    }
    p
}

fn run(s: &mut State, topic: &str, p: &[u8]) -> Result<Parsed, PayloadError> {
    s.apply(
        &mut Interner::default(),
        topic,
        p,
        NOW,
        &PayloadConfig::default(),
    )
}

fn values(p: &Parsed) -> Vec<(String, Value, Quality)> {
    p.readings
        .iter()
        .map(|r| (r.series.key.clone(), r.value.clone(), r.quality))
        .collect()
}

fn birth(s: &mut State) {
    let nb = payload(
        Some(NOW as u64),
        Some(0),
        &[
            metric(Some("bdSeq"), None, datatype::INT64, &Raw::Long(7)),
            metric(Some("uptime"), Some(1), datatype::INT64, &Raw::Long(5)),
        ],
    );
    run(s, "spBv1.0/plant/NBIRTH/gw1", &nb).unwrap_or_else(|e| panic!("{e}"));
    let db = payload(
        Some(NOW as u64),
        Some(1),
        &[
            metric(Some("temp"), Some(2), datatype::FLOAT, &Raw::Float(21.5)),
            metric(
                Some("level"),
                Some(3),
                datatype::INT16,
                &Raw::Int(0xffff_fffe),
            ),
        ],
    );
    let p = run(s, "spBv1.0/plant/DBIRTH/gw1/pump", &db).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        values(&p),
        vec![
            (
                "plant/gw1/pump/temp".into(),
                Value::F64(21.5),
                Quality::Good
            ),
            ("plant/gw1/pump/level".into(), Value::I64(-2), Quality::Good),
        ]
    );
}

#[test]
fn data_by_alias_uses_the_birth_names() {
    let mut s = State::new(100, 0);
    birth(&mut s);
    let dd = payload(
        Some(NOW as u64 + 5),
        Some(2),
        &[
            metric(None, Some(2), 0, &Raw::Float(22.0)),
            metric(None, Some(3), 0, &Raw::Int(40)),
        ],
    );
    let p = run(&mut s, "spBv1.0/plant/DDATA/gw1/pump", &dd).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        values(&p),
        vec![
            (
                "plant/gw1/pump/temp".into(),
                Value::F64(22.0),
                Quality::Good
            ),
            ("plant/gw1/pump/level".into(), Value::I64(40), Quality::Good),
        ]
    );
    assert_eq!(p.readings[0].ts_ms, NOW + 5);
    assert!(!p.seq_gap);
    assert_eq!(s.metrics(), 5); // three metrics, and the node's and the pump's units
}

#[test]
fn deaths_mark_the_last_values_stale() {
    let mut s = State::new(100, 0);
    birth(&mut s);
    let dd = payload(
        None,
        Some(2),
        &[metric(None, Some(2), 0, &Raw::Float(23.0))],
    );
    run(&mut s, "spBv1.0/plant/DDATA/gw1/pump", &dd).unwrap_or_else(|e| panic!("{e}"));
    let death = payload(Some(NOW as u64 + 9), Some(3), &[]);
    let p = run(&mut s, "spBv1.0/plant/DDEATH/gw1/pump", &death).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        values(&p),
        vec![
            ("plant/gw1/pump/temp".into(), Value::F64(23.0), Quality::Bad),
            ("plant/gw1/pump/level".into(), Value::I64(-2), Quality::Bad),
        ]
    );
    assert_eq!(p.readings[0].ts_ms, NOW + 9);
    assert_eq!(s.metrics(), 2); // the node's metric and unit
                                // The device's aliases are gone with it.
    let dd = payload(None, Some(4), &[metric(None, Some(2), 0, &Raw::Float(1.0))]);
    let e = run(&mut s, "spBv1.0/plant/DDATA/gw1/pump", &dd).unwrap_err();
    assert_eq!(e.reason(), "unknown_alias");
}

#[test]
fn a_late_will_of_an_older_session_is_ignored() {
    let mut s = State::new(100, 0);
    birth(&mut s);
    let old = payload(
        None,
        None,
        &[metric(Some("bdSeq"), None, datatype::INT64, &Raw::Long(6))],
    );
    assert_eq!(
        run(&mut s, "spBv1.0/plant/NDEATH/gw1", &old),
        Ok(Parsed::default())
    );
    assert_eq!(s.metrics(), 5);
    let now = payload(
        None,
        None,
        &[metric(Some("bdSeq"), None, datatype::INT64, &Raw::Long(7))],
    );
    let p = run(&mut s, "spBv1.0/plant/NDEATH/gw1", &now).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.readings.len(), 3, "node and device metrics marked stale");
    assert!(p.readings.iter().all(|r| r.quality == Quality::Bad));
    assert_eq!(s.metrics(), 0);
}

#[test]
fn sequence_jumps_are_reported_and_wrap_at_256() {
    let mut s = State::new(100, 0);
    birth(&mut s);
    let data = |seq| payload(None, Some(seq), &[metric(None, Some(1), 0, &Raw::Long(1))]);
    assert!(
        !run(&mut s, "spBv1.0/plant/NDATA/gw1", &data(2))
            .unwrap_or_default()
            .seq_gap
    );
    assert!(
        run(&mut s, "spBv1.0/plant/NDATA/gw1", &data(9))
            .unwrap_or_default()
            .seq_gap
    );
    for seq in 10..=255 {
        assert!(
            !run(&mut s, "spBv1.0/plant/NDATA/gw1", &data(seq))
                .unwrap_or_default()
                .seq_gap
        );
    }
    assert!(
        !run(&mut s, "spBv1.0/plant/NDATA/gw1", &data(0))
            .unwrap_or_default()
            .seq_gap
    );
}

#[test]
fn data_types_map_to_reading_values() {
    use datatype::*;
    let cases = [
        (INT8, Raw::Int(0xff), Ok(Value::I64(-1))),
        (INT8, Raw::Int(0xffff_ff80), Ok(Value::I64(-128))),
        (
            INT32,
            Raw::Int(0x8000_0000),
            Ok(Value::I64(i64::from(i32::MIN))),
        ),
        (UINT32, Raw::Int(0x8000_0000), Ok(Value::I64(0x8000_0000))),
        (INT64, Raw::Long(u64::MAX), Ok(Value::I64(-1))),
        (UINT64, Raw::Long(u64::MAX), Ok(Value::F64(u64::MAX as f64))),
        (DATETIME, Raw::Long(NOW as u64), Ok(Value::I64(NOW))),
        (DOUBLE, Raw::Double(0.25), Ok(Value::F64(0.25))),
        (BOOLEAN, Raw::Bool(true), Ok(Value::Bool(true))),
        (TEXT, Raw::Str("x".into()), Ok(Value::Str("x".into()))),
        (17, Raw::Other, Err(Skip::WrongType)),
        (DOUBLE, Raw::Str("x".into()), Err(Skip::WrongType)),
        (DOUBLE, Raw::None, Err(Skip::Null)),
    ];
    for (dt, raw, want) in cases {
        assert_eq!(value(dt, &raw), want, "{dt} {raw:?}");
    }
}

#[test]
fn bad_input_is_refused_by_reason() {
    let mut s = State::new(100, 0);
    let reason = |s: &mut State, t: &str, p: &[u8]| run(s, t, p).map(|_| ()).unwrap_err().reason();
    assert_eq!(
        reason(&mut s, "spBv1.0/plant/NDATA/gw1", b"\xff\xff"),
        "bad_sparkplug"
    );
    assert_eq!(
        reason(&mut s, "spBv1.0/plant/NDATA/gw1", b"\x12\x10\x01"),
        "bad_sparkplug"
    );
    assert_eq!(reason(&mut s, "plant/NDATA/gw1", b""), "bad_sparkplug");
    assert_eq!(
        reason(&mut s, "spBv1.0/plant/DDATA/gw1", b""),
        "bad_sparkplug"
    );
    let nan = payload(
        None,
        Some(0),
        &[metric(
            Some("x"),
            None,
            datatype::DOUBLE,
            &Raw::Double(f64::NAN),
        )],
    );
    assert_eq!(
        reason(&mut s, "spBv1.0/plant/NDATA/gw1", &nan),
        "non_finite"
    );
    let alias = payload(None, Some(1), &[metric(None, Some(99), 0, &Raw::Long(1))]);
    assert_eq!(
        reason(&mut s, "spBv1.0/plant/NDATA/gw1", &alias),
        "unknown_alias"
    );
    let future = payload(
        Some(NOW as u64 + 10 * 86_400_000),
        Some(2),
        &[metric(Some("x"), None, 0, &Raw::Long(1))],
    );
    assert_eq!(
        reason(&mut s, "spBv1.0/plant/NDATA/gw1", &future),
        "bad_timestamp"
    );
    // Commands and host state are passed over, not refused.
    assert_eq!(
        run(&mut s, "spBv1.0/plant/NCMD/gw1", b"\xff"),
        Ok(Parsed::default())
    );
    assert_eq!(
        run(&mut s, "spBv1.0/STATE/host", b"{}"),
        Ok(Parsed::default())
    );
}

#[test]
fn births_beyond_the_metric_limit_are_refused() {
    let mut s = State::new(4, 0);
    let nb = payload(
        None,
        Some(0),
        &[
            metric(Some("a"), None, 0, &Raw::Long(1)),
            metric(Some("b"), None, 0, &Raw::Long(1)),
            metric(Some("c"), None, 0, &Raw::Long(1)),
        ],
    );
    assert_eq!(
        run(&mut s, "spBv1.0/g/NBIRTH/n", &nb)
            .map(|_| ())
            .unwrap_err()
            .reason(),
        "sparkplug_limit"
    );
    assert_eq!(s.metrics(), 0);
    // A node's rebirth replaces its metrics rather than adding to them.
    let nb2 = payload(
        None,
        Some(0),
        &[
            metric(Some("a"), None, 0, &Raw::Long(1)),
            metric(Some("b"), None, 0, &Raw::Long(1)),
        ],
    );
    for _ in 0..3 {
        run(&mut s, "spBv1.0/g/NBIRTH/n", &nb2).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(s.metrics(), 3); // two metrics and the node's unit
}

#[test]
fn empty_device_births_and_repeated_names_count_against_the_limit() {
    // Empty DBIRTHs of ever new devices each add a device the node remembers: counted, they stop at the limit.
    let mut s = State::new(10, 0);
    let empty = payload(None, Some(0), &[]);
    let mut taken = 0;
    for d in 0..100 {
        if run(&mut s, &format!("spBv1.0/g/DBIRTH/n/dev-{d}"), &empty).is_ok() {
            taken += 1;
        }
    }
    assert!(s.metrics() <= 10, "{}", s.metrics());
    assert!(taken < 10, "{taken} empty device births taken");
    // A birth naming one metric many times (with as many aliases) is refused.
    let mut s = State::new(100, 0);
    let repeated: Vec<_> = (0..50)
        .map(|a| metric(Some("x"), Some(a), 0, &Raw::Long(1)))
        .collect();
    let e = run(
        &mut s,
        "spBv1.0/g/NBIRTH/n",
        &payload(None, Some(0), &repeated),
    )
    .unwrap_err();
    assert_eq!(e.reason(), "bad_sparkplug", "{e}");
    assert_eq!(s.metrics(), 0);
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
        let mut s = State::new(50, 0);
        for t in ["spBv1.0/g/NBIRTH/n", "spBv1.0/g/DBIRTH/n/d", "spBv1.0/g/DDATA/n/d", "spBv1.0/g/NDEATH/n"] {
            let _ = run(&mut s, t, &b);
            proptest::prop_assert!(s.metrics() <= 50);
        }
        let _ = super::super::influx::parse(&b, NOW, &PayloadConfig::default());
        let _ = super::super::json::parse("t", &b, NOW, &PayloadConfig::default());
    }
}

#[test]
fn a_device_birth_without_its_node_birth_still_names_its_aliases() {
    let mut s = State::new(100, 0);
    let db = payload(
        None,
        Some(5),
        &[metric(
            Some("temp"),
            Some(2),
            datatype::DOUBLE,
            &Raw::Double(1.0),
        )],
    );
    run(&mut s, "spBv1.0/plant/DBIRTH/gw9/pump", &db).unwrap_or_else(|e| panic!("{e}"));
    let dd = payload(
        None,
        Some(6),
        &[metric(None, Some(2), 0, &Raw::Double(2.0))],
    );
    let p = run(&mut s, "spBv1.0/plant/DDATA/gw9/pump", &dd).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        values(&p),
        vec![("plant/gw9/pump/temp".into(), Value::F64(2.0), Quality::Good)]
    );
    assert!(!p.seq_gap);
    // The limit counts the node too: 100 metrics allowed, 1 metric and its device's unit remembered (the node counts at the next birth).
    assert_eq!(s.metrics(), 2);
    let mut tight = State::new(1, 0);
    let e = run(&mut tight, "spBv1.0/plant/DBIRTH/gw9/pump", &db).unwrap_err();
    assert_eq!(e.reason(), "sparkplug_limit");
}

fn run_at(s: &mut State, topic: &str, p: &[u8], at: i64) -> Result<Parsed, PayloadError> {
    s.apply(
        &mut Interner::default(),
        topic,
        p,
        at,
        &PayloadConfig::default(),
    )
}

#[test]
fn the_rebirth_payload_is_a_boolean_node_control_rebirth_metric() {
    let p = decode(&rebirth_payload(NOW)).unwrap();
    assert_eq!(p.timestamp, Some(NOW as u64));
    assert_eq!(p.metrics.len(), 1);
    let m = &p.metrics[0];
    assert_eq!(m.name.as_deref(), Some("Node Control/Rebirth"));
    assert_eq!(m.datatype, datatype::BOOLEAN);
    assert_eq!(m.timestamp, Some(NOW as u64));
    assert!(matches!(m.value, Raw::Bool(true)), "{:?}", m.value);
}

#[test]
fn data_of_an_unborn_node_asks_for_a_rebirth_at_most_once_per_interval_and_the_birth_heals_it() {
    let mut s = State::new(100, 10_000);
    let data = payload(
        Some(NOW as u64),
        Some(5),
        &[metric(None, Some(2), datatype::FLOAT, &Raw::Float(1.0))],
    );
    // The agent started after the births: alias-only data cannot map, and the node is asked to rebirth.
    assert!(matches!(
        run_at(&mut s, "spBv1.0/plant/DDATA/gw1/pump", &data, NOW),
        Err(PayloadError::NoReadings(Some(Skip::UnknownAlias)))
    ));
    let r = s.take_rebirth().expect("a rebirth request");
    assert_eq!(r.topic, "spBv1.0/plant/NCMD/gw1");
    assert_eq!(r.payload, rebirth_payload(NOW));
    assert_eq!(s.take_rebirth(), None, "taken once");
    // Not again within the interval, again after it; a clock that went back asks again.
    let _ = run_at(&mut s, "spBv1.0/plant/DDATA/gw1/pump", &data, NOW + 9_999);
    assert_eq!(s.take_rebirth(), None);
    let _ = run_at(&mut s, "spBv1.0/plant/DDATA/gw1/pump", &data, NOW + 10_000);
    assert!(s.take_rebirth().is_some());
    let _ = run_at(&mut s, "spBv1.0/plant/DDATA/gw1/pump", &data, NOW - 1);
    assert!(s.take_rebirth().is_some());
    // Another node is asked on its own.
    let _ = run_at(&mut s, "spBv1.0/plant/NDATA/gw2", &data, NOW);
    assert_eq!(s.take_rebirth().unwrap().topic, "spBv1.0/plant/NCMD/gw2");

    // The births arrive; the same data maps and nobody is asked.
    birth(&mut s);
    assert_eq!(s.take_rebirth(), None);
    let data = payload(
        Some(NOW as u64),
        Some(2),
        &[metric(None, Some(2), datatype::FLOAT, &Raw::Float(1.0))],
    );
    let p = run_at(&mut s, "spBv1.0/plant/DDATA/gw1/pump", &data, NOW + 60_000).unwrap();
    assert_eq!(values(&p)[0].0, "plant/gw1/pump/temp");
    assert_eq!(s.take_rebirth(), None);
}

#[test]
fn an_unknown_alias_a_sequence_gap_or_a_device_birth_without_node_birth_ask_too() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "spBv1.0/plant/DDATA/gw1/pump",
            payload(
                Some(NOW as u64),
                Some(2),
                &[metric(None, Some(99), datatype::FLOAT, &Raw::Float(1.0))],
            ),
        ),
        (
            "spBv1.0/plant/DDATA/gw1/pump",
            payload(
                Some(NOW as u64),
                Some(9),
                &[metric(None, Some(2), datatype::FLOAT, &Raw::Float(1.0))],
            ),
        ),
    ];
    for (topic, p) in cases {
        let mut s = State::new(100, 10_000);
        birth(&mut s);
        let _ = run_at(&mut s, topic, &p, NOW + 60_000);
        assert_eq!(
            s.take_rebirth().map(|r| r.topic).as_deref(),
            Some("spBv1.0/plant/NCMD/gw1"),
            "{p:?}"
        );
    }
    let mut s = State::new(100, 10_000);
    let db = payload(
        Some(NOW as u64),
        Some(1),
        &[metric(
            Some("temp"),
            Some(2),
            datatype::FLOAT,
            &Raw::Float(21.5),
        )],
    );
    run(&mut s, "spBv1.0/plant/DBIRTH/gw1/pump", &db).unwrap();
    assert!(s.take_rebirth().is_some());
    // Off: never asks.
    let mut s = State::new(100, 0);
    let _ = run(&mut s, "spBv1.0/plant/DBIRTH/gw1/pump", &db);
    assert_eq!(s.take_rebirth(), None);
}

#[test]
fn the_rebirth_memory_is_bounded() {
    let mut s = State::new(100, 10_000);
    let data = payload(
        Some(NOW as u64),
        None,
        &[metric(None, Some(1), datatype::FLOAT, &Raw::Float(1.0))],
    );
    for i in 0..MAX_ASKED + 100 {
        let _ = run(&mut s, &format!("spBv1.0/g/NDATA/n{i}"), &data);
        let asked = s.take_rebirth().is_some();
        assert_eq!(asked, i < MAX_ASKED, "node {i}");
    }
    assert_eq!(s.asked.len(), MAX_ASKED);
    // Once the interval passed, old entries make room.
    let _ = run_at(&mut s, "spBv1.0/g/NDATA/late", &data, NOW + 10_001);
    assert!(s.take_rebirth().is_some());
    assert_eq!(s.asked.len(), 1);
}

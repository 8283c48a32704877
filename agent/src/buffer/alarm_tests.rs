//! The buffer with alarm rules: alarm records are committed with the seal, numbered from the batch sequence,
//! sent first, and no transition is repeated or skipped across failed commits and reopens.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::alarm::AlarmsConfig;
use crate::order::LatePolicy;
use fieldlink_proto::{decode_any, Record};

const RULES: &str = r#"
[[rules]]
name = "hot"
series = "m/+"
condition = "above"
levels = [{ name = "warm", limit = 5.0 }, { name = "hot", limit = 9.0 }]
hysteresis = 1.0

[[rules]]
name = "silent"
series = "m/+"
condition = "stale"
levels = [{ name = "stale", after_ms = 1000 }]
"#;

fn open(path: &Path) -> Buffer {
    let mut b = Buffer::open(path, Durability::Normal, "edge-1").unwrap();
    let cfg: AlarmsConfig = toml::from_str(RULES).unwrap();
    b.enable_alarms(Engine::from_config(&cfg), 0).unwrap();
    b
}

fn rules() -> Rules {
    Rules {
        dedup_window_ms: 60_000,
        max_recent: 1024,
        late: LatePolicy::Flag,
    }
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

fn seal(b: &mut Buffer, now_ms: i64) -> Result<SealReport, BufferError> {
    let mut enc = Encoder::new(3).unwrap();
    b.seal(
        i64::MAX,
        100_000,
        &mut enc,
        &BatchConfig::default(),
        rules(),
        now_ms,
    )
}

/// `(rule, rule_seq, series, from, to, ts)` of every pending alarm event, and the kinds of the pending records
/// in the order `pending` gives them.
type Ev = (String, u64, String, String, String, i64);
fn pending(b: &mut Buffer) -> (Vec<Ev>, Vec<&'static str>) {
    let (mut ev, mut kinds) = (Vec::new(), Vec::new());
    for p in b.pending(500, usize::MAX).unwrap() {
        match decode_any(&p.record).unwrap() {
            Record::Alarms(a) => {
                assert_eq!(a.seq, p.seq);
                kinds.push("alarms");
                ev.extend(a.events.into_iter().map(|e| {
                    (
                        e.rule,
                        e.rule_seq,
                        e.series.key,
                        e.from.name,
                        e.to.name,
                        e.ts_ms,
                    )
                }));
            }
            Record::Readings(_) => kinds.push("readings"),
        }
    }
    (ev, kinds)
}

fn ev(rule: &str, seq: u64, key: &str, from: &str, to: &str, ts: i64) -> Ev {
    (rule.into(), seq, key.into(), from.into(), to.into(), ts)
}

#[test]
fn alarm_records_go_out_before_a_backlog_and_share_the_batch_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    // A backlog of readings records on another series.
    for i in 0..20 {
        let rs: Vec<(i64, f64)> = (0..500).map(|j| (i * 1000 + j, j as f64)).collect();
        append(&mut b, &format!("dev{i}/v"), &rs);
    }
    seal(&mut b, 0).unwrap();
    let backlog = b.next_seq() - 1;
    assert!(backlog >= 2, "{backlog}");
    append(&mut b, "m/a", &[(10, 1.0), (20, 6.0), (30, 9.5)]);
    let r = seal(&mut b, 0).unwrap();
    assert_eq!(r.alarm_events, 2);
    let got = b.pending(3, usize::MAX).unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(
        got[0].seq,
        backlog + 1,
        "the alarm record takes the next batch number"
    );
    assert_eq!(got[0].readings, 0);
    let Record::Alarms(a) = decode_any(&got[0].record).unwrap() else {
        panic!("the first record of the call is not the alarm record")
    };
    assert_eq!(a.events.len(), 2);
    assert_eq!(a.events[1].cause.as_ref().unwrap().value, Value::F64(9.5));
    assert_eq!(&got[1..].iter().map(|p| p.seq).collect::<Vec<_>>(), &[1, 2]);
    assert_eq!(b.alarm_records_pending(), 1);
    let (records, readings) = b.ack(&[got[0].seq, got[1].seq]).unwrap();
    assert_eq!(records, 2);
    assert!(readings > 0);
    assert_eq!(b.alarm_records_pending(), 0);
    // Reopened, the counts come from the file.
    drop(b);
    let b = open(&dir.path().join("b.db"));
    assert_eq!(b.alarm_records_pending(), 0);
}

#[test]
fn a_failed_seal_or_a_reopen_neither_repeats_nor_skips_a_transition() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    let mut b = open(&path);
    append(&mut b, "m/a", &[(0, 1.0), (100, 6.0), (200, 9.5)]);
    append(&mut b, "m/b", &[(0, 7.0)]);
    b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
    assert!(seal(&mut b, 0).is_err());
    assert_eq!(pending(&mut b).0, vec![], "nothing committed");
    seal(&mut b, 0).unwrap();
    append(&mut b, "m/a", &[(300, 8.6), (400, 8.1), (500, 3.9)]);
    seal(&mut b, 0).unwrap();
    drop(b);
    let mut b = open(&path);
    // After the reopen the state goes on: 4.5 keeps `warm` of m/b (hysteresis); 3.0 after a gap of more than
    // 1000 ms: first `stale` at 600 + 1000, then back to ok, and `warm` left.
    append(&mut b, "m/b", &[(600, 4.5), (2000, 3.0)]);
    seal(&mut b, 0).unwrap();
    let (events, kinds) = pending(&mut b);
    assert_eq!(
        events,
        vec![
            ev("hot", 1, "m/a", "ok", "warm", 100),
            ev("hot", 2, "m/a", "warm", "hot", 200),
            ev("hot", 3, "m/b", "ok", "warm", 0),
            ev("hot", 4, "m/a", "hot", "ok", 500),
            ev("hot", 5, "m/b", "warm", "ok", 2000),
            ev("silent", 1, "m/b", "ok", "stale", 1600),
            ev("silent", 2, "m/b", "stale", "ok", 2000),
        ]
    );
    assert_eq!(&kinds[..3], &["alarms"; 3]);
}

#[test]
fn the_stale_clock_raises_an_alarm_without_any_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    append(&mut b, "m/a", &[(5000, 1.0)]);
    seal(&mut b, 5500).unwrap();
    assert_eq!(pending(&mut b).0, vec![]);
    let gone: Vec<u64> = b
        .pending(500, usize::MAX)
        .unwrap()
        .iter()
        .map(|p| p.seq)
        .collect();
    b.ack(&gone).unwrap();
    let r = seal(&mut b, 6000).unwrap();
    assert_eq!(r.alarm_events, 0, "not more than after_ms yet");
    let r = seal(&mut b, 6001).unwrap();
    assert_eq!(r.alarm_events, 1);
    assert_eq!(
        pending(&mut b),
        (
            vec![ev("silent", 1, "m/a", "ok", "stale", 6000)],
            vec!["alarms"]
        )
    );
    assert_eq!(b.take_alarm_events().len(), 1);
    // Not again.
    assert_eq!(seal(&mut b, 60_000).unwrap().alarm_events, 0);
}

#[test]
fn late_readings_are_not_evaluated_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    append(&mut b, "m/a", &[(1000, 1.0)]);
    seal(&mut b, 0).unwrap();
    // Older than the released 1000: flagged late; a 9.9 would raise `hot`.
    append(&mut b, "m/a", &[(500, 9.9)]);
    let r = seal(&mut b, 0).unwrap();
    assert_eq!((r.readings, r.alarm_events), (1, 0));
    assert_eq!(b.ledger().alarm_late_skipped, 1);
    assert_eq!(b.ledger().late_flagged, 1);
    append(&mut b, "m/a", &[(1500, 9.9)]);
    assert_eq!(seal(&mut b, 0).unwrap().alarm_events, 1, "ok -> hot");
    assert_eq!(b.alarms().active(), 1);
}

#[test]
fn the_stale_clock_waits_for_the_last_part_of_a_seal() {
    // After a restart the ready backlog is sealed in parts. A part without m/a's readings must not take the clock
    // past m/a's last known reading while the next part holds m/a's readings, every 500 ms (no gap over the
    // 1000 ms `after_ms`): that raised a false `stale` at 2000, then `ok` from an earlier reading.
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    append(&mut b, "m/a", &[(1000, 1.0)]);
    seal(&mut b, 1000).unwrap();
    append(&mut b, "m/b", &[(1500, 1.0)]);
    append(
        &mut b,
        "m/a",
        &[(1500, 1.0), (2000, 1.0), (2500, 1.0), (3000, 1.0)],
    );
    let mut enc = Encoder::new(3).unwrap();
    let mut parts = 0;
    // One group per part.
    while b
        .seal(
            i64::MAX,
            1,
            &mut enc,
            &BatchConfig::default(),
            rules(),
            3200,
        )
        .unwrap()
        .rows
        > 0
    {
        parts += 1;
    }
    assert_eq!(parts, 2);
    // m/b has nothing after 1500: stale at 2500, raised by the last part. Nothing for m/a.
    assert_eq!(
        pending(&mut b).0,
        vec![ev("silent", 1, "m/b", "ok", "stale", 2500)]
    );
}

#[test]
fn the_stale_clock_stops_at_the_oldest_group_not_sealed_yet() {
    // Live sources commit into newer groups while a seal (here one that finds nothing ready) looks at the clock:
    // readings of those groups have not been seen, so the clock may not pass their commit time.
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    let t = fieldlink_ops::unix_ms();
    append(&mut b, "m/a", &[(t, 1.0)]);
    let first = b.last_row_id();
    seal(&mut b, t).unwrap();
    append(&mut b, "m/a", &[(t + 500, 1.0)]);
    let mut enc = Encoder::new(3).unwrap();
    let later = t + 60_000;
    let r = b
        .seal(
            first,
            100_000,
            &mut enc,
            &BatchConfig::default(),
            rules(),
            later,
        )
        .unwrap();
    assert_eq!(
        r.alarm_events, 0,
        "m/a's reading at t + 500 is still in the buffer"
    );
    // Sealed, it is the last one: stale from t + 1500.
    seal(&mut b, later).unwrap();
    assert_eq!(
        pending(&mut b).0,
        vec![ev("silent", 1, "m/a", "ok", "stale", t + 1500)]
    );
}

/// `fieldlink-agent drain` runs no source: the silence of its series says nothing of the devices, so no seal of a
/// drain raises a stale alarm, with or without readings; the readings it seals are evaluated as usual.
#[test]
fn a_drain_raises_no_stale_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    append(&mut b, "m/a", &[(5000, 1.0)]);
    seal(&mut b, 5500).unwrap();
    b.close_all_windows();
    assert_eq!(seal(&mut b, 60_000).unwrap().alarm_events, 0, "no reading");
    append(&mut b, "m/b", &[(5000, 9.5)]);
    let r = seal(&mut b, 60_000).unwrap();
    assert_eq!(r.alarm_events, 1, "m/b hot; neither stale");
    assert_eq!(seal(&mut b, 120_000).unwrap().alarm_events, 0);
}

/// Sequence numbers of the pending alarm records (records without readings); puts them in flight.
fn alarm_records(b: &mut Buffer) -> Vec<u64> {
    b.pending(10, usize::MAX)
        .unwrap()
        .iter()
        .filter(|p| p.readings == 0)
        .map(|p| p.seq)
        .collect()
}

/// An alarm record Kinesis acknowledged whose deletion was given up is counted apart by `left`, like a record of
/// readings; the one not acknowledged stays counted.
#[test]
fn left_counts_an_acknowledged_alarm_record_still_in_the_file_apart() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    append(&mut b, "m/a", &[(10, 1.0), (20, 6.0)]);
    seal(&mut b, 0).unwrap();
    append(&mut b, "m/a", &[(30, 9.5)]);
    seal(&mut b, 0).unwrap();
    let alarm_seqs = alarm_records(&mut b);
    assert_eq!(alarm_seqs.len(), 2, "an alarm record per seal");
    let left = b.left().unwrap();
    assert_eq!((left.alarm_records, left.acknowledged_undeleted), (2, 0));
    b.note_undeleted(&alarm_seqs[..1]);
    let left = b.left().unwrap();
    assert_eq!((left.alarm_records, left.acknowledged_undeleted), (1, 1));
    b.ack(&alarm_seqs).unwrap();
    let left = b.left().unwrap();
    assert_eq!((left.alarm_records, left.acknowledged_undeleted), (0, 0));
}

/// Over the cap, an alarm record Kinesis acknowledged whose deletion was given up is deleted as acknowledged, like
/// a record of readings (`delete_batches` alone would leave it, counted unsent again).
#[test]
fn over_the_cap_an_acknowledged_alarm_record_kept_by_a_lock_is_deleted_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir.path().join("b.db"));
    append(&mut b, "m/a", &[(10, 1.0), (20, 6.0)]);
    seal(&mut b, 0).unwrap();
    let alarm = alarm_records(&mut b);
    assert_eq!(alarm.len(), 1);
    b.note_undeleted(&alarm);
    b.release_in_flight();
    let d = b.drop_oldest(0).unwrap();
    assert_eq!(d.acknowledged_records, 1);
    assert_eq!(b.alarm_records_pending(), 0);
    let left = b.left().unwrap();
    assert_eq!((left.alarm_records, left.acknowledged_undeleted), (0, 0));
}

/// An acknowledgement whose deletion fails at any of its transactions deletes nothing: its retry counts every
/// record, alarm records and records of readings, exactly once (when alarm records went in a transaction of their
/// own, a failure after it left them deleted but never counted sent).
#[test]
fn an_acknowledgement_failing_at_any_write_counts_each_record_once_on_its_retry() {
    for skip in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(&dir.path().join("b.db"));
        append(&mut b, "m/a", &[(10, 1.0), (20, 6.0)]);
        append(&mut b, "n/b", &[(10, 1.0), (20, 2.0)]);
        seal(&mut b, 0).unwrap();
        let seqs: Vec<u64> = b
            .pending(10, usize::MAX)
            .unwrap()
            .iter()
            .map(|p| p.seq)
            .collect();
        assert_eq!(b.alarm_records_pending(), 1);
        assert!(seqs.len() >= 2, "{seqs:?}");
        b.fault = Some(rusqlite::ffi::SQLITE_IOERR);
        b.fault_skip = skip;
        let (mut records, mut readings, mut tries) = (0, 0, 0);
        while tries < 3 {
            tries += 1;
            if let Ok((r, n)) = b.ack(&seqs) {
                (records, readings) = (records + r, readings + n);
                if b.fault.is_none() {
                    break;
                }
            }
        }
        assert_eq!(
            (records, readings),
            (seqs.len() as u64, 4),
            "the fault after {skip} transactions, {tries} tries"
        );
        assert_eq!(b.alarm_records_pending(), 0);
        assert_eq!(b.stats().pending_batches, 0);
    }
}

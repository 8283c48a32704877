use super::*;
use crate::order::LatePolicy;
use fieldlink_proto::decode;
use proptest::prelude::*;
use std::collections::BTreeSet;

fn reading(key: &str, ts: i64, v: f64) -> NewReading {
    NewReading {
        series: Series::new(key),
        ts_ms: ts,
        value: Value::F64(v),
        quality: Quality::Good,
    }
}

fn open(dir: &tempfile::TempDir) -> Buffer {
    Buffer::open(&dir.path().join("b.db"), Durability::Normal, "edge-1").unwrap()
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
}

#[test]
fn drop_oldest_frees_space_and_counts_the_readings() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let mut enc = Encoder::new(3).unwrap();
    for i in 0..10 {
        let group: Vec<_> = (0..50)
            .map(|j| reading(&format!("d{j}/v"), i * 100 + j, fastrand::f64()))
            .collect();
        b.append([group.as_slice()]).unwrap();
        seal_all(&mut b, &mut enc, 1024);
    }
    let before = b.stats();
    let cap = before.bytes() / 2;
    let dropped = b.drop_oldest(cap).unwrap();
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
            series: s.clone(),
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
            series: Series::new("m/a"),
            ts_ms: 1,
            value: Value::F64(f64::NAN),
            quality: Quality::Bad,
        },
        NewReading {
            series: Series::new("m/b"),
            ts_ms: 1,
            value: Value::F64(f64::INFINITY),
            quality: Quality::Good,
        },
        NewReading {
            series: Series::new("m/c"),
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
fn an_unreadable_row_is_skipped_and_counted_not_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    b.append([vec![reading("a/x", 1, 1.0), reading("a/x", 2, 2.0)].as_slice()])
        .unwrap();
    // Someone edits the file: a string where an i64 belongs.
    let raw = rusqlite::Connection::open(dir.path().join("b.db")).unwrap();
    raw.execute(
        "UPDATE readings SET kind = 1, value = 'garbage' WHERE ts_ms = 1",
        [],
    )
    .unwrap();
    drop(raw);
    let r = seal_all(&mut b, &mut Encoder::new(3).unwrap(), 1024);
    assert_eq!((r.rows, r.readings), (2, 1));
    assert_eq!(b.ledger().dead_lettered, 1);
    assert_eq!(b.stats().unsealed_readings, 0);
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

#[test]
fn an_append_whose_source_stopped_is_dropped_uncommitted_and_the_others_commit() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
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

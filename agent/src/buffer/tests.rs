#![allow(clippy::unwrap_used)]

use super::*;
use fieldlink_proto::decode;

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

#[test]
fn sealed_batches_hold_exactly_the_appended_readings_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let group: Vec<_> = (0..25)
        .map(|i| reading(&format!("d/{}", i % 3), i, i as f64))
        .collect();
    b.append([group.as_slice()]).unwrap();
    let mut enc = Encoder::new(3).unwrap();
    let s1 = b.seal(&mut enc, 10, 1 << 20, 0).unwrap().unwrap();
    let s2 = b.seal(&mut enc, 10, 1 << 20, 0).unwrap().unwrap();
    let s3 = b.seal(&mut enc, 10, 1 << 20, 0).unwrap().unwrap();
    assert_eq!(
        (s1.seq, s1.readings, s2.seq, s3.seq, s3.readings),
        (1, 10, 2, 3, 5)
    );
    assert!(b.seal(&mut enc, 10, 1 << 20, 0).unwrap().is_none());
    let pending = b.pending(0, 100, 1 << 20).unwrap();
    let mut got: Vec<(String, i64)> = Vec::new();
    for p in &pending {
        let batch = decode(&p.record).unwrap();
        assert_eq!(batch.seq, p.seq);
        for r in batch.readings {
            got.push((batch.series[r.series as usize].key.clone(), r.ts_ms));
        }
    }
    got.sort_by_key(|(_, ts)| *ts);
    assert_eq!(
        got,
        (0..25)
            .map(|i| (format!("d/{}", i % 3), i))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        b.stats(),
        Stats {
            unsealed_readings: 0,
            pending_batches: 3,
            pending_readings: 25,
            pending_bytes: pending.iter().map(|p| p.record.len() as u64).sum()
        }
    );
}

#[test]
fn records_are_deleted_only_when_acknowledged_and_survive_reopen_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut enc = Encoder::new(3).unwrap();
    let before = {
        let mut b = open(&dir);
        b.append([vec![reading("a/x", 1, 1.0), reading("a/y", 2, 2.0)].as_slice()])
            .unwrap();
        b.seal(&mut enc, 100, 1 << 20, 0).unwrap();
        b.append([vec![reading("a/x", 3, 3.0)].as_slice()]).unwrap();
        b.pending(0, 10, 1 << 20).unwrap()
    };
    let mut b = open(&dir);
    assert_eq!(
        b.pending(0, 10, 1 << 20).unwrap(),
        before,
        "sealed record changed across reopen"
    );
    assert_eq!(b.stats().unsealed_readings, 1);
    assert_eq!(b.next_seq(), 2);
    b.ack(&[1]).unwrap();
    assert!(b.pending(0, 10, 1 << 20).unwrap().is_empty());
    // Sequence numbers are never reused after acknowledgement.
    let s = b.seal(&mut enc, 100, 1 << 20, 0).unwrap().unwrap();
    assert_eq!(s.seq, 2);
    drop(b);
    assert_eq!(open(&dir).next_seq(), 3);
}

#[test]
fn pending_is_bounded_by_count_and_bytes_but_returns_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    let mut enc = Encoder::new(3).unwrap();
    for i in 0..5 {
        b.append([vec![reading("a/x", i, i as f64)].as_slice()])
            .unwrap();
        b.seal(&mut enc, 100, 1 << 20, 0).unwrap();
    }
    assert_eq!(b.pending(0, 2, 1 << 20).unwrap().len(), 2);
    assert_eq!(b.pending(0, 10, 1).unwrap().len(), 1);
    assert_eq!(
        b.pending(3, 10, 1 << 20)
            .unwrap()
            .iter()
            .map(|p| p.seq)
            .collect::<Vec<_>>(),
        vec![4, 5]
    );
}

#[test]
fn a_file_that_is_not_a_buffer_is_refused_not_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    std::fs::write(&path, b"this is not sqlite, and it is someone's data").unwrap();
    let err = Buffer::open(&path, Durability::Full, "edge-1").unwrap_err();
    assert!(err.to_string().contains("b.db"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"this is not sqlite, and it is someone's data"
    );
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
    b.seal(&mut Encoder::new(3).unwrap(), 100, 1 << 20, 0)
        .unwrap();
    let batch = decode(&b.pending(0, 1, 1 << 20).unwrap()[0].record).unwrap();
    assert_eq!(batch.series, vec![s]);
    let got: Vec<_> = batch
        .readings
        .iter()
        .map(|r| (r.value.clone(), r.quality))
        .collect();
    let want: Vec<_> = group.iter().map(|r| (r.value.clone(), r.quality)).collect();
    assert_eq!(got, want);
}

#[test]
fn a_message_is_never_split_across_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = open(&dir);
    // Three messages of 4 readings each; batches of at most 6 readings must cut at message ends.
    let msgs: Vec<Vec<NewReading>> = (0..3)
        .map(|m| {
            (0..4)
                .map(|i| reading(&format!("imu/{m}/{i}"), m, i as f64))
                .collect()
        })
        .collect();
    b.append(msgs.iter().map(Vec::as_slice)).unwrap();
    let mut enc = Encoder::new(3).unwrap();
    let sizes: Vec<usize> =
        std::iter::from_fn(|| b.seal(&mut enc, 6, 1 << 20, 0).unwrap().map(|s| s.readings))
            .collect();
    assert_eq!(sizes, vec![4, 4, 4]);
    // A message longer than the limit is split rather than stuck.
    let long: Vec<NewReading> = (0..10).map(|i| reading("big/x", i, 0.0)).collect();
    b.append([long.as_slice()]).unwrap();
    let sizes: Vec<usize> =
        std::iter::from_fn(|| b.seal(&mut enc, 6, 1 << 20, 0).unwrap().map(|s| s.readings))
            .collect();
    assert_eq!(sizes, vec![6, 4]);
}

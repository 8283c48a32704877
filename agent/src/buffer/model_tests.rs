//! Model-based tests of the buffer core and of its thread, with injected SQLite errors (after Vector's
//! disk-buffer model tests).
//!
//! The thread test drives the real buffer thread through its handle (appends with acknowledgements, some of a
//! stopped source, fetches, acknowledgements, releases, flushes, injected failures) and checks, once everything is
//! drained, that every acknowledged reading was sent exactly once and nothing else. The core test below checks
//! after every step.
//!
//! Random appends, seals (whole and partial, as the thread does after `SQLITE_FULL`), fetches, acknowledgements,
//! releases, `drop_oldest`, reopens from the file, and SQLite failures (busy, full, I/O) injected into the next
//! transaction. Every reading carries a unique number, so contents compare as **multisets** of numbers. After every
//! step, against a plain in-memory model:
//! - every committed (acknowledgeable) reading is exactly once in `readings`, in a pending record, among the
//!   readings of records acknowledged as sent, or among those counted as dropped; a failed operation changes
//!   nothing;
//! - the ledger of the open buffer equals the model's counts since the open, and `stats` equal what the file holds;
//! - sequence numbers only grow and are never reused, and the epoch never changes;
//! - records in flight are never dropped; memory stays bounded (caches, in-flight set).

use super::*;
use crate::order::LatePolicy;
use fieldlink_proto::decode;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
enum Op {
    /// Groups of readings: `(series, timestamp)` each; values are fresh unique numbers.
    Append(Vec<Vec<(u8, i64)>>),
    /// Seal at most this many rows.
    Seal(usize),
    /// Fetch up to this many records (they are in flight), then acknowledge the first `ack` of them.
    FetchAck { max: usize, ack: usize },
    /// The call failed: records of the last fetch are no longer in flight.
    Release,
    /// `drop_oldest` to this percentage of the current size.
    Drop(u8),
    /// Close and open the file again.
    Reopen,
    /// The next operation's transaction fails with this SQLite code (after its statements ran).
    Fault(i32),
}

fn arb_op() -> impl Strategy<Value = Op> {
    let group = prop::collection::vec((0u8..5, 0i64..10_000), 1..12);
    prop_oneof![
        5 => prop::collection::vec(group, 1..4).prop_map(Op::Append),
        3 => prop_oneof![Just(1usize), Just(7), Just(100_000)].prop_map(Op::Seal),
        3 => (1usize..6, 0usize..6).prop_map(|(max, ack)| Op::FetchAck { max, ack }),
        1 => Just(Op::Release),
        1 => (0u8..100).prop_map(Op::Drop),
        1 => Just(Op::Reopen),
        2 => prop_oneof![
            Just(rusqlite::ffi::SQLITE_BUSY),
            Just(rusqlite::ffi::SQLITE_FULL),
            Just(rusqlite::ffi::SQLITE_IOERR),
        ]
        .prop_map(Op::Fault),
    ]
}

fn open(path: &Path) -> Buffer {
    Buffer::open(path, Durability::Normal, "model").unwrap()
}

fn rules() -> Rules {
    Rules {
        dedup_window_ms: 60_000,
        max_recent: 1024,
        late: LatePolicy::Flag,
    }
}

/// The numbers (values) of the readings in a record.
fn numbers(record: &[u8]) -> Vec<u64> {
    decode(record)
        .unwrap()
        .readings
        .iter()
        .map(|r| match r.value {
            Value::F64(f) => f as u64,
            ref v => panic!("unexpected value {v:?}"),
        })
        .collect()
}

/// What the file holds: unsealed numbers, and every pending record's numbers by sequence number.
fn contents(b: &Buffer) -> (Vec<u64>, BTreeMap<u64, Vec<u64>>) {
    let mut unsealed: Vec<u64> = Vec::new();
    let mut rows = Vec::new();
    for blob in b
        .conn
        .prepare("SELECT blob FROM groups")
        .unwrap()
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
    {
        super::group::decode(&blob.unwrap(), &mut rows).unwrap();
    }
    for r in rows {
        match r.value {
            Value::F64(f) => unsealed.push(f as u64),
            ref v => panic!("unexpected value {v:?}"),
        }
    }
    unsealed.sort_unstable();
    let pending = b
        .conn
        .prepare("SELECT seq, record FROM batches")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
        })
        .unwrap()
        .map(|r| {
            let (seq, rec) = r.unwrap();
            (seq, numbers(&rec))
        })
        .collect();
    (unsealed, pending)
}

#[derive(Debug, Default)]
struct Model {
    /// Numbers committed (their sources would have been acknowledged), all lifetimes.
    committed: Vec<u64>,
    /// Numbers in records acknowledged by Kinesis.
    sent: Vec<u64>,
    /// Numbers in records dropped by the overflow policy.
    dropped: Vec<u64>,
    /// Counts since the buffer was last opened: appended, sent, dropped.
    since_open: (u64, u64, u64),
    /// Highest sequence number ever seen.
    max_seq: u64,
    /// Records handed out by the last fetch and not acknowledged or released.
    in_flight: BTreeSet<u64>,
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_buffer_matches_its_model_through_faults_and_restarts(ops in prop::collection::vec(arb_op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.db");
        let mut b = open(&path);
        let epoch = b.epoch();
        let mut enc = Encoder::new(1).unwrap();
        let cfg = BatchConfig { target_record_bytes: 300, ..BatchConfig::default() };
        let mut m = Model::default();
        let mut next_number = 1u64;
        for op in ops {
            let (before_unsealed, before) = contents(&b);
            let unchanged = |b: &Buffer| contents(b) == (before_unsealed.clone(), before.clone());
            match op.clone() {
                Op::Fault(code) => b.fault = Some(code),
                Op::Append(groups) => {
                    let groups: Vec<Vec<NewReading>> = groups
                        .iter()
                        .map(|g| {
                            g.iter()
                                .map(|&(s, ts)| {
                                    next_number += 1;
                                    NewReading {
                                        series: Series::new(format!("d{s}/v")).into(),
                                        ts_ms: ts,
                                        value: Value::F64((next_number - 1) as f64),
                                        quality: Quality::Good,
                                    }
                                })
                                .collect()
                        })
                        .collect();
                    let failing = b.fault.is_some();
                    match b.append(groups.iter().map(Vec::as_slice)) {
                        Ok(n) => {
                            prop_assert!(!failing, "an injected fault must fail the commit");
                            let nums: Vec<u64> = groups.iter().flatten().map(|r| match r.value { Value::F64(f) => f as u64, _ => 0 }).collect();
                            prop_assert_eq!(n, nums.len() as u64);
                            m.committed.extend(nums);
                            m.since_open.0 += n;
                        }
                        Err(e) => {
                            prop_assert!(failing, "unexpected error {}", e);
                            prop_assert!(unchanged(&b), "a failed append changed the buffer");
                        }
                    }
                }
                Op::Seal(max_rows) => {
                    let failing = b.fault.is_some();
                    match b.seal(i64::MAX, max_rows, &mut enc, &cfg, rules(), 0) {
                        Ok(r) => prop_assert!(!failing || r.rows == 0, "a fault must fail a seal that writes"),
                        Err(e) => {
                            prop_assert!(failing, "unexpected error {}", e);
                            prop_assert!(unchanged(&b), "a failed seal changed the buffer");
                        }
                    }
                }
                Op::FetchAck { max, ack } => {
                    let failing = b.fault.is_some();
                    let got = b.pending(max, usize::MAX).unwrap();
                    m.in_flight = got.iter().map(|p| p.seq).collect();
                    let seqs: Vec<u64> = got.iter().take(ack).map(|p| p.seq).collect();
                    match b.ack(&seqs) {
                        Ok((records, readings)) => {
                            prop_assert!(!failing);
                            let acked: Vec<u64> = got.iter().take(ack).flat_map(|p| numbers(&p.record)).collect();
                            prop_assert_eq!(records, seqs.len() as u64);
                            prop_assert_eq!(readings, acked.len() as u64);
                            m.sent.extend(acked);
                            m.since_open.1 += readings;
                            for s in &seqs {
                                m.in_flight.remove(s);
                            }
                        }
                        Err(_) => prop_assert!(failing || seqs.is_empty()),
                    }
                }
                Op::Release => {
                    b.release_in_flight();
                    m.in_flight.clear();
                }
                Op::Drop(pct) => {
                    let failing = b.fault.is_some();
                    let cap = b.stats().bytes() * u64::from(pct) / 100;
                    match b.drop_oldest(cap) {
                        Ok(d) => {
                            prop_assert_eq!(d.acknowledged_records, 0, "nothing was acknowledged and kept");
                            let n = d.readings;
                            let (_, after) = contents(&b);
                            let gone: Vec<u64> = before
                                .iter()
                                .filter(|(seq, _)| !after.contains_key(seq))
                                .flat_map(|(seq, nums)| {
                                    assert!(!m.in_flight.contains(seq), "record {seq} was dropped while in flight");
                                    nums.clone()
                                })
                                .collect();
                            prop_assert_eq!(n, gone.len() as u64);
                            // The oldest go first: a record older than a dropped one stays only while in flight.
                            if let Some(newest_gone) = before.keys().filter(|s| !after.contains_key(s)).max() {
                                for kept in after.keys().filter(|s| *s < newest_gone) {
                                    prop_assert!(m.in_flight.contains(kept), "record {} kept, a newer one dropped", kept);
                                }
                            }
                            m.dropped.extend(gone);
                            m.since_open.2 += n;
                        }
                        Err(_) => {
                            prop_assert!(failing);
                            prop_assert!(unchanged(&b), "a failed drop changed the buffer");
                        }
                    }
                }
                Op::Reopen => {
                    b.fault = None;
                    drop(b);
                    b = open(&path);
                    prop_assert_eq!(b.epoch(), epoch, "the epoch belongs to the file");
                    m.since_open = (0, 0, 0);
                    m.in_flight.clear();
                }
            }
            if !matches!(op, Op::Fault(_)) {
                // A fault not consumed by this operation (it ran no transaction) is not carried over.
                b.fault = None;
            }

            // Nothing lost, nothing doubled: committed = unsealed + pending + sent + dropped, as multisets.
            let (unsealed, pending) = contents(&b);
            let mut held: Vec<u64> = unsealed.clone();
            held.extend(pending.values().flatten());
            held.extend(&m.sent);
            held.extend(&m.dropped);
            prop_assert_eq!(sorted(held), sorted(m.committed.clone()), "after {:?}", op);

            // The ledger since the open and the stats match.
            let (l, s) = (b.ledger(), b.stats());
            prop_assert_eq!((l.appended, l.sent, l.dropped), m.since_open, "ledger after {:?}", op);
            prop_assert_eq!(l.deduplicated + l.dead_lettered, 0);
            prop_assert_eq!(s.unsealed_readings, unsealed.len() as u64);
            prop_assert_eq!(s.pending_batches, pending.len() as u64);
            prop_assert_eq!(s.pending_readings, pending.values().map(|v| v.len() as u64).sum::<u64>());

            // Sequence numbers only grow: every record below next_seq; a new record above all earlier ones.
            for &seq in pending.keys() {
                prop_assert!(seq < b.next_seq());
                if !before.contains_key(&seq) {
                    prop_assert!(seq > m.max_seq, "sequence number {} reused", seq);
                }
            }
            m.max_seq = m.max_seq.max(b.next_seq() - 1);

            // Memory stays bounded.
            prop_assert!(b.series_ids.len() <= SERIES_CACHE_MAX && b.states.len() <= SERIES_CACHE_MAX);
            prop_assert!(b.in_flight.len() <= 6);
        }
    }
}

#[test]
fn error_classes_follow_the_sqlite_codes() {
    let of = |code| {
        BufferError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
        .class()
    };
    assert_eq!(of(rusqlite::ffi::SQLITE_FULL), ErrorClass::Full);
    assert_eq!(of(rusqlite::ffi::SQLITE_BUSY), ErrorClass::Busy);
    assert_eq!(of(rusqlite::ffi::SQLITE_LOCKED), ErrorClass::Busy);
    assert_eq!(of(rusqlite::ffi::SQLITE_IOERR), ErrorClass::Other);
    assert_eq!(of(rusqlite::ffi::SQLITE_READONLY), ErrorClass::Other);
}

/// Fetches up to `max` pending records and acknowledges the first `ack`; the numbers they held.
async fn fetch_ack(handle: &BufferHandle, max: usize, ack: usize) -> Vec<u64> {
    let got = handle.fetch(max, usize::MAX).await.unwrap().unwrap();
    let seqs: Vec<u64> = got.iter().take(ack).map(|p| p.seq).collect();
    handle.ack(seqs).await.unwrap();
    got.iter()
        .take(ack)
        .flat_map(|p| numbers(&p.record))
        .collect()
}

/// An operation on the buffer thread.
#[derive(Debug, Clone)]
enum ThreadOp {
    /// Readings of a message; `cancelled`: its source stopped before the commit.
    Append { n: usize, cancelled: bool },
    /// The next transaction fails with this SQLite code.
    Fault(i32),
    /// Fetch up to `max` records, acknowledge the first `ack`.
    FetchAck { max: usize, ack: usize },
    /// The last fetch's call failed.
    Release,
    /// Seal everything now.
    Flush,
}

fn arb_thread_op() -> impl Strategy<Value = ThreadOp> {
    prop_oneof![
        6 => (1usize..8, prop::bool::weighted(0.1))
            .prop_map(|(n, cancelled)| ThreadOp::Append { n, cancelled }),
        2 => prop_oneof![
            Just(rusqlite::ffi::SQLITE_BUSY),
            Just(rusqlite::ffi::SQLITE_FULL),
            Just(rusqlite::ffi::SQLITE_IOERR),
        ]
        .prop_map(ThreadOp::Fault),
        2 => (1usize..6, 0usize..6).prop_map(|(max, ack)| ThreadOp::FetchAck { max, ack }),
        1 => Just(ThreadOp::Release),
        1 => Just(ThreadOp::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The buffer thread against a model, with SQLite failures injected between operations: a failed commit is
    /// held and retried (never dropped, never doubled), acknowledgements run only after a commit, an append whose
    /// source stopped is never committed, and once everything is drained every acknowledged reading was sent
    /// exactly once (multisets), every other one never; the ledger balances.
    #[test]
    fn the_buffer_thread_commits_each_acknowledged_reading_once_through_faults(ops in prop::collection::vec(arb_thread_op(), 1..40)) {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let dir = tempfile::tempdir().unwrap();
        let cfg: BufferConfig = toml::from_str(&format!(
            "path = {:?}\noverflow = \"backpressure\"",
            dir.path().join("t.db").display().to_string()
        ))
        .unwrap();
        let batch = BatchConfig { target_record_bytes: 300, linger_ms: 10, ..BatchConfig::default() };
        let order = crate::order::OrderConfig { reorder_window_ms: 0, ..crate::order::OrderConfig::default() };
        let metrics = crate::metrics::AgentMetrics::new(fieldlink_ops::metrics::Registry::new());
        let (handle, thread) = spawn(&cfg, &batch, &order, "model", metrics.clone()).unwrap();
        let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
        let mut appended: Vec<u64> = Vec::new(); // not cancelled
        let mut sent: Vec<u64> = Vec::new();
        let mut next = 1u64;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            for op in &ops {
                match *op {
                    ThreadOp::Append { n, cancelled } => {
                        let nums: Vec<u64> = (next..next + n as u64).collect();
                        next += n as u64;
                        let readings = nums.iter().map(|&v| NewReading {
                            series: Series::new(format!("d{}/v", v % 3)).into(),
                            ts_ms: v as i64,
                            value: Value::F64(v as f64),
                            quality: Quality::Good,
                        }).collect();
                        let record = (acked.clone(), nums.clone());
                        let ack = Ack {
                            on_commit: Box::new(move || record.0.lock().unwrap().extend(record.1)),
                            cancelled: Arc::new(AtomicBool::new(cancelled)),
                        };
                        if !cancelled {
                            appended.extend(&nums);
                        }
                        handle.append(readings, Some(ack)).await.unwrap();
                    }
                    ThreadOp::Fault(code) => handle.inject_fault(code).await,
                    ThreadOp::FetchAck { max, ack } => sent.extend(fetch_ack(&handle, max, ack).await),
                    ThreadOp::Release => handle.release().await.unwrap(),
                    ThreadOp::Flush => handle.flush().await.unwrap(),
                }
            }
            // Drain: every held commit goes through (faults are one-shot), everything is sealed and sent.
            for _ in 0..200 {
                handle.flush().await.unwrap();
                sent.extend(fetch_ack(&handle, 500, 500).await);
                let done = metrics.pending_batches.get() == 0 && metrics.unsealed_readings.get() == 0
                    && acked.lock().unwrap().len() == appended.len();
                if done {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
        drop(handle);
        thread.join().unwrap();
        let acked = sorted(acked.lock().unwrap().clone());
        prop_assert_eq!(&acked, &sorted(appended.clone()), "every live append acknowledged once, after its commit");
        prop_assert_eq!(sorted(sent), acked, "each acknowledged reading sent exactly once, nothing else");
        prop_assert_eq!(metrics.readings_received.get(), metrics.readings_sent.get(), "ledger");
    }
}

/// A fetch that cannot read the pending records (here their table is renamed away by another connection, as a
/// damaged page under them would fail the read) answers the error, so the sender can show it in `/health`; before,
/// it answered "nothing pending" and the agent looked idle with a backlog.
#[test]
fn a_fetch_that_cannot_read_says_so_instead_of_answering_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let cfg: BufferConfig =
        toml::from_str(&format!("path = {:?}", path.display().to_string())).unwrap();
    let batch = BatchConfig {
        linger_ms: 10,
        ..BatchConfig::default()
    };
    let order = crate::order::OrderConfig {
        reorder_window_ms: 0,
        ..crate::order::OrderConfig::default()
    };
    let metrics = crate::metrics::AgentMetrics::new(fieldlink_ops::metrics::Registry::new());
    let (handle, thread) = spawn(&cfg, &batch, &order, "unreadable", metrics).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let readings = (0..5)
            .map(|v| NewReading {
                series: Series::new("d/v").into(),
                ts_ms: v,
                value: Value::F64(v as f64),
                quality: Quality::Good,
            })
            .collect();
        handle.append(readings, None).await.unwrap();
        // Sealed and readable first.
        for _ in 0..500 {
            handle.flush().await.unwrap();
            if !handle
                .fetch(10, usize::MAX)
                .await
                .unwrap()
                .unwrap()
                .is_empty()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(!handle
            .fetch(10, usize::MAX)
            .await
            .unwrap()
            .unwrap()
            .is_empty());
        let other = rusqlite::Connection::open(&path).unwrap();
        other
            .busy_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        other
            .execute_batch("ALTER TABLE batches RENAME TO batches_away")
            .unwrap();
        let why = handle.fetch(10, usize::MAX).await.unwrap().unwrap_err();
        assert!(why.contains("batches"), "{why}");
        other
            .execute_batch("ALTER TABLE batches_away RENAME TO batches")
            .unwrap();
        let got = handle.fetch(10, usize::MAX).await.unwrap().unwrap();
        assert!(!got.is_empty(), "readable again");
    });
    drop(handle);
    thread.join().unwrap();
}

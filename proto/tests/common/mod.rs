//! Shared by the golden tests of both versions: a counting allocator, hex, the series-major view of a batch and
//! random batches.
#![allow(dead_code)] // each test file uses a part
#![allow(unsafe_code)] // the counting allocator
#![allow(clippy::unwrap_used)]

use fieldlink_proto::{Batch, Quality, Reading, Series, Value};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
pub(crate) fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

pub(crate) fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// What the decoder returns for `b`: readings grouped by series, relative order within a series kept.
pub(crate) fn series_major(b: &Batch) -> Batch {
    let mut out = b.clone();
    out.readings.sort_by_key(|r| r.series); // stable
    out
}

pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f64>().prop_map(Value::F64),
        any::<i64>().prop_map(Value::I64),
        any::<bool>().prop_map(Value::Bool),
        "[a-zé ]{0,12}".prop_map(Value::Str),
    ]
}

pub(crate) fn arb_batch() -> impl Strategy<Value = Batch> {
    let series = prop::collection::vec(
        (
            "[a-z/]{1,20}",
            prop::collection::vec(("[a-z]{1,5}", "[a-z0-9]{0,5}"), 0..3),
        )
            .prop_map(|(key, tags)| Series { key, tags }),
        1..6,
    );
    (series, any::<u64>(), any::<u64>(), "[a-z0-9-]{1,64}").prop_flat_map(
        |(series, epoch, seq, agent_id)| {
            let n = series.len() as u32;
            let reading = (0..n, any::<i64>(), arb_value(), 0u8..3, any::<bool>()).prop_map(
                |(s, ts, value, q, late)| Reading {
                    series: s,
                    ts_ms: ts,
                    value,
                    quality: [Quality::Good, Quality::Uncertain, Quality::Bad][q as usize],
                    late,
                },
            );
            prop::collection::vec(reading, 1..200).prop_map(move |readings| Batch {
                agent_id: agent_id.clone(),
                epoch,
                seq,
                series: series.clone(),
                readings,
            })
        },
    )
}

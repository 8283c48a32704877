//! The blob of one row of `state_log`: what the dedup states of the series a seal involved remembered since they
//! were last stored, for every such series that is stored as a delta, in one row per seal. Pure.
//!
//! ```text
//! repeated until the blob ends:
//!   varint  series id      the buffer's `series.id` (≥ 1)
//!   varint  len            bytes that follow for this series
//!   len     delta          order::delta_bytes: newest released time (i64 LE), then (ts i64 LE, identity u64 LE)
//!                          per remembered reading, in the order remembered
//! ```
//! Varints are unsigned LEB128 (at most 10 bytes). A series appears at most once per blob.
//!
//! Why one row per seal: a row per series and seal (the table before) put each seal's deltas at a thousand
//! places of a b-tree ordered by series; SQLite then rewrote a 4 KiB page for each (through the WAL and again at
//! the checkpoint) to store a few hundred bytes: 536 bytes written per reading in the dense bench case. One
//! appended row writes its bytes once, in order.

use super::group::{get_varint, put_varint};

/// Appends `series`' delta: its newest released time and the `(series, ts, identity)` run it remembered.
pub(crate) fn push(blob: &mut Vec<u8>, series: i64, last_ts: i64, run: &[(i64, i64, u64)]) {
    put_varint(blob, series as u64);
    put_varint(blob, 8 + 16 * run.len() as u64);
    crate::order::put_delta(blob, last_ts, run);
}

/// The `(series, delta)` entries of a blob, in order. Stops at the first malformed entry (a blob the agent did not
/// write): what came before it is returned, the caller learns of the rest from `complete`.
pub(crate) fn entries(blob: &[u8]) -> Entries<'_> {
    Entries {
        rest: blob,
        complete: true,
    }
}

/// Iterator of [`entries`].
pub(crate) struct Entries<'a> {
    rest: &'a [u8],
    /// False once a malformed entry was met.
    pub(crate) complete: bool,
}

impl<'a> Iterator for Entries<'a> {
    type Item = (i64, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || !self.complete {
            return None;
        }
        let mut rest = self.rest;
        let entry = get_varint(&mut rest).and_then(|sid| {
            let len = usize::try_from(get_varint(&mut rest)?).ok()?;
            let delta = rest.get(..len)?;
            rest = &rest[len..];
            Some((i64::try_from(sid).ok()?, delta))
        });
        match entry {
            Some(e) => {
                self.rest = rest;
                Some(e)
            }
            None => {
                self.complete = false;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::delta_bytes;

    #[test]
    fn entries_give_back_what_was_pushed_as_delta_bytes_would_write_it() {
        type Run = (i64, i64, Vec<(i64, i64, u64)>);
        let runs: [Run; 3] = [
            (7, 1_000, vec![(7, 990, 1), (7, 1_000, u64::MAX)]),
            (300, i64::MIN, vec![]),
            (i64::MAX, -5, vec![(i64::MAX, -5, 42)]),
        ];
        let mut blob = Vec::new();
        for (sid, last, run) in &runs {
            push(&mut blob, *sid, *last, run);
        }
        let mut it = entries(&blob);
        let got: Vec<(i64, Vec<u8>)> = it.by_ref().map(|(s, d)| (s, d.to_vec())).collect();
        let want: Vec<(i64, Vec<u8>)> = runs
            .iter()
            .map(|(sid, last, run)| (*sid, delta_bytes(*last, run)))
            .collect();
        assert_eq!(got, want);
        assert!(it.complete);
    }

    #[test]
    fn a_truncated_blob_gives_its_whole_entries_and_says_it_is_incomplete() {
        let mut blob = Vec::new();
        push(&mut blob, 1, 10, &[(1, 10, 5)]);
        let first = blob.len();
        push(&mut blob, 2, 20, &[(2, 20, 6)]);
        for cut in first + 1..blob.len() {
            let mut it = entries(&blob[..cut]);
            assert_eq!(it.by_ref().count(), 1, "cut at {cut}");
            assert!(!it.complete, "cut at {cut}");
        }
        let mut it = entries(&blob[..first]);
        assert_eq!(it.by_ref().count(), 1);
        assert!(it.complete);
    }
}

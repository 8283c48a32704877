//! Release of buffered readings: per-series event-time ordering, deduplication and late handling. Pure.
//!
//! The buffer hands over the readings that have waited at least the reorder window (wall clock) since they were
//! committed. [`release`] groups them by series, sorts each series by event time, and checks every reading
//! against the series' [`SeriesState`]:
//!
//! - **duplicate**: same series, timestamp and value as a reading released within the dedup window (or earlier
//!   in the same call) → dropped and counted;
//! - **late**: its timestamp is before the last released timestamp of its series (it arrived more than a reorder
//!   window after a newer reading) → released flagged `late`, or dead-lettered, per [`LatePolicy`];
//! - otherwise released in order.
//!
//! The states are persisted by the buffer in the same transaction as the batches they produced, so dedup and
//! ordering hold across restarts. A state remembers at most `max_recent` readings, those within `dedup_window_ms`
//! of event time behind the newest; memory per series is bounded.

mod config;
pub use config::OrderConfig;

use fieldlink_proto::{Quality, Value};
use serde::Deserialize;
use std::collections::HashMap;

/// What happens to a late reading.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Send it, with the `late` flag set (default).
    #[default]
    Flag,
    /// Do not send it; keep it in the buffer's bounded dead-letter table.
    DeadLetter,
}

/// A reading waiting to be released.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Buffer series id.
    pub series: i64,
    /// Event time, Unix ms.
    pub ts_ms: i64,
    /// Value.
    pub value: Value,
    /// Quality.
    pub quality: Quality,
}

/// A released reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    /// The reading.
    pub reading: Pending,
    /// Flagged late.
    pub late: bool,
}

/// What a series remembers between releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesState {
    /// Newest released event time (`i64::MIN` before the first).
    pub last_ts: i64,
    /// `(ts, hash of (ts, value))` of recently released readings, ordered by ts (oldest first).
    pub recent: Vec<(i64, u64)>,
}

impl Default for SeriesState {
    fn default() -> Self {
        Self::new()
    }
}

impl SeriesState {
    /// A state that has released nothing.
    pub fn new() -> Self {
        Self {
            last_ts: i64::MIN,
            recent: Vec::new(),
        }
    }

    /// Serialises to bytes: `last_ts` then `(ts, hash)` pairs, little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 16 * self.recent.len());
        b.extend_from_slice(&self.last_ts.to_le_bytes());
        for (ts, h) in &self.recent {
            b.extend_from_slice(&ts.to_le_bytes());
            b.extend_from_slice(&h.to_le_bytes());
        }
        b
    }

    /// Parses [`SeriesState::to_bytes`]; a malformed blob gives a fresh state.
    pub fn from_bytes(b: &[u8]) -> Self {
        if b.len() < 8 || !(b.len() - 8).is_multiple_of(16) {
            return Self::new();
        }
        let word = |i: usize| i64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let mut recent: Vec<(i64, u64)> = (8..b.len())
            .step_by(16)
            .map(|i| (word(i), word(i + 8) as u64))
            .collect();
        // `release` relies on the ts order (binary search); a state written by an older agent is put in order.
        if !recent.is_sorted_by_key(|&(ts, _)| ts) {
            recent.sort_by_key(|&(ts, _)| ts);
        }
        Self {
            last_ts: word(0),
            recent,
        }
    }
}

/// Limits and policy of the release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Event-time span behind a series' newest reading within which duplicates are recognised.
    pub dedup_window_ms: i64,
    /// Readings remembered per series, at most.
    pub max_recent: usize,
    /// Late policy.
    pub late: LatePolicy,
}

/// The result of one release.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Released {
    /// Readings to send, grouped by series, each series in event-time order.
    pub out: Vec<Out>,
    /// Readings dropped as duplicates.
    pub duplicates: u64,
    /// Late readings released with the flag.
    pub late_flagged: u64,
    /// Late readings withheld (dead-letter policy).
    pub dead_lettered: Vec<Pending>,
}

/// FNV-1a over the timestamp and the value's bits: the dedup identity of a reading within its series.
fn identity(ts: i64, v: &Value) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&ts.to_le_bytes());
    match v {
        Value::F64(f) => {
            eat(&[0]);
            eat(&f.to_bits().to_le_bytes());
        }
        Value::I64(i) => {
            eat(&[1]);
            eat(&i.to_le_bytes());
        }
        Value::Bool(b) => eat(&[2, u8::from(*b)]),
        Value::Str(s) => {
            eat(&[3]);
            eat(s.as_bytes());
        }
    }
    h
}

/// Releases `pending` (any order) against `states` (updated in place; a series without a state starts fresh).
pub fn release(
    pending: Vec<Pending>,
    states: &mut HashMap<i64, SeriesState>,
    rules: Rules,
) -> Released {
    let mut by_series: HashMap<i64, Vec<Pending>> = HashMap::new();
    for p in pending {
        by_series.entry(p.series).or_default().push(p);
    }
    let mut series: Vec<i64> = by_series.keys().copied().collect();
    series.sort_unstable();
    let mut r = Released::default();
    for sid in series {
        let mut rows = by_series.remove(&sid).unwrap_or_default();
        rows.sort_by_key(|p| p.ts_ms); // stable: equal timestamps keep arrival order
        let st = states.entry(sid).or_default();
        for p in rows {
            let id = identity(p.ts_ms, &p.value);
            let horizon = st.last_ts.saturating_sub(rules.dedup_window_ms);
            // `recent` is ordered by ts: look at the entries of this ts only.
            let same_ts = st.recent.partition_point(|&(ts, _)| ts < p.ts_ms);
            if p.ts_ms >= horizon
                && st.recent[same_ts..]
                    .iter()
                    .take_while(|&&(ts, _)| ts == p.ts_ms)
                    .any(|&(_, h)| h == id)
            {
                r.duplicates += 1;
                continue;
            }
            let late = p.ts_ms < st.last_ts;
            if p.ts_ms >= horizon {
                // Insert keeping `recent` ordered by ts (late readings go before newer ones).
                let at = st.recent.partition_point(|&(ts, _)| ts <= p.ts_ms);
                st.recent.insert(at, (p.ts_ms, id));
            }
            st.last_ts = st.last_ts.max(p.ts_ms);
            if late && rules.late == LatePolicy::DeadLetter {
                r.dead_lettered.push(p);
                continue;
            }
            if late {
                r.late_flagged += 1;
            }
            r.out.push(Out { reading: p, late });
        }
        let horizon = st.last_ts.saturating_sub(rules.dedup_window_ms);
        let keep_from = st
            .recent
            .partition_point(|&(ts, _)| ts < horizon)
            .max(st.recent.len().saturating_sub(rules.max_recent));
        st.recent.drain(..keep_from);
    }
    r
}

#[cfg(test)]
mod tests;

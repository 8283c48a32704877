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
mod entries;
pub use config::OrderConfig;

use entries::{Entries, SHORT_MAX};

use fieldlink_proto::{Quality, Value};
use foldhash::HashMap;
use serde::Deserialize;
use std::collections::VecDeque;

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

/// A released reading: a [`Pending`] and its late flag, in a [`Pending`]'s 48 bytes (the flag takes padding), so
/// that [`release`] writes its output into the readings' own allocation instead of a second vector of every
/// reading (and the buffer's rows reuse it after that).
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    /// Buffer series id.
    pub series: i64,
    /// Event time, Unix ms.
    pub ts_ms: i64,
    /// Value.
    pub value: Value,
    /// Quality.
    pub quality: Quality,
    /// Flagged late.
    pub late: bool,
}

const _: () = assert!(
    std::mem::size_of::<Out>() == std::mem::size_of::<Pending>()
        && std::mem::align_of::<Out>() == std::mem::align_of::<Pending>(),
    "`release` collects its output in place only while `Out` has `Pending`'s layout"
);

impl Out {
    fn of(p: Pending, late: bool) -> Self {
        let Pending {
            series,
            ts_ms,
            value,
            quality,
        } = p;
        Out {
            series,
            ts_ms,
            value,
            quality,
            late,
        }
    }
}

/// What a series remembers between releases.
///
/// Memory: 6 bytes per remembered reading (its event time as a 16-bit offset from `base`, and its identity folded
/// to 32 bits) while the readings held span at most 65,535 ms, as within the default `dedup_window_ms` (60 s),
/// 8 with 32-bit offsets while they span more (a window over 65,535 ms; or a state just loaded from the file,
/// until the next release of its series), and 4 more once the series is *wide*. The states are the
/// agent's largest data: one entry per reading of the dedup window, 3.6 MB at 10,000 readings/s and 60 s (see
/// docs/memory.md).
///
/// **Narrow and wide.** A reading is compared only with remembered readings of its own millisecond. A series
/// with at most one reading per millisecond meets there only a redelivery of the same reading or a rare
/// correction, and the 32-bit fold of its identity tells them apart (a false match: odds 2^-32 per correction).
/// A series faster than 1 kHz (timestamps in µs or ns are cut to ms) compares thousands of distinct readings a
/// second: at 32 bits one of them would be taken for a duplicate about every day. So a series starts narrow and
/// turns wide, for good, at its first distinct reading of a millisecond it already holds (a differing fold proves
/// it distinct): from then on it keeps each new entry's high half too and compares all 64 bits with it. Only the
/// entries it held before (high half 0) are still compared by their fold: each alone in its millisecond, they
/// meet only redeliveries, corrections and late readings. A state loaded from the file starts narrow again (the
/// stored format does not say). What this costs: a series' first distinct pair of one millisecond whose folds
/// match (2^-32, once per series and start) is taken as one reading, and so is a correction or late reading whose
/// fold matches an entry compared by its fold (2^-32 each).
#[derive(Debug, Clone)]
pub struct SeriesState {
    /// Newest released event time (`i64::MIN` before the first).
    pub last_ts: i64,
    /// Event time the offsets in `recent` count from: at or before the oldest remembered reading.
    base: i64,
    /// Recently released readings, oldest first: `(ts - base, fold(identity))`, where the identity is the hash
    /// of (ts, value) ([`fold`]). Rings: forgetting the oldest moves nothing (a `Vec` moved the whole window
    /// down at every release of every series).
    recent: Entries,
    /// Wide series only: the identities' high halves, one per entry of `recent`, 0 for the entries remembered
    /// before the series turned wide (an entry whose high half is 0 compares by its fold: the same whether it is
    /// unknown or 0, as `(fold ^ 0) | 0 << 32` is the whole identity then); empty while narrow.
    high: VecDeque<u32>,
    /// The series turned wide.
    wide: bool,
    /// The `state_log` row holding this state's oldest delta stored since its last whole state, 0 if none (the
    /// buffer's bookkeeping, not part of the state).
    pub(crate) logged_since: u64,
}

/// Equal when they remember the same readings (whatever their bases), compared as a narrow state compares
/// them: by time and folded identity (a wide state and the narrow one loaded from it decide alike but for a
/// reading whose fold matches a distinct remembered one).
impl PartialEq for SeriesState {
    fn eq(&self, other: &Self) -> bool {
        let folded = |s: &Self| {
            s.recent()
                .map(|(ts, id)| (ts, fold(id)))
                .collect::<Vec<_>>()
        };
        self.last_ts == other.last_ts && folded(self) == folded(other)
    }
}
impl Eq for SeriesState {}

impl Default for SeriesState {
    fn default() -> Self {
        Self::new()
    }
}

/// An identity folded to 32 bits: its halves XORed (folding the fold again gives it back).
fn fold(id: u64) -> u32 {
    (id ^ (id >> 32)) as u32
}

/// What [`SeriesState::position`] found among the entries of one millisecond.
enum Found {
    /// The reading is remembered, at this index of `recent`.
    At(usize),
    /// It is not, but a distinct reading of its millisecond is.
    Distinct,
    /// Nothing of its millisecond is remembered.
    Nothing,
}

impl SeriesState {
    /// A state that has released nothing.
    pub fn new() -> Self {
        Self {
            last_ts: i64::MIN,
            base: 0,
            recent: Entries::new(),
            high: VecDeque::new(),
            wide: false,
            logged_since: 0,
        }
    }

    /// `(ts, identity)` of the remembered readings, oldest first: the whole identity where the state keeps it
    /// (a wide series' entries since it turned wide), else its fold (which [`fold`] leaves as it is).
    pub fn recent(&self) -> impl ExactSizeIterator<Item = (i64, u64)> + '_ {
        (0..self.recent.len()).map(|i| {
            let hi = self.high.get(i).copied().unwrap_or(0);
            (
                self.base + i64::from(self.recent.off(i)),
                u64::from(self.recent.fold(i) ^ hi) | (u64::from(hi) << 32),
            )
        })
    }

    /// Readings remembered.
    pub fn remembered(&self) -> usize {
        self.recent.len()
    }

    /// Whether the series turned wide (compares 64-bit identities).
    pub fn is_wide(&self) -> bool {
        self.wide
    }

    /// Serialises to bytes: `last_ts` then `(ts, identity)` pairs ([`SeriesState::recent`]), little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 16 * self.recent.len());
        b.extend_from_slice(&self.last_ts.to_le_bytes());
        for (ts, h) in self.recent() {
            b.extend_from_slice(&ts.to_le_bytes());
            b.extend_from_slice(&h.to_le_bytes());
        }
        b
    }

    /// Offset of `ts` from `base`, if the entries' layout holds it.
    fn offset(&self, ts: i64) -> Option<u32> {
        u32::try_from(i128::from(ts) - i128::from(self.base))
            .ok()
            .filter(|&off| off <= self.recent.max_off())
    }

    /// Whether a reading of `ts` with identity `id` is remembered; if not, and a distinct reading of its
    /// millisecond is, the series turns wide (see [`SeriesState`]).
    fn remembers(&mut self, ts: i64, id: u64) -> bool {
        match self.position(ts, id) {
            Found::At(_) => true,
            Found::Distinct => {
                self.widen();
                false
            }
            Found::Nothing => false,
        }
    }

    /// Where the reading of `ts` with identity `id` is in `recent`: `recent` is ordered by event time, so only
    /// the entries of `ts` are looked at (found by binary search).
    fn position(&self, ts: i64, id: u64) -> Found {
        let Some(off) = self.offset(ts) else {
            return Found::Nothing;
        };
        let (f, hi) = (fold(id), (id >> 32) as u32);
        // A narrow entry (high half 0, or none kept) compares by its fold.
        let high = &self.high;
        match self.recent.find(off, |i, x| {
            x == f && high.get(i).is_none_or(|&h| h == 0 || h == hi)
        }) {
            (Some(at), _) => Found::At(at),
            (None, true) => Found::Distinct,
            (None, false) => Found::Nothing,
        }
    }

    /// Turns the series wide: the entries held so far keep their folds only (high half 0).
    fn widen(&mut self) {
        if !self.wide {
            self.wide = true;
            let mut high = VecDeque::with_capacity(self.recent.capacity());
            high.extend(std::iter::repeat_n(0, self.recent.len()));
            self.high = high;
        }
    }

    /// Remembers a reading of `ts` (at or after every horizon used so far), keeping `recent` ordered by event
    /// time (a late reading goes before newer ones).
    ///
    /// `horizon`: the entries older than it can no longer be matched (the release's next horizon). Forgotten
    /// before the base moves, so that a series slower than one reading per `SHORT_MAX - dedup_window_ms` ms
    /// does not span more than its window for a moment and flip between the layouts at every release.
    fn remember(&mut self, ts: i64, id: u64, horizon: i64) {
        if self.offset(ts).is_none() && !self.recent.is_empty() {
            self.forget_before(horizon);
        }
        if self.recent.is_empty() {
            self.base = ts;
        } else if self.offset(ts).is_none() && !self.rebase(ts) {
            return;
        }
        self.push(ts, id);
    }

    /// Moves `base` so that `ts` fits, re-laying the entries long when they and `ts` span more than short
    /// entries hold (and short when they no longer do); false when `ts` is too far behind the newest entry to be
    /// remembered.
    fn rebase(&mut self, ts: i64) -> bool {
        let at = |i: usize| self.base + i64::from(self.recent.off(i));
        let (lo, hi) = (at(0).min(ts), at(self.recent.len() - 1).max(ts));
        let span = i128::from(hi) - i128::from(lo);
        if span <= i128::from(u32::MAX) {
            // Within 49 days: every entry stays.
            let short = span <= i128::from(SHORT_MAX);
            let delta = self.base - lo;
            if short == self.recent.is_short() {
                self.recent.shift(delta);
            } else {
                let room = self.recent.capacity() - self.recent.len();
                self.recent = self.recent.relaid(short, delta, room);
            }
            self.base = lo;
            return true;
        }
        {
            // A remembered reading more than u32::MAX ms (49 days) before `ts` or the newest one is behind any
            // horizon (the window is at most a day): forgotten.
            let old: Vec<(i64, u64)> = self.recent().collect();
            let newest = old.last().map_or(ts, |&(t, _)| t).max(ts);
            let fits = |t: i64| i128::from(newest) - i128::from(t) <= i128::from(u32::MAX);
            if !fits(ts) {
                // Only a replayed delta can be this far behind what the state holds (one an earlier version left
                // under a newer whole state): behind every horizon, and a base there would cut the newer offsets.
                return false;
            }
            let keep: Vec<(i64, u64)> = old.into_iter().filter(|&(t, _)| fits(t)).collect();
            self.base = keep.first().map_or(ts, |&(t, _)| t).min(ts);
            let newest = keep.last().map_or(ts, |&(t, _)| t).max(ts);
            let short = newest - self.base <= i64::from(SHORT_MAX);
            self.recent = Entries::with_capacity(short, self.recent.capacity());
            self.high.clear();
            for (t, h) in keep {
                self.push(t, h);
            }
        }
        true
    }

    /// Adds an entry in event-time order (after those of its own time), `ts` within range of `base`.
    fn push(&mut self, ts: i64, id: u64) {
        // In range: callers rebase first.
        let off = (i128::from(ts) - i128::from(self.base)) as u32;
        let (f, hi) = (fold(id), (id >> 32) as u32);
        let at = self.recent.push(off, f);
        if self.wide {
            self.high.insert(at, hi);
        }
    }

    /// Removes the oldest `n` entries.
    fn forget_oldest(&mut self, n: usize) {
        self.recent.drain_front(n);
        if self.wide {
            self.high.drain(..n);
        }
    }

    /// Forgets the readings older than `horizon`: they can no longer be matched (a reading is checked only
    /// against remembered readings of its own timestamp, and only when that is at or after the horizon).
    fn forget_before(&mut self, horizon: i64) {
        let h = i128::from(horizon) - i128::from(self.base);
        let n = if h <= 0 {
            0
        } else if let Ok(h) = u32::try_from(h) {
            // Counted from the oldest: a release forgets none or a few, and each reading is forgotten once, while a
            // binary search touched a cache line per step of a window that, for 1,000 busy series, is 12 MB (5.5 %
            // of the pipeline).
            self.recent.count_below(h)
        } else {
            self.recent.len()
        };
        self.forget_oldest(n);
    }

    /// Keeps the newest `max` readings.
    fn keep_newest(&mut self, max: usize) {
        self.forget_oldest(self.recent.len().saturating_sub(max));
    }

    /// Makes room for `room` more readings at once, and gives back what is more than a quarter beyond that. Long
    /// entries that span little enough again (older ones forgotten, or a state loaded from the file) are laid out
    /// short, from the oldest.
    fn make_room(&mut self, room: usize) {
        if !self.recent.is_short() {
            let last = self.recent.last_off().unwrap_or(0);
            let first = if self.recent.is_empty() {
                0
            } else {
                self.recent.off(0)
            };
            if last - first <= SHORT_MAX {
                self.recent = self.recent.relaid(true, -i64::from(first), room);
                self.base += i64::from(first);
            }
        }
        let need = self.recent.len() + room;
        let over = |cap: usize| cap > need + need / 4 + 16;
        if over(self.recent.capacity()) {
            self.recent.shrink_to(need);
        }
        self.recent.reserve_exact(room);
        if self.wide {
            if over(self.high.capacity()) {
                self.high.shrink_to(need);
            }
            self.high.reserve_exact(room);
        }
    }

    /// Bytes the entries take (their allocations' capacity).
    pub fn heap_bytes(&self) -> usize {
        self.recent.capacity() * self.recent.entry_bytes() + self.high.capacity() * 4
    }

    /// Parses [`SeriesState::to_bytes`]; a malformed blob gives a fresh state.
    pub fn from_bytes(b: &[u8]) -> Self {
        let mut st = Self::new();
        st.apply_delta(b);
        st
    }

    /// Adds what a stored delta ([`delta_bytes`]) or whole state ([`SeriesState::to_bytes`]) holds, in order; a
    /// malformed blob is ignored. Loading a state is its whole state, then its deltas in the order stored: the
    /// next [`release`] forgets what a live state would have forgotten
    /// (the window from the newest time, then the oldest beyond `max_recent`, which depend only on the
    /// readings remembered and their order), so a loaded state decides every reading as the live one did (but
    /// where the live one was wide and the loaded one, narrow, meets a distinct reading whose fold matches).
    pub fn apply_delta(&mut self, b: &[u8]) {
        if b.len() < 8 || !(b.len() - 8).is_multiple_of(16) {
            return;
        }
        let word = |i: usize| i64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        self.make_room((b.len() - 8) / 16);
        for i in (8..b.len()).step_by(16) {
            let (ts, id) = (word(i), word(i + 8) as u64);
            // A live state remembers a reading once: one that a delta holds again was forgotten in between (it
            // fell out of `max_recent`) and remembered anew, so it moves to where the delta puts it (which decides
            // what the next overflow forgets). A whole state an earlier version wrote to the file after the delta
            // may hold it too: moved, it still counts once toward `max_recent`, though among readings of the same
            // millisecond it may then sit elsewhere than that version had it (which matters only past
            // `max_recent` readings of one series at one millisecond, where dedup keeps only the newest anyway).
            if let Found::At(at) = self.position(ts, id) {
                self.recent.remove(at);
                if self.wide {
                    self.high.remove(at);
                }
            }
            self.remember(ts, id, i64::MIN);
        }
        self.last_ts = self.last_ts.max(word(0));
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
    /// `(series, ts, identity)` of every reading the states remembered, in the order remembered (so grouped by
    /// series, in series order): what a state stored before this call lacks ([`delta_bytes`]).
    pub remembered: Vec<(i64, i64, u64)>,
}

/// What a state remembered since it was stored, as [`SeriesState::apply_delta`] reads it ([`SeriesState::to_bytes`]'s
/// format): the state's newest released time, then the `(ts, identity)` pairs of `remembered` (its series' run of
/// [`Released::remembered`]) in order.
pub fn delta_bytes(last_ts: i64, remembered: &[(i64, i64, u64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 16 * remembered.len());
    put_delta(&mut b, last_ts, remembered);
    b
}

/// [`delta_bytes`], appended to `b`.
pub fn put_delta(b: &mut Vec<u8>, last_ts: i64, remembered: &[(i64, i64, u64)]) {
    b.extend_from_slice(&last_ts.to_le_bytes());
    for (_, ts, h) in remembered {
        b.extend_from_slice(&ts.to_le_bytes());
        b.extend_from_slice(&h.to_le_bytes());
    }
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

/// `pending` in (series, event time) order, stable (a series' readings of one timestamp keep their arrival order;
/// series in id order), with each series' run `(series, readings)`. The same result as a stable sort by (series,
/// time), cheaper: a counting sort by series (one lookup per reading, each reading moved once), then a sort by time
/// of the runs that did not arrive in order. (The stable sort compared and moved every reading log n times: ~6 % of
/// the pipeline.)
fn by_series_and_time(pending: Vec<Pending>) -> (Vec<Pending>, Vec<(i64, usize)>) {
    // `at[i]`: reading i's slot, then where it goes.
    let (ids, mut at) = series_slots(&pending);
    let mut count = vec![0usize; ids.len()];
    for &slot in &at {
        count[slot] += 1;
    }
    let mut by_id: Vec<usize> = (0..ids.len()).collect();
    by_id.sort_unstable_by_key(|&slot| ids[slot]);
    let mut next = vec![0usize; ids.len()];
    let mut start = 0;
    let runs: Vec<(i64, usize)> = by_id
        .into_iter()
        .map(|slot| {
            next[slot] = start;
            start += count[slot];
            (ids[slot], count[slot])
        })
        .collect();
    for a in &mut at {
        let slot = *a;
        *a = next[slot];
        next[slot] += 1;
    }
    // Scattered into a new vector: the reads go in order and the writes to one place per series (each moving
    // through its run), where following the permutation's cycles in place jumped across the readings at every
    // move (no faster than the sort).
    let n = pending.len();
    let mut placed: Vec<Option<Pending>> = (0..n).map(|_| None).collect();
    for (p, to) in pending.into_iter().zip(at) {
        placed[to] = Some(p);
    }
    // `at` is a permutation (each series' readings go to its own range, one place each): every place was filled.
    // Collected in place (an `Option<Pending>` has a `Pending`'s size): no third vector of every reading.
    let mut pending: Vec<Pending> = placed
        .into_iter()
        .map(|p| p.expect("a reading lost in the release's order"))
        .collect();
    let mut start = 0;
    for &(_, n) in &runs {
        let run = &mut pending[start..start + n];
        if !run.is_sorted_by_key(|p| p.ts_ms) {
            run.sort_by_key(|p| p.ts_ms);
        }
        start += n;
    }
    (pending, runs)
}

/// Each reading's series slot, slots numbered in the order their series first appear, and the series of each slot.
/// Buffer series ids are SQLite row ids, dense from 1: when the ids of the call span no more than the readings (or
/// 4,096), a table indexed by id finds the slot without hashing; otherwise a hash map does (with the last series
/// remembered, so a run of one series costs one lookup).
fn series_slots(pending: &[Pending]) -> (Vec<i64>, Vec<usize>) {
    let mut ids: Vec<i64> = Vec::new();
    let mut at: Vec<usize> = Vec::with_capacity(pending.len());
    let (lo, hi) = pending.iter().fold((i64::MAX, i64::MIN), |(lo, hi), p| {
        (lo.min(p.series), hi.max(p.series))
    });
    let (lo, hi) = if pending.is_empty() { (0, 0) } else { (lo, hi) };
    let offset = |sid: i64| (i128::from(sid) - i128::from(lo)) as usize; // in range: checked against the span
    let span = i128::from(hi) - i128::from(lo);
    if span < pending.len().max(4096) as i128 {
        let mut table = vec![u32::MAX; offset(hi) + 1];
        for p in pending {
            let cell = &mut table[offset(p.series)];
            if *cell == u32::MAX {
                // Fewer slots than readings, and readings far fewer than u32::MAX (a seal takes at most `max_rows`,
                // or one group of at most `MAX_GROUP_READINGS`).
                *cell = ids.len() as u32;
                ids.push(p.series);
            }
            at.push(*cell as usize);
        }
        return (ids, at);
    }
    let mut slot_of: HashMap<i64, usize> = HashMap::default();
    let mut last: Option<(i64, usize)> = None;
    for p in pending {
        let slot = match last {
            Some((sid, slot)) if sid == p.series => slot,
            _ => {
                let n = ids.len();
                let slot = *slot_of.entry(p.series).or_insert_with(|| {
                    ids.push(p.series);
                    n
                });
                last = Some((p.series, slot));
                slot
            }
        };
        at.push(slot);
    }
    (ids, at)
}

/// Releases `pending` (any order) against `states` (updated in place; a series without a state starts fresh).
pub fn release(
    pending: Vec<Pending>,
    states: &mut HashMap<i64, SeriesState>,
    rules: Rules,
) -> Released {
    let (pending, runs) = by_series_and_time(pending);
    release_sorted(pending, runs, states, rules)
}

/// [`release`] of readings in [`by_series_and_time`]'s order, with its runs.
fn release_sorted(
    pending: Vec<Pending>,
    runs: Vec<(i64, usize)>,
    states: &mut HashMap<i64, SeriesState>,
    rules: Rules,
) -> Released {
    let mut r = Releaser {
        states,
        rules,
        runs: runs.into_iter(),
        open: None,
        left: 0,
        released: Released {
            remembered: Vec::with_capacity(pending.len()),
            ..Released::default()
        },
    };
    // In place: `Out` has `Pending`'s layout, so the output takes the readings' allocation.
    let out: Vec<Out> = pending.into_iter().filter_map(|p| r.take(p)).collect();
    Released { out, ..r.released }
}

/// The state of one [`release`]: the series whose run of readings is being released (its state taken out of
/// `states` for the run, put back at its end), and what the release found so far.
struct Releaser<'a> {
    states: &'a mut HashMap<i64, SeriesState>,
    rules: Rules,
    /// The runs of [`by_series_and_time`]: each series' id and its number of readings, in the readings' order.
    runs: std::vec::IntoIter<(i64, usize)>,
    open: Option<(i64, SeriesState)>,
    /// Readings of the open run still to come.
    left: usize,
    /// Everything but `out`.
    released: Released,
}

impl Releaser<'_> {
    /// The next reading (in [`by_series_and_time`]'s order): to send, or withheld as a duplicate or dead letter.
    fn take(&mut self, p: Pending) -> Option<Out> {
        let rules = self.rules;
        if self.left == 0 {
            let (sid, n) = self.runs.next().expect("the runs cover every reading");
            let mut st = self.states.remove(&sid).unwrap_or_default();
            // Memory: the states are the agent's largest data (see `SeriesState`). Forget what already fell out of
            // the window before making room, and make room once, for this run's readings (capped at what may be
            // kept): `recent` then never doubles its capacity on the way, and a state's capacity stays close to
            // its length. A state just loaded from its whole state and deltas (or one whose rate dropped) may have
            // room for far more than it keeps: `make_room` gives back what is more than a quarter beyond the need.
            st.forget_before(st.last_ts.saturating_sub(rules.dedup_window_ms));
            st.keep_newest(rules.max_recent); // a no-op but on a state just loaded from its deltas
            st.make_room(n.min(rules.max_recent));
            self.open = Some((sid, st));
            self.left = n;
        }
        self.left -= 1;
        let (sid, st) = self.open.as_mut().expect("a run is open");
        let out = release_one(*sid, st, p, rules, &mut self.released);
        if self.left == 0 {
            let (sid, mut st) = self.open.take().expect("a run is open");
            st.forget_before(st.last_ts.saturating_sub(rules.dedup_window_ms));
            st.keep_newest(rules.max_recent);
            self.states.insert(sid, st);
        }
        out
    }
}

/// Releases one reading of series `sid` against its state: `None` for a duplicate or a late reading withheld
/// (counted, or kept, in `r`).
fn release_one(
    sid: i64,
    st: &mut SeriesState,
    p: Pending,
    rules: Rules,
    r: &mut Released,
) -> Option<Out> {
    let id = identity(p.ts_ms, &p.value);
    let horizon = st.last_ts.saturating_sub(rules.dedup_window_ms);
    if p.ts_ms >= horizon && st.remembers(p.ts_ms, id) {
        r.duplicates += 1;
        return None;
    }
    let late = p.ts_ms < st.last_ts;
    if p.ts_ms >= horizon {
        let next_horizon = st
            .last_ts
            .max(p.ts_ms)
            .saturating_sub(rules.dedup_window_ms);
        st.remember(p.ts_ms, id, next_horizon);
        r.remembered.push((sid, p.ts_ms, id));
    }
    st.last_ts = st.last_ts.max(p.ts_ms);
    if late && rules.late == LatePolicy::DeadLetter {
        r.dead_lettered.push(p);
        return None;
    }
    if late {
        r.late_flagged += 1;
    }
    Some(Out::of(p, late))
}

#[cfg(test)]
mod tests;

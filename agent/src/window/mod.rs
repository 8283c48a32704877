//! Windowed aggregates computed on the agent, in event-time order. Pure: no I/O; the seal's wall-clock time is
//! given ([`Engine::set_clock`]).
//!
//! The buffer's seal ([`crate::buffer::Buffer::seal`]) feeds every released reading (in each series' event-time
//! order; late readings of [`crate::order`] where they come) to [`Engine::observe`], which adds it to the open
//! windows of every matching rule and returns the windows that closed as [`Emitted`] readings of derived series.
//! The seal writes them into the same records as the raw readings and commits the engine's changed states
//! ([`Engine::take_dirty`]) in the transaction that deletes the readings that fed them. A reading is therefore
//! aggregated exactly once, even across a crash: either its deletion and the state it produced are committed
//! together, or neither is and the reading is aggregated again from the state before. A closed window is emitted
//! once: its readings are in the same records as the commit that removed it from the state.
//!
//! # A rule on one series
//! Each `(rule, series)` pair has a [`PairState`]: the newest event time seen (every reading of the series counts,
//! aggregated or not, except one more than [`FUTURE_JUMP_MS`] ahead of both that newest time and the seal's wall
//! clock until a later reading ahead by the same offset confirms it: `newest_after`) and, per window size, the
//! open windows ordered by start. With `L` the rule's allowed lateness, the pair's **watermark** is `newest − L`,
//! and never lower than a watermark the pair applied before (kept in its state as `closed_to`): raising `L`, or
//! restarting with a larger one, cannot open a window that was already closed and emitted. One reading stamped
//! hours ahead (a device's clock glitch, within the source's `max_future_ms`) joins its future window but does not
//! move the watermark, so it neither closes the open windows early nor makes the readings of the next hours late;
//! readings that advance steadily move it whatever the agent's own clock says (a gateway booted with a wrong
//! clock). A window `[start, start + size)` (aligned to the Unix epoch) closes when the watermark reaches its end
//! (`end <= watermark`); it then gives one reading per function of series `<series>/<function>_<size>` with
//! **event time = the window's start**, quality good.
//!
//! A pair whose series stops reporting would hold its last windows open for good. The seal's **intake clock**
//! closes them (monotonic, standing still while the agent takes no readings: [`Engine::set_intake_clock`]): with
//! `seen` that clock when the pair's last reading was observed (in memory; after a load, the first scan), its
//! open windows ending at or before `newest + (now − seen) − L − idle_close_ms` close ([`Engine::idle_due`],
//! [`Engine::close_idle`]), as the watermark would have had the series gone on at the clock's pace,
//! `idle_close_ms` later. Any reading of the pair restarts the silence.
//!
//! # Rules edited between runs
//! [`Engine::load_state`] queues what an edit asks of each loaded pair, and the next seal settles it
//! ([`Engine::close_orphans`]), in its transaction. Each derived series keeps a record of the windows it emitted,
//! whichever rule wrote them (`emitted_to`, per size and function): the windows an edit closed, and, when a rule
//! stops writing one of its derived series, those it closed from the first window it emitted for it (`since`,
//! persisted beside the states; unknown for states from before it was kept: from any) through its `closed_to`. Every close skips a function
//! the record holds for the window, and a reading of a window that is not open is late when the record holds every
//! function of the rule for it: **no derived window is emitted twice**. Open windows no configured rule computes on
//! any more (the rule removed, narrowed, or without their size) close under a retired rule with the functions
//! they were opened with ([`Engine::remember_functions`]); before, each goes to the configured rules that now write
//! its derived series for that series (heirs: a rule renamed, split, merged, or given a function): a copy if the
//! heir has not closed or opened that window, else the heir keeps the window that took more readings; the old rule
//! emits only the functions no heir took.
//!
//! A reading is aggregated when it is a finite number (integers and booleans as f64; booleans 0 and 1) of good or
//! uncertain quality. Per size, if its window has closed already it is **late** for the rule (counted once per
//! reading and rule); if the window is not open and [`Engine`] holds `max_open` windows, it **overflows**
//! (counted) and is left out of that window. Otherwise it joins its window: count + 1, sum + x (f64, in the
//! order of the calls), min, max, first (earliest event time; of equal times the first call), last (latest event
//! time; of equal times the last call). Mean is `sum / count`.
//!
//! The raw reading's fate ([`RawFate`]): readings the windows cannot aggregate are always sent; otherwise a reading
//! late (or overflowing) for a rule whose `late = "raw"` is sent with the late flag; otherwise one that overflowed
//! for any rule is sent (the cap never deletes a reading); otherwise it is withheld when any matching rule has
//! `keep_raw = false`, and sent if not.
//!
//! Memory: open windows of one pair and size are at most `L / size + 2` in steady state; all of them together at
//! most `max_open` (plus what a restart loads under a lowered cap; a hand-over at an edit can copy windows beyond
//! it). Pair states are about a hundred bytes each when no window is open (more with records of an edit and the
//! first emitted window end per size and function) and are all held in memory, like alarm states.

mod config;

pub use config::{
    size_suffix, Func, LatePolicy, WindowRuleConfig, WindowsConfig, MAX_SIZES, MAX_SPAN_MS,
    MIN_SIZE_MS,
};

use fieldlink_proto::limits::MAX_KEY_BYTES;
use fieldlink_proto::{Quality, Series, Value};
use foldhash::{HashMap, HashMapExt};

/// Series whose matching rules are cached before the cache is dropped.
const MATCH_CACHE_MAX: usize = 100_000;

/// A rule ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Its name.
    pub name: String,
    filter: String,
    tags: Vec<(String, String)>,
    sizes: Vec<i64>,
    suffixes: Vec<String>,
    funcs: Vec<Func>,
    lateness: i64,
    /// `idle_close_ms` (0: never).
    idle_close: i64,
    late: LatePolicy,
    keep_raw: bool,
    /// The longest `/<function>_<size>` suffix, bytes.
    longest_suffix: usize,
    /// A rule no longer configured, or the sizes a configured rule no longer has ([`Engine::load_state`]): it
    /// matches nothing, and only closes the windows it was loaded with.
    retired: bool,
}

impl Rule {
    /// Compiles a validated rule.
    pub fn compile(c: &WindowRuleConfig) -> Self {
        let suffixes: Vec<String> = c.sizes_ms.iter().map(|&s| size_suffix(s)).collect();
        let longest_suffix = c
            .functions
            .iter()
            .map(|f| f.name().len())
            .max()
            .unwrap_or(0)
            + suffixes.iter().map(String::len).max().unwrap_or(0)
            + 2;
        Self {
            name: c.name.clone(),
            filter: c.series.clone(),
            tags: c.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            sizes: c.sizes_ms.iter().map(|&s| s.max(1) as i64).collect(),
            suffixes,
            funcs: c.functions.clone(),
            lateness: c.allowed_lateness_ms.min(i64::MAX as u64) as i64,
            idle_close: c.idle_close_ms.min(i64::MAX as u64) as i64,
            late: c.late,
            keep_raw: c.keep_raw,
            longest_suffix,
            retired: false,
        }
    }

    /// A rule that only closes the windows of sizes `sizes` loaded under the name `name`, with the functions
    /// `funcs` they were opened with.
    fn retired(name: &str, sizes: &[i64], funcs: Vec<Func>) -> Self {
        Self {
            name: name.to_string(),
            filter: String::new(),
            tags: Vec::new(),
            sizes: sizes.to_vec(),
            suffixes: sizes
                .iter()
                .map(|&s| size_suffix(s.max(1) as u64))
                .collect(),
            funcs,
            lateness: 0,
            idle_close: 0,
            late: LatePolicy::Drop,
            keep_raw: true,
            longest_suffix: 0,
            retired: true,
        }
    }

    /// Its functions.
    pub fn functions(&self) -> &[Func] {
        &self.funcs
    }

    /// Whether the rule applies to `series` (a series whose derived keys would exceed the wire format's key limit
    /// never matches).
    pub fn matches(&self, series: &Series) -> bool {
        !self.retired
            && series.key.len() + self.longest_suffix <= MAX_KEY_BYTES
            && crate::mqtt::topic_matches(&self.filter, &series.key)
            && self
                .tags
                .iter()
                .all(|t| series.tags.iter().any(|s| s.0 == t.0 && s.1 == t.1))
    }

    /// The window sizes, ms.
    pub fn sizes(&self) -> &[i64] {
        &self.sizes
    }
}

/// The running aggregate of one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Acc {
    /// Readings aggregated.
    pub count: u64,
    /// Their sum, in the order they came.
    pub sum: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Earliest event time and its value.
    pub first: (i64, f64),
    /// Latest event time and its value.
    pub last: (i64, f64),
}

impl Acc {
    fn new(ts: i64, x: f64) -> Self {
        Self {
            count: 1,
            sum: x,
            min: x,
            max: x,
            first: (ts, x),
            last: (ts, x),
        }
    }

    fn add(&mut self, ts: i64, x: f64) {
        self.count += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        if ts < self.first.0 {
            self.first = (ts, x);
        }
        if ts >= self.last.0 {
            self.last = (ts, x);
        }
    }

    /// The value of function `f`.
    pub fn value(&self, f: Func) -> Value {
        match f {
            Func::Count => Value::I64(self.count.min(i64::MAX as u64) as i64),
            Func::Min => Value::F64(self.min),
            Func::Max => Value::F64(self.max),
            Func::Sum => Value::F64(self.sum),
            Func::Mean => Value::F64(self.sum / self.count as f64),
            Func::First => Value::F64(self.first.1),
            Func::Last => Value::F64(self.last.1),
        }
    }
}

/// `(size, function, lo, hi)`: function `function` of the windows of `size` ending in `lo..=hi` was emitted
/// ([`PairState::emitted_to`]).
pub type Emission = (i64, Func, i64, i64);

/// What a `(rule, series)` pair remembers. Persisted with [`PairState::to_bytes`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PairState {
    /// Newest event time seen (`None` before the first reading).
    pub newest: Option<i64>,
    /// The highest watermark applied: every window ending at or before it has closed (`None` before the first
    /// reading, and in states written before it was kept).
    pub closed_to: Option<i64>,
    /// Per size of the rule (same order): the open windows `(start, aggregate)`, by start.
    pub open: Vec<Vec<(i64, Acc)>>,
    /// Windows of a derived series emitted, here or under another rule name, that an edit of the rules made count
    /// ([`Engine::load_state`], [`Engine::close_orphans`]): `(size, function, lo, hi)`, the windows of that size
    /// ending in `lo..=hi` had that function emitted. Such a window that is open here emits the other functions
    /// only; a reading of one is late for the rule (of one not open: not aggregated when every function of the
    /// rule was emitted for it). A record of a derived series the rule writes is dropped once its watermark
    /// reaches `hi`; one of a series it does not write is kept. Sorted and merged ([`PairState::note_emitted`]);
    /// usually there is none.
    pub emitted_to: Vec<Emission>,
    /// With open windows, the intake clock when the pair's last reading was observed, or when a scan first met it
    /// after a load ([`Engine::idle_due`]); not persisted (a restart times the silence again).
    seen: Option<i64>,
    /// Per window size and function, the lowest end of a window the pair emitted that function for; one missing
    /// never was. `None` when not known (a state from before it
    /// was kept: any window). Persisted beside the state ([`Engine::take_since`], [`Engine::remember_since`]).
    since: Option<Vec<(SizeFunc, i64)>>,
    /// `since` as last persisted (`None`: nothing yet).
    since_written: Option<Vec<(SizeFunc, i64)>>,
    dirty: bool,
}

/// Bytes of one persisted window.
const WINDOW_BYTES: usize = 72;

impl PairState {
    /// Serialises: version 2, newest and closed_to (each flag + i64), per size `(size_ms, n, n × window)`;
    /// little-endian; version 3 when `emitted_to` is not empty, followed by its length (u32) and its entries
    /// `(size_ms i64, function code u8, lo i64, hi i64)`. (Version 1, read too, had no closed_to; an agent from
    /// before version 3 reads the states that have no such entry.)
    pub fn to_bytes(&self, sizes: &[i64]) -> Vec<u8> {
        let n: usize = self.open.iter().map(Vec::len).sum();
        let mut b = Vec::with_capacity(
            27 + 12 * sizes.len() + WINDOW_BYTES * n + 25 * self.emitted_to.len(),
        );
        b.push(if self.emitted_to.is_empty() { 2 } else { 3 });
        for t in [self.newest, self.closed_to] {
            match t {
                Some(t) => {
                    b.push(1);
                    b.extend_from_slice(&t.to_le_bytes());
                }
                None => b.push(0),
            }
        }
        b.push(self.open.len() as u8);
        for (list, size) in self.open.iter().zip(sizes) {
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&(list.len() as u32).to_le_bytes());
            for (start, a) in list {
                for w in [start.to_le_bytes(), a.count.to_le_bytes()] {
                    b.extend_from_slice(&w);
                }
                for f in [a.sum, a.min, a.max] {
                    b.extend_from_slice(&f.to_le_bytes());
                }
                for (t, v) in [a.first, a.last] {
                    b.extend_from_slice(&t.to_le_bytes());
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        if !self.emitted_to.is_empty() {
            b.extend_from_slice(&(self.emitted_to.len() as u32).to_le_bytes());
            for &(size, func, lo, hi) in &self.emitted_to {
                b.extend_from_slice(&size.to_le_bytes());
                b.push(func.code());
                b.extend_from_slice(&lo.to_le_bytes());
                b.extend_from_slice(&hi.to_le_bytes());
            }
        }
        b
    }

    /// Parses [`PairState::to_bytes`] for a rule with `sizes`: windows of sizes the rule no longer has are left
    /// out. `None` if malformed.
    pub fn from_bytes(b: &[u8], sizes: &[i64]) -> Option<Self> {
        let (newest, closed_to, lists, records) = parse_state(b)?;
        // Sorted and merged as `note_emitted` keeps them, whatever the bytes held.
        let mut emitted = Self::default();
        for (size, f, lo, hi) in records {
            emitted.note_emitted(size, f, lo, hi);
        }
        let emitted_to = emitted.emitted_to;
        let mut open = vec![Vec::new(); sizes.len()];
        for (size, windows) in lists {
            if let Some(k) = sizes.iter().position(|&s| s == size) {
                open[k].extend(windows);
                open[k].sort_by_key(|(s, _)| *s);
            }
        }
        Some(Self {
            newest,
            closed_to,
            open,
            emitted_to,
            seen: None,
            since: None,
            since_written: None,
            dirty: false,
        })
    }

    /// The sizes stored in [`PairState::to_bytes`], each once in the order stored, with whether it holds open
    /// windows. `None` if malformed.
    pub fn stored_sizes(b: &[u8]) -> Option<Vec<(i64, bool)>> {
        let mut sizes: Vec<(i64, bool)> = Vec::new();
        for (size, windows) in parse_state(b)?.2 {
            match sizes.iter_mut().find(|(z, _)| *z == size) {
                Some((_, open)) => *open |= !windows.is_empty(),
                None => sizes.push((size, !windows.is_empty())),
            }
        }
        Some(sizes)
    }

    /// Whether function `f` of the window of `size` ending at `end` was emitted at an edit of the rules
    /// (`emitted_to`). Logarithmic in the records.
    fn emitted(&self, size: i64, f: Func, end: i64) -> bool {
        let key = (size, f.code(), end);
        // The last record starting at or before `end` (records of one size and function are disjoint).
        let at = self
            .emitted_to
            .partition_point(|&(z, g, lo, _)| (z, g.code(), lo) <= key);
        at > 0 && {
            let (z, g, _, hi) = self.emitted_to[at - 1];
            z == size && g == f && end <= hi
        }
    }

    /// Notes that function `f` of the windows of `size` ending in `lo..=hi` was emitted; returns whether that is
    /// new. The records stay sorted by size, function and `lo`, and those of one size and function disjoint:
    /// overlapping or adjacent ones (window ends are multiples of the size) merge, so a close of consecutive
    /// windows leaves one record.
    fn note_emitted(&mut self, size: i64, f: Func, lo: i64, hi: i64) -> bool {
        if lo > hi || (lo == hi && self.emitted(size, f, lo)) {
            return false;
        }
        let same = |e: &Emission| e.0 == size && e.1 == f;
        let reach = |h: i64| h.saturating_add(size.max(1));
        // Records of this size and function that touch [lo, hi].
        let first = self.emitted_to.partition_point(|e| {
            (e.0, e.1.code()) < (size, f.code()) || (same(e) && reach(e.3) < lo)
        });
        let mut last = first;
        while last < self.emitted_to.len()
            && same(&self.emitted_to[last])
            && self.emitted_to[last].2 <= reach(hi)
        {
            last += 1;
        }
        let (mut new_lo, mut new_hi) = (lo, hi);
        if last > first {
            let (a, b) = (self.emitted_to[first], self.emitted_to[last - 1]);
            if last - first == 1 && a.2 <= lo && hi <= a.3 {
                return false;
            }
            new_lo = new_lo.min(a.2);
            new_hi = new_hi.max(b.3);
        }
        self.emitted_to
            .splice(first..last, [(size, f, new_lo, new_hi)]);
        true
    }

    fn windows(&self) -> usize {
        self.open.iter().map(Vec::len).sum()
    }

    /// The end of the open window that ends first, if any is open.
    fn first_end(&self, sizes: &[i64]) -> Option<i64> {
        self.open
            .iter()
            .zip(sizes)
            .filter_map(|(list, &size)| list.first().map(|(s, _)| s.saturating_add(size)))
            .min()
    }
}

/// A persisted state's parts: newest, closed_to, per stored size its windows, and `emitted_to`.
type StateParts = (
    Option<i64>,
    Option<i64>,
    Vec<(i64, Vec<(i64, Acc)>)>,
    Vec<Emission>,
);

/// Parses [`PairState::to_bytes`] whatever the sizes. `None` if malformed.
fn parse_state(b: &[u8]) -> Option<StateParts> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let word = |s: &[u8]| -> i64 { i64::from_le_bytes(s.try_into().unwrap_or_default()) };
    let float = |s: &[u8]| -> f64 { f64::from_le_bytes(s.try_into().unwrap_or_default()) };
    let version = take(1)?[0];
    if !(1..=3).contains(&version) {
        return None;
    }
    let mut time = || -> Option<Option<i64>> {
        Some(match take(1)?[0] {
            0 => None,
            _ => Some(word(take(8)?)),
        })
    };
    let newest = time()?;
    let closed_to = if version >= 2 { time()? } else { None };
    let n_lists = take(1)?[0] as usize;
    let mut lists = Vec::with_capacity(n_lists);
    for _ in 0..n_lists {
        let size = word(take(8)?);
        let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let body = take(n.checked_mul(WINDOW_BYTES)?)?;
        let windows = body
            .chunks_exact(WINDOW_BYTES)
            .map(|w| {
                let i = |j: usize| word(&w[8 * j..8 * j + 8]);
                let f = |j: usize| float(&w[8 * j..8 * j + 8]);
                (
                    i(0),
                    Acc {
                        count: i(1) as u64,
                        sum: f(2),
                        min: f(3),
                        max: f(4),
                        first: (i(5), f(6)),
                        last: (i(7), f(8)),
                    },
                )
            })
            .collect();
        lists.push((size, windows));
    }
    let mut emitted_to = Vec::new();
    if version >= 3 {
        let n = u32::from_le_bytes(take(4)?.try_into().ok()?);
        for _ in 0..n {
            let size = word(take(8)?);
            let func = Func::from_code(take(1)?[0])?;
            emitted_to.push((size, func, word(take(8)?), word(take(8)?)));
        }
    }
    if at != b.len() {
        return None;
    }
    Some((newest, closed_to, lists, emitted_to))
}

/// The watermark the intake clock gives a silent pair at `now` (`idle_close_ms`): the watermark it would have
/// reached had its newest reading, taken when the intake clock said `seen`, been followed by readings at the
/// clock's pace, less `idle_close_ms`. (A pair whose only readings were held aside for being far ahead has no
/// newest time: its latest aggregated reading stands in.) `None` if the rule never closes on the clock.
fn idle_watermark(rule: &Rule, st: &PairState, seen: i64, now: i64) -> Option<i64> {
    if rule.idle_close == 0 {
        return None;
    }
    let newest = st.newest.or_else(|| {
        st.open
            .iter()
            .flat_map(|list| list.iter().map(|(_, acc)| acc.last.0))
            .max()
    })?;
    let silent = now.saturating_sub(seen).max(0);
    Some(
        newest
            .saturating_add(silent)
            .saturating_sub(rule.lateness)
            .saturating_sub(rule.idle_close),
    )
}

/// The pair's newest event time after a reading at `ts`, the seal's clock at `now_ms`. A reading more than
/// [`FUTURE_JUMP_MS`] ahead of both the newest time so far and the clock is held aside (`ahead`, in memory, with its
/// clock) and moves the newest time only when the pair's next such reading is later and ahead of its own seal's
/// clock by the same offset, within [`FUTURE_JUMP_MS`]: a lone glitch (or a stuck clock repeating one time) does
/// not close the open windows; a steady offset (a device clock set forward, or in another time zone; an agent
/// clock that is behind), however far apart its readings, is taken one reading late. A reading within reach
/// forgets a held one.
fn newest_after(
    newest: Option<i64>,
    ts: i64,
    now_ms: i64,
    ahead: &mut HashMap<(usize, i64), (i64, i64)>,
    pair: (usize, i64),
) -> Option<i64> {
    let reach = newest.map_or(now_ms, |n| n.max(now_ms));
    if ts <= reach.saturating_add(FUTURE_JUMP_MS) {
        ahead.remove(&pair);
        return Some(newest.map_or(ts, |n| n.max(ts)));
    }
    let offset = |t: i64, now: i64| t.saturating_sub(now);
    match ahead.insert(pair, (ts, now_ms)) {
        Some((held, held_now))
            if ts > held
                && offset(ts, now_ms).abs_diff(offset(held, held_now)) <= FUTURE_JUMP_MS as u64 =>
        {
            ahead.remove(&pair);
            Some(newest.map_or(ts, |n| n.max(ts)))
        }
        _ => newest,
    }
}

/// A window size and a function: one derived series of a pair.
pub type SizeFunc = (i64, Func);

/// Lowers the pair's `since` of `key` to `end` (the end of a window it emitted that function of that size for),
/// listing it to persist when it changed.
fn lower_since(
    st: &mut PairState,
    key: SizeFunc,
    end: i64,
    since_dirty: &mut Vec<(usize, i64)>,
    pair: (usize, i64),
) {
    let Some(since) = &mut st.since else {
        return;
    };
    match since.iter_mut().find(|(k, _)| *k == key) {
        Some(e) if e.1 <= end => return,
        Some(e) => e.1 = end,
        None => since.push((key, end)),
    }
    since_dirty.push(pair);
}

impl PairState {
    /// The state of a pair seen for the first time, for a rule with `sizes` windows sizes.
    fn fresh(sizes: usize) -> Self {
        Self {
            open: vec![Vec::new(); sizes],
            since: Some(Vec::new()),
            ..Self::default()
        }
    }

    /// Notes the records `emitted` of the derived series `rule` writes that reach past the pair's watermark;
    /// returns whether any is new.
    fn note_records(&mut self, rule: &Rule, emitted: &[Emission]) -> bool {
        let mut changed = false;
        for &(z, f, lo, hi) in emitted {
            if rule.funcs.contains(&f)
                && rule.sizes.contains(&z)
                && hi > self.closed_to.unwrap_or(i64::MIN)
            {
                changed |= self.note_emitted(z, f, lo, hi);
            }
        }
        changed
    }

    /// The lowest window end for which the pair can have emitted `key` (`None`: never).
    fn since_of(&self, key: SizeFunc) -> Option<i64> {
        match &self.since {
            None => Some(i64::MIN),
            Some(v) => v.iter().find(|(k, _)| *k == key).map(|&(_, e)| e),
        }
    }
}

/// Lists `pair` among the states to persist with the seal, once.
fn mark_dirty(dirty: &mut Vec<(usize, i64)>, st: &mut PairState, pair: (usize, i64)) {
    if !st.dirty {
        st.dirty = true;
        dirty.push(pair);
    }
}

/// Every `(function, size)` of `funcs` and `sizes`.
fn combos(funcs: &[Func], sizes: &[i64]) -> Vec<(Func, i64)> {
    funcs
        .iter()
        .flat_map(|&f| sizes.iter().map(move |&z| (f, z)))
        .collect()
}

/// Closes the pair's windows that end at or before `watermark` into `out` (the functions `emitted_to` has not emitted
/// for them yet), raising `closed_to` to the last end so none reopens, and lowering `since` to the first emitted;
/// returns how many.
fn close_through(
    rule: &Rule,
    pair: (usize, i64),
    st: &mut PairState,
    watermark: i64,
    out: &mut Vec<Emitted>,
    since_dirty: &mut Vec<(usize, i64)>,
) -> usize {
    let mut total = 0;
    for (k, &size) in rule.sizes.iter().enumerate() {
        let list = &mut st.open[k];
        let closed = list
            .iter()
            .take_while(|(s, _)| s.saturating_add(size) <= watermark)
            .count();
        let windows: Vec<(i64, Acc)> = list.drain(..closed).collect();
        for (start, acc) in windows {
            let end = emit_window(rule, pair, st, (k, start), &acc, out, since_dirty);
            st.closed_to = Some(st.closed_to.map_or(end, |c| c.max(end)));
        }
        total += closed;
    }
    total
}

/// Closes every open window of a pair, whatever the watermark ([`Engine::close_all`]): each is emitted and recorded
/// in `emitted_to` rather than by moving `closed_to` (the watermark) to its end, so that a later reading of one of
/// those windows is late for it while a reading of any other window, of any size, is not (an agent started again
/// on the file after a drain: the watermark moved to the end of a pair's largest window would make every reading
/// until then late). Returns how many windows closed.
fn close_every_window(
    rule: &Rule,
    pair: (usize, i64),
    st: &mut PairState,
    out: &mut Vec<Emitted>,
    since_dirty: &mut Vec<(usize, i64)>,
) -> usize {
    let mut total = 0;
    for (k, &size) in rule.sizes.iter().enumerate() {
        let windows = std::mem::take(&mut st.open[k]);
        total += windows.len();
        for (start, acc) in windows {
            let end = emit_window(rule, pair, st, (k, start), &acc, out, since_dirty);
            for &func in &rule.funcs {
                st.note_emitted(size, func, end, end);
            }
        }
    }
    total
}

/// Emits the functions of the window of size index `k` starting at `start` that `emitted_to` does not hold;
/// returns the window's end.
fn emit_window(
    rule: &Rule,
    (r, sid): (usize, i64),
    st: &mut PairState,
    (k, start): (usize, i64),
    acc: &Acc,
    out: &mut Vec<Emitted>,
    since_dirty: &mut Vec<(usize, i64)>,
) -> i64 {
    let size = rule.sizes[k];
    let end = start.saturating_add(size);
    for &func in &rule.funcs {
        if !st.emitted_to.is_empty() && st.emitted(size, func, end) {
            continue;
        }
        out.push(Emitted {
            rule: r,
            series_id: sid,
            size: k,
            func,
            start_ms: start,
            value: acc.value(func),
        });
        lower_since(st, (size, func), end, since_dirty, (r, sid));
    }
    end
}

/// One value of a closed window.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// Index of the rule in [`Engine::rules`].
    pub rule: usize,
    /// The source series (buffer id).
    pub series_id: i64,
    /// Index of the size in the rule's sizes.
    pub size: usize,
    /// The function.
    pub func: Func,
    /// The window's start: the derived reading's event time.
    pub start_ms: i64,
    /// The value.
    pub value: Value,
}

/// How far ahead of both its series' newest reading and the seal's wall clock a reading may be and move the
/// watermark at once: one hour. One further ahead is held aside until the pair's next reading confirms it
/// (`newest_after`): a lone glitch would close every open window and make the next readings late. Two readings
/// ahead of the clock by the same offset do confirm it: a glitch that repeats so is taken for a clock.
pub const FUTURE_JUMP_MS: i64 = 3_600_000;

/// How often [`Engine::idle_due`] scans the pairs, ms of the intake clock.
const IDLE_SCAN_MS: i64 = 1000;

/// What [`Engine::load_state`] made of a persisted pair state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// Loaded.
    Yes,
    /// Loaded, with open windows an edit of the rules concerns (the rule no longer matches the series, no longer
    /// has their size or some function, or is no longer configured): the next seal settles them
    /// ([`Engine::close_orphans`]).
    Orphan,
    /// Not loaded: no rule of that name is configured and the state has no open window (it stays in the buffer:
    /// should the rule come back, the windows it emitted do not open again).
    Closed,
    /// Not loaded: no rule of that name is configured, and the functions of its open windows are not known (a
    /// state committed before they were kept, or of a series the buffer no longer knows): they wait in the
    /// buffer for the rule.
    NoRule,
    /// Not loaded: the bytes are not a state this version reads (its open windows are not computed on).
    Unreadable,
}

/// What becomes of a raw reading after the windows saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawFate {
    /// Sent as released.
    Send,
    /// Sent with the late flag (late for a rule with `late = "raw"`).
    SendLate,
    /// Not sent (a matching rule has `keep_raw = false`); deleted with the seal.
    Withhold,
}

/// A reading as the engine sees it.
#[derive(Debug, Clone, Copy)]
pub struct Obs<'a> {
    /// Event time, Unix ms.
    pub ts_ms: i64,
    /// Value.
    pub value: &'a Value,
    /// Quality.
    pub quality: Quality,
}

/// What the engine counted since it was made (monotonic; the buffer turns them into metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Readings aggregated, per rule and reading.
    pub aggregated: u64,
    /// Readings late for a rule (their window of some size had closed), per rule and reading.
    pub late: u64,
    /// Readings that needed a new window beyond `max_open`, per rule, size and reading.
    pub overflow: u64,
    /// Windows closed.
    pub closed: u64,
    /// Of those, windows of silent series closed by the intake clock (`idle_close_ms`).
    pub idle_closed: u64,
}

/// A loaded pair ([`Engine::load_state`]) that the next seal settles ([`Engine::close_orphans`]).
#[derive(Debug, Clone)]
struct Succession {
    /// The state's rule (a retired one, or a configured one).
    src: usize,
    series_id: i64,
    series: Series,
    /// The derived series `(function, size)` the state's rule wrote for the series and no longer writes.
    lost: Vec<(Func, i64)>,
    /// Whether its open windows close (no configured rule computes on them any more), or stay (the rule goes on
    /// with other functions).
    close: bool,
}

/// The rules and the state of every `(rule, series)` pair seen.
#[derive(Debug, Clone)]
pub struct Engine {
    /// The configured rules, then the retired ones ([`Rule::retired`]).
    rules: Vec<Rule>,
    /// How many of `rules` are configured.
    active: usize,
    /// Retired rules by name and sizes: their index in `rules`.
    retired: HashMap<(String, Vec<i64>), usize>,
    /// The functions each rule had when its states were last committed ([`Engine::remember_functions`]).
    functions: HashMap<String, Vec<Func>>,
    by_name: HashMap<String, usize>,
    matches: HashMap<i64, Vec<usize>>,
    states: HashMap<(usize, i64), PairState>,
    dirty: Vec<(usize, i64)>,
    open: usize,
    max_open: usize,
    /// Counted by seals whose commit went through.
    counts: Counts,
    /// Counted since the last [`Engine::committed`].
    uncommitted: Counts,
    /// The seal's wall-clock time, Unix ms ([`Engine::set_clock`]).
    now_ms: i64,
    /// Loaded pairs whose windows the next seal closes, or whose derived series another configured rule may now
    /// write ([`Engine::close_orphans`]).
    orphans: Vec<Succession>,
    /// Per series, the windows loaded rows hold as emitted (`emitted_to`), for the configured rules that write
    /// those derived series ([`Engine::close_orphans`]).
    history: HashMap<i64, (Series, Vec<Emission>)>,
    /// Per row `(rule name, series id)`, its persisted `since` ([`Engine::remember_since`]).
    since_of: HashMap<(String, i64), Vec<(SizeFunc, i64)>>,
    /// Pairs whose `since` changed since it was persisted.
    since_dirty: Vec<(usize, i64)>,
    /// Per pair, a reading held aside for being far ahead, with its seal's clock ([`newest_after`]); not persisted
    /// (after a restart a jump is taken one reading later).
    ahead: HashMap<(usize, i64), (i64, i64)>,
    /// The intake clock of the seal that feeds the next readings ([`Engine::set_intake_clock`]).
    intake_ms: Option<i64>,
    /// Whether any rule closes windows on the clock (`idle_close_ms` > 0).
    any_idle: bool,
    /// Pairs the last scan found with a window the clock closes ([`Engine::idle_due`]).
    idle: Vec<(usize, i64)>,
    /// The clock from which the next scan runs (one a second at most).
    next_idle_scan: i64,
    /// Every open window closes at this seal, whatever the clock ([`Engine::close_all`]).
    closing_all: bool,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new(
            Vec::new(),
            config::WindowsConfig::default().max_open_windows,
        )
    }
}

/// What a reading adds to a window: its number ([`crate::alarm::numeric`]), unless its quality is bad.
fn numeric(v: &Value, q: Quality) -> Option<f64> {
    if q == Quality::Bad {
        return None;
    }
    crate::alarm::numeric(v)
}

impl Engine {
    /// An engine over `rules` holding at most `max_open` windows, every state fresh.
    pub fn new(rules: Vec<Rule>, max_open: usize) -> Self {
        let any_idle = rules.iter().any(|r| r.idle_close > 0);
        let by_name = rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
        Self {
            active: rules.len(),
            rules,
            retired: HashMap::new(),
            functions: HashMap::new(),
            by_name,
            matches: HashMap::new(),
            states: HashMap::new(),
            dirty: Vec::new(),
            open: 0,
            max_open,
            counts: Counts::default(),
            uncommitted: Counts::default(),
            now_ms: i64::MAX,
            orphans: Vec::new(),
            history: HashMap::new(),
            since_of: HashMap::new(),
            since_dirty: Vec::new(),
            ahead: HashMap::default(),
            intake_ms: None,
            idle: Vec::new(),
            next_idle_scan: i64::MIN,
            any_idle,
            closing_all: false,
        }
    }

    /// The wall-clock time of the seal that feeds the next readings, Unix ms: a reading more than
    /// [`FUTURE_JUMP_MS`] ahead of it and of its series' newest reading does not move the watermark. Until set,
    /// every reading does.
    pub fn set_clock(&mut self, now_ms: i64) {
        self.now_ms = now_ms;
    }

    /// The intake clock of the seal that feeds the next readings, ms: a monotonic clock that stands still while
    /// the agent itself takes no readings (intake paused under `backpressure`, a broker connection down), so
    /// that such a pause, or a step of the wall clock, is not taken for a series' silence. Until set, no pair's
    /// silence is timed.
    pub fn set_intake_clock(&mut self, ms: i64) {
        self.intake_ms = Some(ms);
    }

    /// Compiles the configured rules.
    pub fn from_config(cfg: &WindowsConfig) -> Self {
        Self::new(
            cfg.rules.iter().map(Rule::compile).collect(),
            cfg.max_open_windows,
        )
    }

    /// The configured rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules[..self.active]
    }

    /// Whether there is nothing to compute: no rule is configured, and no window loaded waits to be closed.
    pub fn is_empty(&self) -> bool {
        self.active == 0 && self.orphans.is_empty() && self.dirty.is_empty()
    }

    /// Windows open now.
    pub fn open_windows(&self) -> usize {
        self.open
    }

    /// What committed seals counted since the engine was made (see [`Engine::committed`]).
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The seal that fed the readings since the last call was committed: their counts become [`Engine::counts`].
    pub fn committed(&mut self) {
        let (c, u) = (&mut self.counts, std::mem::take(&mut self.uncommitted));
        c.aggregated += u.aggregated;
        c.late += u.late;
        c.overflow += u.overflow;
        c.closed += u.closed;
        c.idle_closed += u.idle_closed;
    }

    /// The state of a pair, if it has one.
    pub fn state(&self, rule: usize, series_id: i64) -> Option<&PairState> {
        self.states.get(&(rule, series_id))
    }

    /// Forgets every state and what was counted since the last commit (before loading the states again from the
    /// buffer); the committed counts stay.
    pub fn reset(&mut self) {
        let counts = self.counts;
        let mut rules = std::mem::take(&mut self.rules);
        rules.truncate(self.active);
        *self = Self::new(rules, self.max_open);
        self.counts = counts;
    }

    /// The functions the rule `rule` had when its states were last committed (the buffer keeps them beside the
    /// states): the windows it left open are closed with them should it no longer be configured, or no longer have
    /// their size. Called before [`Engine::load_state`].
    pub fn remember_functions(&mut self, rule: &str, funcs: Vec<Func>) {
        self.functions.insert(rule.to_string(), funcs);
    }

    /// One persisted row of the pair of `rule` and `series_id` ([`Engine::take_since`]): the lowest window end it
    /// emitted function `key.1` of size `key.0` for, or (`None`) that the pair's history is known. Called before
    /// [`Engine::load_state`]; a state loaded without any is taken to have emitted any window.
    pub fn remember_since(
        &mut self,
        rule: &str,
        series_id: i64,
        key: Option<SizeFunc>,
        since: i64,
    ) {
        let v = self
            .since_of
            .entry((rule.to_string(), series_id))
            .or_default();
        if let Some(k) = key {
            v.push((k, since));
        }
    }

    /// The changes of the pairs' lowest emitted window ends since they were persisted: `(rule name, series id,
    /// (size, function), since)`, where none marks a pair whose history is known, to persist with the seal (beside
    /// [`Engine::take_dirty`]).
    pub fn take_since(&mut self) -> Vec<(String, i64, Option<SizeFunc>, i64)> {
        let mut d = Vec::new();
        for (r, sid) in std::mem::take(&mut self.since_dirty) {
            let Some(st) = self.states.get_mut(&(r, sid)) else {
                continue;
            };
            let Some(since) = &st.since else {
                continue;
            };
            if st.since_written.is_none() {
                d.push((self.rules[r].name.clone(), sid, None, i64::MAX));
            }
            let written = st.since_written.get_or_insert_with(Vec::new);
            for &(k, end) in since {
                if !written.contains(&(k, end)) {
                    d.push((self.rules[r].name.clone(), sid, Some(k), end));
                }
            }
            *written = since.clone();
        }
        d
    }

    /// Restores a persisted state of the pair of `rule` and the series `series_id` (`series`, if the buffer
    /// still knows it), and queues what an edit of the rules since it was committed asks of it for the next seal
    /// ([`Engine::close_orphans`]). For a known series whose rule's functions are known
    /// ([`Engine::remember_functions`], else the rule's own):
    /// - each derived series the pair's rule wrote and no longer writes (the rule removed, or no longer matching
    ///   the series, or without that function or size) keeps, in the pair's `emitted_to`, the windows it closed
    ///   (through `closed_to`): whatever rule writes it later leaves them closed;
    /// - open windows no configured rule computes on any more close, under the pair's rule or a retired one with
    ///   the functions they were opened with, and each goes first to the configured rules that now write its
    ///   derived series (heirs);
    /// - open windows of functions the rule no longer has go to the heirs as well (they stay open for the rest).
    pub fn load_state(
        &mut self,
        rule: &str,
        series_id: i64,
        series: Option<&Series>,
        bytes: &[u8],
    ) -> Loaded {
        let Some(stored) = PairState::stored_sizes(bytes) else {
            return Loaded::Unreadable;
        };
        let active = self.by_name.get(rule).copied();
        let remembered = self
            .functions
            .get(rule)
            .cloned()
            .or_else(|| active.map(|a| self.rules[a].funcs.clone()))
            .filter(|f| !f.is_empty());
        let open = stored.iter().any(|&(_, open)| open);
        let sizes: Vec<i64> = stored.iter().map(|&(z, _)| z).collect();
        let (Some(s), Some(funcs)) = (series, remembered) else {
            return match active {
                Some(r) => {
                    self.insert_state(r, series_id, bytes);
                    Loaded::Yes
                }
                None if open => Loaded::NoRule,
                None => Loaded::Closed,
            };
        };
        let Some(r) = active else {
            // A removed rule: its open windows close (or go to heirs); what it wrote stays closed.
            if sizes.is_empty() {
                return Loaded::Closed;
            }
            let t = self.retire(rule, sizes.clone(), funcs.clone());
            self.insert_state(t, series_id, bytes);
            let lost = combos(&funcs, &sizes);
            self.keep_closed(t, series_id, s, &lost);
            if open {
                self.queue(t, series_id, s, lost, true);
                return Loaded::Orphan;
            }
            if !self.states.get(&(t, series_id)).is_some_and(|st| st.dirty) {
                // Nothing to write or close: its entries are in `history`.
                self.states.remove(&(t, series_id));
            }
            return Loaded::Closed;
        };
        let windows = self.insert_state(r, series_id, bytes);
        let rule_now = &self.rules[r];
        let matches = rule_now.matches(s);
        // What the rule wrote and no longer writes for this series.
        let lost: Vec<(Func, i64)> = combos(&funcs, &sizes)
            .into_iter()
            .filter(|(f, z)| !matches || !rule_now.funcs.contains(f) || !rule_now.sizes.contains(z))
            .collect();
        self.keep_closed(r, series_id, s, &lost);
        let mut queued = false;
        // Open windows of a series the rule no longer matches, or of sizes it no longer has, close (or go to
        // heirs) under a retired rule with the functions they were opened with; the rule's row keeps none.
        let closing: Vec<i64> = stored
            .iter()
            .filter(|&&(z, open)| open && (!matches || !self.rules[r].sizes.contains(&z)))
            .map(|&(z, _)| z)
            .collect();
        if !closing.is_empty() {
            let t = self.retire(rule, closing.clone(), funcs.clone());
            self.insert_state(t, series_id, bytes);
            if !matches {
                if let Some(st) = self.states.get_mut(&(r, series_id)) {
                    for list in &mut st.open {
                        self.open -= list.len();
                        list.clear();
                    }
                }
            }
            self.queue(t, series_id, s, combos(&funcs, &closing), true);
            queued = true;
        }
        // Open windows of functions the rule no longer has: copies go to the heirs.
        let gone: Vec<(Func, i64)> = lost
            .iter()
            .copied()
            .filter(|(_, z)| self.rules[r].sizes.contains(z))
            .collect();
        if matches && windows > 0 && !gone.is_empty() {
            self.queue(r, series_id, s, gone, false);
            queued = true;
        }
        if queued {
            Loaded::Orphan
        } else {
            Loaded::Yes
        }
    }

    /// After the last [`Engine::load_state`] of a load: drops the per-series records no seal will use (no rule is
    /// configured and no window closes).
    pub fn loaded(&mut self) {
        self.since_of = HashMap::new();
        if self.active == 0 && self.orphans.is_empty() {
            self.history = HashMap::new();
        }
    }

    /// Notes in the state of `owner` (the row of the pair of `src`) that the derived series `lost` of `series` keep
    /// the windows `src`'s pair closed, and keeps what the row holds of emitted windows for the next seal's
    /// configured rules ([`Engine::close_orphans`]).
    fn keep_closed(&mut self, owner: usize, series_id: i64, series: &Series, lost: &[(Func, i64)]) {
        let Some(st) = self.states.get_mut(&(owner, series_id)) else {
            return;
        };
        let mut changed = false;
        // The windows it can have emitted: from the first it had open for the function (unknown: any) through its
        // watermark.
        if let Some(c) = st.closed_to {
            for &(f, z) in lost {
                if let Some(lo) = st.since_of((z, f)) {
                    changed |= st.note_emitted(z, f, lo, c);
                }
            }
        }
        if changed {
            mark_dirty(&mut self.dirty, st, (owner, series_id));
        }
        if !st.emitted_to.is_empty() {
            let entry = self
                .history
                .entry(series_id)
                .or_insert_with(|| (series.clone(), Vec::new()));
            entry.1.extend(st.emitted_to.iter().copied());
        }
    }

    /// Queues `src`'s pair for the next seal ([`Engine::close_orphans`]).
    fn queue(
        &mut self,
        src: usize,
        series_id: i64,
        series: &Series,
        lost: Vec<(Func, i64)>,
        close: bool,
    ) {
        self.orphans.push(Succession {
            src,
            series_id,
            series: series.clone(),
            lost,
            close,
        });
    }

    /// The retired rule closing windows of `sizes` loaded under the name `name`, opened with `funcs`, made once.
    fn retire(&mut self, name: &str, sizes: Vec<i64>, funcs: Vec<Func>) -> usize {
        let key = (name.to_string(), sizes);
        if let Some(&t) = self.retired.get(&key) {
            return t;
        }
        let t = self.rules.len();
        self.rules.push(Rule::retired(name, &key.1, funcs));
        self.retired.insert(key, t);
        t
    }

    /// Puts the pair's persisted state (read for its rule's sizes) in memory; returns its open windows.
    fn insert_state(&mut self, r: usize, series_id: i64, bytes: &[u8]) -> usize {
        let Some(mut st) = PairState::from_bytes(bytes, &self.rules[r].sizes) else {
            return 0;
        };
        let since = self
            .since_of
            .get(&(self.rules[r].name.clone(), series_id))
            .cloned();
        st.since.clone_from(&since);
        st.since_written = since;
        let windows = st.windows();
        self.open += windows;
        if let Some(old) = self.states.insert((r, series_id), st) {
            self.open -= old.windows();
        }
        windows
    }

    fn matching(&mut self, series_id: i64, series: &Series) -> Vec<usize> {
        if let Some(m) = self.matches.remove(&series_id) {
            return m;
        }
        if self.matches.len() >= MATCH_CACHE_MAX {
            self.matches.clear();
        }
        (0..self.active)
            .filter(|&i| self.rules[i].matches(series))
            .collect()
    }

    /// Feeds one released reading of `series` (buffer id `series_id`) to every matching rule; the windows it closes
    /// are appended to `out` (per pair and size in order of start). Returns what becomes of the raw reading.
    pub fn observe(
        &mut self,
        series_id: i64,
        series: &Series,
        obs: Obs<'_>,
        out: &mut Vec<Emitted>,
    ) -> RawFate {
        let rules = self.matching(series_id, series);
        let x = numeric(obs.value, obs.quality);
        let (mut withhold, mut late_raw, mut kept_out) = (false, false, false);
        for &r in &rules {
            let (late, overflow) = self.observe_rule(r, series_id, obs.ts_ms, x, out);
            let rule = &self.rules[r];
            withhold |= !rule.keep_raw;
            late_raw |= (late || overflow) && rule.late == LatePolicy::Raw;
            kept_out |= overflow;
        }
        self.matches.insert(series_id, rules);
        // A reading the cap kept out of a window is never withheld: the cap is the agent's limit, not the
        // operator's choice.
        match (x, late_raw, withhold && !kept_out) {
            (None, _, _) | (Some(_), false, false) => RawFate::Send,
            (Some(_), true, _) => RawFate::SendLate,
            (Some(_), false, true) => RawFate::Withhold,
        }
    }

    /// One rule: returns whether the reading was late for it, and whether the cap kept it out of a window.
    fn observe_rule(
        &mut self,
        r: usize,
        sid: i64,
        ts: i64,
        x: Option<f64>,
        out: &mut Vec<Emitted>,
    ) -> (bool, bool) {
        let rule = &self.rules[r];
        let st = self
            .states
            .entry((r, sid))
            .or_insert_with(|| PairState::fresh(rule.sizes.len()));
        mark_dirty(&mut self.dirty, st, (r, sid));
        st.newest = newest_after(st.newest, ts, self.now_ms, &mut self.ahead, (r, sid));
        if let (true, Some(c)) = (rule.idle_close > 0, self.intake_ms) {
            st.seen = Some(c);
        }
        let watermark = st
            .newest
            .map(|n| n.saturating_sub(rule.lateness))
            .max(st.closed_to);
        st.closed_to = watermark;
        let watermark = watermark.unwrap_or(i64::MIN);
        let (mut late, mut overflow) = (false, false);
        if let Some(x) = x {
            for (k, &size) in rule.sizes.iter().enumerate() {
                let start = ts.div_euclid(size).saturating_mul(size);
                let end = start.saturating_add(size);
                if end <= watermark {
                    late = true;
                    continue;
                }
                // Functions of this window emitted at an edit of the rules: the reading is late for them (their
                // values went out without it), and for the window if it is not open here and all were.
                let (some, all) = if st.emitted_to.is_empty() {
                    (false, false)
                } else {
                    let n = rule
                        .funcs
                        .iter()
                        .filter(|&&f| st.emitted(size, f, end))
                        .count();
                    (n > 0, n == rule.funcs.len())
                };
                late |= some;
                let list = &mut st.open[k];
                match list.binary_search_by_key(&start, |(s, _)| *s) {
                    Ok(i) => list[i].1.add(ts, x),
                    Err(_) if all => {}
                    Err(_) if self.open >= self.max_open => {
                        self.uncommitted.overflow += 1;
                        overflow = true;
                    }
                    Err(i) => {
                        list.insert(i, (start, Acc::new(ts, x)));
                        self.open += 1;
                    }
                }
            }
            if late {
                self.uncommitted.late += 1;
            } else {
                self.uncommitted.aggregated += 1;
            }
        }
        let closed = close_through(rule, (r, sid), st, watermark, out, &mut self.since_dirty);
        if !st.emitted_to.is_empty() {
            // Windows ending at or before the watermark are closed now: entries of derived series the rule writes
            // are kept by the watermark from here on.
            st.emitted_to.retain(|&(z, f, _, hi)| {
                hi > watermark || !rule.funcs.contains(&f) || !rule.sizes.contains(&z)
            });
        }
        self.open -= closed;
        self.uncommitted.closed += closed as u64;
        (late, overflow)
    }

    /// Settles the pairs [`Engine::load_state`] queued: the windows no configured rule computes on any more (the
    /// rule's filter or tags changed since they were opened, it no longer has their size, or it is no longer
    /// configured) close, and what a pair's rule wrote and no longer writes goes to the configured rules that now
    /// write the same derived series for that series (**heirs**: a rule renamed, split, merged, or given a function
    /// another rule had). Two passes:
    ///
    /// 1. The records of emitted windows every loaded row of a series holds (`emitted_to`, with those `load_state`
    ///    made of a rule's watermark) go to each configured rule that writes those derived series and matches the
    ///    series, and to each pair whose windows close here: none of them emits such a window again.
    /// 2. Per open window of a queued pair and heir: if the heir has a window of that start too, both saw the same
    ///    readings for part of it and the one with more readings stays with the heir, which emits the shared
    ///    functions; if the window is still open for the heir, a copy goes to it; if it is closed for the heir, the
    ///    old rule emits them now (also a rule that goes on without that function). Windows that close are emitted
    ///    with the old rule's functions no heir took and not emitted already, each noted in `emitted_to`.
    ///
    /// The state rows written with the seal hold the result. Returns the series of the pairs that emitted, for the
    /// emitted readings' names.
    pub fn close_orphans(&mut self, out: &mut Vec<Emitted>) -> Vec<(i64, Series)> {
        let pending = std::mem::take(&mut self.orphans);
        let history = std::mem::take(&mut self.history);
        for (sid, (series, emitted)) in &history {
            self.inherit(*sid, series, emitted);
        }
        // A pair whose windows close here emits none of its derived series' windows another rule emitted.
        for p in pending.iter().filter(|p| p.close) {
            if let (Some((_, emitted)), Some(st)) = (
                history.get(&p.series_id),
                self.states.get_mut(&(p.src, p.series_id)),
            ) {
                st.note_records(&self.rules[p.src], emitted);
            }
        }
        let mut named = Vec::with_capacity(pending.len());
        for p in pending {
            let Some(mut st) = self.states.remove(&(p.src, p.series_id)) else {
                continue;
            };
            let (emitted_before, windows_before) = (st.emitted_to.clone(), st.windows());
            let out_before = out.len();
            let closed = self.hand_over(&p, &mut st, out);
            let changed =
                closed > 0 || st.windows() != windows_before || st.emitted_to != emitted_before;
            let (r, sid) = (p.src, p.series_id);
            // The row to write is the configured rule's of that name, if there is one: a retired rule's windows
            // were a part of its state, and what they closed goes into it.
            let owner = match self.by_name.get(&self.rules[r].name) {
                Some(&a) if a != r && self.states.contains_key(&(a, sid)) => Some(a),
                _ => None,
            };
            let noted = match owner {
                Some(_) => std::mem::take(&mut st.emitted_to),
                None => st.emitted_to.clone(),
            };
            self.states.insert((r, sid), st);
            let pair = (owner.unwrap_or(r), sid);
            if let Some(target) = self.states.get_mut(&pair) {
                for &(size, f, lo, hi) in &noted {
                    target.note_emitted(size, f, lo, hi);
                }
                if changed {
                    mark_dirty(&mut self.dirty, target, pair);
                }
            }
            // Named for every value emitted here: a pair that stays open emits too (a function it no longer has).
            if out.len() > out_before {
                named.push((sid, p.series));
            }
        }
        named
    }

    /// The configured rules other than `src` that write one of the derived series `lost` for `series`.
    fn heirs(&self, src: usize, lost: &[(Func, i64)], series: &Series) -> Vec<usize> {
        (0..self.active)
            .filter(|&b| {
                let new = &self.rules[b];
                b != src
                    && lost
                        .iter()
                        .any(|(f, z)| new.funcs.contains(f) && new.sizes.contains(z))
                    && new.matches(series)
            })
            .collect()
    }

    /// Pass 1 of [`Engine::close_orphans`]: each configured rule that matches `series` notes, of the windows the
    /// loaded rows hold as emitted (`emitted`), those of the derived series it writes.
    fn inherit(&mut self, series_id: i64, series: &Series, emitted: &[Emission]) {
        for b in 0..self.active {
            let rule = &self.rules[b];
            let writes =
                |&(z, f, ..): &Emission| rule.funcs.contains(&f) && rule.sizes.contains(&z);
            if !emitted.iter().any(writes) || !rule.matches(series) {
                continue;
            }
            let heir = self
                .states
                .entry((b, series_id))
                .or_insert_with(|| PairState::fresh(rule.sizes.len()));
            if heir.note_records(rule, emitted) {
                mark_dirty(&mut self.dirty, heir, (b, series_id));
            }
        }
    }

    /// Pass 2 of [`Engine::close_orphans`] for `p`, whose pair's state is `st`: hands its open windows to the
    /// heirs, and with `p.close` closes them (the functions no heir took into `out`); returns how many closed.
    fn hand_over(&mut self, p: &Succession, st: &mut PairState, out: &mut Vec<Emitted>) -> usize {
        let heirs = self.heirs(p.src, &p.lost, &p.series);
        let Self {
            rules,
            states,
            dirty,
            open,
            uncommitted,
            since_dirty,
            ..
        } = self;
        let old = &rules[p.src];
        let mut total = 0;
        for (k, &size) in old.sizes.iter().enumerate() {
            let lost: Vec<Func> = p
                .lost
                .iter()
                .filter(|&&(_, z)| z == size)
                .map(|&(f, _)| f)
                .collect();
            if lost.is_empty() {
                continue;
            }
            let windows = if p.close {
                std::mem::take(&mut st.open[k])
            } else {
                st.open[k].clone()
            };
            for (start, acc) in windows {
                let end = start.saturating_add(size);
                // Functions an heir takes; and those an heir writes but had closed the window for.
                let (mut taken, mut missed): (Vec<Func>, Vec<Func>) = (Vec::new(), Vec::new());
                for &b in &heirs {
                    let rule = &rules[b];
                    let Some(kb) = rule.sizes.iter().position(|&z| z == size) else {
                        continue;
                    };
                    let shared = lost.iter().filter(|f| rule.funcs.contains(f));
                    let heir = states
                        .entry((b, p.series_id))
                        .or_insert_with(|| PairState::fresh(rule.sizes.len()));
                    let watermark = heir
                        .newest
                        .map(|n| n.saturating_sub(rule.lateness))
                        .max(heir.closed_to)
                        .unwrap_or(i64::MIN);
                    let list = &mut heir.open[kb];
                    match list.binary_search_by_key(&start, |(s, _)| *s) {
                        // Both rules matched the series for part of the window at least, and saw the same
                        // readings meanwhile: the one that took more readings was there first and holds them all.
                        Ok(j) => {
                            if acc.count > list[j].1.count {
                                list[j].1 = acc;
                                mark_dirty(dirty, heir, (b, p.series_id));
                            }
                            taken.extend(shared);
                        }
                        Err(j) if end > watermark => {
                            list.insert(j, (start, acc));
                            *open += 1;
                            mark_dirty(dirty, heir, (b, p.series_id));
                            taken.extend(shared);
                        }
                        Err(_) => missed.extend(shared),
                    }
                }
                // Closing: the functions no heir took. Staying open (the rule goes on with other functions): those
                // an heir writes but closed the window for, now (no one else would).
                let emit: &[Func] = if p.close { &old.funcs } else { &missed };
                if p.close {
                    total += 1;
                }
                // Each noted (a window an heir took is the heir's).
                for &func in emit {
                    if taken.contains(&func) || st.emitted(size, func, end) {
                        continue;
                    }
                    out.push(Emitted {
                        rule: p.src,
                        series_id: p.series_id,
                        size: k,
                        func,
                        start_ms: start,
                        value: acc.value(func),
                    });
                    st.note_emitted(size, func, end, end);
                    lower_since(st, (size, func), end, since_dirty, (p.src, p.series_id));
                }
            }
        }
        *open -= total;
        uncommitted.closed += total as u64;
        total
    }

    /// Every open window closes at this seal, with the readings it holds, whatever the clock and `idle_close_ms`
    /// (`fieldlink-agent drain`, before a buffer file is given up: the readings a `keep_raw = false` rule folded
    /// into open windows have no other copy); returns the series ids of the pairs with an open window, for the
    /// seal to name, as [`Engine::idle_due`] does. [`Engine::close_idle`] closes all their windows, also those the
    /// seal's readings opened, and ends it ([`Engine::forget_idle`] too). Only the last part of a seal may close
    /// all: the series of a pair found by neither must be among the seal's. Closed so, a window is closed for good,
    /// as by the clock: a reading of it arriving later is late.
    pub fn close_all(&mut self) -> Vec<i64> {
        self.closing_all = true;
        self.scan_open();
        self.idle.iter().map(|&(_, sid)| sid).collect()
    }

    /// Every pair with an open window, into `idle`.
    fn scan_open(&mut self) {
        let Self {
            states,
            rules,
            idle,
            ..
        } = self;
        idle.clear();
        idle.extend(
            states
                .iter()
                .filter(|(&(r, _), st)| st.first_end(&rules[r].sizes).is_some())
                .map(|(&pair, _)| pair),
        );
    }

    /// Scans, at most once a second of the intake clock `now` ([`Engine::set_intake_clock`]), for pairs of silent
    /// series with an open window the clock closes (the rule's `idle_close_ms`, see [`idle_watermark`]); returns
    /// their series ids. The seal loads those series (to name the derived readings), seals even when no reading
    /// is ready, and closes the windows with [`Engine::close_idle`] after it observed the released readings (a
    /// pair with one among them is not silent any more). A scan visits every pair state.
    pub fn idle_due(&mut self, now: i64) -> Vec<i64> {
        if !self.any_idle {
            return Vec::new();
        }
        if now >= self.next_idle_scan {
            self.next_idle_scan = now.saturating_add(IDLE_SCAN_MS);
            self.idle.clear();
            let Self {
                states,
                rules,
                idle,
                ..
            } = self;
            for (&(r, sid), st) in states.iter_mut() {
                let rule = &rules[r];
                if rule.idle_close == 0 {
                    continue;
                }
                let Some(end) = st.first_end(&rule.sizes) else {
                    st.seen = None;
                    continue;
                };
                let seen = *st.seen.get_or_insert(now);
                if idle_watermark(rule, st, seen, now).is_some_and(|w| end <= w) {
                    idle.push((r, sid));
                }
            }
        }
        self.idle.iter().map(|&(_, sid)| sid).collect()
    }

    /// Forgets what the last [`Engine::idle_due`] found (a seal that did not get to close it: it failed before its
    /// job, or waits for a later part).
    pub fn forget_idle(&mut self) {
        self.idle.clear();
        self.closing_all = false;
    }

    /// Whether the next seal has windows to close without any reading: pairs found by [`Engine::idle_due`], or
    /// orphans ([`Engine::close_orphans`]).
    pub fn has_due(&self) -> bool {
        !self.idle.is_empty()
            || !self.orphans.is_empty()
            || !self.dirty.is_empty()
            || (self.active > 0 && !self.history.is_empty())
    }

    /// Closes the open windows of the pairs [`Engine::idle_due`] found that the seal's intake clock
    /// ([`Engine::set_intake_clock`]) still closes, into `out` (after [`Engine::close_all`]: every open window of
    /// every pair); each pair keeps its state, every window it emitted closed for good (a reading of one arriving
    /// later is late).
    pub fn close_idle(&mut self, out: &mut Vec<Emitted>) {
        let (now, all) = (self.intake_ms, self.closing_all);
        if all {
            // Also the windows the seal's readings opened after the scan (their series are the seal's own).
            self.scan_open();
            self.closing_all = false;
        }
        let idle = std::mem::take(&mut self.idle);
        if now.is_none() && !all {
            return;
        }
        for (r, sid) in idle {
            let Some(st) = self.states.get_mut(&(r, sid)) else {
                continue;
            };
            let rule = &self.rules[r];
            let closed = if all {
                close_every_window(rule, (r, sid), st, out, &mut self.since_dirty)
            } else {
                let w = st
                    .seen
                    .zip(now)
                    .and_then(|(seen, now)| idle_watermark(rule, st, seen, now));
                let Some(w) = w else {
                    continue;
                };
                close_through(rule, (r, sid), st, w, out, &mut self.since_dirty)
            };
            if closed == 0 {
                continue;
            }
            self.open -= closed;
            self.uncommitted.closed += closed as u64;
            if !all {
                self.uncommitted.idle_closed += closed as u64;
            }
            mark_dirty(&mut self.dirty, st, (r, sid));
        }
    }

    /// The derived series of an emitted value of `source`: `<key>/<function>_<size>`, the source's tags.
    pub fn derived_series(&self, e: &Emitted, source: &Series) -> Series {
        let rule = &self.rules[e.rule];
        Series {
            key: format!("{}/{}_{}", source.key, e.func.name(), rule.suffixes[e.size]),
            tags: source.tags.clone(),
        }
    }

    /// The states changed since the last call, `(rule name, series id, bytes)`, to persist with the seal.
    pub fn take_dirty(&mut self) -> Vec<(String, i64, Vec<u8>)> {
        let mut d = Vec::with_capacity(self.dirty.len());
        for (r, sid) in std::mem::take(&mut self.dirty) {
            if let Some(st) = self.states.get_mut(&(r, sid)) {
                st.dirty = false;
                if st.since.is_some() && st.since_written.is_none() {
                    // A pair of this version written for the first time: its history is known from here on.
                    self.since_dirty.push((r, sid));
                }
                d.push((
                    self.rules[r].name.clone(),
                    sid,
                    st.to_bytes(&self.rules[r].sizes),
                ));
            }
        }
        d
    }
}

#[cfg(test)]
mod tests;

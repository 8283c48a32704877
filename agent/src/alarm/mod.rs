//! Alarm rules evaluated on the agent, offline, in event-time order. Pure: no I/O, no clock of its own.
//!
//! The buffer's seal ([`crate::buffer::Buffer::seal`]) is the one place where a series' readings are in event-time
//! order; it feeds every released reading that is not flagged late to [`Engine::observe`], then calls
//! [`Engine::tick`] with the stale clock, and commits the resulting transitions (as an alarm-event record, see
//! `proto/src/alarm.rs`), the changed rule states and the rules' next sequence numbers in the same transaction that
//! deletes the readings. A reading is therefore evaluated exactly once, even across a crash: either its deletion
//! and the state it produced are committed together, or neither is and the reading is evaluated again from the
//! state before.
//!
//! # A rule on one series
//! Each `(rule, series)` pair has a [`State`]: its level (0 = `ok`, then the rule's levels, least severe first),
//! a pending change with the event time it started, the newest reading's time (`stale`) and a window of recent
//! values (`rate`).
//!
//! - `above` / `below` / `rate` / `quality`: each evaluable reading gives a **target** level: the most severe
//!   level whose limit the value is beyond, or, for the current level and those below it, whose limit minus
//!   (`below`: plus) the hysteresis it is still beyond. A target more severe than the current level is entered
//!   once targets on that side have been given for `on_delay_ms` of event time (judged at each reading: the
//!   reading whose time is at least `on_delay_ms` after the first one that left the level enters the target it
//!   gives); less severe likewise with `off_delay_ms`. A reading whose target is the current level cancels a
//!   pending change. Not evaluable (skipped): bad-quality readings, strings and non-finite values for
//!   `above`/`below`/`rate` (booleans count as 0 and 1); `quality` evaluates every reading.
//! - `rate`: the value is `|v − v₀| / (t − t₀)` in units per second, where `(t₀, v₀)` is the oldest evaluable
//!   reading within `span_ms` before the reading (at most [`MAX_WINDOW`] readings are kept); with no older
//!   reading in the span there is no value and the reading changes nothing.
//! - `stale`: level `i` is entered when no reading came for more than `after_ms[i]` after the newest one; the
//!   transition's event time is that reading's time plus `after_ms[i]`. It is found either by a reading that
//!   comes after the gap (the transitions through each level are emitted first, then the reading returns the
//!   rule to `ok`), or by [`Engine::tick`] with the **stale clock** (the buffer passes wall-clock time minus the
//!   reorder window: the time up to which every reading that is not late has been released). Any reading, of
//!   any quality and type, returns a stale rule to `ok`.
//!
//! Every transition takes the rule's next sequence number (1, 2, … over all its series).

mod config;
pub(crate) use config::name_problem;
pub mod status;

pub use config::{AlarmsConfig, Condition, LevelConfig, QualityLevel, RuleConfig, MAX_LEVELS};
pub use status::StatusBoard;

use fieldlink_proto::alarm::{AlarmEvent, Cause, Level};
use fieldlink_proto::{Quality, Series, Value};
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, VecDeque};

/// Readings a `rate` state keeps, at most (the oldest go first).
pub const MAX_WINDOW: usize = 1024;
/// Series whose matching rules are cached before the cache is dropped.
const MATCH_CACHE_MAX: usize = 100_000;

/// The engine's integer-keyed maps (rule index, buffer series id) hash with foldhash: the keys come from the agent
/// itself, and std's SipHash was a visible share of a path taken for every rule and reading.
type Ids = foldhash::fast::RandomState;

/// Marks a pair's state to be persisted with the next commit.
fn mark(dirty: &mut Vec<(usize, i64)>, st: &mut State, key: (usize, i64)) {
    if !st.dirty {
        st.dirty = true;
        dirty.push(key);
    }
}

/// A rule ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The rule's name.
    pub name: String,
    filter: String,
    tags: Vec<(String, String)>,
    condition: Condition,
    /// Level names, `ok` first.
    names: Vec<String>,
    /// Per level 1.. : the limit, the stale time in ms, or the quality code.
    limits: Vec<f64>,
    hysteresis: f64,
    on_delay_ms: i64,
    off_delay_ms: i64,
    span_ms: i64,
    /// Publish its status on the local broker.
    pub publish: bool,
}

impl Rule {
    /// Compiles a validated rule.
    pub fn compile(c: &RuleConfig) -> Self {
        let limits = c
            .levels
            .iter()
            .map(|l| match c.condition {
                Condition::Stale => l.after_ms.unwrap_or(u64::MAX) as f64,
                Condition::Quality => l.quality.map_or(2.0, |q| q as u8 as f64),
                _ => l.limit.unwrap_or(f64::INFINITY),
            })
            .collect();
        Self {
            name: c.name.clone(),
            filter: c.series.clone(),
            tags: c.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            condition: c.condition,
            names: std::iter::once("ok".to_owned())
                .chain(c.levels.iter().map(|l| l.name.clone()))
                .collect(),
            limits,
            hysteresis: c.hysteresis,
            on_delay_ms: c.on_delay_ms.min(i64::MAX as u64) as i64,
            off_delay_ms: c.off_delay_ms.min(i64::MAX as u64) as i64,
            span_ms: c.span_ms.unwrap_or(0).min(i64::MAX as u64) as i64,
            publish: c.publish,
        }
    }

    /// Whether the rule applies to `series`.
    pub fn matches(&self, series: &Series) -> bool {
        crate::mqtt::topic_matches(&self.filter, &series.key)
            && self
                .tags
                .iter()
                .all(|t| series.tags.iter().any(|s| s.0 == t.0 && s.1 == t.1))
    }

    /// The level's name (0 is `ok`).
    pub fn level_name(&self, level: u8) -> &str {
        self.names.get(level as usize).map_or("?", String::as_str)
    }

    /// Its condition.
    pub fn condition(&self) -> Condition {
        self.condition
    }

    fn levels(&self) -> u8 {
        self.limits.len() as u8
    }

    /// The target level of value `x` from level `cur` (see the module doc).
    fn target(&self, cur: u8, x: f64) -> u8 {
        let h = self.hysteresis;
        let mut t = 0u8;
        for (i, &lim) in self.limits.iter().enumerate() {
            let level = i as u8 + 1;
            let (enter, hold) = match self.condition {
                Condition::Above | Condition::Rate => (x > lim, x > lim - h),
                Condition::Below => (x < lim, x < lim + h),
                Condition::Quality | Condition::Stale => (x >= lim, x >= lim),
            };
            if enter || (level <= cur && hold) {
                t = level;
            }
        }
        t
    }
}

/// What a `(rule, series)` pair remembers. Persisted with [`State::to_bytes`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    /// Current level (0 = ok).
    pub level: u8,
    /// Event time of the last transition (0 before the first).
    pub since_ms: i64,
    /// The rule's sequence number of the last transition (0 before the first).
    pub seq: u64,
    /// A change waiting for its delay: the level the last reading called for, and when the level was first left.
    pub pending: Option<(u8, i64)>,
    /// Newest reading's event time (`stale`).
    pub last_ts: Option<i64>,
    /// Recent evaluable readings within the span (`rate`), oldest first.
    pub window: VecDeque<(i64, f64)>,
    /// Changed since it was last taken by [`Engine::take_dirty`] (not persisted).
    pub(crate) dirty: bool,
}

impl State {
    /// Serialises: version 1, level, since, seq, pending, last_ts, window; little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + 16 * self.window.len());
        b.push(1);
        b.push(self.level);
        b.extend_from_slice(&self.since_ms.to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        match self.pending {
            Some((l, t)) => {
                b.push(1);
                b.push(l);
                b.extend_from_slice(&t.to_le_bytes());
            }
            None => b.push(0),
        }
        match self.last_ts {
            Some(t) => {
                b.push(1);
                b.extend_from_slice(&t.to_le_bytes());
            }
            None => b.push(0),
        }
        b.extend_from_slice(&(self.window.len() as u32).to_le_bytes());
        for (t, v) in &self.window {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Parses [`State::to_bytes`]; `None` if malformed.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = b.get(at..at + n)?;
            at += n;
            Some(s)
        };
        let word = |s: &[u8]| i64::from_le_bytes(s.try_into().unwrap_or_default());
        if take(1)? != [1] {
            return None;
        }
        let level = take(1)?[0];
        let since_ms = word(take(8)?);
        let seq = word(take(8)?) as u64;
        let pending = match take(1)?[0] {
            0 => None,
            _ => {
                let l = take(1)?[0];
                Some((l, word(take(8)?)))
            }
        };
        let last_ts = match take(1)?[0] {
            0 => None,
            _ => Some(word(take(8)?)),
        };
        let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        if n > MAX_WINDOW {
            return None;
        }
        let mut window = VecDeque::with_capacity(n);
        for _ in 0..n {
            let t = word(take(8)?);
            let v = f64::from_le_bytes(take(8)?.try_into().ok()?);
            window.push_back((t, v));
        }
        if at != b.len() {
            return None;
        }
        Some(Self {
            level,
            since_ms,
            seq,
            pending,
            last_ts,
            window,
            dirty: false,
        })
    }
}

/// One state change, before it is given its series' name (see [`Engine::event`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// Index of the rule in [`Engine::rules`].
    pub rule: usize,
    /// The series (buffer id).
    pub series_id: i64,
    /// The rule's sequence number of this transition.
    pub rule_seq: u64,
    /// Level before.
    pub from: u8,
    /// Level after.
    pub to: u8,
    /// Event time.
    pub ts_ms: i64,
    /// The reading that caused it.
    pub cause: Option<Cause>,
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

/// The rules and the state of every `(rule, series)` pair seen.
#[derive(Debug, Clone, Default)]
pub struct Engine {
    rules: Vec<Rule>,
    by_name: HashMap<String, usize>,
    matches: HashMap<i64, Vec<usize>, Ids>,
    states: HashMap<(usize, i64), State, Ids>,
    stale: BTreeSet<(usize, i64)>,
    next_seq: Vec<u64>,
    dirty: Vec<(usize, i64)>,
    dirty_seq: BTreeSet<usize>,
    /// Pairs not at `ok`.
    active: usize,
}

/// A changed state or sequence number to persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Dirty {
    /// `(rule name, series id, state bytes)`.
    State(String, i64, Vec<u8>),
    /// `(rule name, next sequence number)`.
    Seq(String, u64),
}

/// The number a value stands for: integers as f64, booleans 0 and 1; strings, NaN and infinities have none.
/// (The window rules use it too.)
pub(crate) fn numeric(v: &Value) -> Option<f64> {
    let x = match v {
        Value::F64(f) => *f,
        Value::I64(i) => *i as f64,
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Str(_) => return None,
    };
    x.is_finite().then_some(x)
}

impl Engine {
    /// An engine over `rules`, with every state fresh and every sequence at 1.
    pub fn new(rules: Vec<Rule>) -> Self {
        let by_name = rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
        let next_seq = vec![1; rules.len()];
        Self {
            rules,
            by_name,
            next_seq,
            ..Self::default()
        }
    }

    /// Compiles the configured rules.
    pub fn from_config(cfg: &AlarmsConfig) -> Self {
        Self::new(cfg.rules.iter().map(Rule::compile).collect())
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether there is any rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Forgets every state and sequence number (before loading them again from the buffer).
    pub fn reset(&mut self) {
        *self = Self::new(std::mem::take(&mut self.rules));
    }

    /// Restores a persisted state; ignored if the rule is no longer configured or the bytes are malformed. A
    /// level beyond the rule's levels (the rule lost levels) is clamped to its most severe level.
    pub fn load_state(&mut self, rule: &str, series_id: i64, bytes: &[u8]) -> bool {
        let (Some(&r), Some(mut st)) = (self.by_name.get(rule), State::from_bytes(bytes)) else {
            return false;
        };
        let n = self.rules[r].levels();
        st.level = st.level.min(n);
        st.pending = st.pending.filter(|&(l, _)| l <= n && l != st.level);
        if st.level > 0 {
            self.active += 1;
        }
        if self.rules[r].condition == Condition::Stale {
            self.stale.insert((r, series_id));
        }
        if let Some(old) = self.states.insert((r, series_id), st) {
            if old.level > 0 {
                self.active -= 1;
            }
        }
        true
    }

    /// Restores a rule's next sequence number.
    pub fn load_seq(&mut self, rule: &str, next: u64) {
        if let Some(&r) = self.by_name.get(rule) {
            self.next_seq[r] = next.max(1);
        }
    }

    /// The state of a pair, if it has one.
    pub fn state(&self, rule: usize, series_id: i64) -> Option<&State> {
        self.states.get(&(rule, series_id))
    }

    /// Every pair with its state.
    pub fn states(&self) -> impl Iterator<Item = (&(usize, i64), &State)> {
        self.states.iter()
    }

    /// Pairs not at `ok`.
    pub fn active(&self) -> usize {
        self.active
    }

    /// The rules matching a series (cached by series id).
    fn matching(&mut self, series_id: i64, series: &Series) -> Vec<usize> {
        if let Some(m) = self.matches.remove(&series_id) {
            return m;
        }
        if self.matches.len() >= MATCH_CACHE_MAX {
            self.matches.clear();
        }
        (0..self.rules.len())
            .filter(|&i| self.rules[i].matches(series))
            .collect()
    }

    fn transition(
        &mut self,
        rule: usize,
        series_id: i64,
        to: u8,
        ts_ms: i64,
        cause: Option<Cause>,
        out: &mut Vec<Transition>,
    ) {
        let st = self.states.entry((rule, series_id)).or_default();
        mark(&mut self.dirty, st, (rule, series_id));
        let from = st.level;
        match (from > 0, to > 0) {
            (false, true) => self.active += 1,
            (true, false) => self.active -= 1,
            _ => {}
        }
        st.level = to;
        st.since_ms = ts_ms;
        st.pending = None;
        let seq = self.next_seq[rule];
        st.seq = seq;
        self.next_seq[rule] += 1;
        self.dirty_seq.insert(rule);
        out.push(Transition {
            rule,
            series_id,
            rule_seq: seq,
            from,
            to,
            ts_ms,
            cause,
        });
    }

    /// Evaluates one reading of `series` (buffer id `series_id`) against every matching rule; transitions are
    /// appended to `out`. Readings of one series must come in event-time order.
    pub fn observe(
        &mut self,
        series_id: i64,
        series: &Series,
        obs: Obs<'_>,
        out: &mut Vec<Transition>,
    ) {
        // Taken out of the cache and put back: no allocation per reading.
        let rules = self.matching(series_id, series);
        for &r in &rules {
            self.observe_rule(r, series_id, obs, out);
        }
        self.matches.insert(series_id, rules);
    }

    fn observe_rule(&mut self, r: usize, sid: i64, obs: Obs<'_>, out: &mut Vec<Transition>) {
        let cause = || Cause {
            ts_ms: obs.ts_ms,
            value: obs.value.clone(),
            quality: obs.quality,
        };
        let rule = &self.rules[r];
        let (cond, n) = (rule.condition, rule.levels());
        if cond == Condition::Stale {
            let st = match self.states.entry((r, sid)) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => {
                    self.stale.insert((r, sid));
                    v.insert(State::default())
                }
            };
            mark(&mut self.dirty, st, (r, sid));
            let (last, mut level) = (st.last_ts, st.level);
            if let Some(last) = last {
                // The gap before this reading: every level it passed, at the time it passed it.
                while level < n {
                    let at = last.saturating_add(self.rules[r].limits[level as usize] as i64);
                    if obs.ts_ms <= at {
                        break;
                    }
                    self.transition(r, sid, level + 1, at, None, out);
                    level += 1;
                }
            }
            let st = self.states.entry((r, sid)).or_default();
            st.last_ts = Some(last.map_or(obs.ts_ms, |l| l.max(obs.ts_ms)));
            if level > 0 {
                self.transition(r, sid, 0, obs.ts_ms, Some(cause()), out);
            }
            return;
        }
        let x = match cond {
            Condition::Quality => f64::from(obs.quality as u8),
            _ => {
                if obs.quality == Quality::Bad {
                    return;
                }
                match numeric(obs.value) {
                    Some(x) => x,
                    None => return,
                }
            }
        };
        let span = rule.span_ms;
        let st = self.states.entry((r, sid)).or_default();
        let x = if cond == Condition::Rate {
            st.window.push_back((obs.ts_ms, x));
            while st
                .window
                .front()
                .is_some_and(|&(t, _)| t < obs.ts_ms.saturating_sub(span))
                || st.window.len() > MAX_WINDOW
            {
                st.window.pop_front();
            }
            mark(&mut self.dirty, st, (r, sid));
            match st.window.front() {
                Some(&(t0, v0)) if t0 < obs.ts_ms => {
                    (x - v0).abs() / ((obs.ts_ms - t0) as f64 / 1000.0)
                }
                _ => return,
            }
        } else {
            x
        };
        let rule = &self.rules[r];
        let cur = st.level;
        let target = rule.target(cur, x);
        if target == cur {
            if st.pending.take().is_some() {
                mark(&mut self.dirty, st, (r, sid));
            }
            return;
        }
        let raising = target > cur;
        let delay = if raising {
            rule.on_delay_ms
        } else {
            rule.off_delay_ms
        };
        let since = match st.pending {
            Some((p, s)) if (p > cur) == raising => s,
            _ => obs.ts_ms,
        };
        st.pending = Some((target, since));
        mark(&mut self.dirty, st, (r, sid));
        if obs.ts_ms.saturating_sub(since) >= delay {
            self.transition(r, sid, target, obs.ts_ms, Some(cause()), out);
        }
    }

    /// Raises the stale levels whose time has come by `clock_ms` (the stale clock: see the module doc).
    pub fn tick(&mut self, clock_ms: i64, out: &mut Vec<Transition>) {
        let keys: Vec<(usize, i64)> = self.stale.iter().copied().collect();
        for (r, sid) in keys {
            let n = self.rules[r].levels();
            while let Some((Some(last), level)) =
                self.states.get(&(r, sid)).map(|s| (s.last_ts, s.level))
            {
                if level >= n {
                    break;
                }
                let at = last.saturating_add(self.rules[r].limits[level as usize] as i64);
                if clock_ms <= at {
                    break;
                }
                self.transition(r, sid, level + 1, at, None, out);
            }
        }
    }

    /// The states and sequence numbers changed since the last call, to persist with the transitions.
    pub fn take_dirty(&mut self) -> Vec<Dirty> {
        let mut d = Vec::with_capacity(self.dirty.len() + self.dirty_seq.len());
        for (r, sid) in std::mem::take(&mut self.dirty) {
            if let Some(st) = self.states.get_mut(&(r, sid)) {
                st.dirty = false;
                d.push(Dirty::State(self.rules[r].name.clone(), sid, st.to_bytes()));
            }
        }
        for r in std::mem::take(&mut self.dirty_seq) {
            d.push(Dirty::Seq(self.rules[r].name.clone(), self.next_seq[r]));
        }
        d
    }

    /// The wire form of a transition of `series`.
    pub fn event(&self, t: &Transition, series: Series) -> AlarmEvent {
        let rule = &self.rules[t.rule];
        let level = |l: u8| Level {
            severity: l,
            name: rule.level_name(l).to_owned(),
        };
        AlarmEvent {
            rule: rule.name.clone(),
            rule_seq: t.rule_seq,
            series,
            from: level(t.from),
            to: level(t.to),
            ts_ms: t.ts_ms,
            cause: t.cause.clone().map(|mut c| {
                if let Value::Str(text) = &mut c.value {
                    cut_string(text, MAX_CAUSE_STRING_BYTES);
                }
                c
            }),
        }
    }
}

/// Longest string value an alarm event carries as its cause, bytes: a record holds up to 1,000 events and may not
/// pass 1 MiB compressed (a record the encoder refused would stop every seal). Longer strings are cut, at a
/// character boundary, with `…` appended; the same transition always gives the same event.
pub const MAX_CAUSE_STRING_BYTES: usize = 256;

/// Cuts `text` to at most `max` bytes plus `…`, at a character boundary.
fn cut_string(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
}

#[cfg(test)]
mod tests;

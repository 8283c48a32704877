//! A seal in three steps, so that its work can run off the buffer thread while commits go on:
//!
//! 1. [`Buffer::seal_begin`] (buffer thread, SQLite reads): takes the ready groups' readings, the dedup states and
//!    series they involve, and the alarm and window engines out of the buffer, as a [`SealJob`].
//! 2. [`SealJob::run`] (any thread, no I/O): dedup and order, alarm and window rules, record encoding and
//!    compression; the outcome is a [`Sealed`].
//! 3. [`Buffer::seal_finish`] (buffer thread): puts the engines back, then writes the records, states, dead
//!    letters and the deletion of the groups in one transaction, or, if anything failed, restores the engines
//!    from their committed states and leaves the groups to be sealed again.
//!
//! Between 1 and 3 the buffer thread keeps committing appends, serving fetches and acknowledgements. That is safe
//! because only seals read or write what a job holds: the groups it took (a commit only adds newer ones, and
//! `drop_oldest` drops sealed records only), the dedup states it took out of the cache, the engines, `next_seq`
//! and the bytes-per-reading estimate. At most one job exists at a time (the caller's duty: [`Buffer::sealing`]
//! says whether one is out).

use super::group;
use super::state_log;
use super::windows::{self, WindowStep};
use super::{
    Buffer, BufferError, SealReport, EVENTS_PER_RECORD, MAX_DEAD_LETTERS, STATE_LOG_SEALS,
};
use crate::alarm::{self, Obs, Transition};
use crate::batch::{self, BatchConfig, Builder, Built, Row};
use crate::order::{self, Rules, SeriesState};
use fieldlink_proto::{Encoder, Series, Value};
use foldhash::{HashMap, HashMapExt};
use rusqlite::{params, Connection};

/// The groups a seal took (to delete them, and to count them out of the unsealed stats).
#[derive(Debug, Clone, Copy)]
struct Taken {
    /// The newest group id taken: the seal deletes `groups` up to it.
    ids_last: i64,
    /// Readings in them, unreadable ones included.
    rows: u64,
    /// Their counted size.
    bytes: u64,
    /// Readings of groups that did not decode (counted as dead-lettered).
    unreadable: u64,
    /// Ready groups (`id <= up_to`) were left for a later part: they did not fit in `max_rows`.
    more: bool,
}

/// Everything a seal needs, taken out of the buffer by [`Buffer::seal_begin`]: run it with [`SealJob::run`], on
/// any thread, and hand the result to [`Buffer::seal_finish`].
#[derive(Debug)]
pub struct SealJob {
    taken: Taken,
    pending: Vec<order::Pending>,
    states: HashMap<i64, SeriesState>,
    series: HashMap<i64, Series>,
    alarms: alarm::Engine,
    windows: crate::window::Engine,
    /// Whether alarm events become records (an alarm encoder exists).
    alarm_records: bool,
    /// The alarm engine's stale clock for this seal ([`Buffer::stale_clock`]).
    stale_clock: i64,
    rules: Rules,
    now_ms: i64,
    next_seq: u64,
    /// The number the seal's `state_log` row gets.
    log_seal: u64,
    bytes_per_reading: f64,
    agent_id: String,
    epoch: u64,
    cfg: BatchConfig,
}

/// What a seal computed, or why it could not.
#[derive(Debug)]
pub struct Sealed {
    taken: Taken,
    now_ms: i64,
    states: HashMap<i64, SeriesState>,
    series: HashMap<i64, Series>,
    alarms: alarm::Engine,
    windows: crate::window::Engine,
    outcome: Result<Outcome, BufferError>,
}

/// A computed seal, to be written.
#[derive(Debug)]
struct Outcome {
    transitions: Vec<Transition>,
    late_skipped: u64,
    step: WindowStep,
    dead: Vec<order::Pending>,
    /// Readings the wire format would refuse a batch for ([`split_unsendable`]), withheld into `dead_letters`.
    unsendable: Vec<order::Pending>,
    duplicates: u64,
    late_flagged: u64,
    /// Alarm records the transitions become: the readings records are numbered after them.
    alarm_records: u64,
    built: Vec<Built>,
    bytes_per_reading: f64,
    /// How each series that remembered readings, or whose deltas aged, stores its dedup state (by series id).
    state_writes: Vec<(i64, StateWrite)>,
    /// The seal's row of `state_log` (empty: none).
    state_log: Vec<u8>,
    /// The number the seal's `state_log` row gets (the decisions above were made for it).
    log_seal: u64,
}

/// How a seal stores a series' dedup state: the whole state in `series_state`, or, when that is more than four times
/// what it remembered since it was last stored, only that (a delta, 16 bytes per reading) in the seal's one row of
/// `state_log` ([`super::state_log`]). A state whose oldest delta is [`STATE_LOG_SEALS`] seals old is stored whole,
/// whether it remembered anything or not, so the log never needs more than its last [`STATE_LOG_SEALS`] rows. A
/// series that remembered nothing in a seal otherwise has the state it had (its newest time did not move; what it
/// forgot, the next release forgets again after loading) and is not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StateWrite {
    Delta,
    /// Encoded inside the transaction, one state at a time (all of them encoded at once would double their memory
    /// for a moment).
    Whole,
}

impl StateWrite {
    /// The write `st` needs in the seal numbered `seal`, after it remembered `remembered` readings.
    fn of(st: &SeriesState, remembered: usize, seal: u64) -> Self {
        if aged(st, seal) || st.remembered() <= 4 * remembered {
            StateWrite::Whole
        } else {
            StateWrite::Delta
        }
    }

    /// After the commit of the seal numbered `seal`: the state's bookkeeping follows what was stored.
    fn stored(self, st: &mut SeriesState, seal: u64) {
        match self {
            StateWrite::Delta if st.logged_since == 0 => st.logged_since = seal,
            StateWrite::Delta => {}
            StateWrite::Whole => st.logged_since = 0,
        }
    }
}

/// Whether `st`'s oldest delta would fall out of the log kept after the seal numbered `seal`.
fn aged(st: &SeriesState, seal: u64) -> bool {
    st.logged_since != 0 && st.logged_since + STATE_LOG_SEALS <= seal
}

/// Inside a seal's transaction: `st` stored whole as of the seal numbered `seal` (its deltas in older rows of
/// `state_log` no longer apply).
pub(super) fn write_whole(
    conn: &Connection,
    sid: i64,
    st: &SeriesState,
    seal: u64,
) -> Result<(), BufferError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO series_state(series_id, state, log_seal) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![sid, st.to_bytes(), seal as i64])?;
    Ok(())
}

impl SealJob {
    /// Readings the job took from `groups` (unreadable ones included).
    pub fn rows(&self) -> u64 {
        self.taken.rows
    }

    /// Releases, evaluates the rules, and encodes the records with `encoder`. Pure: no I/O.
    pub fn run(self, encoder: &mut Encoder) -> Sealed {
        let SealJob {
            taken,
            pending,
            mut states,
            mut series,
            mut alarms,
            mut windows,
            alarm_records,
            stale_clock,
            rules,
            now_ms,
            next_seq,
            log_seal,
            mut bytes_per_reading,
            agent_id,
            epoch,
            cfg,
        } = self;
        let (pending, unsendable) = split_unsendable(pending, &series);
        let mut released = order::release(pending, &mut states, rules);
        let mut state_log = Vec::new();
        let mut state_writes: Vec<(i64, StateWrite)> = released
            .remembered
            .chunk_by(|a, b| a.0 == b.0)
            .filter_map(|run| {
                let sid = run[0].0;
                let st = states.get(&sid)?;
                let write = StateWrite::of(st, run.len(), log_seal);
                if write == StateWrite::Delta {
                    state_log::push(&mut state_log, sid, st.last_ts, run);
                }
                Some((sid, write))
            })
            .collect();
        // Series involved that remembered nothing (all duplicates) but whose deltas aged. `remembered` is in series
        // order, so are the writes.
        let remembering = state_writes.len();
        for (sid, st) in &states {
            let written = state_writes[..remembering].binary_search_by_key(sid, |w| w.0);
            if aged(st, log_seal) && written.is_err() {
                state_writes.push((*sid, StateWrite::Whole));
            }
        }
        released.remembered = Vec::new(); // not needed any more: its memory goes now

        // Alarm rules: each series' released readings in event-time order, late ones left out; then the clock.
        let mut transitions = Vec::new();
        let mut late_skipped = 0u64;
        if !alarms.is_empty() {
            for o in &released.out {
                if o.late {
                    late_skipped += 1;
                    continue;
                }
                if let Some(s) = series.get(&o.series) {
                    let obs = Obs {
                        ts_ms: o.ts_ms,
                        value: &o.value,
                        quality: o.quality,
                    };
                    alarms.observe(o.series, s, obs, &mut transitions);
                }
            }
            // The stale clock says every reading up to it has been released: not true while ready groups wait
            // for the next part of this seal (a backlog after a restart), whose readings could still show a
            // series alive. The last part ticks.
            if !taken.more {
                alarms.tick(stale_clock, &mut transitions);
            }
        }
        // One event per transition, EVENTS_PER_RECORD events per record (see `Buffer::alarm_records`).
        let n_alarm = if alarm_records {
            transitions.len().div_ceil(EVENTS_PER_RECORD) as u64
        } else {
            0
        };

        // Window rules: the released readings feed the windows; closed windows add derived readings.
        let mut step = windows::window_step(&mut windows, released.out, &series, now_ms);
        series.extend(step.derived.iter().map(|(id, s)| (*id, s.clone())));
        let rows = device_order(std::mem::take(&mut step.rows), &series);

        let first_seq = next_seq + n_alarm;
        let built = {
            let lookup = |id: i64| series.get(&id).cloned();
            Builder {
                encoder,
                agent_id: &agent_id,
                epoch,
                series_of: &lookup,
                cfg: &cfg,
            }
            .build(&rows, first_seq, &mut bytes_per_reading)
        };
        let outcome = built.map_err(BufferError::from).map(|built| Outcome {
            transitions,
            late_skipped,
            step,
            dead: released.dead_lettered,
            unsendable,
            duplicates: released.duplicates,
            late_flagged: released.late_flagged,
            alarm_records: n_alarm,
            built,
            bytes_per_reading,
            state_writes,
            state_log,
            log_seal,
        });
        Sealed {
            taken,
            now_ms,
            states,
            series,
            alarms,
            windows,
            outcome,
        }
    }
}

/// Splits off the readings the wire format would refuse a batch for: those of a series whose key or tags break its
/// limits, and string values over its limit. The sources check both before they buffer a reading, but a buffer
/// written by an earlier version may hold such readings (its Modbus configuration was not checked for them):
/// sealed, they would have the encoder refuse every seal that takes them, for good. They are dead-lettered
/// instead, and the rest sealed. (Returns the sendable readings, then the others.)
fn split_unsendable(
    pending: Vec<order::Pending>,
    series: &HashMap<i64, Series>,
) -> (Vec<order::Pending>, Vec<order::Pending>) {
    let refused: Vec<i64> = series
        .iter()
        .filter(|(_, s)| fieldlink_proto::check_series(&s.key, &s.tags).is_err())
        .map(|(id, _)| *id)
        .collect();
    let unsendable = |p: &order::Pending| {
        refused.contains(&p.series)
            || matches!(&p.value, Value::Str(s) if s.len() > fieldlink_proto::limits::MAX_STRING_BYTES)
    };
    if !pending.iter().any(unsendable) {
        return (pending, Vec::new());
    }
    let (unsendable, sendable): (Vec<_>, Vec<_>) = pending.into_iter().partition(unsendable);
    (sendable, unsendable)
}

/// Groups the rows by device: series ordered by (device key, measure); the sort is stable, so each series keeps
/// the time order `release` gave it.
fn device_order(mut rows: Vec<Row>, series: &HashMap<i64, Series>) -> Vec<Row> {
    let mut order_of: Vec<(String, String, i64)> = series
        .iter()
        .map(|(id, s)| (batch::device_key(s), s.measure().to_owned(), *id))
        .collect();
    order_of.sort_unstable(); // the ids make every key distinct: the stable sort's order
    let rank: HashMap<i64, usize> = order_of
        .iter()
        .enumerate()
        .map(|(i, (_, _, id))| (*id, i))
        .collect();
    // `release` gives each series' readings together: the runs of one series are sorted, not the readings (one
    // rank lookup per run; sorting every reading by its cached rank was 13 % of the seal). A stable sort of runs
    // of equal rank is the stable sort of their readings, whatever the input.
    let mut start = 0;
    let mut runs: Vec<(usize, std::ops::Range<usize>)> = rows
        .chunk_by(|a, b| a.series_id == b.series_id)
        .map(|run| {
            let r = rank.get(&run[0].series_id).copied();
            start += run.len();
            (r.unwrap_or(usize::MAX), start - run.len()..start)
        })
        .collect();
    runs.sort_by_key(|(r, _)| *r);
    if runs.is_sorted_by_key(|(_, run)| run.start) {
        return rows;
    }
    // Moved in place (not copied: a copy would hold every string value twice), by following the permutation's
    // cycles: `dest[i]` is where the row now at `i` goes.
    let mut dest = vec![0usize; rows.len()];
    for (to, from) in runs.into_iter().flat_map(|(_, run)| run).enumerate() {
        dest[from] = to;
    }
    for i in 0..rows.len() {
        while dest[i] != i {
            let j = dest[i];
            rows.swap(i, j);
            dest.swap(i, j);
        }
    }
    rows
}

/// What [`Buffer::seal_begin`] found.
#[derive(Debug)]
pub enum Begun {
    /// Ready groups, taken: run the job.
    Job(Box<SealJob>),
    /// Nothing was ready; the stale clock was checked for alarms (already committed).
    Idle(SealReport),
}

impl Buffer {
    /// Whether a [`SealJob`] is out (its engines are not in the buffer meanwhile).
    pub fn sealing(&self) -> bool {
        self.sealing
    }

    /// Takes the groups with `id <= up_to`, oldest first, whole groups while their readings fit in `max_rows` (at
    /// least one group, so a group larger than `max_rows` is taken alone), with what sealing them needs. With
    /// nothing ready, runs the alarm rules' stale clock instead (committed before it returns).
    pub fn seal_begin(
        &mut self,
        up_to: i64,
        max_rows: usize,
        cfg: &BatchConfig,
        rules: Rules,
        now_ms: i64,
    ) -> Result<Begun, BufferError> {
        assert!(!self.sealing, "one seal at a time");
        self.fresh_engines()?;
        // Room for what the seal takes (the ready groups' readings, at most `max_rows`; each group holds at least
        // one reading, so no more than `max_rows` groups are summed), not grown by doubling (a copy of every
        // reading per doubling).
        let ready: i64 = self
            .conn
            .prepare_cached(
                "SELECT COALESCE(SUM(readings), 0) FROM \
                 (SELECT readings FROM groups WHERE id <= ?1 ORDER BY id LIMIT ?2)",
            )?
            .query_row([up_to, max_rows as i64], |r| r.get(0))?;
        let mut pending = Vec::with_capacity(ready.clamp(0, max_rows as i64) as usize);
        let taken = self.take_groups(up_to, max_rows, &mut pending)?;
        // Silent series whose windows the clock closes (and orphaned windows) are sealed without any reading. Not
        // while ready groups wait for a later part of this seal (a backlog after a restart, a seal that fell behind):
        // their readings could still show a series alive.
        self.windows.forget_idle();
        if let Some(c) = self.intake_clock {
            self.windows.set_intake_clock(c);
        }
        let idle = match self.intake_clock {
            _ if taken.more => Vec::new(),
            _ if self.draining => self.windows.close_all(),
            Some(c) => self.windows.idle_due(c),
            None => Vec::new(),
        };
        if taken.rows == 0 && taken.ids_last == 0 && !self.windows.has_due() {
            return self.seal_alarm_tick(now_ms).map(Begun::Idle);
        }
        // Before the states are taken: an error from here on must put them back.
        let stale_clock = if self.alarms.is_empty() {
            0
        } else {
            self.stale_clock(taken.ids_last, now_ms)?
        };
        // Series states and series of every series involved.
        let mut states: HashMap<i64, SeriesState> = HashMap::new();
        let mut series: HashMap<i64, Series> = HashMap::new();
        if let Err(e) = self
            .take_involved(&pending, &mut states, &mut series)
            .and_then(|()| self.name_idle(&idle, &mut series))
        {
            // Back where they were: a state with deltas must stay held (see `Buffer::state`).
            self.states.extend(states);
            return Err(e);
        }
        self.sealing = true;
        Ok(Begun::Job(Box::new(SealJob {
            taken,
            pending,
            states,
            series,
            alarms: std::mem::take(&mut self.alarms),
            windows: std::mem::take(&mut self.windows),
            alarm_records: self.alarm_encoder.is_some(),
            stale_clock,
            rules,
            now_ms,
            next_seq: self.next_seq,
            log_seal: self.log_seal + 1,
            bytes_per_reading: self.bytes_per_reading,
            agent_id: self.agent_id.clone(),
            epoch: self.epoch,
            cfg: cfg.clone(),
        })))
    }

    /// The dedup states (taken out of the cache: they go back with a committed seal) and series of every series
    /// `pending` involves.
    fn take_involved(
        &mut self,
        pending: &[order::Pending],
        states: &mut HashMap<i64, SeriesState>,
        series: &mut HashMap<i64, Series>,
    ) -> Result<(), BufferError> {
        for p in pending {
            if let std::collections::hash_map::Entry::Vacant(slot) = states.entry(p.series) {
                slot.insert(self.state(p.series)?);
                let s = self
                    .series_by_id(p.series)?
                    .ok_or_else(|| BufferError::Incompatible {
                        path: "buffer".into(),
                        why: format!("reading refers to missing series {}", p.series),
                    })?;
                series.insert(p.series, s);
            }
        }
        Ok(())
    }

    /// The series of the silent pairs whose windows the clock closes in this seal (they name the derived
    /// readings); a series the buffer no longer knows is left out (its windows' readings are then left out too).
    fn name_idle(
        &mut self,
        idle: &[i64],
        series: &mut HashMap<i64, Series>,
    ) -> Result<(), BufferError> {
        for &sid in idle {
            if let std::collections::hash_map::Entry::Vacant(slot) = series.entry(sid) {
                if let Some(s) = self.series_by_id(sid)? {
                    slot.insert(s);
                }
            }
        }
        Ok(())
    }

    /// Whole groups with `id <= up_to`, oldest first, while they fit in `max_rows` (at least one), decoded into
    /// `pending`.
    fn take_groups(
        &mut self,
        up_to: i64,
        max_rows: usize,
        pending: &mut Vec<order::Pending>,
    ) -> Result<Taken, BufferError> {
        let mut t = Taken {
            ids_last: 0,
            rows: 0,
            bytes: 0,
            unreadable: 0,
            more: false,
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, readings, bytes, blob FROM groups WHERE id <= ?1 ORDER BY id",
        )?;
        let mut q = stmt.query([up_to])?;
        while let Some(r) = q.next()? {
            let n = r.get::<_, i64>(1)?.max(0) as u64;
            if t.rows > 0 && t.rows + n > max_rows as u64 {
                t.more = true;
                break;
            }
            t.ids_last = r.get(0)?;
            t.rows += n;
            t.bytes += r.get::<_, i64>(2)?.max(0) as u64;
            let before = pending.len();
            let blob = r.get_ref(3)?.as_blob()?;
            if group::decode(blob, pending).is_none() || (pending.len() - before) as u64 != n {
                // A group the agent did not write (the file was edited or damaged): never let it stall sealing.
                pending.truncate(before);
                t.unreadable += n;
                tracing::error!(
                    group = t.ids_last,
                    readings = n,
                    "unreadable buffer group skipped (its readings counted as dead-lettered)"
                );
            }
        }
        Ok(t)
    }

    /// Writes what a job sealed, in one transaction, and counts it; or, if the job failed or the transaction does,
    /// restores the engines from their committed states and leaves the groups for the next seal.
    pub fn seal_finish(&mut self, sealed: Sealed) -> Result<SealReport, BufferError> {
        let Sealed {
            taken,
            now_ms,
            states,
            series,
            alarms,
            windows,
            outcome,
        } = sealed;
        self.sealing = false;
        self.alarms = alarms;
        self.windows = windows;
        let records = outcome.and_then(|o| {
            // The readings records were numbered after this many alarm records: a different count would reuse
            // sequence numbers.
            match self.alarm_records(&o.transitions, &series, self.next_seq)? {
                v if v.0.len() as u64 == o.alarm_records => Ok((o, v)),
                _ => Err(BufferError::Incompatible {
                    path: "buffer".into(),
                    why: "alarm records miscounted".into(),
                }),
            }
        });
        let (o, (alarm_recs, alarm_events)) = match records {
            Ok(v) => v,
            Err(e) => {
                self.restore_engines()?;
                return Err(e);
            }
        };
        let alarm_dirty = self.alarms.take_dirty();
        let next_seq = self.next_seq + alarm_recs.len() as u64 + o.built.len() as u64;
        let log_seal = o.log_seal;
        debug_assert_eq!(log_seal, self.log_seal + 1, "one seal at a time");
        // Held states this seal did not involve whose deltas aged: stored whole.
        let swept: Vec<i64> = self
            .states
            .iter()
            .filter(|(_, st)| aged(st, log_seal))
            .map(|(sid, _)| *sid)
            .collect();
        let res = self.in_sealing_tx(|b| {
            b.write_alarms(&alarm_recs, &alarm_dirty, now_ms)?;
            b.write_windows(&o.step.dirty, &o.step.since)?;
            for x in &o.built {
                b.conn
                    .prepare_cached("INSERT INTO batches(seq, record, readings, sealed_ms) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![x.seq as i64, x.record, x.readings as i64, now_ms])?;
            }
            b.write_dead_letters(&o.dead, "late", &series, now_ms)?;
            b.write_dead_letters(&o.unsendable, "unsendable", &series, now_ms)?;
            if !o.state_log.is_empty() {
                b.conn
                    .prepare_cached("INSERT INTO state_log(seal, entries) VALUES (?1, ?2)")?
                    .execute(params![log_seal as i64, o.state_log])?;
            }
            for (sid, write) in &o.state_writes {
                if let (StateWrite::Whole, Some(st)) = (write, states.get(sid)) {
                    write_whole(&b.conn, *sid, st, log_seal)?;
                }
            }
            for sid in &swept {
                if let Some(st) = b.states.get(sid) {
                    write_whole(&b.conn, *sid, st, log_seal)?;
                }
            }
            b.conn
                .prepare_cached("DELETE FROM state_log WHERE seal <= ?1")?
                .execute([log_seal.saturating_sub(STATE_LOG_SEALS) as i64])?;
            b.conn.prepare_cached("DELETE FROM groups WHERE id <= ?1")?.execute([taken.ids_last])?;
            b.conn.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_seq'")?.execute([next_seq as i64])?;
            b.mark_window_since(next_seq)?;
            Ok(())
        });
        if let Err(e) = res {
            self.restore_engines()?;
            return Err(e);
        }
        self.windows.committed();
        let n_alarm_events = alarm_events.len() as u64;
        self.alarms_committed(alarm_recs.len(), alarm_events, o.late_skipped);
        let mut states = states;
        for (sid, write) in &o.state_writes {
            if let Some(st) = states.get_mut(sid) {
                write.stored(st, log_seal);
            }
        }
        for sid in &swept {
            if let Some(st) = self.states.get_mut(sid) {
                StateWrite::Whole.stored(st, log_seal);
            }
        }
        if self.states.len() + states.len() > super::SERIES_CACHE_MAX {
            // Only states without deltas go (loading one reads its whole row only): those with deltas are the
            // series of the last STATE_LOG_SEALS seals, and aging stores them whole in turn.
            self.states.retain(|_, st| st.logged_since != 0);
        }
        self.states.extend(states);
        self.log_seal = log_seal;
        self.bytes_per_reading = o.bytes_per_reading;
        self.next_seq = next_seq;
        let (sealed_readings, sealed_bytes) = o.built.iter().fold((0u64, 0u64), |(n, b), x| {
            (n + x.readings as u64, b + x.record.len() as u64)
        });
        let batches = o.built.len() as u64;
        self.stats.unsealed_readings = self.stats.unsealed_readings.saturating_sub(taken.rows);
        self.stats.unsealed_bytes = self.stats.unsealed_bytes.saturating_sub(taken.bytes);
        self.stats.pending_batches += batches;
        self.stats.pending_readings += sealed_readings;
        self.stats.pending_bytes += sealed_bytes;
        self.ledger.deduplicated += o.duplicates;
        self.ledger.late_flagged += o.late_flagged;
        self.ledger.window_withheld += o.step.withheld;
        self.ledger.window_derived += o.step.derived_readings;
        self.ledger.dead_lettered +=
            o.dead.len() as u64 + o.unsendable.len() as u64 + taken.unreadable;
        if let Some(first) = o.unsendable.first() {
            tracing::error!(
                readings = o.unsendable.len(),
                series = series.get(&first.series).map_or("?", |s| s.key.as_str()),
                "readings the wire format refuses (a series key or tag over its limits, or an overlong string) dead-lettered instead of sealed"
            );
        }
        self.ledger.batches_sealed += batches;
        self.ledger.bytes_sealed += sealed_bytes;
        Ok(SealReport {
            rows: taken.rows,
            batches,
            readings: sealed_readings,
            alarm_events: n_alarm_events,
        })
    }

    /// Inside a seal's transaction: readings withheld for `reason` (`late`: by the dead-letter policy;
    /// `unsendable`: refused by the wire format). The table keeps the newest [`MAX_DEAD_LETTERS`].
    fn write_dead_letters(
        &mut self,
        dead: &[order::Pending],
        reason: &str,
        series: &HashMap<i64, Series>,
        now_ms: i64,
    ) -> Result<(), BufferError> {
        for p in dead {
            let key = series
                .get(&p.series)
                .map(|s| s.key.clone())
                .unwrap_or_default();
            let mut stmt = self.conn.prepare_cached("INSERT INTO dead_letters(at_ms, reason, series, ts_ms, value) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            match &p.value {
                Value::F64(v) => stmt.execute(params![now_ms, reason, key, p.ts_ms, v])?,
                Value::I64(v) => stmt.execute(params![now_ms, reason, key, p.ts_ms, v])?,
                Value::Bool(v) => {
                    stmt.execute(params![now_ms, reason, key, p.ts_ms, i64::from(*v)])?
                }
                Value::Str(v) => stmt.execute(params![now_ms, reason, key, p.ts_ms, v])?,
            };
        }
        if !dead.is_empty() {
            self.conn.execute(
                "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?1",
                [MAX_DEAD_LETTERS],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldlink_proto::{Quality, Reading, Value};
    use proptest::prelude::*;

    proptest! {
        /// The same as a stable sort of the readings by their series' (device, measure), for any input (runs of
        /// one series split or not, series the map does not know).
        #[test]
        fn device_order_is_the_stable_sort_by_device_and_measure(ids in prop::collection::vec(0i64..6, 0..60)) {
            let names = ["b/x", "a/y", "b/a", "a/x", "c/z"];
            let series: HashMap<i64, Series> =
                names.iter().enumerate().map(|(i, k)| (i as i64, Series::new(*k))).collect();
            let rows: Vec<Row> = ids
                .iter()
                .enumerate()
                .map(|(n, &series_id)| Row {
                    series_id,
                    reading: Reading { series: 0, ts_ms: n as i64, value: Value::I64(0), quality: Quality::Good, late: false },
                })
                .collect();
            let key = |r: &Row| series.get(&r.series_id).map(|s| (batch::device_key(s), s.measure().to_owned()));
            let mut want = rows.clone();
            // Unknown series last, as the rank gives them.
            want.sort_by_key(|r| (key(r).is_none(), key(r)));
            prop_assert_eq!(device_order(rows, &series), want);
        }
    }
}

//! The buffer's side of windowed aggregates ([`crate::window`]): the `window_state` table and the step of a seal
//! that feeds the released readings to the engine.
//!
//! ```sql
//! window_state(rule TEXT, series_id INTEGER, state BLOB, PRIMARY KEY(rule, series_id))  -- window::PairState
//! window_rule(name TEXT PRIMARY KEY, functions TEXT)  -- function names, comma-separated
//! window_since(rule TEXT, series_id INTEGER, size INTEGER, func TEXT, since INTEGER,
//!              PRIMARY KEY(rule, series_id, size, func))
//!     -- per size and function the lowest window end a pair emitted; func '' marks a pair whose history is known
//! ```
//! The tables were added without a schema version change: an older agent ignores them (and computes no windows).
//! A seal writes the changed pair states in its transaction, beside the records that hold the closed windows'
//! readings and the deletion of the readings that fed them; a failed commit reloads the engine from the table.
//! The first seal that writes states after a load also writes every configured rule's functions in its
//! transaction, so the functions of any committed open window are known: a rule removed, or a size taken out of
//! one, between two runs has its open windows closed with them at the next seal ([`Engine::load_state`]) rather
//! than held for good (under `keep_raw = false`, their readings were deleted unsent).

use super::{Buffer, BufferError};
use crate::batch::Row;
use crate::order;
use crate::window::{Emitted, Engine, Func, Loaded, Obs, RawFate, SizeFunc};
use fieldlink_proto::{Quality, Reading, Series};
use foldhash::{HashMap, HashMapExt};
use rusqlite::{params, OptionalExtension};

/// What the windows made of one seal's released readings.
#[derive(Debug, Default)]
pub(super) struct WindowStep {
    /// The rows to encode: the raw readings that are sent (late flag as released or set by a window rule), then
    /// the derived readings (buffer series ids below 0, named in `derived`).
    pub rows: Vec<Row>,
    /// Derived series by their (negative, seal-local) id.
    pub derived: HashMap<i64, Series>,
    /// Raw readings withheld (`keep_raw = false`).
    pub withheld: u64,
    /// Derived readings among `rows`.
    pub derived_readings: u64,
    /// Changed pair states: `(rule, series id, bytes)`.
    pub dirty: Vec<(String, i64, Vec<u8>)>,
    /// Changed lowest emitted window ends: `(rule, series id, (size, function), since)` ([`Engine::take_since`]).
    pub since: Vec<(String, i64, Option<SizeFunc>, i64)>,
}

impl Buffer {
    /// Computes `engine`'s windows from now on, from the states the buffer kept.
    pub fn enable_windows(&mut self, engine: Engine) -> Result<(), BufferError> {
        self.windows = engine;
        self.reload_windows()
    }

    /// The intake clock for the next seals, ms (see [`crate::window::Engine::set_intake_clock`]): the buffer
    /// thread's monotonic clock, standing still while the agent takes no readings. Until it is set, window rules
    /// close no window of a silent series.
    pub fn set_intake_clock(&mut self, ms: i64) {
        self.intake_clock = Some(ms);
    }

    /// `fieldlink-agent drain` (no source runs): from now on the last part of every seal closes every open window,
    /// with the readings it holds, even with no reading ready (see [`crate::window::Engine::close_all`]), and no
    /// seal raises a stale alarm (silence says nothing of the devices).
    pub fn close_all_windows(&mut self) {
        self.draining = true;
    }

    /// The window engine (rules, states, counts).
    pub fn windows(&self) -> &Engine {
        &self.windows
    }

    /// Replaces the engine's states with the committed ones.
    pub(super) fn reload_windows(&mut self) -> Result<(), BufferError> {
        self.windows.reset();
        self.window_rules_written = false;
        #[cfg(test)]
        if self.reload_faults > 0 {
            self.reload_faults -= 1;
            return Err(BufferError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some("injected reload failure".into()),
            )));
        }
        let mut stmt = self
            .conn
            .prepare("SELECT name, functions FROM window_rule")?;
        let mut q = stmt.query([])?;
        let mut known = std::collections::HashSet::new();
        while let Some(r) = q.next()? {
            let (name, functions): (String, String) = (r.get(0)?, r.get(1)?);
            known.insert(name.clone());
            // Names this version does not know leave the rule's functions unknown.
            if let Some(funcs) = functions.split(',').map(Func::from_name).collect() {
                self.windows.remember_functions(&name, funcs);
            }
        }
        drop(q);
        drop(stmt);
        // `window_since` is kept by this version only: trusted if no other sealed since this version's last seal
        // (an older agent rewrites the states without it). `next_seq` is the committed one here.
        let since_seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'window_since_seq'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if since_seq == Some(self.next_seq as i64) {
            self.load_window_since()?;
        }
        let mut stmt = self.conn.prepare(
            "SELECT w.rule, w.series_id, w.state, s.key, s.tags FROM window_state w \
             LEFT JOIN series s ON s.id = w.series_id",
        )?;
        let mut q = stmt.query([])?;
        let (mut no_rule, mut unreadable, mut orphans) = (0u64, 0u64, 0u64);
        while let Some(r) = q.next()? {
            let rule: String = r.get(0)?;
            let state: Vec<u8> = r.get(2)?;
            let (key, tags): (Option<String>, Option<String>) = (r.get(3)?, r.get(4)?);
            let series = key.map(|key| super::series_of_row(key, tags.as_deref().unwrap_or("[]")));
            match self
                .windows
                .load_state(&rule, r.get(1)?, series.as_ref(), &state)
            {
                Loaded::Yes | Loaded::Closed => {}
                Loaded::Orphan => orphans += 1,
                Loaded::NoRule => no_rule += 1,
                Loaded::Unreadable => unreadable += 1,
            }
        }
        self.windows.loaded();
        self.windows_unloaded = no_rule + unreadable;
        // The functions of a configured rule the table does not know yet (a first start, or the first after an
        // upgrade), now: a run that commits no state would leave them unknown should the rule be removed next.
        // The seals write them all again (a rule whose functions changed); failing here changes nothing else.
        // Only those the table lacks: an insert takes the write lock, which another process may hold (a reload
        // after a seal that failed on it must not wait for it again).
        for rule in self
            .windows
            .rules()
            .iter()
            .filter(|r| !known.contains(&r.name))
        {
            if let Err(e) = self.conn.execute(
                "INSERT OR IGNORE INTO window_rule(name, functions) VALUES (?1, ?2)",
                params![rule.name, functions_text(rule)],
            ) {
                tracing::debug!(error = %e, "window rules' functions not written at load");
                break;
            }
        }
        if no_rule + unreadable + orphans > 0 {
            tracing::warn!(
                no_rule,
                unreadable,
                orphans,
                "window states: open windows no configured rule computes on any more (a rule removed, narrowed, or \
                 without their size) are closed by the next seal, or handed to the rule that now writes their \
                 series; those of removed rules whose functions are unknown wait in the buffer for the rule; \
                 unreadable ones are left as they are"
            );
        }
        Ok(())
    }

    /// The rows of `window_since`, into the engine.
    fn load_window_since(&mut self) -> Result<(), BufferError> {
        let mut stmt = self
            .conn
            .prepare("SELECT rule, series_id, size, func, since FROM window_since")?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            let (rule, func): (String, String) = (r.get(0)?, r.get(3)?);
            match Func::from_name(&func) {
                Some(f) => {
                    self.windows
                        .remember_since(&rule, r.get(1)?, Some((r.get(2)?, f)), r.get(4)?)
                }
                None if func.is_empty() => self.windows.remember_since(&rule, r.get(1)?, None, 0),
                // A function this version does not know: the row is skipped (only known functions are looked up).
                None => {}
            }
        }
        Ok(())
    }

    /// Inside a transaction that moved `next_seq` to `next_seq`: notes that `window_since` is current as of it
    /// (see [`Buffer::reload_windows`]).
    pub(super) fn mark_window_since(&mut self, next_seq: u64) -> Result<(), BufferError> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('window_since_seq', ?1)",
            )?
            .execute([next_seq as i64])?;
        Ok(())
    }

    /// Inside a seal's transaction: the engine's changed pair states.
    pub(super) fn write_windows(
        &mut self,
        dirty: &[(String, i64, Vec<u8>)],
        since: &[(String, i64, Option<SizeFunc>, i64)],
    ) -> Result<(), BufferError> {
        for (rule, sid, key, lo) in since {
            let (size, func) = key.map_or((0, ""), |(z, f)| (z, f.name()));
            self.conn
                .prepare_cached(
                    "INSERT INTO window_since(rule, series_id, size, func, since) VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT(rule, series_id, size, func) DO UPDATE SET since = min(since, excluded.since)",
                )?
                .execute(params![rule, sid, size, func, lo])?;
        }
        if !dirty.is_empty() && !self.window_rules_written {
            for rule in self.windows.rules() {
                self.conn
                    .prepare_cached(
                        "INSERT OR REPLACE INTO window_rule(name, functions) VALUES (?1, ?2)",
                    )?
                    .execute(params![rule.name, functions_text(rule)])?;
            }
            self.window_rules_written = true;
        }
        for (rule, sid, state) in dirty {
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO window_state(rule, series_id, state) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![rule, sid, state])?;
        }
        Ok(())
    }
}

/// A rule's functions as `window_rule` keeps them: names, comma-separated (read back with [`Func::from_name`]).
fn functions_text(rule: &crate::window::Rule) -> String {
    let names: Vec<&str> = rule.functions().iter().map(|f| f.name()).collect();
    names.join(",")
}

const _: () = assert!(
    std::mem::size_of::<Row>() == std::mem::size_of::<order::Out>()
        && std::mem::align_of::<Row>() == std::mem::align_of::<order::Out>(),
    "`window_step` turns released readings into rows in place only while both have one layout"
);

/// Feeds the released readings (each series in event-time order) to the windows at the seal's wall-clock time
/// `now_ms` and turns the result into rows: raw readings per their fate, then the closed windows' readings.
/// Without rules, every reading is a row as released.
pub(super) fn window_step(
    windows: &mut Engine,
    released: Vec<order::Out>,
    series: &HashMap<i64, Series>,
    now_ms: i64,
) -> WindowStep {
    // The released late flag, or set by a window rule.
    let row = |o: order::Out, flag: bool| Row {
        series_id: o.series,
        reading: Reading {
            series: 0,
            ts_ms: o.ts_ms,
            value: o.value,
            quality: o.quality,
            late: o.late || flag,
        },
    };
    if windows.is_empty() {
        // In place: a row has a released reading's layout (checked above), so the rows take its allocation.
        return WindowStep {
            rows: released.into_iter().map(|o| row(o, false)).collect(),
            ..WindowStep::default()
        };
    }
    windows.set_clock(now_ms);
    let mut step = WindowStep::default();
    let mut emitted: Vec<Emitted> = Vec::new();
    // Pairs whose series a rule no longer matches: their windows close now, named after the series they had.
    let orphans = windows.close_orphans(&mut emitted);
    let orphan_series: HashMap<i64, Series> = orphans.into_iter().collect();
    for o in released {
        let fate = match series.get(&o.series) {
            Some(s) => windows.observe(
                o.series,
                s,
                Obs {
                    ts_ms: o.ts_ms,
                    value: &o.value,
                    quality: o.quality,
                },
                &mut emitted,
            ),
            None => RawFate::Send,
        };
        match fate {
            RawFate::Send => step.rows.push(row(o, false)),
            RawFate::SendLate => step.rows.push(row(o, true)),
            RawFate::Withhold => step.withheld += 1,
        }
    }
    // After the released readings: a pair with one among them is not silent any more.
    windows.close_idle(&mut emitted);
    let mut ids: HashMap<Series, i64> = HashMap::new();
    let mut unnamed = 0u64;
    for e in emitted {
        let Some(source) = series
            .get(&e.series_id)
            .or_else(|| orphan_series.get(&e.series_id))
        else {
            // A silent pair whose series the buffer no longer knows (an edited or damaged file): no name to send
            // its windows under.
            unnamed += 1;
            continue;
        };
        let s = windows.derived_series(&e, source);
        if let Err(err) = fieldlink_proto::check_series(&s.key, &s.tags) {
            // Only an orphan's window can get here (a rule's functions or sizes changed since it matched a long
            // key): one unsendable reading must not fail every seal.
            tracing::warn!(series = %source.key, error = %err, "a window's reading cannot be sent; left out");
            continue;
        }
        let next = -(ids.len() as i64) - 1;
        let id = *ids.entry(s.clone()).or_insert(next);
        step.derived.entry(id).or_insert(s);
        step.derived_readings += 1;
        step.rows.push(Row {
            series_id: id,
            reading: Reading {
                series: 0,
                ts_ms: e.start_ms,
                value: e.value,
                quality: Quality::Good,
                late: false,
            },
        });
    }
    if unnamed > 0 {
        tracing::warn!(
            readings = unnamed,
            "closed windows of a series the buffer no longer knows are left out"
        );
    }
    step.dirty = windows.take_dirty();
    step.since = windows.take_since();
    step
}

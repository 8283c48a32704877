//! The on-disk buffer: SQLite in WAL mode between the sources and Kinesis.
//!
//! # Life of a reading
//! 1. **Appended**: a source's readings are inserted into `readings` inside a transaction that groups many source
//!    messages (group commit). Only after `COMMIT` returns are the sources' acknowledgements (MQTT PUBACKs) sent.
//! 2. **Sealed**: the oldest unsealed rows (a prefix by `id`) are encoded into one wire-format record, which is
//!    inserted into `batches` under the next sequence number, and the rows are deleted, in one transaction. From
//!    then on the record's bytes never change: a resend after a crash sends the same bytes under the same number.
//! 3. **Acknowledged**: once Kinesis has accepted the record, its row in `batches` is deleted. Nothing is deleted
//!    earlier: a reading is always in exactly one of `readings` or `batches` until Kinesis has it.
//!
//! # Schema (version 1, in `meta.schema_version`)
//! ```sql
//! meta(key TEXT PRIMARY KEY, value)                 -- schema_version, next_seq, agent_id
//! series(id INTEGER PRIMARY KEY, key TEXT, tags TEXT, UNIQUE(key, tags))   -- tags: JSON [[name, value], ...]
//! readings(id INTEGER PRIMARY KEY, series_id INTEGER, ts_ms INTEGER, kind INTEGER, value ANY)
//! batches(seq INTEGER PRIMARY KEY, record BLOB, readings INTEGER, sealed_ms INTEGER)
//! ```
//! `kind` is the wire format's kind byte (value type, quality, late flag) plus, in bit 7 (reserved on the wire),
//! an end-of-message mark on the last reading of each source message; `value` holds a REAL, INTEGER (i64 and
//! bool) or TEXT.
//!
//! Sealing cuts only at end-of-message marks, so the readings of one message (e.g. six IMU axes at one
//! timestamp) always travel in one batch and land as one Timestream multi-measure record. Only a message with
//! more readings than `max_readings`, or a batch halved to fit 1 MiB, is split.
//!
//! # Invariants
//! - `meta.next_seq` is greater than every `batches.seq` ever written; sequence numbers are never reused, even
//!   after the rows are acknowledged and deleted.
//! - Every row of `readings` has a committed source acknowledgement pending or sent; no acknowledgement is sent for
//!   a row that is not committed.
//! - Memory does not grow with the backlog: sealing reads at most `max_readings` rows and [`Buffer::pending`]
//!   reads a bounded number of records.
//! - The database is never deleted or recreated by the agent. A file that is not a fieldlink buffer (or of a newer
//!   schema) is refused with an error naming it.

mod actor;
mod config;

pub use actor::{spawn, AckFn, BufferHandle, Pending};
pub use config::{BufferConfig, Durability};

use crate::batch::{self, Row};
use fieldlink_proto::{EncodeError, Encoder, Quality, Reading, Series, Value};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::Path;

/// Buffer-only bit of `readings.kind`: the last reading of a source message.
const END_OF_MESSAGE: u8 = 0x80;
/// Current schema version.
const SCHEMA_VERSION: i64 = 1;
/// Series cached in memory before the cache is dropped and refilled from the table.
const SERIES_CACHE_MAX: usize = 100_000;

/// What went wrong in the buffer. `Sqlite` and `Io` are usually disk problems (full, read-only, corrupt):
/// the caller logs, counts and retries later; `Incompatible` needs an operator.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// SQLite reported an error.
    #[error("buffer database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file exists but is not a buffer this agent can use.
    #[error("{path} is not a usable fieldlink buffer: {why}")]
    Incompatible {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// A stored value has the wrong type for its kind (the file was modified outside the agent).
    #[error("buffer row has an unexpected value: {0}")]
    Row(#[from] rusqlite::types::FromSqlError),
    /// A stored row cannot be turned into a record.
    #[error("cannot encode buffered readings: {0}")]
    Encode(#[from] EncodeError),
}

/// A reading as a source hands it to the buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReading {
    /// Its series.
    pub series: Series,
    /// Event time, Unix ms.
    pub ts_ms: i64,
    /// Value.
    pub value: Value,
    /// Quality.
    pub quality: Quality,
}

/// Counts the buffer knows from its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Readings appended but not yet sealed.
    pub unsealed_readings: u64,
    /// Sealed records not yet acknowledged by Kinesis.
    pub pending_batches: u64,
    /// Readings inside those records.
    pub pending_readings: u64,
    /// Bytes of those records.
    pub pending_bytes: u64,
}

/// A sealed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Its sequence number.
    pub seq: u64,
    /// How many readings it holds.
    pub readings: usize,
    /// Record size in bytes.
    pub bytes: usize,
}

/// The buffer's synchronous core. All methods run on the caller's thread; see [`spawn`] for the async shell.
#[derive(Debug)]
pub struct Buffer {
    conn: Connection,
    agent_id: String,
    next_seq: u64,
    series_ids: HashMap<Series, i64>,
    series_by_id: HashMap<i64, Series>,
    stats: Stats,
}

fn tags_json(tags: &[(String, String)]) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "[]".into())
}

fn kind_byte(value: &Value, quality: Quality, late: bool) -> u8 {
    let t = match value {
        Value::F64(_) => 0,
        Value::I64(_) => 1,
        Value::Bool(_) => 2,
        Value::Str(_) => 3,
    };
    t | ((quality as u8) << 4) | if late { 0x40 } else { 0 }
}

impl Buffer {
    /// Opens (or creates) the buffer at `path`.
    pub fn open(path: &Path, durability: Durability, agent_id: &str) -> Result<Self, BufferError> {
        let conn = Connection::open(path)?;
        let incompatible = |why: String| BufferError::Incompatible {
            path: path.display().to_string(),
            why,
        };
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| incompatible(format!("cannot enable WAL: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(incompatible(format!(
                "journal mode is {mode}, WAL required"
            )));
        }
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA synchronous={sync}; PRAGMA foreign_keys=OFF; PRAGMA busy_timeout=5000;"
        ))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value ANY NOT NULL);
             CREATE TABLE IF NOT EXISTS series(id INTEGER PRIMARY KEY, key TEXT NOT NULL, tags TEXT NOT NULL, UNIQUE(key, tags));
             CREATE TABLE IF NOT EXISTS readings(id INTEGER PRIMARY KEY, series_id INTEGER NOT NULL, ts_ms INTEGER NOT NULL, kind INTEGER NOT NULL, value ANY);
             CREATE TABLE IF NOT EXISTS batches(seq INTEGER PRIMARY KEY, record BLOB NOT NULL, readings INTEGER NOT NULL, sealed_ms INTEGER NOT NULL);",
        )
        .map_err(|e| incompatible(e.to_string()))?;
        let get = |k: &str| -> rusqlite::Result<Option<rusqlite::types::Value>> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))
                .optional()
        };
        match get("schema_version")? {
            None => {
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?1), ('next_seq', 1)",
                    [SCHEMA_VERSION],
                )?;
            }
            Some(rusqlite::types::Value::Integer(SCHEMA_VERSION)) => {}
            Some(v) => {
                return Err(incompatible(format!(
                    "schema version {v:?}, this agent knows {SCHEMA_VERSION}"
                )))
            }
        }
        match get("agent_id")? {
            Some(rusqlite::types::Value::Text(old)) if old != agent_id => {
                tracing::warn!(old = %old, new = %agent_id, "agent_id changed; batches sealed before keep the old id");
                conn.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'agent_id'",
                    [agent_id],
                )?;
            }
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('agent_id', ?1)",
                    [agent_id],
                )?;
            }
        }
        let next_seq: i64 =
            conn.query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })?;
        let mut b = Self {
            conn,
            agent_id: agent_id.to_owned(),
            next_seq: next_seq as u64,
            series_ids: HashMap::new(),
            series_by_id: HashMap::new(),
            stats: Stats::default(),
        };
        b.refresh_stats()?;
        Ok(b)
    }

    fn refresh_stats(&mut self) -> Result<(), BufferError> {
        let unsealed: i64 = self
            .conn
            .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))?;
        let (batches, readings, bytes): (i64, i64, i64) = self.conn.query_row(
            "SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(length(record)), 0) FROM batches",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        self.stats = Stats {
            unsealed_readings: unsealed as u64,
            pending_batches: batches as u64,
            pending_readings: readings as u64,
            pending_bytes: bytes as u64,
        };
        Ok(())
    }

    /// Runs `f` inside `BEGIN IMMEDIATE … COMMIT`, rolling back if it fails.
    fn in_tx<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, BufferError>,
    ) -> Result<T, BufferError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => match self.conn.execute_batch("COMMIT") {
                Ok(()) => Ok(v),
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    Err(e.into())
                }
            },
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Counts of what the buffer holds.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The sequence number the next sealed batch gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn series_id(&mut self, s: &Series) -> Result<i64, BufferError> {
        if let Some(&id) = self.series_ids.get(s) {
            return Ok(id);
        }
        if self.series_ids.len() >= SERIES_CACHE_MAX {
            self.series_ids.clear();
            self.series_by_id.clear();
        }
        let tags = tags_json(&s.tags);
        let id: i64 = match self
            .conn
            .prepare_cached("SELECT id FROM series WHERE key = ?1 AND tags = ?2")?
            .query_row(params![s.key, tags], |r| r.get(0))
            .optional()?
        {
            Some(id) => id,
            None => {
                self.conn
                    .prepare_cached("INSERT INTO series(key, tags) VALUES (?1, ?2)")?
                    .execute(params![s.key, tags])?;
                self.conn.last_insert_rowid()
            }
        };
        self.series_ids.insert(s.clone(), id);
        self.series_by_id.insert(id, s.clone());
        Ok(id)
    }

    fn series_by_id(&mut self, id: i64) -> Result<Option<Series>, BufferError> {
        if let Some(s) = self.series_by_id.get(&id) {
            return Ok(Some(s.clone()));
        }
        let row: Option<(String, String)> = self
            .conn
            .prepare_cached("SELECT key, tags FROM series WHERE id = ?1")?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(row.map(|(key, tags)| {
            let s = Series {
                key,
                tags: serde_json::from_str(&tags).unwrap_or_default(),
            };
            self.series_by_id.insert(id, s.clone());
            s
        }))
    }

    /// Appends groups of readings in one transaction. When this returns `Ok`, they are committed with the
    /// configured durability and the caller may acknowledge them.
    pub fn append<'a>(
        &mut self,
        groups: impl IntoIterator<Item = &'a [NewReading]>,
    ) -> Result<u64, BufferError> {
        let n = self.in_tx(|b| {
            let mut n = 0u64;
            for group in groups {
                for (i, r) in group.iter().enumerate() {
                    let sid = b.series_id(&r.series)?;
                    let end = if i + 1 == group.len() { END_OF_MESSAGE } else { 0 };
                    let kind = kind_byte(&r.value, r.quality, false) | end;
                    let mut stmt = b.conn.prepare_cached("INSERT INTO readings(series_id, ts_ms, kind, value) VALUES (?1, ?2, ?3, ?4)")?;
                    match &r.value {
                        Value::F64(v) => stmt.execute(params![sid, r.ts_ms, kind, v])?,
                        Value::I64(v) => stmt.execute(params![sid, r.ts_ms, kind, v])?,
                        Value::Bool(v) => stmt.execute(params![sid, r.ts_ms, kind, i64::from(*v)])?,
                        Value::Str(v) => stmt.execute(params![sid, r.ts_ms, kind, v])?,
                    };
                    n += 1;
                }
            }
            Ok(n)
        });
        if n.is_err() {
            // Series inserted in the rolled-back transaction must not stay cached.
            self.series_ids.clear();
            self.series_by_id.clear();
        }
        let n = n?;
        self.stats.unsealed_readings += n;
        Ok(n)
    }

    /// Seals up to `max_readings` of the oldest unsealed readings into one record of at most `max_bytes`.
    /// Returns `None` if nothing waits.
    pub fn seal(
        &mut self,
        encoder: &mut Encoder,
        max_readings: usize,
        max_bytes: usize,
        now_ms: i64,
    ) -> Result<Option<Sealed>, BufferError> {
        let mut rows: Vec<(i64, Row)> = Vec::new();
        let mut ends: Vec<bool> = Vec::new();
        {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, series_id, ts_ms, kind, value FROM readings ORDER BY id LIMIT ?1",
            )?;
            let mut q = stmt.query([max_readings as i64])?;
            while let Some(r) = q.next()? {
                let stored: u8 = r.get(3)?;
                ends.push(stored & END_OF_MESSAGE != 0);
                let kind = stored & !END_OF_MESSAGE;
                let value = match (kind & 0x07, r.get_ref(4)?) {
                    (0, v) => Value::F64(v.as_f64().or_else(|_| v.as_i64().map(|i| i as f64))?),
                    (1, v) => Value::I64(v.as_i64()?),
                    (2, v) => Value::Bool(v.as_i64()? != 0),
                    (_, v) => Value::Str(v.as_str()?.to_owned()),
                };
                let quality = match (kind >> 4) & 0b11 {
                    1 => Quality::Uncertain,
                    2 => Quality::Bad,
                    _ => Quality::Good,
                };
                let reading = Reading {
                    series: 0,
                    ts_ms: r.get(2)?,
                    value,
                    quality,
                    late: kind & 0x40 != 0,
                };
                rows.push((
                    r.get(0)?,
                    Row {
                        series_id: r.get(1)?,
                        reading,
                    },
                ));
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        // Cut after the last complete message, unless even one message is longer than the limit.
        if rows.len() == max_readings {
            if let Some(end) = ends.iter().rposition(|&e| e) {
                rows.truncate(end + 1);
            }
        }
        // Resolve every series first (needs &mut self), then encode with a plain lookup.
        let mut known = HashMap::new();
        for (_, row) in &rows {
            if let std::collections::hash_map::Entry::Vacant(slot) = known.entry(row.series_id) {
                let s =
                    self.series_by_id(row.series_id)?
                        .ok_or_else(|| BufferError::Incompatible {
                            path: "buffer".into(),
                            why: format!("reading refers to missing series {}", row.series_id),
                        })?;
                slot.insert(s);
            }
        }
        let plain: Vec<Row> = rows.iter().map(|(_, r)| r.clone()).collect();
        let seq = self.next_seq;
        let (n, record) = batch::fit(encoder, &self.agent_id, seq, &plain, max_bytes, &|id| {
            known.get(&id).cloned()
        })?;
        let last_id = rows[n - 1].0;
        self.in_tx(|b| {
            b.conn
                .prepare_cached(
                    "INSERT INTO batches(seq, record, readings, sealed_ms) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![seq as i64, record, n as i64, now_ms])?;
            b.conn
                .prepare_cached("DELETE FROM readings WHERE id <= ?1")?
                .execute([last_id])?;
            b.conn
                .prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_seq'")?
                .execute([(seq + 1) as i64])?;
            Ok(())
        })?;
        self.next_seq = seq + 1;
        self.stats.unsealed_readings = self.stats.unsealed_readings.saturating_sub(n as u64);
        self.stats.pending_batches += 1;
        self.stats.pending_readings += n as u64;
        self.stats.pending_bytes += record.len() as u64;
        Ok(Some(Sealed {
            seq,
            readings: n,
            bytes: record.len(),
        }))
    }

    /// Sealed records with `seq > after`, oldest first: at most `max_records` and at most `max_bytes` in total
    /// (always at least one if any is pending).
    pub fn pending(
        &mut self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Pending>, BufferError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, record, readings FROM batches WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut q = stmt.query(params![after as i64, max_records as i64])?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(r) = q.next()? {
            let record: Vec<u8> = r.get(1)?;
            if !out.is_empty() && bytes + record.len() > max_bytes {
                break;
            }
            bytes += record.len();
            out.push(Pending {
                seq: r.get::<_, i64>(0)? as u64,
                readings: r.get::<_, i64>(2)? as u64,
                record,
            });
        }
        Ok(out)
    }

    /// Deletes acknowledged records. Unknown sequence numbers (already deleted) are ignored.
    pub fn ack(&mut self, seqs: &[u64]) -> Result<(), BufferError> {
        let gone = self.in_tx(|b| {
            let mut gone = Stats::default();
            for &s in seqs {
                let row: Option<(i64, i64)> = b
                    .conn
                    .prepare_cached(
                        "DELETE FROM batches WHERE seq = ?1 RETURNING readings, length(record)",
                    )?
                    .query_row([s as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                if let Some((readings, bytes)) = row {
                    gone.pending_batches += 1;
                    gone.pending_readings += readings as u64;
                    gone.pending_bytes += bytes as u64;
                }
            }
            Ok(gone)
        })?;
        self.stats.pending_batches -= gone.pending_batches;
        self.stats.pending_readings -= gone.pending_readings;
        self.stats.pending_bytes -= gone.pending_bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

//! The on-disk buffer: SQLite in WAL mode between the sources and Kinesis.
//!
//! # Life of a reading
//! 1. **Appended**: the thread takes many source messages as one group commit; their readings are encoded into
//!    one blob ([`group`]: series id, time delta, kind, value) and inserted as **one row of `groups`** (a commit of
//!    more than [`MAX_GROUP_READINGS`] readings as several rows, in the same transaction). Only after `COMMIT`
//!    returns are the sources' acknowledgements (MQTT PUBACKs) sent. Series are interned in `series` once; the
//!    thread caches their ids.
//! 2. **Released and sealed**: once a group has waited the reorder window since its commit, a seal takes the ready
//!    groups (a prefix by `id`, whole groups only), releases their readings through [`crate::order`] (per-series
//!    event-time order, duplicates dropped, late readings flagged or dead-lettered) and cuts them into wire-format
//!    records between devices ([`crate::batch`]). In **one transaction** the records are inserted into `batches`
//!    under consecutive sequence numbers, the series' dedup state is updated, dead letters are stored and the
//!    groups are deleted.
//!
//!    Whole groups keep the ordering guarantee: every reading of a group was committed in the same transaction,
//!    so all of them have waited the reorder window exactly when the group has; readiness was always decided per
//!    commit (the thread's ready id is a commit's newest id), so a seal still releases exactly the readings
//!    committed at least a reorder window ago, as a prefix of the arrival order. The order within a series comes
//!    from [`crate::order`] sorting by event time, not from row order; group boundaries only decide how many
//!    readings one seal takes. See `docs/buffer.md`.
//!    From then on a record's bytes never change: a resend after a crash sends the same bytes under the same
//!    number.
//! 3. **Acknowledged**: once Kinesis has accepted a record, its row in `batches` is deleted. Nothing is deleted
//!    earlier, except by the `drop_oldest` overflow policy (counted).
//!
//! # Schema (version 2, in `meta.schema_version`)
//! ```sql
//! meta(key TEXT PRIMARY KEY, value)                 -- schema_version, next_seq, agent_id, epoch
//! series(id INTEGER PRIMARY KEY, key TEXT, tags TEXT, UNIQUE(key, tags))   -- tags: JSON [[name, value], ...]
//! groups(id INTEGER PRIMARY KEY, committed_ms INTEGER, readings INTEGER, bytes INTEGER, blob BLOB)
//!                                                    -- unsealed readings; bytes: their counted size; blob: group.rs
//! batches(seq INTEGER PRIMARY KEY, record BLOB, readings INTEGER, sealed_ms INTEGER)
//! series_state(series_id INTEGER PRIMARY KEY, state BLOB, log_seal INTEGER)
//!                                                    -- order::SeriesState::to_bytes, stored whole by seal log_seal
//! state_log(seal INTEGER PRIMARY KEY, entries BLOB)  -- per seal, what states remembered since: state_log.rs
//! series_state_log(series_id INTEGER, n INTEGER, entries BLOB, PRIMARY KEY(series_id, n))
//!                                                    -- an earlier version's deltas: folded into series_state at open
//! dead_letters(id INTEGER PRIMARY KEY, at_ms INTEGER, reason TEXT, series TEXT, ts_ms INTEGER, value ANY)
//! refused(id INTEGER PRIMARY KEY, at_ms INTEGER, source TEXT, topic TEXT, reason TEXT, detail TEXT,
//!         size INTEGER, payload BLOB)                 -- source messages the mapping refused
//! alarm_records(seq INTEGER PRIMARY KEY, record BLOB, events INTEGER, sealed_ms INTEGER)  -- alarm-event records
//! alarm_state(rule TEXT, series_id INTEGER, state BLOB, PRIMARY KEY(rule, series_id))   -- alarm::State::to_bytes
//! alarm_seq(rule TEXT PRIMARY KEY, next INTEGER)      -- each rule's next alarm sequence number
//! window_state(rule TEXT, series_id INTEGER, state BLOB, PRIMARY KEY(rule, series_id))  -- window::PairState
//! window_rule(name TEXT PRIMARY KEY, functions TEXT)  -- each window rule's functions when its states were written
//! window_since(rule TEXT, series_id INTEGER, size INTEGER, func TEXT, since INTEGER, PRIMARY KEY(rule, series_id, size, func))
//! ```
//!
//! # Dedup states
//! A seal stores each involved series' [`SeriesState`] in its transaction: whole in `series_state` (with the
//! seal's number, `log_seal`), or, when the whole state is more than four times what it remembered since it was
//! last stored, only that, as an entry of the seal's one row of `state_log` (`state_log.rs`). Seals are numbered
//! in commit order (the counter continues, at open, after every number a row or whole state holds). A state's
//! live deltas are the entries for it in rows numbered after its `log_seal`; loading it replays them in order after
//! the whole state, and the next release forgets what the live state had forgotten before deciding anything (the
//! horizon only moves forward and `max_recent` keeps the newest, so trimming everything remembered since the whole
//! state gives what the live state kept; property-tested in `order/tests.rs`) and gives back the room of what it
//! forgot. A series that remembered nothing in a seal is not written (its newest time did not move).
//!
//! Invariants: every state with live deltas is held in memory (the cache, or the seal job out) from the open on,
//! which loads them all by replaying `state_log`; a state loaded on demand is its whole row alone; the cache (past
//! `SERIES_CACHE_MAX` series) lets only states without deltas go; a failed seal reloads the cache by replaying the
//! log. A state
//! whose oldest delta is [`STATE_LOG_SEALS`] seals old is stored whole by that seal, involved or not, and the seal
//! deletes the rows no state can need any more: the log holds at most [`STATE_LOG_SEALS`] rows.
//!
//! Versions: `state_log` and `log_seal` were added without a schema version change. Deltas an earlier version left
//! in `series_state_log` (a row per series and seal) are folded into whole states at open. An earlier version run
//! on a newer file ignores `state_log` (its dedup memory then lacks those deltas' readings, so a redelivery of one of
//! them is sent again) and stores whole states with `log_seal` 0 (the version just before `state_log` may also write
//! per-series deltas to `series_state_log`, which the next open folds in); when a newer one runs again, the rows
//! still in the log are replayed over them: real past readings, so nothing is taken for a duplicate wrongly, and a
//! reading the whole state already holds is not added twice. The states' rows are
//! not counted in `max_bytes` (at most 16 bytes per reading of the dedup window per series, plus the deltas of
//! [`STATE_LOG_SEALS`] seals).
//!
//! # Windows
//! With window rules ([`Buffer::enable_windows`], `buffer/windows.rs`), a seal feeds every released reading to
//! the [`crate::window`] engine after the alarm rules; the readings of closed windows go into the same records
//! as the raw readings, raw readings of `keep_raw = false` rules are deleted unsent, and the changed window states
//! are written in the **same transaction**: no window is emitted twice or lost across a crash.
//!
//! # Alarms
//! With rules configured ([`Buffer::enable_alarms`]), a seal feeds every released reading that is not late to the
//! [`crate::alarm`] engine (in each series' event-time order) and ticks its stale clock (`now_ms` minus the reorder
//! window); the transitions become alarm-event records (`proto/src/alarm.rs`) numbered from the same batch
//! sequence, written in the **same transaction** as the changed rule states, the rules' next sequence numbers and
//! the deletion of the readings. A crash before the commit evaluates the same readings again from the same states;
//! after it, never again: no transition is repeated or skipped. A failed commit reloads the engine from the tables.
//! Alarm records are sent before any readings record ([`Buffer::pending`]), deleted only once Kinesis accepted
//! them, and never dropped by the overflow policy (they are not counted in the buffer's size). The three tables
//! were added without a schema version change: an older agent ignores them (and would not send alarm records).
//! `dead_letters` keeps the newest [`MAX_DEAD_LETTERS`] rows: `reason` `late` (late readings under the dead-letter
//! policy) or `unsendable` (readings the wire format refuses, a series key or tag over its limits or an overlong
//! string: the sources check them before buffering, so only a file written by an earlier version holds such
//! readings; a seal dead-letters them rather than have every seal refused). `refused` keeps the
//! newest [`MAX_REFUSED`] source messages that gave no reading (unparseable MQTT payloads), each with its first
//! [`MAX_REFUSED_PAYLOAD`] bytes and its full `size`; a refused message is stored in the same transaction as the
//! readings around it, so its MQTT acknowledgement also waits for the commit. The table was added without a
//! schema version change: older agents ignore it.
//!
//! # Size and overflow
//! The buffer counts its logical size: [`ROW_BYTES`] plus the value's size per unsealed reading, plus the bytes of
//! every pending record (kept as before groups, so caps configured for version 1 mean the same; a group's blob
//! takes about a third of that on disk, so the count errs on the safe side). Each group row stores its readings'
//! counted size (`bytes`). Above `max_bytes`, `drop_oldest` deletes the oldest pending records (their readings are
//! counted as dropped); `backpressure` makes the buffer thread stop taking appends until Kinesis acknowledgements
//! bring it back under the cap (sources wait; MQTT stops acknowledging, so the broker holds messages).
//!
//! The disk can fill before the cap. Before each commit the thread checks the room left ([`Buffer::disk_room`]:
//! free space plus SQLite's free pages) against the commit's size twice over (WAL) plus `min_free_bytes`. Short of
//! it, `drop_oldest` drops the oldest records for the shortfall; `backpressure`, or nothing left to drop, pauses
//! intake (the group stays unacknowledged) while sending and acknowledging go on, and intake resumes by itself
//! once sending freed pages. No transaction writes more than a quarter of the headroom, so seals and
//! acknowledgement deletes always find room.
//!
//! # Errors
//! A failed commit never loses or drops anything by itself. The group stays held (unacknowledged, sources wait) and
//! is retried with backoff while the thread goes on serving fetches, acknowledgements, flushes and pings, so
//! sending continues and a shutdown is not held up by it; once every handle is gone (the stop), the close retries
//! it for up to 10 s more (a Modbus poll has no other copy), then gives it up with an error log. No seal tick is
//! started while the held group's last attempt failed on another process's lock (it would wait on the same lock). By [`ErrorClass`]: `SQLITE_FULL` halves the group committed
//! per attempt, truncates the WAL and, under `drop_oldest` only, drops the oldest records for the space needed;
//! a lock held by another process (`SQLITE_BUSY`) and I/O errors only wait. A seal that fails for space seals half
//! as many readings next time (whole groups: at least one). An acknowledgement whose delete fails is not retried in
//! place (under another process's lock each attempt waits out the busy timeout, and the sender and a stop would
//! wait with it): the buffer notes its records ([`Buffer::note_undeleted`]), which stay in the file, counted
//! pending, are not fetched again, and are deleted by a later [`Buffer::ack_undeleted`] (the buffer thread retries
//! it with backoff); [`Buffer::left`] counts them apart and `drop_oldest` deletes them first, counted sent. Only a
//! restart before that deletion sends them again, under the same batch identity (the cloud skips the copy).
//!
//! # Invariants
//! - `meta.next_seq` is greater than every `batches.seq` ever written; sequence numbers are never reused.
//! - No acknowledgement is sent for a reading that is not committed.
//! - Every appended reading is, at any time, in exactly one of: a group in `groups`, a record in `batches`, the counts of
//!   readings sent, deduplicated, dead-lettered or dropped. The [`Ledger`] holds those counts.
//! - Memory does not grow with the backlog: a seal reads at most `max_rows` readings (or one group of at most
//!   [`MAX_GROUP_READINGS`]) and [`Buffer::pending`] a bounded number of records.
//!
//! # Upgrading from schema version 1
//! Version 1 kept one row per unsealed reading in `readings`. At open, its rows are moved into `groups` in
//! order, [`MAX_GROUP_READINGS`] per transaction (a crash in between resumes at the next open), then the table is
//! dropped and the version set to 2; a gateway upgraded with a backlog loses nothing. An older agent refuses a
//! version-2 file (a newer schema) instead of running beside readings it cannot see.
//! - The agent never deletes a database file. One that SQLite cannot read is renamed to
//!   `<path>.corrupt-<unix ms>` (with its `-wal` and `-shm` files) and a new buffer is started, with an error log;
//!   a file of a newer schema is refused.
//! - One process per buffer file: [`Buffer::open`] takes an exclusive `flock` on `<path>.lock` ([`lock_file`])
//!   and is refused, naming the holder's pid, while another process holds it.

mod actor;
mod config;
mod group;
mod seal;
mod state_log;
mod windows;

pub use actor::{
    spawn, spawn_with_alarms, spawn_with_rules, Ack, AckFn, BufferHandle, Closed, Pending,
};
pub use config::{BufferConfig, Durability, OverflowPolicy};

use crate::alarm::{Dirty, Engine, Transition};
use crate::batch::BatchConfig;
use crate::order::{Rules, SeriesState};
use fieldlink_proto::alarm::{AlarmBatch, AlarmEncoder, AlarmEvent};
use fieldlink_proto::{EncodeError, Encoder, Quality, Series, Value};
use foldhash::{HashMap, HashMapExt};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A series as its `series` row stores it: the key, and the tags as JSON `[[name, value], ...]`.
fn series_of_row(key: String, tags: &str) -> Series {
    Series {
        key,
        tags: serde_json::from_str(tags).unwrap_or_default(),
    }
}

/// Current schema version: 2 stores unsealed readings in `groups`; version 1 (one row per reading in `readings`) is
/// migrated at open.
const SCHEMA_VERSION: i64 = 2;
/// Readings in one row of `groups`, at most: a larger commit is stored as several rows (in the same transaction),
/// so that a seal, which takes whole groups, holds a bounded number of readings in memory.
pub const MAX_GROUP_READINGS: u64 = 8192;
/// Version-1 rows moved into `groups` per migration transaction at open.
const MIGRATE_CHUNK: usize = MAX_GROUP_READINGS as usize;
/// Sequence numbers of acknowledged records whose deletion failed that the buffer remembers, at most (the oldest go
/// first).
const UNDELETED_MAX: usize = 65_536;

/// Series (and series states) cached in memory before the cache is dropped and refilled from the tables.
const SERIES_CACHE_MAX: usize = 100_000;
/// Dead letters kept.
pub const MAX_DEAD_LETTERS: i64 = 10_000;
/// Refused source messages kept (the newest).
pub const MAX_REFUSED: i64 = 1_000;
/// Bytes of a refused message's payload kept (the table stays under about 16 MiB).
pub const MAX_REFUSED_PAYLOAD: usize = 16 * 1024;
/// An encoded alarm record: `(seq, bytes, events)`.
type AlarmRecord = (u64, Vec<u8>, usize);

/// Alarm events per alarm record, at most.
const EVENTS_PER_RECORD: usize = 1000;
/// Size counted per unsealed reading besides its value (from the one-row-per-reading layout: row id, series id,
/// timestamp, kind, b-tree overhead; kept so that `max_bytes` means what it meant).
pub const ROW_BYTES: u64 = 32;

/// What went wrong in the buffer. `Sqlite` errors are usually disk problems (full, read-only, I/O): the caller
/// logs, counts and retries; `Incompatible` needs an operator.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// SQLite reported an error.
    #[error("buffer database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file is a buffer this agent cannot use (newer schema), or cannot be moved aside.
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
    /// Buffered readings cannot be turned into a record.
    #[error("cannot encode buffered readings: {0}")]
    Encode(#[from] EncodeError),
    /// Another process has the buffer open (see [`lock_file`]).
    #[error(
        "{path} is in use by another process ({holder}): one agent per buffer file. Stop the other agent, or give \
         this one its own [buffer] path"
    )]
    InUse {
        /// The buffer file.
        path: String,
        /// What the lock file says of its holder (`pid N`).
        holder: String,
    },
}

/// The lock file of the buffer at `path`: `<path>.lock`. The lock is on the file (its inode), so any name of its
/// directory (a symbolic link, `..`, a relative path) reaches the same lock; the file name is taken as configured
/// (a symbolic link to the database file has a lock of its own: resolving it would change the lock's name with the
/// link's state, e.g. a link created after the first start, or renamed aside with a corrupt file).
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the buffer's exclusive lock (`flock` on [`lock_path`], held as long as the returned file is open): one
/// process per buffer file. Two agents on one file — a service and a copy started by hand with another
/// configuration, two containers sharing a volume during an update — would each seal the other's readings with
/// their own cached sequence numbers and dedup states, sending readings twice under different batch identities;
/// SQLite's locks serialise transactions, not that. The lock goes with the process (`kill -9` included); the file
/// stays, holding the last holder's pid for the error message (not rewritten where it cannot be written: a file left
/// by an agent run once as another user is locked read-only). Only another holder refuses: a lock file that
/// cannot be created (a full disk at the first start after an upgrade, a read-only directory the database itself
/// may still work in) or a filesystem without `flock` gets a warning and no lock, since refusing to start would
/// strand the backlog. SQLite's own locks are POSIX locks on the database file, separate from this one.
pub fn lock_file(path: &Path) -> Result<Option<std::fs::File>, BufferError> {
    use std::io::{Read, Seek, Write};
    let lock = lock_path(path);
    // Read-only where it cannot be written (left by an agent run once as another user): a local `flock` needs no
    // more (over NFS an exclusive lock needs a writable file: the read-only one gets the warning below).
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .or_else(|e| std::fs::File::open(&lock).map_err(|_| e));
    let mut f = match opened {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(lock = %lock.display(), error = %e, "cannot open the buffer's lock file: running without the one-agent-per-buffer check");
            return Ok(None);
        }
    };
    match f.try_lock() {
        Ok(()) => {
            let _ = f
                .set_len(0)
                .and_then(|()| f.rewind())
                .and_then(|()| writeln!(f, "pid {}", std::process::id()));
            Ok(Some(f))
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            Err(BufferError::InUse {
                path: path.display().to_string(),
                holder: if holder.is_empty() {
                    "unknown pid".into()
                } else {
                    holder.to_owned()
                },
            })
        }
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(lock = %lock.display(), error = %e, "cannot lock the buffer (filesystem without flock?): running without the one-agent-per-buffer check");
            Ok(None)
        }
    }
}

/// A reading as a source hands it to the buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReading {
    /// Its series (shared by the readings of a series, see `mqtt::payload::Interner`).
    pub series: Arc<Series>,
    /// Event time, Unix ms.
    pub ts_ms: i64,
    /// Value.
    pub value: Value,
    /// Quality.
    pub quality: Quality,
}

/// A source message that gave no reading, kept for inspection (`fieldlink-agent refused`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// When it arrived, Unix ms.
    pub at_ms: i64,
    /// The source, e.g. `mqtt:<connection>`.
    pub source: String,
    /// The MQTT topic.
    pub topic: String,
    /// The reason label (as in the metric).
    pub reason: String,
    /// The error in words.
    pub detail: String,
    /// The payload (only its first [`MAX_REFUSED_PAYLOAD`] bytes are stored).
    pub payload: Vec<u8>,
}

/// A stored [`Refused`] message, as read back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RefusedRow {
    /// When it arrived, Unix ms.
    pub at_ms: i64,
    /// The source.
    pub source: String,
    /// The MQTT topic.
    pub topic: String,
    /// The reason label.
    pub reason: String,
    /// The error in words.
    pub detail: String,
    /// The payload's full size in bytes.
    pub size: i64,
    /// The stored payload as text, if it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The stored payload in hex, if it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_hex: Option<String>,
}

/// The kind of memory-backed filesystem (`tmpfs`, `ramfs`) that `path` would be written to — the filesystem of
/// its nearest existing ancestor — or `None` for any other, or if it cannot be asked.
pub fn volatile_filesystem(path: &Path) -> Option<&'static str> {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    let existing = path.ancestors().find(|p| p.exists())?;
    let fs = rustix::fs::statfs(existing).ok()?;
    // `f_type` is signed on some targets; the magic numbers fit in 32 bits.
    match fs.f_type as u64 & 0xffff_ffff {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    }
}

/// Reads the newest `limit` refused messages, oldest first, from a buffer file without changing it (the
/// agent may be running: WAL mode lets a reader in).
pub fn read_refused(path: &Path, limit: usize) -> Result<Vec<RefusedRow>, BufferError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let has: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'refused'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT at_ms, source, topic, reason, detail, size, payload FROM
           (SELECT * FROM refused ORDER BY id DESC LIMIT ?1) ORDER BY id",
    )?;
    let rows = stmt.query_map([limit as i64], |r| {
        let payload: Vec<u8> = r.get(6)?;
        let (text, hex) = match String::from_utf8(payload) {
            Ok(t) => (Some(t), None),
            Err(e) => (
                None,
                Some(e.as_bytes().iter().map(|b| format!("{b:02x}")).collect()),
            ),
        };
        Ok(RefusedRow {
            at_ms: r.get(0)?,
            source: r.get(1)?,
            topic: r.get(2)?,
            reason: r.get(3)?,
            detail: r.get(4)?,
            size: r.get(5)?,
            payload: text,
            payload_hex: hex,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// What the buffer holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Readings appended but not yet sealed.
    pub unsealed_readings: u64,
    /// Their counted size.
    pub unsealed_bytes: u64,
    /// Sealed records in the file: not yet acknowledged by Kinesis, or acknowledged but not deleted (a delete
    /// given up under another process's lock).
    pub pending_batches: u64,
    /// Readings inside those records.
    pub pending_readings: u64,
    /// Bytes of those records.
    pub pending_bytes: u64,
}

impl Stats {
    /// The counted size of everything buffered.
    pub fn bytes(&self) -> u64 {
        self.unsealed_bytes + self.pending_bytes
    }
}

/// Where every reading appended since the process started went. At rest (nothing in flight inside the buffer
/// thread) `appended + at_open + window_derived = sent + deduplicated + dead_lettered + dropped + window_withheld +
/// unsealed + pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ledger {
    /// Readings committed by [`Buffer::append`].
    pub appended: u64,
    /// Readings in records Kinesis acknowledged ([`Buffer::ack`]).
    pub sent: u64,
    /// Readings dropped as duplicates.
    pub deduplicated: u64,
    /// Late readings released with the flag (also counted in `sent` once acknowledged).
    pub late_flagged: u64,
    /// Readings withheld into `dead_letters` (late, or refused by the wire format), and readings of unreadable
    /// groups.
    pub dead_lettered: u64,
    /// Readings in records deleted by `drop_oldest`.
    pub dropped: u64,
    /// Batches sealed.
    pub batches_sealed: u64,
    /// Bytes of records sealed.
    pub bytes_sealed: u64,
    /// Alarm events committed.
    pub alarm_events: u64,
    /// Late readings the alarm rules did not evaluate.
    pub alarm_late_skipped: u64,
    /// Readings of derived series (closed windows) sealed into records: they join the ledger's left side.
    pub window_derived: u64,
    /// Raw readings that fed windows and were deleted unsent (`keep_raw = false`).
    pub window_withheld: u64,
}

/// What a buffer file holds that Kinesis has not acknowledged, and what only the file holds ([`Buffer::left`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Left {
    /// Readings committed and not sealed.
    pub unsealed_readings: u64,
    /// Sealed records not acknowledged by Kinesis.
    pub pending_batches: u64,
    /// Readings inside those records.
    pub pending_readings: u64,
    /// Alarm records not acknowledged by Kinesis.
    pub alarm_records: u64,
    /// Records (readings and alarm records) Kinesis acknowledged that are still in the file: deleting them failed
    /// (another process held the file's write lock) and no retry went through yet. Not counted above. Sent again if
    /// an agent runs on the file (same batch identity: the cloud skips the copy).
    pub acknowledged_undeleted: u64,
    /// Open windows: under `keep_raw = false` the readings folded into them have no other copy.
    pub open_windows: u64,
    /// Readings in the dead-letter table (late, unsendable): kept only in the file.
    pub dead_letters: u64,
    /// Source messages the payload mapping refused (`fieldlink-agent refused`): kept only in the file.
    pub refused: u64,
    /// Window states this agent cannot send: unreadable, or with open windows of a removed rule whose functions it
    /// does not know (configured again, the rule takes them up).
    pub window_states_unloaded: u64,
    /// Where the file was moved when the open found it damaged (a new, empty buffer took its place).
    pub moved_aside: Option<PathBuf>,
}

impl Left {
    /// Whether everything the file held for the cloud is in Kinesis (dead letters and refused messages aside).
    pub fn is_drained(&self) -> bool {
        self.unsealed_readings
            + self.pending_batches
            + self.alarm_records
            + self.open_windows
            + self.window_states_unloaded
            == 0
            && self.moved_aside.is_none()
    }
}

/// What [`Buffer::drop_oldest`] deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dropped {
    /// Readings of records Kinesis had not acknowledged: dropped.
    pub readings: u64,
    /// Records Kinesis had acknowledged, whose deletion had been given up: sent.
    pub acknowledged_records: u64,
}

/// Records counted in the file ([`Buffer::left`]).
struct InFile {
    /// Sealed records of readings.
    batches: u64,
    /// Readings inside them.
    readings: u64,
    /// Alarm records.
    alarm_records: u64,
}

/// What one seal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SealReport {
    /// Readings consumed from `groups` (including unreadable ones).
    pub rows: u64,
    /// Records written.
    pub batches: u64,
    /// Readings in them.
    pub readings: u64,
    /// Alarm events committed.
    pub alarm_events: u64,
}

/// The buffer's synchronous core. All methods run on the caller's thread; see [`spawn`] for the thread shell.
#[derive(Debug)]
pub struct Buffer {
    conn: Connection,
    path: PathBuf,
    /// How commits reach the disk; a seal's commit always does ([`Buffer::in_sealing_tx`]).
    durability: Durability,
    /// The buffer's lock ([`lock_file`]), released when the buffer is dropped (after its connection closes).
    _lock: Option<std::fs::File>,
    agent_id: String,
    epoch: u64,
    next_seq: u64,
    /// Sequence numbers of records Kinesis acknowledged whose deletion failed ([`Buffer::note_undeleted`]), at
    /// most [`UNDELETED_MAX`]. [`Buffer::pending`] does not fetch them again, [`Buffer::ack_undeleted`] deletes
    /// them, [`Buffer::left`] counts those still in the file apart, and [`Buffer::drop_oldest`] deletes them first.
    /// Losing entries (the cap, a restart) only makes them count as not acknowledged: they are sent again under
    /// the same batch identity, and the cloud skips the copies.
    undeleted: BTreeSet<u64>,
    series_ids: HashMap<Series, i64>,
    /// The same by the address of the interned series a reading shares (hashing a pointer, not the key and tags);
    /// each entry holds its `Arc`, so the address cannot be reused by another series while the entry exists.
    /// Bounded like the MQTT interner ([`ARC_CACHE_MAX_SERIES`], [`ARC_CACHE_MAX_BYTES`]): when the interner
    /// drops its series and makes new ones, this map would otherwise keep the old ones alive.
    series_by_arc: HashMap<usize, (Arc<Series>, i64)>,
    /// Key and tag bytes of the series `series_by_arc` holds.
    series_by_arc_bytes: usize,
    series_by_id: HashMap<i64, Series>,
    /// The group blob being built by an append (kept to reuse its allocation).
    group: group::Encoder,
    /// Dedup states by series id. Every state with deltas in `state_log` is held here or by the job out, from
    /// the open on (a state loaded on demand is its whole row only).
    states: HashMap<i64, SeriesState>,
    /// The number of the last committed seal's `state_log` row (whether it wrote one or not).
    log_seal: u64,
    bytes_per_reading: f64,
    stats: Stats,
    ledger: Ledger,
    last_row_id: i64,
    moved_aside: Option<PathBuf>,
    /// Records handed to the sender by the last [`Buffer::pending`] and not acknowledged: never dropped.
    in_flight: std::collections::HashSet<u64>,
    /// The alarm rules and their states (empty: no rules).
    alarms: Engine,
    /// The stale clock is `now_ms` minus this (the reorder window).
    alarm_lag_ms: i64,
    alarm_encoder: Option<AlarmEncoder>,
    /// Alarm records not yet accepted by Kinesis.
    alarm_pending: u64,
    /// Alarm events committed and not yet taken by [`Buffer::take_alarm_events`] (bounded: the oldest go first).
    alarm_out: Vec<AlarmEvent>,
    /// The window rules and their states (empty: no rules).
    windows: crate::window::Engine,
    /// The intake clock the next seal gives the window rules ([`Buffer::set_intake_clock`]).
    intake_clock: Option<i64>,
    /// `fieldlink-agent drain` ([`Buffer::close_all_windows`]): every seal closes every open window and raises no
    /// stale alarm.
    draining: bool,
    /// Window states the last load left unloaded (no rule with known functions, or unreadable): their open windows
    /// cannot be sent.
    windows_unloaded: u64,
    /// The configured window rules' functions are in `window_rule` (written by the first seal that writes window
    /// states after the engine was loaded).
    window_rules_written: bool,
    /// The alarm and window engines may hold state no transaction committed (a seal failed and so did reloading
    /// them): the next seal reloads them before anything else, and fails while it cannot.
    engines_stale: bool,
    /// A [`seal::SealJob`] is out: it holds the engines, the dedup states it involves and the groups it took.
    sealing: bool,
    /// Test hook: the next transaction fails with this SQLite result code (after its statements ran).
    #[cfg(test)]
    pub(crate) fault: Option<std::ffi::c_int>,
    /// Test hook: `fault` waits for this many transactions to go through first.
    #[cfg(test)]
    pub(crate) fault_skip: u32,
    /// Test record: `PRAGMA synchronous` (1 NORMAL, 2 FULL) at the last transaction's commit.
    #[cfg(test)]
    pub(crate) committed_with: i64,
    /// Test hook: this many reloads of the window states fail (after the engine was reset).
    #[cfg(test)]
    pub(crate) reload_faults: u32,
}

fn tags_json(tags: &[(String, String)]) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "[]".into())
}

/// The counted size of readings once appended (see "Size and overflow").
pub(crate) fn counted_bytes(readings: &[NewReading]) -> u64 {
    readings
        .iter()
        .map(|r| ROW_BYTES + value_bytes(&r.value))
        .sum()
}

fn value_bytes(v: &Value) -> u64 {
    match v {
        Value::Str(s) => s.len() as u64,
        _ => 8,
    }
}

/// A random non-zero epoch for a new buffer file, from the kernel's generator (the agent runs on Linux). Should
/// `/dev/urandom` be unreadable, the time and process id are mixed through std's randomly keyed hasher.
fn new_epoch() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    let e = match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_i64(fieldlink_ops::unix_ms());
            h.write_u32(std::process::id());
            h.finish()
        }
    };
    e.max(1)
}

/// How the buffer thread reacts to a failed write (see "Errors" in the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// `SQLITE_FULL`: the filesystem (or the database's page limit) is full. `drop_oldest` may free the space the
    /// write needs; then retry.
    Full,
    /// Another connection holds the lock (`SQLITE_BUSY`, `SQLITE_LOCKED`): wait and retry, drop nothing.
    Busy,
    /// Anything else (I/O errors, a read-only file): wait and retry, drop nothing.
    Other,
}

impl BufferError {
    /// What kind of failure this is.
    pub fn class(&self) -> ErrorClass {
        match self {
            BufferError::Sqlite(e) => match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DiskFull) => ErrorClass::Full,
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                    ErrorClass::Busy
                }
                _ => ErrorClass::Other,
            },
            _ => ErrorClass::Other,
        }
    }
}

/// Whether an error means "this file is not a readable SQLite database".
fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase) | Some(rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

fn move_aside(path: &Path) -> Result<PathBuf, BufferError> {
    let stamp = fieldlink_ops::unix_ms();
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    std::fs::rename(path, &aside).map_err(|e| BufferError::Incompatible {
        path: path.display().to_string(),
        why: format!("cannot move it aside: {e}"),
    })?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            let _ = std::fs::rename(&side, format!("{}{suffix}", aside.display()));
        }
    }
    Ok(aside)
}

/// A version-1 `readings` row's value, by its kind byte; `None` for a row the agent did not write.
fn legacy_value(kind: u8, v: rusqlite::types::ValueRef<'_>) -> Option<Value> {
    use rusqlite::types::ValueRef;
    match (kind & 0x07, v) {
        // SQLite stores a NaN REAL as NULL.
        (0, ValueRef::Null) => Some(Value::F64(f64::NAN)),
        (0, ValueRef::Real(f)) => Some(Value::F64(f)),
        (0, ValueRef::Integer(i)) => Some(Value::F64(i as f64)),
        (1, ValueRef::Integer(i)) => Some(Value::I64(i)),
        (2, ValueRef::Integer(i)) => Some(Value::Bool(i != 0)),
        (3, ValueRef::Text(t)) => Some(Value::Str(String::from_utf8_lossy(t).into_owned())),
        _ => None,
    }
}

/// Moves a version-1 buffer's unsealed rows (`readings`, one row per reading) into `groups`, oldest first, `chunk`
/// rows per transaction; the last transaction drops `readings` and sets the schema version. Each transaction
/// moves a prefix by row id, so a crash between two leaves the file half migrated and the next open goes on
/// where this one stopped (groups already written keep their lower ids: the order is kept). Rows whose value the
/// agent did not write are logged and left out, as a seal did before.
fn migrate_v1(conn: &Connection, chunk: usize) -> Result<(), BufferError> {
    let mut moved = 0u64;
    loop {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let step = (|| -> Result<bool, BufferError> {
            let has: bool = conn.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'readings'",
                [],
                |r| r.get(0),
            )?;
            let mut enc = group::Encoder::new();
            let (mut last, mut bytes, mut unreadable) = (0i64, 0u64, 0u64);
            if has {
                let mut stmt = conn.prepare(
                    "SELECT id, series_id, ts_ms, kind, value FROM readings ORDER BY id LIMIT ?1",
                )?;
                let mut q = stmt.query([chunk as i64])?;
                while let Some(r) = q.next()? {
                    last = r.get(0)?;
                    let kind: u8 = r.get(3)?;
                    let Some(value) = legacy_value(kind, r.get_ref(4)?) else {
                        unreadable += 1;
                        continue;
                    };
                    enc.push(r.get(1)?, r.get(2)?, &value, quality_of(kind));
                    bytes += ROW_BYTES + value_bytes(&value);
                }
            }
            if unreadable > 0 {
                tracing::error!(
                    rows = unreadable,
                    "unreadable version-1 buffer rows left out at migration"
                );
            }
            if last == 0 {
                conn.execute_batch("DROP TABLE IF EXISTS readings")?;
                conn.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
                    [SCHEMA_VERSION],
                )?;
                return Ok(true);
            }
            let n = enc.len();
            if n > 0 {
                conn.execute(
                    "INSERT INTO groups(id, committed_ms, readings, bytes, blob) VALUES ((SELECT coalesce(max(id), 0) + 1 FROM groups), ?1, ?2, ?3, ?4)",
                    params![fieldlink_ops::unix_ms(), n as i64, bytes as i64, enc.finish()],
                )?;
            }
            conn.execute("DELETE FROM readings WHERE id <= ?1", [last])?;
            moved += n;
            Ok(false)
        })();
        let done = match step.and_then(|d| Ok(conn.execute_batch("COMMIT").map(|()| d)?)) {
            Ok(d) => d,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        if done {
            break;
        }
    }
    tracing::info!(
        readings = moved,
        "buffer migrated from schema version 1 (one row per reading) to 2 (groups)"
    );
    Ok(())
}

fn quality_of(kind: u8) -> Quality {
    match (kind >> 4) & 0b11 {
        1 => Quality::Uncertain,
        2 => Quality::Bad,
        _ => Quality::Good,
    }
}

/// A series' whole dedup state as stored, with the seal it was stored by (a new state and 0 if none is).
fn whole_state(conn: &Connection, sid: i64) -> Result<(SeriesState, u64), BufferError> {
    let row: Option<(Vec<u8>, i64)> = conn
        .prepare_cached("SELECT state, log_seal FROM series_state WHERE series_id = ?1")?
        .query_row([sid], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map_or_else(
        || (SeriesState::new(), 0),
        |(b, seal)| (SeriesState::from_bytes(&b), seal.max(0) as u64),
    ))
}

/// Series `Buffer::series_by_arc` holds at most (as the MQTT interner).
const ARC_CACHE_MAX_SERIES: usize = 16_384;
/// Key and tag bytes (plus 64 per entry) `Buffer::series_by_arc` holds at most (as the MQTT interner).
const ARC_CACHE_MAX_BYTES: usize = 2 << 20;

/// Rows of `state_log` kept: a dedup state whose oldest delta is this many seals old is stored whole (so loading a
/// state never reads more than this many rows, nor holds more than this many deltas).
pub const STATE_LOG_SEALS: u64 = 32;

impl Buffer {
    /// Opens (or creates) the buffer at `path`. A file SQLite cannot read is moved aside (see the module doc).
    /// Refused while another process has it open ([`lock_file`]).
    pub fn open(path: &Path, durability: Durability, agent_id: &str) -> Result<Self, BufferError> {
        let lock = lock_file(path)?;
        let mut b = match Self::open_checked(path, durability, agent_id) {
            Err(BufferError::Sqlite(e)) if is_corruption(&e) => {
                let aside = move_aside(path)?;
                tracing::error!(path = %path.display(), moved_to = %aside.display(), error = %e, "buffer database is corrupt; moved aside, starting a new buffer");
                let mut b = Self::open_checked(path, durability, agent_id)?;
                b.moved_aside = Some(aside);
                b
            }
            other => other?,
        };
        b._lock = lock;
        Ok(b)
    }

    fn open_checked(
        path: &Path,
        durability: Durability,
        agent_id: &str,
    ) -> Result<Self, BufferError> {
        let conn = Connection::open(path)?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(BufferError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(format!("quick_check: {check}")),
            )));
        }
        let incompatible = |why: String| BufferError::Incompatible {
            path: path.display().to_string(),
            why,
        };
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(incompatible(format!(
                "journal mode is {mode}, WAL required"
            )));
        }
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        // A page cache of 256 KiB: the hot pages are the groups just appended and the tables' upper levels; the
        // rest is in the OS page cache anyway. 1 MiB measured no faster (pipeline, MQTT ingest) and held 0.7 MiB
        // more peak RSS with glibc, 1.7 MiB in the static musl build (docs/memory.md).
        conn.execute_batch(&format!(
            "PRAGMA synchronous={sync}; PRAGMA busy_timeout=5000; PRAGMA cache_size=-256; PRAGMA journal_size_limit=8388608;"
        ))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value ANY NOT NULL);
             CREATE TABLE IF NOT EXISTS series(id INTEGER PRIMARY KEY, key TEXT NOT NULL, tags TEXT NOT NULL, UNIQUE(key, tags));
             CREATE TABLE IF NOT EXISTS groups(id INTEGER PRIMARY KEY, committed_ms INTEGER NOT NULL, readings INTEGER NOT NULL, bytes INTEGER NOT NULL, blob BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS batches(seq INTEGER PRIMARY KEY, record BLOB NOT NULL, readings INTEGER NOT NULL, sealed_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS series_state(series_id INTEGER PRIMARY KEY, state BLOB NOT NULL, log_seal INTEGER NOT NULL DEFAULT 0);
             CREATE TABLE IF NOT EXISTS series_state_log(series_id INTEGER NOT NULL, n INTEGER NOT NULL, entries BLOB NOT NULL, PRIMARY KEY(series_id, n)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS state_log(seal INTEGER PRIMARY KEY, entries BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS dead_letters(id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, reason TEXT NOT NULL, series TEXT NOT NULL, ts_ms INTEGER NOT NULL, value ANY);
             CREATE TABLE IF NOT EXISTS refused(id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, source TEXT NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS alarm_records(seq INTEGER PRIMARY KEY, record BLOB NOT NULL, events INTEGER NOT NULL, sealed_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS alarm_state(rule TEXT NOT NULL, series_id INTEGER NOT NULL, state BLOB NOT NULL, PRIMARY KEY(rule, series_id));
             CREATE TABLE IF NOT EXISTS alarm_seq(rule TEXT PRIMARY KEY, next INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS window_state(rule TEXT NOT NULL, series_id INTEGER NOT NULL, state BLOB NOT NULL, PRIMARY KEY(rule, series_id));
             CREATE TABLE IF NOT EXISTS window_rule(name TEXT PRIMARY KEY, functions TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS window_since(rule TEXT NOT NULL, series_id INTEGER NOT NULL, size INTEGER NOT NULL, func TEXT NOT NULL, since INTEGER NOT NULL, PRIMARY KEY(rule, series_id, size, func));",
        )?;
        let get = |k: &str| -> rusqlite::Result<Option<rusqlite::types::Value>> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))
                .optional()
        };
        let schema_version = get("schema_version")?;
        let created = schema_version.is_none();
        match schema_version {
            None => {
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?1), ('next_seq', 1)",
                    [SCHEMA_VERSION],
                )?;
            }
            Some(rusqlite::types::Value::Integer(SCHEMA_VERSION)) => {}
            Some(rusqlite::types::Value::Integer(1)) => migrate_v1(&conn, MIGRATE_CHUNK)?,
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
        let epoch = match get("epoch")? {
            Some(rusqlite::types::Value::Integer(e)) if e != 0 => e as u64,
            _ => {
                // A new buffer, or one from before epochs: draw this file's epoch once.
                let e = new_epoch();
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('epoch', ?1)",
                    [e as i64],
                )?;
                if created {
                    // Also what an edit of `[buffer] path` looks like: say where the backlog of the old path is.
                    tracing::warn!(
                        path = %path.display(),
                        epoch = %format!("{e:016x}"),
                        "new buffer file; readings buffered under another [buffer] path stay in that file until an \
                         agent runs on it (`fieldlink-agent drain --config` with that path sends them)"
                    );
                } else {
                    tracing::info!(epoch = %format!("{e:016x}"), "new buffer epoch");
                }
                e
            }
        };
        let next_seq: i64 =
            conn.query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })?;
        let mut b = Self {
            conn,
            path: path.to_owned(),
            durability,
            agent_id: agent_id.to_owned(),
            epoch,
            next_seq: next_seq as u64,
            undeleted: BTreeSet::new(),
            series_ids: HashMap::new(),
            series_by_arc: HashMap::new(),
            series_by_arc_bytes: 0,
            series_by_id: HashMap::new(),
            group: group::Encoder::new(),
            states: HashMap::new(),
            log_seal: 0,
            bytes_per_reading: 10.0,
            stats: Stats::default(),
            ledger: Ledger::default(),
            last_row_id: 0,
            moved_aside: None,
            _lock: None,
            in_flight: std::collections::HashSet::new(),
            alarms: Engine::default(),
            alarm_lag_ms: 0,
            alarm_encoder: None,
            alarm_pending: 0,
            alarm_out: Vec::new(),
            windows: crate::window::Engine::default(),
            intake_clock: None,
            draining: false,
            windows_unloaded: 0,
            window_rules_written: false,
            engines_stale: false,
            sealing: false,
            #[cfg(test)]
            fault: None,
            #[cfg(test)]
            fault_skip: 0,
            #[cfg(test)]
            committed_with: 0,
            #[cfg(test)]
            reload_faults: 0,
        };
        b.refresh_stats()?;
        b.open_state_log()?;
        Ok(b)
    }

    /// At open: the dedup states' log is brought to this version's layout (deltas a version before this one left
    /// in `series_state_log` are folded into whole states), the seal counter continues after every number a row
    /// or a whole state holds, and the states with deltas are loaded.
    fn open_state_log(&mut self) -> Result<(), BufferError> {
        let has_log_seal: i64 = self.conn.query_row(
            "SELECT count(*) FROM pragma_table_info('series_state') WHERE name = 'log_seal'",
            [],
            |r| r.get(0),
        )?;
        if has_log_seal == 0 {
            self.conn.execute_batch(
                "ALTER TABLE series_state ADD COLUMN log_seal INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        let old: Vec<i64> = self
            .conn
            .prepare("SELECT DISTINCT series_id FROM series_state_log")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if !old.is_empty() {
            self.in_tx(|b| {
                for sid in &old {
                    let (mut st, seal) = whole_state(&b.conn, *sid)?;
                    let mut stmt = b.conn.prepare_cached(
                        "SELECT entries FROM series_state_log WHERE series_id = ?1 ORDER BY n",
                    )?;
                    let mut q = stmt.query([sid])?;
                    while let Some(r) = q.next()? {
                        st.apply_delta(r.get_ref(0)?.as_blob()?);
                    }
                    seal::write_whole(&b.conn, *sid, &st, seal)?;
                }
                b.conn.execute("DELETE FROM series_state_log", [])?;
                Ok(())
            })?;
            tracing::info!(
                series = old.len(),
                "dedup states of an earlier version's delta table stored whole"
            );
        }
        self.log_seal = self.conn.query_row(
            "SELECT max(coalesce((SELECT max(seal) FROM state_log), 0), coalesce((SELECT max(log_seal) FROM series_state), 0))",
            [],
            |r| r.get::<_, i64>(0),
        )?.max(0) as u64;
        self.reload_states()
    }

    /// The cache of dedup states emptied, then every state with deltas in `state_log` loaded into it: its whole
    /// state, then the deltas of the rows after it, oldest first. The other states load on demand.
    fn reload_states(&mut self) -> Result<(), BufferError> {
        self.states.clear();
        let mut loaded: HashMap<i64, (SeriesState, u64)> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seal, entries FROM state_log ORDER BY seal")?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            let seal = r.get::<_, i64>(0)?.max(0) as u64;
            let mut entries = state_log::entries(r.get_ref(1)?.as_blob()?);
            for (sid, delta) in entries.by_ref() {
                let (st, whole_seal) = match loaded.entry(sid) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(whole_state(&self.conn, sid)?)
                    }
                };
                if seal > *whole_seal {
                    st.apply_delta(delta);
                    if st.logged_since == 0 {
                        st.logged_since = seal;
                    }
                }
            }
            if !entries.complete {
                tracing::error!(
                    seal,
                    "unreadable row of the dedup states' log: the rest of it is ignored (readings sent again may not be recognised as duplicates)"
                );
            }
        }
        drop(q);
        drop(stmt);
        self.states = loaded
            .into_iter()
            .filter(|(_, (st, _))| st.logged_since != 0)
            .map(|(sid, (st, _))| (sid, st))
            .collect();
        Ok(())
    }

    fn refresh_stats(&mut self) -> Result<(), BufferError> {
        let (unsealed, unsealed_bytes, last): (i64, i64, i64) = self.conn.query_row(
            "SELECT coalesce(sum(readings), 0), coalesce(sum(bytes), 0), coalesce(max(id), 0) FROM groups",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let (batches, readings, bytes): (i64, i64, i64) = self.conn.query_row(
            "SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(length(record)), 0) FROM batches",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        self.stats = Stats {
            unsealed_readings: unsealed as u64,
            unsealed_bytes: unsealed_bytes as u64,
            pending_batches: batches as u64,
            pending_readings: readings as u64,
            pending_bytes: bytes as u64,
        };
        self.last_row_id = last;
        self.alarm_pending = self
            .conn
            .query_row("SELECT count(*) FROM alarm_records", [], |r| {
                r.get::<_, i64>(0)
            })? as u64;
        Ok(())
    }

    /// Evaluates `engine`'s rules from now on, with their states and sequence numbers as the buffer kept them.
    /// The stale clock runs `lag_ms` (the reorder window) behind the `now_ms` of each seal.
    pub fn enable_alarms(&mut self, engine: Engine, lag_ms: u64) -> Result<(), BufferError> {
        self.alarms = engine;
        self.alarm_lag_ms = lag_ms.min(i64::MAX as u64) as i64;
        if self.alarm_encoder.is_none() && !self.alarms.is_empty() {
            self.alarm_encoder = Some(AlarmEncoder::new(3)?);
        }
        self.reload_alarms()
    }

    /// After a failed seal: both engines back to their committed states. Until that succeeds they are marked
    /// stale, and [`Buffer::fresh_engines`] retries it before the next seal: a seal never feeds readings to
    /// states that already counted readings it failed to commit.
    fn restore_engines(&mut self) -> Result<(), BufferError> {
        self.engines_stale = true;
        if !self.conn.is_autocommit() {
            // A transaction left open (its ROLLBACK failed): what is reloaded must be what was committed.
            self.conn.execute_batch("ROLLBACK")?;
        }
        self.reload_states()?;
        self.reload_alarms()?;
        self.reload_windows()?;
        self.engines_stale = false;
        Ok(())
    }

    /// Before a seal: reloads the engines if a failed seal left them stale.
    fn fresh_engines(&mut self) -> Result<(), BufferError> {
        if self.engines_stale {
            self.restore_engines()?;
        }
        Ok(())
    }

    /// Replaces the engine's states and sequence numbers with the committed ones.
    fn reload_alarms(&mut self) -> Result<(), BufferError> {
        self.alarms.reset();
        if self.alarms.is_empty() {
            return Ok(());
        }
        let mut stmt = self
            .conn
            .prepare("SELECT rule, series_id, state FROM alarm_state")?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            let rule: String = r.get(0)?;
            let state: Vec<u8> = r.get(2)?;
            self.alarms.load_state(&rule, r.get(1)?, &state);
        }
        let mut stmt = self.conn.prepare("SELECT rule, next FROM alarm_seq")?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            let rule: String = r.get(0)?;
            self.alarms
                .load_seq(&rule, r.get::<_, i64>(1)?.max(1) as u64);
        }
        Ok(())
    }

    /// The alarm engine (rules and states).
    pub fn alarms(&self) -> &Engine {
        &self.alarms
    }

    /// What the file holds that Kinesis has not acknowledged, and what only it holds ([`Left`]).
    /// States a failed seal left stale are reloaded first (the error if they cannot be: nothing to count on).
    pub fn left(&mut self) -> Result<Left, BufferError> {
        self.fresh_engines()?;
        let count = |table: &str| -> Result<u64, BufferError> {
            let n: i64 =
                self.conn
                    .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
            Ok(n as u64)
        };
        // Counted in the file, not taken from the running counts: whether the file may go rests on this.
        let all = self.records_in_file()?;
        let acked = self.undeleted_in_file()?;
        Ok(Left {
            unsealed_readings: self.stats.unsealed_readings,
            pending_batches: all.batches - acked.batches,
            pending_readings: all.readings - acked.readings,
            alarm_records: all.alarm_records - acked.alarm_records,
            acknowledged_undeleted: acked.batches + acked.alarm_records,
            open_windows: self.windows.open_windows() as u64,
            dead_letters: count("dead_letters")?,
            refused: count("refused")?,
            window_states_unloaded: self.windows_unloaded,
            moved_aside: self.moved_aside.clone(),
        })
    }

    /// The records in the file.
    fn records_in_file(&self) -> Result<InFile, BufferError> {
        let (batches, readings): (i64, i64) = self.conn.query_row(
            "SELECT count(*), coalesce(sum(readings), 0) FROM batches",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let alarm: i64 = self
            .conn
            .query_row("SELECT count(*) FROM alarm_records", [], |r| r.get(0))?;
        Ok(InFile {
            batches: batches as u64,
            readings: readings as u64,
            alarm_records: alarm as u64,
        })
    }

    /// Of the records Kinesis acknowledged whose deletion failed, those still in the file (a subset of
    /// [`Buffer::records_in_file`]).
    fn undeleted_in_file(&self) -> Result<InFile, BufferError> {
        let (mut batches, mut readings, mut alarm) = (0, 0, 0);
        for &seq in &self.undeleted {
            let seq = seq as i64;
            let n: Option<i64> = self
                .conn
                .prepare_cached("SELECT readings FROM batches WHERE seq = ?1")?
                .query_row([seq], |r| r.get(0))
                .optional()?;
            if let Some(n) = n {
                batches += 1;
                readings += n as u64;
            } else if self
                .conn
                .prepare_cached("SELECT 1 FROM alarm_records WHERE seq = ?1")?
                .exists([seq])?
            {
                alarm += 1;
            }
        }
        Ok(InFile {
            batches,
            readings,
            alarm_records: alarm,
        })
    }

    /// Deletes again the records Kinesis acknowledged whose deletion failed, readings and alarm records alike,
    /// counted sent. Returns the records deleted.
    pub fn ack_undeleted(&mut self) -> Result<u64, BufferError> {
        if self.undeleted.is_empty() {
            return Ok(0);
        }
        let seqs: Vec<u64> = self.undeleted.iter().copied().collect();
        Ok(self.ack(&seqs)?.0)
    }

    /// Whether records Kinesis acknowledged wait for their deletion ([`Buffer::note_undeleted`]).
    pub fn has_undeleted(&self) -> bool {
        !self.undeleted.is_empty()
    }

    /// How many records Kinesis acknowledged wait for their deletion.
    pub fn undeleted_records(&self) -> usize {
        self.undeleted.len()
    }

    /// Records Kinesis acknowledged (`seqs`) whose deletion failed: they stay in the file, counted pending, until
    /// [`Buffer::ack_undeleted`] deletes them; they are no longer in flight and not fetched again, and
    /// [`Buffer::left`] counts them apart from the records Kinesis has not acknowledged.
    pub fn note_undeleted(&mut self, seqs: &[u64]) {
        for s in seqs {
            self.in_flight.remove(s);
        }
        self.undeleted.extend(seqs);
        while self.undeleted.len() > UNDELETED_MAX {
            self.undeleted.pop_first();
        }
    }

    /// Alarm records not yet accepted by Kinesis.
    pub fn alarm_records_pending(&self) -> u64 {
        self.alarm_pending
    }

    /// The alarm events committed since the last call, oldest first (for metrics and the local status).
    pub fn take_alarm_events(&mut self) -> Vec<AlarmEvent> {
        std::mem::take(&mut self.alarm_out)
    }

    /// Turns transitions into alarm records numbered from `first_seq`; the events go with them.
    fn alarm_records(
        &mut self,
        transitions: &[Transition],
        series: &HashMap<i64, Series>,
        first_seq: u64,
    ) -> Result<(Vec<AlarmRecord>, Vec<AlarmEvent>), BufferError> {
        let mut events = Vec::with_capacity(transitions.len());
        for t in transitions {
            let s = match series.get(&t.series_id) {
                Some(s) => s.clone(),
                None => self
                    .series_by_id(t.series_id)?
                    .unwrap_or_else(|| Series::new(format!("?series-{}", t.series_id))),
            };
            events.push(self.alarms.event(t, s));
        }
        let mut records = Vec::new();
        let Some(enc) = self.alarm_encoder.as_mut() else {
            return Ok((records, events));
        };
        for (i, chunk) in events.chunks(EVENTS_PER_RECORD).enumerate() {
            let seq = first_seq + i as u64;
            let rec = enc.encode(&AlarmBatch {
                agent_id: self.agent_id.clone(),
                epoch: self.epoch,
                seq,
                events: chunk.to_vec(),
            })?;
            records.push((seq, rec, chunk.len()));
        }
        Ok((records, events))
    }

    /// Inside a seal's transaction: the alarm records and the engine's changed states and sequence numbers.
    fn write_alarms(
        &mut self,
        records: &[AlarmRecord],
        dirty: &[Dirty],
        now_ms: i64,
    ) -> Result<(), BufferError> {
        for (seq, rec, n) in records {
            self.conn
                .prepare_cached("INSERT INTO alarm_records(seq, record, events, sealed_ms) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![*seq as i64, rec, *n as i64, now_ms])?;
        }
        for d in dirty {
            match d {
                Dirty::State(rule, sid, state) => self
                    .conn
                    .prepare_cached("INSERT OR REPLACE INTO alarm_state(rule, series_id, state) VALUES (?1, ?2, ?3)")?
                    .execute(params![rule, sid, state])?,
                Dirty::Seq(rule, next) => self
                    .conn
                    .prepare_cached("INSERT OR REPLACE INTO alarm_seq(rule, next) VALUES (?1, ?2)")?
                    .execute(params![rule, *next as i64])?,
            };
        }
        Ok(())
    }

    /// After a seal's commit: counts and keeps the events for [`Buffer::take_alarm_events`].
    fn alarms_committed(&mut self, records: usize, events: Vec<AlarmEvent>, late: u64) {
        self.alarm_pending += records as u64;
        self.ledger.alarm_events += events.len() as u64;
        self.ledger.alarm_late_skipped += late;
        self.alarm_out.extend(events);
        // Nobody took them (no publisher): keep the newest.
        if self.alarm_out.len() > 10 * EVENTS_PER_RECORD {
            let excess = self.alarm_out.len() - 10 * EVENTS_PER_RECORD;
            self.alarm_out.drain(..excess);
        }
    }

    /// The stale clock at `now_ms`: the time up to which every reading that is not late has been released. That is
    /// `now_ms` less the reorder window, unless a group after `after_id` (not sealed yet) was committed before
    /// `now_ms`: its readings, and those of every newer group, have not been seen, so the clock stops at its commit
    /// time less the reorder window. (During a long seal of a backlog, live sources commit into newer groups; a
    /// clock at `now_ms` would raise their series stale before their readings were released.)
    pub(super) fn stale_clock(&self, after_id: i64, now_ms: i64) -> Result<i64, BufferError> {
        if self.draining {
            // No source runs: silence says nothing of the devices (no level is stale at the earliest time).
            return Ok(i64::MIN);
        }
        let oldest: Option<i64> = self
            .conn
            .prepare_cached("SELECT committed_ms FROM groups WHERE id > ?1 ORDER BY id LIMIT 1")?
            .query_row([after_id], |r| r.get(0))
            .optional()?;
        Ok(oldest
            .map_or(now_ms, |c| c.min(now_ms))
            .saturating_sub(self.alarm_lag_ms))
    }

    /// A seal without readings: the stale clock alone may raise alarms.
    fn seal_alarm_tick(&mut self, now_ms: i64) -> Result<SealReport, BufferError> {
        self.fresh_engines()?;
        if self.alarms.is_empty() {
            return Ok(SealReport::default());
        }
        let mut transitions = Vec::new();
        let clock = self.stale_clock(0, now_ms)?;
        self.alarms.tick(clock, &mut transitions);
        if transitions.is_empty() {
            return Ok(SealReport::default());
        }
        let res = self
            .alarm_records(&transitions, &HashMap::new(), self.next_seq)
            .and_then(|(records, events)| {
                let dirty = self.alarms.take_dirty();
                let next_seq = self.next_seq + records.len() as u64;
                self.in_sealing_tx(|b| {
                    b.write_alarms(&records, &dirty, now_ms)?;
                    b.conn
                        .prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_seq'")?
                        .execute([next_seq as i64])?;
                    b.mark_window_since(next_seq)?;
                    Ok(())
                })?;
                Ok((records.len(), events, next_seq))
            });
        match res {
            Ok((records, events, next_seq)) => {
                self.next_seq = next_seq;
                let n = events.len() as u64;
                self.alarms_committed(records, events, 0);
                Ok(SealReport {
                    alarm_events: n,
                    ..SealReport::default()
                })
            }
            Err(e) => {
                self.restore_engines()?;
                Err(e)
            }
        }
    }

    /// Like [`Buffer::in_tx`] for a transaction that writes records to send, committed with `synchronous=FULL`
    /// whatever the durability: a record goes to Kinesis only once its seal is on the disk. Under `normal`, a
    /// power cut could otherwise take a seal whose record was sent, and the next seal would number other readings
    /// with the same sequence number (the cloud lands both, as a collision). The fsync also makes every earlier
    /// commit durable (the WAL is written in order): one per seal, where `full` has one per commit.
    fn in_sealing_tx<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, BufferError>,
    ) -> Result<T, BufferError> {
        if self.durability == Durability::Full {
            return self.in_tx(f);
        }
        self.conn.execute_batch("PRAGMA synchronous=FULL")?;
        let res = self.in_tx(f);
        // Not an error of the seal, which committed or not as `res` says (reporting a committed seal as failed
        // would leave the next one to reuse its numbers): commits stay fsynced until the next seal sets it back.
        if let Err(e) = self.conn.execute_batch("PRAGMA synchronous=NORMAL") {
            tracing::warn!(error = %e, "cannot set synchronous=NORMAL back after a seal; commits are fsynced meanwhile");
        }
        res
    }

    /// Runs `f` inside `BEGIN IMMEDIATE … COMMIT`, rolling back if it fails.
    fn in_tx<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, BufferError>,
    ) -> Result<T, BufferError> {
        #[cfg(test)]
        {
            self.committed_with = self
                .conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))?;
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        #[cfg(test)]
        let f = {
            let fault = if self.fault.is_some() && self.fault_skip > 0 {
                self.fault_skip -= 1;
                None
            } else {
                self.fault.take()
            };
            move |b: &mut Self| match fault {
                Some(code) => {
                    let _ = f(b); // the transaction's writes happen, then the commit fails
                    Err(BufferError::Sqlite(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(code),
                        Some("injected".into()),
                    )))
                }
                None => f(b),
            }
        };
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

    /// What the buffer holds.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Where the readings went since open.
    pub fn ledger(&self) -> Ledger {
        self.ledger
    }

    /// This buffer file's epoch (see `proto/FORMAT.md`): drawn when the file was created, never 0.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The sequence number the next sealed batch gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The id of the newest row of `groups`: it only grows while the buffer is open (at open, the largest id in
    /// `groups`, 0 if empty). The buffer thread's readiness is `id <= ready_id`.
    pub fn last_row_id(&self) -> i64 {
        self.last_row_id
    }

    /// Bytes the buffer can still write: free space on its filesystem (for an unprivileged user) plus the pages
    /// SQLite keeps free inside the file (reused before the file grows). The free pages are counted only when the
    /// free space alone is below `enough` (each commit asks; in normal operation it costs one `statvfs`). `None`
    /// if the filesystem cannot be asked.
    pub fn disk_room(&self, enough: u64) -> Option<u64> {
        let fs = rustix::fs::statvfs(self.dir()).ok()?;
        let free = fs.f_bavail.saturating_mul(fs.f_frsize);
        if free >= enough {
            return Some(free);
        }
        let free_pages: i64 = self
            .conn
            .query_row(
                "SELECT freelist_count * page_size FROM pragma_freelist_count, pragma_page_size",
                [],
                |r| r.get(0),
            )
            .ok()?;
        Some(free + free_pages.max(0) as u64)
    }

    /// Size of the buffer's filesystem in bytes, if it can be asked.
    pub fn disk_size(&self) -> Option<u64> {
        let fs = rustix::fs::statvfs(self.dir()).ok()?;
        Some(fs.f_blocks.saturating_mul(fs.f_frsize))
    }

    fn dir(&self) -> &Path {
        self.path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    /// Gives the WAL's disk space back to the filesystem (`wal_checkpoint(TRUNCATE)`), after a write failed for
    /// space: a failed large transaction leaves the WAL file as large as the disk allowed. Best effort.
    pub fn release_wal(&self) {
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }

    /// Where a corrupt file was moved at open, if one was.
    pub fn moved_aside(&self) -> Option<&Path> {
        self.moved_aside.as_deref()
    }

    /// [`Buffer::series_id`] of a reading's shared series, looked up by its address first.
    fn series_id_of(&mut self, s: &Arc<Series>) -> Result<i64, BufferError> {
        let at = Arc::as_ptr(s) as usize;
        if let Some(&(_, id)) = self.series_by_arc.get(&at) {
            return Ok(id);
        }
        let id = self.series_id(s)?;
        let size = 64 + s.key.len() + s.tags.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
        if self.series_by_arc.len() >= ARC_CACHE_MAX_SERIES
            || self.series_by_arc_bytes + size > ARC_CACHE_MAX_BYTES
        {
            self.forget_series_addresses();
        }
        self.series_by_arc_bytes += size;
        self.series_by_arc.insert(at, (Arc::clone(s), id));
        Ok(id)
    }

    /// Empties `series_by_arc`, giving its memory back.
    fn forget_series_addresses(&mut self) {
        self.series_by_arc = HashMap::new();
        self.series_by_arc_bytes = 0;
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

    /// The series with buffer id `id`, if there is one.
    pub fn series(&mut self, id: i64) -> Result<Option<Series>, BufferError> {
        self.series_by_id(id)
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
            let s = series_of_row(key, &tags);
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
        self.append_with_refused(groups, [])
    }

    /// [`Buffer::append`], storing refused source messages in the same transaction.
    pub fn append_with_refused<'a>(
        &mut self,
        groups: impl IntoIterator<Item = &'a [NewReading]>,
        refused: impl IntoIterator<Item = &'a Refused>,
    ) -> Result<u64, BufferError> {
        let res = self.in_tx(|b| {
            let mut any_refused = false;
            for r in refused {
                let kept = &r.payload[..r.payload.len().min(MAX_REFUSED_PAYLOAD)];
                b.conn
                    .prepare_cached("INSERT INTO refused(at_ms, source, topic, reason, detail, size, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?
                    .execute(params![r.at_ms, r.source, r.topic, r.reason, r.detail, r.payload.len() as i64, kept])?;
                any_refused = true;
            }
            if any_refused {
                b.conn
                    .prepare_cached("DELETE FROM refused WHERE id <= (SELECT max(id) FROM refused) - ?1")?
                    .execute([MAX_REFUSED])?;
            }
            let (mut n, mut bytes) = (0u64, 0u64);
            // Group ids are given here, not by SQLite: SQLite reuses ids once a seal emptied the table, and the
            // reorder window's readiness (`id <= ready_id`) needs ids that only grow while the buffer is open.
            let mut id = b.last_row_id;
            let mut enc = std::mem::replace(&mut b.group, group::Encoder::new());
            let mut group_bytes = 0u64;
            let res = (|| -> Result<(), BufferError> {
                for msg in groups {
                    for r in msg {
                        let sid = b.series_id_of(&r.series)?;
                        enc.push(sid, r.ts_ms, &r.value, r.quality);
                        let size = ROW_BYTES + value_bytes(&r.value);
                        group_bytes += size;
                        n += 1;
                        bytes += size;
                        if enc.len() >= MAX_GROUP_READINGS {
                            id += 1;
                            b.insert_group(id, &mut enc, group_bytes)?;
                            group_bytes = 0;
                        }
                    }
                }
                if enc.len() > 0 {
                    id += 1;
                    b.insert_group(id, &mut enc, group_bytes)?;
                }
                Ok(())
            })();
            b.group = enc;
            res?;
            Ok((n, bytes, id))
        });
        let (n, bytes, last) = match res {
            Ok(v) => v,
            Err(e) => {
                // Series inserted in the rolled-back transaction must not stay cached; the half-built group goes.
                self.series_ids.clear();
                self.forget_series_addresses();
                self.series_by_id.clear();
                self.group = group::Encoder::new();
                return Err(e);
            }
        };
        self.last_row_id = last;
        self.stats.unsealed_readings += n;
        self.stats.unsealed_bytes += bytes;
        self.ledger.appended += n;
        Ok(n)
    }

    /// Inside an append's transaction: the readings in `enc` as group `id` (the encoder is emptied).
    fn insert_group(
        &mut self,
        id: i64,
        enc: &mut group::Encoder,
        bytes: u64,
    ) -> Result<(), BufferError> {
        let n = enc.len() as i64;
        self.conn
            .prepare_cached(
                "INSERT INTO groups(id, committed_ms, readings, bytes, blob) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![id, fieldlink_ops::unix_ms(), n, bytes as i64, enc.finish()])?;
        Ok(())
    }

    fn state(&mut self, sid: i64) -> Result<SeriesState, BufferError> {
        // Taken out of the cache, not cloned (a clone doubled the dedup states' memory during every seal): a seal
        // that commits puts it back, one that fails reloads the committed states (`restore_engines`). A state not
        // held has no deltas (see `states`): its whole row is all of it.
        if let Some(s) = self.states.remove(&sid) {
            return Ok(s);
        }
        Ok(whole_state(&self.conn, sid)?.0)
    }

    /// Seals the groups with `id <= up_to`, oldest first, whole groups while their readings fit in `max_rows` (at
    /// least one group, so a group larger than `max_rows` is sealed alone): releases them through
    /// [`order::release`] and writes the resulting records, in one transaction.
    pub fn seal(
        &mut self,
        up_to: i64,
        max_rows: usize,
        encoder: &mut Encoder,
        cfg: &BatchConfig,
        rules: Rules,
        now_ms: i64,
    ) -> Result<SealReport, BufferError> {
        match self.seal_begin(up_to, max_rows, cfg, rules, now_ms)? {
            seal::Begun::Idle(report) => Ok(report),
            seal::Begun::Job(job) => self.seal_finish(job.run(encoder)),
        }
    }

    /// Pending records for one `PutRecords` call: at most `max_records` and about `max_bytes` (always at least one
    /// oldest record, whatever its size: with the newest quarter beside it a call can pass `max_bytes` by that one
    /// record, never Kinesis' 5 MiB), leaving out those Kinesis acknowledged whose deletion failed
    /// ([`Buffer::note_undeleted`]). They are in flight from now until acknowledged or the next call of `pending`; the
    /// overflow policy does not drop records in flight. Alarm records come first, oldest first, ahead of every
    /// readings record. When more readings records are pending than fit, up to a quarter of the rest of the call
    /// (in records and in bytes) goes to the **newest** records and the rest to the oldest, so live data keeps
    /// flowing while a backlog drains. Readings records are returned oldest first, after the alarm records.
    ///
    /// Memory: rows are read one at a time and reading stops at the budget, so a call holds about `max_bytes`
    /// (plus one record) whatever the records' size.
    pub fn pending(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Pending>, BufferError> {
        let mut out: Vec<Pending> = Vec::new();
        let mut bytes = 0usize;
        if self.alarm_pending > 0 {
            take_within(
                (&self.conn, &self.undeleted),
                "SELECT seq, record, 0 FROM alarm_records ORDER BY seq",
                Budget {
                    records: max_records,
                    bytes: max_bytes,
                    at_least_one: true,
                    skip_above: None,
                },
                &mut out,
                &mut bytes,
            )?;
        }
        let first_reading = out.len();
        let records_left = max_records - out.len();
        let bytes_left = max_bytes.saturating_sub(bytes);
        // The newest first, within their quarter; then the oldest, below the newest taken, within the rest. When
        // everything fits, that is everything; when not (a backlog, by records or by bytes), the newest have their
        // quarter.
        let mut newest = Vec::new();
        let mut newest_bytes = 0usize;
        if self.stats.pending_batches > 1 && records_left >= 4 {
            take_within(
                (&self.conn, &self.undeleted),
                "SELECT seq, record, readings FROM batches ORDER BY seq DESC",
                Budget {
                    records: records_left / 4,
                    bytes: bytes_left / 4,
                    at_least_one: false,
                    skip_above: None,
                },
                &mut newest,
                &mut newest_bytes,
            )?;
        }
        let below = newest.last().map(|p| p.seq);
        take_within(
            (&self.conn, &self.undeleted),
            "SELECT seq, record, readings FROM batches ORDER BY seq",
            Budget {
                records: records_left - newest.len(),
                bytes: max_bytes.saturating_sub(newest_bytes),
                // The oldest always send at least one record (before the newest, if they share a small
                // budget): the backlog drains in order whatever the rate.
                at_least_one: out.is_empty(),
                skip_above: below,
            },
            &mut out,
            &mut bytes,
        )?;
        out.extend(newest.into_iter().rev());
        out[first_reading..].sort_by_key(|p| p.seq);
        self.in_flight = out.iter().map(|p| p.seq).collect();
        Ok(out)
    }

    /// Deletes records Kinesis acknowledged, alarm records and records of readings in one transaction; counts
    /// their readings as sent. Unknown sequence numbers (already dropped by the overflow policy) are ignored.
    /// Returns `(records, readings)` deleted. On an error nothing was deleted: a retry counts every record once.
    pub fn ack(&mut self, seqs: &[u64]) -> Result<(u64, u64), BufferError> {
        let alarms_pending = self.alarm_pending > 0;
        let (alarm_records, gone) = self.in_tx(|b| {
            let mut alarm_records = 0;
            let mut rest = Vec::with_capacity(seqs.len());
            for &s in seqs {
                if alarms_pending
                    && b.conn
                        .prepare_cached("DELETE FROM alarm_records WHERE seq = ?1")?
                        .execute([s as i64])?
                        > 0
                {
                    alarm_records += 1;
                } else {
                    rest.push(s);
                }
            }
            Ok((alarm_records, b.delete_batch_rows(&rest)?))
        })?;
        self.alarm_pending -= alarm_records;
        self.count_deleted(&gone);
        for s in seqs {
            self.in_flight.remove(s);
            self.undeleted.remove(s);
        }
        self.ledger.sent += gone.pending_readings;
        Ok((gone.pending_batches + alarm_records, gone.pending_readings))
    }

    fn delete_batches(&mut self, seqs: &[u64]) -> Result<Stats, BufferError> {
        let gone = self.in_tx(|b| b.delete_batch_rows(seqs))?;
        self.count_deleted(&gone);
        Ok(gone)
    }

    /// Deletes records of readings inside the caller's transaction; returns what they held.
    fn delete_batch_rows(&mut self, seqs: &[u64]) -> Result<Stats, BufferError> {
        let mut gone = Stats::default();
        for &s in seqs {
            let row: Option<(i64, i64)> = self
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
    }

    /// Takes deleted records of readings (after their transaction committed) out of the stats.
    fn count_deleted(&mut self, gone: &Stats) {
        self.stats.pending_batches -= gone.pending_batches;
        self.stats.pending_readings -= gone.pending_readings;
        self.stats.pending_bytes -= gone.pending_bytes;
    }

    /// Forgets the in-flight records (their call failed): the overflow policy may drop them again.
    pub fn release_in_flight(&mut self) {
        self.in_flight.clear();
    }

    /// `drop_oldest`: deletes the oldest pending records not in flight until the counted size is at most
    /// `max_bytes` (or none is left). Records Kinesis acknowledged whose deletion failed go first, as
    /// acknowledged (counted sent): deleting them loses nothing.
    pub fn drop_oldest(&mut self, max_bytes: u64) -> Result<Dropped, BufferError> {
        let acknowledged_records = if self.stats.bytes() > max_bytes {
            self.ack_undeleted()?
        } else {
            0
        };
        let readings = self.drop_unsent(max_bytes)?;
        Ok(Dropped {
            readings,
            acknowledged_records,
        })
    }

    /// The cap loop of [`Buffer::drop_oldest`]: the oldest records not in flight, counted dropped. Returns the
    /// readings dropped.
    fn drop_unsent(&mut self, max_bytes: u64) -> Result<u64, BufferError> {
        let mut dropped = 0;
        while self.stats.bytes() > max_bytes && self.stats.pending_batches > 0 {
            let excess = self.stats.bytes() - max_bytes;
            let mut seqs = Vec::new();
            let mut freed = 0u64;
            {
                let mut stmt = self.conn.prepare_cached(
                    "SELECT seq, length(record) FROM batches ORDER BY seq LIMIT ?1",
                )?;
                let mut q = stmt.query([(256 + self.in_flight.len()) as i64])?;
                while let Some(r) = q.next()? {
                    let seq = r.get::<_, i64>(0)? as u64;
                    if self.in_flight.contains(&seq) {
                        continue;
                    }
                    seqs.push(seq);
                    freed += r.get::<_, i64>(1)? as u64;
                    if freed >= excess {
                        break;
                    }
                }
            }
            if seqs.is_empty() {
                break; // everything left is in flight
            }
            match self.delete_batches(&seqs) {
                Ok(gone) => dropped += gone.pending_readings,
                Err(e) => {
                    // Earlier rounds are committed: count them before giving up.
                    self.ledger.dropped += dropped;
                    return Err(e);
                }
            }
        }
        self.ledger.dropped += dropped;
        Ok(dropped)
    }

    /// The newest dead letters: `(reason, series, ts_ms)`.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<(String, String, i64)>, BufferError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT reason, series, ts_ms FROM dead_letters ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// How much [`take_within`] may take.
struct Budget {
    /// Records.
    records: usize,
    /// Bytes of records.
    bytes: usize,
    /// Take the first row whatever its size (when nothing else is taken for the call: a record larger than the
    /// budget still goes, alone).
    at_least_one: bool,
    /// Stop at the first row whose seq reaches this one (rows taken from the other end).
    skip_above: Option<u64>,
}

/// Appends rows of `sql` (`seq, record, readings`, in its order) to `out` while `budget` allows, reading one row
/// at a time: at most `budget.bytes` (in `bytes`, shared with what `out` holds) plus one record in memory. Rows
/// whose seq is in `acknowledged` (Kinesis has them) are passed over.
fn take_within(
    (conn, acknowledged): (&Connection, &BTreeSet<u64>),
    sql: &str,
    budget: Budget,
    out: &mut Vec<Pending>,
    bytes: &mut usize,
) -> Result<(), BufferError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query([])?;
    let mut taken = 0;
    while taken < budget.records {
        let Some(r) = rows.next()? else { break };
        let seq = r.get::<_, i64>(0)? as u64;
        if budget.skip_above.is_some_and(|above| seq >= above) {
            break;
        }
        if acknowledged.contains(&seq) {
            continue;
        }
        let len = r.get_ref(1)?.as_bytes().map_or(0, <[u8]>::len);
        if !(budget.at_least_one && taken == 0) && *bytes + len > budget.bytes {
            break;
        }
        out.push(Pending {
            seq,
            readings: r.get::<_, i64>(2)? as u64,
            record: r.get(1)?,
        });
        *bytes += len;
        taken += 1;
    }
    Ok(())
}

#[cfg(test)]
mod alarm_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod window_tests;

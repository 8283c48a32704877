//! The streaming merge: sorted bronze files in, one hour's published parts out. Synchronous, local files only
//! (the shell downloads inputs first), so it is tested without S3.
//!
//! # What comes out
//! Every input is sorted by `(series, time, agent_id, batch_epoch, batch_seq)` (landing files by
//! [`crate::parquet::encode::encode`], published parts by this merge). The output is the union of the inputs
//! in the total order `(series, time, agent_id, batch_epoch, batch_seq, value_double, value_bigint,
//! value_boolean, value_string, quality, late)` with two kinds of **repeat** dropped:
//! - a row equal to the previous one in all those columns: the same reading of the same batch (a resend landed
//!   twice, a commit repeated after a crash, a landing file merged again into the file that already holds it);
//! - a row whose reading — `(series, time, agent_id)` and `(value_*, quality)` — an earlier row of the output
//!   already holds under another batch identity: the same reading sent in two batches by one agent. That happens when the agent's buffer is
//!   replaced (a re-imaged gateway, a new SD card) while the broker still holds a message the old buffer had
//!   committed but whose acknowledgement had not reached it (a kill -9 just after the commit, or an
//!   acknowledgement given up on when the connection dropped), or when a QoS 1 publisher resent a message across
//!   the replacement. The agent drops such a repeat itself while it keeps the same buffer file
//!   (`dedup_window_ms`); the compactor drops it across buffer files, as Timestream and InfluxDB do by their
//!   keys, which hold the agent: two agents reporting the same value of the same series key at the same time
//!   (a fleet sharing one configuration, Modbus polls on aligned ticks) keep both rows. The first row in the
//!   total order is kept (`late` is not part of the reading). Per `(series, time, agent_id)` at most
//!   [`MAX_READINGS_COMPARED`] distinct readings are remembered: beyond that a repeat is kept, never a reading
//!   dropped.
//!
//! Two rows with the same `(agent_id, batch_epoch, batch_seq, series, time)` but another value are both kept (a
//! batch identity reused with other content by a buffer file restored from a backup). So the output rows are a
//! function of the *set* of input rows, whatever files they came in; and since the writer is fed fixed-size
//! chunks ([`OUT_BATCH`] rows) the output bytes are a function of the rows too: merging again what is already
//! published, plus repeats, writes the same bytes.
//!
//! # Parts
//! An hour is one file, `part-00000.parquet`, unless [`Split::BySize`] cuts it: once a part's written size
//! reaches the cap, the part ends before the next row whose `(series, time)` differs from the last one, and
//! that row's `(series, time)` becomes a [`Boundary`]. A republish keeps the boundaries of the first
//! publication ([`Split::Fixed`]): each row goes to the part of the boundaries below it, so every row that was
//! in part `i` stays in part `i` and replacing the parts one at a time never shows a row twice or loses one.
//!
//! # Memory
//! Bounded by the number of inputs merged at once, not by the hour's size: each input holds one decoded
//! batch of [`IN_BATCH`] rows and one page per column; the output holds at most [`OUT_BATCH`] rows plus the
//! encoded row group in progress. [`merge_in_rounds`] merges more inputs than `fan_in` in rounds through
//! intermediate files.

use crate::parquet::encode::writer_options;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType, UInt64Type};
use arrow_array::{
    Array, BooleanArray, PrimitiveArray, RecordBatch, RecordBatchReader, StringArray,
};
use arrow_schema::{ArrowError, DataType, SchemaRef};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use parquet::errors::ParquetError;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// Distinct readings remembered per `(series, time, agent_id)` to find the same reading in another batch of the
/// same agent (most have one).
pub const MAX_READINGS_COMPARED: usize = 64;

/// Rows per batch read from an input.
pub const IN_BATCH: usize = 4096;
/// Rows per chunk handed to the writer (fixed, so the output bytes depend on the rows alone).
pub const OUT_BATCH: usize = 8192;

/// Why a merge failed; the hour is left as it was (nothing is published from a failed merge).
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Reading or writing a local file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not readable Parquet, or could not be written.
    #[error("{path}: {source}")]
    Parquet {
        /// The file.
        path: String,
        /// The cause.
        source: ParquetError,
    },
    /// A file is not a bronze file (a column is missing or of another type), or arrays could not be built.
    #[error("{path}: {message}")]
    Schema {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> MergeError + '_ {
    move |source| MergeError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn pq_err(path: &Path) -> impl Fn(ParquetError) -> MergeError + '_ {
    move |source| MergeError::Parquet {
        path: path.display().to_string(),
        source,
    }
}

fn arrow_err(path: &Path) -> impl Fn(ArrowError) -> MergeError + '_ {
    move |e| MergeError::Schema {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Where a part starts: the first `(series, time)` it holds (rows below go to earlier parts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boundary {
    /// Series key.
    pub series: String,
    /// Event time, Unix ms.
    pub time_ms: i64,
}

/// How an hour is cut into parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// At these boundaries (ascending): `n` boundaries give `n + 1` parts, empty ones included.
    Fixed(Vec<Boundary>),
    /// At the first change of `(series, time)` after a part's written size reached this many bytes.
    BySize(u64),
}

/// How output files are encoded.
#[derive(Debug, Clone, Copy)]
pub struct WriteSettings {
    /// Rows per row group.
    pub row_group_rows: usize,
    /// zstd level.
    pub zstd_level: i32,
}

/// One written part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartFile {
    /// The local file.
    pub path: PathBuf,
    /// Rows.
    pub rows: u64,
    /// Bytes.
    pub bytes: u64,
}

/// What a merge wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The parts, in order (`part-00000.parquet`, …).
    pub parts: Vec<PartFile>,
    /// The boundaries between them (`parts.len() - 1` of them).
    pub boundaries: Vec<Boundary>,
    /// Rows in the inputs.
    pub input_rows: u64,
    /// Rows written.
    pub rows: u64,
}

impl Merged {
    /// Input rows that were repeats (of a row of the same batch, or of a reading another batch carried) and were
    /// dropped.
    pub fn duplicates(&self) -> u64 {
        self.input_rows - self.rows
    }
}

/// The name of part `i` of an hour.
pub fn part_name(i: usize) -> String {
    format!("part-{i:05}.parquet")
}

/// The columns of a batch the merge compares, typed.
struct Cols {
    series: StringArray,
    time: PrimitiveArray<TimestampMillisecondType>,
    agent: StringArray,
    epoch: PrimitiveArray<UInt64Type>,
    seq: PrimitiveArray<Int64Type>,
    vd: PrimitiveArray<Float64Type>,
    vi: PrimitiveArray<Int64Type>,
    vb: BooleanArray,
    vs: StringArray,
    quality: StringArray,
    late: BooleanArray,
}

/// The columns the merge compares (every bronze file has them).
const COLUMNS: [&str; 11] = [
    "series",
    "time",
    "agent_id",
    "batch_epoch",
    "batch_seq",
    "value_double",
    "value_bigint",
    "value_boolean",
    "value_string",
    "quality",
    "late",
];

impl Cols {
    fn of(batch: &RecordBatch, path: &Path) -> Result<Self, MergeError> {
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| MergeError::Schema {
                    path: path.display().to_string(),
                    message: format!("no column {name}"),
                })
        };
        let bad = |name: &str, want: &str, got: &DataType| MergeError::Schema {
            path: path.display().to_string(),
            message: format!("column {name} is {got}, not {want}"),
        };
        let s = |name: &str| -> Result<StringArray, MergeError> {
            let a = col(name)?;
            a.as_string_opt::<i32>()
                .cloned()
                .ok_or_else(|| bad(name, "utf8", a.data_type()))
        };
        let b = |name: &str| -> Result<BooleanArray, MergeError> {
            let a = col(name)?;
            a.as_boolean_opt()
                .cloned()
                .ok_or_else(|| bad(name, "boolean", a.data_type()))
        };
        let time = col("time")?;
        let epoch = col("batch_epoch")?;
        let seq = col("batch_seq")?;
        let vd = col("value_double")?;
        let vi = col("value_bigint")?;
        Ok(Self {
            series: s("series")?,
            time: time
                .as_primitive_opt::<TimestampMillisecondType>()
                .cloned()
                .ok_or_else(|| bad("time", "timestamp(ms)", time.data_type()))?,
            agent: s("agent_id")?,
            epoch: epoch
                .as_primitive_opt::<UInt64Type>()
                .cloned()
                .ok_or_else(|| bad("batch_epoch", "uint64", epoch.data_type()))?,
            seq: seq
                .as_primitive_opt::<Int64Type>()
                .cloned()
                .ok_or_else(|| bad("batch_seq", "int64", seq.data_type()))?,
            vd: vd
                .as_primitive_opt::<Float64Type>()
                .cloned()
                .ok_or_else(|| bad("value_double", "float64", vd.data_type()))?,
            vi: vi
                .as_primitive_opt::<Int64Type>()
                .cloned()
                .ok_or_else(|| bad("value_bigint", "int64", vi.data_type()))?,
            vb: b("value_boolean")?,
            vs: s("value_string")?,
            quality: s("quality")?,
            late: b("late")?,
        })
    }

    /// `(series, time)` of row `i`.
    fn series_time(&self, i: usize) -> (&str, i64) {
        (self.series.value(i), self.time.value(i))
    }

    /// What makes two rows candidates for the same reading: its agent's series at one time. (Two agents may
    /// share series keys, a fleet with one configuration, and read the same value at the same tick: both stay, as
    /// in Timestream and InfluxDB, whose keys hold the agent.)
    fn agent_series_time(&self, i: usize) -> (&str, i64, &str) {
        (
            self.series.value(i),
            self.time.value(i),
            self.agent.value(i),
        )
    }

    /// What row `i` reads, apart from its series, time and the batch that carried it.
    fn reading(&self, i: usize) -> Reading {
        Reading {
            double: self.vd.is_valid(i).then(|| self.vd.value(i).to_bits()),
            bigint: self.vi.is_valid(i).then(|| self.vi.value(i)),
            boolean: opt_bool(&self.vb, i),
            string: opt_str(&self.vs, i).map(str::to_owned),
            quality: opt_str(&self.quality, i).map(str::to_owned),
        }
    }
}

/// A reading's value and quality (an `f64` by its bits: the same reading has the same bits).
#[derive(Debug, PartialEq, Eq)]
struct Reading {
    double: Option<u64>,
    bigint: Option<i64>,
    boolean: Option<bool>,
    string: Option<String>,
    quality: Option<String>,
}

/// The readings emitted for the current `(series, time, agent_id)`, to drop the same reading carried by another
/// batch of the same agent. Filled only when it gets a second row, so the usual single row costs no allocation.
#[derive(Default)]
struct Emitted {
    readings: Vec<Reading>,
}

impl Emitted {
    /// Whether row `row` of `slot` holds a reading already emitted for its `(series, time, agent_id)`; `prev` is the last
    /// row emitted. Remembers the row's reading when it is new (it will be emitted).
    fn holds(
        &mut self,
        pool: &Pool,
        prev: Option<(usize, usize)>,
        slot: usize,
        row: usize,
    ) -> bool {
        let cols = &pool.get(slot).cols;
        let Some((ps, pr)) = prev else {
            return false;
        };
        let before = &pool.get(ps).cols;
        if before.agent_series_time(pr) != cols.agent_series_time(row) {
            self.readings.clear();
            return false;
        }
        if self.readings.is_empty() {
            self.readings.push(before.reading(pr));
        }
        let reading = cols.reading(row);
        if self.readings.contains(&reading) {
            return true;
        }
        if self.readings.len() < MAX_READINGS_COMPARED {
            self.readings.push(reading);
        }
        false
    }
}

fn opt_str(a: &StringArray, i: usize) -> Option<&str> {
    a.is_valid(i).then(|| a.value(i))
}

fn opt_bool(a: &BooleanArray, i: usize) -> Option<bool> {
    a.is_valid(i).then(|| a.value(i))
}

/// The merge's total order on rows (see the module doc); `Equal` means a repeat.
fn cmp_rows(a: &Cols, i: usize, b: &Cols, j: usize) -> Ordering {
    a.series
        .value(i)
        .cmp(b.series.value(j))
        .then_with(|| a.time.value(i).cmp(&b.time.value(j)))
        .then_with(|| a.agent.value(i).cmp(b.agent.value(j)))
        .then_with(|| a.epoch.value(i).cmp(&b.epoch.value(j)))
        .then_with(|| a.seq.value(i).cmp(&b.seq.value(j)))
        .then_with(|| {
            let (x, y) = (
                a.vd.is_valid(i).then(|| a.vd.value(i)),
                b.vd.is_valid(j).then(|| b.vd.value(j)),
            );
            match (x, y) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                (x, y) => x.is_some().cmp(&y.is_some()),
            }
        })
        .then_with(|| {
            let x = a.vi.is_valid(i).then(|| a.vi.value(i));
            x.cmp(&b.vi.is_valid(j).then(|| b.vi.value(j)))
        })
        .then_with(|| opt_bool(&a.vb, i).cmp(&opt_bool(&b.vb, j)))
        .then_with(|| opt_str(&a.vs, i).cmp(&opt_str(&b.vs, j)))
        .then_with(|| opt_str(&a.quality, i).cmp(&opt_str(&b.quality, j)))
        .then_with(|| opt_bool(&a.late, i).cmp(&opt_bool(&b.late, j)))
}

/// Opens a bronze file for reading in batches of [`IN_BATCH`] rows; returns the reader and its row count.
fn open_input(path: &Path) -> Result<(ParquetRecordBatchReader, u64), MergeError> {
    let file = File::open(path).map_err(io_err(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq_err(path))?;
    let rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
    let reader = builder
        .with_batch_size(IN_BATCH)
        .build()
        .map_err(pq_err(path))?;
    Ok((reader, rows))
}

/// The row count of a Parquet file (its footer only).
pub fn row_count(path: &Path) -> Result<u64, MergeError> {
    let file = File::open(path).map_err(io_err(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq_err(path))?;
    Ok(builder.metadata().file_metadata().num_rows().max(0) as u64)
}

/// The `(series, time)` of the first row of a bronze file; `None` if it has no rows.
pub fn first_key(path: &Path) -> Result<Option<Boundary>, MergeError> {
    let (reader, _) = open_input(path)?;
    for batch in reader {
        let batch = batch.map_err(arrow_err(path))?;
        if batch.num_rows() > 0 {
            let cols = Cols::of(&batch, path)?;
            let (series, time_ms) = cols.series_time(0);
            return Ok(Some(Boundary {
                series: series.to_owned(),
                time_ms,
            }));
        }
    }
    Ok(None)
}

/// A batch held while a cursor reads it or picked rows point into it.
struct Slot {
    batch: RecordBatch,
    cols: Cols,
    /// Cursors on it, plus one if the last emitted row is in it.
    refs: usize,
}

/// The batches of the merge, by slot number.
#[derive(Default)]
struct Pool {
    slots: Vec<Option<Slot>>,
    live: usize,
}

impl Pool {
    fn add(&mut self, batch: RecordBatch, cols: Cols) -> usize {
        let slot = Slot {
            batch,
            cols,
            refs: 1,
        };
        self.live += 1;
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            self.slots[i] = Some(slot);
            i
        } else {
            self.slots.push(Some(slot));
            self.slots.len() - 1
        }
    }

    fn get(&self, i: usize) -> &Slot {
        match self.slots.get(i) {
            Some(Some(s)) => s,
            // Every slot a cursor, a pick or the last row points at is live: a bug otherwise.
            _ => unreachable!("merge pool slot {i} is not live"),
        }
    }

    fn release(&mut self, i: usize) {
        if let Some(Some(s)) = self.slots.get_mut(i) {
            s.refs = s.refs.saturating_sub(1);
        }
    }

    fn retain(&mut self, i: usize) {
        if let Some(Some(s)) = self.slots.get_mut(i) {
            s.refs += 1;
        }
    }

    /// Frees the slots nothing points at any more (call only when no picks are pending).
    fn sweep(&mut self) {
        for s in &mut self.slots {
            if s.as_ref().is_some_and(|x| x.refs == 0) {
                *s = None;
                self.live -= 1;
            }
        }
    }
}

struct Cursor {
    reader: ParquetRecordBatchReader,
    path: PathBuf,
    slot: usize,
    row: usize,
    len: usize,
}

/// The part being written.
struct Part {
    writer: ArrowWriter<BufWriter<File>>,
    path: PathBuf,
    /// Materialized rows not yet written (fewer than [`OUT_BATCH`]).
    staged: Vec<RecordBatch>,
    staged_rows: usize,
    rows: u64,
}

/// Routes emitted rows to parts and writes them.
struct Output<'a> {
    schema: SchemaRef,
    settings: WriteSettings,
    name: &'a dyn Fn(usize) -> PathBuf,
    split: Split,
    /// Boundaries passed (Fixed) or made (BySize).
    boundaries: Vec<Boundary>,
    part: Option<Part>,
    index: usize,
    done: Vec<PartFile>,
    /// Picked rows of the current part not yet materialized: (slot, row).
    pending: Vec<(usize, usize)>,
    /// BySize: the current part reached the cap; it ends at the next change of `(series, time)`.
    full: bool,
}

impl Output<'_> {
    fn open(&mut self) -> Result<(), MergeError> {
        let path = (self.name)(self.index);
        let file = File::create(&path).map_err(io_err(&path))?;
        let options = writer_options(self.settings.row_group_rows, self.settings.zstd_level)
            .map_err(pq_err(&path))?;
        let writer =
            ArrowWriter::try_new_with_options(BufWriter::new(file), self.schema.clone(), options)
                .map_err(pq_err(&path))?;
        self.part = Some(Part {
            writer,
            path,
            staged: Vec::new(),
            staged_rows: 0,
            rows: 0,
        });
        self.full = false;
        Ok(())
    }

    /// Turns the pending picks into a staged batch (so the pool can let their batches go).
    fn materialize(&mut self, pool: &Pool) -> Result<(), MergeError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(part) = self.part.as_mut() else {
            return Ok(());
        };
        // interleave wants a dense list of batches: map the slots used to positions.
        let mut slots: Vec<usize> = self.pending.iter().map(|(s, _)| *s).collect();
        slots.sort_unstable();
        slots.dedup();
        let batches: Vec<&RecordBatch> = slots.iter().map(|s| &pool.get(*s).batch).collect();
        let indices: Vec<(usize, usize)> = self
            .pending
            .iter()
            .map(|(s, r)| (slots.binary_search(s).unwrap_or(0), *r))
            .collect();
        let batch = arrow_select::interleave::interleave_record_batch(&batches, &indices)
            .map_err(arrow_err(&part.path))?;
        part.staged_rows += batch.num_rows();
        part.staged.push(batch);
        self.pending.clear();
        Ok(())
    }

    /// Writes the staged rows as one chunk.
    fn write_staged(&mut self) -> Result<(), MergeError> {
        let Some(part) = self.part.as_mut() else {
            return Ok(());
        };
        if part.staged_rows == 0 {
            return Ok(());
        }
        let chunk = arrow_select::concat::concat_batches(&self.schema, &part.staged)
            .map_err(arrow_err(&part.path))?;
        part.writer.write(&chunk).map_err(pq_err(&part.path))?;
        part.rows += chunk.num_rows() as u64;
        part.staged.clear();
        part.staged_rows = 0;
        if let Split::BySize(cap) = self.split {
            let size = part.writer.bytes_written() + part.writer.in_progress_size();
            self.full = size as u64 >= cap;
        }
        Ok(())
    }

    /// Ends the current part (writing what is left) and fsyncs it.
    fn close(&mut self, pool: &Pool) -> Result<(), MergeError> {
        self.materialize(pool)?;
        self.write_staged()?;
        let Some(part) = self.part.take() else {
            return Ok(());
        };
        let path = part.path;
        let file = part
            .writer
            .into_inner()
            .map_err(pq_err(&path))?
            .into_inner()
            .map_err(|e| io_err(&path)(e.into_error()))?;
        file.sync_all().map_err(io_err(&path))?;
        let bytes = file.metadata().map_err(io_err(&path))?.len();
        self.done.push(PartFile {
            path,
            rows: part.rows,
            bytes,
        });
        Ok(())
    }

    /// Closes the current part and opens the next.
    fn next_part(&mut self, pool: &Pool) -> Result<(), MergeError> {
        self.close(pool)?;
        self.index += 1;
        self.open()
    }

    /// Adds row `row` of `slot` (the next row in merge order, not a repeat); `prev` is the last row emitted.
    fn emit(
        &mut self,
        pool: &Pool,
        slot: usize,
        row: usize,
        prev: Option<(usize, usize)>,
    ) -> Result<(), MergeError> {
        let key = pool.get(slot).cols.series_time(row);
        match &self.split {
            Split::Fixed(bounds) => {
                let passed = bounds
                    .iter()
                    .skip(self.index)
                    .take_while(|b| key >= (b.series.as_str(), b.time_ms))
                    .cloned()
                    .collect::<Vec<_>>();
                for b in passed {
                    self.boundaries.push(b);
                    self.next_part(pool)?;
                }
            }
            Split::BySize(_) => {
                let changed = prev.is_none_or(|(s, r)| pool.get(s).cols.series_time(r) != key);
                if self.full && changed {
                    self.boundaries.push(Boundary {
                        series: key.0.to_owned(),
                        time_ms: key.1,
                    });
                    self.next_part(pool)?;
                }
            }
        }
        self.pending.push((slot, row));
        let unwritten = self.part.as_ref().map_or(0, |p| p.staged_rows) + self.pending.len();
        if unwritten >= OUT_BATCH {
            self.materialize(pool)?;
            self.write_staged()?;
        }
        Ok(())
    }
}

/// Sift-down in a min-heap of cursor indices ordered by `less`.
fn sift_down(heap: &mut [usize], mut i: usize, less: &impl Fn(usize, usize) -> bool) {
    loop {
        let (l, r) = (2 * i + 1, 2 * i + 2);
        let mut m = i;
        if l < heap.len() && less(heap[l], heap[m]) {
            m = l;
        }
        if r < heap.len() && less(heap[r], heap[m]) {
            m = r;
        }
        if m == i {
            return;
        }
        heap.swap(i, m);
        i = m;
    }
}

/// Loads the next non-empty batch of a cursor into the pool; `false` at the end of its file.
fn load(cursor: &mut Cursor, pool: &mut Pool) -> Result<bool, MergeError> {
    for batch in cursor.reader.by_ref() {
        let batch = batch.map_err(arrow_err(&cursor.path))?;
        if batch.num_rows() == 0 {
            continue;
        }
        let cols = Cols::of(&batch, &cursor.path)?;
        cursor.len = batch.num_rows();
        cursor.row = 0;
        cursor.slot = pool.add(batch, cols);
        return Ok(true);
    }
    Ok(false)
}

/// Merges `inputs` (each sorted, see the module doc) into parts named by `name(i)`, cut by `split`.
/// Memory grows with `inputs.len()`, not with their size; see [`merge_in_rounds`] for many inputs.
pub fn merge(
    inputs: &[PathBuf],
    name: &dyn Fn(usize) -> PathBuf,
    split: Split,
    settings: WriteSettings,
) -> Result<Merged, MergeError> {
    let mut pool = Pool::default();
    let mut cursors: Vec<Cursor> = Vec::with_capacity(inputs.len());
    let mut schema: Option<(SchemaRef, &Path)> = None;
    let mut input_rows = 0;
    for path in inputs {
        let (reader, rows) = open_input(path)?;
        input_rows += rows;
        let s = reader.schema();
        match &schema {
            None => {
                for c in COLUMNS {
                    if s.column_with_name(c).is_none() {
                        return Err(MergeError::Schema {
                            path: path.display().to_string(),
                            message: format!("no column {c}: not a bronze file"),
                        });
                    }
                }
                schema = Some((s.clone(), path));
            }
            Some((first, first_path)) if first.fields() != s.fields() => {
                return Err(MergeError::Schema {
                    path: path.display().to_string(),
                    message: format!(
                        "its columns differ from those of {}: {s:?} vs {first:?}",
                        first_path.display()
                    ),
                })
            }
            Some(_) => {}
        }
        let mut c = Cursor {
            reader,
            path: path.clone(),
            slot: 0,
            row: 0,
            len: 0,
        };
        if load(&mut c, &mut pool)? {
            cursors.push(c);
        }
    }
    let Some((schema, _)) = schema else {
        return Ok(Merged {
            parts: Vec::new(),
            boundaries: Vec::new(),
            input_rows: 0,
            rows: 0,
        });
    };
    let mut out = Output {
        schema,
        settings,
        name,
        split,
        boundaries: Vec::new(),
        part: None,
        index: 0,
        done: Vec::new(),
        pending: Vec::new(),
        full: false,
    };
    out.open()?;
    let mut heap: Vec<usize> = (0..cursors.len()).collect();
    // A cursor index orders after another with an equal row, so the heap's order is total.
    let less = |cursors: &[Cursor], pool: &Pool, a: usize, b: usize| {
        let (ca, cb) = (&cursors[a], &cursors[b]);
        cmp_rows(
            &pool.get(ca.slot).cols,
            ca.row,
            &pool.get(cb.slot).cols,
            cb.row,
        )
        .then(a.cmp(&b))
            == Ordering::Less
    };
    for i in (0..heap.len() / 2).rev() {
        sift_down(&mut heap, i, &|a, b| less(&cursors, &pool, a, b));
    }
    let mut prev: Option<(usize, usize)> = None;
    let mut emitted = Emitted::default();
    let mut rows = 0u64;
    let max_live = 2 * cursors.len() + 2;
    while let Some(&top) = heap.first() {
        let (slot, row) = (cursors[top].slot, cursors[top].row);
        let repeat = prev.is_some_and(|(s, r)| {
            cmp_rows(&pool.get(s).cols, r, &pool.get(slot).cols, row) == Ordering::Equal
        }) || emitted.holds(&pool, prev, slot, row);
        if !repeat {
            out.emit(&pool, slot, row, prev)?;
            rows += 1;
            pool.retain(slot);
            if let Some((s, _)) = prev {
                pool.release(s);
            }
            prev = Some((slot, row));
        }
        let c = &mut cursors[top];
        c.row += 1;
        if c.row == c.len {
            pool.release(c.slot);
            if !load(c, &mut pool)? {
                let last = heap.len() - 1;
                heap.swap(0, last);
                heap.pop();
            }
            if pool.live > max_live {
                out.materialize(&pool)?;
                pool.sweep();
            }
        }
        sift_down(&mut heap, 0, &|a, b| less(&cursors, &pool, a, b));
    }
    if let Split::Fixed(bounds) = &out.split {
        // Parts after the last row still exist (empty): the part count is fixed.
        let rest: Vec<Boundary> = bounds.get(out.index..).unwrap_or_default().to_vec();
        for b in rest {
            out.boundaries.push(b);
            out.next_part(&pool)?;
        }
    }
    out.close(&pool)?;
    Ok(Merged {
        parts: out.done,
        boundaries: out.boundaries,
        input_rows,
        rows,
    })
}

/// [`merge`] with at most `fan_in` inputs open at once: larger sets are merged in rounds of `fan_in` into
/// intermediate files in `work_dir` (deleted as they are used up). The result is the same as one merge.
pub fn merge_in_rounds(
    inputs: &[PathBuf],
    fan_in: usize,
    work_dir: &Path,
    name: &dyn Fn(usize) -> PathBuf,
    split: Split,
    settings: WriteSettings,
) -> Result<Merged, MergeError> {
    let fan_in = fan_in.max(2);
    let mut input_rows = 0;
    for p in inputs {
        input_rows += row_count(p)?;
    }
    let mut level: Vec<PathBuf> = inputs.to_vec();
    let mut temps: Vec<PathBuf> = Vec::new();
    let mut round = 0;
    let intermediate = WriteSettings {
        zstd_level: 1,
        ..settings
    };
    while level.len() > fan_in {
        let mut next = Vec::new();
        let mut made = Vec::new();
        for (i, chunk) in level.chunks(fan_in).enumerate() {
            if let [one] = chunk {
                next.push(one.clone());
                continue;
            }
            let path = work_dir.join(format!("round-{round}-{i}.parquet"));
            let p = path.clone();
            merge(
                chunk,
                &move |_| p.clone(),
                Split::Fixed(Vec::new()),
                intermediate,
            )?;
            next.push(path.clone());
            made.push(path);
        }
        // Intermediate files this round consumed; one passed on alone (the last of an odd count) stays.
        for t in std::mem::take(&mut temps) {
            if next.contains(&t) {
                made.push(t);
            } else {
                let _ = std::fs::remove_file(t);
            }
        }
        temps = made;
        level = next;
        round += 1;
    }
    let mut merged = merge(&level, name, split, settings)?;
    for t in temps {
        let _ = std::fs::remove_file(t);
    }
    merged.input_rows = input_rows;
    Ok(merged)
}

#[cfg(test)]
mod tests;

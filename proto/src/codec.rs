//! Encoder and decoder of format version 1 (see `proto/FORMAT.md`).

use crate::limits::*;
use crate::model::{Batch, Quality, Reading, Series, Value};
use crate::varint::{put_str, put_svarint, put_uvarint, Reader};
use crate::{MAGIC, VERSION};

/// Why a record could not be decoded. Every variant means "this record is bad": dead-letter it and move on;
/// retrying the same bytes gives the same error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record does not start with `FLNK`.
    #[error("not a fieldlink record: bad magic bytes")]
    BadMagic,
    /// A version this decoder does not know; newer agents talk to an older cloud.
    #[error("unsupported format version {0} (this decoder reads version {VERSION})")]
    UnsupportedVersion(u8),
    /// The input ended inside a field.
    #[error("truncated record: input ends inside {what}")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// The record is larger than a Kinesis record can be.
    #[error("record is {size} bytes, above the limit of {MAX_RECORD_BYTES}")]
    RecordTooLarge {
        /// Its size.
        size: usize,
    },
    /// The header declares a decompressed body above the limit (a decompression bomb, or garbage).
    #[error("body declares {declared} bytes decompressed, above the limit of {MAX_BODY_BYTES}")]
    BodyTooLarge {
        /// What the header (or the zstd frame) declares.
        declared: u64,
    },
    /// A count or length above a format limit.
    #[error("{what} is {value}, above the limit of {limit}")]
    LimitExceeded {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A field whose value is not allowed.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// The field.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// zstd refused the body (corrupt frame, checksum mismatch, larger than declared).
    #[error("body does not decompress: {0}")]
    Decompress(String),
}

/// Why a batch could not be encoded: the batch breaks a format limit. Fix the producer (split the batch, shorten
/// the name); retrying the same batch gives the same error.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A field breaks a format rule.
    #[error("cannot encode {what}: {why}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// The rule it breaks.
        why: String,
    },
    /// zstd failed (out of memory).
    #[error("zstd: {0}")]
    Compress(#[from] std::io::Error),
}

fn invalid(what: &'static str, why: impl Into<String>) -> EncodeError {
    EncodeError::Invalid {
        what,
        why: why.into(),
    }
}

/// The uncompressed header of a record, read without decompressing the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// The producing agent.
    pub agent_id: &'a str,
    /// The agent buffer's epoch (0: the record has none).
    pub epoch: u64,
    /// The agent's batch sequence number.
    pub seq: u64,
    /// Declared decompressed body size.
    pub body_len: u32,
    /// The compressed body.
    pub body: &'a [u8],
    /// The body holds alarm events, not readings (flag [`crate::alarm::FLAG_ALARMS`]; see [`crate::decode_any`]).
    pub alarms: bool,
}

/// Header flag: an 8-byte buffer epoch follows the agent id.
pub(crate) const FLAG_EPOCH: u8 = 0b0000_0001;

const KIND_TYPE_MASK: u8 = 0b0000_0111;
const KIND_RESERVED_MASK: u8 = 0b1000_1000;
const KIND_QUALITY_SHIFT: u8 = 4;
const KIND_LATE: u8 = 0b0100_0000;

fn check_len(what: &'static str, s: &str, min: usize, max: usize) -> Result<(), EncodeError> {
    if s.len() < min || s.len() > max {
        return Err(invalid(
            what,
            format!("{} bytes, allowed {min}..={max}", s.len()),
        ));
    }
    Ok(())
}

/// Writes the uncompressed body of `batch` into `out` (cleared first).
pub fn encode_body(batch: &Batch, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.clear();
    let ns = batch.series.len();
    let nr = batch.readings.len();
    if ns == 0 || ns > MAX_SERIES {
        return Err(invalid(
            "series",
            format!("{ns} series, allowed 1..={MAX_SERIES}"),
        ));
    }
    if nr == 0 || nr > MAX_READINGS {
        return Err(invalid(
            "readings",
            format!("{nr} readings, allowed 1..={MAX_READINGS}"),
        ));
    }

    put_uvarint(out, ns as u64);
    for s in &batch.series {
        check_len("series key", &s.key, 1, MAX_KEY_BYTES)?;
        if s.tags.len() > MAX_TAGS {
            return Err(invalid(
                "tags",
                format!("{} tags on {}, allowed {MAX_TAGS}", s.tags.len(), s.key),
            ));
        }
        put_str(out, &s.key);
        put_uvarint(out, s.tags.len() as u64);
        for (k, v) in &s.tags {
            check_len("tag name", k, 1, MAX_TAG_NAME_BYTES)?;
            check_len("tag value", v, 0, MAX_TAG_VALUE_BYTES)?;
            put_str(out, k);
            put_str(out, v);
        }
    }

    // Counting sort by series: stable, O(n), keeps each series' readings in their given order.
    let mut runs = vec![0u32; ns];
    for r in &batch.readings {
        let slot = runs.get_mut(r.series as usize).ok_or_else(|| {
            invalid(
                "reading",
                format!("series index {} out of range ({ns} series)", r.series),
            )
        })?;
        *slot += 1;
    }
    let mut next = Vec::with_capacity(ns);
    let mut acc = 0u32;
    for &n in &runs {
        next.push(acc);
        acc += n;
    }
    let mut order = vec![0u32; nr];
    for (i, r) in batch.readings.iter().enumerate() {
        let slot = &mut next[r.series as usize];
        order[*slot as usize] = i as u32;
        *slot += 1;
    }

    let base_ts = batch.readings.iter().map(|r| r.ts_ms).min().unwrap_or(0);
    put_uvarint(out, nr as u64);
    put_svarint(out, base_ts);
    for &n in &runs {
        put_uvarint(out, u64::from(n));
    }

    // Timestamps: per series, the first relative to base_ts, then deltas (wrapping i64 arithmetic).
    let mut start = 0usize;
    for &n in &runs {
        let mut prev = base_ts;
        for &i in &order[start..start + n as usize] {
            let ts = batch.readings[i as usize].ts_ms;
            put_svarint(out, ts.wrapping_sub(prev));
            prev = ts;
        }
        start += n as usize;
    }

    let mut n_f64 = 0usize;
    for &i in &order {
        let r = &batch.readings[i as usize];
        let mut kind = r.value.type_code() | ((r.quality as u8) << KIND_QUALITY_SHIFT);
        if r.late {
            kind |= KIND_LATE;
        }
        if matches!(r.value, Value::F64(_)) {
            n_f64 += 1;
        }
        out.push(kind);
    }

    // f64 column, byte-shuffled into 8 planes.
    let f64_start = out.len();
    out.resize(f64_start + 8 * n_f64, 0);
    let mut j = 0usize;
    for &i in &order {
        if let Value::F64(v) = batch.readings[i as usize].value {
            for (k, b) in v.to_le_bytes().into_iter().enumerate() {
                out[f64_start + k * n_f64 + j] = b;
            }
            j += 1;
        }
    }

    // i64 column: deltas to the previous i64 of the same series.
    let mut start = 0usize;
    for &n in &runs {
        let mut prev = 0i64;
        for &i in &order[start..start + n as usize] {
            if let Value::I64(v) = batch.readings[i as usize].value {
                put_svarint(out, v.wrapping_sub(prev));
                prev = v;
            }
        }
        start += n as usize;
    }
    for &i in &order {
        if let Value::Bool(b) = batch.readings[i as usize].value {
            out.push(u8::from(b));
        }
    }
    for &i in &order {
        if let Value::Str(s) = &batch.readings[i as usize].value {
            check_len("string value", s, 0, MAX_STRING_BYTES)?;
            put_str(out, s);
        }
    }
    if out.len() > MAX_BODY_BYTES {
        return Err(invalid(
            "body",
            format!("{} bytes, above {MAX_BODY_BYTES}", out.len()),
        ));
    }
    Ok(())
}

/// Decodes an uncompressed body. `agent_id` and `seq` are copied into the batch; its `epoch` is 0 (the header
/// holds it: [`decode`] sets it).
pub fn decode_body(body: &[u8], agent_id: &str, seq: u64) -> Result<Batch, DecodeError> {
    let mut r = Reader::new(body);
    // Each series needs at least 2 bytes (key length, tag count); each tag 2 (two lengths).
    let ns = r.count("series_count", MAX_SERIES, 2)?;
    if ns == 0 {
        return Err(DecodeError::Malformed {
            what: "series_count",
            why: "zero series",
        });
    }
    let mut series = Vec::with_capacity(ns);
    for _ in 0..ns {
        let key = r.string("series key", MAX_KEY_BYTES)?;
        if key.is_empty() {
            return Err(DecodeError::Malformed {
                what: "series key",
                why: "empty",
            });
        }
        let nt = r.count("tag_count", MAX_TAGS, 2)?;
        let mut tags = Vec::with_capacity(nt);
        for _ in 0..nt {
            let k = r.string("tag name", MAX_TAG_NAME_BYTES)?;
            if k.is_empty() {
                return Err(DecodeError::Malformed {
                    what: "tag name",
                    why: "empty",
                });
            }
            let v = r.string("tag value", MAX_TAG_VALUE_BYTES)?;
            tags.push((k, v));
        }
        series.push(Series { key, tags });
    }

    // Each reading needs at least 2 bytes (its timestamp varint and its kind byte).
    let nr = r.count("reading_count", MAX_READINGS, 2)?;
    if nr == 0 {
        return Err(DecodeError::Malformed {
            what: "reading_count",
            why: "zero readings",
        });
    }
    let base_ts = r.svarint("base_ts")?;
    let mut runs = Vec::with_capacity(ns);
    let mut total = 0u64;
    for _ in 0..ns {
        let n = r.uvarint("runs")?;
        total = total.saturating_add(n);
        runs.push(n as usize);
    }
    if total != nr as u64 {
        return Err(DecodeError::Malformed {
            what: "runs",
            why: "do not sum to reading_count",
        });
    }

    let mut ts = Vec::with_capacity(nr);
    for &n in &runs {
        let mut prev = base_ts;
        for _ in 0..n {
            prev = prev.wrapping_add(r.svarint("timestamp")?);
            ts.push(prev);
        }
    }

    let kinds = r.bytes(nr, "kind column")?;
    let mut n_f64 = 0usize;
    for &k in kinds {
        if k & KIND_RESERVED_MASK != 0 {
            return Err(DecodeError::Malformed {
                what: "kind byte",
                why: "reserved bit set",
            });
        }
        match k & KIND_TYPE_MASK {
            0 => n_f64 += 1,
            1..=3 => {}
            _ => {
                return Err(DecodeError::Malformed {
                    what: "kind byte",
                    why: "unknown value type",
                })
            }
        }
        if Quality::from_code((k >> KIND_QUALITY_SHIFT) & 0b11).is_none() {
            return Err(DecodeError::Malformed {
                what: "kind byte",
                why: "unknown quality",
            });
        }
    }
    let planes = r.bytes(8 * n_f64, "f64 column")?;

    let mut readings = Vec::with_capacity(nr);
    let mut j = 0usize; // reading index in body order
    let mut jf = 0usize; // f64 index
                         // Column order is i64, bool, string: read the i64 and bool columns first, strings last while assembling.
    let mut i64_vals = Vec::new();
    {
        let mut start = 0usize;
        for &n in &runs {
            let mut prev = 0i64;
            for &k in &kinds[start..start + n] {
                if k & KIND_TYPE_MASK == 1 {
                    prev = prev.wrapping_add(r.svarint("i64 column")?);
                    i64_vals.push(prev);
                }
            }
            start += n;
        }
    }
    let n_bool = kinds.iter().filter(|&&k| k & KIND_TYPE_MASK == 2).count();
    let bools = r.bytes(n_bool, "bool column")?;
    let mut i64_iter = i64_vals.into_iter();
    let mut bool_iter = bools.iter();
    for (si, &n) in runs.iter().enumerate() {
        for _ in 0..n {
            let k = kinds[j];
            let value = match k & KIND_TYPE_MASK {
                0 => {
                    let mut b = [0u8; 8];
                    for (p, byte) in b.iter_mut().enumerate() {
                        *byte = planes[p * n_f64 + jf];
                    }
                    jf += 1;
                    Value::F64(f64::from_le_bytes(b))
                }
                1 => Value::I64(i64_iter.next().unwrap_or_default()),
                2 => match bool_iter.next() {
                    Some(0) => Value::Bool(false),
                    Some(1) => Value::Bool(true),
                    _ => {
                        return Err(DecodeError::Malformed {
                            what: "bool column",
                            why: "byte is not 0 or 1",
                        })
                    }
                },
                _ => Value::Str(r.string("string value", MAX_STRING_BYTES)?),
            };
            readings.push(Reading {
                series: si as u32,
                ts_ms: ts[j],
                value,
                quality: Quality::from_code((k >> KIND_QUALITY_SHIFT) & 0b11).unwrap_or_default(),
                late: k & KIND_LATE != 0,
            });
            j += 1;
        }
    }
    if r.remaining() != 0 {
        return Err(DecodeError::Malformed {
            what: "body",
            why: "trailing bytes after the last column",
        });
    }
    Ok(Batch {
        agent_id: agent_id.to_owned(),
        epoch: 0,
        seq,
        series,
        readings,
    })
}

/// Reads a record's header without decompressing anything.
pub fn peek_header(record: &[u8]) -> Result<Header<'_>, DecodeError> {
    if record.len() > MAX_RECORD_BYTES {
        return Err(DecodeError::RecordTooLarge { size: record.len() });
    }
    let mut r = Reader::new(record);
    if r.bytes(4, "magic")? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let flags = r.u8("flags")?;
    if flags & !(FLAG_EPOCH | crate::alarm::FLAG_ALARMS) != 0 {
        return Err(DecodeError::Malformed {
            what: "flags",
            why: "reserved flags set",
        });
    }
    let id_len = r.u8("agent id length")? as usize;
    if id_len == 0 || id_len > MAX_AGENT_ID_BYTES {
        return Err(DecodeError::Malformed {
            what: "agent id",
            why: "length outside 1..=64",
        });
    }
    let agent_id =
        std::str::from_utf8(r.bytes(id_len, "agent id")?).map_err(|_| DecodeError::Malformed {
            what: "agent id",
            why: "invalid UTF-8",
        })?;
    let epoch = if flags & FLAG_EPOCH != 0 {
        let e = u64::from_le_bytes(r.bytes(8, "epoch")?.try_into().unwrap_or_default());
        if e == 0 {
            return Err(DecodeError::Malformed {
                what: "epoch",
                why: "zero with the epoch flag set",
            });
        }
        e
    } else {
        0
    };
    let seq = u64::from_le_bytes(r.bytes(8, "batch seq")?.try_into().unwrap_or_default());
    let body_len = u32::from_le_bytes(r.bytes(4, "body length")?.try_into().unwrap_or_default());
    if body_len as usize > MAX_BODY_BYTES {
        return Err(DecodeError::BodyTooLarge {
            declared: u64::from(body_len),
        });
    }
    let body = r.bytes(r.remaining(), "body")?;
    Ok(Header {
        agent_id,
        epoch,
        seq,
        body_len,
        body,
        alarms: flags & crate::alarm::FLAG_ALARMS != 0,
    })
}

/// Reusable encoder: keeps a zstd context and a scratch buffer between batches.
pub struct Encoder {
    compressor: zstd::bulk::Compressor<'static>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

impl Encoder {
    /// An encoder compressing at zstd `level` (1..=22; 3 is zstd's default).
    pub fn new(level: i32) -> Result<Self, EncodeError> {
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        compressor.include_checksum(true)?;
        compressor.include_contentsize(true)?;
        Ok(Self {
            compressor,
            body: Vec::new(),
        })
    }

    /// Encodes a whole record (header and compressed body).
    pub fn encode(&mut self, batch: &Batch) -> Result<Vec<u8>, EncodeError> {
        let id = batch.agent_id.as_bytes();
        if id.is_empty() || id.len() > MAX_AGENT_ID_BYTES {
            return Err(invalid(
                "agent id",
                format!("{} bytes, allowed 1..={MAX_AGENT_ID_BYTES}", id.len()),
            ));
        }
        encode_body(batch, &mut self.body)?;
        let compressed = self.compressor.compress(&self.body)?;
        let mut out = Vec::with_capacity(27 + id.len() + compressed.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(if batch.epoch != 0 { FLAG_EPOCH } else { 0 });
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        if batch.epoch != 0 {
            out.extend_from_slice(&batch.epoch.to_le_bytes());
        }
        out.extend_from_slice(&batch.seq.to_le_bytes());
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&compressed);
        Ok(out)
    }
}

/// Encodes one record at zstd `level`. For many batches, reuse an [`Encoder`].
pub fn encode(batch: &Batch, level: i32) -> Result<Vec<u8>, EncodeError> {
    Encoder::new(level)?.encode(batch)
}

/// Decodes one readings record, checking every limit before allocating. An alarm-event record is refused with
/// `Malformed { what: "record", .. }` (read it with [`crate::decode_any`]).
pub fn decode(record: &[u8]) -> Result<Batch, DecodeError> {
    let h = peek_header(record)?;
    if h.alarms {
        return Err(DecodeError::Malformed {
            what: "record",
            why: "it holds alarm events, not readings (decode_any reads it)",
        });
    }
    let body = decompressed_body(&h)?;
    let mut batch = decode_body(&body, h.agent_id, h.seq)?;
    batch.epoch = h.epoch;
    Ok(batch)
}

/// Decompresses a record's body, checking the declared sizes before allocating.
pub(crate) fn decompressed_body(h: &Header<'_>) -> Result<Vec<u8>, DecodeError> {
    let declared = zstd::zstd_safe::get_frame_content_size(h.body)
        .map_err(|_| DecodeError::Decompress("not a zstd frame".into()))?;
    match declared {
        Some(n) if n > MAX_BODY_BYTES as u64 => {
            return Err(DecodeError::BodyTooLarge { declared: n })
        }
        Some(n) if n != u64::from(h.body_len) => {
            return Err(DecodeError::Malformed {
                what: "body",
                why: "zstd frame size differs from header",
            })
        }
        Some(_) => {}
        None => {
            return Err(DecodeError::Malformed {
                what: "body",
                why: "zstd frame has no content size",
            })
        }
    }
    let body = zstd::bulk::decompress(h.body, h.body_len as usize)
        .map_err(|e| DecodeError::Decompress(e.to_string()))?;
    if body.len() != h.body_len as usize {
        return Err(DecodeError::Malformed {
            what: "body",
            why: "decompressed size differs from header",
        });
    }
    Ok(body)
}

//! Record header, errors, the [`Encoder`] and the version dispatch (see `proto/FORMAT.md`). The bodies of the
//! two versions are in `v1.rs` and `v2.rs`; what they share (limits, grouping by series, the kind byte) is here.

use crate::limits::*;
use crate::model::{Batch, Quality, Reading};
use crate::varint::Reader;
use crate::{v1, v2, Version, MAGIC};

/// Why a record could not be decoded. Every variant means "this record is bad": dead-letter it and move on;
/// retrying the same bytes gives the same error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record does not start with `FLNK`.
    #[error("not a fieldlink record: bad magic bytes")]
    BadMagic,
    /// A version this decoder does not know; newer agents talk to an older cloud.
    #[error("unsupported format version {0} (this decoder reads versions 1 and 2)")]
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

pub(crate) fn invalid(what: &'static str, why: impl Into<String>) -> EncodeError {
    EncodeError::Invalid {
        what,
        why: why.into(),
    }
}

/// The uncompressed header of a record, read without decompressing the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// The format version of the body.
    pub version: Version,
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

pub(crate) const KIND_TYPE_MASK: u8 = 0b0000_0111;
const KIND_RESERVED_MASK: u8 = 0b1000_1000;
const KIND_QUALITY_SHIFT: u8 = 4;
const KIND_LATE: u8 = 0b0100_0000;
pub(crate) const TYPE_F64: u8 = 0;
pub(crate) const TYPE_I64: u8 = 1;
pub(crate) const TYPE_BOOL: u8 = 2;

/// The kind byte of a reading: value type, quality, late flag.
pub(crate) fn kind_of(r: &Reading) -> u8 {
    let mut kind = r.value.type_code() | ((r.quality as u8) << KIND_QUALITY_SHIFT);
    if r.late {
        kind |= KIND_LATE;
    }
    kind
}

/// Checks a kind byte read from a body.
pub(crate) fn check_kind(k: u8) -> Result<(), DecodeError> {
    if k & KIND_RESERVED_MASK != 0 {
        return Err(DecodeError::Malformed {
            what: "kind byte",
            why: "reserved bit set",
        });
    }
    if k & KIND_TYPE_MASK > 3 {
        return Err(DecodeError::Malformed {
            what: "kind byte",
            why: "unknown value type",
        });
    }
    if (k >> KIND_QUALITY_SHIFT) & 0b11 == 3 {
        return Err(DecodeError::Malformed {
            what: "kind byte",
            why: "unknown quality",
        });
    }
    Ok(())
}

/// The quality and late flag of a checked kind byte.
pub(crate) fn quality_late(k: u8) -> (Quality, bool) {
    let q = Quality::from_code((k >> KIND_QUALITY_SHIFT) & 0b11).unwrap_or_default();
    (q, k & KIND_LATE != 0)
}

pub(crate) fn check_len(
    what: &'static str,
    s: &str,
    min: usize,
    max: usize,
) -> Result<(), EncodeError> {
    if s.len() < min || s.len() > max {
        return Err(invalid(
            what,
            format!("{} bytes, allowed {min}..={max}", s.len()),
        ));
    }
    Ok(())
}

/// Checks a series key and its tags against the limits of [`crate::limits`]: what [`encode`] refuses a batch
/// for, whatever its readings. A producer checks a series here before it accepts readings of it, so that no
/// batch it builds later is refused for it.
pub fn check_series(key: &str, tags: &[(String, String)]) -> Result<(), EncodeError> {
    check_len("series key", key, 1, MAX_KEY_BYTES)?;
    if tags.len() > MAX_TAGS {
        return Err(invalid(
            "tags",
            format!("{} tags on {key}, allowed {MAX_TAGS}", tags.len()),
        ));
    }
    for (k, v) in tags {
        check_len("tag name", k, 1, MAX_TAG_NAME_BYTES)?;
        check_len("tag value", v, 0, MAX_TAG_VALUE_BYTES)?;
    }
    Ok(())
}

/// Checks `batch` against the limits both versions share and groups its readings by series: afterwards `runs[i]`
/// is the number of readings of series `i` and `order` lists the reading indices series-major (a stable counting
/// sort: each series keeps its readings in their given order). The key and tag lengths are checked here; string
/// values where each version writes them.
pub(crate) fn group(
    batch: &Batch,
    runs: &mut Vec<u32>,
    order: &mut Vec<u32>,
) -> Result<(), EncodeError> {
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
    for s in &batch.series {
        check_series(&s.key, &s.tags)?;
    }
    runs.clear();
    runs.resize(ns, 0);
    for r in &batch.readings {
        let slot = runs.get_mut(r.series as usize).ok_or_else(|| {
            invalid(
                "reading",
                format!("series index {} out of range ({ns} series)", r.series),
            )
        })?;
        *slot += 1;
    }
    // `next[i]`: where series i's next reading goes in `order`.
    let mut next = Vec::with_capacity(ns);
    let mut acc = 0u32;
    for &n in runs.iter() {
        next.push(acc);
        acc += n;
    }
    order.clear();
    order.resize(nr, 0);
    for (i, r) in batch.readings.iter().enumerate() {
        let slot = &mut next[r.series as usize];
        order[*slot as usize] = i as u32;
        *slot += 1;
    }
    Ok(())
}

/// Writes the uncompressed body of `batch` in format `version` into `out` (cleared first).
pub fn encode_body(batch: &Batch, version: Version, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match version {
        Version::V1 => v1::encode(batch, out),
        Version::V2 => v2::encode(batch, &mut v2::Scratch::default(), out),
    }
}

/// Decodes an uncompressed body of format `version`. `agent_id` and `seq` are copied into the batch; its `epoch`
/// is 0 (the header holds it: [`decode`] sets it).
pub fn decode_body(
    body: &[u8],
    version: Version,
    agent_id: &str,
    seq: u64,
) -> Result<Batch, DecodeError> {
    let (series, readings) = match version {
        Version::V1 => v1::decode(body)?,
        Version::V2 => v2::decode(body)?,
    };
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
    let version = Version::from_byte(version).ok_or(DecodeError::UnsupportedVersion(version))?;
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
        version,
        agent_id,
        epoch,
        seq,
        body_len,
        body,
        alarms: flags & crate::alarm::FLAG_ALARMS != 0,
    })
}

/// Version 2 bodies below this size are also encoded as version 1, and the smaller record is written.
const SMALL_BODY: usize = 512;

/// Reusable encoder: keeps a zstd context and scratch buffers between batches.
pub struct Encoder {
    compressor: zstd::bulk::Compressor<'static>,
    body: Vec<u8>,
    scratch: v2::Scratch,
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
            scratch: v2::Scratch::default(),
        })
    }

    /// Encodes a whole record (header and compressed body) in the current format version, [`Version::LATEST`].
    pub fn encode(&mut self, batch: &Batch) -> Result<Vec<u8>, EncodeError> {
        self.encode_version(batch, Version::LATEST)
    }

    /// Encodes a whole record (header and compressed body) in format `version`. An agent writes what the oldest
    /// consumer of its stream reads. With [`Version::V2`], a batch whose body is tiny (under 512 bytes) is written
    /// in version 1 when that record is smaller: a reader of version 2 reads both, and no record is larger than
    /// version 1 would have made it.
    pub fn encode_version(
        &mut self,
        batch: &Batch,
        version: Version,
    ) -> Result<Vec<u8>, EncodeError> {
        let id = batch.agent_id.as_bytes();
        if id.is_empty() || id.len() > MAX_AGENT_ID_BYTES {
            return Err(invalid(
                "agent id",
                format!("{} bytes, allowed 1..={MAX_AGENT_ID_BYTES}", id.len()),
            ));
        }
        let (version, body_len, compressed) = match version {
            Version::V1 => {
                v1::encode(batch, &mut self.body)?;
                (
                    Version::V1,
                    self.body.len(),
                    self.compressor.compress(&self.body)?,
                )
            }
            Version::V2 => {
                v2::encode(batch, &mut self.scratch, &mut self.body)?;
                let v2 = self.compressor.compress(&self.body)?;
                let v2_len = self.body.len();
                if v2_len < SMALL_BODY {
                    // A tiny body leaves zstd little to work with, and there version 2's per-series bytes can
                    // cost more than version 1's redundancy, which zstd removes: take whichever is smaller.
                    v1::encode(batch, &mut self.body)?;
                    let v1 = self.compressor.compress(&self.body)?;
                    if v1.len() < v2.len() {
                        (Version::V1, self.body.len(), v1)
                    } else {
                        (Version::V2, v2_len, v2)
                    }
                } else {
                    (Version::V2, v2_len, v2)
                }
            }
        };
        let flags = if batch.epoch != 0 { FLAG_EPOCH } else { 0 };
        Ok(record(
            version as u8,
            flags,
            id,
            batch.epoch,
            batch.seq,
            body_len,
            &compressed,
        ))
    }
}

/// A whole record: the header (`FORMAT.md`: magic, version, flags, agent id, the epoch if `flags` has
/// [`FLAG_EPOCH`], sequence number, body length) and the compressed body.
pub(crate) fn record(
    version: u8,
    flags: u8,
    id: &[u8],
    epoch: u64,
    seq: u64,
    body_len: usize,
    compressed: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(27 + id.len() + compressed.len());
    out.extend_from_slice(&MAGIC);
    out.push(version);
    out.push(flags);
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    if flags & FLAG_EPOCH != 0 {
        out.extend_from_slice(&epoch.to_le_bytes());
    }
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(compressed);
    out
}

/// Encodes one record in format [`Version::LATEST`] at zstd `level`. For many batches, reuse an [`Encoder`].
pub fn encode(batch: &Batch, level: i32) -> Result<Vec<u8>, EncodeError> {
    Encoder::new(level)?.encode(batch)
}

thread_local! {
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
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
    let mut batch = decode_body(&body, h.version, h.agent_id, h.seq)?;
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
    // One decompression context per thread: creating one costs about as much as decoding a small record.
    let body = DCTX
        .with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new()?);
            }
            match d.as_mut() {
                Some(d) => d.decompress(h.body, h.body_len as usize),
                None => Err(std::io::Error::other("no zstd context")),
            }
        })
        .map_err(|e| DecodeError::Decompress(e.to_string()))?;
    if body.len() != h.body_len as usize {
        return Err(DecodeError::Malformed {
            what: "body",
            why: "decompressed size differs from header",
        });
    }
    Ok(body)
}

//! fieldlink wire format, versions 1 and 2.
//!
//! One Kinesis record carries one [`Batch`]: a header (magic `FLNK`, version, agent id, buffer epoch, batch
//! sequence number, decompressed size) followed by a zstd-compressed, columnar, series-major body. The normative
//! description is `proto/FORMAT.md`; this crate is its reference implementation.
//!
//! Version 2 (what [`Encoder::encode`] writes) codes each series' doubles that are decimals as integer mantissas
//! with one exponent per series and batch (`m / 10^e`, exact: a value is coded so only if the decoder's division
//! gives back its very bits; every other double, NaN, ±inf and −0.0 included, is stored as its 8 bytes),
//! timestamps as delta-of-delta, one kind byte per series where all its readings share it, and front-coded series
//! keys. Version 1 records still decode: [`decode`] dispatches on the version byte, and
//! [`Encoder::encode_version`] still writes version 1 for consumers that read nothing else.
//!
//! Invariants this crate guarantees:
//! - [`decode`] never allocates more than the [`limits`] allow, whatever the input: every count and length is checked
//!   against its limit *and* against the bytes actually present before anything is reserved.
//! - [`decode`] rejects unknown versions ([`DecodeError::UnsupportedVersion`]), truncated input
//!   ([`DecodeError::Truncated`]) and oversized bodies ([`DecodeError::BodyTooLarge`]) with distinct errors.
//! - `decode(encode(b)) == b` for every batch `encode` accepts, in either version, up to the series-major ordering
//!   of readings (readings of one series keep their relative order). Every f64 bit pattern round-trips bit for
//!   bit (NaN payloads, −0.0, ±inf, subnormals).
//! - Encoding is deterministic: the same batch and level give the same bytes.
//!
//! An alarm-event record ([`alarm`]) shares the header (flag bit 1 set) and the batch sequence; [`decode`] refuses
//! it as `Malformed`, [`decode_any`] reads either kind.
//!
//! The crate has no I/O and no async; it depends only on `zstd` and `thiserror`.

pub mod alarm;
mod codec;
mod decimal;
mod model;
mod v1;
mod v2;
mod varint;

pub use alarm::{decode_any, Record};
pub use codec::{
    check_series, decode, decode_body, encode, encode_body, peek_header, DecodeError, EncodeError,
    Encoder, Header,
};
pub use model::{Batch, Quality, Reading, Series, Value};

/// Hard limits of format versions 1 and 2. A decoder refuses anything beyond them before allocating.
pub mod limits {
    /// Largest record (header + compressed body) Kinesis accepts: 1 MiB.
    pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
    /// Largest decompressed body.
    pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
    /// Series per batch.
    pub const MAX_SERIES: usize = 65_536;
    /// Readings per batch.
    pub const MAX_READINGS: usize = 1_000_000;
    /// Tags per series.
    pub const MAX_TAGS: usize = 64;
    /// Bytes in a series key.
    pub const MAX_KEY_BYTES: usize = 1024;
    /// Bytes in a tag name.
    pub const MAX_TAG_NAME_BYTES: usize = 256;
    /// Bytes in a tag value.
    pub const MAX_TAG_VALUE_BYTES: usize = 1024;
    /// Bytes in a string value.
    pub const MAX_STRING_BYTES: usize = 65_536;
    /// Bytes in an agent id.
    pub const MAX_AGENT_ID_BYTES: usize = 64;
}

/// A format version: the record header's version byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Version {
    /// Version 1: byte-shuffled doubles, one kind byte per reading, timestamp deltas.
    V1 = 1,
    /// Version 2: decimal-aware doubles, delta-of-delta timestamps, kinds per series, front-coded keys.
    V2 = 2,
}

impl Version {
    /// The version [`Encoder::encode`] writes.
    pub const LATEST: Version = Version::V2;

    /// The version of a header's version byte, if this crate knows it.
    pub fn from_byte(b: u8) -> Option<Version> {
        match b {
            1 => Some(Version::V1),
            2 => Some(Version::V2),
            _ => None,
        }
    }
}

/// The format version [`Encoder::encode`] writes (the decoder reads it and every older one).
pub const VERSION: u8 = Version::LATEST as u8;
/// The four bytes every record starts with.
pub const MAGIC: [u8; 4] = *b"FLNK";

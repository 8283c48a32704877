//! fieldlink wire format, version 1.
//!
//! One Kinesis record carries one [`Batch`]: a header (magic `FLNK`, version, agent id, batch sequence number,
//! decompressed size) followed by a zstd-compressed, columnar, series-major body. The normative description is
//! `proto/FORMAT.md`; this crate is its reference implementation.
//!
//! Invariants this crate guarantees:
//! - [`decode`] never allocates more than the [`limits`] allow, whatever the input: every count and length is checked
//!   against its limit *and* against the bytes actually present before anything is reserved.
//! - [`decode`] rejects unknown versions ([`DecodeError::UnsupportedVersion`]), truncated input
//!   ([`DecodeError::Truncated`]) and oversized bodies ([`DecodeError::BodyTooLarge`]) with distinct errors.
//! - `decode(encode(b)) == b` for every batch `encode` accepts, up to the series-major ordering of readings
//!   (readings of one series keep their relative order). NaN payloads are preserved bit for bit.
//! - Encoding is deterministic: the same batch and level give the same bytes.
//!
//! An alarm-event record ([`alarm`]) shares the header (flag bit 1 set) and the batch sequence; [`decode`] refuses
//! it as `Malformed`, [`decode_any`] reads either kind.
//!
//! The crate has no I/O and no async; it depends only on `zstd` and `thiserror`.

pub mod alarm;
mod codec;
mod model;
mod varint;

pub use alarm::{decode_any, Record};
pub use codec::{
    decode, decode_body, encode, encode_body, peek_header, DecodeError, EncodeError, Encoder,
    Header,
};
pub use model::{Batch, Quality, Reading, Series, Value};

/// Hard limits of format version 1. A decoder refuses anything beyond them before allocating.
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

/// The format version this crate writes and reads.
pub const VERSION: u8 = 1;
/// The four bytes every record starts with.
pub const MAGIC: [u8; 4] = *b"FLNK";

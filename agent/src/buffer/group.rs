//! The blob of one row of `groups`: the readings of one commit (or a part of it), in arrival order. Pure.
//!
//! ```text
//! u8      format = 1
//! varint  n                      readings that follow
//! n times:
//!   varint  series id            the buffer's `series.id` (≥ 1)
//!   varint  zigzag(ts − prev)    event time, Unix ms, as a delta from the previous reading's (the first from 0)
//!   u8      kind                 value type (bits 0–2: 0 f64, 1 i64, 2 bool, 3 string) | quality << 4
//!   value   f64: 8 bytes, IEEE 754 bits little-endian (NaN, ±inf, −0 exact)
//!           i64: varint zigzag;  bool: 1 byte (0/1);  string: varint length, UTF-8 bytes
//! ```
//! Varints are unsigned LEB128 (at most 10 bytes). A blob that does not parse to exactly `n` readings with no
//! bytes left over is refused as a whole ([`decode`] returns `None`); decoding never allocates more than the blob's
//! size allows.

use crate::order::Pending;
use fieldlink_proto::{Quality, Value};

/// The blob format written by [`Encoder`].
const FORMAT: u8 = 1;

/// The smallest possible encoded reading (one-byte series id, one-byte delta, kind, bool value).
const MIN_READING_BYTES: usize = 4;

/// Builds one group blob.
#[derive(Debug)]
pub(crate) struct Encoder {
    buf: Vec<u8>,
    body: Vec<u8>,
    n: u64,
    prev_ts: i64,
}

impl Encoder {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::new(),
            body: Vec::new(),
            n: 0,
            prev_ts: 0,
        }
    }

    /// Readings added since the last [`Encoder::finish`].
    pub(crate) fn len(&self) -> u64 {
        self.n
    }

    pub(crate) fn push(&mut self, series_id: i64, ts_ms: i64, value: &Value, quality: Quality) {
        let b = &mut self.body;
        put_varint(b, series_id as u64);
        put_varint(b, zigzag(ts_ms.wrapping_sub(self.prev_ts)));
        self.prev_ts = ts_ms;
        let ty = match value {
            Value::F64(_) => 0u8,
            Value::I64(_) => 1,
            Value::Bool(_) => 2,
            Value::Str(_) => 3,
        };
        b.push(ty | ((quality as u8) << 4));
        match value {
            Value::F64(f) => b.extend_from_slice(&f.to_bits().to_le_bytes()),
            Value::I64(i) => put_varint(b, zigzag(*i)),
            Value::Bool(v) => b.push(u8::from(*v)),
            Value::Str(s) => {
                put_varint(b, s.len() as u64);
                b.extend_from_slice(s.as_bytes());
            }
        }
        self.n += 1;
    }

    /// The blob of the readings pushed so far; the encoder starts a new one.
    pub(crate) fn finish(&mut self) -> &[u8] {
        self.buf.clear();
        self.buf.push(FORMAT);
        put_varint(&mut self.buf, self.n);
        self.buf.extend_from_slice(&self.body);
        self.body.clear();
        self.n = 0;
        self.prev_ts = 0;
        &self.buf
    }
}

/// Appends the readings of `blob` to `out`; `None` (and `out` unchanged) if the blob is malformed.
pub(crate) fn decode(blob: &[u8], out: &mut Vec<Pending>) -> Option<()> {
    let start = out.len();
    let res = decode_into(blob, out);
    if res.is_none() {
        out.truncate(start);
    }
    res
}

fn decode_into(blob: &[u8], out: &mut Vec<Pending>) -> Option<()> {
    let (&format, mut b) = blob.split_first()?;
    if format != FORMAT {
        return None;
    }
    let n = usize::try_from(get_varint(&mut b)?).ok()?;
    if n > b.len() / MIN_READING_BYTES {
        return None;
    }
    out.reserve(n);
    let mut ts = 0i64;
    for _ in 0..n {
        let series = i64::try_from(get_varint(&mut b)?).ok()?;
        ts = ts.wrapping_add(unzigzag(get_varint(&mut b)?));
        let (&kind, rest) = b.split_first()?;
        b = rest;
        let quality = match kind >> 4 {
            0 => Quality::Good,
            1 => Quality::Uncertain,
            2 => Quality::Bad,
            _ => return None,
        };
        let value = match kind & 0x0f {
            0 => {
                let (bits, rest) = b.split_first_chunk::<8>()?;
                b = rest;
                Value::F64(f64::from_bits(u64::from_le_bytes(*bits)))
            }
            1 => Value::I64(unzigzag(get_varint(&mut b)?)),
            2 => {
                let (&v, rest) = b.split_first()?;
                b = rest;
                match v {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    _ => return None,
                }
            }
            3 => {
                let len = usize::try_from(get_varint(&mut b)?).ok()?;
                if len > b.len() {
                    return None;
                }
                let (s, rest) = b.split_at(len);
                b = rest;
                Value::Str(std::str::from_utf8(s).ok()?.to_owned())
            }
            _ => return None,
        };
        out.push(Pending {
            series,
            ts_ms: ts,
            value,
            quality,
        });
    }
    b.is_empty().then_some(())
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub(crate) fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

pub(crate) fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            *b = &b[i + 1..];
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u64>().prop_map(|b| Value::F64(f64::from_bits(b))),
            any::<i64>().prop_map(Value::I64),
            any::<bool>().prop_map(Value::Bool),
            ".{0,40}".prop_map(Value::Str),
        ]
    }

    fn quality() -> impl Strategy<Value = Quality> {
        prop_oneof![
            Just(Quality::Good),
            Just(Quality::Uncertain),
            Just(Quality::Bad)
        ]
    }

    /// Values compared by their bits (NaN payloads, −0).
    fn bits(p: &[Pending]) -> Vec<(i64, i64, String, Quality)> {
        p.iter()
            .map(|r| {
                let v = match &r.value {
                    Value::F64(f) => format!("f{}", f.to_bits()),
                    other => format!("{other:?}"),
                };
                (r.series, r.ts_ms, v, r.quality)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn every_reading_round_trips_exactly(
            rows in prop::collection::vec((1..i64::MAX, any::<i64>(), value(), quality()), 0..60)
        ) {
            let mut enc = Encoder::new();
            for (s, ts, v, q) in &rows {
                enc.push(*s, *ts, v, *q);
            }
            let blob = enc.finish().to_vec();
            let mut out = Vec::new();
            prop_assert!(decode(&blob, &mut out).is_some());
            let want: Vec<Pending> = rows
                .into_iter()
                .map(|(series, ts_ms, value, quality)| Pending { series, ts_ms, value, quality })
                .collect();
            prop_assert_eq!(bits(&out), bits(&want));
        }

        #[test]
        fn a_damaged_blob_is_refused_or_decodes_without_panicking(
            rows in prop::collection::vec((1..1000i64, any::<i64>(), value()), 1..20),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
        ) {
            let mut enc = Encoder::new();
            for (s, ts, v) in &rows {
                enc.push(*s, *ts, v, Quality::Good);
            }
            let blob = enc.finish().to_vec();
            let mut out = vec![Pending { series: 7, ts_ms: 7, value: Value::Bool(true), quality: Quality::Good }];
            // Truncated: always refused, `out` untouched.
            let short = &blob[..cut.index(blob.len())];
            prop_assert!(decode(short, &mut out).is_none());
            prop_assert_eq!(out.len(), 1);
            // A flipped byte: refused, or some readings; never a panic.
            let mut bad = blob.clone();
            let i = flip.0.index(bad.len());
            bad[i] ^= flip.1 | 1;
            let _ = decode(&bad, &mut out);
        }
    }

    #[test]
    fn a_ten_field_message_takes_about_eleven_bytes_per_reading() {
        let mut enc = Encoder::new();
        for m in 0..100i64 {
            for f in 0..10 {
                enc.push(
                    1 + f,
                    1_772_431_200_000 + m * 100,
                    &Value::F64(m as f64 * 0.5),
                    Quality::Good,
                );
            }
        }
        let n = enc.finish().len();
        assert!(n <= 1000 * 12, "{n} bytes for 1000 readings");
    }

    #[test]
    fn unknown_formats_and_trailing_bytes_are_refused() {
        let mut enc = Encoder::new();
        enc.push(1, 5, &Value::I64(-3), Quality::Bad);
        let blob = enc.finish().to_vec();
        let mut out = Vec::new();
        assert!(decode(&blob, &mut out).is_some());
        assert_eq!(out[0].value, Value::I64(-3));
        let mut v2 = blob.clone();
        v2[0] = 2;
        assert!(decode(&v2, &mut Vec::new()).is_none());
        let mut longer = blob;
        longer.push(0);
        assert!(decode(&longer, &mut Vec::new()).is_none());
    }
}

//! Body of format version 1 (`proto/FORMAT.md`, "Version 1 body"): series table, runs, timestamp deltas, one
//! kind byte per reading, byte-shuffled f64 column, i64 deltas, bools, strings.

use crate::codec::{
    check_kind, check_len, group, invalid, kind_of, quality_late, DecodeError, EncodeError,
    KIND_TYPE_MASK, TYPE_BOOL, TYPE_F64, TYPE_I64,
};
use crate::limits::*;
use crate::model::{Batch, Reading, Series, Value};
use crate::varint::{put_str, put_svarint, put_uvarint, Reader};

/// Writes the version 1 body of `batch` into `out` (cleared first).
pub(crate) fn encode(batch: &Batch, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.clear();
    let (mut runs, mut order) = (Vec::new(), Vec::new());
    group(batch, &mut runs, &mut order)?;

    put_uvarint(out, batch.series.len() as u64);
    for s in &batch.series {
        put_str(out, &s.key);
        put_uvarint(out, s.tags.len() as u64);
        for (k, v) in &s.tags {
            put_str(out, k);
            put_str(out, v);
        }
    }

    let base_ts = batch.readings.iter().map(|r| r.ts_ms).min().unwrap_or(0);
    put_uvarint(out, batch.readings.len() as u64);
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
        if matches!(r.value, Value::F64(_)) {
            n_f64 += 1;
        }
        out.push(kind_of(r));
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

/// Decodes a version 1 body into its series and readings.
pub(crate) fn decode(body: &[u8]) -> Result<(Vec<Series>, Vec<Reading>), DecodeError> {
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
            tags.push(read_tag(&mut r)?);
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
    let runs = read_runs(&mut r, ns, nr)?;

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
        check_kind(k)?;
        if k & KIND_TYPE_MASK == TYPE_F64 {
            n_f64 += 1;
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
                if k & KIND_TYPE_MASK == TYPE_I64 {
                    prev = prev.wrapping_add(r.svarint("i64 column")?);
                    i64_vals.push(prev);
                }
            }
            start += n;
        }
    }
    let n_bool = kinds
        .iter()
        .filter(|&&k| k & KIND_TYPE_MASK == TYPE_BOOL)
        .count();
    let bools = r.bytes(n_bool, "bool column")?;
    let mut i64_iter = i64_vals.into_iter();
    let mut bool_iter = bools.iter();
    for (si, &n) in runs.iter().enumerate() {
        for _ in 0..n {
            let k = kinds[j];
            let value = match k & KIND_TYPE_MASK {
                TYPE_F64 => {
                    let mut b = [0u8; 8];
                    for (p, byte) in b.iter_mut().enumerate() {
                        *byte = planes[p * n_f64 + jf];
                    }
                    jf += 1;
                    Value::F64(f64::from_le_bytes(b))
                }
                TYPE_I64 => Value::I64(i64_iter.next().unwrap_or_default()),
                TYPE_BOOL => read_bool(bool_iter.next().copied())?,
                _ => Value::Str(r.string("string value", MAX_STRING_BYTES)?),
            };
            let (quality, late) = quality_late(k);
            readings.push(Reading {
                series: si as u32,
                ts_ms: ts[j],
                value,
                quality,
                late,
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
    Ok((series, readings))
}

/// One tag: a non-empty name and a value.
pub(crate) fn read_tag(r: &mut Reader<'_>) -> Result<(String, String), DecodeError> {
    let k = r.string("tag name", MAX_TAG_NAME_BYTES)?;
    if k.is_empty() {
        return Err(DecodeError::Malformed {
            what: "tag name",
            why: "empty",
        });
    }
    let v = r.string("tag value", MAX_TAG_VALUE_BYTES)?;
    Ok((k, v))
}

/// The runs of `ns` series, which must sum to `nr`.
pub(crate) fn read_runs(
    r: &mut Reader<'_>,
    ns: usize,
    nr: usize,
) -> Result<Vec<usize>, DecodeError> {
    let mut runs = Vec::with_capacity(ns);
    let mut total = 0u64;
    for _ in 0..ns {
        let n = r.uvarint("runs")?;
        total = total.saturating_add(n);
        if total > nr as u64 {
            break;
        }
        runs.push(n as usize);
    }
    if total != nr as u64 {
        return Err(DecodeError::Malformed {
            what: "runs",
            why: "do not sum to reading_count",
        });
    }
    Ok(runs)
}

/// A bool column byte.
pub(crate) fn read_bool(b: Option<u8>) -> Result<Value, DecodeError> {
    match b {
        Some(0) => Ok(Value::Bool(false)),
        Some(1) => Ok(Value::Bool(true)),
        _ => Err(DecodeError::Malformed {
            what: "bool column",
            why: "byte is not 0 or 1",
        }),
    }
}

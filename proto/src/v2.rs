//! Body of format version 2 (`proto/FORMAT.md`, "Version 2 body").
//!
//! What changes from version 1, each measured on the shared dataset (`docs/wire-v2.md`):
//! - doubles that are decimals are coded as integer mantissas (`m / 10^e`, exact, see `decimal.rs`) with one
//!   exponent per series and batch, chosen by an estimate of the coded size; the rest (and NaN, ±inf, −0.0) go
//!   to a byte-shuffled raw column as in version 1, listed per series as exceptions;
//! - mantissas and i64 values are zigzag varints, raw or as differences within the series (chosen per series);
//! - timestamps are delta-of-delta within a series;
//! - one kind byte per series when all its readings share it (else one per reading, as in version 1);
//! - series keys are front-coded (bytes shared with the previous key, then the rest), and a series with the
//!   tags of the series before says so in one byte.
//!
//! The decoder checks every count against the format limits and the bytes present before allocating, and bounds
//! the expanded series table (front-coding and tag repeats undone) by the body limit, so nothing decodes larger
//! than a version 1 body of the same limits could.

use crate::codec::{
    check_kind, check_len, group, invalid, kind_of, quality_late, DecodeError, EncodeError,
    KIND_TYPE_MASK, TYPE_BOOL, TYPE_F64, TYPE_I64,
};
use crate::decimal::{self, MAX_EXP, MAX_MANTISSA};
use crate::limits::*;
use crate::model::{Batch, Reading, Series, Value};
use crate::v1::{read_bool, read_runs, read_tag};
use crate::varint::{put_str, put_svarint, put_uvarint, zigzag, Reader};

/// Kind column: the series' readings have different kind bytes, listed in the mixed-kinds section.
const MIXED: u8 = 0x80;
/// Coding byte: the f64 exponent.
const EXP_MASK: u8 = 0x1f;
/// Coding byte: mantissas and i64 values are differences to the previous one of the series.
const DELTA: u8 = 0x20;
/// Coding byte: the series has an exception list (doubles stored raw, not as mantissas).
const EXCEPTIONS: u8 = 0x40;
/// Coding byte: every double of the series is stored raw.
const RAW: u8 = 0x80;

/// Buffers reused between batches by an [`crate::Encoder`].
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    runs: Vec<u32>,
    order: Vec<u32>,
    kinds: Vec<u8>,
    codings: Vec<u8>,
    mixed: Vec<u8>,
    exceptions: Vec<u8>,
    ts: Vec<u8>,
    mantissas: Vec<u8>,
    raw: Vec<f64>,
    ints: Vec<u8>,
    bools: Vec<u8>,
    strings: Vec<u8>,
    /// The series' doubles, their smallest decimal form, their mantissas at the chosen exponent.
    vals: Vec<f64>,
    dec: Vec<Option<(i64, u8)>>,
    mant: Vec<i64>,
    ivals: Vec<i64>,
    seen_a: Seen,
    seen_b: Seen,
}

/// Writes the version 2 body of `batch` into `out` (cleared first).
pub(crate) fn encode(batch: &Batch, s: &mut Scratch, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    out.clear();
    group(batch, &mut s.runs, &mut s.order)?;
    for buf in [
        &mut s.kinds,
        &mut s.codings,
        &mut s.mixed,
        &mut s.exceptions,
        &mut s.ts,
        &mut s.mantissas,
        &mut s.ints,
        &mut s.bools,
        &mut s.strings,
    ] {
        buf.clear();
    }
    s.raw.clear();

    // Series table: front-coded keys; tags, or "as the series before".
    put_uvarint(out, batch.series.len() as u64);
    let mut expanded = 0usize;
    let mut prev: Option<&Series> = None;
    for ser in &batch.series {
        let key = ser.key.as_bytes();
        let shared = prev.map_or(0, |p| common_prefix(p.key.as_bytes(), key));
        put_uvarint(out, shared as u64);
        put_uvarint(out, (key.len() - shared) as u64);
        out.extend_from_slice(&key[shared..]);
        let prev_tags: &[(String, String)] = prev.map_or(&[], |p| &p.tags);
        if ser.tags == prev_tags {
            put_uvarint(out, 0);
        } else {
            put_uvarint(out, ser.tags.len() as u64 + 1);
            for (k, v) in &ser.tags {
                put_str(out, k);
                put_str(out, v);
            }
        }
        expanded += key.len()
            + ser
                .tags
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        prev = Some(ser);
    }
    if expanded > MAX_BODY_BYTES {
        return Err(invalid(
            "series table",
            format!("{expanded} bytes of names and tags, above {MAX_BODY_BYTES}"),
        ));
    }

    let base_ts = batch.readings.iter().map(|r| r.ts_ms).min().unwrap_or(0);
    put_uvarint(out, batch.readings.len() as u64);
    put_svarint(out, base_ts);
    for &n in &s.runs {
        put_uvarint(out, u64::from(n));
    }

    let mut start = 0usize;
    for si in 0..s.runs.len() {
        let n = s.runs[si] as usize;
        let idx = &s.order[start..start + n];
        start += n;
        let readings = idx.iter().map(|&i| &batch.readings[i as usize]);

        // Timestamps: the first to base_ts, then the change of the difference to the previous one (which starts
        // at 0: the second timestamp writes its difference to the first).
        let (mut prev_ts, mut prev_d) = (base_ts, 0i64);
        for (k, r) in readings.clone().enumerate() {
            let d = r.ts_ms.wrapping_sub(prev_ts);
            if k == 0 {
                put_svarint(&mut s.ts, d);
            } else {
                put_svarint(&mut s.ts, d.wrapping_sub(prev_d));
                prev_d = d;
            }
            prev_ts = r.ts_ms;
        }

        // Kinds: one byte if they are all the same.
        let first = readings.clone().next().map_or(0, kind_of);
        if readings.clone().all(|r| kind_of(r) == first) {
            s.kinds.push(first);
        } else {
            s.kinds.push(MIXED);
            s.mixed.extend(readings.clone().map(kind_of));
        }

        // Values.
        s.vals.clear();
        s.ivals.clear();
        for r in readings.clone() {
            match &r.value {
                Value::F64(v) => s.vals.push(*v),
                Value::I64(v) => s.ivals.push(*v),
                Value::Bool(b) => s.bools.push(u8::from(*b)),
                Value::Str(t) => {
                    check_len("string value", t, 0, MAX_STRING_BYTES)?;
                    put_str(&mut s.strings, t);
                }
            }
        }
        let mut coding = 0u8;
        let mut delta = None;
        if !s.vals.is_empty() {
            coding = code_doubles(s);
            delta = (coding & RAW == 0).then_some(coding & DELTA != 0);
        }
        if !s.ivals.is_empty() {
            let d =
                *delta.get_or_insert_with(|| prefers_delta(&s.ivals, &mut s.seen_a, &mut s.seen_b));
            if d {
                coding |= DELTA;
            }
            let mut p = 0i64;
            for &v in &s.ivals {
                put_svarint(&mut s.ints, if d { v.wrapping_sub(p) } else { v });
                p = v;
            }
        }
        s.codings.push(coding);
    }

    out.extend_from_slice(&s.kinds);
    out.extend_from_slice(&s.codings);
    out.extend_from_slice(&s.mixed);
    out.extend_from_slice(&s.exceptions);
    out.extend_from_slice(&s.ts);
    out.extend_from_slice(&s.mantissas);
    let n_raw = s.raw.len();
    let raw_start = out.len();
    out.resize(raw_start + 8 * n_raw, 0);
    for (j, v) in s.raw.iter().enumerate() {
        for (k, b) in v.to_le_bytes().into_iter().enumerate() {
            out[raw_start + k * n_raw + j] = b;
        }
    }
    out.extend_from_slice(&s.ints);
    out.extend_from_slice(&s.bools);
    out.extend_from_slice(&s.strings);
    if out.len() > MAX_BODY_BYTES {
        return Err(invalid(
            "body",
            format!("{} bytes, above {MAX_BODY_BYTES}", out.len()),
        ));
    }
    Ok(())
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Varint length of a zigzagged value.
#[inline]
fn vlen(v: i64) -> usize {
    let z = zigzag(v) | 1;
    (64 - z.leading_zeros() as usize).div_ceil(7)
}

/// Codes the doubles in `s.vals` (one series): mantissas into `s.mantissas`, exceptions into `s.exceptions` and
/// `s.raw`. Returns the coding byte.
fn code_doubles(s: &mut Scratch) -> u8 {
    s.dec.clear();
    let mut hist = [0u32; MAX_EXP as usize + 1];
    for &v in &s.vals {
        let d = decimal::smallest(v);
        if let Some((_, e)) = d {
            hist[e as usize] += 1;
        }
        s.dec.push(d);
    }
    // The exponent with the smallest estimated size: mantissa varints plus 9 bytes per exception. Stored raw,
    // the series costs 8 bytes a value.
    let raw_cost = 8 * s.vals.len();
    let mut best: Option<(usize, u8)> = None;
    for e in 0..=MAX_EXP {
        if hist[e as usize] == 0 {
            continue;
        }
        let mut cost = 0usize;
        let mut exceptions = false;
        for d in &s.dec {
            match d.and_then(|(m, de)| (de <= e).then(|| decimal::rescale(m, de, e)).flatten()) {
                Some(m) => cost += vlen(m),
                None => {
                    cost += 9;
                    exceptions = true;
                }
            }
        }
        cost += usize::from(exceptions);
        if best.is_none_or(|(c, _)| cost < c) {
            best = Some((cost, e));
        }
    }
    let Some((_, e)) = best.filter(|&(c, _)| c < raw_cost) else {
        s.raw.extend_from_slice(&s.vals);
        return RAW;
    };
    let at = |d: &Option<(i64, u8)>| {
        d.and_then(|(m, de)| (de <= e).then(|| decimal::rescale(m, de, e)).flatten())
    };
    let mut coding = e;
    let exceptions = s.dec.iter().filter(|d| at(d).is_none()).count();
    if exceptions > 0 {
        coding |= EXCEPTIONS;
        put_uvarint(&mut s.exceptions, exceptions as u64);
    }
    s.mant.clear();
    let mut next = 0usize;
    for (i, d) in s.dec.iter().enumerate() {
        match at(d) {
            Some(m) => s.mant.push(m),
            None => {
                put_uvarint(&mut s.exceptions, (i - next) as u64);
                next = i + 1;
                s.raw.push(s.vals[i]);
            }
        }
    }
    let delta = prefers_delta(&s.mant, &mut s.seen_a, &mut s.seen_b);
    if delta {
        coding |= DELTA;
    }
    let mut p = 0i64;
    for &m in &s.mant {
        put_svarint(&mut s.mantissas, if delta { m - p } else { m });
        p = m;
    }
    coding
}

/// Whether differences code `vals` smaller than the values themselves, after zstd. Estimate: a value (or
/// difference) seen before in the series costs a byte, zstd finding the repeat; a new one its varint. Levels that
/// recur (a meter's standby value) favour raw values; smooth signals favour differences.
fn prefers_delta(vals: &[i64], a: &mut Seen, b: &mut Seen) -> bool {
    if vals.len() < 2 {
        return false;
    }
    a.reset(vals.len());
    b.reset(vals.len());
    let (mut raw, mut diff, mut p) = (0usize, 0usize, 0i64);
    for &v in vals {
        let d = v.wrapping_sub(p);
        p = v;
        raw += if a.insert(v) { 1 } else { vlen(v) };
        diff += if b.insert(d) { 1 } else { vlen(d) };
    }
    diff < raw
}

/// A set of i64 for one series: open addressing, cleared in O(1) by a generation stamp.
#[derive(Debug, Default)]
struct Seen {
    keys: Vec<i64>,
    stamps: Vec<u32>,
    generation: u32,
    shift: u32,
}

impl Seen {
    fn reset(&mut self, n: usize) {
        let cap = (2 * n).next_power_of_two().max(16);
        if self.keys.len() < cap {
            self.keys.resize(cap, 0);
            self.stamps.resize(cap, 0);
        }
        self.shift = 64 - cap.trailing_zeros();
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.stamps.fill(0);
            self.generation = 1;
        }
    }

    /// Inserts `k`; true if it was there already.
    fn insert(&mut self, k: i64) -> bool {
        let mask = (1usize << (64 - self.shift)) - 1;
        let mut h = ((k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize;
        loop {
            if self.stamps[h] != self.generation {
                self.stamps[h] = self.generation;
                self.keys[h] = k;
                return false;
            }
            if self.keys[h] == k {
                return true;
            }
            h = (h + 1) & mask;
        }
    }
}

/// Timestamps of one series: the first is an offset from `base_ts` (where `ts` starts), every further one adds
/// the change of the difference (the first difference changes from 0).
struct Clock {
    ts: i64,
    d: i64,
}

impl Clock {
    #[inline(always)]
    fn next(&mut self, first: bool, v: i64) -> i64 {
        if first {
            self.ts = self.ts.wrapping_add(v);
        } else {
            self.d = self.d.wrapping_add(v);
            self.ts = self.ts.wrapping_add(self.d);
        }
        self.ts
    }
}

/// The next double from the mantissa column; `m` is the series' previous mantissa.
#[inline(always)]
fn mantissa(mr: &mut Reader<'_>, m: &mut i64, delta: bool, e: u8) -> Result<f64, DecodeError> {
    let v = mr.svarint("mantissa")?;
    *m = if delta { m.wrapping_add(v) } else { v };
    if m.unsigned_abs() > MAX_MANTISSA as u64 {
        return Err(malformed("mantissa", "above 2^53"));
    }
    Ok(decimal::value(*m, e))
}

fn malformed(what: &'static str, why: &'static str) -> DecodeError {
    DecodeError::Malformed { what, why }
}

/// Decodes a version 2 body into its series and readings.
pub(crate) fn decode(body: &[u8]) -> Result<(Vec<Series>, Vec<Reading>), DecodeError> {
    let mut r = Reader::new(body);
    // Each series needs at least 3 bytes (shared length, rest length, tags).
    let ns = r.count("series_count", MAX_SERIES, 3)?;
    if ns == 0 {
        return Err(malformed("series_count", "zero series"));
    }
    let mut series: Vec<Series> = Vec::with_capacity(ns);
    let mut key = Vec::new();
    let mut expanded = 0usize;
    for i in 0..ns {
        let shared = r.uvarint("key prefix")?;
        if shared > key.len() as u64 {
            return Err(malformed("key prefix", "longer than the previous key"));
        }
        let rest = r.count("series key", MAX_KEY_BYTES, 1)?;
        let len = shared as usize + rest;
        if len > MAX_KEY_BYTES {
            return Err(DecodeError::LimitExceeded {
                what: "series key",
                value: len as u64,
                limit: MAX_KEY_BYTES as u64,
            });
        }
        if len == 0 {
            return Err(malformed("series key", "empty"));
        }
        key.truncate(shared as usize);
        key.extend_from_slice(r.bytes(rest, "series key")?);
        let k = std::str::from_utf8(&key)
            .map_err(|_| malformed("series key", "invalid UTF-8"))?
            .to_owned();
        let t = r.uvarint("tags")?;
        let tags = if t == 0 {
            i.checked_sub(1)
                .map_or_else(Vec::new, |p| series[p].tags.clone())
        } else {
            let nt = (t - 1) as usize;
            if t - 1 > MAX_TAGS as u64 {
                return Err(DecodeError::LimitExceeded {
                    what: "tag_count",
                    value: t - 1,
                    limit: MAX_TAGS as u64,
                });
            }
            if nt * 2 > r.remaining() {
                return Err(DecodeError::Truncated { what: "tag_count" });
            }
            let mut tags = Vec::with_capacity(nt);
            for _ in 0..nt {
                tags.push(read_tag(&mut r)?);
            }
            tags
        };
        expanded += k.len() + tags.iter().map(|(a, b)| a.len() + b.len()).sum::<usize>();
        if expanded > MAX_BODY_BYTES {
            return Err(DecodeError::LimitExceeded {
                what: "series table (expanded)",
                value: expanded as u64,
                limit: MAX_BODY_BYTES as u64,
            });
        }
        series.push(Series { key: k, tags });
    }

    // Each reading needs at least 1 byte (its timestamp).
    let nr = r.count("reading_count", MAX_READINGS, 1)?;
    if nr == 0 {
        return Err(malformed("reading_count", "zero readings"));
    }
    let base_ts = r.svarint("base_ts")?;
    let runs = read_runs(&mut r, ns, nr)?;
    let kinds = r.bytes(ns, "kinds")?;
    let codings = r.bytes(ns, "codings")?;

    // Mixed kinds, and what each series holds.
    let mut n_f64 = Vec::with_capacity(ns);
    let (mut n_i64, mut n_bool, mut mixed_len) = (0usize, 0usize, 0usize);
    let mixed_start = body.len() - r.remaining();
    for s in 0..ns {
        let (k, n) = (kinds[s], runs[s]);
        let (f, i, b) = if k == MIXED {
            let ks = r.bytes(n, "mixed kinds")?;
            mixed_len += n;
            let (mut f, mut i, mut b) = (0usize, 0usize, 0usize);
            for &k in ks {
                check_kind(k)?;
                f += usize::from(k & KIND_TYPE_MASK == TYPE_F64);
                i += usize::from(k & KIND_TYPE_MASK == TYPE_I64);
                b += usize::from(k & KIND_TYPE_MASK == TYPE_BOOL);
            }
            (f, i, b)
        } else {
            check_kind(k)?;
            match k & KIND_TYPE_MASK {
                TYPE_F64 => (n, 0, 0),
                TYPE_I64 => (0, n, 0),
                TYPE_BOOL => (0, 0, n),
                _ => (0, 0, 0),
            }
        };
        let c = codings[s];
        if f == 0 && c & !DELTA != 0 {
            return Err(malformed(
                "coding",
                "double coding on a series without doubles",
            ));
        }
        if c & RAW != 0 && c & (EXP_MASK | EXCEPTIONS) != 0 {
            return Err(malformed("coding", "raw with an exponent or exceptions"));
        }
        if c & EXP_MASK > MAX_EXP {
            return Err(malformed("coding", "exponent above 22"));
        }
        n_f64.push(f);
        n_i64 += i;
        n_bool += b;
    }
    let mixed = &body[mixed_start..mixed_start + mixed_len];

    // Exception lists: positions among the series' doubles, strictly increasing.
    let mut exc_pos: Vec<u32> = Vec::new();
    let mut exc_count = Vec::with_capacity(ns);
    let (mut n_raw, mut n_mant) = (0usize, 0usize);
    for s in 0..ns {
        let c = codings[s];
        let mut count = 0usize;
        if c & EXCEPTIONS != 0 {
            let n = r.uvarint("exception count")?;
            if n == 0 || n > n_f64[s] as u64 {
                return Err(malformed(
                    "exception count",
                    "zero or more than the series' doubles",
                ));
            }
            count = n as usize;
            if count > r.remaining() {
                return Err(DecodeError::Truncated {
                    what: "exception positions",
                });
            }
            exc_pos.reserve(count);
            let mut next = 0u64;
            for _ in 0..count {
                let p = next.saturating_add(r.uvarint("exception position")?);
                if p >= n_f64[s] as u64 {
                    return Err(malformed(
                        "exception position",
                        "beyond the series' doubles",
                    ));
                }
                exc_pos.push(p as u32);
                next = p + 1;
            }
            n_raw += count;
        }
        if c & RAW != 0 {
            n_raw += n_f64[s];
        } else {
            n_mant += n_f64[s] - count;
        }
        exc_count.push(count);
    }

    // The varint columns' lengths follow from their counts.
    let mut tsr = Reader::new(r.varints(nr, "timestamp column")?);
    let mut mr = Reader::new(r.varints(n_mant, "mantissa column")?);
    let raw = r.bytes(n_raw.saturating_mul(8), "raw f64 column")?;
    let mut ir = Reader::new(r.varints(n_i64, "i64 column")?);
    let bools = r.bytes(n_bool, "bool column")?;
    let raw_value = |j: usize| {
        let mut b = [0u8; 8];
        for (p, byte) in b.iter_mut().enumerate() {
            *byte = raw[p * n_raw + j];
        }
        f64::from_le_bytes(b)
    };

    let mut readings = Vec::with_capacity(nr);
    let (mut jr, mut jb, mut jm, mut jx) = (0usize, 0usize, 0usize, 0usize);
    for s in 0..ns {
        let (n, kind, c) = (runs[s], kinds[s], codings[s]);
        let delta = c & DELTA != 0;
        let e = c & EXP_MASK;
        let mut clock = Clock { ts: base_ts, d: 0 };
        let mut m = 0i64;
        if kind == TYPE_F64 && c & (RAW | EXCEPTIONS) == 0 {
            // The common case: good, on-time doubles, all decimals.
            for k in 0..n {
                let ts_ms = clock.next(k == 0, tsr.svarint("timestamp")?);
                readings.push(Reading {
                    series: s as u32,
                    ts_ms,
                    value: Value::F64(mantissa(&mut mr, &mut m, delta, e)?),
                    quality: crate::Quality::Good,
                    late: false,
                });
            }
            continue;
        }
        let excs = &exc_pos[jx..jx + exc_count[s]];
        jx += exc_count[s];
        let mut excs = excs.iter().peekable();
        let (mut f, mut prev_i) = (0u32, 0i64);
        for k in 0..n {
            let ts_ms = clock.next(k == 0, tsr.svarint("timestamp")?);
            let kb = if kind == MIXED {
                let kb = mixed[jm];
                jm += 1;
                kb
            } else {
                kind
            };
            let value = match kb & KIND_TYPE_MASK {
                TYPE_F64 => {
                    let raw_here = c & RAW != 0 || excs.next_if_eq(&&f).is_some();
                    f += 1;
                    if raw_here {
                        jr += 1;
                        Value::F64(raw_value(jr - 1))
                    } else {
                        Value::F64(mantissa(&mut mr, &mut m, delta, e)?)
                    }
                }
                TYPE_I64 => {
                    let v = ir.svarint("i64 column")?;
                    prev_i = if delta { prev_i.wrapping_add(v) } else { v };
                    Value::I64(prev_i)
                }
                TYPE_BOOL => {
                    jb += 1;
                    read_bool(bools.get(jb - 1).copied())?
                }
                _ => Value::Str(r.string("string value", MAX_STRING_BYTES)?),
            };
            let (quality, late) = quality_late(kb);
            readings.push(Reading {
                series: s as u32,
                ts_ms,
                value,
                quality,
                late,
            });
        }
    }
    for (rest, what) in [
        (tsr.remaining(), "timestamp column"),
        (mr.remaining(), "mantissa column"),
        (ir.remaining(), "i64 column"),
        (r.remaining(), "body"),
    ] {
        if rest != 0 {
            return Err(malformed(what, "trailing bytes after its last value"));
        }
    }
    Ok((series, readings))
}

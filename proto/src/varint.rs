//! LEB128 varints, zigzag, and a bounds-checked reader.

use crate::codec::DecodeError;

#[inline]
pub(crate) fn put_uvarint(out: &mut Vec<u8>, v: u64) {
    // Most coded numbers (timestamp and mantissa differences, lengths) take one byte.
    if v < 0x80 {
        out.push(v as u8);
    } else {
        put_long_uvarint(out, v);
    }
}

fn put_long_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[inline]
pub(crate) fn put_svarint(out: &mut Vec<u8>, v: i64) {
    put_uvarint(out, zigzag(v));
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_uvarint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A cursor over a byte slice whose every read is bounds-checked.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, what)?[0])
    }

    #[inline(always)]
    pub(crate) fn uvarint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        // One byte: most timestamps, kinds and small values.
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(u64::from(b));
            }
        }
        self.uvarint_long(what)
    }

    fn uvarint_long(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let rest = &self.buf[self.pos..];
        let mut v: u64 = 0;
        for (i, &b) in rest.iter().take(10).enumerate() {
            if i == 9 && b > 1 {
                return Err(DecodeError::Malformed {
                    what,
                    why: "varint overflows u64",
                });
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.pos += i + 1;
                return Ok(v);
            }
        }
        if rest.len() < 10 {
            return Err(DecodeError::Truncated { what });
        }
        Err(DecodeError::Malformed {
            what,
            why: "varint longer than 10 bytes",
        })
    }

    /// The bytes of the next `n` varints, without decoding them (a column whose length is implied by its count).
    pub(crate) fn varints(
        &mut self,
        n: usize,
        what: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        let rest = &self.buf[self.pos..];
        let mut len = 0usize;
        if n > 0 {
            // Eight bytes at a time while the n-th end is not among them: an end is a byte without the high bit.
            let mut ends = 0usize;
            let mut chunks = rest.chunks_exact(8);
            for c in chunks.by_ref() {
                let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                let t = (!w & 0x8080_8080_8080_8080).count_ones() as usize;
                if ends + t >= n {
                    break;
                }
                ends += t;
                len += 8;
            }
            for &b in &rest[len..] {
                len += 1;
                ends += usize::from(b < 0x80);
                if ends == n {
                    break;
                }
            }
            if ends < n {
                return Err(DecodeError::Truncated { what });
            }
        }
        self.bytes(len, what)
    }

    #[inline(always)]
    pub(crate) fn svarint(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(unzigzag(self.uvarint(what)?))
    }

    /// A count that must be at most `max`, and for which at least `min_bytes_each` bytes per item must remain.
    pub(crate) fn count(
        &mut self,
        what: &'static str,
        max: usize,
        min_bytes_each: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.uvarint(what)?;
        if n > max as u64 {
            return Err(DecodeError::LimitExceeded {
                what,
                value: n,
                limit: max as u64,
            });
        }
        let n = n as usize;
        if n.saturating_mul(min_bytes_each) > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        Ok(n)
    }

    pub(crate) fn string(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        let n = self.count(what, max, 1)?;
        let b = self.bytes(n, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Malformed {
                what,
                why: "invalid UTF-8",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn uvarint_round_trips(v in any::<u64>()) {
            let mut out = Vec::new();
            put_uvarint(&mut out, v);
            prop_assert!(out.len() <= 10);
            let mut r = Reader::new(&out);
            prop_assert_eq!(r.uvarint("v").unwrap(), v);
            prop_assert_eq!(r.remaining(), 0);
        }

        #[test]
        fn zigzag_round_trips(v in any::<i64>()) {
            prop_assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn varints_finds_the_end_of_n_varints() {
        let mut out = Vec::new();
        for v in [0u64, 300, u64::MAX, 5] {
            put_uvarint(&mut out, v);
        }
        let mut r = Reader::new(&out);
        assert_eq!(r.varints(0, "v").map(<[u8]>::len), Ok(0));
        assert_eq!(r.varints(3, "v").map(<[u8]>::len), Ok(1 + 2 + 10));
        assert_eq!(r.remaining(), 1);
        assert!(matches!(
            r.varints(2, "v"),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            Reader::new(&[0x80, 0x80]).varints(1, "v"),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn zigzag_maps_small_magnitudes_to_small_codes() {
        assert_eq!(zigzag(0), 0);
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
        assert_eq!(zigzag(i64::MIN), u64::MAX);
    }

    #[test]
    fn overlong_varint_is_rejected() {
        let bytes = [0xffu8; 11];
        assert!(matches!(
            Reader::new(&bytes).uvarint("v"),
            Err(DecodeError::Malformed { .. })
        ));
        let mut ten = [0xffu8; 10];
        ten[9] = 0x02; // would set bit 64
        assert!(matches!(
            Reader::new(&ten).uvarint("v"),
            Err(DecodeError::Malformed { .. })
        ));
    }
}

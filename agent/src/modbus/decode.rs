//! Register contents → values. Pure.
//!
//! Multi-register values are assembled from big-endian 16-bit registers according to the point's order, named by
//! where the bytes `A B C D` (most significant first) sit in the registers:
//!
//! | order | registers (32 bit) | meaning |
//! |---|---|---|
//! | `ABCD` | `AB CD` | big-endian (Modbus default) |
//! | `DCBA` | `DC BA` | little-endian |
//! | `BADC` | `BA DC` | bytes swapped within each register |
//! | `CDAB` | `CD AB` | registers (words) swapped |
//!
//! 64-bit values extend the same rules to four registers; a 16-bit value uses `AB` (`ABCD`, `CDAB`) or `BA`
//! (`DCBA`, `BADC`). Strings hold two characters per register in the same byte order, trailing NULs and spaces
//! removed.

use serde::Deserialize;

/// Byte and word order of multi-register values.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum WordOrder {
    /// Big-endian.
    #[default]
    ABCD,
    /// Little-endian.
    DCBA,
    /// Bytes swapped in each register.
    BADC,
    /// Registers swapped.
    CDAB,
}

/// A point's data type.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// One bit: a coil, a discrete input, or bit `bit` of a register.
    Bool,
    /// Signed 16-bit.
    I16,
    /// Unsigned 16-bit.
    U16,
    /// Signed 32-bit.
    I32,
    /// Unsigned 32-bit.
    U32,
    /// Signed 64-bit.
    I64,
    /// Unsigned 64-bit.
    U64,
    /// IEEE 754 single.
    F32,
    /// IEEE 754 double.
    F64,
    /// Fixed-length ASCII/UTF-8 string of `length` registers.
    String,
}

impl DataType {
    /// Registers the type occupies (`length` for strings).
    pub fn registers(self, length: u16) -> u16 {
        match self {
            DataType::Bool | DataType::I16 | DataType::U16 => 1,
            DataType::I32 | DataType::U32 | DataType::F32 => 2,
            DataType::I64 | DataType::U64 | DataType::F64 => 4,
            DataType::String => length,
        }
    }
}

/// A decoded raw value (before scale and offset).
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    /// A bit.
    Bool(bool),
    /// Any integer type, widened.
    Int(i128),
    /// A float type, widened.
    Float(f64),
    /// A string.
    Str(String),
}

/// Bytes of `regs` in significance order (A first) for `order`.
fn bytes(regs: &[u16], order: WordOrder) -> Vec<u8> {
    let mut words: Vec<u16> = regs.to_vec();
    let n = words.len();
    match order {
        WordOrder::ABCD => {}
        WordOrder::DCBA => {
            words.reverse();
            for w in &mut words {
                *w = w.swap_bytes();
            }
        }
        WordOrder::BADC => {
            for w in &mut words {
                *w = w.swap_bytes();
            }
        }
        WordOrder::CDAB => {
            if n > 1 {
                words.reverse();
            }
        }
    }
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// Decodes `regs` (exactly `dtype.registers(..)` of them) as `dtype`; `bit` selects a bit for `Bool`.
pub fn decode(regs: &[u16], dtype: DataType, order: WordOrder, bit: Option<u8>) -> Raw {
    let be = |n: usize| -> [u8; 8] {
        let b = bytes(&regs[..n], order);
        let mut out = [0u8; 8];
        out[8 - b.len()..].copy_from_slice(&b);
        out
    };
    match dtype {
        DataType::Bool => Raw::Bool(regs[0] >> bit.unwrap_or(0) & 1 == 1),
        DataType::I16 => Raw::Int(i128::from(i16::from_be_bytes([be(1)[6], be(1)[7]]))),
        DataType::U16 => Raw::Int(i128::from(u16::from_be_bytes([be(1)[6], be(1)[7]]))),
        DataType::I32 => Raw::Int(i128::from(i32::from_be_bytes(
            be(2)[4..].try_into().unwrap_or_default(),
        ))),
        DataType::U32 => Raw::Int(i128::from(u32::from_be_bytes(
            be(2)[4..].try_into().unwrap_or_default(),
        ))),
        DataType::I64 => Raw::Int(i128::from(i64::from_be_bytes(be(4)))),
        DataType::U64 => Raw::Int(i128::from(u64::from_be_bytes(be(4)))),
        DataType::F32 => Raw::Float(f64::from(f32::from_be_bytes(
            be(2)[4..].try_into().unwrap_or_default(),
        ))),
        DataType::F64 => Raw::Float(f64::from_be_bytes(be(4))),
        DataType::String => {
            let b = bytes(
                regs,
                match order {
                    WordOrder::ABCD | WordOrder::CDAB => WordOrder::ABCD,
                    WordOrder::DCBA | WordOrder::BADC => WordOrder::BADC,
                },
            );
            let s = String::from_utf8_lossy(&b);
            Raw::Str(s.trim_end_matches(['\0', ' ']).to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_two_bit_orders() {
        // 0x11223344 in each order.
        let cases = [
            (WordOrder::ABCD, [0x1122, 0x3344]),
            (WordOrder::DCBA, [0x4433, 0x2211]),
            (WordOrder::BADC, [0x2211, 0x4433]),
            (WordOrder::CDAB, [0x3344, 0x1122]),
        ];
        for (order, regs) in cases {
            assert_eq!(
                decode(&regs, DataType::U32, order, None),
                Raw::Int(0x1122_3344),
                "{order:?}"
            );
        }
        assert_eq!(
            decode(&[0xFFFF, 0xFFFE], DataType::I32, WordOrder::ABCD, None),
            Raw::Int(-2)
        );
    }

    #[test]
    fn floats_and_sixty_four_bit_values() {
        let f = 123.456f32.to_bits();
        assert_eq!(
            decode(
                &[(f >> 16) as u16, f as u16],
                DataType::F32,
                WordOrder::ABCD,
                None
            ),
            Raw::Float(f64::from(123.456f32))
        );
        assert_eq!(
            decode(
                &[f as u16, (f >> 16) as u16],
                DataType::F32,
                WordOrder::CDAB,
                None
            ),
            Raw::Float(f64::from(123.456f32))
        );
        let d = (-9.75f64).to_bits();
        let regs = [
            (d >> 48) as u16,
            (d >> 32) as u16,
            (d >> 16) as u16,
            d as u16,
        ];
        assert_eq!(
            decode(&regs, DataType::F64, WordOrder::ABCD, None),
            Raw::Float(-9.75)
        );
        let rev: Vec<u16> = regs.iter().rev().map(|w| w.swap_bytes()).collect();
        assert_eq!(
            decode(&rev, DataType::F64, WordOrder::DCBA, None),
            Raw::Float(-9.75)
        );
        assert_eq!(
            decode(&[0xFFFF; 4], DataType::U64, WordOrder::ABCD, None),
            Raw::Int(i128::from(u64::MAX))
        );
        assert_eq!(
            decode(&[0xFFFF; 4], DataType::I64, WordOrder::ABCD, None),
            Raw::Int(-1)
        );
    }

    #[test]
    fn sixteen_bit_values_bits_and_strings() {
        assert_eq!(
            decode(&[0xFF38], DataType::I16, WordOrder::ABCD, None),
            Raw::Int(-200)
        );
        assert_eq!(
            decode(&[0x38FF], DataType::I16, WordOrder::DCBA, None),
            Raw::Int(-200)
        );
        assert_eq!(
            decode(&[0xFF38], DataType::U16, WordOrder::ABCD, None),
            Raw::Int(65336)
        );
        assert_eq!(
            decode(&[0b1000], DataType::Bool, WordOrder::ABCD, Some(3)),
            Raw::Bool(true)
        );
        assert_eq!(
            decode(&[0b1000], DataType::Bool, WordOrder::ABCD, Some(2)),
            Raw::Bool(false)
        );
        assert_eq!(
            decode(&[0x4142, 0x4300], DataType::String, WordOrder::ABCD, None),
            Raw::Str("ABC".into())
        );
        assert_eq!(
            decode(&[0x4241, 0x0043], DataType::String, WordOrder::BADC, None),
            Raw::Str("ABC".into())
        );
    }
}

//! Exact decimal coding of doubles (format v2).
//!
//! A double `v` is coded as the integer mantissa `m` with the exponent `e` only when [`value`]`(m, e)` — the
//! IEEE 754 division `m as f64 / 10^e`, which the decoder computes the same way — has exactly `v`'s bits. The
//! division is exact-input (`|m| ≤ 2^53` converts exactly, `10^e` is exact for `e ≤ 22`) and correctly rounded,
//! so it gives the double nearest to the decimal `m · 10^-e`: the very double a correct parser makes of that
//! decimal's text (JSON `-0.740653`, a Modbus register scaled by 0.1 and printed). Such doubles therefore always
//! code, and with any exponent at or above their smallest one (the quotient is the same real number). Anything
//! else (NaN, ±inf, −0.0, subnormals, values above 2^53, doubles computed rather than parsed) fails the check and
//! goes to the raw path: the decoder never sees a mantissa it would turn into other bits.
//!
//! This is ALP's idea (Afroozeh, Kuffó, Boncz, SIGMOD 2024) with a division instead of ALP's two multiplications
//! by inexact factors, and with the exponent chosen per series and batch rather than per 1024-value vector.

/// Largest exponent: `10^22` is the largest power of ten a double holds exactly.
pub(crate) const MAX_EXP: u8 = 22;

/// Largest mantissa magnitude: every integer up to `2^53` is a double.
pub(crate) const MAX_MANTISSA: i64 = 1 << 53;

/// `10^e` for `e` in `0..=22`, each exact.
pub(crate) const P10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// `10^k` as an integer, for scaling mantissas between exponents (`k` ≤ 18 fits `i64`).
const I10: [i64; 19] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
    100_000_000_000,
    1_000_000_000_000,
    10_000_000_000_000,
    100_000_000_000_000,
    1_000_000_000_000_000,
    10_000_000_000_000_000,
    100_000_000_000_000_000,
    1_000_000_000_000_000_000,
];

/// Where [`smallest`] starts trying a mantissa's neighbours: 2^50.
const NEAR: f64 = (1u64 << 50) as f64;

/// 1.5·2^52: `(x + ROUNDER) - ROUNDER` is `x` rounded to the nearest integer for |x| < 2^51.
const ROUNDER: f64 = 6_755_399_441_055_744.0;

/// The double a mantissa and exponent stand for. `e` ≤ [`MAX_EXP`], `|m|` ≤ [`MAX_MANTISSA`].
#[inline]
pub(crate) fn value(m: i64, e: u8) -> f64 {
    m as f64 / P10[e as usize]
}

/// The smallest exponent `e` at which `v` is a decimal, with its mantissa: `value(m, e)` has `v`'s bits.
pub(crate) fn smallest(v: f64) -> Option<(i64, u8)> {
    if !v.is_finite() || v.abs() > MAX_MANTISSA as f64 {
        return None;
    }
    for e in 0..=MAX_EXP {
        let x = v * P10[e as usize];
        let ax = x.abs();
        if ax > MAX_MANTISSA as f64 {
            return None;
        }
        if ax < NEAR {
            // If `value(m, e)` is `v`, then `x` is `m` up to two roundings: |x − m| ≤ 2^-52·|x|, below a quarter
            // here. So `m` is `x` rounded to the nearest integer (adding and taking away 1.5·2^52 does that,
            // exactly, for |x| < 2^51), and an exponent whose `x` is not that close to an integer is skipped
            // without the division.
            let r = (x + ROUNDER) - ROUNDER;
            if (x - r).abs() <= ax * 1e-9 && value(r as i64, e).to_bits() == v.to_bits() {
                return Some((r as i64, e));
            }
            continue;
        }
        // Near 2^53 the rounding error of `x` can exceed half a unit: the neighbours are tried too. The check
        // alone decides.
        let m = (x + 0.5f64.copysign(x)) as i64;
        for c in [m, m - 1, m + 1, m - 2, m + 2] {
            if c.abs() <= MAX_MANTISSA && value(c, e).to_bits() == v.to_bits() {
                return Some((c, e));
            }
        }
    }
    None
}

/// The mantissa of a value whose smallest exponent is `from` (mantissa `m`), at exponent `to` ≥ `from`; `None`
/// when it would exceed [`MAX_MANTISSA`].
#[inline]
pub(crate) fn rescale(m: i64, from: u8, to: u8) -> Option<i64> {
    let k = usize::from(to - from);
    let scaled = m.checked_mul(*I10.get(k)?)?;
    (scaled.abs() <= MAX_MANTISSA).then_some(scaled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn powers_of_ten_are_exact() {
        for (e, p) in P10.iter().enumerate() {
            assert_eq!(*p, 10f64.powi(e as i32));
            assert_eq!(*p as u128, 10u128.pow(e as u32));
        }
        for (k, p) in I10.iter().enumerate() {
            assert_eq!(*p, 10i64.pow(k as u32));
        }
    }

    #[test]
    fn parsed_decimals_are_found_with_their_digits() {
        for (text, m, e) in [
            ("-0.740653", -740653, 6),
            ("0.013317", 13317, 6),
            ("721.25", 72125, 2),
            ("426.0", 426, 0),
            ("0", 0, 0),
            ("-0.58475375", -58475375, 8),
            ("1.2e-05", 12, 6),
            ("27.2723333333333", 272723333333333, 13),
            ("9007199254740992", 9007199254740992, 0),
        ] {
            let v: f64 = text.parse().unwrap_or(f64::NAN);
            assert_eq!(smallest(v), Some((m, e)), "{text}");
        }
    }

    #[test]
    fn values_that_are_no_decimal_are_refused() {
        for v in [
            f64::NAN,
            -f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001), // signalling NaN payload
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            f64::MIN_POSITIVE / 2.0, // subnormal
            f64::from_bits(1),
            1e300,
            9007199254740994.0,       // 2^53 + 2
            0.1 + 0.2,                // 0.30000000000000004: 17 digits, mantissa above 2^53
            std::f64::consts::SQRT_2, // 1.4142135623730951
            1.0 / 3.0 * 1e-10,
        ] {
            assert_eq!(smallest(v), None, "{v:e} ({:#x})", v.to_bits());
        }
    }

    #[test]
    fn sixteen_digit_doubles_are_decimals_too() {
        // 1/3 prints as 0.3333333333333333: 16 digits, a mantissa below 2^53, so it codes exactly.
        let third = 1.0f64 / 3.0;
        assert_eq!(smallest(third), Some((3_333_333_333_333_333, 16)));
    }

    #[test]
    fn a_larger_exponent_codes_the_same_bits() {
        for v in [-0.740653f64, 721.25, 1.5, 123456.789] {
            let (m, e) = smallest(v).unwrap_or_default();
            for to in e..=MAX_EXP {
                if let Some(m2) = rescale(m, e, to) {
                    assert_eq!(value(m2, to).to_bits(), v.to_bits(), "{v} at {to}");
                }
            }
        }
    }

    /// `smallest` without the shortcut: the exact check at every exponent.
    fn smallest_checking_all(v: f64) -> Option<(i64, u8)> {
        if !v.is_finite() || v.abs() > MAX_MANTISSA as f64 {
            return None;
        }
        for e in 0..=MAX_EXP {
            let x = v * P10[e as usize];
            if x.abs() > MAX_MANTISSA as f64 {
                return None;
            }
            let m = (x + 0.5f64.copysign(x)) as i64;
            for c in [m, m - 1, m + 1, m - 2, m + 2] {
                if c.abs() <= MAX_MANTISSA && value(c, e).to_bits() == v.to_bits() {
                    return Some((c, e));
                }
            }
        }
        None
    }

    proptest! {
        #[test]
        fn the_shortcut_finds_what_checking_every_exponent_finds(bits in any::<u64>(), m in -MAX_MANTISSA..=MAX_MANTISSA, e in 0u8..=22) {
            let v = f64::from_bits(bits);
            prop_assert_eq!(smallest(v), smallest_checking_all(v), "{:e}", v);
            let d = value(m, e);
            prop_assert_eq!(smallest(d), smallest_checking_all(d), "{}e-{}", m, e);
            // Values a sensor prints: few digits.
            let short = value(m % 1_000_000, e % 9);
            prop_assert_eq!(smallest(short), smallest_checking_all(short), "{:e}", short);
        }

        #[test]
        fn whatever_is_found_decodes_to_the_same_bits(bits in any::<u64>()) {
            let v = f64::from_bits(bits);
            if let Some((m, e)) = smallest(v) {
                prop_assert!(m.abs() <= MAX_MANTISSA && e <= MAX_EXP);
                prop_assert_eq!(value(m, e).to_bits(), bits);
            }
        }

        #[test]
        fn every_printed_decimal_is_found(m in -MAX_MANTISSA..=MAX_MANTISSA, e in 0u8..=15) {
            // The text a sensor would publish, parsed as JSON parsers do (correctly rounded).
            let text = format!("{}e-{e}", m);
            let v: f64 = text.parse().unwrap_or(f64::NAN);
            prop_assert_eq!(v.to_bits(), value(m, e).to_bits());
            if v != 0.0 || v.is_sign_positive() {
                let (m2, e2) = smallest(v).unwrap_or((0, 99));
                prop_assert!(e2 <= e, "{} found at e={} > {}", text, e2, e);
                prop_assert_eq!(value(m2, e2).to_bits(), v.to_bits());
            }
        }
    }
}

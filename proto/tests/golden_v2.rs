//! Golden bytes, exact doubles, round trips and hostile inputs for format v2.
//!
//! A counting global allocator (`common/mod.rs`) measures the largest single allocation made while decoding
//! hostile input, so "no large allocation" is checked, not assumed.
#![allow(unsafe_code)] // the counting allocator in common/; the library itself forbids unsafe code
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use fieldlink_proto::{
    decode, decode_body, encode, encode_body, peek_header, Batch, DecodeError, Encoder, Quality,
    Reading, Series, Value, Version,
};
use proptest::prelude::*;

fn reading(series: u32, ts_ms: i64, value: Value) -> Reading {
    Reading {
        series,
        ts_ms,
        value,
        quality: Quality::Good,
        late: false,
    }
}

/// Every path of the body: front-coded keys, a tag repeat, a decimal series with an exception (−0.0) and
/// mantissa differences, a raw series (NaN) with a bool of other quality, an i64 and string series.
fn sample() -> Batch {
    Batch {
        agent_id: "edge-1".into(),
        epoch: 0x0102_0304_0506_0708,
        seq: 7,
        series: vec![
            Series {
                key: "a/x".into(),
                tags: vec![("site".into(), "m".into())],
            },
            Series {
                key: "a/y".into(),
                tags: vec![("site".into(), "m".into())],
            },
            Series::new("b"),
        ],
        readings: vec![
            reading(0, 1000, Value::F64(1.5)),
            reading(2, 1005, Value::I64(5)),
            reading(1, 1000, Value::F64(f64::NAN)),
            reading(0, 1010, Value::F64(2.25)),
            Reading {
                series: 1,
                ts_ms: 1010,
                value: Value::Bool(true),
                quality: Quality::Uncertain,
                late: true,
            },
            reading(2, 1015, Value::I64(7)),
            reading(0, 1020, Value::F64(-0.0)),
            Reading {
                series: 2,
                ts_ms: 1025,
                value: Value::Str("ok".into()),
                quality: Quality::Bad,
                late: false,
            },
            reading(0, 1030, Value::F64(1.75)),
        ],
    }
}

/// The version 2 body of `sample()`, derived by hand from FORMAT.md (not by running the encoder).
const SAMPLE_BODY: &str = "
    03                      series_count
    00 03 612f78 02 04 73697465 01 6d   'a/x': shares 0, rest 'a/x'; 1 tag (1 + 1) site=m
    02 01 79 00             'a/y': shares 'a/', rest 'y'; tags as the series before
    00 01 62 01             'b': shares 0, rest 'b'; 0 tags (0 + 1)
    09                      reading_count
    d00f                    base_ts 1000 (zigzag 2000)
    04 02 03                runs
    00 80 80                kinds: a/x all f64 good; a/y and b mixed
    62 80 00                codings: e=2 + delta + exceptions; raw; i64 as values
    00 52                   mixed kinds of a/y: f64; bool+uncertain+late
    01 01 23                mixed kinds of b: i64, i64, str+bad
    01 02                   exceptions of a/x: 1, at position 2 (the -0.0)
    00 14 00 00             ts a/x: +0 from base, +10, change 0, change 0
    00 14                   ts a/y: +0, +10
    0a 14 00                ts b: +5, +10, change 0
    ac02 9601 63            mantissas of a/x: 150, +75, -50 (1.50, 2.25, 1.75 at e=2)
    0000 0000 0000 0000 0000 0000 00f8 807f   raw doubles -0.0 and NaN, byte-shuffled
    0a 0e                   i64 of b: 5, 7
    01                      bool: true
    02 6f6b                 str: 'ok'";

fn spec_bytes(s: &str) -> Vec<u8> {
    let text: String = s
        .lines()
        .map(|l| l.trim_start().split("  ").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    hex(&text)
}

#[test]
fn body_bytes_match_the_specification() {
    let mut body = Vec::new();
    encode_body(&sample(), Version::V2, &mut body).unwrap();
    assert_eq!(body, spec_bytes(SAMPLE_BODY));
    let back = decode_body(&body, Version::V2, "edge-1", 7).unwrap();
    assert_eq!(back.readings, series_major(&sample()).readings);
    assert_eq!(back.series, sample().series);
}

/// A complete version 2 record of `sample()` (the body above, zstd level 3), frozen. Decoding it must keep
/// working whatever zstd version encodes.
const SAMPLE_RECORD: &str = include_str!("sample_record_v2.hex");

#[test]
fn frozen_record_decodes_to_the_sample_in_series_major_order() {
    let record = hex(SAMPLE_RECORD);
    assert_eq!(record[4], 2, "version byte");
    let h = peek_header(&record).unwrap();
    assert_eq!(
        (h.version, h.agent_id, h.epoch, h.seq),
        (Version::V2, "edge-1", 0x0102_0304_0506_0708, 7)
    );
    assert_eq!(decode(&record).unwrap(), series_major(&sample()));
}

/// A version 2 record whose body is `body`, as the encoder frames it.
fn v2_record(body: &[u8]) -> Vec<u8> {
    let mut r = b"FLNK\x02\x01\x06edge-1".to_vec();
    r.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
    r.extend_from_slice(&7u64.to_le_bytes());
    r.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    c.include_checksum(true).unwrap();
    c.include_contentsize(true).unwrap();
    r.extend_from_slice(&c.compress(body).unwrap());
    r
}

#[test]
fn the_frozen_record_is_what_the_framing_makes_of_the_body() {
    // Guards the frozen file: it is the specified body, framed; regenerate it from this if zstd's output changes.
    let record = v2_record(&spec_bytes(SAMPLE_BODY));
    let frozen = hex(SAMPLE_RECORD);
    assert_eq!(
        decode(&record).unwrap(),
        decode(&frozen).unwrap(),
        "sample_record_v2.hex = {}",
        record
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
}

/// A batch of `n` readings of one decimal series, large enough that the encoder keeps version 2.
fn meter(n: usize) -> Batch {
    Batch {
        agent_id: "edge-1".into(),
        epoch: 9,
        seq: 1,
        series: vec![Series::new("plant/meter/000/value")],
        readings: (0..n)
            .map(|i| {
                let text = format!("{}.{:03}", 230 + i % 7, (i * 37) % 1000);
                reading(
                    0,
                    1_772_431_200_000 + 10_000 * i as i64,
                    Value::F64(text.parse().unwrap()),
                )
            })
            .collect(),
    }
}

#[test]
fn encoder_writes_version_2_and_decoder_reads_both() {
    let b = meter(500);
    let v2 = encode(&b, 3).unwrap();
    let v1 = Encoder::new(3)
        .unwrap()
        .encode_version(&b, Version::V1)
        .unwrap();
    assert_eq!((v2[4], v1[4]), (2, 1));
    assert_eq!(decode(&v2).unwrap(), b);
    assert_eq!(decode(&v1).unwrap(), b);
    assert!(
        v2.len() * 2 < v1.len(),
        "v2 {} bytes, v1 {} bytes",
        v2.len(),
        v1.len()
    );
}

#[test]
fn a_tiny_batch_is_written_in_whichever_version_is_smaller() {
    // One reading: version 2's per-series bytes outweigh what it saves, so the record is version 1.
    let b = meter(1);
    let best = encode(&b, 3).unwrap();
    let v1 = Encoder::new(3)
        .unwrap()
        .encode_version(&b, Version::V1)
        .unwrap();
    assert!(best.len() <= v1.len());
    assert_eq!(decode(&best).unwrap(), b);
    // Whatever was chosen, the header says which.
    assert_eq!(peek_header(&best).unwrap().version as u8, best[4]);
}

#[test]
fn timestamps_are_delta_of_delta() {
    // Ten readings 10 s apart: after the first two, every timestamp is one zero byte.
    let mut b = meter(10);
    for r in &mut b.readings {
        r.value = Value::F64(1.0);
    }
    let mut body = Vec::new();
    encode_body(&b, Version::V2, &mut body).unwrap();
    // series table (1 + 1 + 1 + 21 + 1), reading_count, base_ts (6 bytes), runs, kinds, codings.
    let ts = &body[25 + 1 + 6 + 1 + 1 + 1..][..11];
    assert_eq!(ts, &[0x00, 0xa0, 0x9c, 0x01, 0, 0, 0, 0, 0, 0, 0]);
}

/// Doubles a sensor can send, and doubles no decimal codes.
fn edge_doubles() -> Vec<f64> {
    let mut v = vec![
        0.0,
        -0.0,
        f64::NAN,
        -f64::NAN,
        f64::from_bits(0x7ff0_0000_0000_0001), // signalling NaN
        f64::from_bits(0x7ff8_dead_beef_0001), // NaN with a payload
        f64::from_bits(0xfff4_0000_0000_0000),
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::MIN_POSITIVE,
        f64::MIN_POSITIVE / 2.0, // subnormal
        f64::from_bits(1),       // smallest subnormal
        -f64::from_bits(1),
        f64::MAX,
        f64::MIN,
        f64::EPSILON,
        9_007_199_254_740_992.0, // 2^53
        9_007_199_254_740_993.0, // rounds to 2^53
        9_007_199_254_740_994.0,
        -9_007_199_254_740_992.0,
        1e22,
        1e23,
        1e-22,
        1e-23,
        0.1,
        0.1 + 0.2,
        1.0 / 3.0,
        std::f64::consts::PI,
        -0.740653,
        721.25,
        123_456_789.123_456_7,
        4.9e-324,
        2.2250738585072014e-308,
    ];
    // Neighbours of decimals: one ulp off is no longer the decimal.
    for d in [0.1f64, 1.5, 721.25, -0.58475375] {
        v.push(f64::from_bits(d.to_bits() + 1));
        v.push(f64::from_bits(d.to_bits() - 1));
    }
    v
}

fn f64_batch(values: &[f64], per_series: usize) -> Batch {
    let n_series = values.len().div_ceil(per_series.max(1)).max(1);
    Batch {
        agent_id: "edge-1".into(),
        epoch: 1,
        seq: 1,
        series: (0..n_series)
            .map(|i| Series::new(format!("dev/{i}/v")))
            .collect(),
        readings: values
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                reading(
                    (i / per_series.max(1)) as u32,
                    i as i64 * 100,
                    Value::F64(v),
                )
            })
            .collect(),
    }
}

fn assert_round_trip_v2(b: &Batch) {
    let mut body = Vec::new();
    encode_body(b, Version::V2, &mut body).unwrap();
    let back = decode_body(&body, Version::V2, &b.agent_id, b.seq).unwrap();
    let want = series_major(b);
    assert_eq!(back.series, want.series);
    assert_eq!(back.readings.len(), want.readings.len());
    for (g, w) in back.readings.iter().zip(&want.readings) {
        match (&g.value, &w.value) {
            (Value::F64(x), Value::F64(y)) => {
                assert_eq!(x.to_bits(), y.to_bits(), "{y:e} came back as {x:e}")
            }
            _ => assert_eq!(g, w),
        }
        assert_eq!(
            (g.series, g.ts_ms, g.quality, g.late),
            (w.series, w.ts_ms, w.quality, w.late)
        );
    }
}

#[test]
fn edge_doubles_round_trip_alone_among_decimals_and_all_together() {
    let edges = edge_doubles();
    for &e in &edges {
        // Alone.
        assert_round_trip_v2(&f64_batch(&[e], 1));
        // As the exception among decimals of one series, at the start, the middle and the end.
        let mut v: Vec<f64> = (0..20).map(|i| f64::from(i) * 0.25 - 2.0).collect();
        v.insert(0, e);
        v.insert(10, e);
        v.push(e);
        assert_round_trip_v2(&f64_batch(&v, v.len()));
    }
    assert_round_trip_v2(&f64_batch(&edges, edges.len()));
    assert_round_trip_v2(&f64_batch(&edges, 3));
}

fn arb_double() -> impl Strategy<Value = f64> {
    prop_oneof![
        // Any bit pattern: NaN payloads, subnormals, infinities, both zeros.
        any::<u64>().prop_map(f64::from_bits),
        // Decimals as sensors print them.
        (-10_000_000_000i64..10_000_000_000, 0u32..12)
            .prop_map(|(m, e)| format!("{m}e-{e}").parse().unwrap_or(0.0)),
        // A few levels that repeat.
        prop::sample::select(vec![-0.58475375, 1.730991, 0.0, -0.0, 21.5]),
    ]
}

proptest! {
    #[test]
    fn every_f64_bit_pattern_round_trips(bits in prop::collection::vec(any::<u64>(), 1..300), per in 1usize..50) {
        let values: Vec<f64> = bits.into_iter().map(f64::from_bits).collect();
        assert_round_trip_v2(&f64_batch(&values, per));
    }

    #[test]
    fn mixed_doubles_round_trip(values in prop::collection::vec(arb_double(), 1..400), per in 1usize..80) {
        assert_round_trip_v2(&f64_batch(&values, per));
    }

    #[test]
    fn round_trip_preserves_every_reading(batch in arb_batch()) {
        let mut body = Vec::new();
        encode_body(&batch, Version::V2, &mut body).unwrap();
        prop_assert_eq!(decode_body(&body, Version::V2, &batch.agent_id, batch.seq).unwrap().readings, series_major(&batch).readings);
        let record = encode(&batch, 1).unwrap();
        prop_assert_eq!(decode(&record).unwrap(), series_major(&batch));
    }

    #[test]
    fn decoder_never_panics_on_mutated_bodies(batch in arb_batch(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut body = Vec::new();
        encode_body(&batch, Version::V2, &mut body).unwrap();
        for (i, b) in flips {
            let i = i.index(body.len());
            body[i] ^= b;
        }
        let _ = decode_body(&body, Version::V2, "x", 1);
    }
}

#[test]
fn truncated_bodies_are_refused() {
    let mut body = Vec::new();
    encode_body(&sample(), Version::V2, &mut body).unwrap();
    for cut in 0..body.len() {
        let res = decode_body(&body[..cut], Version::V2, "x", 1);
        assert!(res.is_err(), "body cut at {cut} decoded: {res:?}");
    }
    let record = encode(&meter(300), 3).unwrap();
    for cut in [0, 3, 6, 10, 20, record.len() - 3] {
        assert!(decode(&record[..cut]).is_err(), "record cut at {cut}");
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut body = Vec::new();
    encode_body(&sample(), Version::V2, &mut body).unwrap();
    body.push(0);
    assert!(matches!(
        decode_body(&body, Version::V2, "x", 1),
        Err(DecodeError::Malformed { what: "body", .. })
    ));
}

/// The sample body with byte `at` replaced by `with`.
fn patched(at: usize, with: &[u8]) -> Vec<u8> {
    let mut body = spec_bytes(SAMPLE_BODY);
    body.splice(at..at + 1, with.iter().copied());
    body
}

#[test]
fn malformed_codings_and_lists_are_refused() {
    let codings = 31; // offset of the coding bytes in SAMPLE_BODY
    assert_eq!(
        spec_bytes(SAMPLE_BODY)[codings..codings + 3],
        [0x62, 0x80, 0x00]
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (patched(codings, &[0x17]), "coding"),        // exponent 23
        (patched(codings, &[0xc2]), "coding"),        // raw with an exponent
        (patched(codings + 2, &[0x42]), "coding"),    // exceptions on a series without doubles
        (patched(codings - 3, &[0x81]), "kind byte"), // a kind with bit 7 but not "mixed"
        (patched(codings + 8, &[0x05]), "exception count"), // 5 exceptions among 4 doubles
    ];
    for (b, what) in cases {
        let res = decode_body(&b, Version::V2, "x", 1);
        assert!(
            matches!(res, Err(DecodeError::Malformed { what: w, .. }) if w == what),
            "{what}: {res:?}"
        );
    }
}

#[test]
fn a_mantissa_above_2_pow_53_is_refused() {
    // One decimal series of one reading, mantissa 2^53 + 1 (e = 0).
    let mut body = hex("01 00 01 78 00 01 00 01 00 00 00");
    let mut m = Vec::new();
    let z = ((1u64 << 53) + 1) << 1;
    let mut v = z;
    while v >= 0x80 {
        m.push((v as u8) | 0x80);
        v >>= 7;
    }
    m.push(v as u8);
    body.extend_from_slice(&m);
    assert_eq!(
        decode_body(&body, Version::V2, "x", 1),
        Err(DecodeError::Malformed {
            what: "mantissa",
            why: "above 2^53"
        })
    );
    // 2^53 itself is allowed.
    let mut ok = hex("01 00 01 78 00 01 00 01 00 00 00");
    let mut v = (1u64 << 53) << 1;
    while v >= 0x80 {
        ok.push((v as u8) | 0x80);
        v >>= 7;
    }
    ok.push(v as u8);
    let b = decode_body(&ok, Version::V2, "x", 1).unwrap();
    assert_eq!(b.readings[0].value, Value::F64(9_007_199_254_740_992.0));
}

#[test]
fn counts_larger_than_the_input_are_refused_before_allocating() {
    for body in [
        hex("80 80 04"),                                  // 65,536 series, nothing behind
        hex("01 00 01 78 00 c0 84 3d"),                   // 1,000,000 readings, nothing behind
        hex("01 00 01 78 00 01 00 01 00 40 ff ff ff 0f"), // a huge exception count
    ] {
        let (res, largest) = largest_allocation(|| decode_body(&body, Version::V2, "x", 1));
        assert!(res.is_err());
        assert!(
            largest < 1024,
            "largest allocation {largest} for {body:02x?}"
        );
    }
}

#[test]
fn front_coding_cannot_inflate_the_series_table_beyond_the_body_limit() {
    // A 1,024-byte key, then 65,535 keys sharing all of it (3 bytes each): 64 MiB of keys from 200 KB of input.
    let mut body = vec![0x80, 0x80, 0x04, 0x00, 0x80, 0x08];
    body.extend(std::iter::repeat_n(b'k', 1024));
    body.push(0x00);
    for _ in 1..65_536 {
        body.extend_from_slice(&[0x80, 0x08, 0x00, 0x00]);
    }
    let (res, largest) = largest_allocation(|| decode_body(&body, Version::V2, "x", 1));
    assert!(
        matches!(
            res,
            Err(DecodeError::LimitExceeded {
                what: "series table (expanded)",
                ..
            })
        ),
        "{res:?}"
    );
    assert!(largest < 4 << 20, "largest allocation {largest}");
}

#[test]
fn a_shared_prefix_longer_than_the_previous_key_is_refused() {
    let body = hex("01 01 01 78 00");
    assert_eq!(
        decode_body(&body, Version::V2, "x", 1).unwrap_err(),
        DecodeError::Malformed {
            what: "key prefix",
            why: "longer than the previous key"
        }
    );
}

#[test]
fn keys_split_inside_a_character_are_joined_before_utf8_is_checked() {
    // 'ä' is c3 a4: the second key shares the first byte of it.
    let b = Batch {
        agent_id: "e".into(),
        epoch: 1,
        seq: 1,
        series: vec![Series::new("ä"), Series::new("\u{00c3}")], // c3 83
        readings: vec![
            reading(0, 1, Value::F64(1.0)),
            reading(1, 1, Value::F64(2.0)),
        ],
    };
    assert_round_trip_v2(&b);
}

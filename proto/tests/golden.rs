//! Golden bytes, round trips and hostile inputs for format v1, which agents configured with `wire_version = 1`
//! still write and every decoder still reads.
//!
//! A counting global allocator (`common/mod.rs`) measures the largest single allocation made while decoding
//! hostile input, so "no large allocation" is checked, not assumed.
#![allow(unsafe_code)] // the counting allocator in common/; the library itself forbids unsafe code
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use fieldlink_proto::{
    decode, decode_body, encode_body, peek_header, Batch, DecodeError, Encoder, Quality, Reading,
    Series, Value, Version,
};
use proptest::prelude::*;

/// A version 1 record at zstd level `level`.
fn encode(b: &Batch, level: i32) -> Result<Vec<u8>, fieldlink_proto::EncodeError> {
    Encoder::new(level)?.encode_version(b, Version::V1)
}

fn sample() -> Batch {
    Batch {
        agent_id: "edge-1".into(),
        epoch: 0,
        seq: 7,
        series: vec![
            Series {
                key: "a/x".into(),
                tags: vec![("site".into(), "m".into())],
            },
            Series::new("b"),
        ],
        readings: vec![
            Reading {
                series: 1,
                ts_ms: 1000,
                value: Value::I64(5),
                quality: Quality::Good,
                late: false,
            },
            Reading {
                series: 0,
                ts_ms: 1010,
                value: Value::F64(1.5),
                quality: Quality::Good,
                late: false,
            },
            Reading {
                series: 0,
                ts_ms: 1005,
                value: Value::Bool(true),
                quality: Quality::Uncertain,
                late: true,
            },
            Reading {
                series: 1,
                ts_ms: 1020,
                value: Value::Str("ok".into()),
                quality: Quality::Bad,
                late: false,
            },
        ],
    }
}

/// The body of `sample()`, derived by hand from FORMAT.md (not by running the encoder).
const SAMPLE_BODY: &str = "
    02                      series_count
    03 612f78 01 04 73697465 01 6d   'a/x', 1 tag site=m
    01 62 00                'b', no tags
    04                      reading_count
    d00f                    base_ts 1000 (zigzag 2000)
    02 02                   runs
    14 09 00 28             ts: +10, -5 | +0, +20
    00 52 01 23             kinds: f64; bool+uncertain+late; i64; str+bad
    000000000000f83f        f64 column: 1.5 (one value, so planes are its bytes)
    0a                      i64 column: 5
    01                      bool column: true
    02 6f6b                 str column: 'ok'";

#[test]
fn body_bytes_match_the_specification() {
    let mut body = Vec::new();
    encode_body(&sample(), Version::V1, &mut body).unwrap();
    let expected: String = SAMPLE_BODY
        .lines()
        .map(|l| l.trim_start().split("  ").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(body, hex(&expected));
}

/// A complete record produced by the v1 encoder, frozen. Decoding it must keep working whatever zstd version encodes.
const SAMPLE_RECORD: &str = include_str!("sample_record.hex");

#[test]
fn frozen_record_decodes_to_the_sample_in_series_major_order() {
    let batch = decode(&hex(SAMPLE_RECORD)).unwrap();
    assert_eq!(batch, series_major(&sample()));
}

#[test]
fn header_is_readable_without_decompressing() {
    let record = encode(&sample(), 3).unwrap();
    let h = peek_header(&record).unwrap();
    assert_eq!((h.agent_id, h.seq), ("edge-1", 7));
    assert_eq!(&record[..4], b"FLNK");
}

#[test]
fn an_epoch_travels_in_the_header_after_the_agent_id() {
    let mut b = sample();
    b.epoch = 0x0102_0304_0506_0708;
    let record = encode(&b, 3).unwrap();
    // magic, version 1, flags = epoch, id length 6, "edge-1", epoch u64le, seq u64le
    let mut want = b"FLNK\x01\x01\x06edge-1".to_vec();
    want.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]);
    want.extend_from_slice(&7u64.to_le_bytes());
    assert_eq!(&record[..want.len()], &want[..]);
    let h = peek_header(&record).unwrap();
    assert_eq!((h.agent_id, h.epoch, h.seq), ("edge-1", b.epoch, 7));
    assert_eq!(decode(&record).unwrap(), series_major(&b));
    // Without an epoch the header is exactly version 1's, flags 0.
    let plain = encode(&sample(), 3).unwrap();
    assert_eq!(plain[5], 0);
    assert_eq!(peek_header(&plain).unwrap().epoch, 0);
}

#[test]
fn an_epoch_flag_with_a_zero_epoch_or_other_flags_is_rejected() {
    let mut b = sample();
    b.epoch = 9;
    let mut record = encode(&b, 3).unwrap();
    record[5] = 0b100;
    assert!(matches!(
        peek_header(&record),
        Err(DecodeError::Malformed { what: "flags", .. })
    ));
    // Bit 1 marks an alarm-event record (proto/src/alarm.rs): the readings decoder refuses it as such.
    record[5] = 0b11;
    assert!(matches!(
        decode(&record),
        Err(DecodeError::Malformed { what: "record", .. })
    ));
    record[5] = 1;
    record[13..21].copy_from_slice(&[0; 8]);
    assert!(matches!(
        peek_header(&record),
        Err(DecodeError::Malformed { what: "epoch", .. })
    ));
}

#[test]
fn encoding_is_deterministic() {
    assert_eq!(encode(&sample(), 3).unwrap(), encode(&sample(), 3).unwrap());
}

fn record_with(body_len: u32, body: &[u8], version: u8) -> Vec<u8> {
    let mut r = b"FLNK".to_vec();
    r.extend_from_slice(&[version, 0, 1, b'x']);
    r.extend_from_slice(&1u64.to_le_bytes());
    r.extend_from_slice(&body_len.to_le_bytes());
    r.extend_from_slice(body);
    r
}

#[test]
fn header_claiming_a_huge_body_is_refused_before_allocating() {
    let record = record_with(u32::MAX, &[0x28, 0xb5, 0x2f, 0xfd], 1);
    let (res, largest) = largest_allocation(|| decode(&record));
    assert_eq!(
        res,
        Err(DecodeError::BodyTooLarge {
            declared: u64::from(u32::MAX)
        })
    );
    assert!(largest < 64 * 1024, "largest allocation {largest}");
}

#[test]
fn zstd_frame_claiming_ten_gigabytes_is_refused_before_allocating() {
    // A zstd frame header: magic, descriptor (single segment, 8-byte content size), content size = 10 GB.
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0xe0];
    frame.extend_from_slice(&10_000_000_000u64.to_le_bytes());
    frame.extend_from_slice(&[0; 16]);
    let record = record_with(1000, &frame, 1);
    let (res, largest) = largest_allocation(|| decode(&record));
    assert_eq!(
        res,
        Err(DecodeError::BodyTooLarge {
            declared: 10_000_000_000
        })
    );
    assert!(largest < 64 * 1024, "largest allocation {largest}");
}

#[test]
fn frame_that_inflates_beyond_its_declared_size_is_refused() {
    // Honest-looking header and frame size, but the frame really holds 1 MiB of zeros: zstd stops at the capacity.
    let zeros = vec![0u8; 1 << 20];
    let mut frame = zstd::bulk::compress(&zeros, 3).unwrap();
    // Patch the frame's content size field would need re-encoding; instead declare less in the header.
    let record = record_with(1000, &frame, 1);
    assert!(matches!(
        decode(&record),
        Err(DecodeError::Malformed { .. })
    ));
    // A stream frame without a content size is refused too.
    frame.clear();
    let mut enc = zstd::stream::Encoder::new(&mut frame, 3).unwrap();
    enc.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut enc, &zeros).unwrap();
    enc.finish().unwrap();
    let record = record_with(1000, &frame, 1);
    assert!(matches!(
        decode(&record),
        Err(DecodeError::Malformed { what: "body", .. })
    ));
}

#[test]
fn truncated_records_are_refused_with_truncated() {
    let record = encode(&sample(), 3).unwrap();
    for cut in [0, 3, 6, 10, 20] {
        let res = decode(&record[..cut]);
        assert!(
            matches!(res, Err(DecodeError::Truncated { .. })),
            "cut at {cut}: {res:?}"
        );
    }
    // A cut inside the zstd frame is a decompression failure; a cut body (uncompressed) is Truncated.
    assert!(decode(&record[..record.len() - 3]).is_err());
    let mut body = Vec::new();
    encode_body(&sample(), Version::V1, &mut body).unwrap();
    for cut in 1..body.len() {
        let res = decode_body(&body[..cut], Version::V1, "x", 1);
        assert!(
            matches!(res, Err(DecodeError::Truncated { .. })),
            "body cut at {cut}: {res:?}"
        );
    }
}

#[test]
fn unknown_version_and_bad_magic_are_distinct_errors() {
    let mut record = encode(&sample(), 3).unwrap();
    record[4] = 3;
    assert_eq!(decode(&record), Err(DecodeError::UnsupportedVersion(3)));
    record[4] = 0;
    assert_eq!(decode(&record), Err(DecodeError::UnsupportedVersion(0)));
    record[0] = b'X';
    assert_eq!(decode(&record), Err(DecodeError::BadMagic));
}

#[test]
fn counts_larger_than_the_input_are_refused_before_allocating() {
    // series_count = 65,536 with no bytes behind it.
    let body = [0x80, 0x80, 0x04];
    let (res, largest) = largest_allocation(|| decode_body(&body, Version::V1, "x", 1));
    assert_eq!(
        res,
        Err(DecodeError::Truncated {
            what: "series_count"
        })
    );
    assert!(largest < 1024);
    // series_count over the limit.
    let body = [0xff, 0xff, 0xff, 0x0f];
    assert!(matches!(
        decode_body(&body, Version::V1, "x", 1),
        Err(DecodeError::LimitExceeded {
            what: "series_count",
            ..
        })
    ));
}

#[test]
fn trailing_bytes_are_refused() {
    let mut body = Vec::new();
    encode_body(&sample(), Version::V1, &mut body).unwrap();
    body.push(0);
    assert!(matches!(
        decode_body(&body, Version::V1, "x", 1),
        Err(DecodeError::Malformed { what: "body", .. })
    ));
}

#[test]
fn encoder_refuses_batches_that_break_limits() {
    let mut b = sample();
    b.readings[0].series = 9;
    assert!(encode(&b, 3).is_err());
    let mut b = sample();
    b.agent_id = "x".repeat(65);
    assert!(encode(&b, 3).is_err());
    let mut b = sample();
    b.readings.clear();
    assert!(encode(&b, 3).is_err());
}

proptest! {
    #[test]
    fn round_trip_preserves_every_reading(batch in arb_batch()) {
        let record = encode(&batch, 1).unwrap();
        prop_assert_eq!(decode(&record).unwrap(), series_major(&batch));
    }

    #[test]
    fn decoder_never_panics_on_mutated_records(batch in arb_batch(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut body = Vec::new();
        encode_body(&batch, Version::V1, &mut body).unwrap();
        for (i, b) in flips {
            let i = i.index(body.len());
            body[i] ^= b;
        }
        let _ = decode_body(&body, Version::V1, "x", 1);
    }
}

//! Fuzzes the record decoders (readings of both format versions, and alarm events): any input must decode or fail
//! with an error, never panic, hang or allocate beyond the format limits. A successful decode must re-encode (in
//! either version) and decode to the same batch, doubles bit for bit.
#![no_main]

use fieldlink_proto::{decode, decode_body, EncodeError, Encoder, Version};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = decode(data) {
        let mut enc = Encoder::new(1).expect("a zstd context");
        for v in [Version::V1, Version::V2] {
            match enc.encode_version(&batch, v) {
                Ok(again) => assert_eq!(decode(&again).expect("re-encoded batch decodes"), batch),
                // Version 2's front-coding and tag repeats can describe a series table whose version 1 body
                // passes 16 MiB; nothing else may fail.
                Err(EncodeError::Invalid { what: "body", .. }) if v == Version::V1 => {}
                Err(e) => panic!("a decoded batch does not re-encode as {v:?}: {e}"),
            }
        }
    }
    // The bodies directly (most inputs never get past the zstd frame): the first byte picks the version.
    if let Some((&pick, body)) = data.split_first() {
        let version = if pick & 1 == 0 { Version::V1 } else { Version::V2 };
        let body = &body[..body.len().min(1 << 16)];
        if let Ok(batch) = decode_body(body, version, "fuzz", 1) {
            let mut enc = Encoder::new(1).expect("a zstd context");
            let mut b = batch.clone();
            b.agent_id = "fuzz".into();
            let again = enc.encode_version(&b, version).expect("a decoded body re-encodes");
            assert_eq!(decode(&again).expect("re-encoded body decodes"), b);
        }
    }
    // Either kind of record (alarm-event records: `proto/src/alarm.rs`); a decoded alarm batch re-encodes to the same.
    if let Ok(fieldlink_proto::Record::Alarms(a)) = fieldlink_proto::decode_any(data) {
        let mut enc = fieldlink_proto::alarm::AlarmEncoder::new(1).expect("zstd");
        if let Ok(again) = enc.encode(&a) {
            assert_eq!(
                fieldlink_proto::decode_any(&again).expect("re-encoded alarm record decodes"),
                fieldlink_proto::Record::Alarms(a)
            );
        }
    }
    let _ = fieldlink_proto::alarm::decode_alarm_body(&data[..data.len().min(1 << 16)]);
});

//! Fuzzes the record decoders (readings and alarm events): any input must decode or fail with an error, never panic, hang or allocate
//! beyond the format limits. A successful decode must re-encode and decode to the same batch.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = fieldlink_proto::decode(data) {
        let again = fieldlink_proto::encode(&batch, 1).expect("a decoded batch re-encodes");
        assert_eq!(fieldlink_proto::decode(&again).expect("re-encoded batch decodes"), batch);
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
    let mut body = data.to_vec();
    body.truncate(1 << 16);
    let _ = fieldlink_proto::decode_body(&body, "fuzz", 1);
    let _ = fieldlink_proto::alarm::decode_alarm_body(&body);
});

//! Fuzzes the record decoder: any input must decode or fail with an error, never panic, hang or allocate
//! beyond the format limits. A successful decode must re-encode and decode to the same batch.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = fieldlink_proto::decode(data) {
        let again = fieldlink_proto::encode(&batch, 1).expect("a decoded batch re-encodes");
        assert_eq!(fieldlink_proto::decode(&again).expect("re-encoded batch decodes"), batch);
    }
    let mut body = data.to_vec();
    body.truncate(1 << 16);
    let _ = fieldlink_proto::decode_body(&body, "fuzz", 1);
});

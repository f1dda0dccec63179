//! The records of the pipeline's Kafka topics, as another process (or a corrupted log) may
//! hand them over: the locations topic, the person-updates topic and the notifications topic.
//! Decoding any bytes answers a value or a `DecodeError`, never a panic; what decodes encodes
//! back to a record that decodes and encodes to the same bytes (bytes, not values: a
//! notification may carry NaN, which equals nothing).

#![no_main]

use libfuzzer_sys::fuzz_target;
use udaconnect::pipeline::codec::{
    decode_notifications, decode_person_batch, encode_notifications, encode_person_batch,
    LocationRecord,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = LocationRecord::decode(Some(data)) {
        let bytes = record.encode();
        let again = LocationRecord::decode(Some(&bytes)).expect("re-encoded decodes");
        assert_eq!(again.encode(), bytes);
    }
    if let Ok(batch) = decode_person_batch(Some(data)) {
        let bytes = encode_person_batch(&batch);
        let again = decode_person_batch(Some(&bytes)).expect("re-encoded decodes");
        assert_eq!(encode_person_batch(&again), bytes);
    }
    if let Ok(notifications) = decode_notifications(Some(data)) {
        let refs: Vec<_> = notifications.iter().collect();
        let bytes = encode_notifications(&refs);
        let again = decode_notifications(Some(&bytes)).expect("re-encoded decodes");
        let refs: Vec<_> = again.iter().collect();
        assert_eq!(encode_notifications(&refs), bytes);
    }
});

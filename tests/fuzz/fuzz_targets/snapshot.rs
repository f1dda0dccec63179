//! The snapshot decoders a partition's new owner runs on what `shard_snapshot` holds (a
//! corrupted row, or one another version wrote): the zone partition's header and slice parts
//! into zone indexes, the person partition's header and person parts. Any blob answers the
//! decoded state or an error, never a panic.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use udaconnect_actors::actors::person::{decode_person_snapshot, PERSON_SNAPSHOT_FORMAT};
use udaconnect_actors::actors::ports::SnapshotBlob;
use udaconnect_actors::actors::zone::{decode_zone_snapshot, ZONE_SNAPSHOT_FORMAT};

#[derive(Debug, Arbitrary)]
struct Blob {
    zones: bool,
    /// Mostly the format this version reads, so that decoding goes past the first check.
    other_format: Option<u32>,
    next_offset: u64,
    bytes: Vec<u8>,
    parts: Vec<(i64, Option<Vec<u8>>)>,
    complete: bool,
}

fuzz_target!(|input: Blob| {
    let format = if input.zones {
        ZONE_SNAPSHOT_FORMAT
    } else {
        PERSON_SNAPSHOT_FORMAT
    };
    let blob = SnapshotBlob {
        next_offset: input.next_offset,
        format: input.other_format.unwrap_or(format),
        bytes: input.bytes,
        parts: input.parts,
        complete: input.complete,
    };
    if input.zones {
        if let Ok(decoded) = decode_zone_snapshot(&blob) {
            assert_eq!(decoded.zones.len(), decoded.header.zones.len());
        }
    } else {
        let _ = decode_person_snapshot(&blob);
    }
});

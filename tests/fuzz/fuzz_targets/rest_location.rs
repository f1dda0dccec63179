//! The REST location parser: a request body as a client may send it, through what
//! `POST /v1/locations` and each item of `POST /v1/locations/batch` apply (JSON read naming the
//! field where it fails, then the report's fields checked). Any bytes answer a report or an
//! error naming a field, never a panic; an accepted report holds in-range values.

#![no_main]

use libfuzzer_sys::fuzz_target;
use udaconnect::input::{parse_json, FromJson};
use udaconnect_actors::domain::NewLocationEvent;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = parse_json(data) else {
        return;
    };
    match NewLocationEvent::from_json(&value) {
        Ok(event) => {
            assert!((-90.0..=90.0).contains(&event.lat), "{event:?}");
            assert!((-180.0..=180.0).contains(&event.lon), "{event:?}");
            assert!(event.person_id > 0, "{event:?}");
        }
        Err(e) => assert!(e.field.is_some(), "{e:?}"),
    }
    if let Some(items) = value.get("events").and_then(|v| v.as_array()) {
        for item in items {
            let _ = NewLocationEvent::from_json(item);
        }
    }
});

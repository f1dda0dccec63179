//! What the pipeline's Kafka records hold. Internal topics carry a format byte and then
//! postcard (compact, fast); the notifications topic carries JSON, for any consumer: each
//! record is one object `{"notifications": [...]}` holding the notifications of one
//! person-stage batch for the persons of one partition, in the order they were made
//! (docs/architecture.md shows one).

use serde::{Deserialize, Serialize};
use udaconnect_actors::domain::{Micros, Notification};
use udaconnect_actors::messages::{PersonBatch, RoutedEvent};

/// Format byte of the records this version writes to the internal topics.
pub const FORMAT: u8 = 1;

/// A record of the `locations` topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LocationRecord {
    /// Events routed to zones of this partition, in the order they were accepted.
    Events(Vec<RoutedEvent>),
    /// The ingest side's heartbeat: it has accepted events up to `max_event_time`, so later
    /// records hold nothing earlier than `max_event_time - lateness` (docs/design.md §3).
    Heartbeat { max_event_time: Micros },
}

/// Why a record could not be read; it goes to the dead-letter topic with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("unknown record format {0} (this version reads {FORMAT})")]
    Format(u8),
    #[error("malformed record: {0}")]
    Malformed(String),
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = vec![FORMAT];
    // Serializing these types into a Vec cannot fail.
    bytes.extend(postcard::to_stdvec(value).expect("postcard serializes plain data"));
    bytes
}

fn decode<'a, T: Deserialize<'a>>(bytes: Option<&'a [u8]>) -> Result<T, DecodeError> {
    match bytes {
        None | Some([]) => Err(DecodeError::Empty),
        Some([FORMAT, rest @ ..]) => {
            postcard::from_bytes(rest).map_err(|e| DecodeError::Malformed(e.to_string()))
        }
        Some([other, ..]) => Err(DecodeError::Format(*other)),
    }
}

impl LocationRecord {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes a record and checks each event in it ([`RoutedEvent::check`]): a record whose
    /// bytes decode but hold an event no ingest would have accepted (NaN or out-of-range
    /// coordinates, a non-positive person, a time out of range, a zone that is no H3 cell) is
    /// malformed too, and goes to the dead-letter topic rather than into the engine.
    pub fn decode(bytes: Option<&[u8]>) -> Result<Self, DecodeError> {
        let record: Self = decode(bytes)?;
        if let Self::Events(events) = &record {
            for (i, e) in events.iter().enumerate() {
                e.check().map_err(|v| {
                    DecodeError::Malformed(format!("event {i}: {} {}", v.field, v.reason))
                })?;
            }
        }
        Ok(record)
    }
}

/// Encodes a record of the `person-updates` topic.
pub fn encode_person_batch(batch: &PersonBatch) -> Vec<u8> {
    encode(batch)
}

/// Decodes a record of the `person-updates` topic.
/// Decodes a record of the `person-updates` topic and checks each update in it
/// ([`udaconnect_actors::messages::PersonUpdate::check`]): one whose bytes decode but hold a
/// value the zone stage never sends is malformed, and goes to the dead-letter topic.
pub fn decode_person_batch(bytes: Option<&[u8]>) -> Result<PersonBatch, DecodeError> {
    let batch: PersonBatch = decode(bytes)?;
    for (i, u) in batch.updates.iter().enumerate() {
        u.check()
            .map_err(|v| DecodeError::Malformed(format!("update {i}: {} {}", v.field, v.reason)))?;
    }
    Ok(batch)
}

/// A record of the `connections` topic: notifications, in the order they were made.
#[derive(Debug, Serialize)]
struct NotificationsOut<'a> {
    notifications: &'a [&'a Notification],
}

#[derive(Debug, Deserialize)]
struct NotificationsIn {
    notifications: Vec<Notification>,
}

/// Encodes notifications as one record of the `connections` topic (JSON).
pub fn encode_notifications(notifications: &[&Notification]) -> Vec<u8> {
    serde_json::to_vec(&NotificationsOut { notifications }).expect("notifications serialize")
}

/// Decodes a record of the `connections` topic.
pub fn decode_notifications(bytes: Option<&[u8]>) -> Result<Vec<Notification>, DecodeError> {
    let bytes = bytes.ok_or(DecodeError::Empty)?;
    serde_json::from_slice::<NotificationsIn>(bytes)
        .map(|r| r.notifications)
        .map_err(|e| DecodeError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `kafka_records` fuzz target: postcard decodes a NaN longitude (or any
    /// value) that no ingest would accept; the record is malformed, named by its event.
    #[test]
    fn a_location_record_holding_an_event_no_ingest_accepts_is_malformed() {
        use udaconnect_actors::domain::LocationEvent;
        let cell = |r| u64::from(h3o::LatLng::new(52.5, 13.4).expect("a place").to_cell(r));
        let good = RoutedEvent {
            event: LocationEvent {
                event_id: uuid::Uuid::from_u128(1),
                person_id: 5,
                lat: 52.5,
                lon: 13.4,
                recorded_at: 1_764_000_000_000_000,
                received_at: 1_764_000_000_000_000,
            },
            zone: cell(h3o::Resolution::Eight),
            fine_cell: cell(h3o::Resolution::Twelve),
            home: true,
        };
        let record = LocationRecord::Events(vec![good]);
        assert_eq!(LocationRecord::decode(Some(&record.encode())), Ok(record));
        let bad = |f: &dyn Fn(&mut RoutedEvent)| {
            let mut e = good;
            f(&mut e);
            LocationRecord::decode(Some(&LocationRecord::Events(vec![good, e]).encode()))
        };
        for (change, field) in [
            (
                &(|e: &mut RoutedEvent| e.event.lon = f64::NAN) as &dyn Fn(&mut RoutedEvent),
                "lon",
            ),
            (&|e: &mut RoutedEvent| e.event.lat = 91.0, "lat"),
            (&|e: &mut RoutedEvent| e.event.person_id = 0, "person_id"),
            (
                &|e: &mut RoutedEvent| e.event.recorded_at = -7_113_539_584,
                "recorded_at",
            ),
            (
                &|e: &mut RoutedEvent| e.event.received_at = i64::MAX,
                "received_at",
            ),
            (&|e: &mut RoutedEvent| e.zone = 43, "zone"),
            (&|e: &mut RoutedEvent| e.fine_cell = 0, "fine_cell"),
        ] {
            match bad(change) {
                Err(DecodeError::Malformed(m)) => {
                    assert!(m.starts_with(&format!("event 1: {field} ")), "{m}")
                }
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_say_why() {
        let hb = LocationRecord::Heartbeat {
            max_event_time: 1_790_000_000_000_000,
        };
        assert_eq!(LocationRecord::decode(Some(&hb.encode())), Ok(hb));
        assert_eq!(LocationRecord::decode(None), Err(DecodeError::Empty));
        assert_eq!(
            LocationRecord::decode(Some(&[9, 1, 2])),
            Err(DecodeError::Format(9))
        );
        assert!(matches!(
            LocationRecord::decode(Some(&[FORMAT, 0xff, 0xff, 0xff])),
            Err(DecodeError::Malformed(_))
        ));
        let batch = PersonBatch {
            source: 3,
            updates: vec![],
            watermark: 42,
        };
        assert_eq!(
            decode_person_batch(Some(&encode_person_batch(&batch))),
            Ok(batch)
        );
    }

    /// A person-updates record holding a summary the zone stage never sends is malformed,
    /// named by its update.
    #[test]
    fn a_person_batch_holding_an_impossible_summary_is_malformed() {
        use udaconnect_actors::domain::{Closest, ColocationSummary};
        use udaconnect_actors::messages::PersonUpdate;
        let t = 1_764_000_000_000_000;
        let summary = ColocationSummary {
            person: 5,
            peer: 6,
            arriving_event: uuid::Uuid::from_u128(1),
            zone: u64::from(
                h3o::LatLng::new(52.5, 13.4)
                    .expect("a place")
                    .to_cell(h3o::Resolution::Eight),
            ),
            count: 1,
            first: t,
            last: t,
            closest: Closest {
                distance_m: 1.5,
                time: t,
                own_event: uuid::Uuid::from_u128(1),
                peer_event: uuid::Uuid::from_u128(2),
                lat: 52.5,
                lon: 13.4,
            },
        };
        let batch = |s: ColocationSummary| PersonBatch {
            source: 0,
            updates: vec![
                PersonUpdate::Colocations(summary),
                PersonUpdate::Colocations(s),
            ],
            watermark: t,
        };
        let good = batch(summary);
        assert_eq!(
            decode_person_batch(Some(&encode_person_batch(&good))),
            Ok(good)
        );
        type Change = dyn Fn(&mut ColocationSummary);
        let changes: [(&Change, &str); 6] = [
            (&|s| s.peer = s.person, "peer"),
            (&|s| s.count = 0, "count"),
            (&|s| s.last = s.first - 1, "first"),
            (&|s| s.closest.distance_m = f64::NAN, "closest.distance_m"),
            (&|s| s.closest.lon = 200.0, "closest.lat"),
            (&|s| s.zone = 7, "zone"),
        ];
        for (change, field) in changes {
            let mut s = summary;
            change(&mut s);
            match decode_person_batch(Some(&encode_person_batch(&batch(s)))) {
                Err(DecodeError::Malformed(m)) => {
                    assert!(m.starts_with(&format!("update 1: {field} ")), "{m}")
                }
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}

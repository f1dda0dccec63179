//! Conversions between the `udaconnect.v1` messages and the domain types and actor views.

use prost_types::Timestamp;
use udaconnect_actors::actors::person::PersonView;
use udaconnect_actors::actors::zone::ZoneView;
use udaconnect_actors::domain::{Micros, NewLocationEvent, Notification, NotificationKind};
use udaconnect_actors::episodes::{OpenEpisode, PersonCounters, Sighting};
use udaconnect_actors::geo::Ecef;
use udaconnect_actors::zone_index::{RetainedPoint, ZoneCounters};

use super::v1;
use crate::error::ApiError;
use crate::input::{parse_uuid, parse_zone, zone_hex};
use crate::pipeline::live::{LivePoint, LivePoints, LiveZone};
use crate::store::queries::{HistoryItem, Person};

/// Microseconds since the epoch as a protobuf timestamp.
pub fn timestamp(t: Micros) -> Timestamp {
    Timestamp {
        seconds: t.div_euclid(1_000_000),
        nanos: (t.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

/// A watermark or other "time so far" as a timestamp; unset while there is none
/// (`Micros::MIN`).
pub fn optional_timestamp(t: Micros) -> Option<Timestamp> {
    (t != Micros::MIN).then(|| timestamp(t))
}

/// A chrono time as a protobuf timestamp.
pub fn chrono_timestamp(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    timestamp(t.timestamp_micros())
}

/// A protobuf timestamp as microseconds (sub-microsecond digits dropped); `field` names it in
/// the error.
pub fn micros(t: &Timestamp, field: &str) -> Result<Micros, ApiError> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(ApiError::invalid(
            field,
            format!("nanos must be between 0 and 999999999 (got {})", t.nanos),
        ));
    }
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|us| us.checked_add(i64::from(t.nanos / 1_000)))
        .ok_or_else(|| ApiError::invalid(field, format!("is out of range (got {} s)", t.seconds)))
}

/// A protobuf timestamp as a chrono time; `field` names it in the error.
pub fn chrono_time(t: &Timestamp, field: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    let us = micros(t, field)?;
    chrono::DateTime::from_timestamp_micros(us)
        .ok_or_else(|| ApiError::invalid(field, format!("is out of range (got {} s)", t.seconds)))
}

/// A location event as the ingest path takes it; the checks of values (ranges, skew) are
/// the ingest path's, this only reads the shape.
pub fn new_location_event(e: &v1::LocationEvent) -> Result<NewLocationEvent, ApiError> {
    // proto3 has no absent string: empty means none (the service derives one).
    let event_id = match e.event_id.trim() {
        "" => None,
        text => Some(parse_uuid(text, "event_id")?),
    };
    let recorded_at = e
        .recorded_at
        .as_ref()
        .ok_or_else(|| ApiError::invalid("recorded_at", "is required"))?;
    Ok(NewLocationEvent {
        event_id,
        person_id: e.person_id,
        lat: e.lat,
        lon: e.lon,
        recorded_at: micros(recorded_at, "recorded_at")?,
    })
}

/// A snapshot offset the log contradicted, as the Admin service reports it.
pub fn snapshot_mismatch(m: &crate::pipeline::offsets::OffsetMismatch) -> v1::SnapshotMismatch {
    v1::SnapshotMismatch {
        kind: m.kind.as_str().to_owned(),
        message: m.describe(),
        snapshot_offset: m.snapshot_offset,
        snapshot_topic_id: m.snapshot_topic_id.clone().unwrap_or_default(),
        log_start: m.log_start,
        log_end: m.log_end,
        topic_id: m.topic_id.clone(),
        resumed_at: m.resumed_at,
    }
}

/// A person in the API's shape.
pub fn person(p: &Person) -> v1::Person {
    v1::Person {
        id: p.id,
        first_name: p.first_name.clone(),
        last_name: p.last_name.clone(),
        company_name: p.company_name.clone(),
    }
}

/// One row of the connection history.
pub fn connection(item: &HistoryItem) -> v1::Connection {
    v1::Connection {
        peer: Some(person(&item.peer)),
        started_at: Some(chrono_timestamp(item.started_at)),
        ended_at: item.ended_at.map(chrono_timestamp),
        last_seen_at: Some(chrono_timestamp(item.last_seen_at)),
        colocations: item.colocations.max(0) as u32,
        min_distance_m: item.min_distance_m,
        lat: item.lat,
        lon: item.lon,
    }
}

/// A notification as a stream item.
pub fn connection_event(n: &Notification) -> v1::ConnectionEvent {
    let kind = match n.kind {
        NotificationKind::Started => v1::ConnectionEventKind::ConnectionStarted,
        NotificationKind::Updated => v1::ConnectionEventKind::ConnectionUpdated,
        NotificationKind::Ended => v1::ConnectionEventKind::ConnectionEnded,
    };
    let e = &n.episode;
    v1::ConnectionEvent {
        id: n.id.to_string(),
        kind: kind as i32,
        r#type: n.kind.as_str().to_owned(),
        person_id: e.person,
        peer_id: e.peer,
        started_at: Some(timestamp(e.started_at)),
        last_seen_at: Some(timestamp(e.last_seen_at)),
        ended_at: e.ended_at.map(timestamp),
        colocations: e.colocations,
        min_distance_m: e.min_distance_m,
        lat: e.lat,
        lon: e.lon,
        replaces: n.replaces.iter().copied().map(timestamp).collect(),
    }
}

fn sighting(s: &Sighting) -> v1::Sighting {
    v1::Sighting {
        event_id: s.event_id.to_string(),
        recorded_at: Some(timestamp(s.recorded_at)),
        lat: s.lat,
        lon: s.lon,
        zone: zone_hex(s.zone),
    }
}

/// What an erasure did, as `Admin.ErasePerson` answers it.
pub fn erasure(e: &crate::pipeline::erasure::Erasure) -> v1::ErasePersonResponse {
    v1::ErasePersonResponse {
        person_id: e.person,
        locations: e.rows.locations,
        halo_copies: e.rows.halo_copies,
        connections: e.rows.connections,
        person_deleted: e.rows.person,
        processes: e.processes,
        partitions: e.partitions,
        notifications: e.notifications,
    }
}

/// A person's live state, with where it lives; without a view (no actor holds state for the
/// person) only `person_id` and `partition` are set, and `counters` is unset.
pub fn person_state(
    person: i64,
    v: Option<&PersonView>,
    partition: i32,
    owner: &str,
) -> v1::PersonState {
    let Some(v) = v else {
        return v1::PersonState {
            person_id: person,
            partition,
            ..v1::PersonState::default()
        };
    };
    let c = v.counters;
    v1::PersonState {
        person_id: v.person,
        partition,
        owner: owner.to_owned(),
        passivated: v.passivated,
        current_zone: v.current_zone.map(zone_hex),
        last_location: v.last_location.as_ref().map(sighting),
        trajectory: v.trajectory.iter().map(sighting).collect(),
        open_episodes: v
            .open_episodes
            .iter()
            .map(|e| v1::OpenEpisode {
                peer_id: e.peer,
                started_at: Some(timestamp(e.started_at)),
                last_seen_at: Some(timestamp(e.last_seen_at)),
                colocations: e.colocations,
                min_distance_m: e.min_distance_m,
            })
            .collect(),
        counters: Some(v1::PersonCounters {
            sightings: c.sightings,
            colocations: c.colocations,
            repeats: c.repeats,
            started: c.started,
            updated: c.updated,
            ended: c.ended,
        }),
    }
}

fn time_of(t: &Option<Timestamp>, field: &str) -> Result<Micros, ApiError> {
    match t {
        Some(t) => micros(t, field),
        None => Err(ApiError::invalid(field, "is missing in the owner's answer")),
    }
}

fn sighting_view(s: &v1::Sighting) -> Result<Sighting, ApiError> {
    Ok(Sighting {
        event_id: parse_uuid(&s.event_id, "event_id")?,
        recorded_at: time_of(&s.recorded_at, "recorded_at")?,
        lat: s.lat,
        lon: s.lon,
        zone: parse_zone(&s.zone, "zone", None)?,
    })
}

/// A person actor's view back from a forwarded answer; `None` when the answer has no counters
/// (no actor holds state for the person, see [`person_state`]).
pub fn person_view(s: &v1::PersonState) -> Result<Option<PersonView>, ApiError> {
    let Some(c) = s.counters else {
        return Ok(None);
    };
    Ok(Some(PersonView {
        person: s.person_id,
        current_zone: s
            .current_zone
            .as_deref()
            .map(|z| parse_zone(z, "current_zone", None))
            .transpose()?,
        last_location: s.last_location.as_ref().map(sighting_view).transpose()?,
        trajectory: s
            .trajectory
            .iter()
            .map(sighting_view)
            .collect::<Result<_, _>>()?,
        open_episodes: s
            .open_episodes
            .iter()
            .map(|e| {
                Ok(OpenEpisode {
                    peer: e.peer_id,
                    started_at: time_of(&e.started_at, "started_at")?,
                    last_seen_at: time_of(&e.last_seen_at, "last_seen_at")?,
                    colocations: e.colocations,
                    min_distance_m: e.min_distance_m,
                })
            })
            .collect::<Result<_, ApiError>>()?,
        counters: PersonCounters {
            sightings: c.sightings,
            colocations: c.colocations,
            repeats: c.repeats,
            started: c.started,
            updated: c.updated,
            ended: c.ended,
        },
        passivated: s.passivated,
    }))
}

/// A zone actor's view, with where it lives.
pub fn zone_state(v: &ZoneView, partition: i32, owner: &str) -> v1::ZoneState {
    let c = v.counters;
    v1::ZoneState {
        zone: zone_hex(v.zone),
        partition,
        owner: owner.to_owned(),
        retained: v.retained as u64,
        cells: v.cells as u64,
        watermark: optional_timestamp(v.watermark),
        counters: Some(v1::ZoneCounters {
            home_events: c.home_events,
            ghost_events: c.ghost_events,
            duplicates: c.duplicates,
            colocations: c.colocations,
            evicted: c.evicted,
        }),
        points: v
            .points
            .iter()
            .map(|p| v1::RetainedPoint {
                event_id: p.event_id.to_string(),
                person_id: p.person,
                lat: p.lat,
                lon: p.lon,
                recorded_at: Some(timestamp(p.recorded_at)),
                home: p.home,
            })
            .collect(),
    }
}

/// A zone actor's view back from a forwarded answer.
pub fn zone_view(s: &v1::ZoneState) -> Result<ZoneView, ApiError> {
    let c = s.counters.unwrap_or_default();
    Ok(ZoneView {
        zone: parse_zone(&s.zone, "zone", None)?,
        retained: s.retained as usize,
        cells: s.cells as usize,
        watermark: match &s.watermark {
            Some(t) => micros(t, "watermark")?,
            None => Micros::MIN,
        },
        counters: ZoneCounters {
            home_events: c.home_events,
            ghost_events: c.ghost_events,
            duplicates: c.duplicates,
            colocations: c.colocations,
            evicted: c.evicted,
        },
        points: s
            .points
            .iter()
            .map(|p| {
                Ok(RetainedPoint {
                    ecef: Ecef::from_degrees(p.lat, p.lon),
                    recorded_at: time_of(&p.recorded_at, "recorded_at")?,
                    person: p.person_id,
                    event_id: parse_uuid(&p.event_id, "event_id")?,
                    lat: p.lat,
                    lon: p.lon,
                    home: p.home,
                })
            })
            .collect::<Result<_, ApiError>>()?,
    })
}

/// The live points as `Admin.ListPoints` answers them.
pub fn list_points(p: &LivePoints) -> v1::ListPointsResponse {
    v1::ListPointsResponse {
        points: p
            .points
            .iter()
            .map(|x| v1::LivePoint {
                person_id: x.person,
                lat: x.lat,
                lon: x.lon,
                recorded_at: Some(timestamp(x.recorded_at)),
                zone: zone_hex(x.zone),
            })
            .collect(),
        zones: p
            .zones
            .iter()
            .map(|z| v1::LiveZone {
                zone: zone_hex(z.zone),
                partition: z.partition,
                owner: z.owner.clone(),
                points: z.points as u64,
            })
            .collect(),
        truncated: p.truncated,
        unanswered: p.unanswered.clone(),
    }
}

/// A peer's `Admin.ListPoints` answer as live points.
pub fn live_points(r: &v1::ListPointsResponse) -> Result<LivePoints, ApiError> {
    Ok(LivePoints {
        points: r
            .points
            .iter()
            .map(|x| {
                Ok(LivePoint {
                    person: x.person_id,
                    lat: x.lat,
                    lon: x.lon,
                    recorded_at: time_of(&x.recorded_at, "recorded_at")?,
                    zone: parse_zone(&x.zone, "zone", None)?,
                })
            })
            .collect::<Result<_, ApiError>>()?,
        zones: r
            .zones
            .iter()
            .map(|z| {
                Ok(LiveZone {
                    zone: parse_zone(&z.zone, "zone", None)?,
                    partition: z.partition,
                    owner: z.owner.clone(),
                    points: z.points as usize,
                })
            })
            .collect::<Result<_, ApiError>>()?,
        truncated: r.truncated,
        unanswered: r.unanswered.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_points_round_trip_through_list_points() {
        let zone = 0x0884_8d89_4b1f_ffff;
        let points = LivePoints {
            points: vec![LivePoint {
                person: 7,
                lat: 35.084_524_1,
                lon: -106.643_793_2,
                recorded_at: 1_764_507_565_123_456,
                zone,
            }],
            zones: vec![LiveZone {
                zone,
                partition: 3,
                owner: "udaconnect-1".to_owned(),
                points: 1,
            }],
            truncated: true,
            unanswered: vec!["udaconnect-2 (127.0.0.1:1): did not answer".to_owned()],
        };
        assert_eq!(live_points(&list_points(&points)), Ok(points));
        let mut bad = list_points(&LivePoints::default());
        bad.points.push(v1::LivePoint {
            zone: "42".to_owned(),
            ..v1::LivePoint::default()
        });
        let e = live_points(&bad).expect_err("not a zone");
        assert_eq!(e.field.as_deref(), Some("recorded_at"));
    }

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for us in [0, 1, 1_597_746_226_000_123, -1, -1_500_001] {
            assert_eq!(micros(&timestamp(us), "t"), Ok(us), "{us}");
        }
        let t = timestamp(-1);
        assert_eq!((t.seconds, t.nanos), (-1, 999_999_000));
        assert_eq!(optional_timestamp(Micros::MIN), None);
    }

    #[test]
    fn bad_timestamps_and_event_ids_name_the_field() {
        let bad = Timestamp {
            seconds: 1,
            nanos: -5,
        };
        assert_eq!(
            micros(&bad, "recorded_at").map_err(|e| e.field),
            Err(Some("recorded_at".to_owned()))
        );
        let event = v1::LocationEvent {
            event_id: "not-a-uuid".to_owned(),
            person_id: 1,
            lat: 0.0,
            lon: 0.0,
            recorded_at: Some(timestamp(1_700_000_000_000_000)),
        };
        let err = new_location_event(&event).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("event_id"));
        let missing = v1::LocationEvent {
            recorded_at: None,
            event_id: String::new(),
            ..event
        };
        let err = new_location_event(&missing).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("recorded_at"));
    }
}

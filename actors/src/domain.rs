//! Domain types of docs/design.md §1: persons, location events, co-locations, episodes,
//! notifications.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A person's id, as stored in the `person` table.
pub type PersonId = i64;

/// A point in time: microseconds since the Unix epoch, UTC (PostgreSQL's `timestamptz` precision).
pub type Micros = i64;

/// Microseconds in one second.
pub const MICROS_PER_S: i64 = 1_000_000;

/// The earliest accepted `recorded_at` (2000-01-01T00:00:00Z): earlier values are almost always
/// seconds or milliseconds sent where microseconds were expected.
pub const MIN_RECORDED_AT: Micros = 946_684_800 * MICROS_PER_S;

/// Namespace of the deterministic event ids (uuid v5) of events sent without one.
pub const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_5a0e_8d2b_4c47_9a3e_2b7d_41f0_c9a1);

/// An attendee, in the POC's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    pub id: PersonId,
    pub first_name: String,
    pub last_name: String,
    pub company_name: String,
}

/// A location event as a client sends it, before validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NewLocationEvent {
    /// The client's id for the event; derived from the other fields when absent.
    #[serde(default)]
    pub event_id: Option<Uuid>,
    pub person_id: PersonId,
    /// Degrees north, WGS84.
    pub lat: f64,
    /// Degrees east, WGS84.
    pub lon: f64,
    pub recorded_at: Micros,
}

/// A validated location event with its final id.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LocationEvent {
    pub event_id: Uuid,
    pub person_id: PersonId,
    pub lat: f64,
    pub lon: f64,
    pub recorded_at: Micros,
    pub received_at: Micros,
}

/// What a report is besides its id: person, place (bit for bit) and time. One `event_id` with
/// two fingerprints is an id reused for a different report, refused; with one, a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReportFingerprint {
    pub person_id: PersonId,
    pub lat_bits: u64,
    pub lon_bits: u64,
    pub recorded_at: Micros,
}

impl ReportFingerprint {
    /// The fingerprint of a report of `person_id` at (`lat`, `lon`) WGS84 degrees, recorded at
    /// `recorded_at` µs since the Unix epoch.
    pub fn new(person_id: PersonId, lat: f64, lon: f64, recorded_at: Micros) -> Self {
        Self {
            person_id,
            lat_bits: lat.to_bits(),
            lon_bits: lon.to_bits(),
            recorded_at,
        }
    }

    /// The fingerprint of `e`.
    pub fn of(e: &LocationEvent) -> Self {
        Self::new(e.person_id, e.lat, e.lon, e.recorded_at)
    }
}

/// Why an event was rejected; names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The field's name, as in the API.
    pub field: &'static str,
    /// What is wrong with it, with the rejected value.
    pub reason: String,
}

impl ValidationError {
    fn new(field: &'static str, reason: String) -> Self {
        Self { field, reason }
    }
}

impl NewLocationEvent {
    /// Validates the event received at `received_at`, allowing `recorded_at` from
    /// `late_horizon_s` seconds before it (the late path's horizon) to `max_future_skew_s`
    /// seconds after it, and assigns the final `event_id`. Errors name the field.
    pub fn validate(
        self,
        received_at: Micros,
        max_future_skew_s: u32,
        late_horizon_s: u32,
    ) -> Result<LocationEvent, ValidationError> {
        check_report(self.person_id, self.lat, self.lon, self.recorded_at)?;
        let limit = received_at.saturating_add(i64::from(max_future_skew_s) * MICROS_PER_S);
        if self.recorded_at > limit {
            return Err(ValidationError::new(
                "recorded_at",
                format!(
                    "is {:.1} s in the future; at most {max_future_skew_s} s of clock skew is allowed",
                    (self.recorded_at - received_at) as f64 / MICROS_PER_S as f64
                ),
            ));
        }
        let oldest = received_at.saturating_sub(i64::from(late_horizon_s) * MICROS_PER_S);
        if self.recorded_at < oldest {
            return Err(ValidationError::new(
                "recorded_at",
                format!(
                    "is {:.1} s before the time it was received; reports older than the late \
                     horizon of {late_horizon_s} s (late_horizon_s) are not accepted",
                    (received_at - self.recorded_at) as f64 / MICROS_PER_S as f64
                ),
            ));
        }
        // -0.0 and 0.0 are the same place; keep one id for a retried send.
        let lat = self.lat + 0.0;
        let lon = self.lon + 0.0;
        Ok(LocationEvent {
            event_id: self
                .event_id
                .unwrap_or_else(|| derived_event_id(self.person_id, self.recorded_at, lat, lon)),
            person_id: self.person_id,
            lat,
            lon,
            recorded_at: self.recorded_at,
            received_at,
        })
    }
}

/// The rules every report meets, whoever made it: a positive person id, WGS84 degrees in
/// range (finite), and a time not before 2000-01-01 nor after 9999-12-31 (µs since the Unix
/// epoch). Errors name the field.
fn check_report(
    person_id: PersonId,
    lat: f64,
    lon: f64,
    recorded_at: Micros,
) -> Result<(), ValidationError> {
    if person_id <= 0 {
        return Err(ValidationError::new(
            "person_id",
            format!("must be a positive id (got {person_id})"),
        ));
    }
    if !(lat.is_finite() && (-90.0..=90.0).contains(&lat)) {
        return Err(ValidationError::new(
            "lat",
            format!("must be between -90 and 90 degrees (got {lat})"),
        ));
    }
    if !(lon.is_finite() && (-180.0..=180.0).contains(&lon)) {
        return Err(ValidationError::new(
            "lon",
            format!("must be between -180 and 180 degrees (got {lon})"),
        ));
    }
    if recorded_at < MIN_RECORDED_AT {
        return Err(ValidationError::new(
            "recorded_at",
            format!(
                "must not be before 2000-01-01T00:00:00Z (got {recorded_at} µs since the epoch)"
            ),
        ));
    }
    if recorded_at > MAX_TIME {
        return Err(ValidationError::new(
            "recorded_at",
            format!("must not be after 9999-12-31 (got {recorded_at} µs since the epoch)"),
        ));
    }
    Ok(())
}

/// The last microsecond of 9999-12-31 UTC: later times are not RFC 3339 (four-digit years).
pub const MAX_TIME: Micros = 253_402_300_799_999_999;

impl LocationEvent {
    /// Checks an event that arrives already validated, from a Kafka record (a corrupted one,
    /// or one another program wrote): the report's rules of [`NewLocationEvent::validate`],
    /// and a receive time in the same range. Errors name the field.
    pub fn check(&self) -> Result<(), ValidationError> {
        check_report(self.person_id, self.lat, self.lon, self.recorded_at)?;
        if !(MIN_RECORDED_AT..=MAX_TIME).contains(&self.received_at) {
            return Err(ValidationError::new(
                "received_at",
                format!(
                    "must be from 2000-01-01 to 9999-12-31 (got {} µs since the epoch)",
                    self.received_at
                ),
            ));
        }
        Ok(())
    }
}

/// The deterministic id of an event sent without one: a retried send gets the same id.
pub fn derived_event_id(person_id: PersonId, recorded_at: Micros, lat: f64, lon: f64) -> Uuid {
    let mut name = [0u8; 32];
    name[..8].copy_from_slice(&person_id.to_be_bytes());
    name[8..16].copy_from_slice(&recorded_at.to_be_bytes());
    name[16..24].copy_from_slice(&lat.to_bits().to_be_bytes());
    name[24..].copy_from_slice(&lon.to_bits().to_be_bytes());
    uuid_v5(&EVENT_ID_NAMESPACE, &name)
}

/// The UUID v5 (RFC 9562 §5.5) of `name` in `namespace`: the first 16 bytes of SHA-1 over the
/// namespace's bytes and the name, with version 5 and the RFC variant set, the id
/// `Uuid::new_v5` gives for the same bytes. SHA-1 comes from the
/// `sha1` crate, which uses the CPU's SHA extensions where it has them; uuid's own SHA-1 is
/// portable code (2-5 % of the engine's profile, for notification ids).
pub fn uuid_v5(namespace: &Uuid, name: &[u8]) -> Uuid {
    use sha1::{Digest, Sha1};
    let mut sha1 = Sha1::new();
    sha1.update(namespace.as_bytes());
    sha1.update(name);
    let digest = sha1.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// One co-location as one of its two persons hears of it (docs/design.md §3's reporting rule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ColocationReport {
    /// The person this report is for; `own_event` is theirs.
    pub person: PersonId,
    pub own_event: Uuid,
    pub peer: PersonId,
    pub peer_event: Uuid,
    /// The later of the two event times.
    pub time: Micros,
    pub distance_m: f64,
    /// Where the person was (their own event's position).
    pub lat: f64,
    pub lon: f64,
}

impl ColocationReport {
    /// The unordered pair of events, the co-location's identity.
    pub fn pair(&self) -> (Uuid, Uuid) {
        if self.own_event <= self.peer_event {
            (self.own_event, self.peer_event)
        } else {
            (self.peer_event, self.own_event)
        }
    }
}

/// The closest co-location of a set; ties broken by time, then event ids, so the choice does
/// not depend on arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Closest {
    /// Geodesic distance, meters.
    pub distance_m: f64,
    /// The co-location's time, µs since the epoch.
    pub time: Micros,
    pub own_event: Uuid,
    pub peer_event: Uuid,
    /// Where the person was (their own event's position), WGS84 degrees.
    pub lat: f64,
    pub lon: f64,
}

impl Closest {
    /// The one co-location of `c`.
    pub fn of(c: &ColocationReport) -> Self {
        Self {
            distance_m: c.distance_m,
            time: c.time,
            own_event: c.own_event,
            peer_event: c.peer_event,
            lat: c.lat,
            lon: c.lon,
        }
    }

    fn cmp_key(&self, other: &Self) -> std::cmp::Ordering {
        self.distance_m
            .total_cmp(&other.distance_m)
            .then(self.time.cmp(&other.time))
            .then(self.own_event.cmp(&other.own_event))
            .then(self.peer_event.cmp(&other.peer_event))
    }

    /// The closer of the two (the earlier, then the smaller ids, on a tie).
    pub fn min(self, other: Self) -> Self {
        if other.cmp_key(&self) == std::cmp::Ordering::Less {
            other
        } else {
            self
        }
    }
}

/// What one arriving event found about one peer, for one of the two persons (the reporting
/// rule of docs/architecture.md): its co-locations with that peer, summed up as far as the episode rules
/// need them. All its times lie in `[first, last]`, within `window_s` of the arriving event's
/// time, so when `window_s <= episode_gap_s` they all fall in one episode and the summary is
/// exact for it: the episode's start, end, count and closest co-location are the same whether
/// its co-locations come one by one or summed up (the oracle property tests hold both equal).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ColocationSummary {
    /// The person this summary is for.
    pub person: PersonId,
    pub peer: PersonId,
    /// The event whose arrival found these co-locations (the person's or the peer's).
    pub arriving_event: Uuid,
    /// The zone that found them (one arrival reaches several zones through the halo, and the
    /// person may have events home in more than one of them). With `peer` and
    /// `arriving_event`, the identity of a summary of several co-locations (one co-location is
    /// identified by its pair of events): a replayed zone partition makes the same summaries
    /// again, so a repeat is recognized.
    pub zone: u64,
    /// How many co-locations (pairs of events) it holds.
    pub count: u32,
    /// The earliest and latest co-location time, µs since the epoch.
    pub first: Micros,
    pub last: Micros,
    pub closest: Closest,
}

impl ColocationSummary {
    /// Checks a summary that arrives from a Kafka record: two different positive persons, at
    /// least one co-location, `first <= last` within 2000-01-01 to 9999-12-31, and a closest
    /// co-location with a finite distance of 0 m or more, at a place in range, at a time between
    /// `first` and `last`. Errors name the field.
    pub fn check(&self) -> Result<(), ValidationError> {
        let fail = |field, reason: String| Err(ValidationError::new(field, reason));
        if self.person <= 0 || self.peer <= 0 || self.person == self.peer {
            return fail(
                "peer",
                format!(
                    "person {} and peer {} must be two positive ids",
                    self.person, self.peer
                ),
            );
        }
        if self.count == 0 {
            return fail("count", "must be at least 1".to_owned());
        }
        let times = MIN_RECORDED_AT..=MAX_TIME;
        if !(times.contains(&self.first) && times.contains(&self.last) && self.first <= self.last) {
            return fail(
                "first",
                format!(
                    "first {} and last {} must be in order, from 2000 to 9999",
                    self.first, self.last
                ),
            );
        }
        let c = &self.closest;
        if !(c.distance_m.is_finite() && c.distance_m >= 0.0) {
            return fail(
                "closest.distance_m",
                format!("must be 0 m or more (got {})", c.distance_m),
            );
        }
        let in_range = c.lat.is_finite()
            && (-90.0..=90.0).contains(&c.lat)
            && c.lon.is_finite()
            && (-180.0..=180.0).contains(&c.lon);
        if !in_range {
            return fail(
                "closest.lat",
                format!("({}, {}) is not a place", c.lat, c.lon),
            );
        }
        if !(self.first..=self.last).contains(&c.time) {
            return fail(
                "closest.time",
                format!("must be between first and last (got {})", c.time),
            );
        }
        Ok(())
    }

    /// A summary of one co-location found in `zone` by the arrival of `arriving_event`.
    pub fn of(c: &ColocationReport, arriving_event: Uuid, zone: u64) -> Self {
        Self {
            person: c.person,
            peer: c.peer,
            arriving_event,
            zone,
            count: 1,
            first: c.time,
            last: c.time,
            closest: Closest::of(c),
        }
    }

    /// Adds one more co-location with the same peer found by the same arrival.
    pub fn add(&mut self, c: &ColocationReport) {
        debug_assert_eq!((self.person, self.peer), (c.person, c.peer));
        self.count += 1;
        self.first = self.first.min(c.time);
        self.last = self.last.max(c.time);
        self.closest = self.closest.min(Closest::of(c));
    }
}

/// A connection: one person's episode of co-locations with one peer (docs/design.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    pub person: PersonId,
    pub peer: PersonId,
    pub started_at: Micros,
    pub last_seen_at: Micros,
    /// Set once the episode is closed (then equal to `last_seen_at`).
    pub ended_at: Option<Micros>,
    /// How many co-locations (pairs of events) the episode holds.
    pub colocations: u32,
    pub min_distance_m: f64,
    /// Where the person was at the closest co-location.
    pub lat: f64,
    pub lon: f64,
}

impl Episode {
    /// The episode's identity: (person, peer, started_at).
    pub fn key(&self) -> (PersonId, PersonId, Micros) {
        (self.person, self.peer, self.started_at)
    }
}

/// What a notification announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NotificationKind {
    #[serde(rename = "connection.started")]
    Started,
    #[serde(rename = "connection.updated")]
    Updated,
    #[serde(rename = "connection.ended")]
    Ended,
}

impl NotificationKind {
    /// The wire name (`connection.started`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "connection.started",
            Self::Updated => "connection.updated",
            Self::Ended => "connection.ended",
        }
    }
}

/// A notification to `episode.person` about one of its connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Deterministic: a replay re-derives the same id, so subscribers can drop repeats.
    pub id: Uuid,
    pub kind: NotificationKind,
    pub episode: Episode,
    /// For `connection.updated`: the `started_at` of the episodes this one replaces.
    pub replaces: Vec<Micros>,
}

impl Notification {
    pub(crate) fn new(kind: NotificationKind, episode: Episode, replaces: Vec<Micros>) -> Self {
        let mut name = Vec::with_capacity(48 + 8 * replaces.len());
        name.extend_from_slice(kind.as_str().as_bytes());
        name.extend_from_slice(&episode.person.to_be_bytes());
        name.extend_from_slice(&episode.peer.to_be_bytes());
        name.extend_from_slice(&episode.started_at.to_be_bytes());
        match kind {
            // A `started` is announced once per episode identity.
            NotificationKind::Started => {}
            // An update differs by what it replaces and what it grew to.
            NotificationKind::Updated => {
                for r in &replaces {
                    name.extend_from_slice(&r.to_be_bytes());
                }
                name.extend_from_slice(&episode.last_seen_at.to_be_bytes());
                name.extend_from_slice(&episode.colocations.to_be_bytes());
            }
            NotificationKind::Ended => {
                name.extend_from_slice(&episode.last_seen_at.to_be_bytes());
            }
        }
        Self {
            id: uuid_v5(&EVENT_ID_NAMESPACE, &name),
            kind,
            episode,
            replaces,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Micros = 1_790_000_000 * MICROS_PER_S;

    fn new_event() -> NewLocationEvent {
        NewLocationEvent {
            event_id: None,
            person_id: 7,
            lat: 35.0585,
            lon: -106.5719,
            recorded_at: T0,
        }
    }

    proptest::proptest! {
        #[test]
        fn uuid_v5_ids_are_the_ones_the_uuid_crate_derives(
            namespace in proptest::prelude::any::<u128>(),
            name in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let namespace = Uuid::from_u128(namespace);
            let ours = uuid_v5(&namespace, &name);
            proptest::prop_assert_eq!(ours, Uuid::new_v5(&namespace, &name));
            proptest::prop_assert_eq!(ours.get_version_num(), 5);
        }
    }

    #[test]
    fn valid_event_gets_a_deterministic_id() {
        let a = new_event().validate(T0, 60, 86_400).unwrap();
        let b = new_event()
            .validate(T0 + 5 * MICROS_PER_S, 60, 86_400)
            .unwrap();
        assert_eq!(a.event_id, b.event_id, "a retried send is the same event");
        assert_eq!(a.event_id.get_version_num(), 5);
        let moved = NewLocationEvent {
            lat: 35.0586,
            ..new_event()
        };
        assert_ne!(moved.validate(T0, 60, 86_400).unwrap().event_id, a.event_id);
        let later = NewLocationEvent {
            recorded_at: T0 + 1,
            ..new_event()
        };
        assert_ne!(later.validate(T0, 60, 86_400).unwrap().event_id, a.event_id);
        let other = NewLocationEvent {
            person_id: 8,
            ..new_event()
        };
        assert_ne!(other.validate(T0, 60, 86_400).unwrap().event_id, a.event_id);
        let zero = NewLocationEvent {
            lat: 0.0,
            ..new_event()
        };
        let minus_zero = NewLocationEvent {
            lat: -0.0,
            ..new_event()
        };
        assert_eq!(
            zero.validate(T0, 60, 86_400).unwrap().event_id,
            minus_zero.validate(T0, 60, 86_400).unwrap().event_id
        );
    }

    #[test]
    fn a_client_id_is_kept() {
        let id = Uuid::from_u128(42);
        let e = NewLocationEvent {
            event_id: Some(id),
            ..new_event()
        };
        assert_eq!(e.validate(T0, 60, 86_400).unwrap().event_id, id);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                NewLocationEvent {
                    person_id: 0,
                    ..new_event()
                },
                "person_id",
            ),
            (
                NewLocationEvent {
                    lat: 90.5,
                    ..new_event()
                },
                "lat",
            ),
            (
                NewLocationEvent {
                    lat: f64::NAN,
                    ..new_event()
                },
                "lat",
            ),
            (
                NewLocationEvent {
                    lon: -180.01,
                    ..new_event()
                },
                "lon",
            ),
            (
                NewLocationEvent {
                    lon: f64::INFINITY,
                    ..new_event()
                },
                "lon",
            ),
            (
                NewLocationEvent {
                    recorded_at: 1_790_000_000,
                    ..new_event()
                },
                "recorded_at",
            ),
            (
                NewLocationEvent {
                    recorded_at: T0 + 61 * MICROS_PER_S,
                    ..new_event()
                },
                "recorded_at",
            ),
            // Older than the late horizon (a day).
            (
                NewLocationEvent {
                    recorded_at: T0 - 86_401 * MICROS_PER_S,
                    ..new_event()
                },
                "recorded_at",
            ),
        ];
        for (event, field) in cases {
            let err = event.validate(T0, 60, 86_400).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().starts_with(field), "{err}");
        }
        let edge = NewLocationEvent {
            lat: -90.0,
            lon: 180.0,
            recorded_at: T0 + 60 * MICROS_PER_S,
            ..new_event()
        };
        assert!(edge.validate(T0, 60, 86_400).is_ok());
        let oldest = NewLocationEvent {
            recorded_at: T0 - 86_400 * MICROS_PER_S,
            ..new_event()
        };
        assert!(oldest.validate(T0, 60, 86_400).is_ok());
    }

    #[test]
    fn notification_ids_depend_on_what_they_announce() {
        let e = Episode {
            person: 1,
            peer: 2,
            started_at: T0,
            last_seen_at: T0 + 10,
            ended_at: None,
            colocations: 3,
            min_distance_m: 1.0,
            lat: 0.0,
            lon: 0.0,
        };
        let started = Notification::new(NotificationKind::Started, e, vec![]);
        let again = Notification::new(
            NotificationKind::Started,
            Episode {
                colocations: 9,
                ..e
            },
            vec![],
        );
        assert_eq!(started.id, again.id);
        let ended = Notification::new(NotificationKind::Ended, e, vec![]);
        assert_ne!(started.id, ended.id);
        let upd1 = Notification::new(NotificationKind::Updated, e, vec![T0 + 5]);
        let upd2 = Notification::new(NotificationKind::Updated, e, vec![T0 + 6]);
        assert_ne!(upd1.id, upd2.id);
        assert_eq!(
            serde_json::to_string(&started.kind).unwrap(),
            "\"connection.started\""
        );
    }
}

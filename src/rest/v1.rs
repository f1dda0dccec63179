//! The `/v1` API: persons, location ingest (single and batch, 202 after the broker
//! acknowledged), stored locations, connection history (time-aware, paginated) and the
//! pipeline's status.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use serde_json::Value;
use udaconnect_actors::domain::NewLocationEvent;
use uuid::Uuid;

use super::auth::Caller;
use super::errors::{ErrorResponse, RestResult};
use super::input::Checked;
use super::poc::MAX_NAME_CHARS;
use super::RestState;
use crate::auth::Access;
use crate::error::{ApiError, ErrorCode};
use crate::input::{
    history_query, parse_rfc3339, point_limit, zone_boundary, zone_hex, BoundingBox, Fields,
    FromJson, PageFields,
};
use crate::pipeline::ingest::IngestReport;
use crate::store::queries::{self, NewPerson};
use crate::store::timestamp;

#[derive(Tags)]
enum ApiTags {
    /// Attendees.
    Persons,
    /// Location reports: ingest and stored events.
    Locations,
    /// Connection history and live streams.
    Connections,
    /// The pipeline's partitions, owners, offsets and lag.
    Status,
}

/// The `/v1` endpoints.
pub struct V1Api {
    pub(super) state: Arc<RestState>,
}

/// An attendee.
#[derive(Debug, Clone, Object)]
pub struct Person {
    pub id: i64,
    pub first_name: String,
    pub last_name: String,
    pub company_name: String,
}

impl From<queries::Person> for Person {
    fn from(p: queries::Person) -> Self {
        Self {
            id: p.id,
            first_name: p.first_name,
            last_name: p.last_name,
            company_name: p.company_name,
        }
    }
}

/// A person to create.
#[derive(Debug, Clone, Object)]
pub struct PersonIn {
    /// Required, 1 to 200 characters.
    first_name: String,
    /// Required, 1 to 200 characters.
    last_name: String,
    /// Required, 1 to 200 characters.
    company_name: String,
}

/// A page of persons.
#[derive(Debug, Clone, Object)]
pub struct PersonPage {
    items: Vec<Person>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    next_cursor: Option<String>,
}

/// A location report from a device.
#[derive(Debug, Clone, Object)]
pub struct LocationIn {
    /// The client's id for the event; when absent, derived from (person_id, recorded_at,
    /// lat, lon), so a retried send is the same event.
    event_id: Option<Uuid>,
    person_id: i64,
    /// Degrees, -90 to 90.
    lat: f64,
    /// Degrees, -180 to 180.
    lon: f64,
    /// RFC 3339 with an offset (second 60 is refused: times are UTC without leap seconds); at
    /// most `future_skew_s` ahead of the server's clock.
    recorded_at: DateTime<Utc>,
}

/// The broker acknowledged the event.
#[derive(Debug, Clone, Object)]
pub struct Accepted {
    event_id: Uuid,
}

/// What erasing a person did: the rows deleted, and the processes and partitions that forgot
/// it.
#[derive(Debug, Clone, Object)]
pub struct Erasure {
    person_id: i64,
    /// The person's location reports deleted.
    locations: u64,
    /// Their ghost copies (the late path's copies in neighbouring zones) deleted.
    halo_copies: u64,
    /// Connection episode rows deleted, of either side (the person's, and its peers' about
    /// it).
    connections: u64,
    /// Whether the person row was deleted now (false when an earlier erasure had).
    person_deleted: bool,
    /// Processes that forgot the person's live state, the one that answered included.
    processes: u32,
    /// Partitions of both stages whose snapshots were stored again without the person.
    partitions: u32,
    /// Notifications removed from the processes' resume buffers.
    notifications: u64,
}

impl From<crate::pipeline::erasure::Erasure> for Erasure {
    fn from(e: crate::pipeline::erasure::Erasure) -> Self {
        Self {
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
}

/// Up to 10,000 location reports.
#[derive(Debug, Clone, Object)]
pub struct LocationBatch {
    events: Vec<LocationIn>,
}

/// One accepted item of a batch.
#[derive(Debug, Clone, Object)]
pub struct AcceptedItem {
    /// Its position in `events`.
    index: u32,
    event_id: Uuid,
}

/// One rejected item of a batch.
#[derive(Debug, Clone, Object)]
pub struct RejectedItem {
    /// Its position in `events`.
    index: u32,
    /// The field at fault.
    #[oai(skip_serializing_if_is_none)]
    field: Option<String>,
    /// What is wrong with it.
    error: String,
}

/// What became of a batch: every valid item was acknowledged by the broker, whatever the
/// others.
#[derive(Debug, Clone, Object)]
pub struct BatchReport {
    /// How many items were accepted.
    accepted: u32,
    /// The accepted items and their event ids, in order.
    items: Vec<AcceptedItem>,
    /// The rejected items, in order.
    rejected: Vec<RejectedItem>,
}

/// A stored location event.
#[derive(Debug, Clone, Object)]
pub struct Location {
    event_id: Uuid,
    person_id: i64,
    lat: f64,
    lon: f64,
    recorded_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
    /// The H3 cell of its home zone (hex); absent for POC rows.
    #[oai(skip_serializing_if_is_none)]
    zone: Option<String>,
}

/// One episode of the person with a peer.
#[derive(Debug, Clone, Object)]
pub struct ConnectionItem {
    peer: Person,
    /// The first co-location.
    started_at: DateTime<Utc>,
    /// Absent while the episode is open.
    #[oai(skip_serializing_if_is_none)]
    ended_at: Option<DateTime<Utc>>,
    /// The latest co-location. For an open episode this and the figures below are as it was
    /// announced (`connection.started`, or `connection.updated` after late data); they are
    /// final once it has ended. Live figures: `/v1/persons/{id}/live`.
    last_seen_at: DateTime<Utc>,
    /// How many co-locations (pairs of events) it holds.
    colocations: i32,
    min_distance_m: f64,
    /// Where the person was at the closest co-location.
    lat: f64,
    lon: f64,
}

/// A page of connection history.
#[derive(Debug, Clone, Object)]
pub struct ConnectionPage {
    items: Vec<ConnectionItem>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    next_cursor: Option<String>,
}

/// One partition of a stage.
#[derive(Debug, Clone, Object)]
pub struct PartitionRow {
    /// `zones` or `persons`.
    stage: String,
    topic: String,
    partition: i32,
    /// The process owning it (`shard_owner`), when one does.
    #[oai(skip_serializing_if_is_none)]
    owner: Option<String>,
    /// Where the owner answers gRPC.
    #[oai(skip_serializing_if_is_none)]
    owner_addr: Option<String>,
    /// Whether this process owns it (then the offsets below are live).
    local: bool,
    /// The next offset processed: live when local, else the owner's last snapshot.
    #[oai(skip_serializing_if_is_none)]
    processed_offset: Option<i64>,
    /// The partition's end offset (local partitions).
    #[oai(skip_serializing_if_is_none)]
    end_offset: Option<i64>,
    /// `end_offset - processed_offset` (local partitions), unclamped: negative when the log
    /// ends before what was processed.
    #[oai(skip_serializing_if_is_none)]
    lag: Option<i64>,
    /// The stored snapshot's next offset: the group's committed offset at most, and where a
    /// new owner resumes. When it equals `end_offset`, every record's effects are durable.
    #[oai(skip_serializing_if_is_none)]
    snapshot_offset: Option<i64>,
    /// Age of the last snapshot, seconds.
    #[oai(skip_serializing_if_is_none)]
    snapshot_age_s: Option<f64>,
    /// Set when the log contradicted the snapshot's offset as the partition was restored here
    /// (local partitions): the partition then reads the log from its start.
    #[oai(skip_serializing_if_is_none)]
    snapshot_mismatch: Option<SnapshotMismatch>,
    /// When this process restored the partition from its snapshot and started serving it (the
    /// end of a handover; local partitions).
    #[oai(skip_serializing_if_is_none)]
    restored_at: Option<DateTime<Utc>>,
    /// When it had handled the records its log held at that restore (the end of the replay
    /// after the snapshot; local partitions, unset while it has not).
    #[oai(skip_serializing_if_is_none)]
    replayed_at: Option<DateTime<Utc>>,
}

/// A snapshot offset the log contradicted when a partition was restored.
#[derive(Debug, Clone, Object)]
pub struct SnapshotMismatch {
    /// `other_topic_id` (the topic was deleted and created again), `above_end` (the log ends
    /// before the snapshot's offset) or `below_start` (retention removed records no snapshot
    /// covered).
    kind: String,
    /// What happened, in one sentence.
    message: String,
    /// The snapshot's next offset.
    snapshot_offset: i64,
    /// The topic id the snapshot was taken on, when it was recorded.
    #[oai(skip_serializing_if_is_none)]
    snapshot_topic_id: Option<String>,
    /// The log as found: its start and end offsets and its topic id.
    log_start: i64,
    log_end: i64,
    topic_id: String,
    /// The offset the partition reads from instead.
    resumed_at: i64,
}

impl From<&crate::pipeline::offsets::OffsetMismatch> for SnapshotMismatch {
    fn from(m: &crate::pipeline::offsets::OffsetMismatch) -> Self {
        Self {
            kind: m.kind.as_str().to_owned(),
            message: m.describe(),
            snapshot_offset: m.snapshot_offset,
            snapshot_topic_id: m.snapshot_topic_id.clone(),
            log_start: m.log_start,
            log_end: m.log_end,
            topic_id: m.topic_id.clone(),
            resumed_at: m.resumed_at,
        }
    }
}

/// The pipeline as this process sees it.
#[derive(Debug, Clone, Object)]
pub struct PipelineStatusOut {
    /// This process's node name.
    node: String,
    /// Records this process's partitions have not processed yet: the sum of their positive
    /// lags (a negative lag, the log ending before what was processed, is shown on its
    /// partition, with `snapshot_mismatch`).
    lag_total: i64,
    /// Every partition with an owner, and this process's own.
    partitions: Vec<PartitionRow>,
    /// Records sent to a dead-letter topic by this process.
    dead_letters: u64,
    /// Location reports this process stored since it started (home events of its zone
    /// partitions; heartbeats are not reports): its ingest rate is the change of this count.
    locations_stored: u64,
    /// Connection episodes open now across the cluster, each pair once: the stored episodes
    /// without an end. Unset when the database did not answer.
    #[oai(skip_serializing_if_is_none)]
    open_connections: Option<i64>,
    /// Why the owners could not be read, if they could not.
    #[oai(skip_serializing_if_is_none)]
    owners_error: Option<String>,
}

#[derive(ApiResponse)]
enum Created {
    /// The person, with its id.
    #[oai(status = 201)]
    Person(Json<Person>),
}

#[derive(ApiResponse)]
enum PersonOk {
    /// The person.
    #[oai(status = 200)]
    Ok(Json<Person>),
}

#[derive(ApiResponse)]
enum PersonsOk {
    /// A page of persons, by id.
    #[oai(status = 200)]
    Ok(Json<PersonPage>),
}

#[derive(ApiResponse)]
enum ErasedOk {
    /// The person is erased: no table, snapshot, actor or API answer holds it any more.
    #[oai(status = 200)]
    Ok(Json<Erasure>),
}

#[derive(ApiResponse)]
enum AcceptedOk {
    /// The broker acknowledged the event; it is processed asynchronously.
    #[oai(status = 202)]
    Accepted(Json<Accepted>),
}

#[derive(ApiResponse)]
enum BatchOk {
    /// The valid items were acknowledged by the broker; the invalid ones are listed.
    #[oai(status = 202)]
    Accepted(Json<BatchReport>),
}

#[derive(ApiResponse)]
enum LocationOk {
    /// The stored event.
    #[oai(status = 200)]
    Ok(Json<Location>),
}

#[derive(ApiResponse)]
enum ConnectionsOk {
    /// A page of episodes, by start time.
    #[oai(status = 200)]
    Ok(Json<ConnectionPage>),
}

/// One of the person's recent sightings.
#[derive(Debug, Clone, Object)]
pub struct SightingOut {
    event_id: Uuid,
    recorded_at: DateTime<Utc>,
    lat: f64,
    lon: f64,
    /// Its home zone (H3 cell, hex).
    zone: String,
}

/// An episode still open.
#[derive(Debug, Clone, Object)]
pub struct OpenConnection {
    peer_id: i64,
    started_at: DateTime<Utc>,
    last_seen_at: DateTime<Utc>,
    colocations: u32,
    min_distance_m: f64,
}

/// What the person's actor counted.
#[derive(Debug, Clone, Object)]
pub struct PersonCountersOut {
    sightings: u64,
    colocations: u64,
    /// Co-locations dropped as repeats of ones already counted.
    repeats: u64,
    started: u64,
    updated: u64,
    ended: u64,
}

/// The person actor's state, from the process that owns it.
#[derive(Debug, Clone, Object)]
pub struct PersonLive {
    person_id: i64,
    /// The persons partition holding the actor.
    partition: i32,
    /// The process that answered (the partition's owner); absent when no actor holds state.
    #[oai(skip_serializing_if_is_none)]
    owner: Option<String>,
    /// The zone of the latest sighting (H3 cell, hex).
    #[oai(skip_serializing_if_is_none)]
    current_zone: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    last_location: Option<SightingOut>,
    /// Recent sightings, oldest first.
    trajectory: Vec<SightingOut>,
    open_connections: Vec<OpenConnection>,
    #[oai(skip_serializing_if_is_none)]
    counters: Option<PersonCountersOut>,
    /// Whether the actor is passivated (state kept, no actor running).
    passivated: bool,
}

#[derive(ApiResponse)]
enum LiveOk {
    /// The person's live state (empty when no actor holds state for it: not seen recently).
    #[oai(status = 200)]
    Ok(Json<PersonLive>),
}

fn sighting_out(s: &udaconnect_actors::episodes::Sighting) -> SightingOut {
    SightingOut {
        event_id: s.event_id,
        recorded_at: timestamp(s.recorded_at),
        lat: s.lat,
        lon: s.lon,
        zone: zone_hex(s.zone),
    }
}

/// The points the zone actors retain now (`GET /v1/points`).
#[derive(Debug, Clone, Object)]
pub struct LivePointsOut {
    /// Home copies only, newest first.
    points: Vec<LivePointOut>,
    /// Every zone asked (its cell meets the box), with its outline.
    zones: Vec<LiveZoneOut>,
    /// Whether points were left out to keep to `limit`.
    truncated: bool,
    /// Why parts of the cluster did not answer, one sentence each; their points are missing.
    unanswered: Vec<String>,
}

/// One retained location report.
#[derive(Debug, Clone, Object)]
pub struct LivePointOut {
    person_id: i64,
    /// WGS84 degrees.
    lat: f64,
    lon: f64,
    recorded_at: DateTime<Utc>,
    /// Its zone: an H3 cell in hexadecimal.
    zone: String,
}

/// A zone actor asked for points.
#[derive(Debug, Clone, Object)]
pub struct LiveZoneOut {
    /// An H3 cell in hexadecimal.
    zone: String,
    partition: i32,
    /// The process holding the zone's actor.
    owner: String,
    /// Its home points inside the box.
    points: u64,
    /// The cell's outline, `[lat, lon]` pairs in WGS84 degrees (H3's vertex order).
    boundary: Vec<Vec<f64>>,
}

#[derive(ApiResponse)]
enum PointsOk {
    /// The retained points.
    #[oai(status = 200)]
    Ok(Json<LivePointsOut>),
}

#[derive(ApiResponse)]
enum StatusOk {
    /// The pipeline's status.
    #[oai(status = 200)]
    Ok(Json<PipelineStatusOut>),
}

/// Most items in one batch.
pub const MAX_BATCH: usize = 10_000;
/// A page size from the query string.
pub fn limit(value: Option<i64>) -> Result<u32, ApiError> {
    crate::input::page_size(value, "limit")
}

fn time_param(name: &str, value: Option<String>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .map(|text| parse_rfc3339(&text).map_err(|reason| ApiError::invalid(name, reason)))
        .transpose()
}

fn bad_cursor(text: &str) -> ApiError {
    ApiError::invalid(
        "cursor",
        format!("is not a cursor this endpoint returned (got {text:?})"),
    )
}

impl V1Api {
    async fn ingest(&self, events: &[NewLocationEvent]) -> Result<IngestReport, ApiError> {
        let pipeline = self.state.pipeline()?;
        Ok(pipeline.ingestor().ingest(events).await?)
    }
}

#[OpenApi(prefix_path = "/v1")]
impl V1Api {
    /// Creates a person. Organizers only.
    #[oai(path = "/persons", method = "post", tag = "ApiTags::Persons")]
    async fn create_person(
        &self,
        auth: Caller,
        body: Json<Checked<PersonIn>>,
    ) -> RestResult<Created> {
        auth.0.check(Access::Directory)?;
        let new: NewPerson = body.0.parse_as()?;
        let person = queries::create_person(&self.state.pool, &new).await?;
        Ok(Created::Person(Json(person.into())))
    }

    /// Persons by id, a page at a time; `q` keeps those whose name or company contains it.
    /// Organizers only (the attendee directory).
    #[oai(path = "/persons", method = "get", tag = "ApiTags::Persons")]
    async fn list_persons(
        &self,
        auth: Caller,
        /// Case-insensitive text to look for in first, last or company name.
        q: Query<Option<String>>,
        /// Page size, 1 to 1000; default 100.
        limit: Query<Option<i64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> RestResult<PersonsOk> {
        auth.0.check(Access::Directory)?;
        let limit = self::limit(limit.0)?;
        let after = match cursor.0.as_deref() {
            None => None,
            Some(text) => {
                Some(queries::decode_person_cursor(text).ok_or_else(|| bad_cursor(text))?)
            }
        };
        let q = match q.0.as_deref() {
            Some(q) => Some(crate::input::text("q", q, MAX_NAME_CHARS)?),
            None => None,
        }
        .filter(|q| !q.is_empty());
        // One more row than asked tells whether another page follows.
        let mut items = queries::search_persons(&self.state.pool, q, limit + 1, after).await?;
        let next_cursor = if items.len() > limit as usize {
            items.truncate(limit as usize);
            items.last().map(|p| queries::encode_person_cursor(p.id))
        } else {
            None
        };
        Ok(PersonsOk::Ok(Json(PersonPage {
            items: items.into_iter().map(Person::from).collect(),
            next_cursor,
        })))
    }

    /// One person. An attendee reads only itself; organizers anyone.
    #[oai(path = "/persons/:person_id", method = "get", tag = "ApiTags::Persons")]
    async fn get_person(&self, auth: Caller, person_id: Path<i64>) -> RestResult<PersonOk> {
        auth.0.check(person_access(person_id.0))?;
        match queries::person(&self.state.pool, person_id.0).await? {
            Some(p) => Ok(PersonOk::Ok(Json(p.into()))),
            None => Err(unknown_person(person_id.0)),
        }
    }

    /// Erases a person (organizers, or the attendee itself): its reports, the connection
    /// episodes on both sides, its live actor state and its entries in every process's
    /// snapshots and notification buffers, across the cluster; from then on the POC `/api` and
    /// `/v1` know nothing of it, and what the Kafka topics still hold of it (until their
    /// retention) is dropped wherever it is read. Unknown person: 404. Erasing an erased
    /// person again finishes an erasure that failed part-way (503: a process did not answer;
    /// the rows are deleted all the same).
    #[oai(
        path = "/persons/:person_id",
        method = "delete",
        tag = "ApiTags::Persons"
    )]
    async fn erase_person(&self, auth: Caller, person_id: Path<i64>) -> RestResult<ErasedOk> {
        auth.0.check(Access::Erase {
            person: person_id.0,
        })?;
        let done = self.state.cluster.erase_person(person_id.0, false).await?;
        Ok(ErasedOk::Ok(Json(done.into())))
    }

    /// Ingests one location report; answers 202 once the broker acknowledged it. Unknown
    /// person: 404. An `event_id` already used for a different report (person, place or
    /// time): 409 naming `event_id`; an identical retry is a 202. An attendee posts only its
    /// own reports (403 naming `person_id`); gateways and organizers post for anyone.
    #[oai(path = "/locations", method = "post", tag = "ApiTags::Locations")]
    async fn post_location(
        &self,
        auth: Caller,
        body: Json<Checked<LocationIn>>,
    ) -> RestResult<AcceptedOk> {
        let event: NewLocationEvent = body.0.parse_as()?;
        auth.0.check(Access::Post {
            person: event.person_id,
        })?;
        let report = self.ingest(&[event]).await?;
        if let Some((_, event_id)) = report.accepted.first() {
            return Ok(AcceptedOk::Accepted(Json(Accepted {
                event_id: *event_id,
            })));
        }
        let rejection = report.rejected.first().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Internal,
                "the event was neither accepted nor rejected",
            )
        })?;
        Err(rejection.api_error().into())
    }

    /// Ingests up to 10,000 location reports; answers 202 once the broker acknowledged every
    /// valid one, listing the invalid ones by index (they never hold back the others). An
    /// attendee's report for another person is such an invalid item (`person_id`).
    #[oai(path = "/locations/batch", method = "post", tag = "ApiTags::Locations")]
    async fn post_batch(
        &self,
        auth: Caller,
        body: Json<Checked<LocationBatch>>,
    ) -> RestResult<BatchOk> {
        let f = Fields::of(body.0.raw(), "body")?;
        let items = match f.get_raw("events") {
            Some(Value::Array(items)) => items,
            Some(_) => {
                return Err(
                    ApiError::invalid("events", "must be an array of location reports").into(),
                )
            }
            None => return Err(ApiError::invalid("events", "is required").into()),
        };
        if items.len() > MAX_BATCH {
            return Err(ApiError {
                code: ErrorCode::PayloadTooLarge,
                message: format!(
                    "holds {} items; at most {MAX_BATCH} are accepted per batch",
                    items.len()
                ),
                field: Some("events".to_owned()),
            }
            .into());
        }
        let mut rejected = Vec::new();
        let mut valid = Vec::with_capacity(items.len());
        let mut positions = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let parsed = Fields::of(item, &format!("events[{index}]"))
                .and_then(|_| NewLocationEvent::from_json(item))
                .and_then(|event| {
                    auth.0.check(Access::Post {
                        person: event.person_id,
                    })?;
                    Ok(event)
                });
            match parsed {
                Ok(event) => {
                    positions.push(index);
                    valid.push(event);
                }
                Err(e) => rejected.push(RejectedItem {
                    index: index as u32,
                    field: e.field,
                    error: e.message,
                }),
            }
        }
        let report = if valid.is_empty() {
            IngestReport::default()
        } else {
            self.ingest(&valid).await?
        };
        rejected.extend(report.rejected.into_iter().map(|r| RejectedItem {
            index: positions[r.index] as u32,
            field: Some(r.error.field.to_owned()),
            error: r.error.reason,
        }));
        rejected.sort_by_key(|r| r.index);
        let accepted: Vec<AcceptedItem> = report
            .accepted
            .into_iter()
            .map(|(i, event_id)| AcceptedItem {
                index: positions[i] as u32,
                event_id,
            })
            .collect();
        Ok(BatchOk::Accepted(Json(BatchReport {
            accepted: accepted.len() as u32,
            items: accepted,
            rejected,
        })))
    }

    /// One stored location event. Events are stored asynchronously: a 404 shortly after the
    /// 202 means "not yet". An attendee reads only its own (another person's answers the same
    /// 404 as a report that does not exist); a gateway reads none (403).
    #[oai(
        path = "/locations/:event_id",
        method = "get",
        tag = "ApiTags::Locations"
    )]
    async fn get_location(&self, auth: Caller, event_id: Path<String>) -> RestResult<LocationOk> {
        let id = crate::input::parse_uuid(event_id.0.trim(), "event_id")?;
        // Whose report an id is, and whether it exists, is told only to who may read it: a
        // gateway (which reads no one's) is refused before the lookup, and an attendee asking
        // for another person's report gets the 404 of a report that does not exist.
        if auth.0.role == crate::auth::Role::Gateway {
            auth.0.check(Access::Everyone)?;
        }
        let readable = |person| {
            auth.0
                .check(Access::Person {
                    person,
                    field: "event_id",
                })
                .is_ok()
        };
        match queries::location_by_event(&self.state.pool, id).await? {
            Some(l) if readable(l.person_id) => {
                Ok(LocationOk::Ok(Json(Location {
                    event_id: l.event_id,
                    person_id: l.person_id,
                    // Stored as the POC did: X is the latitude.
                    lat: l.x,
                    lon: l.y,
                    recorded_at: l.recorded_at,
                    received_at: l.received_at,
                    zone: l.zone.map(|z| zone_hex(z as u64)),
                })))
            }
            // Not stored, or another person's, to an attendee: the same answer.
            _ => Err(ApiError::not_found(
                Some("event_id"),
                format!("no location event {id} is stored"),
            )
            .into()),
        }
    }

    /// The person's connection episodes that overlap `[from, to)` (a closed one spans its
    /// first to its last co-location, an open one its first to now), by start time, a page at
    /// a time; open episodes have no `ended_at`. An attendee reads only its own.
    #[oai(
        path = "/persons/:person_id/connections",
        method = "get",
        tag = "ApiTags::Connections"
    )]
    async fn connections(
        &self,
        auth: Caller,
        person_id: Path<i64>,
        /// RFC 3339; episodes whose last co-location is at or after it.
        from: Query<Option<String>>,
        /// RFC 3339; episodes that started before it.
        to: Query<Option<String>>,
        /// Page size, 1 to 1000; default 100.
        limit: Query<Option<i64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> RestResult<ConnectionsOk> {
        auth.0.check(person_access(person_id.0))?;
        let query = history_query(
            person_id.0,
            (time_param("from", from.0)?, time_param("to", to.0)?),
            limit.0,
            cursor.0.as_deref(),
            PageFields {
                size: "limit",
                cursor: "cursor",
            },
        )?;
        let page = queries::connection_history(&self.state.pool, &query)
            .await?
            .ok_or_else(|| unknown_person(person_id.0))?;
        Ok(ConnectionsOk::Ok(Json(ConnectionPage {
            items: page
                .items
                .into_iter()
                .map(|i| ConnectionItem {
                    peer: i.peer.into(),
                    started_at: i.started_at,
                    ended_at: i.ended_at,
                    last_seen_at: i.last_seen_at,
                    colocations: i.colocations,
                    min_distance_m: i.min_distance_m,
                    lat: i.lat,
                    lon: i.lon,
                })
                .collect(),
            next_cursor: page.next_cursor.map(|c| c.encode()),
        })))
    }

    /// The person actor's live state: current zone, last location, recent trajectory, open
    /// connections; answered by the process owning the person's partition (forwarded over gRPC
    /// when that is another one; forwarding needs `admin_token` set on every process). An
    /// attendee reads only its own.
    #[oai(
        path = "/persons/:person_id/live",
        method = "get",
        tag = "ApiTags::Connections"
    )]
    async fn live(&self, auth: Caller, person_id: Path<i64>) -> RestResult<LiveOk> {
        let id = person_id.0;
        auth.0.check(person_access(id))?;
        let answer = self.state.cluster.person(id, false).await?;
        let live = match answer.value {
            Some(v) => {
                let c = v.counters;
                PersonLive {
                    person_id: id,
                    partition: answer.partition,
                    owner: Some(answer.owner),
                    current_zone: v.current_zone.map(zone_hex),
                    last_location: v.last_location.as_ref().map(sighting_out),
                    trajectory: v.trajectory.iter().map(sighting_out).collect(),
                    open_connections: v
                        .open_episodes
                        .iter()
                        .map(|e| OpenConnection {
                            peer_id: e.peer,
                            started_at: timestamp(e.started_at),
                            last_seen_at: timestamp(e.last_seen_at),
                            colocations: e.colocations,
                            min_distance_m: e.min_distance_m,
                        })
                        .collect(),
                    counters: Some(PersonCountersOut {
                        sightings: c.sightings,
                        colocations: c.colocations,
                        repeats: c.repeats,
                        started: c.started,
                        updated: c.updated,
                        ended: c.ended,
                    }),
                    passivated: v.passivated,
                }
            }
            // A known person no actor holds state for: nothing recent.
            None => PersonLive {
                person_id: id,
                partition: answer.partition,
                owner: None,
                current_zone: None,
                last_location: None,
                trajectory: Vec::new(),
                open_connections: Vec::new(),
                counters: None,
                passivated: false,
            },
        };
        Ok(LiveOk::Ok(Json(live)))
    }

    /// The points the zone actors retain now, across the cluster (the live floor map): home
    /// copies only (each report once), inside `bbox`, newest first, at most `limit`, with
    /// every zone asked and its H3 outline. A process that does not answer leaves its points
    /// out and is named in `unanswered`. Organizers only.
    #[oai(path = "/points", method = "get", tag = "ApiTags::Status")]
    async fn points(
        &self,
        auth: Caller,
        /// `min_lon,min_lat,max_lon,max_lat` in WGS84 degrees (GeoJSON's order); default the
        /// whole Earth. A box across the antimeridian is not supported.
        bbox: Query<Option<String>>,
        /// Most points, 1 to 10000; default 1000.
        limit: Query<Option<i64>>,
    ) -> RestResult<PointsOk> {
        auth.0.check(Access::Everyone)?;
        let bbox = match bbox.0.as_deref() {
            Some(text) => BoundingBox::parse(text, "bbox")?,
            None => BoundingBox::WORLD,
        };
        let limit = point_limit(limit.0, "limit")?;
        let live = self.state.cluster.live_points(&bbox, limit, false).await?;
        Ok(PointsOk::Ok(Json(LivePointsOut {
            points: live
                .points
                .iter()
                .map(|p| LivePointOut {
                    person_id: p.person,
                    lat: p.lat,
                    lon: p.lon,
                    recorded_at: timestamp(p.recorded_at),
                    zone: zone_hex(p.zone),
                })
                .collect(),
            zones: live
                .zones
                .iter()
                .map(|z| LiveZoneOut {
                    zone: zone_hex(z.zone),
                    partition: z.partition,
                    owner: z.owner.clone(),
                    points: z.points as u64,
                    boundary: zone_boundary(z.zone)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(lat, lon)| vec![lat, lon])
                        .collect(),
                })
                .collect(),
            truncated: live.truncated,
            unanswered: live.unanswered,
        })))
    }

    /// The pipeline: every owned partition with its owner, offsets and lag, and `lag_total`.
    /// Organizers only.
    #[oai(path = "/status", method = "get", tag = "ApiTags::Status")]
    async fn status(&self, auth: Caller) -> RestResult<StatusOk> {
        auth.0.check(Access::Everyone)?;
        let status = self.state.pipeline()?.status().await;
        let mut partitions: Vec<PartitionRow> = Vec::new();
        for stage in &status.stages {
            for p in &stage.partitions {
                let owner = status
                    .owners
                    .iter()
                    .find(|o| o.topic == stage.topic && o.partition == p.partition);
                partitions.push(PartitionRow {
                    stage: stage.stage.as_str().to_owned(),
                    topic: stage.topic.clone(),
                    partition: p.partition,
                    owner: Some(status.node.clone()),
                    owner_addr: owner.map(|o| o.owner_addr.clone()),
                    local: true,
                    processed_offset: (p.processed_offset >= 0).then_some(p.processed_offset),
                    end_offset: (p.end_offset >= 0).then_some(p.end_offset),
                    lag: p.lag,
                    snapshot_offset: owner.and_then(|o| o.snapshot_offset),
                    snapshot_age_s: owner.and_then(|o| o.snapshot_age_s),
                    snapshot_mismatch: p.snapshot_mismatch.as_ref().map(SnapshotMismatch::from),
                    restored_at: p.restored_at_us.and_then(DateTime::from_timestamp_micros),
                    replayed_at: p.replayed_at_us.and_then(DateTime::from_timestamp_micros),
                });
            }
        }
        for o in &status.owners {
            let known = partitions
                .iter()
                .any(|p| p.topic == o.topic && p.partition == o.partition);
            if !known {
                partitions.push(PartitionRow {
                    stage: o.stage.clone(),
                    topic: o.topic.clone(),
                    partition: o.partition,
                    owner: Some(o.owner.clone()),
                    owner_addr: Some(o.owner_addr.clone()),
                    local: false,
                    processed_offset: o.snapshot_offset,
                    end_offset: None,
                    lag: None,
                    snapshot_offset: o.snapshot_offset,
                    snapshot_age_s: o.snapshot_age_s,
                    snapshot_mismatch: None,
                    restored_at: None,
                    replayed_at: None,
                });
            }
        }
        partitions.sort_by(|a, b| (&a.stage, a.partition).cmp(&(&b.stage, b.partition)));
        Ok(StatusOk::Ok(Json(PipelineStatusOut {
            node: status.node,
            lag_total: status.lag_total,
            partitions,
            dead_letters: status.dead_letters,
            locations_stored: status.locations_stored,
            open_connections: queries::open_connections(&self.state.pool).await.ok(),
            owners_error: status.owners_error,
        })))
    }
}

/// Reading the data of the person a `person_id` path parameter names.
pub fn person_access(person: i64) -> Access {
    Access::Person {
        person,
        field: "person_id",
    }
}

/// The 404 of a person that does not exist.
pub fn unknown_person(id: i64) -> ErrorResponse {
    ApiError::unknown_person(id).into()
}

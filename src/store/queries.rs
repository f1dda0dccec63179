//! The read and write queries of the front ends (REST and gRPC): persons, stored locations,
//! connection history (time-aware, keyset-paginated) and the POC's connection query. Each is one
//! set-based statement on an index.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::Pool;
use serde::Serialize;
use tokio_postgres::Row;
use uuid::Uuid;

use super::StoreError;

/// An attendee, in the POC's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Person {
    pub id: i64,
    pub first_name: String,
    pub last_name: String,
    pub company_name: String,
}

/// A person to create.
#[derive(Debug, Clone)]
pub struct NewPerson {
    pub first_name: String,
    pub last_name: String,
    pub company_name: String,
}

fn person_of(row: &Row, at: usize) -> Person {
    Person {
        id: row.get(at),
        first_name: row.get(at + 1),
        last_name: row.get(at + 2),
        company_name: row.get(at + 3),
    }
}

/// Inserts a person and returns it with its new id.
pub async fn create_person(pool: &Pool, p: &NewPerson) -> Result<Person, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "INSERT INTO person (first_name, last_name, company_name) VALUES ($1, $2, $3)
             RETURNING id, first_name, last_name, company_name",
            &[&p.first_name, &p.last_name, &p.company_name],
        )
        .await?;
    Ok(person_of(&row, 0))
}

/// One person, if it exists.
pub async fn person(pool: &Pool, id: i64) -> Result<Option<Person>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT id, first_name, last_name, company_name FROM person WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(row.map(|r| person_of(&r, 0)))
}

/// Connection episodes stored without an end (open now), each pair once (both sides are
/// stored; the side with the smaller person id is counted). Reads `connection_open_idx`.
pub async fn open_connections(pool: &Pool) -> Result<i64, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT count(*) FROM connection WHERE ended_at IS NULL AND person_id < peer_id",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The ids among `ids` with no person, in order.
pub async fn missing_persons(pool: &Pool, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT i FROM unnest($1::bigint[]) AS i
             WHERE NOT EXISTS (SELECT 1 FROM person WHERE id = i) ORDER BY i",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Every person, by id (the POC's `GET /api/persons`).
pub async fn all_persons(pool: &Pool) -> Result<Vec<Person>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, first_name, last_name, company_name FROM person ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| person_of(r, 0)).collect())
}

/// Up to `limit` persons with an id above `after`, by id; `q` keeps those whose first, last or
/// company name contains it (case-insensitive).
pub async fn search_persons(
    pool: &Pool,
    q: Option<&str>,
    limit: u32,
    after: Option<i64>,
) -> Result<Vec<Person>, StoreError> {
    let client = pool.get().await?;
    let pattern = q.map(|q| {
        let escaped = q
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        format!("%{escaped}%")
    });
    let rows = client
        .query(
            "SELECT id, first_name, last_name, company_name FROM person
             WHERE id > $1
               AND ($2::text IS NULL
                    OR first_name ILIKE $2 OR last_name ILIKE $2 OR company_name ILIKE $2
                    OR (first_name || ' ' || last_name) ILIKE $2)
             ORDER BY id
             LIMIT $3",
            &[&after.unwrap_or(i64::MIN), &pattern, &i64::from(limit)],
        )
        .await?;
    Ok(rows.iter().map(|r| person_of(r, 0)).collect())
}

/// A stored location, with its raw point as stored (X, Y).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredLocation {
    pub id: i64,
    pub event_id: Uuid,
    pub person_id: i64,
    /// Raw X of the stored point: what the POC calls `latitude`.
    pub x: f64,
    /// Raw Y of the stored point: what the POC calls `longitude`.
    pub y: f64,
    pub recorded_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub zone: Option<i64>,
}

const LOCATION_COLUMNS: &str = "id, event_id, person_id, ST_X(coordinate), ST_Y(coordinate), \
                                recorded_at, received_at, zone";

fn location_of(row: &Row) -> StoredLocation {
    StoredLocation {
        id: row.get(0),
        event_id: row.get(1),
        person_id: row.get(2),
        x: row.get(3),
        y: row.get(4),
        recorded_at: row.get(5),
        received_at: row.get(6),
        zone: row.get(7),
    }
}

/// A location by its row id (the POC's ids).
pub async fn location_by_id(pool: &Pool, id: i64) -> Result<Option<StoredLocation>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!("SELECT {LOCATION_COLUMNS} FROM location WHERE id = $1"),
            &[&id],
        )
        .await?;
    Ok(row.as_ref().map(location_of))
}

/// A location by its event id.
pub async fn location_by_event(
    pool: &Pool,
    event_id: Uuid,
) -> Result<Option<StoredLocation>, StoreError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!("SELECT {LOCATION_COLUMNS} FROM location WHERE event_id = $1"),
            &[&event_id],
        )
        .await?;
    Ok(row.as_ref().map(location_of))
}

/// Stores a location the way the POC did: the raw point `ST_Point(x, y)` with the POC's
/// `latitude` as X and `longitude` as Y, synchronously, returning the row. A repeat of the same
/// `event_id` returns the row stored first.
pub async fn insert_poc_location(
    pool: &Pool,
    event_id: Uuid,
    person_id: i64,
    x: f64,
    y: f64,
    recorded_at: DateTime<Utc>,
) -> Result<StoredLocation, StoreError> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO location (event_id, person_id, coordinate, recorded_at)
             VALUES ($1, $2, ST_SetSRID(ST_Point($3, $4), 4326), $5)
             ON CONFLICT (event_id) DO NOTHING",
            &[&event_id, &person_id, &x, &y, &recorded_at],
        )
        .await?;
    let row = client
        .query_one(
            &format!("SELECT {LOCATION_COLUMNS} FROM location WHERE event_id = $1"),
            &[&event_id],
        )
        .await?;
    Ok(location_of(&row))
}

/// One row of the POC's connection query: another person's location near one of the person's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PocConnection {
    pub person: Person,
    pub location: StoredLocation,
}

/// The POC's connection query (docs/design.md §1), in one statement: every other person's location
/// with
/// `start <= t < end + 1 day` within `meters` (geodesic, on the raw points cast to geography) of
/// one of the person's own locations with `start <= t < end`, time-agnostic; each (person,
/// location) once, ordered by person then location id. Dates are UTC days.
pub async fn poc_connections(
    pool: &Pool,
    person_id: i64,
    start: NaiveDate,
    end: NaiveDate,
    meters: f64,
) -> Result<Vec<PocConnection>, StoreError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            // Driven by the person's own locations (few), each probing the GiST index on the
            // geography of the points; DISTINCT ON keeps each (person, location) once.
            "WITH mine AS MATERIALIZED (
                 SELECT coordinate::geography AS g FROM location
                 WHERE person_id = $1
                   AND recorded_at >= ($2::date)::timestamp AT TIME ZONE 'UTC'
                   AND recorded_at <  ($3::date)::timestamp AT TIME ZONE 'UTC'
             )
             SELECT DISTINCT ON (p.id, l.id)
                    p.id, p.first_name, p.last_name, p.company_name,
                    l.id, l.event_id, l.person_id, ST_X(l.coordinate), ST_Y(l.coordinate),
                    l.recorded_at, l.received_at, l.zone
             FROM mine
             CROSS JOIN LATERAL (
                 SELECT * FROM location o
                 WHERE ST_DWithin(o.coordinate::geography, mine.g, $4)
                   AND o.person_id <> $1
                   AND o.recorded_at >= ($2::date)::timestamp AT TIME ZONE 'UTC'
                   AND o.recorded_at <  ($3::date + 1)::timestamp AT TIME ZONE 'UTC'
             ) l
             JOIN person p ON p.id = l.person_id
             ORDER BY p.id, l.id",
            &[&person_id, &start, &end, &meters],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| PocConnection {
            person: person_of(r, 0),
            location: StoredLocation {
                id: r.get(4),
                event_id: r.get(5),
                person_id: r.get(6),
                x: r.get(7),
                y: r.get(8),
                recorded_at: r.get(9),
                received_at: r.get(10),
                zone: r.get(11),
            },
        })
        .collect())
}

/// Where a history page continues: after the episode that started at `started_at` with `peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryCursor {
    pub started_at_us: i64,
    pub peer_id: i64,
}

impl HistoryCursor {
    /// The opaque text clients send back.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("h1:{}:{}", self.started_at_us, self.peer_id))
    }

    /// Reads a cursor from [`Self::encode`]; `None` when it is not one.
    pub fn decode(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.strip_prefix("h1:")?.split(':');
        let started_at_us = parts.next()?.parse().ok()?;
        let peer_id = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some(Self {
            started_at_us,
            peer_id,
        })
    }
}

/// Where a persons page continues: after this id.
pub fn encode_person_cursor(after: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("p1:{after}"))
}

/// Reads a persons cursor; `None` when it is not one.
pub fn decode_person_cursor(text: &str) -> Option<i64> {
    let bytes = URL_SAFE_NO_PAD.decode(text.trim()).ok()?;
    String::from_utf8(bytes)
        .ok()?
        .strip_prefix("p1:")?
        .parse()
        .ok()
}

/// A connection-history request, checked by `crate::input::history_query` (REST and gRPC
/// alike).
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    pub person_id: i64,
    /// Episodes whose last co-location is at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Episodes that started before this time.
    pub to: Option<DateTime<Utc>>,
    pub limit: u32,
    pub cursor: Option<HistoryCursor>,
}

/// One episode of the person with a peer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryItem {
    pub peer: Person,
    pub started_at: DateTime<Utc>,
    /// `None` while the episode is open.
    pub ended_at: Option<DateTime<Utc>>,
    /// The figures of a closed episode are final; those of an open one are as it was when
    /// opened (or last reshaped by late data): its row is rewritten when it closes, and its live
    /// figures are in the person's live state.
    pub last_seen_at: DateTime<Utc>,
    pub colocations: i32,
    pub min_distance_m: f64,
    pub lat: f64,
    pub lon: f64,
}

/// A page of history and where the next one starts (`None` on the last page).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    pub items: Vec<HistoryItem>,
    pub next_cursor: Option<HistoryCursor>,
}

/// The person's episodes that overlap `[from, to)`: a closed episode spans `[started_at,
/// last_seen_at]`, its co-locations; an open one `[started_at, now]`. Ordered by
/// `(started_at, peer)`, keyset-paginated. `None` when the person does not exist.
pub async fn connection_history(
    pool: &Pool,
    q: &HistoryQuery,
) -> Result<Option<HistoryPage>, StoreError> {
    let client = pool.get().await?;
    let exists = client
        .query_opt("SELECT 1 FROM person WHERE id = $1", &[&q.person_id])
        .await?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let (after_start, after_peer) = match q.cursor {
        Some(c) => (Some(super::timestamp(c.started_at_us)), c.peer_id),
        None => (None, i64::MIN),
    };
    // One more row than asked tells whether another page follows.
    let rows = client
        .query(
            "SELECT p.id, p.first_name, p.last_name, p.company_name,
                    c.started_at, c.ended_at, c.last_seen_at, c.colocations, c.min_distance_m,
                    c.lat, c.lon
             FROM connection c
             JOIN person p ON p.id = c.peer_id
             WHERE c.person_id = $1
               AND ($2::timestamptz IS NULL
                    OR (c.ended_at IS NULL AND now() >= $2)
                    OR (c.ended_at IS NOT NULL AND c.last_seen_at >= $2))
               AND ($3::timestamptz IS NULL OR c.started_at < $3)
               AND ($4::timestamptz IS NULL OR (c.started_at, c.peer_id) > ($4, $5))
             ORDER BY c.started_at, c.peer_id
             LIMIT $6",
            &[
                &q.person_id,
                &q.from,
                &q.to,
                &after_start,
                &after_peer,
                &(i64::from(q.limit) + 1),
            ],
        )
        .await?;
    let mut items: Vec<HistoryItem> = rows
        .iter()
        .map(|r| HistoryItem {
            peer: person_of(r, 0),
            started_at: r.get(4),
            ended_at: r.get(5),
            last_seen_at: r.get(6),
            colocations: r.get(7),
            min_distance_m: r.get(8),
            lat: r.get(9),
            lon: r.get(10),
        })
        .collect();
    let next_cursor = if items.len() > q.limit as usize {
        items.truncate(q.limit as usize);
        items.last().map(|last| HistoryCursor {
            started_at_us: last.started_at.timestamp_micros(),
            peer_id: last.peer.id,
        })
    } else {
        None
    };
    Ok(Some(HistoryPage { items, next_cursor }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = HistoryCursor {
            started_at_us: 1_597_746_226_000_123,
            peer_id: 42,
        };
        assert_eq!(HistoryCursor::decode(&c.encode()), Some(c));
        for bad in ["", "abc", "%%%", &encode_person_cursor(5), &c.encode()[1..]] {
            assert_eq!(HistoryCursor::decode(bad), None, "{bad}");
        }
        assert_eq!(decode_person_cursor(&encode_person_cursor(-3)), Some(-3));
        assert_eq!(decode_person_cursor(&c.encode()), None);
    }
}

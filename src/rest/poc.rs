//! The POC's REST contract under `/api` (docs/design.md §1), unchanged in shape so its frontend and
//! Postman collections keep working; malformed input gets a 400 naming the field (the POC
//! answered 500) and unknown ids a 404.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use serde_json::Value;
use udaconnect_actors::domain::derived_event_id;

use super::errors::{ErrorResponse, RestResult};
use super::input::Checked;
use super::RestState;
use crate::error::ApiError;
use crate::input::{no_leap_second, parse_rfc3339, Fields, FromJson};
use crate::store::queries::{self, NewPerson, Person, StoredLocation};

#[derive(Tags)]
enum ApiTags {
    /// The proof of concept's API, kept for its frontend: `/api/persons`, `/api/locations`,
    /// `/api/persons/{id}/connection`.
    Poc,
}

/// The POC endpoints.
pub struct PocApi {
    pub(super) state: Arc<RestState>,
}

/// A person, as the POC shows it.
#[derive(Debug, Clone, Object)]
#[oai(rename = "PocPerson")]
pub struct PocPerson {
    id: i64,
    first_name: String,
    last_name: String,
    company_name: String,
}

impl From<Person> for PocPerson {
    fn from(p: Person) -> Self {
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
#[oai(rename = "PocNewPerson")]
pub struct PocNewPerson {
    /// Required, at most 200 characters.
    first_name: String,
    /// Required, at most 200 characters.
    last_name: String,
    /// Required, at most 200 characters.
    company_name: String,
}

/// Longest accepted name.
pub const MAX_NAME_CHARS: usize = 200;

impl FromJson for NewPerson {
    fn from_json(value: &Value) -> Result<Self, ApiError> {
        let f = Fields::of(value, "body")?;
        Ok(NewPerson {
            first_name: f.text("first_name", MAX_NAME_CHARS)?,
            last_name: f.text("last_name", MAX_NAME_CHARS)?,
            company_name: f.text("company_name", MAX_NAME_CHARS)?,
        })
    }
}

/// A location, as the POC shows it: the stored point's X as `latitude` and Y as `longitude`,
/// both strings, and a UTC time without offset.
#[derive(Debug, Clone, Object)]
#[oai(rename = "PocLocation")]
pub struct PocLocation {
    id: i64,
    person_id: i64,
    /// The stored point's Y.
    longitude: String,
    /// The stored point's X.
    latitude: String,
    /// UTC, `YYYY-MM-DDTHH:MM:SS[.ffffff]`.
    creation_time: String,
}

impl From<StoredLocation> for PocLocation {
    fn from(l: StoredLocation) -> Self {
        Self {
            id: l.id,
            person_id: l.person_id,
            longitude: l.y.to_string(),
            latitude: l.x.to_string(),
            creation_time: l
                .recorded_at
                .naive_utc()
                .format("%Y-%m-%dT%H:%M:%S%.f")
                .to_string(),
        }
    }
}

/// A location to store, in the POC's shape.
#[derive(Debug, Clone, Object)]
#[oai(rename = "PocNewLocation")]
pub struct PocNewLocation {
    person_id: i64,
    /// Stored as the point's X, as the POC did (a number in a string; a JSON number is accepted).
    latitude: String,
    /// Stored as the point's Y.
    longitude: String,
    /// `YYYY-MM-DDTHH:MM:SS` (UTC), or RFC 3339 with an offset.
    creation_time: String,
}

/// A validated POC location.
struct PocLocationIn {
    person_id: i64,
    x: f64,
    y: f64,
    recorded_at: DateTime<Utc>,
}

fn coordinate(f: &Fields<'_>, name: &str) -> Result<f64, ApiError> {
    let value = match f.number(name) {
        Ok(n) => n,
        Err(_) => {
            let s = f.string(name)?;
            s.trim().parse::<f64>().map_err(|_| {
                ApiError::invalid(name, format!("must be a number in a string (got {s:?})"))
            })?
        }
    };
    // The POC's data has both axis orders, so each coordinate may be a latitude or a longitude.
    if !(value.is_finite() && (-180.0..=180.0).contains(&value)) {
        return Err(ApiError::invalid(
            name,
            format!("must be between -180 and 180 (got {value})"),
        ));
    }
    Ok(value)
}

impl FromJson for PocLocationIn {
    fn from_json(value: &Value) -> Result<Self, ApiError> {
        let f = Fields::of(value, "body")?;
        let person_id = f.integer("person_id")?;
        let x = coordinate(&f, "latitude")?;
        let y = coordinate(&f, "longitude")?;
        let text = f.string("creation_time")?;
        let recorded_at = NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%dT%H:%M:%S%.f")
            .map(|t| t.and_utc())
            .ok()
            .or_else(|| parse_rfc3339(text.trim()).ok())
            .ok_or_else(|| {
                ApiError::invalid(
                    "creation_time",
                    format!("must look like 2020-08-18T10:37:06 (got {text:?})"),
                )
            })?;
        let recorded_at = no_leap_second(recorded_at, text)
            .map_err(|reason| ApiError::invalid("creation_time", reason))?;
        Ok(Self {
            person_id,
            x,
            y,
            recorded_at,
        })
    }
}

/// One row of the connection query: another person and where they were.
#[derive(Debug, Clone, Object)]
#[oai(rename = "PocConnection")]
pub struct PocConnection {
    location: PocLocation,
    person: PocPerson,
}

#[derive(ApiResponse)]
enum PersonList {
    /// Every person.
    #[oai(status = 200)]
    Ok(Json<Vec<PocPerson>>),
}

#[derive(ApiResponse)]
enum OnePerson {
    /// The person.
    #[oai(status = 200)]
    Ok(Json<PocPerson>),
}

#[derive(ApiResponse)]
enum OneLocation {
    /// The location.
    #[oai(status = 200)]
    Ok(Json<PocLocation>),
}

#[derive(ApiResponse)]
enum Connections {
    /// Each other person's location near one of the person's, once.
    #[oai(status = 200)]
    Ok(Json<Vec<PocConnection>>),
}

fn not_found(what: &str, field: &str, id: i64) -> ErrorResponse {
    ApiError::not_found(Some(field), format!("no {what} with id {id}")).into()
}

fn date(name: &str, value: Option<String>) -> Result<NaiveDate, ApiError> {
    let text = value.ok_or_else(|| ApiError::invalid(name, "is required (YYYY-MM-DD)"))?;
    NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d")
        .map_err(|_| ApiError::invalid(name, format!("must be a date YYYY-MM-DD (got {text:?})")))
}

/// Largest accepted `distance`, in meters.
pub const MAX_DISTANCE_M: f64 = 100_000.0;

#[OpenApi(tag = "ApiTags::Poc")]
impl PocApi {
    /// Every person (POC).
    #[oai(
        path = "/api/persons",
        method = "get",
        operation_id = "poc_list_persons"
    )]
    async fn list_persons(&self) -> RestResult<PersonList> {
        let persons = queries::all_persons(&self.state.pool).await?;
        Ok(PersonList::Ok(Json(
            persons.into_iter().map(PocPerson::from).collect(),
        )))
    }

    /// Creates a person (POC); answers 200 with it, as the POC did.
    #[oai(
        path = "/api/persons",
        method = "post",
        operation_id = "poc_create_person"
    )]
    async fn create_person(&self, body: Json<Checked<PocNewPerson>>) -> RestResult<OnePerson> {
        let new: NewPerson = body.0.parse_as()?;
        let person = queries::create_person(&self.state.pool, &new).await?;
        Ok(OnePerson::Ok(Json(person.into())))
    }

    /// One person (POC).
    #[oai(
        path = "/api/persons/:person_id",
        method = "get",
        operation_id = "poc_get_person"
    )]
    async fn get_person(&self, person_id: Path<i64>) -> RestResult<OnePerson> {
        match queries::person(&self.state.pool, person_id.0).await? {
            Some(p) => Ok(OnePerson::Ok(Json(p.into()))),
            None => Err(not_found("person", "person_id", person_id.0)),
        }
    }

    /// Stores a location the way the POC did (`latitude` as the point's X), synchronously;
    /// answers 200 with it. It goes to history (and the POC's connection query), not through
    /// the real-time pipeline: use `POST /v1/locations` for that.
    #[oai(
        path = "/api/locations",
        method = "post",
        operation_id = "poc_create_location"
    )]
    async fn create_location(
        &self,
        body: Json<Checked<PocNewLocation>>,
    ) -> RestResult<OneLocation> {
        let l: PocLocationIn = body.0.parse_as()?;
        if queries::person(&self.state.pool, l.person_id)
            .await?
            .is_none()
        {
            return Err(not_found("person", "person_id", l.person_id));
        }
        // A retried post is the same location.
        let event_id = derived_event_id(l.person_id, l.recorded_at.timestamp_micros(), l.x, l.y);
        let stored = queries::insert_poc_location(
            &self.state.pool,
            event_id,
            l.person_id,
            l.x,
            l.y,
            l.recorded_at,
        )
        .await?;
        Ok(OneLocation::Ok(Json(stored.into())))
    }

    /// One location by its id (POC).
    #[oai(
        path = "/api/locations/:location_id",
        method = "get",
        operation_id = "poc_get_location"
    )]
    async fn get_location(&self, location_id: Path<i64>) -> RestResult<OneLocation> {
        match queries::location_by_id(&self.state.pool, location_id.0).await? {
            Some(l) => Ok(OneLocation::Ok(Json(l.into()))),
            None => Err(not_found("location", "location_id", location_id.0)),
        }
    }

    /// The POC's connection query: for each of the person's locations with
    /// `start_date <= t < end_date`, every other person's location with
    /// `start_date <= t < end_date + 1 day` within `distance` meters (geodesic), whatever the
    /// times; each (person, location) once (the POC repeated them).
    #[oai(
        path = "/api/persons/:person_id/connection",
        method = "get",
        operation_id = "poc_person_connections"
    )]
    async fn connection(
        &self,
        person_id: Path<i64>,
        /// First day, `YYYY-MM-DD` (UTC).
        start_date: Query<Option<String>>,
        /// Day after the person's last day, `YYYY-MM-DD` (UTC).
        end_date: Query<Option<String>>,
        /// Meters, 0 to 100000; default 5.
        distance: Query<Option<String>>,
    ) -> RestResult<Connections> {
        let start = date("start_date", start_date.0)?;
        let end = date("end_date", end_date.0)?;
        if end < start {
            return Err(ApiError::invalid("end_date", "must not be before start_date").into());
        }
        let meters = match distance.0 {
            None => 5.0,
            Some(text) => text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|m| m.is_finite() && (0.0..=MAX_DISTANCE_M).contains(m))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "distance",
                        format!(
                            "must be a number of meters from 0 to {MAX_DISTANCE_M} (got {text:?})"
                        ),
                    )
                })?,
        };
        let pool = &self.state.pool;
        if queries::person(pool, person_id.0).await?.is_none() {
            return Err(not_found("person", "person_id", person_id.0));
        }
        let rows = queries::poc_connections(pool, person_id.0, start, end, meters).await?;
        Ok(Connections::Ok(Json(
            rows.into_iter()
                .map(|c| PocConnection {
                    location: c.location.into(),
                    person: c.person.into(),
                })
                .collect(),
        )))
    }
}

//! Input rules shared by every front end that reads JSON (REST bodies, the `ingest` command's
//! JSON lines): parsing that names the field at fault, strict RFC 3339 times, and the location
//! event's fields.

use chrono::{DateTime, Timelike, Utc};
use serde_json::{Map, Value};
use udaconnect_actors::domain::NewLocationEvent;
use udaconnect_actors::zones::ZoneId;
use uuid::Uuid;

use crate::error::ApiError;
use crate::store::queries::{HistoryCursor, HistoryQuery};

/// A zone (an H3 cell at the zone resolution) as users' tools print it: H3's own lowercase
/// hexadecimal form (`88390d51ddfffff`), the one way REST, gRPC and the docs write a zone.
pub fn zone_hex(zone: ZoneId) -> String {
    format!("{zone:x}")
}

/// Reads a zone written in H3's hexadecimal form; with `resolution`, the cell must be at that
/// resolution (the zone resolution). 400 naming `field` otherwise.
pub fn parse_zone(text: &str, field: &str, resolution: Option<u8>) -> Result<ZoneId, ApiError> {
    let cell: h3o::CellIndex = text.trim().parse().map_err(|_| {
        ApiError::invalid(
            field,
            format!("is not an H3 cell in hexadecimal, like 88390d51ddfffff (got {text:?})"),
        )
    })?;
    let at = u8::from(cell.resolution());
    match resolution {
        Some(zones) if zones != at => Err(ApiError::invalid(
            field,
            format!(
                "is an H3 cell at resolution {at}, zones are at resolution {zones} (got {text})"
            ),
        )),
        _ => Ok(u64::from(cell)),
    }
}

/// A latitude/longitude rectangle in WGS84 degrees, edges included; it may not cross the
/// antimeridian (`min_lon <= max_lon`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoundingBox {
    pub min_lat: f64,
    pub min_lon: f64,
    pub max_lat: f64,
    pub max_lon: f64,
}

impl BoundingBox {
    /// The whole Earth.
    pub const WORLD: Self = Self {
        min_lat: -90.0,
        min_lon: -180.0,
        max_lat: 90.0,
        max_lon: 180.0,
    };

    /// A checked box: latitudes in [-90, 90], longitudes in [-180, 180], each minimum at most
    /// its maximum; 400 naming `field` otherwise. REST and gRPC both build boxes here.
    pub fn new(
        (min_lat, min_lon): (f64, f64),
        (max_lat, max_lon): (f64, f64),
        field: &str,
    ) -> Result<Self, ApiError> {
        let lat_ok = |v: f64| v.is_finite() && (-90.0..=90.0).contains(&v);
        let lon_ok = |v: f64| v.is_finite() && (-180.0..=180.0).contains(&v);
        if !(lat_ok(min_lat) && lat_ok(max_lat)) {
            return Err(ApiError::invalid(
                field,
                format!("latitudes must be from -90 to 90 degrees (got {min_lat} and {max_lat})"),
            ));
        }
        if !(lon_ok(min_lon) && lon_ok(max_lon)) {
            return Err(ApiError::invalid(
                field,
                format!(
                    "longitudes must be from -180 to 180 degrees (got {min_lon} and {max_lon})"
                ),
            ));
        }
        if min_lat > max_lat || min_lon > max_lon {
            return Err(ApiError::invalid(
                field,
                format!(
                    "each minimum must be at most its maximum (a box across the antimeridian is \
                     not supported; got latitudes {min_lat}..{max_lat}, longitudes \
                     {min_lon}..{max_lon})"
                ),
            ));
        }
        Ok(Self {
            min_lat,
            min_lon,
            max_lat,
            max_lon,
        })
    }

    /// Reads `min_lon,min_lat,max_lon,max_lat` (the order of GeoJSON's `bbox`, RFC 7946
    /// §5); 400 naming `field` otherwise.
    pub fn parse(text: &str, field: &str) -> Result<Self, ApiError> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let numbers: Option<Vec<f64>> = parts.iter().map(|p| p.parse::<f64>().ok()).collect();
        match numbers.as_deref() {
            Some(&[min_lon, min_lat, max_lon, max_lat]) => {
                Self::new((min_lat, min_lon), (max_lat, max_lon), field)
            }
            _ => Err(ApiError::invalid(
                field,
                format!(
                    "must be four numbers min_lon,min_lat,max_lon,max_lat in degrees (got {text:?})"
                ),
            )),
        }
    }

    /// Whether the point lies in the box, edges included.
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        (self.min_lat..=self.max_lat).contains(&lat) && (self.min_lon..=self.max_lon).contains(&lon)
    }

    /// Whether the zone's cell (its H3 boundary's extent) meets the box.
    pub fn meets_zone(&self, zone: ZoneId) -> bool {
        let Some(boundary) = zone_boundary(zone) else {
            return false;
        };
        let (mut lo_lat, mut lo_lon, mut hi_lat, mut hi_lon) = (90.0, 180.0, -90.0, -180.0);
        for (lat, lon) in boundary {
            lo_lat = f64::min(lo_lat, lat);
            hi_lat = f64::max(hi_lat, lat);
            lo_lon = f64::min(lo_lon, lon);
            hi_lon = f64::max(hi_lon, lon);
        }
        lo_lat <= self.max_lat
            && hi_lat >= self.min_lat
            && lo_lon <= self.max_lon
            && hi_lon >= self.min_lon
    }
}

/// Most live points (`/v1/points`, `Admin.ListPoints`) one answer holds, and how many when the
/// request does not say.
pub const MAX_LIVE_POINTS: usize = 10_000;
pub const DEFAULT_LIVE_POINTS: usize = 1_000;

/// How many live points one answer may hold: from 1 to [`MAX_LIVE_POINTS`],
/// [`DEFAULT_LIVE_POINTS`] when `None`; 400 naming `field` otherwise. REST's `/v1/points` and
/// gRPC's `Admin.ListPoints` both follow it.
pub fn point_limit(limit: Option<i64>, field: &str) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DEFAULT_LIVE_POINTS),
        Some(n) if (1..=MAX_LIVE_POINTS as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::invalid(
            field,
            format!("must be from 1 to {MAX_LIVE_POINTS} (got {n})"),
        )),
    }
}

/// The zone's outline: its H3 cell's boundary vertices as (lat, lon) in WGS84 degrees, in
/// H3's order (counter-clockwise); `None` when `zone` is not an H3 cell.
pub fn zone_boundary(zone: ZoneId) -> Option<Vec<(f64, f64)>> {
    let cell = h3o::CellIndex::try_from(zone).ok()?;
    Some(cell.boundary().iter().map(|v| (v.lat(), v.lng())).collect())
}

/// Reads a UUID (an `event_id`) in any of its text forms; 400 naming `field` otherwise.
pub fn parse_uuid(text: &str, field: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|e| ApiError::invalid(field, format!("must be a UUID ({e}; got {text:?})")))
}

/// Most episodes one history page holds, and how many when the request does not say.
pub const MAX_PAGE_SIZE: u32 = 1_000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// A page size from 1 to [`MAX_PAGE_SIZE`], [`DEFAULT_PAGE_SIZE`] when `None`; 400 naming
/// `field` otherwise. Every paginated list of REST and gRPC follows it.
pub fn page_size(size: Option<i64>, field: &str) -> Result<u32, ApiError> {
    match size {
        None => Ok(DEFAULT_PAGE_SIZE),
        Some(n) if (1..=i64::from(MAX_PAGE_SIZE)).contains(&n) => Ok(n as u32),
        Some(n) => Err(ApiError::invalid(
            field,
            format!("must be from 1 to {MAX_PAGE_SIZE} (got {n})"),
        )),
    }
}

/// What a front end calls the page size and the cursor (named in its errors): REST
/// `limit`/`cursor`, gRPC `page_size`/`page_token`.
#[derive(Debug, Clone, Copy)]
pub struct PageFields {
    pub size: &'static str,
    pub cursor: &'static str,
}

/// `person_id` as a person id: positive. Errors: 400 naming `person_id`.
pub fn person_id(person_id: i64) -> Result<i64, ApiError> {
    if person_id <= 0 {
        return Err(ApiError::invalid(
            "person_id",
            format!("must be a positive id (got {person_id})"),
        ));
    }
    Ok(person_id)
}

/// The one check of a history request: `person_id` positive, `to` not before `from`, a
/// page size from 1 to [`MAX_PAGE_SIZE`] (`None`: [`DEFAULT_PAGE_SIZE`]), and a cursor this
/// API handed out. Errors are 400s naming the field as `fields` calls it.
pub fn history_query(
    person_id: i64,
    (from, to): (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    size: Option<i64>,
    cursor: Option<&str>,
    fields: PageFields,
) -> Result<HistoryQuery, ApiError> {
    let person_id = self::person_id(person_id)?;
    if let (Some(from), Some(to)) = (from, to) {
        if from > to {
            return Err(ApiError::invalid(
                "to",
                format!("must not be before from (from {from}, to {to})"),
            ));
        }
    }
    let limit = page_size(size, fields.size)?;
    let cursor = cursor
        .map(|text| {
            HistoryCursor::decode(text).ok_or_else(|| {
                ApiError::invalid(
                    fields.cursor,
                    format!("is not a cursor this API handed out (got {text:?})"),
                )
            })
        })
        .transpose()?;
    Ok(HistoryQuery {
        person_id,
        from,
        to,
        limit,
        cursor,
    })
}

/// A body type read from raw JSON with errors that name the field.
pub trait FromJson: Sized {
    /// Reads `value`; errors are 400s naming the field (`lat`, `events[3].lat`, …).
    fn from_json(value: &Value) -> Result<Self, ApiError>;
}

/// Parses JSON text; a number JSON allows but a double cannot hold (`1e999`) and a value that
/// is not JSON (`NaN`, `Infinity`, `1.2.3`, a bare word) name the field they came in (its path,
/// e.g. `lat` or `events[3].lat`); any other syntax error (a cut or broken document) names
/// `body`.
pub fn parse_json(text: &[u8]) -> Result<Value, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let value: Value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // A number too large for a double is a bad value of its field; any other syntax
        // error is the body's (where a cut or broken document stops says little).
        let message = inner.to_string();
        if message.starts_with("number out of range") && path != "." {
            ApiError::invalid(
                path,
                "is a number out of the range of a double (at most about 1.8e308)",
            )
        } else if ["expected value", "expected ident", "invalid number"]
            .iter()
            .any(|m| message.starts_with(m))
            && path != "."
        {
            ApiError::invalid(
                path,
                format!(
                    "is not a JSON value (NaN, Infinity and bare words are not JSON numbers): \
                     {message}"
                ),
            )
        } else {
            ApiError::invalid("body", format!("is not valid JSON: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid("body", format!("is not valid JSON: {e}")))?;
    Ok(value)
}

/// An RFC 3339 time with an offset (`Z` or `±hh:mm`), as written: a second of 60 is refused,
/// since UdaConnect's times are UTC without leap seconds (Unix time and PostgreSQL's
/// `timestamptz` have none, and no leap second has been inserted since 2016). The error says
/// what is wrong, to put after the field's name.
pub fn parse_rfc3339(s: &str) -> Result<DateTime<Utc>, String> {
    let t = DateTime::parse_from_rfc3339(s).map_err(|_| {
        format!("must be an RFC 3339 time such as 2020-08-18T10:37:06Z (got {s:?})")
    })?;
    no_leap_second(t.with_timezone(&Utc), s)
}

/// Refuses a time chrono read as a leap second (second 60, which it keeps as a nanosecond
/// count of one second or more): it would otherwise become the next minute's first second.
pub fn no_leap_second(t: DateTime<Utc>, text: &str) -> Result<DateTime<Utc>, String> {
    if t.nanosecond() >= 1_000_000_000 {
        return Err(format!(
            "has second 60 (a leap second), which is not accepted: times are UTC without leap \
             seconds (got {text:?})"
        ));
    }
    Ok(t)
}

impl FromJson for NewLocationEvent {
    /// `{"event_id"?, "person_id", "lat", "lon", "recorded_at": RFC 3339}`.
    fn from_json(value: &Value) -> Result<Self, ApiError> {
        let f = Fields::of(value, "body")?;
        Ok(NewLocationEvent {
            event_id: f.uuid("event_id")?,
            person_id: f.integer("person_id")?,
            lat: f.number("lat")?,
            lon: f.number("lon")?,
            recorded_at: f.time("recorded_at")?.timestamp_micros(),
        })
    }
}

/// The fields of one JSON object.
pub struct Fields<'a> {
    object: &'a Map<String, Value>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Fields<'a> {
    /// The object's fields; `what` names the value when it is not an object.
    pub fn of(value: &'a Value, what: &str) -> Result<Self, ApiError> {
        match value {
            Value::Object(object) => Ok(Self { object }),
            other => Err(ApiError::invalid(
                what,
                format!("must be a JSON object (got {})", kind(other)),
            )),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.object.get(name).filter(|v| !v.is_null())
    }

    /// A field's raw JSON; `null` counts as absent.
    pub fn get_raw(&self, name: &str) -> Option<&'a Value> {
        self.get(name)
    }

    fn required(&self, name: &str) -> Result<&'a Value, ApiError> {
        self.get(name)
            .ok_or_else(|| ApiError::invalid(name, "is required"))
    }

    /// A required string.
    pub fn string(&self, name: &str) -> Result<&'a str, ApiError> {
        match self.required(name)? {
            Value::String(s) => Ok(s),
            other => Err(ApiError::invalid(
                name,
                format!("must be a string (got {})", kind(other)),
            )),
        }
    }

    /// A required non-blank string of at most `max` characters, trimmed ([`text`]).
    pub fn text(&self, name: &str, max: usize) -> Result<String, ApiError> {
        let s = text(name, self.string(name)?, max)?;
        if s.is_empty() {
            return Err(ApiError::invalid(name, "must not be empty"));
        }
        Ok(s.to_owned())
    }

    /// A required integer.
    pub fn integer(&self, name: &str) -> Result<i64, ApiError> {
        let v = self.required(name)?;
        v.as_i64().ok_or_else(|| {
            ApiError::invalid(name, format!("must be an integer (got {})", describe(v)))
        })
    }

    /// A required number.
    pub fn number(&self, name: &str) -> Result<f64, ApiError> {
        let v = self.required(name)?;
        v.as_f64().ok_or_else(|| {
            ApiError::invalid(name, format!("must be a number (got {})", describe(v)))
        })
    }

    /// An optional UUID.
    pub fn uuid(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => parse_uuid(s, name).map(Some),
            Some(other) => Err(ApiError::invalid(
                name,
                format!("must be a UUID string (got {})", kind(other)),
            )),
        }
    }

    /// A required RFC 3339 time with an offset (see [`parse_rfc3339`]).
    pub fn time(&self, name: &str) -> Result<DateTime<Utc>, ApiError> {
        let s = self.string(name)?;
        parse_rfc3339(s).map_err(|reason| ApiError::invalid(name, reason))
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {s:?}"),
        Value::Number(n) => format!("{n}"),
        other => kind(other).to_owned(),
    }
}

/// `value` trimmed, when it is text PostgreSQL can store and compare: at most `max`
/// characters, and no NUL (U+0000), which PostgreSQL's `text` cannot hold (it would fail the
/// statement). Errors name `name`.
pub fn text<'a>(name: &str, value: &'a str, max: usize) -> Result<&'a str, ApiError> {
    let value = value.trim();
    if value.contains('\0') {
        return Err(ApiError::invalid(
            name,
            "must not contain the NUL character (U+0000)",
        ));
    }
    if value.chars().count() > max {
        return Err(ApiError::invalid(
            name,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_bounding_box_is_read_in_geojson_order_and_checked() {
        let b = BoundingBox::parse("13.3, 52.5, 13.4, 52.6", "bbox").expect("valid");
        assert_eq!(
            (b.min_lat, b.min_lon, b.max_lat, b.max_lon),
            (52.5, 13.3, 52.6, 13.4)
        );
        assert!(b.contains(52.5, 13.4), "edges are inside");
        assert!(!b.contains(52.61, 13.35));
        for bad in [
            "1,2,3",
            "1,2,3,4,5",
            "a,b,c,d",
            "0,91,1,92",
            "181,0,182,1",
            "2,0,1,1",
        ] {
            let e = BoundingBox::parse(bad, "bbox").expect_err(bad);
            assert_eq!(e.field.as_deref(), Some("bbox"), "{bad}: {e:?}");
        }
        assert!(BoundingBox::parse("NaN,0,1,1", "bbox").is_err());
    }

    #[test]
    fn a_zone_meets_a_box_by_its_outline() {
        let cell = h3o::LatLng::new(52.5163, 13.3777)
            .expect("valid")
            .to_cell(h3o::Resolution::Eight);
        let zone = u64::from(cell);
        let outline = zone_boundary(zone).expect("a cell");
        assert_eq!(outline.len(), 6);
        // A box around one vertex only still meets the zone.
        let (lat, lon) = outline[0];
        let corner = BoundingBox::new((lat - 1e-6, lon - 1e-6), (lat + 1e-6, lon + 1e-6), "bbox")
            .expect("valid");
        assert!(corner.meets_zone(zone));
        let far = BoundingBox::new((0.0, 0.0), (1.0, 1.0), "bbox").expect("valid");
        assert!(!far.meets_zone(zone));
        assert!(BoundingBox::WORLD.meets_zone(zone));
        assert_eq!(zone_boundary(42), None);
    }

    #[test]
    fn a_point_limit_is_from_1_to_the_maximum() {
        assert_eq!(point_limit(None, "limit").expect("default"), 1_000);
        assert_eq!(point_limit(Some(10_000), "limit").expect("max"), 10_000);
        for bad in [0, -1, 10_001] {
            let e = point_limit(Some(bad), "limit").expect_err("refused");
            assert_eq!(e.field.as_deref(), Some("limit"));
        }
    }

    #[test]
    fn a_zone_reads_back_from_its_hex_form_and_other_text_names_the_field() {
        let zone = u64::from(
            h3o::LatLng::new(52.5163, 13.3777)
                .expect("coordinates")
                .to_cell(h3o::Resolution::Eight),
        );
        assert_eq!(zone_hex(zone), "881f1d4887fffff");
        assert_eq!(parse_zone("881f1d4887fffff", "zone", Some(8)), Ok(zone));
        assert_eq!(parse_zone(" 881F1D4887FFFFF ", "zone", None), Ok(zone));
        for (text, resolution) in [("42", None), ("613036919424548863", None), ("", None)] {
            let e = parse_zone(text, "zone", resolution).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("zone"), "{text}");
            assert!(e.message.contains("not an H3 cell"), "{}", e.message);
        }
        let e = parse_zone("881f1d4887fffff", "zone", Some(9)).unwrap_err();
        assert!(
            e.message
                .contains("at resolution 8, zones are at resolution 9"),
            "{}",
            e.message
        );
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let v = json!({"a": "x", "n": 1.5, "i": "7", "t": "yesterday", "u": 3});
        let f = Fields::of(&v, "body").expect("object");
        let err = |r: Result<(), ApiError>| r.expect_err("must fail");
        let e = err(f.integer("n").map(drop));
        assert_eq!(
            (e.field.as_deref(), e.message.as_str()),
            (Some("n"), "must be an integer (got 1.5)")
        );
        let e = err(f.integer("i").map(drop));
        assert_eq!(e.message, "must be an integer (got the string \"7\")");
        let e = err(f.number("missing").map(drop));
        assert_eq!(
            (e.field.as_deref(), e.message.as_str()),
            (Some("missing"), "is required")
        );
        assert_eq!(err(f.time("t").map(drop)).field.as_deref(), Some("t"));
        assert_eq!(err(f.uuid("u").map(drop)).field.as_deref(), Some("u"));
        assert_eq!(
            err(f.text("missing", 5).map(drop)).field.as_deref(),
            Some("missing")
        );
        assert_eq!(f.string("a").ok(), Some("x"));
        assert_eq!(f.number("n").ok(), Some(1.5));
        let e = Fields::of(&json!([1]), "events[3]")
            .err()
            .expect("not an object");
        assert_eq!(e.field.as_deref(), Some("events[3]"));
    }

    #[test]
    fn times_need_an_offset_and_no_leap_second() {
        assert!(parse_rfc3339("2020-08-18T10:37:06Z").is_ok());
        assert!(parse_rfc3339("2020-08-18T12:37:06+02:00").is_ok());
        assert!(parse_rfc3339("2020-08-18T10:37:06").is_err());
        let e = parse_rfc3339("2020-08-18T10:37:60Z").expect_err("second 60");
        assert!(e.contains("second 60"), "{e}");
        // Not even at a real leap second (2016-12-31T23:59:60Z).
        assert!(parse_rfc3339("2016-12-31T23:59:60Z").is_err());
        assert!(parse_rfc3339("2020-08-18T10:37:59.999999Z").is_ok());
        // As written: no surrounding blanks.
        assert!(parse_rfc3339(" 2020-08-18T10:37:06Z").is_err());
    }

    #[test]
    fn json_errors_name_the_field_they_came_in() {
        let e = parse_json(br#"{"person_id": 1, "lat": 1e999, "lon": 2}"#).expect_err("1e999");
        assert_eq!(e.field.as_deref(), Some("lat"));
        assert!(e.message.contains("out of the range"), "{}", e.message);
        let e = parse_json(br#"{"events": [{"lat": 1}, {"lon": -1e400}]}"#).expect_err("-1e400");
        assert_eq!(e.field.as_deref(), Some("events[1].lon"));
        for (body, field) in [
            (&br#"{"person_id": 1, "lat": NaN, "lon": 2}"#[..], "lat"),
            (
                br#"{"events": [{"lat": 1}, {"lon": Infinity}]}"#,
                "events[1].lon",
            ),
            (br#"{"lat": 1.2.3}"#, "body"),
            (br#"{"lat": north}"#, "lat"),
        ] {
            let e = parse_json(body).expect_err("not JSON");
            assert_eq!(e.field.as_deref(), Some(field), "{}", e.message);
        }
        let e = parse_json(br#"{"lat": 1,"#).expect_err("cut");
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        assert_eq!(e.field.as_deref(), Some("body"));
        assert_eq!(
            parse_json(b"[1] x").expect_err("trailing").field.as_deref(),
            Some("body")
        );
        assert_eq!(parse_json(br#"{"lat": 1.5}"#).expect("valid")["lat"], 1.5);
    }

    #[test]
    fn a_location_event_names_each_field() {
        let ok = serde_json::json!({"person_id": 5, "lat": 1.0, "lon": 2.0,
            "recorded_at": "2020-08-18T10:37:06Z"});
        let e = NewLocationEvent::from_json(&ok).expect("valid");
        assert_eq!((e.person_id, e.lat, e.lon), (5, 1.0, 2.0));
        let mut bad = ok.clone();
        bad["recorded_at"] = "2020-08-18T10:37:60Z".into();
        let e = NewLocationEvent::from_json(&bad).expect_err("leap second");
        assert_eq!(e.field.as_deref(), Some("recorded_at"));
        let mut bad = ok;
        bad["lat"] = "1".into();
        assert_eq!(
            NewLocationEvent::from_json(&bad)
                .expect_err("string")
                .field
                .as_deref(),
            Some("lat")
        );
    }
}

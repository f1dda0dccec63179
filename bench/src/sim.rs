//! The conference simulator: attendees walking between booths and talks, reporting noisy GPS
//! positions, delivered late, out of order and sometimes twice, as real phones do.
//!
//! The venue is an exhibition hall with booths on a grid (a crowd disc in front of each), talk
//! rooms north and south of it (seats on a grid, sessions on a fixed schedule), and lounges in
//! the open area around them. Each attendee dwells at a booth or a lounge, walks in a straight
//! line to the next one, and now and then sits through a talk. Every attendee reports on its
//! own phase, every `report_interval_s` ± 20 %.
//!
//! Events come out in arrival order (`received_at`), which is `recorded_at` plus a delay drawn
//! uniformly from `[0, max_disorder_s]`: so every event arrives at most `max_disorder_s` behind
//! the latest event time seen before it, the bound the engine's `lateness_s` relies on. The
//! stream is generated one second of event time at a time through a small reorder buffer, so
//! memory stays bounded whatever the duration.
//!
//! Everything is a function of the [`ConferenceConfig`]: the simulator uses its own generator
//! ([`rng`]), so a seed gives byte-identical output across runs and versions. (Only the last bit
//! of the platform's `ln`, `sin`, `cos` and `hypot` could differ between machines; positions
//! are rounded to 1e-7 degrees, which absorbs that but for a freak case.)

pub mod names;
pub mod rng;

use std::collections::{HashMap, VecDeque};

use h3o::{CellIndex, Resolution};
use serde::{Deserialize, Serialize};
use udaconnect_actors::domain::{
    derived_event_id, LocationEvent, Micros, Person, PersonId, MICROS_PER_S, MIN_RECORDED_AT,
};
use udaconnect_actors::geo::{WGS84_A, WGS84_F};
use udaconnect_actors::params::EngineParams;
use udaconnect_actors::zones::{ZoneGrid, ZoneId};

use self::rng::Rng;

/// The default first day of the simulated conference: 2026-03-10T09:00:00Z.
pub const DEFAULT_START: Micros = 1_773_133_200 * MICROS_PER_S;

/// The engine's default `lateness_s`: a larger disorder makes it miss co-locations in real time.
pub const ENGINE_DEFAULT_LATENESS_S: u32 = 30;

/// Relative jitter of each attendee's report gaps (± 20 %).
const REPORT_JITTER: f64 = 0.2;
/// Event time generated per step of the stream, µs.
const SLICE_US: i64 = MICROS_PER_S;
/// The smallest default venue side, meters.
const MIN_VENUE_SIDE_M: f64 = 150.0;
/// The default venue side is this many meters times the square root of the attendance: about
/// 36 m² per attendee, lobbies and hallways included.
const VENUE_SIDE_PER_SQRT_ATTENDEE_M: f64 = 6.0;
/// Lounges keep this far from the booth hall and the talk rooms, meters.
const LOUNGE_CLEARANCE_M: f64 = 5.0;
/// Free space between the venue's outline and the hall or rooms, meters.
const MARGIN_M: f64 = 20.0;
/// Corridor between the booth hall and a row of talk rooms, meters.
const CORRIDOR_M: f64 = 10.0;
/// Wall-to-wall gap between neighbouring talk rooms, meters.
const ROOM_GAP_M: f64 = 5.0;
/// Side aisles of a talk room, each, meters.
const ROOM_AISLE_M: f64 = 2.0;
/// Stage and front space of a talk room, meters.
const ROOM_STAGE_M: f64 = 6.0;
/// An attendee may decide to attend a talk from this long before it starts ...
const JOIN_BEFORE_US: i64 = 10 * 60 * MICROS_PER_S;
/// ... until this long after.
const JOIN_AFTER_US: i64 = 5 * 60 * MICROS_PER_S;
/// Nobody walks into a talk that ends within this much time.
const MIN_TALK_LEFT_US: i64 = 5 * 60 * MICROS_PER_S;
/// Attendees leave a talk within this long after it ends.
const LEAVE_SPREAD_US: i64 = 2 * 60 * MICROS_PER_S;
/// Attendees' walking speeds vary by ± this fraction around `walk_speed_mps`.
const SPEED_SPREAD: f64 = 0.15;
/// Positions are reported with 7 decimals, about 1 cm, as phones do.
const DEGREE_STEPS: f64 = 1e7;

/// Everything a simulated conference depends on; the same config gives the same events.
///
/// The default is a 2,000-attendee conference; [`ConferenceConfig::for_attendees`] scales the
/// venue (booths, talk rooms, size) to another attendance. Missing fields in a serialized config
/// take the 2,000-attendee defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConferenceConfig {
    /// How many attendees report locations.
    pub attendees: u32,
    /// The first attendee's person id; the others follow consecutively.
    pub first_person_id: PersonId,
    /// Booths in the exhibition hall (default attendees / 40, at least 1).
    pub booths: u32,
    /// Talk rooms (default max(1, attendees / 2000)); 0 means no talks.
    pub talk_rooms: u32,
    /// Seats per talk room.
    pub room_capacity: u32,
    /// Distance between neighbouring seats, meters.
    pub seat_pitch_m: f64,
    /// Length of a talk, minutes.
    pub talk_min: u32,
    /// Break between two talks, minutes.
    pub break_min: u32,
    /// Probability that an attendee free to join an upcoming talk goes to it.
    pub talk_probability: f64,
    /// Distance between neighbouring booths (the aisles), meters.
    pub booth_spacing_m: f64,
    /// Radius of the crowd disc in front of a booth, meters.
    pub booth_radius_m: f64,
    /// Probability that an attendee's next stop is a booth rather than a lounge.
    pub booth_probability: f64,
    /// Lounges (coffee points, hallway corners) in the open area around the hall, where
    /// attendees stand in loose groups (default attendees / 100, at least 1).
    pub lounges: u32,
    /// Radius of a lounge's crowd disc, meters.
    pub lounge_radius_m: f64,
    /// Shortest stay at a booth or lounge, seconds.
    pub dwell_min_s: u32,
    /// Longest stay at a booth or lounge, seconds.
    pub dwell_max_s: u32,
    /// Mean walking speed, meters per second (each attendee within ± 15 %).
    pub walk_speed_mps: f64,
    /// Simulated event time, seconds.
    pub duration_s: u32,
    /// Mean time between two reports of one attendee, seconds (each gap ± 20 %).
    pub report_interval_s: f64,
    /// Standard deviation of the GPS error along each axis, meters.
    pub gps_noise_m: f64,
    /// Largest delay between recording and arrival, seconds: every event arrives at most this
    /// far behind the latest event time seen before it.
    pub max_disorder_s: u32,
    /// Fraction of events sent a second time (same event id, its own delay).
    pub duplicate_rate: f64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Latitude of the venue's center, degrees (before `straddle_zones` moves it).
    pub center_lat: f64,
    /// Longitude of the venue's center, degrees (before `straddle_zones` moves it).
    pub center_lon: f64,
    /// Width (east–west) of the venue, meters.
    pub venue_w_m: f64,
    /// Depth (north–south) of the venue, meters.
    pub venue_h_m: f64,
    /// Move the venue's center east onto the nearest border of two zones, so that the
    /// exhibition hall is split between at least two zones.
    pub straddle_zones: bool,
    /// H3 resolution of zones, as the engine's `zone_resolution`.
    pub zone_resolution: u8,
    /// When the simulation starts (µs since the Unix epoch).
    pub start: Micros,
}

impl Default for ConferenceConfig {
    fn default() -> Self {
        Self::for_attendees(2_000)
    }
}

impl ConferenceConfig {
    /// The default conference for `attendees`, with booths, talk rooms and venue sized to it.
    pub fn for_attendees(attendees: u32) -> Self {
        let mut config = Self {
            attendees,
            first_person_id: 1,
            booths: (attendees / 40).max(1),
            talk_rooms: (attendees / 2_000).max(1),
            room_capacity: 400,
            seat_pitch_m: 1.2,
            talk_min: 40,
            break_min: 20,
            talk_probability: 0.25,
            booth_spacing_m: 9.0,
            booth_radius_m: 3.0,
            booth_probability: 0.5,
            lounges: (attendees / 100).max(1),
            lounge_radius_m: 8.0,
            dwell_min_s: 120,
            dwell_max_s: 900,
            walk_speed_mps: 1.2,
            duration_s: 3_600,
            report_interval_s: 15.0,
            gps_noise_m: 2.0,
            max_disorder_s: 20,
            duplicate_rate: 0.02,
            seed: 0x00DA_C044_EC72,
            // The Albuquerque Convention Center.
            center_lat: 35.0845,
            center_lon: -106.6511,
            venue_w_m: 0.0,
            venue_h_m: 0.0,
            straddle_zones: true,
            zone_resolution: 8,
            start: DEFAULT_START,
        };
        config.fit_venue();
        config
    }

    /// Sets `venue_w_m` and `venue_h_m` to the default size: 6 m times the square root of the
    /// attendance each way (at least 150 m), or more if the booth hall and talk rooms need it.
    pub fn fit_venue(&mut self) {
        let side = (VENUE_SIDE_PER_SQRT_ATTENDEE_M * f64::from(self.attendees).sqrt())
            .max(MIN_VENUE_SIDE_M)
            .ceil();
        let block = Block::new(self, side);
        self.venue_w_m = side.max((block.width_m + 2.0 * MARGIN_M).ceil());
        // The hall is in the middle; a side with more rooms sets the depth.
        let half_h = block.north_m.max(-block.south_m);
        self.venue_h_m = side.max((2.0 * half_h + 2.0 * MARGIN_M).ceil());
    }

    /// Checks every field and names the first one out of range.
    ///
    /// (Longer than our ~120-line rule on purpose: one check per field, in the order of the
    /// fields, each a few lines; nothing to share between them.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: &'static str, reason: &str, value: String| {
            Err(ConfigError {
                field,
                reason: reason.to_owned(),
                value,
            })
        };
        if self.attendees == 0 {
            return err("attendees", "must be at least 1", "0".into());
        }
        if self.first_person_id < 1 {
            return err(
                "first_person_id",
                "must be a positive person id",
                self.first_person_id.to_string(),
            );
        }
        if self
            .first_person_id
            .checked_add(i64::from(self.attendees) - 1)
            .is_none()
        {
            return err(
                "first_person_id",
                "leaves no room for all attendees' ids",
                self.first_person_id.to_string(),
            );
        }
        if self.booths == 0 {
            return err("booths", "must be at least 1", "0".into());
        }
        if self.talk_rooms > 0 && self.room_capacity == 0 {
            return err(
                "room_capacity",
                "must be at least 1 when there are talk rooms",
                "0".into(),
            );
        }
        if self.talk_rooms > 0 && self.talk_min < 10 {
            return err(
                "talk_min",
                "must be at least 10 minutes",
                self.talk_min.to_string(),
            );
        }
        if self.talk_rooms > 0 && u64::from(self.talk_min) + u64::from(self.break_min) < 20 {
            return err(
                "break_min",
                "must leave at least 20 minutes from one talk's start to the next",
                self.break_min.to_string(),
            );
        }
        let ranges: [(&'static str, f64, f64, f64, &str); 14] = [
            (
                "seat_pitch_m",
                self.seat_pitch_m,
                0.5,
                5.0,
                "must be between 0.5 and 5 meters",
            ),
            (
                "booth_spacing_m",
                self.booth_spacing_m,
                1.0,
                1_000.0,
                "must be between 1 and 1000 meters",
            ),
            (
                "booth_probability",
                self.booth_probability,
                0.0,
                1.0,
                "must be between 0 and 1",
            ),
            (
                "lounge_radius_m",
                self.lounge_radius_m,
                0.1,
                100.0,
                "must be between 0.1 and 100 meters",
            ),
            (
                "venue_h_m",
                self.venue_h_m,
                10.0,
                20_000.0,
                "must be between 10 and 20000 meters",
            ),
            (
                "talk_probability",
                self.talk_probability,
                0.0,
                1.0,
                "must be between 0 and 1",
            ),
            (
                "booth_radius_m",
                self.booth_radius_m,
                0.1,
                50.0,
                "must be between 0.1 and 50 meters",
            ),
            (
                "walk_speed_mps",
                self.walk_speed_mps,
                0.1,
                10.0,
                "must be between 0.1 and 10 m/s",
            ),
            (
                "report_interval_s",
                self.report_interval_s,
                0.1,
                86_400.0,
                "must be between 0.1 and 86400 seconds",
            ),
            (
                "gps_noise_m",
                self.gps_noise_m,
                0.0,
                100.0,
                "must be between 0 and 100 meters",
            ),
            (
                "duplicate_rate",
                self.duplicate_rate,
                0.0,
                1.0,
                "must be between 0 and 1",
            ),
            (
                "center_lat",
                self.center_lat,
                -80.0,
                80.0,
                "must be between -80 and 80 degrees (a flat venue near a pole is not modelled)",
            ),
            (
                "center_lon",
                self.center_lon,
                -180.0,
                180.0,
                "must be between -180 and 180 degrees",
            ),
            (
                "venue_w_m",
                self.venue_w_m,
                10.0,
                20_000.0,
                "must be between 10 and 20000 meters",
            ),
        ];
        for (field, value, lo, hi, reason) in ranges {
            if !(value.is_finite() && (lo..=hi).contains(&value)) {
                return err(field, reason, value.to_string());
            }
        }
        if self.booth_spacing_m < 2.0 * self.booth_radius_m {
            return err(
                "booth_spacing_m",
                "must be at least twice booth_radius_m, so that booth crowds do not overlap",
                self.booth_spacing_m.to_string(),
            );
        }
        if self.dwell_min_s == 0 {
            return err("dwell_min_s", "must be at least 1 second", "0".into());
        }
        if self.dwell_max_s < self.dwell_min_s {
            return err(
                "dwell_max_s",
                "must be at least dwell_min_s",
                self.dwell_max_s.to_string(),
            );
        }
        if self.duration_s == 0 {
            return err("duration_s", "must be at least 1 second", "0".into());
        }
        if self.max_disorder_s > 3_600 {
            return err(
                "max_disorder_s",
                "must be at most 3600 seconds",
                self.max_disorder_s.to_string(),
            );
        }
        if self.zone_resolution > 15 {
            return err(
                "zone_resolution",
                "must be an H3 resolution from 0 to 15",
                self.zone_resolution.to_string(),
            );
        }
        // chrono (and RFC 3339) stop at the year 9999.
        let last = 253_402_300_799 * MICROS_PER_S
            - (i64::from(self.duration_s) + i64::from(self.max_disorder_s)) * MICROS_PER_S;
        if !(MIN_RECORDED_AT..=last).contains(&self.start) {
            return err(
                "start",
                "must be from 2000-01-01 to the end of year 9999",
                self.start.to_string(),
            );
        }
        Ok(())
    }

    /// Settings that are valid but probably not what the caller meant, as sentences.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.max_disorder_s > ENGINE_DEFAULT_LATENESS_S {
            warnings.push(format!(
                "max_disorder_s is {} s, more than the engine's default lateness_s of {} s: \
                 events delayed beyond it are stored but not matched in real time",
                self.max_disorder_s, ENGINE_DEFAULT_LATENESS_S
            ));
        }
        let seats = u64::from(self.talk_rooms) * u64::from(self.room_capacity);
        if self.talk_rooms > 0 && seats < u64::from(self.attendees) / 20 {
            warnings.push(format!(
                "only {seats} seats in talks for {} attendees",
                self.attendees
            ));
        }
        warnings
    }

    fn person_id(&self, index: usize) -> PersonId {
        self.first_person_id + index as i64
    }
}

/// A config field out of range; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason} (got {value})")]
pub struct ConfigError {
    /// The field's name, as in [`ConferenceConfig`] (the CLI flag is the same with dashes).
    pub field: &'static str,
    /// What the value must be.
    pub reason: String,
    /// The rejected value, as text.
    pub value: String,
}

/// Converts local east/north offsets from the venue's center to WGS84 degrees and back, with
/// the ellipsoid's radii of curvature at the center (exact to millimetres over a venue).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LocalFrame {
    /// Latitude of the origin, degrees.
    pub lat: f64,
    /// Longitude of the origin, degrees.
    pub lon: f64,
    deg_per_m_north: f64,
    deg_per_m_east: f64,
}

impl LocalFrame {
    /// The frame with its origin at `lat`, `lon` (degrees).
    pub fn new(lat: f64, lon: f64) -> Self {
        let e2 = WGS84_F * (2.0 - WGS84_F);
        let (sin_lat, cos_lat) = lat.to_radians().sin_cos();
        let w2 = 1.0 - e2 * sin_lat * sin_lat;
        // Meridional and prime-vertical radii of curvature.
        let m = WGS84_A * (1.0 - e2) / (w2 * w2.sqrt());
        let n = WGS84_A / w2.sqrt();
        Self {
            lat,
            lon,
            deg_per_m_north: (1.0 / m).to_degrees(),
            deg_per_m_east: (1.0 / (n * cos_lat)).to_degrees(),
        }
    }

    /// The position `east_m`, `north_m` from the origin, as latitude and longitude (degrees).
    #[inline]
    pub fn to_degrees(&self, east_m: f64, north_m: f64) -> (f64, f64) {
        let lat = self.lat + north_m * self.deg_per_m_north;
        let mut lon = self.lon + east_m * self.deg_per_m_east;
        if lon > 180.0 {
            lon -= 360.0;
        } else if lon < -180.0 {
            lon += 360.0;
        }
        (lat, lon)
    }

    /// The east and north offsets (meters) of `lat`, `lon` from the origin.
    pub fn to_meters(&self, lat: f64, lon: f64) -> (f64, f64) {
        let mut dlon = lon - self.lon;
        if dlon > 180.0 {
            dlon -= 360.0;
        } else if dlon < -180.0 {
            dlon += 360.0;
        }
        (
            dlon / self.deg_per_m_east,
            (lat - self.lat) / self.deg_per_m_north,
        )
    }
}

/// A booth; attendees visiting it stand in a disc around `east_m`, `north_m`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Booth {
    pub id: u32,
    /// Offset east of the venue's center, meters.
    pub east_m: f64,
    /// Offset north of the venue's center, meters.
    pub north_m: f64,
    pub lat: f64,
    pub lon: f64,
    /// Radius of the visitors' crowd disc, meters.
    pub radius_m: f64,
}

/// A talk room: seats on a grid inside a rectangle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TalkRoom {
    pub id: u32,
    /// Offset of the room's south-west corner east of the venue's center, meters.
    pub west_m: f64,
    /// Offset of the room's south-west corner north of the venue's center, meters.
    pub south_m: f64,
    pub width_m: f64,
    pub depth_m: f64,
    /// Latitude of the room's center.
    pub lat: f64,
    /// Longitude of the room's center.
    pub lon: f64,
    pub capacity: u32,
    /// Seat positions (east, north offsets from the venue's center, meters).
    #[serde(skip)]
    seats: Vec<[f64; 2]>,
}

impl TalkRoom {
    /// Seat positions as (east, north) offsets from the venue's center, meters.
    pub fn seats(&self) -> &[[f64; 2]] {
        &self.seats
    }
}

/// One talk slot; every room has a talk in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub start: Micros,
    pub end: Micros,
}

/// A lounge: a coffee point or hallway corner where attendees stand in a loose group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Lounge {
    pub id: u32,
    /// Offset east of the venue's center, meters.
    pub east_m: f64,
    /// Offset north of the venue's center, meters.
    pub north_m: f64,
    pub lat: f64,
    pub lon: f64,
    /// Radius of the group's disc, meters.
    pub radius_m: f64,
}

/// The venue: where booths, rooms and lounges are, and when talks happen.
///
/// The booth hall is in the middle, talk rooms in rows north and south of it; the open area
/// around them (lobbies, hallways) has the lounges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Venue {
    /// The venue's center, the hall's center; with `straddle_zones`, on a border between
    /// `border_zones`.
    pub frame: LocalFrame,
    pub width_m: f64,
    pub height_m: f64,
    /// Size of the booth hall in the middle, meters.
    pub hall_w_m: f64,
    pub hall_h_m: f64,
    pub booths: Vec<Booth>,
    pub rooms: Vec<TalkRoom>,
    pub lounges: Vec<Lounge>,
    pub sessions: Vec<Session>,
    /// The zones west and east of the center, when `straddle_zones` put it on their border.
    pub border_zones: Option<(ZoneId, ZoneId)>,
}

impl Venue {
    /// Lays out the venue for a validated config.
    ///
    /// (Longer than our ~120-line rule on purpose: the layout steps — the frame and a zone
    /// border to straddle, the booths, the talk rooms and their seats, the lounges, the
    /// session timetable — each use the ones before.)
    fn new(config: &ConferenceConfig) -> Result<Self, ConfigError> {
        let mut frame = LocalFrame::new(config.center_lat, config.center_lon);
        let mut border_zones = None;
        if config.straddle_zones {
            let grid = zone_grid(config.zone_resolution);
            if let Some((east_m, west_zone, east_zone)) = find_zone_border(&grid, &frame) {
                let (lat, lon) = frame.to_degrees(east_m, 0.0);
                frame = LocalFrame::new(lat, lon);
                border_zones = Some((west_zone, east_zone));
            }
        }
        let (width_m, height_m) = (config.venue_w_m, config.venue_h_m);
        let block = Block::new(config, width_m);
        let (half_w, half_h) = (width_m / 2.0 - MARGIN_M, height_m / 2.0 - MARGIN_M);
        if block.width_m / 2.0 > half_w {
            return Err(ConfigError {
                field: "venue_w_m",
                reason: format!(
                    "is too small for the booth hall and talk rooms: they need {:.0} m",
                    block.width_m + 2.0 * MARGIN_M
                ),
                value: width_m.to_string(),
            });
        }
        if block.north_m > half_h || -block.south_m > half_h {
            return Err(ConfigError {
                field: "venue_h_m",
                reason: format!(
                    "is too small for the booth hall and talk rooms: they need {:.0} m",
                    2.0 * block.north_m.max(-block.south_m) + 2.0 * MARGIN_M
                ),
                value: height_m.to_string(),
            });
        }
        let spacing = config.booth_spacing_m;
        let booths = (0..config.booths)
            .map(|id| {
                let east_m =
                    -block.hall_w_m / 2.0 + (f64::from(id % block.hall_cols) + 0.5) * spacing;
                let north_m =
                    -block.hall_h_m / 2.0 + (f64::from(id / block.hall_cols) + 0.5) * spacing;
                let (lat, lon) = frame.to_degrees(east_m, north_m);
                Booth {
                    id,
                    east_m,
                    north_m,
                    lat,
                    lon,
                    radius_m: config.booth_radius_m,
                }
            })
            .collect();
        let shape = block.room;
        let rooms = (0..config.talk_rooms)
            .map(|id| {
                // Even rooms north of the hall, odd rooms south, in rows of `per_row`.
                let north = id % 2 == 0;
                let side = id / 2;
                let side_count = if north {
                    config.talk_rooms.div_ceil(2)
                } else {
                    config.talk_rooms / 2
                };
                let (row, col) = (side / block.rooms_per_row, side % block.rooms_per_row);
                let in_row = (side_count - row * block.rooms_per_row).min(block.rooms_per_row);
                let row_w = f64::from(in_row) * (shape.width_m + ROOM_GAP_M) - ROOM_GAP_M;
                let west_m = -row_w / 2.0 + f64::from(col) * (shape.width_m + ROOM_GAP_M);
                let from_hall = block.hall_h_m / 2.0
                    + CORRIDOR_M
                    + f64::from(row) * (shape.depth_m + ROOM_GAP_M);
                let south_m = if north {
                    from_hall
                } else {
                    -from_hall - shape.depth_m
                };
                let seats = (0..config.room_capacity)
                    .map(|s| {
                        [
                            west_m
                                + ROOM_AISLE_M
                                + (f64::from(s % shape.cols) + 0.5) * config.seat_pitch_m,
                            south_m + (f64::from(s / shape.cols) + 0.5) * config.seat_pitch_m,
                        ]
                    })
                    .collect();
                let (lat, lon) =
                    frame.to_degrees(west_m + shape.width_m / 2.0, south_m + shape.depth_m / 2.0);
                TalkRoom {
                    id,
                    west_m,
                    south_m,
                    width_m: shape.width_m,
                    depth_m: shape.depth_m,
                    lat,
                    lon,
                    capacity: config.room_capacity,
                    seats,
                }
            })
            .collect();
        let lounges = place_lounges(config, &block, &frame);
        let mut sessions = Vec::new();
        if config.talk_rooms > 0 {
            let period =
                (i64::from(config.talk_min) + i64::from(config.break_min)) * 60 * MICROS_PER_S;
            let end = config.start + i64::from(config.duration_s) * MICROS_PER_S;
            // The first talk starts a quarter of a break in, so that a short run has talks.
            let mut start = config.start + i64::from(config.break_min) * 15 * MICROS_PER_S;
            while start < end {
                sessions.push(Session {
                    start,
                    end: start + i64::from(config.talk_min) * 60 * MICROS_PER_S,
                });
                start += period;
            }
        }
        Ok(Self {
            frame,
            width_m,
            height_m,
            hall_w_m: block.hall_w_m,
            hall_h_m: block.hall_h_m,
            booths,
            rooms,
            lounges,
            sessions,
            border_zones,
        })
    }

    /// The session an attendee deciding at `t` may still join, with its index.
    fn joinable_session(&self, t: Micros) -> Option<(usize, Session)> {
        let k = self
            .sessions
            .partition_point(|s| s.start + JOIN_AFTER_US < t);
        let s = *self.sessions.get(k)?;
        (t >= s.start - JOIN_BEFORE_US).then_some((k, s))
    }
}

/// Lounges at random spots of the open area, kept apart from the block and from each other as
/// far as the area allows; fewer than asked for if the venue has no open area.
fn place_lounges(config: &ConferenceConfig, block: &Block, frame: &LocalFrame) -> Vec<Lounge> {
    let mut rng = Rng::new(config.seed, 0);
    let r = config.lounge_radius_m;
    let (half_w, half_h) = (
        config.venue_w_m / 2.0 - MARGIN_M / 2.0 - r,
        config.venue_h_m / 2.0 - MARGIN_M / 2.0 - r,
    );
    let clear = r + LOUNGE_CLEARANCE_M;
    let in_block = |e: f64, n: f64| {
        e.abs() < block.width_m / 2.0 + clear
            && n < block.north_m + clear
            && n > block.south_m - clear
    };
    let mut lounges: Vec<Lounge> = Vec::new();
    if half_w <= 0.0 || half_h <= 0.0 {
        return lounges;
    }
    // Apart by the spacing of an even spread over the open area, loosened when crowded.
    let open_area = 4.0 * half_w * half_h
        - (block.width_m + 2.0 * clear) * (block.north_m - block.south_m + 2.0 * clear);
    let mut min_apart = (open_area.max(0.0) / f64::from(config.lounges.max(1))).sqrt() * 0.7;
    let mut misses = 0;
    while (lounges.len() as u32) < config.lounges && min_apart > 0.1 {
        let (e, n) = (rng.range(-half_w, half_w), rng.range(-half_h, half_h));
        let apart = lounges
            .iter()
            .all(|l| (l.east_m - e).hypot(l.north_m - n) >= min_apart);
        if in_block(e, n) || !apart {
            misses += 1;
            if misses > 200 {
                misses = 0;
                min_apart *= 0.8;
            }
            continue;
        }
        let (lat, lon) = frame.to_degrees(e, n);
        lounges.push(Lounge {
            id: lounges.len() as u32,
            east_m: e,
            north_m: n,
            lat,
            lon,
            radius_m: r,
        });
    }
    lounges
}

/// The booth hall and the talk rooms around it, as laid out in a venue `width_m` wide.
#[derive(Debug, Clone, Copy)]
struct Block {
    hall_cols: u32,
    hall_w_m: f64,
    hall_h_m: f64,
    room: RoomShape,
    rooms_per_row: u32,
    /// Width of the hall and the room rows, meters.
    width_m: f64,
    /// Northern and southern edges, meters from the venue's center.
    north_m: f64,
    south_m: f64,
}

impl Block {
    fn new(config: &ConferenceConfig, venue_w_m: f64) -> Self {
        let booths = config.booths.max(1);
        let hall_cols = f64::from(booths).sqrt().ceil() as u32;
        let hall_rows = booths.div_ceil(hall_cols);
        let hall_w_m = f64::from(hall_cols) * config.booth_spacing_m;
        let hall_h_m = f64::from(hall_rows) * config.booth_spacing_m;
        let room = RoomShape::new(config.room_capacity, config.seat_pitch_m);
        let north_rooms = config.talk_rooms.div_ceil(2);
        let usable_w = venue_w_m - 2.0 * MARGIN_M;
        // The epsilon keeps a row that fits exactly in one row.
        let rooms_per_row = (((usable_w + ROOM_GAP_M) / (room.width_m + ROOM_GAP_M) + 1e-9).floor()
            as u32)
            .clamp(1, north_rooms.max(1));
        let rows_north = north_rooms.div_ceil(rooms_per_row);
        let rows_south = (config.talk_rooms / 2).div_ceil(rooms_per_row);
        let strip = |rows: u32| {
            if rows == 0 {
                0.0
            } else {
                CORRIDOR_M + f64::from(rows) * (room.depth_m + ROOM_GAP_M) - ROOM_GAP_M
            }
        };
        let in_row = rooms_per_row.min(north_rooms);
        let rooms_w = if in_row == 0 {
            0.0
        } else {
            f64::from(in_row) * (room.width_m + ROOM_GAP_M) - ROOM_GAP_M
        };
        Self {
            hall_cols,
            hall_w_m,
            hall_h_m,
            room,
            rooms_per_row,
            width_m: hall_w_m.max(rooms_w),
            north_m: hall_h_m / 2.0 + strip(rows_north),
            south_m: -hall_h_m / 2.0 - strip(rows_south),
        }
    }
}

/// The size of a talk room with `capacity` seats, wider than deep as lecture halls are.
#[derive(Debug, Clone, Copy)]
struct RoomShape {
    cols: u32,
    width_m: f64,
    depth_m: f64,
}

impl RoomShape {
    fn new(capacity: u32, pitch_m: f64) -> Self {
        let capacity = capacity.max(1);
        let cols = (f64::from(capacity) * 1.5).sqrt().ceil().max(1.0) as u32;
        let rows = capacity.div_ceil(cols);
        Self {
            cols,
            width_m: f64::from(cols) * pitch_m + 2.0 * ROOM_AISLE_M,
            depth_m: f64::from(rows) * pitch_m + ROOM_STAGE_M,
        }
    }
}

fn zone_grid(zone_resolution: u8) -> ZoneGrid {
    ZoneGrid::new(&EngineParams {
        zone_resolution,
        ..EngineParams::default()
    })
}

/// Walks east from the frame's origin until the home zone changes, then bisects to a
/// centimetre: the offset of the border and the zones west and east of it.
fn find_zone_border(grid: &ZoneGrid, frame: &LocalFrame) -> Option<(f64, ZoneId, ZoneId)> {
    let zone_at = |east_m: f64| {
        let (lat, lon) = frame.to_degrees(east_m, 0.0);
        grid.home_zone(lat, lon)
    };
    let home = zone_at(0.0);
    let (mut lo, mut hi) = (0.0, 1.0);
    while zone_at(hi) == home {
        lo = hi;
        hi *= 2.0;
        // A resolution-0 cell is about 2,000 km across.
        if hi > 4.0e6 {
            return None;
        }
    }
    while hi - lo > 0.01 {
        let mid = (lo + hi) / 2.0;
        if zone_at(mid) == home {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(((lo + hi) / 2.0, home, zone_at(hi)))
}

/// Figures about the events handed out so far; complete once the stream is exhausted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    /// Events handed out, duplicates included.
    pub events: u64,
    /// Of these, second copies of an event.
    pub duplicates: u64,
    /// Distinct persons that reported.
    pub persons: u64,
    /// Distinct home zones of the events (when zone counting is on).
    pub zones_touched: u64,
    /// Events per home zone, most first (when zone counting is on).
    pub zone_events: Vec<(ZoneId, u64)>,
    /// How far, at most, an event's time was behind the latest event time before it, µs.
    pub max_disorder_us: i64,
    /// Earliest and latest event time.
    pub first_recorded_at: Option<Micros>,
    pub last_recorded_at: Option<Micros>,
}

/// A simulated conference: the validated config and the venue laid out for it.
#[derive(Debug, Clone)]
pub struct Simulation {
    config: ConferenceConfig,
    venue: Venue,
}

impl Simulation {
    /// Validates `config` and lays out the venue.
    pub fn new(config: ConferenceConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let venue = Venue::new(&config)?;
        Ok(Self { config, venue })
    }

    /// The config this simulation runs.
    pub fn config(&self) -> &ConferenceConfig {
        &self.config
    }

    /// Booths, rooms, sessions and the venue's position.
    pub fn venue(&self) -> &Venue {
        &self.venue
    }

    /// The attendees' person ids.
    pub fn person_ids(&self) -> std::ops::RangeInclusive<PersonId> {
        self.config.first_person_id..=self.config.person_id(self.config.attendees as usize - 1)
    }

    /// The attendees, with deterministic fake names (see [`names::person`]).
    pub fn persons(&self) -> impl Iterator<Item = Person> + '_ {
        self.person_ids().map(names::person)
    }

    /// About how many events the stream will hold, duplicates included.
    pub fn expected_events(&self) -> u64 {
        let c = &self.config;
        let per_person = f64::from(c.duration_s) / c.report_interval_s;
        (f64::from(c.attendees) * per_person * (1.0 + c.duplicate_rate)).round() as u64
    }

    /// The events in arrival order, generated as they are consumed.
    pub fn events(&self) -> Events {
        Events::new(self.config.clone(), self.venue.clone())
    }
}

/// The events of `config` in arrival order, generated as they are consumed.
pub fn events(config: &ConferenceConfig) -> Result<Events, ConfigError> {
    Ok(Simulation::new(config.clone())?.events())
}

/// All events of `config` in arrival order (for tests and small runs).
pub fn simulate(config: &ConferenceConfig) -> Result<Vec<LocationEvent>, ConfigError> {
    Ok(events(config)?.collect())
}

/// Where an attendee is going and how long it stays there.
#[derive(Debug, Clone, Copy)]
struct Leg {
    from: [f64; 2],
    to: [f64; 2],
    depart: Micros,
    arrive: Micros,
    /// When the attendee leaves `to` again.
    leave: Micros,
}

impl Leg {
    #[inline]
    fn position(&self, t: Micros) -> [f64; 2] {
        if t >= self.arrive {
            return self.to;
        }
        let f = (t - self.depart) as f64 / (self.arrive - self.depart) as f64;
        [
            self.from[0] + f * (self.to[0] - self.from[0]),
            self.from[1] + f * (self.to[1] - self.from[1]),
        ]
    }
}

#[derive(Debug, Clone)]
struct Attendee {
    rng: Rng,
    next_report: Micros,
    speed_mps: f64,
    leg: Leg,
    /// The booth visited last.
    booth: u32,
}

/// The free seats of one room for the session being filled.
#[derive(Debug, Clone, Default)]
struct Seating {
    session: Option<usize>,
    free: Vec<u32>,
}

impl Seating {
    fn take(&mut self, session: usize, capacity: u32, rng: &mut Rng) -> Option<u32> {
        match self.session {
            Some(s) if s == session => {}
            // An earlier session than the one being filled: it is over.
            Some(s) if s > session => return None,
            _ => {
                self.session = Some(session);
                self.free.clear();
                self.free.extend(0..capacity);
            }
        }
        if self.free.is_empty() {
            return None;
        }
        let i = rng.below(self.free.len() as u64) as usize;
        Some(self.free.swap_remove(i))
    }
}

/// The stream of a simulation's events in arrival order; see [`Simulation::events`].
///
/// It generates one second of event time at a time and holds back what has not arrived yet,
/// about `max_disorder_s + 1` seconds of events.
#[derive(Debug)]
pub struct Events {
    config: ConferenceConfig,
    venue: Venue,
    attendees: Vec<Attendee>,
    seating: Vec<Seating>,
    reorder: ReorderBuffer,
    next_slice: i64,
    slices: i64,
    ready: Vec<LocationEvent>,
    pos: usize,
    stats: SimStats,
    duplicates: u64,
    latest_recorded_at: Micros,
    reported: Vec<bool>,
    zones: Option<ZoneCounter>,
}

impl Events {
    fn new(config: ConferenceConfig, venue: Venue) -> Self {
        let start = config.start;
        let interval_us = config.report_interval_s * MICROS_PER_S as f64;
        let dwell_max_us = i64::from(config.dwell_max_s) * MICROS_PER_S;
        let attendees = (0..config.attendees)
            .map(|i| {
                let mut rng = Rng::new(config.seed, u64::from(i) + 1);
                let booth = rng.below(u64::from(config.booths)) as u32;
                let spot = if venue.lounges.is_empty() || rng.chance(config.booth_probability) {
                    let b = &venue.booths[booth as usize];
                    disc_spot(b.east_m, b.north_m, b.radius_m, &mut rng)
                } else {
                    let l = &venue.lounges[rng.below(venue.lounges.len() as u64) as usize];
                    disc_spot(l.east_m, l.north_m, l.radius_m, &mut rng)
                };
                // Mid-visit at the start, so the conference begins in its steady state.
                let leave = start + 1 + rng.below(dwell_max_us as u64) as i64;
                let next_report = start + (rng.unit() * interval_us) as i64;
                let speed_mps =
                    config.walk_speed_mps * rng.range(1.0 - SPEED_SPREAD, 1.0 + SPEED_SPREAD);
                Attendee {
                    rng,
                    next_report,
                    speed_mps,
                    leg: Leg {
                        from: spot,
                        to: spot,
                        depart: start,
                        arrive: start,
                        leave,
                    },
                    booth,
                }
            })
            .collect();
        let slices = (i64::from(config.duration_s) * MICROS_PER_S + SLICE_US - 1) / SLICE_US;
        Self {
            seating: vec![Seating::default(); venue.rooms.len()],
            reorder: ReorderBuffer::new(start),
            next_slice: 0,
            slices,
            ready: Vec::new(),
            pos: 0,
            stats: SimStats::default(),
            duplicates: 0,
            latest_recorded_at: Micros::MIN,
            reported: vec![false; config.attendees as usize],
            zones: None,
            attendees,
            config,
            venue,
        }
    }

    /// Turns counting events per home zone (`SimStats::zone_events`) on or off; off by
    /// default. Exact; cached per square meter of the venue, it costs about 10 % more time.
    pub fn count_zones(mut self, on: bool) -> Self {
        self.zones = on.then(|| ZoneCounter::new(&self.config, &self.venue));
        self
    }

    /// Figures about the events handed out so far (by whole batches).
    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    /// The venue the events come from.
    pub fn venue(&self) -> &Venue {
        &self.venue
    }

    /// The next batch of events in arrival order (all that arrive within one second), or
    /// `None` at the end. Mixing this with `next()` is fine: a batch is what `next()` has not
    /// handed out yet.
    pub fn next_batch(&mut self) -> Option<&[LocationEvent]> {
        if self.pos >= self.ready.len() && !self.refill() {
            return None;
        }
        let batch = &self.ready[self.pos..];
        self.pos = self.ready.len();
        Some(batch)
    }

    /// Makes the next non-empty arrival second ready; false at the end.
    fn refill(&mut self) -> bool {
        loop {
            let bucket = if self.next_slice < self.slices {
                self.generate_slice(self.next_slice);
                self.next_slice += 1;
                self.reorder.pop_front()
            } else {
                match self.reorder.pop_front_if_any() {
                    Some(bucket) => bucket,
                    None => return false,
                }
            };
            let old = std::mem::replace(&mut self.ready, bucket);
            self.reorder.recycle(old);
            self.pos = 0;
            if !self.ready.is_empty() {
                // Ties on arrival time are broken by person and event time; events equal on
                // all three are copies of one event and identical.
                self.ready
                    .sort_unstable_by_key(|e| (e.received_at, e.person_id, e.recorded_at));
                self.account();
                return true;
            }
        }
    }

    /// Generates every report recorded in slice `k` into the reorder buffer.
    fn generate_slice(&mut self, k: i64) {
        let cfg = &self.config;
        let end = cfg.start + i64::from(cfg.duration_s) * MICROS_PER_S;
        let slice_end = (cfg.start + (k + 1) * SLICE_US).min(end);
        let interval_us = cfg.report_interval_s * MICROS_PER_S as f64;
        let max_delay_us = u64::from(cfg.max_disorder_s) * MICROS_PER_S as u64;
        let noise = cfg.gps_noise_m;
        let frame = self.venue.frame;
        for (i, a) in self.attendees.iter_mut().enumerate() {
            while a.next_report < slice_end {
                let t = a.next_report;
                while t >= a.leg.leave {
                    a.leg = next_leg(a, cfg, &self.venue, &mut self.seating);
                }
                let [mut east, mut north] = a.leg.position(t);
                if noise > 0.0 {
                    let (x, y) = a.rng.normal_pair();
                    east += noise * x;
                    north += noise * y;
                }
                let (lat, lon) = frame.to_degrees(east, north);
                let lat = round_half_even(lat * DEGREE_STEPS) / DEGREE_STEPS;
                let lon = round_half_even(lon * DEGREE_STEPS) / DEGREE_STEPS;
                let person_id = cfg.person_id(i);
                let event = LocationEvent {
                    event_id: derived_event_id(person_id, t, lat, lon),
                    person_id,
                    lat,
                    lon,
                    recorded_at: t,
                    received_at: t + a.rng.below(max_delay_us + 1) as i64,
                };
                self.reorder.push(event);
                if a.rng.chance(cfg.duplicate_rate) {
                    self.reorder.push(LocationEvent {
                        received_at: t + a.rng.below(max_delay_us + 1) as i64,
                        ..event
                    });
                    self.duplicates += 1;
                }
                let gap = interval_us * a.rng.range(1.0 - REPORT_JITTER, 1.0 + REPORT_JITTER);
                a.next_report = t + (gap as i64).max(1);
            }
        }
    }

    fn account(&mut self) {
        let stats = &mut self.stats;
        for e in &self.ready {
            stats.events += 1;
            if e.recorded_at > self.latest_recorded_at {
                self.latest_recorded_at = e.recorded_at;
            } else {
                stats.max_disorder_us = stats
                    .max_disorder_us
                    .max(self.latest_recorded_at - e.recorded_at);
            }
            let index = (e.person_id - self.config.first_person_id) as usize;
            if !self.reported[index] {
                self.reported[index] = true;
                stats.persons += 1;
            }
            stats.first_recorded_at = Some(
                stats
                    .first_recorded_at
                    .map_or(e.recorded_at, |t| t.min(e.recorded_at)),
            );
            if let Some(zones) = &mut self.zones {
                let zone = zones.home_zone(e.lat, e.lon);
                match stats.zone_events.iter_mut().find(|(z, _)| *z == zone) {
                    Some((_, n)) => *n += 1,
                    None => stats.zone_events.push((zone, 1)),
                }
            }
        }
        stats.last_recorded_at = Some(self.latest_recorded_at);
        stats.duplicates = self.duplicates;
        stats.zones_touched = stats.zone_events.len() as u64;
        // Most events first, then by zone, so the order is deterministic.
        stats
            .zone_events
            .sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    }
}

impl Iterator for Events {
    type Item = LocationEvent;

    fn next(&mut self) -> Option<LocationEvent> {
        if self.pos >= self.ready.len() && !self.refill() {
            return None;
        }
        let event = self.ready[self.pos];
        self.pos += 1;
        Some(event)
    }
}

/// `x` rounded to the nearest integer, ties to even, for |x| < 2^51: adding and subtracting
/// 1.5 · 2^52 leaves no fraction bits, and IEEE addition rounds to nearest even. Unlike
/// `f64::round` it compiles to two additions on every x86-64 target.
#[inline]
fn round_half_even(x: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    (x + MAGIC) - MAGIC
}

/// The home zones of events as [`ZoneGrid::home_zone`] gives them, but mostly without H3.
///
/// The venue (with a margin for GPS noise) is cut into small squares. A square lies wholly in
/// one zone, whose id it then remembers, if its four corners lie in one fine cell (cells are
/// convex), or if each corner's fine cell and that cell's six neighbours all belong to one zone
/// (any cell meeting a square much smaller than a cell is such a neighbour). Points in other
/// squares, outside the venue, or within a micrometre of a square's edge (where rounding in the
/// projections could matter) are looked up.
#[derive(Debug)]
struct ZoneCounter {
    grid: ZoneGrid,
    frame: LocalFrame,
    west_m: f64,
    south_m: f64,
    side_m: f64,
    cols: usize,
    rows: usize,
    /// Per square: `UNKNOWN`, `MIXED` or the zone (H3 indexes are never 0 or 1).
    squares: Vec<u64>,
    /// The fine cell of each square corner (`cols + 1` per row), or 0 if not computed yet.
    corners: Vec<u64>,
    /// Whether squares are small enough for the neighbour rule.
    neighbour_rule: bool,
    /// Per fine cell: the zone of the cell and its neighbours, if they all share one.
    interior: HashMap<u64, Option<ZoneId>>,
}

impl ZoneCounter {
    const UNKNOWN: u64 = 0;
    const MIXED: u64 = 1;
    const MAX_SIDE_M: f64 = 2.0;
    const MAX_SQUARES: f64 = 4_000_000.0;
    const EDGE_M: f64 = 1e-6;

    fn new(config: &ConferenceConfig, venue: &Venue) -> Self {
        let grid = zone_grid(config.zone_resolution);
        let margin = 10.0 + 6.0 * config.gps_noise_m;
        let (w, h) = (venue.width_m + 2.0 * margin, venue.height_m + 2.0 * margin);
        // Cells at one resolution differ in size; a sixth of the average edge stays well
        // below the distance from a cell to the cells beyond its neighbours.
        let fine_edge_m =
            Resolution::try_from(grid.fine_resolution()).map_or(0.0, Resolution::edge_length_m);
        let wanted = (fine_edge_m / 6.0).min(Self::MAX_SIDE_M);
        let side_m = (w * h / Self::MAX_SQUARES).sqrt().max(wanted).max(0.01);
        let (cols, rows) = ((w / side_m).ceil() as usize, (h / side_m).ceil() as usize);
        Self {
            grid,
            frame: venue.frame,
            west_m: -w / 2.0,
            south_m: -h / 2.0,
            side_m,
            cols,
            rows,
            squares: vec![Self::UNKNOWN; cols * rows],
            corners: vec![0; (cols + 1) * (rows + 1)],
            neighbour_rule: side_m <= fine_edge_m / 6.0,
            interior: HashMap::new(),
        }
    }

    fn home_zone(&mut self, lat: f64, lon: f64) -> ZoneId {
        let (east, north) = self.frame.to_meters(lat, lon);
        let x = (east - self.west_m) / self.side_m;
        let y = (north - self.south_m) / self.side_m;
        let (col, row) = (x.floor(), y.floor());
        let edge = Self::EDGE_M / self.side_m;
        let inside = col >= 0.0
            && row >= 0.0
            && col < self.cols as f64
            && row < self.rows as f64
            && (edge..1.0 - edge).contains(&(x - col))
            && (edge..1.0 - edge).contains(&(y - row));
        if !inside {
            return self.grid.home_zone(lat, lon);
        }
        let (col, row) = (col as usize, row as usize);
        let index = row * self.cols + col;
        if self.squares[index] == Self::UNKNOWN {
            self.squares[index] = self.square_zone(col, row).unwrap_or(Self::MIXED);
        }
        match self.squares[index] {
            Self::MIXED => self.grid.home_zone(lat, lon),
            zone => zone,
        }
    }

    /// The zone of every point of square (`col`, `row`), if the rules above prove there is one.
    fn square_zone(&mut self, col: usize, row: usize) -> Option<ZoneId> {
        let cells =
            [(0, 0), (1, 0), (0, 1), (1, 1)].map(|(dc, dr)| self.corner(col + dc, row + dr));
        if cells.iter().all(|&c| c == cells[0]) {
            return Some(self.grid.zone_of(cells[0]));
        }
        if !self.neighbour_rule {
            return None;
        }
        let zone = self.interior_zone(cells[0])?;
        cells[1..]
            .iter()
            .all(|&c| self.interior_zone(c) == Some(zone))
            .then_some(zone)
    }

    /// The zone of `cell` if its neighbours all share it.
    fn interior_zone(&mut self, cell: u64) -> Option<ZoneId> {
        let grid = &self.grid;
        *self.interior.entry(cell).or_insert_with(|| {
            let zone = grid.zone_of(cell);
            let index = CellIndex::try_from(cell).ok()?;
            let disk: Vec<CellIndex> = index.grid_disk(1);
            disk.iter()
                .all(|&n| grid.zone_of(u64::from(n)) == zone)
                .then_some(zone)
        })
    }

    /// The fine cell of grid corner (`col`, `row`).
    fn corner(&mut self, col: usize, row: usize) -> u64 {
        let index = row * (self.cols + 1) + col;
        if self.corners[index] == 0 {
            let (lat, lon) = self.frame.to_degrees(
                self.west_m + col as f64 * self.side_m,
                self.south_m + row as f64 * self.side_m,
            );
            self.corners[index] = self.grid.fine_cell(lat, lon);
        }
        self.corners[index]
    }
}

/// A uniform random spot in the disc of radius `radius_m` around `east_m`, `north_m`.
fn disc_spot(east_m: f64, north_m: f64, radius_m: f64, rng: &mut Rng) -> [f64; 2] {
    let r = radius_m * rng.unit().sqrt();
    let (s, c) = (std::f64::consts::TAU * rng.unit()).sin_cos();
    [east_m + r * c, north_m + r * s]
}

/// What attendee `a` does once it leaves its current place at `a.leg.leave`: a talk that is
/// about to start (sometimes, if a seat is free), else another booth.
fn next_leg(
    a: &mut Attendee,
    cfg: &ConferenceConfig,
    venue: &Venue,
    seating: &mut [Seating],
) -> Leg {
    let t0 = a.leg.leave;
    let from = a.leg.to;
    let walk = |to: [f64; 2], speed_mps: f64| {
        let d = (to[0] - from[0]).hypot(to[1] - from[1]);
        ((d / speed_mps) * MICROS_PER_S as f64).round() as i64
    };
    if let Some((k, session)) = venue.joinable_session(t0) {
        if a.rng.chance(cfg.talk_probability) {
            // Rooms are tried from a random one on; a full room sends the attendee on.
            let rooms = venue.rooms.len();
            let first = a.rng.below(rooms as u64) as usize;
            for r in (0..rooms).map(|j| (first + j) % rooms) {
                let room = &venue.rooms[r];
                if let Some(seat) = seating[r].take(k, room.capacity, &mut a.rng) {
                    let to = room.seats[seat as usize];
                    let arrive = t0 + walk(to, a.speed_mps);
                    if arrive > session.end - MIN_TALK_LEFT_US {
                        seating[r].free.push(seat);
                        break;
                    }
                    let leave =
                        session.end.max(arrive) + 1 + a.rng.below(LEAVE_SPREAD_US as u64) as i64;
                    return Leg {
                        from,
                        to,
                        depart: t0,
                        arrive,
                        leave,
                    };
                }
            }
        }
    }
    let to = if venue.lounges.is_empty() || a.rng.chance(cfg.booth_probability) {
        // Another booth than the last one.
        let booths = venue.booths.len() as u64;
        let mut booth = a.rng.below(booths.saturating_sub(1).max(1)) as u32;
        if booths > 1 && booth >= a.booth {
            booth += 1;
        }
        a.booth = booth;
        let b = &venue.booths[booth as usize];
        disc_spot(b.east_m, b.north_m, b.radius_m, &mut a.rng)
    } else {
        let l = &venue.lounges[a.rng.below(venue.lounges.len() as u64) as usize];
        disc_spot(l.east_m, l.north_m, l.radius_m, &mut a.rng)
    };
    let arrive = t0 + walk(to, a.speed_mps);
    let dwell_s = a
        .rng
        .range(f64::from(cfg.dwell_min_s), f64::from(cfg.dwell_max_s));
    Leg {
        from,
        to,
        depart: t0,
        arrive,
        leave: arrive + ((dwell_s * MICROS_PER_S as f64) as i64).max(1),
    }
}

/// Events bucketed by arrival second; a bucket is complete once every event recorded before
/// its end has been generated.
#[derive(Debug)]
struct ReorderBuffer {
    start: Micros,
    /// Arrival second of `buckets[0]`, counted from `start`.
    first: i64,
    buckets: VecDeque<Vec<LocationEvent>>,
    spare: Vec<Vec<LocationEvent>>,
}

impl ReorderBuffer {
    fn new(start: Micros) -> Self {
        Self {
            start,
            first: 0,
            buckets: VecDeque::new(),
            spare: Vec::new(),
        }
    }

    #[inline]
    fn push(&mut self, event: LocationEvent) {
        let second = (event.received_at - self.start).div_euclid(SLICE_US);
        // Arrival is never before recording, and slices are generated in order.
        debug_assert!(second >= self.first);
        let index = (second - self.first) as usize;
        while self.buckets.len() <= index {
            let bucket = self.spare.pop().unwrap_or_default();
            self.buckets.push_back(bucket);
        }
        self.buckets[index].push(event);
    }

    /// The bucket of the current arrival second (empty if nothing arrives in it).
    fn pop_front(&mut self) -> Vec<LocationEvent> {
        self.first += 1;
        self.buckets.pop_front().unwrap_or_default()
    }

    /// Like `pop_front` once no more events come; `None` when nothing is left.
    fn pop_front_if_any(&mut self) -> Option<Vec<LocationEvent>> {
        let bucket = self.buckets.pop_front()?;
        self.first += 1;
        Some(bucket)
    }

    fn recycle(&mut self, mut bucket: Vec<LocationEvent>) {
        bucket.clear();
        if bucket.capacity() > 0 {
            self.spare.push(bucket);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use udaconnect_actors::geo::distance_m;

    use super::*;

    /// A short conference: 500 attendees for 10 minutes (about 20,000 events).
    fn small() -> ConferenceConfig {
        ConferenceConfig {
            duration_s: 600,
            ..ConferenceConfig::for_attendees(500)
        }
    }

    #[test]
    fn same_seed_same_events_other_seed_other_events() {
        let config = ConferenceConfig {
            duration_s: 300,
            ..ConferenceConfig::for_attendees(300)
        };
        let a = simulate(&config).unwrap();
        let b = simulate(&config).unwrap();
        assert!(a.len() > 5_000, "{}", a.len());
        assert_eq!(a, b);
        // Batches, single events and zone counting all see the same stream.
        let mut events = events(&config).unwrap().count_zones(true);
        let mut batched = Vec::new();
        while let Some(batch) = events.next_batch() {
            batched.extend_from_slice(batch);
        }
        assert_eq!(a, batched);
        let other = simulate(&ConferenceConfig {
            seed: config.seed + 1,
            ..config
        })
        .unwrap();
        assert_ne!(a, other);
        let common = a.iter().filter(|e| other.contains(e)).count();
        assert!(common < a.len() / 100, "{common} events in common");
    }

    /// Pins the output of one config, so that a change to the generator that changes what a
    /// seed means is deliberate: update the figures then, and say so in the change.
    #[test]
    fn output_of_a_seed_is_pinned() {
        let config = ConferenceConfig {
            duration_s: 120,
            ..ConferenceConfig::for_attendees(100)
        };
        let events = simulate(&config).unwrap();
        let fingerprint = events.iter().fold(0u64, |h, e| {
            (h ^ e.event_id.as_u64_pair().0 ^ e.received_at as u64).wrapping_mul(0x100_0000_01B3)
        });
        let first = events[0];
        assert_eq!(
            (
                events.len(),
                first.person_id,
                first.lat,
                first.lon,
                first.recorded_at
            ),
            (PINNED.0, PINNED.1, PINNED.2, PINNED.3, PINNED.4)
        );
        assert_eq!(fingerprint, PINNED.5);
    }

    const PINNED: (usize, PersonId, f64, f64, Micros, u64) = (
        810,
        59,
        35.0839838,
        -106.6439405,
        1_773_133_201_335_718,
        15_566_720_308_060_108_776,
    );

    #[test]
    fn arrival_is_never_more_than_max_disorder_behind() {
        for max_disorder_s in [20, 3, 0] {
            let config = ConferenceConfig {
                max_disorder_s,
                ..small()
            };
            let bound = i64::from(max_disorder_s) * MICROS_PER_S;
            let mut events = events(&config).unwrap();
            let (mut latest, mut latest_received, mut worst) = (config.start, config.start, 0);
            let mut n = 0;
            while let Some(e) = events.next() {
                n += 1;
                assert!(
                    e.recorded_at >= latest.saturating_sub(bound),
                    "{e:?} after {latest}"
                );
                worst = worst.max(latest - e.recorded_at);
                latest = latest.max(e.recorded_at);
                assert!(e.received_at >= latest_received, "arrival order");
                latest_received = e.received_at;
                assert!(
                    (0..=bound).contains(&(e.received_at - e.recorded_at)),
                    "{e:?}"
                );
                assert!(
                    events.reorder.buckets.len() <= max_disorder_s as usize + 2,
                    "the reorder buffer holds more than the disorder bound"
                );
            }
            assert!(n > 15_000, "{n}");
            assert_eq!(events.stats().max_disorder_us, worst);
            assert_eq!(events.stats().events, n);
            // The bound is not just respected but used: the engine should see the worst case.
            if max_disorder_s > 0 {
                assert!(
                    worst > bound * 9 / 10,
                    "worst disorder {worst} µs of {bound}"
                );
            } else {
                assert_eq!(worst, 0);
            }
        }
    }

    #[test]
    fn duplicates_are_copies_at_the_configured_rate() {
        let config = small();
        let mut events = events(&config).unwrap();
        let all: Vec<LocationEvent> = events.by_ref().collect();
        let mut by_id: HashMap<uuid::Uuid, Vec<LocationEvent>> = HashMap::new();
        for e in &all {
            by_id.entry(e.event_id).or_default().push(*e);
        }
        let copies = all.len() - by_id.len();
        let rate = copies as f64 / by_id.len() as f64;
        assert!((rate - 0.02).abs() < 0.004, "duplicate rate {rate}");
        assert_eq!(events.stats().duplicates, copies as u64);
        for group in by_id.values() {
            assert!(group.len() <= 2);
            let (a, b) = (group[0], group[group.len() - 1]);
            // A copy is the same event, received again (at its own time).
            assert_eq!(
                (a.person_id, a.lat, a.lon, a.recorded_at),
                (b.person_id, b.lat, b.lon, b.recorded_at)
            );
            assert_eq!(
                a.event_id,
                derived_event_id(a.person_id, a.recorded_at, a.lat, a.lon)
            );
        }
        // One person never reports twice at the same instant.
        let mut times: Vec<(PersonId, Micros)> = by_id
            .values()
            .map(|g| (g[0].person_id, g[0].recorded_at))
            .collect();
        let n = times.len();
        times.sort_unstable();
        times.dedup();
        assert_eq!(times.len(), n);
        let none = simulate(&ConferenceConfig {
            duplicate_rate: 0.0,
            ..small()
        })
        .unwrap();
        let ids: std::collections::HashSet<_> = none.iter().map(|e| e.event_id).collect();
        assert_eq!(ids.len(), none.len());
    }

    #[test]
    fn the_venue_straddles_two_zones() {
        let config = ConferenceConfig {
            duration_s: 600,
            ..ConferenceConfig::default()
        };
        let grid = zone_grid(config.zone_resolution);
        let mut events = events(&config).unwrap().count_zones(true);
        let mut counts: HashMap<ZoneId, u64> = HashMap::new();
        let mut n = 0u64;
        for e in events.by_ref() {
            *counts.entry(grid.home_zone(e.lat, e.lon)).or_default() += 1;
            n += 1;
        }
        let mut by_count: Vec<(ZoneId, u64)> = counts.into_iter().collect();
        by_count.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        assert!(by_count.len() >= 2, "{by_count:?}");
        assert!(by_count[1].1 * 10 >= n, "{by_count:?} of {n}");
        // The cached zone counting agrees with H3 event by event.
        assert_eq!(events.stats().zone_events, by_count);
        assert_eq!(events.stats().zones_touched, by_count.len() as u64);
        let venue = events.venue();
        let (west, east) = venue.border_zones.unwrap();
        assert_ne!(west, east);
        let (lat, lon) = venue.frame.to_degrees(-0.05, 0.0);
        assert_eq!(grid.home_zone(lat, lon), west);
        let (lat, lon) = venue.frame.to_degrees(0.05, 0.0);
        assert_eq!(grid.home_zone(lat, lon), east);
        // Moved east only, by less than a zone's width.
        assert_eq!(venue.frame.lat, config.center_lat);
        let moved = distance_m(
            config.center_lat,
            config.center_lon,
            venue.frame.lat,
            venue.frame.lon,
        );
        assert!(moved < 1_000.0, "{moved}");
        // Without straddling, the venue stays where it was put.
        let fixed = Simulation::new(ConferenceConfig {
            straddle_zones: false,
            ..config.clone()
        })
        .unwrap();
        assert_eq!(
            (fixed.venue().frame.lat, fixed.venue().frame.lon),
            (config.center_lat, config.center_lon)
        );
        assert_eq!(fixed.venue().border_zones, None);
    }

    #[test]
    fn zone_counting_matches_h3_near_a_border() {
        let config = ConferenceConfig::default();
        let sim = Simulation::new(config.clone()).unwrap();
        let mut counter = ZoneCounter::new(&config, sim.venue());
        let grid = zone_grid(config.zone_resolution);
        let mut rng = Rng::new(5, 5);
        let mut zones = std::collections::HashSet::new();
        for _ in 0..50_000 {
            // Dense near the border and across the whole venue, some outside it.
            let spread = if rng.chance(0.5) { 2.0 } else { 150.0 };
            let (lat, lon) = sim
                .venue()
                .frame
                .to_degrees(rng.range(-spread, spread), rng.range(-spread, spread));
            let zone = counter.home_zone(lat, lon);
            assert_eq!(zone, grid.home_zone(lat, lon), "{lat} {lon}");
            zones.insert(zone);
        }
        assert!(zones.len() >= 2);
    }

    #[test]
    fn each_person_reports_at_the_configured_interval() {
        for report_interval_s in [15.0, 4.0] {
            let config = ConferenceConfig {
                report_interval_s,
                duplicate_rate: 0.0,
                ..small()
            };
            let mut times: HashMap<PersonId, Vec<Micros>> = HashMap::new();
            for e in simulate(&config).unwrap() {
                times.entry(e.person_id).or_default().push(e.recorded_at);
            }
            assert_eq!(times.len(), 500);
            let interval_us = report_interval_s * MICROS_PER_S as f64;
            for (person, mut t) in times {
                t.sort_unstable();
                let mut gaps: Vec<i64> = t.windows(2).map(|w| w[1] - w[0]).collect();
                gaps.sort_unstable();
                let median = gaps[gaps.len() / 2] as f64;
                assert!(
                    (median / interval_us - 1.0).abs() <= 0.25,
                    "person {person}: median gap {median} µs"
                );
                // The first report comes within one interval of the start.
                assert!(t[0] - config.start < interval_us as i64 + 1);
            }
        }
    }

    #[test]
    fn crowds_are_realistic() {
        // Brute force over candidate pairs: events bucketed by 5 m squares and minutes, every
        // pair in neighbouring buckets measured with the geodesic.
        let config = small();
        let sim = Simulation::new(config.clone()).unwrap();
        let mut seen = std::collections::HashSet::new();
        let events: Vec<LocationEvent> = sim.events().filter(|e| seen.insert(e.event_id)).collect();
        let frame = sim.venue().frame;
        let key = |e: &LocationEvent| {
            let (east, north) = frame.to_meters(e.lat, e.lon);
            (
                (east / 5.0).floor() as i64,
                (north / 5.0).floor() as i64,
                (e.recorded_at - config.start).div_euclid(60 * MICROS_PER_S),
            )
        };
        let mut buckets: HashMap<(i64, i64, i64), Vec<usize>> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            buckets.entry(key(e)).or_default().push(i);
        }
        let mut marked = vec![usize::MAX; config.attendees as usize];
        let mut total = 0u64;
        for (i, a) in events.iter().enumerate() {
            let (x, y, t) = key(a);
            for dx in -1..=1 {
                for dy in -1..=1 {
                    for dt in -1..=1 {
                        let Some(bucket) = buckets.get(&(x + dx, y + dy, t + dt)) else {
                            continue;
                        };
                        for &j in bucket {
                            let b = &events[j];
                            let peer = (b.person_id - config.first_person_id) as usize;
                            if b.person_id != a.person_id
                                && marked[peer] != i
                                && (a.recorded_at - b.recorded_at).abs() <= 60 * MICROS_PER_S
                                && distance_m(a.lat, a.lon, b.lat, b.lon) <= 5.0
                            {
                                marked[peer] = i;
                                total += 1;
                            }
                        }
                    }
                }
            }
        }
        let density = total as f64 / events.len() as f64;
        println!(
            "{} events: on average {density:.1} other persons within 5 m and 60 s",
            events.len()
        );
        assert!((5.0..45.0).contains(&density), "{density}");
    }

    #[test]
    fn attendees_stand_at_booths_sit_in_talks_and_walk_between() {
        // Without GPS noise, every position is exactly where the model put the attendee.
        let config = ConferenceConfig {
            gps_noise_m: 0.0,
            duplicate_rate: 0.0,
            duration_s: 1_800,
            ..ConferenceConfig::for_attendees(1_000)
        };
        let sim = Simulation::new(config.clone()).unwrap();
        let venue = sim.venue();
        let session = venue.sessions[0];
        let room = &venue.rooms[0];
        let (mut at_booth, mut at_lounge, mut seated, mut other) = (0, 0, 0, 0);
        let mut seats_mid_talk: HashMap<usize, PersonId> = HashMap::new();
        let mid = (session.start + session.end) / 2;
        for e in sim.events() {
            let (east, north) = venue.frame.to_meters(e.lat, e.lon);
            // 1e-7 degrees of rounding is at most 6 mm.
            if venue
                .booths
                .iter()
                .any(|b| (east - b.east_m).hypot(north - b.north_m) <= b.radius_m + 0.01)
            {
                at_booth += 1;
            } else if venue
                .lounges
                .iter()
                .any(|l| (east - l.east_m).hypot(north - l.north_m) <= l.radius_m + 0.01)
            {
                at_lounge += 1;
            } else if let Some(seat) = room
                .seats()
                .iter()
                .position(|s| (east - s[0]).hypot(north - s[1]) <= 0.01)
            {
                seated += 1;
                assert!(
                    e.recorded_at > session.start - JOIN_BEFORE_US,
                    "seated before the talk"
                );
                if (e.recorded_at - mid).abs() < 10 * MICROS_PER_S {
                    let previous = seats_mid_talk.insert(seat, e.person_id);
                    assert!(
                        previous.is_none_or(|p| p == e.person_id),
                        "two on seat {seat}"
                    );
                }
            } else {
                other += 1;
                assert!(
                    east.abs() <= venue.width_m / 2.0 && north.abs() <= venue.height_m / 2.0,
                    "walking outside the venue"
                );
            }
        }
        let n = f64::from(at_booth + at_lounge + seated + other);
        let shares = [at_booth, at_lounge, seated, other].map(|k| f64::from(k) / n);
        assert!(shares[0] > 0.15 && shares[1] > 0.15, "{shares:?}");
        assert!(shares[2] > 0.03 && shares[3] > 0.03, "{shares:?}");
        let in_talk = seats_mid_talk.len();
        assert!(
            in_talk > 100 && in_talk <= room.capacity as usize,
            "{in_talk}"
        );
    }

    #[test]
    fn the_default_venue_fits_its_booths_and_rooms() {
        let one_big_room = ConferenceConfig {
            room_capacity: 5_000,
            ..ConferenceConfig::for_attendees(2_000)
        };
        let mut refitted = one_big_room.clone();
        refitted.fit_venue();
        let configs = [1, 500, 2_000, 20_000, 100_000]
            .map(ConferenceConfig::for_attendees)
            .into_iter()
            .chain([refitted]);
        for config in configs {
            let attendees = config.attendees;
            let sim = Simulation::new(config.clone()).unwrap();
            let v = sim.venue();
            assert_eq!(v.booths.len() as u32, config.booths.max(1));
            assert_eq!(v.rooms.len() as u32, config.talk_rooms);
            let (half_w, half_h) = (v.width_m / 2.0, v.height_m / 2.0);
            let mut spacing = f64::INFINITY;
            for (i, a) in v.booths.iter().enumerate() {
                assert!(
                    a.east_m.abs() + a.radius_m < half_w && a.north_m.abs() + a.radius_m < half_h
                );
                for b in &v.booths[i + 1..] {
                    spacing = spacing.min((a.east_m - b.east_m).hypot(a.north_m - b.north_m));
                }
            }
            if attendees > 40 {
                assert_eq!(spacing, config.booth_spacing_m);
            }
            assert_eq!(v.lounges.len() as u32, config.lounges);
            for l in &v.lounges {
                assert!(
                    l.east_m.abs() + l.radius_m < half_w && l.north_m.abs() + l.radius_m < half_h
                );
                let clear = l.radius_m + LOUNGE_CLEARANCE_M;
                for b in &v.booths {
                    assert!((l.east_m - b.east_m).hypot(l.north_m - b.north_m) > clear);
                }
                for r in &v.rooms {
                    let inside = l.east_m > r.west_m - clear
                        && l.east_m < r.west_m + r.width_m + clear
                        && l.north_m > r.south_m - clear
                        && l.north_m < r.south_m + r.depth_m + clear;
                    assert!(!inside, "lounge {} in room {}", l.id, r.id);
                }
            }
            for (i, r) in v.rooms.iter().enumerate() {
                assert_eq!(r.seats().len() as u32, r.capacity);
                assert!(r.west_m >= -half_w && r.west_m + r.width_m <= half_w);
                assert!(r.south_m >= -half_h && r.south_m + r.depth_m <= half_h);
                // Rooms lie outside the hall and apart from each other.
                assert!(
                    r.south_m >= v.hall_h_m / 2.0 || r.south_m + r.depth_m <= -v.hall_h_m / 2.0
                );
                for q in &v.rooms[i + 1..] {
                    let apart = r.west_m + r.width_m <= q.west_m
                        || q.west_m + q.width_m <= r.west_m
                        || r.south_m + r.depth_m <= q.south_m
                        || q.south_m + q.depth_m <= r.south_m;
                    assert!(apart, "rooms {} and {} overlap", r.id, q.id);
                }
                for s in r.seats() {
                    assert!(s[0] > r.west_m && s[0] < r.west_m + r.width_m);
                    assert!(s[1] > r.south_m && s[1] < r.south_m + r.depth_m);
                }
            }
            let seats = u64::from(config.talk_rooms) * u64::from(config.room_capacity);
            assert!(seats * 10 >= u64::from(attendees) || attendees < 2_000);
        }
        let big = ConferenceConfig::for_attendees(20_000);
        assert_eq!((big.booths, big.talk_rooms), (500, 10));
        assert_eq!((big.venue_w_m, big.venue_h_m), (849.0, 849.0));
        assert_eq!(ConferenceConfig::for_attendees(500).venue_w_m, 150.0);
    }

    #[test]
    fn bad_configs_are_named() {
        let cases: [(ConferenceConfig, &str); 8] = [
            (
                ConferenceConfig {
                    attendees: 0,
                    ..small()
                },
                "attendees",
            ),
            (
                ConferenceConfig {
                    duration_s: 0,
                    ..small()
                },
                "duration_s",
            ),
            (
                ConferenceConfig {
                    duplicate_rate: 1.5,
                    ..small()
                },
                "duplicate_rate",
            ),
            (
                ConferenceConfig {
                    report_interval_s: f64::NAN,
                    ..small()
                },
                "report_interval_s",
            ),
            (
                ConferenceConfig {
                    center_lat: 89.0,
                    ..small()
                },
                "center_lat",
            ),
            (
                ConferenceConfig {
                    first_person_id: i64::MAX,
                    ..small()
                },
                "first_person_id",
            ),
            (
                ConferenceConfig {
                    booths: 5_000,
                    ..small()
                },
                "venue_w_m",
            ),
            (
                ConferenceConfig {
                    venue_h_m: 60.0,
                    ..small()
                },
                "venue_h_m",
            ),
        ];
        for (config, field) in cases {
            let err = Simulation::new(config).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().starts_with(field));
        }
        assert!(small().warnings().is_empty());
        let late = ConferenceConfig {
            max_disorder_s: 45,
            ..small()
        };
        assert!(Simulation::new(late.clone()).is_ok());
        assert!(
            late.warnings()[0].contains("lateness_s"),
            "{:?}",
            late.warnings()
        );
        // A config round-trips through JSON, and missing fields take the defaults.
        let json = serde_json::to_string(&small()).unwrap();
        assert_eq!(
            serde_json::from_str::<ConferenceConfig>(&json).unwrap(),
            small()
        );
        let partial: ConferenceConfig = serde_json::from_str(r#"{"seed": 3}"#).unwrap();
        assert_eq!(
            partial,
            ConferenceConfig {
                seed: 3,
                ..ConferenceConfig::default()
            }
        );
    }

    #[test]
    fn local_frame_round_trips_and_matches_the_geodesic() {
        let frame = LocalFrame::new(35.0845, -106.6511);
        let (lat, lon) = frame.to_degrees(300.0, -400.0);
        let (east, north) = frame.to_meters(lat, lon);
        assert!((east - 300.0).abs() < 1e-6 && (north + 400.0).abs() < 1e-6);
        let d = distance_m(frame.lat, frame.lon, lat, lon);
        assert!((d - 500.0).abs() < 0.05, "{d}");
        let (lat, _) = frame.to_degrees(0.0, 100.0);
        assert!((distance_m(frame.lat, frame.lon, lat, frame.lon) - 100.0).abs() < 0.001);
        let wrap = LocalFrame::new(0.0, 179.9999);
        assert!(wrap.to_degrees(100.0, 0.0).1 < -179.0);
        assert!(
            (wrap
                .to_meters(wrap.to_degrees(100.0, 0.0).0, wrap.to_degrees(100.0, 0.0).1)
                .0
                - 100.0)
                .abs()
                < 1e-6
        );
    }
}

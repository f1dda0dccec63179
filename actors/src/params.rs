//! Engine parameters: what counts as a co-location and how episodes are cut (docs/design.md §1).

use serde::{Deserialize, Serialize};

/// The largest radius the hot-path distance is specified for (docs/design.md §1: < 1 mm up to 1
/// km).
pub const MAX_RADIUS_M: f64 = 1_000.0;

/// Tunables of co-location detection, with the defaults of docs/design.md §1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EngineParams {
    /// Two events are co-located when their geodesic distance is at most this many meters.
    pub radius_m: f64,
    /// ... and their event times differ by at most this many seconds.
    pub window_s: u32,
    /// How late (in event time) an event may arrive and still be matched in real time.
    pub lateness_s: u32,
    /// An episode ends when no co-location with the peer came for this many seconds.
    pub episode_gap_s: u32,
    /// H3 resolution of a zone, the shard key of the zone stage (8 is about a venue, 0.7 km²).
    pub zone_resolution: u8,
    /// How far ahead of its receive time (the ingest's clock, which we trust) a report may
    /// move event time, seconds: a device whose clock runs fast cannot push the watermarks,
    /// and with them everyone else's reports, further than this.
    #[serde(default = "default_clock_skew_s")]
    pub clock_skew_s: u32,
    /// How old a report may be when it arrives, seconds before its receive time: older ones
    /// are refused (naming `recorded_at`); younger ones that are later than `lateness_s` take
    /// the late path, and the person stage keeps closed episodes this long (in event time) so
    /// that late co-locations can still reshape them.
    #[serde(default = "default_late_horizon_s")]
    pub late_horizon_s: u32,
}

fn default_clock_skew_s() -> u32 {
    5
}

fn default_late_horizon_s() -> u32 {
    86_400
}

impl Default for EngineParams {
    fn default() -> Self {
        Self {
            radius_m: 5.0,
            window_s: 60,
            lateness_s: 30,
            episode_gap_s: 600,
            zone_resolution: 8,
            clock_skew_s: default_clock_skew_s(),
            late_horizon_s: default_late_horizon_s(),
        }
    }
}

/// `recorded_at`, but no later than `received_at + skew_us` (all µs since the Unix epoch): the
/// time a report may move event time to (see [`EngineParams::clock_skew_s`]).
pub fn trusted_time(
    recorded_at: crate::domain::Micros,
    received_at: crate::domain::Micros,
    skew_us: crate::domain::Micros,
) -> crate::domain::Micros {
    recorded_at.min(received_at.saturating_add(skew_us))
}

/// A parameter outside its allowed range; names the parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {reason} (got {value})")]
pub struct ParamsError {
    /// The parameter's name, as in the configuration.
    pub field: &'static str,
    /// What the value must be.
    pub reason: &'static str,
    /// The rejected value, as text.
    pub value: String,
}

impl EngineParams {
    /// How far event time must move past an event before nothing about it can change: its
    /// co-location window, the allowed lateness and the gap that ends an episode, plus a
    /// second. Advancing past the last event by this closes every episode.
    pub fn settle_us(&self) -> crate::domain::Micros {
        i64::from(self.episode_gap_s + self.lateness_s + self.window_s + 1)
            * crate::domain::MICROS_PER_S
    }

    /// The event time a report may move the clocks to: its `recorded_at`, but no further than
    /// its `received_at` plus [`EngineParams::clock_skew_s`] (µs since the Unix epoch).
    pub fn trusted_time(
        &self,
        recorded_at: crate::domain::Micros,
        received_at: crate::domain::Micros,
    ) -> crate::domain::Micros {
        trusted_time(
            recorded_at,
            received_at,
            i64::from(self.clock_skew_s) * crate::domain::MICROS_PER_S,
        )
    }

    /// How long (event time, µs) the person stage keeps an episode after it closed: a late
    /// co-location is at most `late_horizon_s` (plus the clock skew) older than the receive
    /// time, which the minimum watermark never passes, and it can reach an episode whose last
    /// co-location is up to `episode_gap_s` earlier.
    pub fn closed_retention_us(&self) -> crate::domain::Micros {
        (i64::from(self.late_horizon_s)
            + i64::from(self.episode_gap_s)
            + i64::from(self.clock_skew_s)
            + i64::from(self.window_s))
            * crate::domain::MICROS_PER_S
    }

    /// Checks every parameter and names the first one out of range.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if !(self.radius_m.is_finite() && self.radius_m > 0.0 && self.radius_m <= MAX_RADIUS_M) {
            return Err(ParamsError {
                field: "radius_m",
                reason: "must be greater than 0 and at most 1000 meters",
                value: self.radius_m.to_string(),
            });
        }
        if self.zone_resolution > 15 {
            return Err(ParamsError {
                field: "zone_resolution",
                reason: "must be an H3 resolution from 0 to 15",
                value: self.zone_resolution.to_string(),
            });
        }
        let positive = [
            ("window_s", self.window_s),
            ("episode_gap_s", self.episode_gap_s),
            ("late_horizon_s", self.late_horizon_s),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ParamsError {
                    field,
                    reason: "must be at least 1 second",
                    value: value.to_string(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_design_defaults_and_valid() {
        let p = EngineParams::default();
        assert_eq!(
            (p.radius_m, p.window_s, p.lateness_s, p.episode_gap_s),
            (5.0, 60, 30, 600)
        );
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        let bad_radius = EngineParams {
            radius_m: 0.0,
            ..EngineParams::default()
        };
        assert_eq!(bad_radius.validate().unwrap_err().field, "radius_m");
        let huge_radius = EngineParams {
            radius_m: 1_000.5,
            ..EngineParams::default()
        };
        assert_eq!(huge_radius.validate().unwrap_err().field, "radius_m");
        let nan_radius = EngineParams {
            radius_m: f64::NAN,
            ..EngineParams::default()
        };
        assert_eq!(nan_radius.validate().unwrap_err().field, "radius_m");
        let no_window = EngineParams {
            window_s: 0,
            ..EngineParams::default()
        };
        let err = no_window.validate().unwrap_err();
        assert_eq!(err.field, "window_s");
        assert_eq!(
            err.to_string(),
            "window_s must be at least 1 second (got 0)"
        );
        let no_gap = EngineParams {
            episode_gap_s: 0,
            ..EngineParams::default()
        };
        assert_eq!(no_gap.validate().unwrap_err().field, "episode_gap_s");
        let bad_res = EngineParams {
            zone_resolution: 16,
            ..EngineParams::default()
        };
        assert_eq!(bad_res.validate().unwrap_err().field, "zone_resolution");
    }
}

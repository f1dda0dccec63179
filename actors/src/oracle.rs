//! The brute-force reference: every pair of events within the radius and the window, then
//! episodes per (person, peer) by sorting times. Quadratic; for tests only.

use std::collections::BTreeMap;

use rustc_hash::FxHashSet;

use crate::domain::{ColocationReport, Episode, LocationEvent, Micros, PersonId, MICROS_PER_S};
use crate::geo::Ecef;
use crate::params::EngineParams;

/// What the oracle derives from a set of events.
#[derive(Debug, Clone, PartialEq)]
pub struct OracleResult {
    /// Every co-location once per person, sorted by (person, own_event, peer_event).
    pub colocations: Vec<ColocationReport>,
    /// Every episode, closed, sorted by (person, peer, started_at).
    pub episodes: Vec<Episode>,
}

/// Co-locations and episodes of `events` (repeated event ids count once).
pub fn oracle(events: &[LocationEvent], params: &EngineParams) -> OracleResult {
    let mut seen = FxHashSet::default();
    let unique: Vec<&LocationEvent> = events.iter().filter(|e| seen.insert(e.event_id)).collect();
    let ecef: Vec<Ecef> = unique
        .iter()
        .map(|e| Ecef::from_degrees(e.lat, e.lon))
        .collect();
    let window = i64::from(params.window_s) * MICROS_PER_S;
    let mut colocations = Vec::new();
    for i in 0..unique.len() {
        for j in i + 1..unique.len() {
            let (a, b) = (unique[i], unique[j]);
            if a.person_id == b.person_id || (a.recorded_at - b.recorded_at).abs() > window {
                continue;
            }
            let Some(distance_m) = ecef[i].within(&ecef[j], params.radius_m) else {
                continue;
            };
            let time = a.recorded_at.max(b.recorded_at);
            for (own, peer) in [(a, b), (b, a)] {
                colocations.push(ColocationReport {
                    person: own.person_id,
                    own_event: own.event_id,
                    peer: peer.person_id,
                    peer_event: peer.event_id,
                    time,
                    distance_m,
                    lat: own.lat,
                    lon: own.lon,
                });
            }
        }
    }
    colocations.sort_by(|a, b| {
        (a.person, a.own_event, a.peer_event).cmp(&(b.person, b.own_event, b.peer_event))
    });
    let gap = i64::from(params.episode_gap_s) * MICROS_PER_S;
    let mut by_pair: BTreeMap<(PersonId, PersonId), Vec<&ColocationReport>> = BTreeMap::new();
    for c in &colocations {
        by_pair.entry((c.person, c.peer)).or_default().push(c);
    }
    let mut episodes = Vec::new();
    for ((person, peer), mut cs) in by_pair {
        cs.sort_by_key(|c| c.time);
        let mut current: Vec<&ColocationReport> = Vec::new();
        for c in cs {
            if let Some(last) = current.last() {
                if c.time - last.time > gap {
                    episodes.push(episode(person, peer, &current));
                    current.clear();
                }
            }
            current.push(c);
        }
        if !current.is_empty() {
            episodes.push(episode(person, peer, &current));
        }
    }
    episodes.sort_by_key(|e| e.key());
    OracleResult {
        colocations,
        episodes,
    }
}

fn episode(person: PersonId, peer: PersonId, cs: &[&ColocationReport]) -> Episode {
    let closest = cs
        .iter()
        .min_by(|a, b| {
            a.distance_m
                .total_cmp(&b.distance_m)
                .then(a.time.cmp(&b.time))
                .then(a.own_event.cmp(&b.own_event))
                .then(a.peer_event.cmp(&b.peer_event))
        })
        .expect("an episode has co-locations");
    let started_at: Micros = cs.first().map(|c| c.time).unwrap_or_default();
    let last_seen_at: Micros = cs.last().map(|c| c.time).unwrap_or_default();
    Episode {
        person,
        peer,
        started_at,
        last_seen_at,
        ended_at: Some(last_seen_at),
        colocations: cs.len() as u32,
        min_distance_m: closest.distance_m,
        lat: closest.lat,
        lon: closest.lon,
    }
}

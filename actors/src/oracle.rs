//! The brute-force reference: every pair of events within the radius and the window, then
//! episodes per (person, peer) by sorting times. Quadratic within the window; for tests and
//! benches only.

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
    // Every pair within the window is looked at, in time order so that the look stops where
    // the window does: the same pairs as a look at all n² of them, in minutes instead of
    // hours for a conference of 800,000 events (peer-bench's oracle at engine-bench's
    // workload).
    let mut by_time: Vec<usize> = (0..unique.len()).collect();
    by_time.sort_by_key(|&i| unique[i].recorded_at);
    let mut colocations = Vec::new();
    for (k, &x) in by_time.iter().enumerate() {
        for &y in &by_time[k + 1..] {
            if unique[y].recorded_at - unique[x].recorded_at > window {
                break;
            }
            // Each pair in the input's order, as the n² loop took it.
            let (i, j) = (x.min(y), x.max(y));
            let (a, b) = (unique[i], unique[j]);
            if a.person_id == b.person_id {
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

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    /// The time-ordered look finds exactly the pairs that a look at all n² pairs finds: events
    /// out of time order, times spread over several windows, repeated ids (the first copy
    /// counts), persons met several times.
    #[test]
    fn looking_in_time_order_finds_the_pairs_all_pairs_give() {
        let params = EngineParams::default();
        let t0: Micros = 1_790_000_000 * MICROS_PER_S;
        // A fixed pseudo-random sequence (splitmix64).
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut events: Vec<LocationEvent> = (0..1_500u64)
            .map(|n| {
                let r = next();
                LocationEvent {
                    event_id: Uuid::from_u64_pair(n, r),
                    person_id: (r % 40) as PersonId + 1,
                    // About 20 m × 20 m, so that a good share of pairs are within 5 m.
                    lat: 35.0845 + ((r >> 8) % 1_000) as f64 * 2e-7,
                    lon: -106.6511 + ((r >> 20) % 1_000) as f64 * 2.4e-7,
                    // Ten minutes, shuffled: ten windows of 60 s.
                    recorded_at: t0 + ((r >> 32) % 600_000_000) as Micros,
                    received_at: t0 + 600 * MICROS_PER_S,
                }
            })
            .collect();
        // Repeats of earlier events, some with a changed time: the first copy counts.
        for n in (0..1_500).step_by(50) {
            let mut again = events[n];
            again.recorded_at += (n as Micros % 3) * MICROS_PER_S;
            events.push(again);
        }
        let got = oracle(&events, &params).colocations;

        let mut seen = rustc_hash::FxHashSet::default();
        let unique: Vec<&LocationEvent> =
            events.iter().filter(|e| seen.insert(e.event_id)).collect();
        let window = i64::from(params.window_s) * MICROS_PER_S;
        let mut all = Vec::new();
        for i in 0..unique.len() {
            for j in i + 1..unique.len() {
                let (a, b) = (unique[i], unique[j]);
                if a.person_id == b.person_id || (a.recorded_at - b.recorded_at).abs() > window {
                    continue;
                }
                let (ea, eb) = (
                    Ecef::from_degrees(a.lat, a.lon),
                    Ecef::from_degrees(b.lat, b.lon),
                );
                if let Some(d) = ea.within(&eb, params.radius_m) {
                    all.push((a.person_id, a.event_id, b.event_id, d.to_bits()));
                    all.push((b.person_id, b.event_id, a.event_id, d.to_bits()));
                }
            }
        }
        all.sort();
        let mut found: Vec<_> = got
            .iter()
            .map(|c| (c.person, c.own_event, c.peer_event, c.distance_m.to_bits()))
            .collect();
        found.sort();
        assert!(
            all.len() > 1_000,
            "the scene has pairs to find ({})",
            all.len()
        );
        assert_eq!(found, all);
    }
}

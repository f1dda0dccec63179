//! The engine against the brute-force oracle (docs/design.md §3): co-locations and final episodes
//! must be equal whatever the zone sizes, partition counts, batch boundaries, arrival order
//! within `lateness_s`, phones that were offline for up to 30 minutes and upload late and out
//! of order (the late path), lag between zone partitions, repeats and replays. The engine sums up
//! an arrival's co-locations per peer (when `window_s <= episode_gap_s`); per (person, peer),
//! the counts, first and last times and closest co-location must equal the oracle's.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;
use udaconnect_actors::domain::{
    derived_event_id, Closest, ColocationReport, ColocationSummary, LocationEvent, Micros,
    MICROS_PER_S,
};
use udaconnect_actors::messages::PersonBatch;
use udaconnect_actors::oracle::oracle;
use udaconnect_actors::{Engine, EngineOptions, EngineParams};

const T0: Micros = 1_790_000_000 * MICROS_PER_S;
/// A point on an H3 resolution-9 border near Albuquerque's convention center; zones of
/// resolutions 9–11 cut the scene into several.
const CENTER: (f64, f64) = (35.0845, -106.6511);

#[derive(Debug, Clone)]
struct Scenario {
    params: EngineParams,
    zone_partitions: u32,
    person_partitions: u32,
    /// Events in arrival order (repeats included).
    arrivals: Vec<LocationEvent>,
    /// Batch boundaries, as lengths.
    batch_lens: Vec<usize>,
    /// Delivery choices for the person stage: which pending zone output goes next.
    delivery: Vec<u16>,
    /// Where the replayed suffix starts, as a fraction of the arrivals.
    replay_from: f64,
}

fn params() -> impl Strategy<Value = EngineParams> {
    (
        prop_oneof![Just(5.0), 1.0..15.0f64],
        prop_oneof![Just(60u32), 1u32..120],
        0u32..60,
        prop_oneof![Just(600u32), 1u32..300, 1u32..20],
        9u8..=11,
    )
        .prop_map(
            |(radius_m, window_s, lateness_s, episode_gap_s, zone_resolution)| EngineParams {
                radius_m,
                window_s,
                lateness_s,
                episode_gap_s,
                zone_resolution,
                ..EngineParams::default()
            },
        )
}

/// People around a few spots (some on zone borders) over a stretch of time, then shuffled
/// within the lateness bound and sprinkled with repeats.
fn scenario() -> impl Strategy<Value = Scenario> {
    (
        params(),
        1u32..=4,
        1u32..=4,
        2usize..=6,
        prop_oneof![1u64..=120, 1u64..=1_800],
    )
        .prop_flat_map(|(params, zp, pp, persons, span_s)| {
            let spot = (-60.0..60.0f64, -60.0..60.0f64);
            let event = (
                1..=persons as i64,
                0..3usize,
                -6.0..6.0f64,
                -6.0..6.0f64,
                // Whole seconds half of the time: ties and exact gaps are where bugs hide.
                prop_oneof![(0..=span_s).prop_map(|t| t * 1000), 0..=span_s * 1000],
                // Delays at the extremes of the lateness bound as often as in between.
                {
                    let max = u64::from(params.lateness_s) * 1000;
                    prop_oneof![Just(0), Just(max), 0..=max]
                },
                // Where an offline phone's upload puts this report within its upload.
                0.0..1.0f64,
            );
            // A quarter of the persons are phones that were offline: their reports arrive up to
            // 30 minutes late, each at a random point of the upload that follows.
            let offline = proptest::collection::vec(
                prop_oneof![3 => Just(None), 1 => (1u64..=1_800_000).prop_map(Some)],
                persons,
            );
            (
                Just(params),
                Just(zp),
                Just(pp),
                proptest::collection::vec(spot, 3),
                proptest::collection::vec(event, 1..60),
                offline,
                proptest::collection::vec(0usize..60, 0..5),
                proptest::collection::vec(1usize..20, 1..20),
                proptest::collection::vec(any::<u16>(), 0..200),
                0.0..1.0f64,
            )
        })
        .prop_map(
            |(
                params,
                zone_partitions,
                person_partitions,
                spots,
                raw,
                offline,
                repeats,
                batch_lens,
                delivery,
                replay_from,
            )| {
                let m_per_deg_lat = 110_950.0;
                let m_per_deg_lon = 91_000.0;
                let mut timed: Vec<(Micros, LocationEvent)> = raw
                    .iter()
                    .map(|&(person, spot, dx, dy, t_ms, delay_ms, upload_at)| {
                        let (sx, sy) = spots[spot];
                        let lat = CENTER.0 + (sy + dy) / m_per_deg_lat;
                        let lon = CENTER.1 + (sx + dx) / m_per_deg_lon;
                        let recorded_at = T0 + t_ms as i64 * 1000;
                        let arrival = match offline[(person - 1) as usize] {
                            Some(offline_ms) => {
                                let upload_ms = offline_ms as f64 * (1.0 + upload_at);
                                recorded_at + upload_ms as i64 * 1000
                            }
                            None => recorded_at + delay_ms as i64 * 1000,
                        };
                        let e = LocationEvent {
                            event_id: derived_event_id(person, recorded_at, lat, lon),
                            person_id: person,
                            lat,
                            lon,
                            recorded_at,
                            received_at: arrival,
                        };
                        (arrival, e)
                    })
                    .collect();
                // A repeat arrives again later, still within the lateness bound of its own time.
                let lateness_us = i64::from(params.lateness_s) * MICROS_PER_S;
                for &i in &repeats {
                    if let Some(&(_, e)) = timed.get(i % timed.len()) {
                        timed.push((e.recorded_at + lateness_us * (i % 7) as i64 / 7, e));
                    }
                }
                timed.sort_by_key(|(arrival, e)| (*arrival, e.event_id));
                Scenario {
                    params,
                    zone_partitions,
                    person_partitions,
                    arrivals: timed.into_iter().map(|(_, e)| e).collect(),
                    batch_lens,
                    delivery,
                    replay_from,
                }
            },
        )
}

/// Runs a scenario with zone output queued per source and delivered in the order `delivery`
/// picks (each source's queue stays in order, as a Kafka partition does).
fn run(s: &Scenario, replay: bool) -> Engine {
    let options = EngineOptions {
        zone_partitions: s.zone_partitions,
        person_partitions: s.person_partitions,
        capture: true,
        keep_copies: true,
    };
    let mut engine = Engine::new(&s.params, options).expect("valid params");
    let mut pending: Vec<VecDeque<(u32, PersonBatch)>> =
        vec![VecDeque::new(); s.zone_partitions as usize];
    let mut choices = s.delivery.iter().copied().cycle();
    let mut deliver_some =
        |engine: &mut Engine, pending: &mut Vec<VecDeque<(u32, PersonBatch)>>, n: usize| {
            for _ in 0..n {
                let open: Vec<usize> = (0..pending.len())
                    .filter(|&i| !pending[i].is_empty())
                    .collect();
                if open.is_empty() {
                    return;
                }
                let pick = open[choices.next().unwrap_or(0) as usize % open.len()];
                let (q, batch) = pending[pick].pop_front().expect("non-empty");
                engine.deliver(q, &batch);
            }
        };
    let mut input: Vec<LocationEvent> = s.arrivals.clone();
    if replay {
        let from = (s.replay_from * input.len() as f64) as usize;
        input.extend_from_slice(&s.arrivals[from..]);
    }
    let mut lens = s.batch_lens.iter().copied().cycle();
    let mut at = 0;
    while at < input.len() {
        let n = lens.next().unwrap_or(1).min(input.len() - at);
        let routed = engine.route(&input[at..at + n]);
        at += n;
        for (p, batch) in routed.iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let out = engine.process_zone(p as u32, batch);
            for (q, b) in out.person_batches.into_iter().enumerate() {
                pending[p].push_back((q as u32, b));
            }
        }
        // Deliver only part of what is pending: zone partitions run ahead of each other.
        let some = choices_len(&s.delivery) % 7;
        deliver_some(&mut engine, &mut pending, some);
    }
    for p in 0..s.zone_partitions {
        let out = engine.finish_zone(p);
        for (q, b) in out.person_batches.into_iter().enumerate() {
            pending[p as usize].push_back((q as u32, b));
        }
    }
    deliver_some(&mut engine, &mut pending, usize::MAX);
    engine
}

fn choices_len(d: &[u16]) -> usize {
    d.first().copied().unwrap_or(3) as usize
}

/// Per (person, peer): how many co-locations, the earliest and latest time, the closest one
/// (what the episode rules read of them).
type PerPeer = BTreeMap<(i64, i64), (u32, Micros, Micros, Closest)>;

fn fold(into: &mut PerPeer, key: (i64, i64), count: u32, first: Micros, last: Micros, c: Closest) {
    into.entry(key)
        .and_modify(|(n, f, l, closest)| {
            *n += count;
            *f = (*f).min(first);
            *l = (*l).max(last);
            *closest = closest.min(c);
        })
        .or_insert((count, first, last, c));
}

fn per_peer_of_summaries(cs: &[ColocationSummary]) -> PerPeer {
    let mut m = PerPeer::new();
    for c in cs {
        fold(
            &mut m,
            (c.person, c.peer),
            c.count,
            c.first,
            c.last,
            c.closest,
        );
    }
    m
}

fn per_peer_of_oracle(cs: &[ColocationReport]) -> PerPeer {
    let mut m = PerPeer::new();
    for c in cs {
        fold(
            &mut m,
            (c.person, c.peer),
            1,
            c.time,
            c.time,
            Closest::of(c),
        );
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6_000))]

    /// Co-locations and final episodes equal the oracle's.
    #[test]
    fn engine_equals_the_oracle(s in scenario()) {
        let expected = oracle(&s.arrivals, &s.params);
        let engine = run(&s, false);
        let summaries = engine.colocations();
        prop_assert_eq!(
            summaries.iter().map(|c| u64::from(c.count)).sum::<u64>(),
            expected.colocations.len() as u64
        );
        prop_assert_eq!(per_peer_of_summaries(&summaries), per_peer_of_oracle(&expected.colocations));
        prop_assert_eq!(engine.episodes(), expected.episodes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    /// Replaying any suffix of the input changes nothing.
    #[test]
    fn replaying_a_suffix_changes_nothing(s in scenario()) {
        let expected = oracle(&s.arrivals, &s.params);
        let once = run(&s, false);
        let twice = run(&s, true);
        prop_assert_eq!(twice.colocations(), once.colocations());
        prop_assert_eq!(twice.episodes(), expected.episodes);
    }
}

/// The offline pair of the late path: while others keep the clocks moving, A and B each
/// upload six reports 1 m apart stamped 10 to 5 minutes ago, after everyone else's; they are
/// late on arrival, and still get their episode (and each a `started`).
#[test]
fn an_offline_pair_gets_its_episode() {
    let params = EngineParams::default();
    let at = |person: i64, t_s: i64, dx_m: f64, received_s: i64| {
        let lat = CENTER.0;
        let lon = CENTER.1 + dx_m / 91_000.0;
        let recorded_at = T0 + t_s * MICROS_PER_S;
        LocationEvent {
            event_id: derived_event_id(person, recorded_at, lat, lon),
            person_id: person,
            lat,
            lon,
            recorded_at,
            received_at: T0 + received_s * MICROS_PER_S,
        }
    };
    let now = 900;
    // Someone far away reports every 10 s up to now: event time is at `now`.
    let mut arrivals: Vec<LocationEvent> = (0..=now / 10)
        .map(|i| at(3, i * 10, 500.0, i * 10))
        .collect();
    for k in 0..6 {
        let t = now - 600 + k * 60;
        arrivals.push(at(1, t, 0.0, now));
        arrivals.push(at(2, t, 1.0, now));
    }
    let s = Scenario {
        params,
        zone_partitions: 2,
        person_partitions: 2,
        arrivals,
        batch_lens: vec![5],
        delivery: vec![1, 0],
        replay_from: 0.5,
    };
    let expected = oracle(&s.arrivals, &s.params);
    assert_eq!(
        expected.episodes.len(),
        2,
        "the oracle sees one episode, from each side"
    );
    let engine = run(&s, false);
    assert!(
        engine.stats().late >= 12,
        "the uploads are late: {:?}",
        engine.stats()
    );
    assert_eq!(engine.episodes(), expected.episodes);
    let replayed = run(&s, true);
    assert_eq!(replayed.episodes(), expected.episodes);
}

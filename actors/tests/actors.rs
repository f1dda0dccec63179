//! The actor engine: same results as the synchronous engine (and the oracle), snapshot and
//! restore mid-stream, state views, restarts after a panic.

use udaconnect_actors::actors::in_process::{ActorEngine, ActorEngineOptions};
use udaconnect_actors::domain::{derived_event_id, LocationEvent, Micros, MICROS_PER_S};
use udaconnect_actors::oracle::oracle;
use udaconnect_actors::zones::{mix64, ZoneGrid};
use udaconnect_actors::{Engine, EngineOptions, EngineParams};

const T0: Micros = 1_790_000_000 * MICROS_PER_S;

/// `persons` people drifting between a few spots around a zone border for `minutes`,
/// reporting every ~10 s, arriving up to 20 s out of order, with some repeats.
fn crowd(persons: i64, minutes: i64, seed: u64) -> Vec<LocationEvent> {
    let mut r = seed;
    let mut next = move || {
        r = mix64(r.wrapping_add(0x9e37_79b9_7f4a_7c15));
        r
    };
    let mut timed = Vec::new();
    for p in 1..=persons {
        let mut t = T0 + (next() % 10_000_000) as i64;
        while t < T0 + minutes * 60 * MICROS_PER_S {
            // Spots every 8 m along a line; people hop between neighbouring spots.
            let spot = ((t / (90 * MICROS_PER_S)) + p * 7 + (next() % 2) as i64) % 12;
            let dx = spot as f64 * 8.0 + (next() % 400) as f64 / 100.0 - 2.0;
            let dy = (next() % 400) as f64 / 100.0 - 2.0;
            let lat = 35.0845 + dy / 110_950.0;
            let lon = -106.6511 + dx / 91_000.0;
            let e = LocationEvent {
                event_id: derived_event_id(p, t, lat, lon),
                person_id: p,
                lat,
                lon,
                recorded_at: t,
                received_at: t,
            };
            let arrival = t + (next() % 20_000_000) as i64;
            timed.push((arrival, e));
            if next() % 50 == 0 {
                timed.push((t + (next() % 20_000_000) as i64, e));
            }
            t += 8 * MICROS_PER_S + (next() % 4_000_000) as i64;
        }
    }
    timed.sort_by_key(|(a, e)| (*a, e.event_id));
    timed.into_iter().map(|(_, e)| e).collect()
}

fn params() -> EngineParams {
    // Zones of resolution 10 (~15,000 m²) so the crowd spans several of them.
    EngineParams {
        zone_resolution: 10,
        episode_gap_s: 120,
        ..EngineParams::default()
    }
}

fn sync_engine(events: &[LocationEvent], zp: u32, pp: u32) -> Engine {
    let mut engine = Engine::new(
        &params(),
        EngineOptions {
            zone_partitions: zp,
            person_partitions: pp,
            capture: true,
            keep_copies: true,
        },
    )
    .unwrap();
    for chunk in events.chunks(97) {
        engine.ingest(chunk);
    }
    engine.finish();
    engine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actors_equal_the_engine_and_the_oracle() {
    let events = crowd(60, 30, 1);
    let zones: std::collections::BTreeSet<u64> = {
        let g = ZoneGrid::new(&params());
        events.iter().map(|e| g.home_zone(e.lat, e.lon)).collect()
    };
    assert!(zones.len() >= 2, "the crowd must straddle zones: {zones:?}");
    let expected = oracle(&events, &params());
    assert!(
        expected.episodes.len() > 50,
        "{} episodes",
        expected.episodes.len()
    );
    let sync = sync_engine(&events, 3, 2);
    assert_eq!(sync.episodes(), expected.episodes);

    let options = ActorEngineOptions {
        zone_partitions: 3,
        person_partitions: 2,
        capacity: 2,
        passivate_after_s: 120,
        capture: true,
        keep_copies: true,
    };
    let mut engine = ActorEngine::start(&params(), options, None).await.unwrap();
    for chunk in events.chunks(97) {
        engine.ingest(chunk).await.unwrap();
    }
    engine.finish().await.unwrap();
    assert_eq!(engine.episodes(), expected.episodes);
    let captured = engine.take_captured().await.unwrap();
    assert_eq!(
        captured
            .accepted
            .iter()
            .map(|c| u64::from(c.count))
            .sum::<u64>(),
        expected.colocations.len() as u64
    );
    let unique: std::collections::HashSet<_> =
        engine.notifications().iter().map(|n| n.id).collect();
    assert_eq!(
        unique.len() as u64,
        engine.notification_count(),
        "notification ids are unique"
    );
    let ended = engine
        .notifications()
        .iter()
        .filter(|n| n.kind == udaconnect_actors::domain::NotificationKind::Ended)
        .count();
    assert_eq!(
        ended,
        expected.episodes.len(),
        "one connection.ended per episode"
    );
    let persons = engine.person_partitions().await.unwrap();
    assert!(
        persons.iter().map(|p| p.counters.passivations).sum::<u64>() > 0,
        "idle persons are passivated: {persons:?}"
    );
    engine.stop().await;
}

/// The engine the snapshot-and-restore tests stop and start again: 2 zone and 3 person
/// partitions.
fn restore_options() -> ActorEngineOptions {
    ActorEngineOptions {
        zone_partitions: 2,
        person_partitions: 3,
        capture: false,
        ..ActorEngineOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_restore_mid_stream_give_the_same_result() {
    let events = crowd(40, 20, 2);
    let expected = oracle(&events, &params());
    let options = restore_options();
    let half = events.len() / 2;
    let mut first = ActorEngine::start(&params(), options, None).await.unwrap();
    for chunk in events[..half].chunks(50) {
        first.ingest(chunk).await.unwrap();
    }
    let snapshot = first.snapshot().await.unwrap();
    let table = first.table();
    first.stop().await;
    assert!(snapshot
        .zones
        .iter()
        .any(|z| z.next_offset > 0 && !z.bytes.is_empty()));
    assert!(
        !table.is_empty(),
        "episodes were stored before the snapshot"
    );

    // A new process restores both stages and shares the first one's database.
    let mut second = ActorEngine::start_with_table(&params(), options, Some(snapshot), table)
        .await
        .unwrap();
    for chunk in events[half..].chunks(50) {
        second.ingest(chunk).await.unwrap();
    }
    second.finish().await.unwrap();
    assert_eq!(second.episodes(), expected.episodes);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_and_restarts() {
    let events = crowd(20, 10, 3);
    let options = ActorEngineOptions {
        zone_partitions: 1,
        person_partitions: 1,
        capture: false,
        passivate_after_s: 3_600,
        ..ActorEngineOptions::default()
    };
    let mut engine = ActorEngine::start(&params(), options, None).await.unwrap();
    engine.ingest(&events).await.unwrap();
    engine.settle().await.unwrap();
    let view = engine.person(1).await.unwrap().expect("person 1 is known");
    assert_eq!(view.person, 1);
    assert!(!view.trajectory.is_empty());
    let last = events
        .iter()
        .filter(|e| e.person_id == 1)
        .map(|e| e.recorded_at)
        .max()
        .unwrap();
    assert_eq!(view.last_location.unwrap().recorded_at, last);
    assert!(!view.open_episodes.is_empty(), "{view:?}");
    let zone = view.current_zone.unwrap();
    let zv = engine
        .zone(zone, 10)
        .await
        .unwrap()
        .expect("the zone is live");
    assert!(zv.retained > 0 && zv.points.len() <= 10);
    assert!(engine.person(999_999).await.unwrap().is_none());

    // A panicking zone actor and person actor are restarted and counted.
    engine
        .zone_supervisor(0)
        .cast(udaconnect_actors::actors::zone::ZoneSupervisorMsg::CrashZone(zone))
        .unwrap();
    engine
        .person_supervisor(0)
        .cast(udaconnect_actors::actors::person::PersonSupervisorMsg::CrashPerson(1))
        .unwrap();
    let mut restarted = false;
    for _ in 0..100 {
        let z = engine.zone_partitions().await.unwrap();
        let p = engine.person_partitions().await.unwrap();
        if z[0].supervision.restarts == 1 && p[0].supervision.restarts == 1 {
            assert_eq!((z[0].supervision.panics, p[0].supervision.panics), (1, 1));
            restarted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(restarted, "supervisors restart failed children");
    // Both answer again.
    assert!(engine.zone(zone, 1).await.unwrap().is_some());
    assert_eq!(
        engine.person(1).await.unwrap().unwrap().counters.sightings,
        0
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persons_updates_are_applied_in_their_batch_order() {
    // Two reports of person 1 stamped with the same time at two places, with another
    // person's report between them, in one batch: the trajectory keeps equal times in the
    // order they were applied, so the last location is the later report only if the person
    // actor read its updates in batch order.
    let at = |person, lat: f64| LocationEvent {
        event_id: derived_event_id(person, T0, lat, -106.6511),
        person_id: person,
        lat,
        lon: -106.6511,
        recorded_at: T0,
        received_at: T0,
    };
    let options = ActorEngineOptions {
        zone_partitions: 1,
        person_partitions: 1,
        ..ActorEngineOptions::default()
    };
    for (first, second) in [(35.0845, 35.08455), (35.08455, 35.0845)] {
        let mut engine = ActorEngine::start(&params(), options, None).await.unwrap();
        let batch = [at(1, first), at(2, 35.0846), at(1, second)];
        engine.ingest(&batch).await.unwrap();
        engine.settle().await.unwrap();
        let view = engine.person(1).await.unwrap().expect("person 1 is known");
        let lats: Vec<f64> = view.trajectory.iter().map(|s| s.lat).collect();
        assert_eq!(lats, [first, second]);
        assert_eq!(view.last_location.map(|s| s.lat), Some(second));
        engine.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persons_due_together_asked_in_small_waves_give_the_same_outputs() {
    // Waves of 3 persons, about 30 per person partition. One zone partition, so the minimum
    // watermark advances with every batch; half the crowd leaves after 10 minutes, so persons
    // go idle and are passivated mid-stream and some of them, passivated, have episodes to
    // close. Closing and passivating then run in several waves inside one batch (checked with
    // a trace: about 100 such closes), each wave's outputs emitted before the next, after the
    // batch's own; what comes out, in order for each person, must be what one wave gives.
    let mut events = crowd(60, 30, 1);
    events.retain(|e| e.person_id > 30 || e.recorded_at < T0 + 10 * 60 * MICROS_PER_S);
    let expected = oracle(&events, &params());
    let options = ActorEngineOptions {
        zone_partitions: 1,
        person_partitions: 2,
        capacity: 2,
        passivate_after_s: 120,
        capture: true,
        keep_copies: true,
    };
    let mut outputs = Vec::new();
    for wave in [3, udaconnect_actors::actors::person::WAVE] {
        let mut engine =
            ActorEngine::start_in_waves(&params(), options, None, Default::default(), wave)
                .await
                .unwrap();
        for chunk in events.chunks(97) {
            engine.ingest(chunk).await.unwrap();
        }
        engine.finish().await.unwrap();
        assert_eq!(engine.episodes(), expected.episodes, "wave {wave}");
        // Each person's notifications in the order they were published.
        let mut per_person: std::collections::BTreeMap<_, Vec<_>> = Default::default();
        for n in engine.notifications() {
            per_person.entry(n.episode.person).or_default().push((
                n.id,
                n.kind.as_str(),
                n.episode.key(),
            ));
        }
        let published: usize = per_person.values().map(Vec::len).sum();
        assert_eq!(published as u64, engine.notification_count());
        let persons = engine.person_partitions().await.unwrap();
        let passivations: u64 = persons.iter().map(|p| p.counters.passivations).sum();
        let changes: u64 = persons.iter().map(|p| p.counters.changes).sum();
        assert!(
            passivations > 30,
            "wave {wave}: {passivations} passivations"
        );
        outputs.push((per_person, published, passivations, changes));
        engine.stop().await;
    }
    let [(small, n3, p3, c3), (all, n, p, c)] = &outputs[..] else {
        unreachable!("two runs")
    };
    assert!(*n3 > 2 * expected.episodes.len());
    assert_eq!(
        (n3, p3, c3),
        (n, p, c),
        "notifications, passivations and changes, wave 3 against the default"
    );
    assert!(
        small == all,
        "each person's notifications, in order, ids included"
    );
}

/// An incremental person snapshot (what `begin_checkpoint` asks for), captured.
async fn incremental_snapshot_request(
    engine: &ActorEngine,
) -> udaconnect_actors::actors::ports::PendingSnapshot {
    use udaconnect_actors::actors::person::PersonSupervisorMsg;
    engine
        .person_supervisor(0)
        .call(
            |reply| PersonSupervisorMsg::Snapshot {
                complete: false,
                reply,
            },
            None,
        )
        .await
        .unwrap()
        .unwrap()
}

/// An incremental person snapshot, finished.
async fn incremental_snapshot(
    engine: &ActorEngine,
) -> udaconnect_actors::actors::ports::SnapshotBlob {
    incremental_snapshot_request(engine)
        .await
        .wait()
        .await
        .unwrap()
}

fn part_keys(blob: &udaconnect_actors::actors::ports::SnapshotBlob) -> Vec<i64> {
    blob.parts.iter().map(|(key, _)| *key).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn person_snapshots_hold_the_changed_persons_and_everyone_after_one_was_not_finished() {
    let options = ActorEngineOptions {
        zone_partitions: 1,
        person_partitions: 1,
        ..ActorEngineOptions::default()
    };
    let mut engine = ActorEngine::start(&params(), options, None).await.unwrap();
    let report = |person: i64, t_s: i64| {
        let (lat, lon, t) = (
            35.0845 + person as f64 * 0.01,
            -106.6511,
            T0 + t_s * MICROS_PER_S,
        );
        LocationEvent {
            event_id: derived_event_id(person, t, lat, lon),
            person_id: person,
            lat,
            lon,
            recorded_at: t,
            received_at: t,
        }
    };
    engine.ingest(&[report(1, 0), report(2, 0)]).await.unwrap();
    engine.settle().await.unwrap();
    // The first snapshot holds everyone; the next, only who changed since.
    let first = incremental_snapshot(&engine).await;
    assert!(first.complete);
    assert_eq!(part_keys(&first), vec![1, 2]);
    engine.ingest(&[report(2, 10)]).await.unwrap();
    engine.settle().await.unwrap();
    let second = incremental_snapshot(&engine).await;
    assert!(!second.complete);
    assert_eq!(part_keys(&second), vec![2]);

    // A snapshot captured and then dropped (its caller gave up waiting) took person 1's
    // change with it: the next one must hold everyone, or person 1 would stay stale.
    engine.ingest(&[report(1, 20)]).await.unwrap();
    engine.settle().await.unwrap();
    drop(incremental_snapshot_request(&engine).await);
    engine.ingest(&[report(2, 30)]).await.unwrap();
    engine.settle().await.unwrap();
    let after = incremental_snapshot(&engine).await;
    assert!(after.complete, "{:?}", part_keys(&after));
    assert_eq!(part_keys(&after), vec![1, 2]);
    engine.stop().await;
}

/// What the store keeps of a partition's snapshots: `blob` applied on top of `stored` as
/// `src/store/snapshots.rs` applies it (a complete one replaces every part; an incremental one
/// replaces the parts it holds and removes those it names without a state).
fn apply_snapshot(
    stored: Option<udaconnect_actors::actors::ports::SnapshotBlob>,
    blob: udaconnect_actors::actors::ports::SnapshotBlob,
) -> udaconnect_actors::actors::ports::SnapshotBlob {
    let mut parts: std::collections::BTreeMap<i64, Vec<u8>> = match (&stored, blob.complete) {
        (Some(s), false) => s
            .parts
            .iter()
            .filter_map(|(k, p)| p.clone().map(|p| (*k, p)))
            .collect(),
        _ => Default::default(),
    };
    for (key, part) in &blob.parts {
        match part {
            Some(p) => parts.insert(*key, p.clone()),
            None => parts.remove(key),
        };
    }
    udaconnect_actors::actors::ports::SnapshotBlob {
        parts: parts.into_iter().map(|(k, p)| (k, Some(p))).collect(),
        complete: true,
        ..blob
    }
}

/// A zone partition's snapshot, finished.
async fn zone_snapshot(
    engine: &ActorEngine,
    p: u32,
) -> udaconnect_actors::actors::ports::SnapshotBlob {
    use udaconnect_actors::actors::zone::ZoneSupervisorMsg;
    engine
        .zone_supervisor(p)
        .call(
            |reply| ZoneSupervisorMsg::Snapshot {
                complete: false,
                reply,
            },
            None,
        )
        .await
        .unwrap()
        .unwrap()
        .wait()
        .await
        .unwrap()
}

/// Every point the zones of `engine` retain: (zone, event, time), sorted.
async fn retained_points(engine: &ActorEngine, partitions: u32) -> Vec<(u64, u128, i64)> {
    use udaconnect_actors::actors::zone::ZoneSupervisorMsg;
    let mut all = Vec::new();
    for p in 0..partitions {
        let supervisor = engine.zone_supervisor(p);
        let view = supervisor
            .call(ZoneSupervisorMsg::View, None)
            .await
            .unwrap()
            .unwrap();
        for zone in view.zones {
            let zone_view = supervisor
                .call(
                    |reply| ZoneSupervisorMsg::ZoneView {
                        zone,
                        limit: usize::MAX,
                        reply,
                    },
                    None,
                )
                .await
                .unwrap()
                .unwrap()
                .expect("a listed zone");
            all.extend(
                zone_view
                    .points
                    .iter()
                    .map(|pt| (zone, pt.event_id.as_u128(), pt.recorded_at)),
            );
        }
    }
    all.sort_unstable();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_snapshots_rewrite_only_changed_slices_and_restore_to_the_same_result() {
    let events = crowd(40, 20, 3);
    let expected = oracle(&events, &params());
    let options = restore_options();
    let cut = events.len() * 2 / 3;
    let mut first = ActorEngine::start(&params(), options, None).await.unwrap();
    let mut stored: Vec<Option<udaconnect_actors::actors::ports::SnapshotBlob>> = vec![None, None];
    let (mut incremental, mut fewer) = (0, 0);
    for (i, chunk) in events[..cut].chunks(50).enumerate() {
        first.ingest(chunk).await.unwrap();
        if i % 3 == 2 {
            first.settle().await.unwrap();
            for p in 0..2u32 {
                let blob = zone_snapshot(&first, p).await;
                if !blob.complete {
                    incremental += 1;
                    let held = stored[p as usize].as_ref().map_or(0, |s| s.parts.len());
                    fewer +=
                        usize::from(blob.parts.iter().filter(|(_, s)| s.is_some()).count() < held);
                }
                stored[p as usize] = Some(apply_snapshot(stored[p as usize].take(), blob));
            }
        }
    }
    // The cut: every zone partition's last (incremental) snapshot applied on top of what was
    // stored; the persons' complete snapshots of the same moment.
    first.settle().await.unwrap();
    let mut zones = Vec::new();
    for p in 0..2u32 {
        let blob = zone_snapshot(&first, p).await;
        assert!(!blob.complete);
        zones.push(apply_snapshot(stored[p as usize].take(), blob));
    }
    let mut snapshot = first.snapshot().await.unwrap();
    snapshot.zones = zones;
    let live = retained_points(&first, 2).await;
    let table = first.table();
    first.stop().await;
    assert!(
        incremental > 0 && fewer > 0,
        "{incremental} incremental snapshots, {fewer} with fewer parts than stored"
    );

    let mut second = ActorEngine::start_with_table(&params(), options, Some(snapshot), table)
        .await
        .unwrap();
    // The snapshots stored on top of each other hold exactly the points the zones held: none
    // missing (a slice not rewritten after arrivals), none extra (one the horizon reached).
    let restored = retained_points(&second, 2).await;
    assert_eq!(restored.len(), live.len());
    assert!(
        restored == live,
        "the restored points differ from the live ones"
    );
    for chunk in events[cut..].chunks(50) {
        second.ingest(chunk).await.unwrap();
    }
    second.finish().await.unwrap();
    assert_eq!(second.episodes(), expected.episodes);
    second.stop().await;
}

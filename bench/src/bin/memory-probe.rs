//! `memory-probe`: live heap bytes per retained zone point (all of them, and apart the router's
//! fine-cell cache and the zone partition's index and cache), per person actor and per empty
//! ractor actor (the runtime's floor), measured with a counting allocator. The last line is one JSON object with the figures.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use clap::Parser;
use futures::future::BoxFuture;
use mimalloc::MiMalloc;
use ractor::Actor;
use udaconnect_actors::actors::person::{
    PersonPartitionView, PersonSupervisor, PersonSupervisorArgs, PersonSupervisorMsg,
    CHANGES_FLUSH_INTERVAL, WAVE,
};
use udaconnect_actors::actors::ports::{ConnectionSink, PortError};
use udaconnect_actors::domain::{
    derived_event_id, ColocationReport, ColocationSummary, LocationEvent, Notification,
    MICROS_PER_S,
};
use udaconnect_actors::messages::{EpisodeChange, PersonBatch, PersonUpdate, RoutedEvent};
use udaconnect_actors::zone_index::ZonePartition;
use udaconnect_actors::{EngineParams, Router};
use udaconnect_bench::rss_bytes;

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards to the service's allocator (mimalloc, as src/main.rs) and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

#[derive(Debug, Parser)]
#[command(about = "Measure heap bytes per retained point, per person actor and per empty actor")]
struct Args {
    /// Points to retain in one zone partition.
    #[arg(long, default_value_t = 1_000_000)]
    points: usize,
    /// Person actors to start (and empty actors, for the floor).
    #[arg(long, default_value_t = 100_000)]
    persons: i64,
    /// Persons to passivate in one person partition (started in rounds of
    /// `--passivation-round` actors, each seen once, then passivated by the supervisor as the
    /// watermark passes them).
    #[arg(long, default_value_t = 1_000_000)]
    passivated: i64,
    /// Person actors running at once while `--passivated` persons are made.
    #[arg(long, default_value_t = 100_000)]
    passivation_round: i64,
}

const T0: i64 = 1_790_000_000 * MICROS_PER_S;

fn event(person: i64, i: usize) -> LocationEvent {
    event_at(person, i, T0)
}

/// [`event`], `t0` standing for the start of the window.
fn event_at(person: i64, i: usize, t0: i64) -> LocationEvent {
    // A 1 km square around a venue, 10 persons per 10 m cell, all within one window.
    let lat = 35.08 + (i % 1000) as f64 * 1e-5;
    let lon = -106.65 + ((i / 1000) % 1000) as f64 * 1.2e-5;
    let t = t0 + (i % 1000) as i64 * 1000;
    LocationEvent {
        event_id: derived_event_id(person, t, lat, lon),
        person_id: person,
        lat,
        lon,
        recorded_at: t,
        received_at: t,
    }
}

/// An actor that does nothing: what ractor itself costs per actor (the runtime's floor).
struct Empty;

impl Actor for Empty {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<()>,
        _args: (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        Ok(())
    }
}

/// Heap and RSS bytes per empty ractor actor, `count` of them running at once; `linked`: each
/// linked to one parent actor (as a supervisor links its children), which ractor pays for too.
async fn empty_actor_floor(count: i64, linked: bool) -> (f64, f64) {
    let (parent, parent_task) = Actor::spawn(None, Empty, ()).await.expect("spawn");
    // The probe's own list of the actors is made first: it is not the actors' cost.
    let mut actors = Vec::with_capacity(count as usize);
    let rss0 = rss_bytes();
    let before = live();
    for _ in 0..count {
        let (actor, handle) = if linked {
            Actor::spawn_linked(None, Empty, (), parent.get_cell()).await
        } else {
            Actor::spawn(None, Empty, ()).await
        }
        .expect("spawn");
        actors.push((actor, handle));
    }
    let bytes = (live() - before) as f64 / count.max(1) as f64;
    let rss = (rss_bytes() - rss0) as f64 / count.max(1) as f64;
    for (actor, handle) in actors {
        actor.stop(None);
        let _ = handle.await;
    }
    parent.stop(None);
    let _ = parent_task.await;
    (bytes, rss)
}

/// Sends `batch` to the person supervisor `sup` and waits until it is processed.
async fn apply(sup: &ractor::ActorRef<PersonSupervisorMsg>, batch: PersonBatch) {
    sup.call(
        |reply| PersonSupervisorMsg::Batch {
            batches: vec![std::sync::Arc::new(batch)],
            next_offset: 0,
            permit: None,
            done: Some(reply),
        },
        None,
    )
    .await
    .expect("batch");
}

/// The person partition's view.
async fn view(sup: &ractor::ActorRef<PersonSupervisorMsg>) -> PersonPartitionView {
    match sup
        .call(PersonSupervisorMsg::View, None)
        .await
        .expect("view")
    {
        ractor::rpc::CallResult::Success(v) => v,
        other => panic!("the person supervisor did not answer its view: {other:?}"),
    }
}

/// A connection sink that keeps nothing: what a person holds is measured without the rows and
/// notifications the sink would store.
struct Discard;

impl ConnectionSink for Discard {
    fn store<'a>(
        &'a self,
        _partition: u32,
        _changes: &'a [EpisodeChange],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn publish<'a>(
        &'a self,
        _partition: u32,
        _notifications: &'a [Notification],
    ) -> BoxFuture<'a, Result<(), PortError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A person partition's supervisor fed by one zone partition, its episodes and notifications
/// handed to [`Discard`], persons passivated after `passivate_after_s` idle (event time).
async fn person_partition(
    params: EngineParams,
    passivate_after_s: u32,
) -> (
    ractor::ActorRef<PersonSupervisorMsg>,
    tokio::task::JoinHandle<()>,
) {
    let args = PersonSupervisorArgs {
        partition: 0,
        params,
        zone_partitions: 1,
        connections: Arc::new(Discard),
        passivate_after_s,
        capture: false,
        snapshot: None,
        wave: WAVE,
    };
    Actor::spawn(None, PersonSupervisor, args)
        .await
        .expect("the person supervisor starts")
}

/// Heap and RSS bytes per person actor, `count` of them in one person partition, each seen
/// once; `met`: each also with one co-location with another person (one open episode; measured
/// once the supervisor has handed the episodes' changes to the sink).
async fn person_actors(params: EngineParams, count: i64, met: bool) -> (f64, f64) {
    let (sup, sup_task) = person_partition(params, 86_400).await;
    let rss0 = rss_bytes();
    let before = live();
    for start in (1..=count).step_by(10_000) {
        let mut updates = Vec::new();
        for p in start..(start + 10_000).min(count + 1) {
            let own = event(p, p as usize);
            updates.push(PersonUpdate::Sighting {
                event: own,
                zone: 0,
            });
            if met {
                // The person next to it (1 with 2, 3 with 4, ...), 1 m away.
                let peer = if p % 2 == 1 { p + 1 } else { p - 1 };
                let report = ColocationReport {
                    person: p,
                    own_event: own.event_id,
                    peer,
                    peer_event: event(peer, peer as usize).event_id,
                    time: own.recorded_at,
                    distance_m: 1.0,
                    lat: own.lat,
                    lon: own.lon,
                };
                updates.push(PersonUpdate::Colocations(ColocationSummary::of(
                    &report,
                    own.event_id,
                    0,
                )));
            }
        }
        let batch = PersonBatch {
            source: 0,
            updates,
            watermark: T0,
        };
        apply(&sup, batch).await;
    }
    if met {
        tokio::time::sleep(CHANGES_FLUSH_INTERVAL + std::time::Duration::from_secs(1)).await;
    }
    let active = view(&sup).await.active_persons;
    let bytes = (live() - before) as f64 / active.max(1) as f64;
    let rss = (rss_bytes() - rss0) as f64 / active.max(1) as f64;
    let what = if met {
        "one sighting and one open episode"
    } else {
        "one sighting"
    };
    eprintln!("{active} person actors: {bytes:.0} heap bytes each ({rss:.0} RSS), {what} each");
    sup.stop(None);
    let _ = sup_task.await;
    // Its actors stop with it; their memory is freed as their tasks end.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    (bytes, rss)
}

/// Heap and RSS bytes per passivated person, `count` of them in one person partition: rounds of
/// `round` persons are each seen once (their actors start), then the watermark passes them by
/// more than the passivation delay and the supervisor passivates them (their actors stop).
/// Returns the bytes each, the persons passivated and the process's RSS at the end.
async fn passivated_persons(
    params: EngineParams,
    count: i64,
    round: i64,
) -> (f64, f64, usize, u64) {
    let passivate_after_s = 60;
    let (sup, _) = person_partition(params, passivate_after_s).await;
    let rss0 = rss_bytes();
    let before = live();
    let round = round.max(1);
    for (k, start) in (1..=count).step_by(round as usize).enumerate() {
        // Each round an hour after the previous one, its persons seen within its first second.
        let t0 = T0 + k as i64 * 3_600 * MICROS_PER_S;
        for chunk in (start..(start + round).min(count + 1)).step_by(10_000) {
            let updates: Vec<PersonUpdate> = (chunk
                ..(chunk + 10_000).min(start + round).min(count + 1))
                .map(|p| PersonUpdate::Sighting {
                    event: event_at(p, p as usize, t0),
                    zone: 0,
                })
                .collect();
            apply(
                &sup,
                PersonBatch {
                    source: 0,
                    updates,
                    watermark: t0,
                },
            )
            .await;
        }
        let past = t0 + (i64::from(passivate_after_s) + 10) * MICROS_PER_S;
        apply(
            &sup,
            PersonBatch {
                source: 0,
                updates: Vec::new(),
                watermark: past,
            },
        )
        .await;
        eprintln!(
            "  {} persons passivated",
            view(&sup).await.passivated_persons
        );
    }
    // Stopped actors free their memory as their tasks end.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let v = view(&sup).await;
    assert_eq!(v.active_persons, 0, "every person was passivated");
    let n = v.passivated_persons;
    let bytes = (live() - before) as f64 / n.max(1) as f64;
    let rss_end = rss_bytes();
    let rss = (rss_end.saturating_sub(rss0)) as f64 / n.max(1) as f64;
    sup.stop(None);
    (bytes, rss, n, rss_end)
}

fn main() {
    udaconnect::allocator::tune();
    let args = Args::parse();
    // Points: a long window keeps every point; radius 1 m keeps co-locations (output) small.
    let params = EngineParams {
        radius_m: 1.0,
        window_s: 3_600,
        lateness_s: 3_600,
        zone_resolution: 9,
        ..EngineParams::default()
    };
    let mut router = Router::new(&params, 1);
    // Memory of the retained points alone: nothing evicted is kept for late copies.
    let mut partition = ZonePartition::new(0, &params, 1, false);
    let rss0 = rss_bytes();
    let before = live();
    // What the router keeps (its fine-cell cache, the ingest side's) is counted apart too.
    let mut router_bytes = 0i64;
    for chunk_start in (0..args.points).step_by(10_000) {
        let chunk: Vec<LocationEvent> = (chunk_start..(chunk_start + 10_000).min(args.points))
            .map(|i| event(i as i64 + 1, i))
            .collect();
        let at = live();
        let routed = router.route_batch(&chunk);
        let handed_out: usize = routed
            .iter()
            .map(|r| r.capacity() * std::mem::size_of::<RoutedEvent>())
            .sum::<usize>()
            + routed.capacity() * std::mem::size_of::<Vec<RoutedEvent>>();
        router_bytes += live() - at - handed_out as i64;
        drop(partition.process(&routed[0]));
    }
    let retained = partition.retained();
    let per_point = |bytes: i64| bytes as f64 / retained.max(1) as f64;
    let point_bytes = per_point(live() - before);
    let router_point_bytes = per_point(router_bytes);
    let point_rss = (rss_bytes() - rss0) as f64 / retained.max(1) as f64;
    eprintln!(
        "{retained} points retained: {point_bytes:.0} heap bytes each ({point_rss:.0} RSS), \
         of which the router's fine-cell cache {router_point_bytes:.0} and the zone partition {:.0}",
        point_bytes - router_point_bytes
    );
    drop(partition);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let (floor_bytes, floor_rss) = runtime.block_on(empty_actor_floor(args.persons, false));
    let (linked_bytes, linked_rss) = runtime.block_on(empty_actor_floor(args.persons, true));
    eprintln!(
        "{} empty ractor actors linked to a parent: {linked_bytes:.0} heap bytes each \
         ({linked_rss:.0} RSS)",
        args.persons
    );
    eprintln!(
        "{} empty ractor actors: {floor_bytes:.0} heap bytes each ({floor_rss:.0} RSS)",
        args.persons
    );
    let (actor_bytes, actor_rss) = runtime.block_on(person_actors(params, args.persons, false));
    let (met_bytes, _) = runtime.block_on(person_actors(params, args.persons, true));
    let (passivated_bytes, passivated_rss, passivated, rss_end) = runtime.block_on(
        passivated_persons(params, args.passivated, args.passivation_round),
    );
    if passivated > 0 {
        eprintln!(
            "{passivated} passivated persons: {passivated_bytes:.0} heap bytes each \
             ({passivated_rss:.0} RSS); process RSS {rss_end} bytes"
        );
    }
    // A part measured over nothing (its count 0) prints null, not a quotient of noise.
    let per = |measured: bool, v: f64| measured.then(|| v.round());
    let (points, actors, passivated_any) = (retained > 0, args.persons > 0, passivated > 0);
    println!(
        "{}",
        serde_json::json!({
            "passivated_persons": passivated,
            "bytes_per_passivated_person": per(passivated_any, passivated_bytes),
            "rss_bytes_per_passivated_person": per(passivated_any, passivated_rss),
            "rss_bytes_with_passivated_persons": rss_end,
            "retained_points": retained,
            "bytes_per_retained_point": per(points, point_bytes),
            "rss_bytes_per_retained_point": per(points, point_rss),
            "router_bytes_per_retained_point": per(points, router_point_bytes),
            "zone_bytes_per_retained_point": per(points, point_bytes - router_point_bytes),
            "person_actors": args.persons,
            "bytes_per_person_actor": per(actors, actor_bytes),
            "bytes_per_person_actor_with_an_episode": per(actors, met_bytes),
            "rss_bytes_per_person_actor": per(actors, actor_rss),
            "bytes_per_empty_actor": per(actors, floor_bytes),
            "bytes_per_linked_empty_actor": per(actors, linked_bytes),
            "rss_bytes_per_linked_empty_actor": per(actors, linked_rss),
            "rss_bytes_per_empty_actor": per(actors, floor_rss),
        })
    );
}

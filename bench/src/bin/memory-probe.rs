//! `memory-probe`: live heap bytes per retained zone point (all of them, and apart the router's
//! fine-cell cache and the zone partition's index and cache), per person actor and per empty
//! ractor actor (the runtime's floor), measured with a counting allocator. The last line is one JSON object with the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use clap::Parser;
use ractor::Actor;
use udaconnect_actors::actors::in_process::MemoryConnections;
use udaconnect_actors::actors::person::{
    PersonSupervisor, PersonSupervisorArgs, PersonSupervisorMsg,
};
use udaconnect_actors::domain::{derived_event_id, LocationEvent, MICROS_PER_S};
use udaconnect_actors::messages::{PersonBatch, PersonUpdate, RoutedEvent};
use udaconnect_actors::zone_index::ZonePartition;
use udaconnect_actors::{EngineParams, Router};
use udaconnect_bench::rss_bytes;

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
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
}

const T0: i64 = 1_790_000_000 * MICROS_PER_S;

fn event(person: i64, i: usize) -> LocationEvent {
    // A 1 km square around a venue, 10 persons per 10 m cell, all within one window.
    let lat = 35.08 + (i % 1000) as f64 * 1e-5;
    let lon = -106.65 + ((i / 1000) % 1000) as f64 * 1.2e-5;
    let t = T0 + (i % 1000) as i64 * 1000;
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

/// Heap and RSS bytes per empty ractor actor, `count` of them running at once.
async fn empty_actor_floor(count: i64) -> (f64, f64) {
    let rss0 = rss_bytes();
    let before = live();
    let mut actors = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (actor, handle) = Actor::spawn(None, Empty, ()).await.expect("spawn");
        actors.push((actor, handle));
    }
    let bytes = (live() - before) as f64 / count.max(1) as f64;
    let rss = (rss_bytes() - rss0) as f64 / count.max(1) as f64;
    for (actor, handle) in actors {
        actor.stop(None);
        let _ = handle.await;
    }
    (bytes, rss)
}

fn main() {
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
    let (floor_bytes, floor_rss) = runtime.block_on(empty_actor_floor(args.persons));
    eprintln!(
        "{} empty ractor actors: {floor_bytes:.0} heap bytes each ({floor_rss:.0} RSS)",
        args.persons
    );
    let (actor_bytes, actor_rss) = runtime.block_on(async {
        let args_p = PersonSupervisorArgs {
            partition: 0,
            params,
            zone_partitions: 1,
            connections: Arc::new(MemoryConnections::new(false)),
            passivate_after_s: 86_400,
            capture: false,
            snapshot: None,
        };
        let (sup, _) = Actor::spawn(None, PersonSupervisor, args_p)
            .await
            .expect("spawn");
        let rss0 = rss_bytes();
        let before = live();
        for start in (1..=args.persons).step_by(10_000) {
            let updates: Vec<PersonUpdate> = (start..(start + 10_000).min(args.persons + 1))
                .map(|p| PersonUpdate::Sighting {
                    event: event(p, p as usize),
                    zone: 0,
                })
                .collect();
            let batch = PersonBatch {
                source: 0,
                updates,
                watermark: T0,
            };
            sup.call(
                |reply| PersonSupervisorMsg::Batch {
                    batches: vec![batch],
                    next_offset: 0,
                    permit: None,
                    done: Some(reply),
                },
                None,
            )
            .await
            .expect("batch");
        }
        let view = sup
            .call(PersonSupervisorMsg::View, None)
            .await
            .expect("view");
        let active = match view {
            ractor::rpc::CallResult::Success(v) => v.active_persons,
            _ => 0,
        };
        let bytes = (live() - before) as f64 / active.max(1) as f64;
        let rss = (rss_bytes() - rss0) as f64 / active.max(1) as f64;
        eprintln!(
            "{active} person actors: {bytes:.0} heap bytes each ({rss:.0} RSS), one sighting each"
        );
        sup.stop(None);
        (bytes, rss)
    });
    println!(
        "{}",
        serde_json::json!({
            "retained_points": retained,
            "bytes_per_retained_point": point_bytes.round(),
            "rss_bytes_per_retained_point": point_rss.round(),
            "router_bytes_per_retained_point": router_point_bytes.round(),
            "zone_bytes_per_retained_point": (point_bytes - router_point_bytes).round(),
            "person_actors": args.persons,
            "bytes_per_person_actor": actor_bytes.round(),
            "rss_bytes_per_person_actor": actor_rss.round(),
            "bytes_per_empty_actor": floor_bytes.round(),
            "rss_bytes_per_empty_actor": floor_rss.round(),
        })
    );
}

//! On simulated conferences, the actor engine's final episodes equal the synchronous
//! engine's, whatever the partitioning.

use udaconnect_actors::actors::in_process::{ActorEngine, ActorEngineOptions};
use udaconnect_actors::{Engine, EngineOptions, EngineParams};
use udaconnect_bench::sim::{simulate, ConferenceConfig};

fn conference(
    attendees: u32,
    duration_s: u32,
    seed: u64,
) -> (EngineParams, Vec<udaconnect_actors::domain::LocationEvent>) {
    let mut config = ConferenceConfig::for_attendees(attendees);
    config.duration_s = duration_s;
    config.seed = seed;
    config.zone_resolution = 9;
    let params = EngineParams {
        zone_resolution: 9,
        episode_gap_s: 300,
        ..EngineParams::default()
    };
    (params, simulate(&config).expect("a valid conference"))
}

async fn compare(attendees: u32, duration_s: u32, seed: u64, zp: u32, pp: u32) {
    let (params, events) = conference(attendees, duration_s, seed);
    let mut sync = Engine::new(
        &params,
        EngineOptions {
            zone_partitions: 1,
            person_partitions: 1,
            capture: false,
            keep_copies: true,
        },
    )
    .unwrap();
    for chunk in events.chunks(5_000) {
        sync.ingest(chunk);
    }
    sync.finish();
    let expected = sync.episodes();
    assert!(
        expected.len() > 100,
        "the conference has episodes: {}",
        expected.len()
    );

    let options = ActorEngineOptions {
        zone_partitions: zp,
        person_partitions: pp,
        capacity: 2,
        passivate_after_s: 300,
        capture: false,
        keep_copies: true,
    };
    let mut actors = ActorEngine::start(&params, options, None).await.unwrap();
    for chunk in events.chunks(3_000) {
        actors.ingest(chunk).await.unwrap();
    }
    actors.finish().await.unwrap();
    assert_eq!(
        actors.episodes(),
        expected,
        "{zp} zone and {pp} person partitions"
    );
    let persons = actors.person_partitions().await.unwrap();
    let colocations: u64 = persons.iter().map(|p| p.counters.colocations).sum();
    assert_eq!(colocations, sync.stats().colocations);
    let zones = actors.zone_partitions().await.unwrap();
    assert!(
        zones.iter().map(|z| z.zones.len()).sum::<usize>() >= 2,
        "events straddle zones"
    );
    actors.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_conference_in_two_by_three_partitions() {
    compare(300, 900, 7, 2, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_conference_in_four_by_two_partitions() {
    compare(600, 400, 8, 4, 2).await;
}

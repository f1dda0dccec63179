//! The Kafka pipeline end to end, against the real broker and PostgreSQL: a simulated
//! conference goes through ingest → locations topic → zone stage → person-updates topic →
//! person stage → `connection`, and the result equals the reference engine's.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use udaconnect::pipeline::Pipeline;
use udaconnect::store::pipeline::{micros, timestamp};
use udaconnect_actors::domain::{Episode, LocationEvent, NewLocationEvent, MICROS_PER_S};
use udaconnect_actors::{Engine, EngineOptions, EngineParams};
use udaconnect_bench::sim::{ConferenceConfig, Simulation};

use crate::helpers::{scalar, test_config, TestApp, TestDb};

/// A simulated conference's events in arrival order (duplicates and disorder included).
fn conference(attendees: u32, duration_s: u32) -> (Simulation, Vec<LocationEvent>) {
    let mut config = ConferenceConfig::for_attendees(attendees);
    config.duration_s = duration_s;
    // Sparser than the default crowd (about a tenth of its co-locations per event): the test
    // is about exactness through Kafka, not load.
    config.booths = attendees / 4;
    config.talk_probability = 0.05;
    config.fit_venue();
    let sim = Simulation::new(config).expect("valid conference");
    let mut events = Vec::new();
    let mut it = sim.events();
    while let Some(batch) = it.next_batch() {
        events.extend_from_slice(batch);
    }
    (sim, events)
}

/// The reference: the synchronous engine, which the property tests hold equal to the oracle.
fn reference(events: &[LocationEvent], params: &EngineParams) -> Vec<Episode> {
    let mut engine = Engine::new(params, EngineOptions::default()).expect("valid params");
    for chunk in events.chunks(1_000) {
        engine.ingest(chunk);
    }
    engine.finish();
    engine.episodes()
}

async fn insert_persons(client: &tokio_postgres::Client, sim: &Simulation) {
    let persons: Vec<_> = sim.persons().collect();
    let ids: Vec<i64> = persons.iter().map(|p| p.id).collect();
    let first: Vec<&str> = persons.iter().map(|p| p.first_name.as_str()).collect();
    let last: Vec<&str> = persons.iter().map(|p| p.last_name.as_str()).collect();
    let company: Vec<&str> = persons.iter().map(|p| p.company_name.as_str()).collect();
    client
        .execute(
            "INSERT INTO person (id, first_name, last_name, company_name)
             SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[])",
            &[&ids, &first, &last, &company],
        )
        .await
        .expect("insert persons");
}

async fn stored_episodes(client: &tokio_postgres::Client) -> Vec<Episode> {
    client
        .query(
            "SELECT person_id, peer_id, started_at, last_seen_at, ended_at, colocations,
                    min_distance_m, lat, lon
             FROM connection ORDER BY person_id, peer_id, started_at",
            &[],
        )
        .await
        .expect("read connections")
        .iter()
        .map(|r| Episode {
            person: r.get(0),
            peer: r.get(1),
            started_at: micros(r.get(2)),
            last_seen_at: micros(r.get(3)),
            ended_at: r
                .get::<_, Option<chrono::DateTime<chrono::Utc>>>(4)
                .map(micros),
            colocations: r.get::<_, i32>(5) as u32,
            min_distance_m: r.get(6),
            lat: r.get(7),
            lon: r.get(8),
        })
        .collect()
}

/// Waits until every partition of both stages is owned here, and returns the pipeline.
async fn wait_for_assignment(app: &TestApp, zones: usize, persons: usize) -> Arc<Pipeline> {
    let pipeline = app.pipeline(Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = pipeline.status().await;
        let owned: Vec<usize> = status.stages.iter().map(|s| s.partitions.len()).collect();
        if owned == [zones, persons] {
            return pipeline;
        }
        assert!(
            Instant::now() < deadline,
            "partitions not assigned: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until both stages have processed everything in their topics and every episode is
/// closed, for up to `within`.
async fn wait_until_settled(
    pipeline: &Pipeline,
    client: &tokio_postgres::Client,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    let mut quiet = 0;
    loop {
        let status = pipeline.status().await;
        let open = scalar(
            client,
            "SELECT count(*) FROM connection WHERE ended_at IS NULL",
        )
        .await;
        let done = status.lag_total == 0
            && status
                .stages
                .iter()
                .flat_map(|s| &s.partitions)
                .all(|p| p.end_offset >= 0 && p.processed_offset == p.end_offset);
        quiet = if done && open == 0 { quiet + 1 } else { 0 };
        if quiet >= 3 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pipeline not settled within {within:?}: open episodes {open}, {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn wire(e: &LocationEvent) -> NewLocationEvent {
    NewLocationEvent {
        event_id: Some(e.event_id),
        person_id: e.person_id,
        lat: e.lat,
        lon: e.lon,
        recorded_at: e.recorded_at,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_conference_through_kafka_equals_the_reference() {
    let (sim, events) = conference(2_000, 600);
    let stats = {
        let mut it = sim.events().count_zones(true);
        while it.next_batch().is_some() {}
        it.stats().clone()
    };
    assert!(
        stats.zones_touched >= 2,
        "the venue must straddle zones: {stats:?}"
    );
    assert!(
        stats.duplicates > 0 && stats.max_disorder_us > 0,
        "{stats:?}"
    );

    let (db, client) = TestDb::migrated().await;
    insert_persons(&client, &sim).await;
    let mut config = test_config(&db);
    config.locations_partitions = 4;
    config.person_updates_partitions = 3;
    config.zone_resolution = sim.config().zone_resolution;
    let params = config.engine_params();
    let app = TestApp::spawn(config).await;
    let pipeline = wait_for_assignment(&app, 4, 3).await;

    // Ingest in requests of 2,000 events, as a gateway would.
    let ingestor = pipeline.ingestor();
    let mut accepted = 0;
    for chunk in events.chunks(2_000) {
        let wire: Vec<NewLocationEvent> = chunk.iter().map(wire).collect();
        let report = ingestor
            .ingest(&wire)
            .await
            .expect("the broker acknowledged");
        assert!(report.rejected.is_empty(), "{:?}", &report.rejected[..1]);
        accepted += report.accepted.len();
    }
    assert_eq!(accepted, events.len());
    // The end of the conference: event time moves past every episode's end.
    let last = events.iter().map(|e| e.recorded_at).max().expect("events");
    let end = last
        + i64::from(params.episode_gap_s + params.lateness_s + params.window_s + 1) * MICROS_PER_S;
    ingestor
        .advance_event_time(end)
        .await
        .expect("heartbeat acknowledged");

    wait_until_settled(&pipeline, &client, Duration::from_secs(600)).await;

    // Every accepted event is stored exactly once.
    let unique: BTreeSet<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
    let stored: Vec<uuid::Uuid> = client
        .query("SELECT event_id FROM location ORDER BY event_id", &[])
        .await
        .expect("read locations")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        stored.len(),
        unique.len(),
        "location rows vs distinct events"
    );
    assert_eq!(stored, unique.into_iter().collect::<Vec<_>>());
    // Stored as the POC stored points: X = latitude.
    let sample = &events[events.len() / 2];
    let row = client
        .query_one(
            "SELECT ST_X(coordinate), ST_Y(coordinate), recorded_at FROM location WHERE event_id = $1",
            &[&sample.event_id],
        )
        .await
        .expect("sample row");
    assert_eq!(
        (
            row.get::<_, f64>(0),
            row.get::<_, f64>(1),
            row.get::<_, chrono::DateTime<chrono::Utc>>(2)
        ),
        (sample.lat, sample.lon, timestamp(sample.recorded_at))
    );

    // The connection table equals the reference, row for row.
    let expected = reference(&events, &params);
    let got = stored_episodes(&client).await;
    assert!(
        expected.len() > 1_000,
        "a conference has many episodes: {}",
        expected.len()
    );
    assert_eq!(got.len(), expected.len(), "episode count");
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e);
    }

    let status = pipeline.status().await;
    assert_eq!(status.dead_letters, 0);
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

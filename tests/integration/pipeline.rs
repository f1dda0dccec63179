//! The Kafka pipeline end to end, against the real broker and PostgreSQL: a simulated
//! conference goes through ingest → locations topic → zone stage → person-updates topic →
//! person stage → `connection`, and the result equals the reference engine's.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use udaconnect::pipeline::hub::{NotificationHub, Subscription};
use udaconnect::pipeline::ingest::Ingestor;
use udaconnect::pipeline::Pipeline;
use udaconnect::store::timestamp;
use udaconnect_actors::actors::ports::Stage;
use udaconnect_actors::domain::{
    Episode, LocationEvent, Micros, NewLocationEvent, Notification, NotificationKind, MICROS_PER_S,
};
use udaconnect_actors::{Engine, EngineOptions, EngineParams};
use udaconnect_bench::produce::{ensure_persons, wire};
use udaconnect_bench::sim::{ConferenceConfig, Simulation};

use crate::helpers::{
    eventually, scalar, spawn_serve, test_config, test_config_for, PrivatePostgres, TestApp, TestDb,
};

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
pub(crate) fn reference(events: &[LocationEvent], params: &EngineParams) -> Vec<Episode> {
    let mut engine = Engine::new(params, EngineOptions::default()).expect("valid params");
    for chunk in events.chunks(1_000) {
        engine.ingest(chunk);
    }
    engine.finish();
    engine.episodes()
}

/// The simulation's attendees, inserted into the database at `url`.
async fn insert_persons(url: &str, sim: &Simulation) {
    let pool =
        udaconnect::store::pool(&test_config_for(url), Duration::from_secs(5)).expect("pool");
    let inserted = ensure_persons(&pool, sim).await.expect("insert persons");
    assert_eq!(inserted, sim.persons().count() as u64);
}

async fn stored_episodes(client: &tokio_postgres::Client) -> Vec<Episode> {
    udaconnect_bench::scratch::stored_episodes(client)
        .await
        .expect("read connections")
}

/// Waits until every partition of both stages is owned here, and returns the pipeline.
pub(crate) async fn wait_for_assignment(
    app: &TestApp,
    zones: usize,
    persons: usize,
) -> Arc<Pipeline> {
    let pipeline = app.pipeline(Duration::from_secs(60)).await;
    eventually("partitions assigned", Duration::from_secs(60), || async {
        let status = pipeline.status().await;
        let owned: Vec<usize> = status.stages.iter().map(|s| s.partitions.len()).collect();
        (owned == [zones, persons])
            .then_some(())
            .ok_or_else(|| format!("{status:?}"))
    })
    .await;
    pipeline
}

/// Waits until both stages have processed everything in their topics, a stored snapshot of
/// every person partition covers it all (so every episode change is stored: a snapshot is
/// stored only after the changes it covers) and every episode is closed, for up to `within`.
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
        let snapshots: BTreeMap<i32, i64> = client
            .query(
                "SELECT partition, next_offset FROM shard_snapshot WHERE stage = 'persons'",
                &[],
            )
            .await
            .expect("read shard_snapshot")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let processed = status
            .stages
            .iter()
            .flat_map(|s| &s.partitions)
            .all(|p| p.end_offset >= 0 && p.processed_offset == p.end_offset);
        let stored = status.stages[1]
            .partitions
            .iter()
            .all(|p| p.end_offset == 0 || snapshots.get(&p.partition) == Some(&p.end_offset));
        let done = status.lag_total == 0 && processed && stored;
        quiet = if done && open == 0 { quiet + 1 } else { 0 };
        if quiet >= 3 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pipeline not settled within {within:?}: open episodes {open}, person snapshots \
             {snapshots:?}, {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Ingests `events` in requests of 2,000 with 4 in flight, as a gateway would (the pipeline
/// bench's shape: each request waits for look-ups in PostgreSQL before it produces, and a
/// later one must not overtake it); returns the accepted count.
async fn ingest_all(ingestor: &Ingestor, events: &[LocationEvent]) -> usize {
    use futures::StreamExt;

    futures::stream::iter(events.chunks(2_000))
        .map(|chunk| async move {
            let wire: Vec<NewLocationEvent> = chunk.iter().map(wire).collect();
            let report = ingestor
                .ingest(&wire)
                .await
                .expect("the broker acknowledged");
            assert!(report.rejected.is_empty(), "{:?}", &report.rejected[..1]);
            report.accepted.len()
        })
        .buffered(4)
        .fold(0, |total, n| async move { total + n })
        .await
}

/// Every notification a subscription receives, collected in the background.
fn collect(mut subscription: Subscription) -> Arc<Mutex<Vec<Arc<Notification>>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Some(n) = subscription.recv().await {
            sink.lock().expect("lock").push(n);
        }
    });
    seen
}

fn episode_key(e: &Episode) -> (i64, i64, Micros) {
    (e.person, e.peer, e.started_at)
}

/// What a subscriber saw after the hub's dedupe: every id once, and one `connection.ended`
/// per final episode, equal to it (so no episode was announced ended twice or wrongly).
/// Waits up to a minute for the last notifications to arrive.
async fn assert_notifications(seen: &Mutex<Vec<Arc<Notification>>>, expected: &[Episode]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut want: Vec<Episode> = expected.to_vec();
    want.sort_by_key(episode_key);
    loop {
        let notes = seen.lock().expect("lock").clone();
        let mut ended: Vec<Episode> = notes
            .iter()
            .filter(|n| n.kind == NotificationKind::Ended)
            .map(|n| n.episode)
            .collect();
        ended.sort_by_key(episode_key);
        if ended.len() >= want.len() || Instant::now() >= deadline {
            let ids: HashSet<uuid::Uuid> = notes.iter().map(|n| n.id).collect();
            assert_eq!(ids.len(), notes.len(), "notification ids seen twice");
            let started = notes
                .iter()
                .filter(|n| n.kind == NotificationKind::Started)
                .count();
            assert!(
                started >= want.len(),
                "{started} started, {} episodes",
                want.len()
            );
            assert_eq!(ended.len(), want.len(), "one connection.ended per episode");
            for (g, e) in ended.iter().zip(&want) {
                assert_eq!(g, e);
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls until `connection` equals `expected` and `location` holds `unique` rows, for up to
/// `within`; panics with the difference and `context()` (a log) otherwise.
pub(crate) async fn wait_for_reference(
    client: &tokio_postgres::Client,
    expected: &[Episode],
    unique: usize,
    within: Duration,
    context: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + within;
    loop {
        let got = stored_episodes(client).await;
        let stored = scalar(client, "SELECT count(*) FROM location").await;
        if got == expected && stored as usize == unique {
            return;
        }
        if Instant::now() >= deadline {
            let missing = expected.iter().filter(|e| !got.contains(e)).count();
            let extra = got.iter().filter(|e| !expected.contains(e)).count();
            panic!(
                "{} episodes stored, {} expected ({missing} missing, {extra} unexpected); \
                 {stored} of {unique} locations; {}",
                got.len(),
                expected.len(),
                context()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The value of the sample `name` (with its labels, as written) in a Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .parse()
        .expect("a number")
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
    insert_persons(&db.url, &sim).await;
    let mut config = test_config(&db);
    config.locations_partitions = 4;
    config.person_updates_partitions = 3;
    config.zone_resolution = sim.config().zone_resolution;
    let params = config.engine_params();
    let app = TestApp::spawn(config).await;
    let pipeline = wait_for_assignment(&app, 4, 3).await;
    let seen = collect(pipeline.hub().subscribe_all_queued(1 << 20));
    let one_person = collect(pipeline.hub().subscribe(&[1]));

    let ingestor = pipeline.ingestor();
    assert_eq!(ingest_all(ingestor, &events).await, events.len());
    // The end of the conference: event time moves past every episode's end.
    ingestor.finish().await.expect("heartbeat acknowledged");

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

    // A subscriber of everyone saw each notification once and every episode end; the
    // subscriber of person 1 only person 1's.
    assert_notifications(&seen, &expected).await;
    let mine: Vec<Episode> = expected.iter().filter(|e| e.person == 1).copied().collect();
    assert!(!mine.is_empty(), "person 1 met somebody");
    assert_notifications(&one_person, &mine).await;

    let status = pipeline.status().await;
    assert_eq!(status.dead_letters, 0);
    // `shard_owner`: this process owns all 4 + 3 partitions, each with a snapshot.
    let owners: BTreeMap<(String, i32), &str> = status
        .owners
        .iter()
        .map(|o| ((o.stage.clone(), o.partition), o.owner.as_str()))
        .collect();
    assert_eq!(owners.len(), 7, "{:?}", status.owners);
    assert!(owners.values().all(|o| *o == status.node), "{owners:?}");
    assert!(status.owners.iter().all(|o| o.snapshot_offset.is_some()));

    // `/metrics` agrees with what happened.
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "udaconnect_pipeline_up"), 1.0);
    assert_eq!(
        metric(
            &metrics,
            "udaconnect_ingest_events_total{result=\"accepted\"}"
        ),
        events.len() as f64
    );
    assert_eq!(
        metric(&metrics, "udaconnect_locations_stored_total"),
        stored.len() as f64
    );
    assert_eq!(metric(&metrics, "udaconnect_lag_total"), 0.0);
    assert_eq!(metric(&metrics, "udaconnect_dead_letters_total"), 0.0);
    let colocations: f64 = (0..3)
        .map(|p| {
            metric(
                &metrics,
                &format!(
                    "udaconnect_partition_colocations_total{{stage=\"persons\",partition=\"{p}\"}}"
                ),
            )
        })
        .sum();
    assert!(
        colocations >= expected.len() as f64,
        "{colocations} co-locations"
    );
    assert!(metrics.contains("# TYPE udaconnect_stage_batch_records histogram"));
    assert!(
        metric(&metrics, "udaconnect_hub_delivered_total") >= 2.0 * expected.len() as f64,
        "both subscribers got their notifications"
    );
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// A record read back: payload and headers.
type ReadRecord = (Vec<u8>, Vec<(String, String)>);

/// Reads up to `want` records of partition 0 of `topic` from the start.
fn read_topic(brokers: &str, topic: &str, want: usize) -> Vec<ReadRecord> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};

    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                            (h.key.to_owned(), value.unwrap_or_default())
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push((m.payload().unwrap_or_default().to_vec(), headers));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_goes_to_the_dead_letter_topic_and_the_partition_keeps_flowing() {
    let (sim, events) = conference(200, 300);
    let (db, client) = TestDb::migrated().await;
    insert_persons(&db.url, &sim).await;
    let mut config = test_config(&db);
    config.locations_partitions = 1;
    config.person_updates_partitions = 1;
    config.zone_resolution = sim.config().zone_resolution;
    let params = config.engine_params();
    let app = TestApp::spawn(config.clone()).await;
    let pipeline = wait_for_assignment(&app, 1, 1).await;
    let topics = config.topics();

    // The poison first, then the whole conference behind it in the same partition.
    let producer = udaconnect::kafka::Producer::new(&config).expect("producer");
    producer
        .send_all(&[udaconnect::kafka::OutRecord {
            topic: &topics.locations,
            partition: Some(0),
            key: None,
            payload: vec![0xff, 1, 2, 3],
            headers: Vec::new(),
        }])
        .await
        .expect("poison produced");
    let wire: Vec<NewLocationEvent> = events.iter().map(wire).collect();
    let report = pipeline.ingestor().ingest(&wire).await.expect("ingested");
    assert_eq!(report.accepted.len(), events.len());
    pipeline.ingestor().finish().await.expect("heartbeat");
    wait_until_settled(&pipeline, &client, Duration::from_secs(300)).await;

    let expected = reference(&events, &params);
    assert!(!expected.is_empty());
    assert_eq!(stored_episodes(&client).await, expected);
    assert_eq!(pipeline.status().await.dead_letters, 1);

    let dead = read_topic(&config.kafka_brokers, &topics.locations_dlq, 1);
    assert_eq!(dead.len(), 1, "one dead letter");
    let (payload, headers) = &dead[0];
    assert_eq!(payload, &vec![0xff, 1, 2, 3]);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("header {name} in {headers:?}"))
    };
    assert_eq!(
        header("reason"),
        "unknown record format 255 (this version reads 1)"
    );
    assert_eq!(header("source.topic"), topics.locations);
    assert_eq!(header("source.offset"), "0");
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// A conference of `attendees` over `duration_s`, its persons in a fresh database, and a
/// configuration with 4 zone and 3 person partitions.
pub(crate) async fn conference_in_db(
    attendees: u32,
    duration_s: u32,
) -> (
    Vec<LocationEvent>,
    TestDb,
    tokio_postgres::Client,
    udaconnect::Config,
) {
    let (sim, events) = conference(attendees, duration_s);
    let (db, client) = TestDb::migrated().await;
    insert_persons(&db.url, &sim).await;
    let mut config = test_config(&db);
    config.locations_partitions = 4;
    config.person_updates_partitions = 3;
    config.zone_resolution = sim.config().zone_resolution;
    (events, db, client, config)
}

/// Ingests `rest`, ends the conference, and waits until `connection` equals the reference
/// and `location` holds every distinct event; returns the reference.
async fn finish_and_compare(
    ingestor: &Ingestor,
    rest: &[LocationEvent],
    events: &[LocationEvent],
    params: &EngineParams,
    client: &tokio_postgres::Client,
    context: impl FnOnce() -> String,
) -> Vec<Episode> {
    ingest_all(ingestor, rest).await;
    ingestor.finish().await.expect("heartbeat");
    let expected = reference(events, params);
    let unique: BTreeSet<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
    wait_for_reference(
        client,
        &expected,
        unique.len(),
        Duration::from_secs(240),
        context,
    )
    .await;
    expected
}

/// A test that plays the gateway: its own ingestor produces to the topics of a service run
/// as child processes, once those exist.
async fn gateway(config: &udaconnect::Config) -> Ingestor {
    let broker = udaconnect::kafka::Broker::new(config).expect("kafka client");
    let topics = config.topics();
    let partitions = config.locations_partitions;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !broker
        .partition_counts(Duration::from_secs(5))
        .await
        .map(|c| {
            [
                &topics.locations,
                &topics.person_updates,
                &topics.connections,
            ]
            .iter()
            .all(|t| c.iter().any(|(n, k)| n == *t && *k > 0))
        })
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "topics not created");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pool = udaconnect::store::pool(config, Duration::from_secs(5)).expect("pool");
    let producer = udaconnect::kafka::Producer::new(config).expect("producer");
    Ingestor::new(config, producer, pool, partitions as u32)
}

/// The test's own notification hub on the service's connections topic.
async fn hub(config: &udaconnect::Config) -> NotificationHub {
    let config = config.clone();
    tokio::task::spawn_blocking(move || NotificationHub::start(&config, Default::default()))
        .await
        .expect("no panic")
        .expect("hub started")
}

/// `(stage, partition) → owner` from `shard_owner`.
async fn owners(client: &tokio_postgres::Client) -> BTreeMap<(String, i32), String> {
    client
        .query("SELECT stage, partition, owner FROM shard_owner", &[])
        .await
        .expect("read shard_owner")
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect()
}

/// Waits until `shard_owner` satisfies `ok`, for up to `within`.
async fn wait_for_owners(
    client: &tokio_postgres::Client,
    within: Duration,
    what: &str,
    ok: impl Fn(&BTreeMap<(String, i32), String>) -> bool,
) {
    eventually(what, within, || async {
        let now = owners(client).await;
        ok(&now)
            .then_some(())
            .ok_or_else(|| format!("shard_owner is {now:?}"))
    })
    .await;
}

fn read_log(path: &std::path::Path) -> String {
    format!(
        "log:\n{}",
        std::fs::read_to_string(path).unwrap_or_default()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_and_restart_still_equals_the_reference() {
    let (events, db, client, config) = conference_in_db(1_000, 600).await;
    let params = config.engine_params();
    let log = tempfile::NamedTempFile::new().expect("log file");
    let port = crate::helpers::free_port();
    let mut child = spawn_serve(&config, (port, 0), "first", log.path());
    let ingestor = gateway(&config).await;
    // A subscriber in another process: it sees the notifications replayed after the crash
    // only once.
    let hub = hub(&config).await;
    let seen = collect(hub.subscribe_all_queued(1 << 20));

    let (first, rest) = events.split_at(events.len() * 3 / 5);
    ingest_all(&ingestor, first).await;
    // Kill once both stages have stored a snapshot and are still busy.
    eventually(
        "snapshots of both stages",
        Duration::from_secs(120),
        || async {
            match scalar(&client, "SELECT count(DISTINCT stage) FROM shard_snapshot").await {
                2 => Ok(()),
                n => Err(format!("{n} stages")),
            }
        },
    )
    .await;
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    let before = scalar(&client, "SELECT count(*) FROM location").await;
    assert!(
        (before as usize) < first.len(),
        "killed mid-stream: {before} of {} stored",
        first.len()
    );

    let mut child = spawn_serve(&config, (port, 0), "second", log.path());
    let expected = finish_and_compare(&ingestor, rest, &events, &params, &client, || {
        read_log(log.path())
    })
    .await;
    assert_notifications(&seen, &expected).await;
    // The restarted process owns every partition now.
    let now = owners(&client).await;
    assert_eq!(now.len(), 7, "{now:?}");
    assert!(now.values().all(|o| o == "second"), "{now:?}");
    hub.stop().await;
    child.kill().expect("stop");
    child.wait().expect("reaped");
    db.drop_db().await;
}

/// Sends SIGTERM to a child and waits up to a minute for it to exit; returns its status.
fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "no exit within 60 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_split_the_partitions_and_hand_them_over_on_shutdown() {
    let (events, db, client, config) = conference_in_db(1_000, 600).await;
    let params = config.engine_params();
    let log = tempfile::NamedTempFile::new().expect("log file");
    let (port_a, port_b) = (crate::helpers::free_port(), crate::helpers::free_port());
    let mut a = spawn_serve(&config, (port_a, 0), "node-a", log.path());
    let mut b = spawn_serve(&config, (port_b, 0), "node-b", log.path());
    let ingestor = gateway(&config).await;

    // Both processes own partitions of both stages.
    let split = |o: &BTreeMap<(String, i32), String>| {
        o.len() == 7
            && ["zones", "persons"].iter().all(|stage| {
                let of: BTreeSet<&String> = o
                    .iter()
                    .filter(|((s, _), _)| s == stage)
                    .map(|(_, owner)| owner)
                    .collect();
                of.len() == 2
            })
    };
    wait_for_owners(&client, Duration::from_secs(120), "split", split).await;

    let (first, rest) = events.split_at(events.len() / 2);
    ingest_all(&ingestor, first).await;
    // Let both work on it (until `a` has processed records of its own partitions, by its
    // status), then stop `a` gracefully: it flushes, snapshots and commits its partitions, and
    // `b` takes them over from those snapshots.
    eventually(
        "node-a processed records",
        Duration::from_secs(120),
        || async {
            let (_, status) =
                crate::helpers::get_json(&format!("http://127.0.0.1:{port_a}/v1/status")).await;
            let worked = status["partitions"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["local"] == true && p["processed_offset"].as_i64() > Some(0))
            });
            worked
                .then_some(())
                .ok_or_else(|| format!("{status} {}", read_log(log.path())))
        },
    )
    .await;
    let of_a: Vec<(String, i32)> = owners(&client)
        .await
        .into_iter()
        .filter(|(_, owner)| owner == "node-a")
        .map(|(key, _)| key)
        .collect();
    let status = terminate(&mut a);
    assert!(status.success(), "node-a exited with {status}");
    // node-b restores what node-a owned from the snapshots node-a stored on release.
    let mut snapshotted = 0;
    for (stage, partition) in &of_a {
        snapshotted += client
            .query_one(
                "SELECT count(*) FROM shard_snapshot WHERE stage = $1 AND partition = $2",
                &[stage, partition],
            )
            .await
            .expect("snapshot rows")
            .get::<_, i64>(0);
    }
    // A partition that never received a record has nothing to snapshot (a zone partition
    // whose zones hold no attendee); node-a worked on some.
    assert!(
        snapshotted >= 1,
        "no snapshot of node-a's partitions {of_a:?}: {}",
        read_log(log.path())
    );
    wait_for_owners(
        &client,
        Duration::from_secs(120),
        "handover to node-b",
        |o| o.len() == 7 && o.values().all(|owner| owner == "node-b"),
    )
    .await;

    finish_and_compare(&ingestor, rest, &events, &params, &client, || {
        read_log(log.path())
    })
    .await;
    let status = terminate(&mut b);
    assert!(status.success(), "node-b exited with {status}");
    // A graceful stop releases the owner rows.
    assert_eq!(owners(&client).await.len(), 0);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_partition_held_back_for_a_minute_still_equals_the_reference() {
    let (events, db, client, config) = conference_in_db(1_000, 600).await;
    let params = config.engine_params();
    // Hold back the zone partition that receives the most event copies.
    let mut copies = [0usize; 4];
    {
        let mut router = udaconnect_actors::sync_engine::Router::new(&params, 4);
        for e in &events {
            router.route(e, |p, _| copies[p as usize] += 1);
        }
    }
    let held = (0..4).max_by_key(|p| copies[*p]).expect("partitions") as i32;
    assert!(
        copies.iter().filter(|c| **c > 0).count() >= 2,
        "the other partitions have work too: {copies:?}"
    );
    let app = TestApp::spawn(config).await;
    let pipeline = wait_for_assignment(&app, 4, 3).await;
    pipeline.pause(Stage::Zones, held).await;
    let paused_at = Instant::now();

    let ingestor = pipeline.ingestor();
    ingest_all(ingestor, &events).await;
    ingestor.finish().await.expect("heartbeat");

    // The others run ahead to the end of their topics while `held` has not moved.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = pipeline.status().await;
        let zones = &status.stages[0];
        let others_done = zones
            .partitions
            .iter()
            .filter(|p| p.partition != held)
            .all(|p| p.end_offset > 0 && p.lag == Some(0));
        let behind = zones
            .partitions
            .iter()
            .find(|p| p.partition == held)
            .expect("held partition owned");
        if others_done {
            assert_eq!(behind.processed_offset, 0, "held back: {behind:?}");
            assert!(behind.lag > Some(0), "{behind:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "others did not finish: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Watermark alignment: no episode may close while a zone partition lags, so nothing is
    // ended yet (checked once episode changes had time to be written).
    tokio::time::sleep(udaconnect_actors::actors::person::CHANGES_FLUSH_INTERVAL * 2).await;
    let ended = scalar(
        &client,
        "SELECT count(*) FROM connection WHERE ended_at IS NOT NULL",
    )
    .await;
    assert_eq!(
        ended, 0,
        "episodes closed while a zone partition was held back"
    );
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(paused_at.elapsed())).await;
    pipeline.resume(Stage::Zones, held).await;

    wait_until_settled(&pipeline, &client, Duration::from_secs(300)).await;
    let expected = reference(&events, &params);
    let got = stored_episodes(&client).await;
    assert_eq!(got.len(), expected.len(), "episode count");
    assert!(got == expected, "episodes differ from the reference");
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_20_s_mid_stream_loses_nothing() {
    let (sim, events) = conference(1_000, 600);
    let mut pg = PrivatePostgres::start().await;
    let (admin, connection) = tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls)
        .await
        .expect("private postgres");
    tokio::spawn(connection);
    admin
        .batch_execute("CREATE DATABASE udaconnect")
        .await
        .expect("create database");
    let url = pg.url("udaconnect");
    let mut config = test_config_for(&url);
    config.locations_partitions = 4;
    config.person_updates_partitions = 3;
    config.zone_resolution = sim.config().zone_resolution;
    let params = config.engine_params();
    let app = TestApp::spawn(config).await;
    let connect = || async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        client
    };
    insert_persons(&url, &sim).await;
    let pipeline = wait_for_assignment(&app, 4, 3).await;
    let ingestor = pipeline.ingestor();

    let (first, rest) = events.split_at(events.len() / 2);
    ingest_all(ingestor, first).await;
    // PostgreSQL goes away mid-stream for 20 s. Ingest goes on (the persons are known); a
    // request that needs the database fails and the gateway sends it again, as a client
    // would (event ids make the resend idempotent).
    pg.stop();
    let stopped = Instant::now();
    let mut resent = 0;
    for chunk in rest.chunks(2_000) {
        let wire: Vec<NewLocationEvent> = chunk.iter().map(wire).collect();
        loop {
            if stopped.elapsed() >= Duration::from_secs(20) && !pg.is_running() {
                pg.start_again().await;
            }
            match ingestor.ingest(&wire).await {
                Ok(report) => {
                    assert!(report.rejected.is_empty(), "{:?}", &report.rejected[..1]);
                    break;
                }
                Err(_) => {
                    resent += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(stopped.elapsed())).await;
    if !pg.is_running() {
        pg.start_again().await;
    }
    ingestor.finish().await.expect("heartbeat");
    let client = connect().await;
    wait_until_settled(&pipeline, &client, Duration::from_secs(300)).await;
    let expected = reference(&events, &params);
    let unique: BTreeSet<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
    wait_for_reference(
        &client,
        &expected,
        unique.len(),
        Duration::from_secs(10),
        || format!("{resent} ingest requests were sent again"),
    )
    .await;
    let status = pipeline.status().await;
    let retries: u64 = status
        .stages
        .iter()
        .flat_map(|s| &s.partitions)
        .map(|p| p.figures.counters["port_retries"])
        .sum();
    assert!(retries > 0, "the stages noticed the outage");
    app.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_command_sends_a_file_and_names_rejected_lines() {
    let (db, client) = TestDb::migrated().await;
    client
        .batch_execute(
            "INSERT INTO person (id, first_name, last_name, company_name)
             VALUES (1, 'Ada', 'L', 'A'), (2, 'Bo', 'M', 'B')",
        )
        .await
        .expect("persons");
    let mut config = test_config(&db);
    config.locations_partitions = 2;
    config.person_updates_partitions = 2;
    let app = TestApp::spawn(config.clone()).await;
    wait_for_assignment(&app, 2, 2).await;

    let file = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(
        file.path(),
        concat!(
            r#"{"person_id":1,"lat":35.0845,"lon":-106.6511,"recorded_at":"2026-03-10T09:00:00Z"}"#,
            "\n",
            r#"{"person_id":2,"lat":35.08451,"lon":-106.6511,"recorded_at":"2026-03-10T09:00:05Z"}"#,
            "\n",
            r#"{"person_id":1,"lat":"north","lon":-106.6511,"recorded_at":"2026-03-10T09:00:00Z"}"#,
            "\n",
            r#"{"person_id":999,"lat":35.0845,"lon":-106.6511,"recorded_at":"2026-03-10T09:00:00Z"}"#,
            "\n",
            r#"{"person_id":2,"lat":91.5,"lon":-106.6511,"recorded_at":"2026-03-10T09:00:00Z"}"#,
            "\n",
            r#"{"person_id":2,"lat":1e999,"lon":-106.6511,"recorded_at":"2026-03-10T09:00:00Z"}"#,
            "\n",
            r#"{"person_id":2,"lat":35.0845,"lon":-106.6511,"recorded_at":"2026-03-10T09:00:60Z"}"#,
            "\n",
        ),
    )
    .expect("write events");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_udaconnect"))
        .args(["ingest", "--file"])
        .arg(file.path())
        .env("UDACONNECT_DATABASE_URL", config.database_url.expose())
        .env("UDACONNECT_KAFKA_BROKERS", &config.kafka_brokers)
        // The file's reports are of 2026-03-10, older than the default late horizon.
        .env(
            "UDACONNECT_LATE_HORIZON_S",
            crate::helpers::REPLAY_HORIZON_S.to_string(),
        )
        // A horizon beyond the default retention needs retention off (or longer).
        .env("UDACONNECT_RETENTION_DAYS", "0")
        .env("UDACONNECT_TOPIC_PREFIX", &config.topic_prefix)
        .env("UDACONNECT_LOCATIONS_PARTITIONS", "2")
        .env("UDACONNECT_PERSON_UPDATES_PARTITIONS", "2")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run udaconnect ingest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "rejections make it fail: {stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a summary line")).expect("JSON");
    assert_eq!(
        (
            &summary["lines"],
            &summary["accepted"],
            &summary["rejected"]
        ),
        (&7.into(), &2.into(), &5.into()),
        "{summary}"
    );
    // The same rules and messages as a REST body.
    assert!(
        stderr.contains(r#"line 3: lat: must be a number (got the string "north")"#),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 4: person_id: no person with id 999"),
        "{stderr}"
    );
    assert!(stderr.contains("line 5: lat:"), "{stderr}");
    assert!(
        stderr.contains("line 6: lat: is a number out of the range"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 7: recorded_at: has second 60"),
        "{stderr}"
    );
    assert!(stderr.contains("5 of 7 lines were rejected"), "{stderr}");

    // The two accepted events went through the zone stage into `location`.
    eventually(
        "the accepted events stored",
        Duration::from_secs(60),
        || async {
            match scalar(&client, "SELECT count(*) FROM location").await {
                2 => Ok(()),
                n => Err(format!("{n} stored")),
            }
        },
    )
    .await;
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// The late path end to end: a tenth of the phones go offline for 5 to 30 minutes and upload
/// what they recorded meanwhile when they are back (after everyone else's reports have moved
/// event time on), out of order. The `connection` table equals the reference over all accepted
/// events (the engine, which the oracle property tests hold equal to the brute force), and
/// sending a suffix of the input again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_offline_for_up_to_30_minutes_upload_late_and_still_equal_the_reference() {
    let (events, db, client, config) = conference_in_db(500, 2_400).await;
    let params = config.engine_params();
    let start = events.iter().map(|e| e.recorded_at).min().expect("events");
    let mix = |x: u64| udaconnect_actors::zones::mix64(x);
    // Offline persons and their offline windows [from, to), from a hash of the person.
    let window = |person: i64| -> Option<(Micros, Micros)> {
        let h = mix(person as u64);
        if h % 10 != 3 {
            return None;
        }
        let from = start + ((h >> 8) % 1_500) as i64 * MICROS_PER_S;
        let minutes = 5 + ((h >> 24) % 26) as i64;
        Some((from, from + minutes * 60 * MICROS_PER_S))
    };
    let mut order: Vec<LocationEvent> = Vec::with_capacity(events.len());
    let mut held: Vec<(Micros, u64, LocationEvent)> = Vec::new();
    for e in &events {
        match window(e.person_id) {
            Some((from, to)) if (from..to).contains(&e.recorded_at) => {
                held.push((to, mix(e.event_id.as_u64_pair().0), *e));
            }
            _ => order.push(*e),
        }
    }
    // Each upload goes out, shuffled, once the others' reports have passed its window's end.
    held.sort_by_key(|(to, shuffle, _)| (*to, *shuffle));
    let uploaded = held.len();
    assert!(uploaded > 500, "offline reports: {uploaded}");
    let mut merged = Vec::with_capacity(events.len());
    let mut held = held.into_iter().peekable();
    let mut stream_time = Micros::MIN;
    for e in order {
        stream_time = stream_time.max(e.recorded_at);
        while let Some((_, _, h)) = held.next_if(|(to, _, _)| *to <= stream_time) {
            merged.push(h);
        }
        merged.push(e);
    }
    merged.extend(held.map(|(_, _, h)| h));
    assert_eq!(merged.len(), events.len());

    let app = TestApp::spawn(config).await;
    let pipeline = wait_for_assignment(&app, 4, 3).await;
    let ingestor = pipeline.ingestor();
    let expected = finish_and_compare(ingestor, &merged, &events, &params, &client, || {
        "offline uploads".to_owned()
    })
    .await;
    assert!(expected.len() > 500, "episodes: {}", expected.len());
    let status = pipeline.status().await;
    let late: u64 = status.stages[0]
        .partitions
        .iter()
        .map(|p| p.figures.counters.get("late_events").copied().unwrap_or(0))
        .sum();
    assert!(
        late as usize >= uploaded / 2,
        "late copies {late} of {uploaded} held back"
    );

    // The last half again, as a client retrying: nothing changes.
    ingest_all(ingestor, &merged[merged.len() / 2..]).await;
    wait_until_settled(&pipeline, &client, Duration::from_secs(300)).await;
    assert!(
        stored_episodes(&client).await == expected,
        "a replayed suffix changed the episodes"
    );
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

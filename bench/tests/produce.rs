//! `udaconnect-sim --produce`, the real binary, against the `./dev` stack (PostgreSQL and the
//! broker; `./dev test` exports `UDATEST_ADMIN_URL` and `UDATEST_KAFKA_BROKERS`): a fresh
//! database and topic prefix per test, the conference's events read back from the locations
//! topic and compared with the simulator's own.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_postgres::NoTls;
use udaconnect::pipeline::codec::LocationRecord;
use udaconnect_actors::domain::{LocationEvent, Micros, MICROS_PER_S};
use udaconnect_bench::sim::{ConferenceConfig, Simulation};
use uuid::Uuid;

fn admin_url() -> String {
    std::env::var("UDATEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/postgres".to_owned())
}

fn kafka_brokers() -> String {
    std::env::var("UDATEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".to_owned())
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {url} (is ./dev up?): {e}"));
    tokio::spawn(connection);
    client
}

/// A fresh, empty database (not migrated: the tool migrates).
struct TestDb {
    name: String,
    url: String,
}

impl TestDb {
    async fn new() -> Self {
        let name = format!("udaconnect_test_{}", Uuid::new_v4().simple());
        connect(&admin_url())
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let (base, _) = admin_url()
            .rsplit_once('/')
            .map(|(b, d)| (b.to_owned(), d.to_owned()))
            .expect("admin url with a database");
        let url = format!("{base}/{name}");
        Self { name, url }
    }

    async fn drop_db(self) {
        connect(&admin_url())
            .await
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .expect("drop test database");
    }
}

/// Runs `udaconnect-sim` with `args` and the service configuration in `env`.
async fn sim(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_udaconnect-sim"));
    command.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("udaconnect-sim finishes within 120 s")
        .expect("udaconnect-sim runs")
}

/// The last line of stdout, as JSON.
fn summary(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no summary on stdout; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    serde_json::from_str(last).unwrap_or_else(|e| panic!("summary {last:?}: {e}"))
}

/// The simulator's events for the flags the tests pass.
fn expected_events(attendees: u32, duration_s: u32) -> Vec<LocationEvent> {
    let mut config = ConferenceConfig::for_attendees(attendees);
    config.duration_s = duration_s;
    let sim = Simulation::new(config).expect("a valid conference");
    let mut events = Vec::new();
    let mut it = sim.events();
    while let Some(batch) = it.next_batch() {
        events.extend_from_slice(batch);
    }
    events
}

/// What the locations topic holds: the home copies' events and the heartbeats' times.
struct Topic {
    home: Vec<LocationEvent>,
    ghosts: usize,
    heartbeats: Vec<Micros>,
}

fn read_locations(topic: &str, partitions: i32) -> Topic {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", format!("test-{}", Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut ends = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        ends.push(high);
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let total: i64 = ends.iter().sum();
    let mut out = Topic {
        home: Vec::new(),
        ghosts: 0,
        heartbeats: Vec::new(),
    };
    let mut read = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read < total {
        assert!(
            std::time::Instant::now() < deadline,
            "read {read} of {total} records of {topic}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.expect("a record");
        read += 1;
        match LocationRecord::decode(message.payload()).expect("a locations record") {
            LocationRecord::Events(copies) => {
                for c in copies {
                    if c.home {
                        out.home.push(c.event);
                    } else {
                        out.ghosts += 1;
                    }
                }
            }
            LocationRecord::Heartbeat { max_event_time } => out.heartbeats.push(max_event_time),
        }
    }
    out
}

/// Event ids with how often each was sent.
fn id_counts<'a>(events: impl Iterator<Item = &'a LocationEvent>) -> BTreeMap<Uuid, u32> {
    let mut counts = BTreeMap::new();
    for e in events {
        *counts.entry(e.event_id).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_sends_the_conference_through_the_ingest_path_and_realtime_shifts_it_to_now() {
    let db = TestDb::new().await;
    let prefix = format!("test-{}", Uuid::new_v4().simple());
    let env = [
        ("UDACONNECT_DATABASE_URL", db.url.clone()),
        ("UDACONNECT_KAFKA_BROKERS", kafka_brokers()),
        ("UDACONNECT_TOPIC_PREFIX", prefix.clone()),
        ("UDACONNECT_LOCATIONS_PARTITIONS", "3".to_owned()),
    ];
    let topic = format!("{prefix}.locations");

    // As fast as acknowledgements allow, with the simulated times.
    let output = sim(
        &[
            "--produce",
            "--attendees",
            "60",
            "--duration-s",
            "180",
            "--batch",
            "500",
        ],
        &env,
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "udaconnect-sim failed: {stderr}");
    assert!(
        stderr.contains("persons 1..=60: 60 inserted, 0 already existed"),
        "{stderr}"
    );
    let expected = expected_events(60, 180);
    let s = summary(&output);
    assert_eq!(s["persons_inserted"], 60);
    assert_eq!(s["accepted"], expected.len() as u64);
    assert_eq!(s["sent"], expected.len() as u64);
    assert_eq!(s["rejected"], 0);
    assert_eq!(s["topic"], topic.as_str());
    assert_eq!(s["partitions"], 3);

    let client = connect(&db.url).await;
    let persons: Vec<i64> = client
        .query("SELECT id FROM person ORDER BY id", &[])
        .await
        .expect("persons")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(persons, (1..=60).collect::<Vec<i64>>());

    // Every event, duplicates included, is in the topic once per send as a home copy.
    let t = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || read_locations(&topic, 3)
    })
    .await
    .expect("read the topic");
    assert_eq!(
        id_counts(t.home.iter()),
        id_counts(expected.iter()),
        "home copies in {topic} vs the simulated events"
    );
    let sent: BTreeMap<Uuid, LocationEvent> = expected.iter().map(|e| (e.event_id, *e)).collect();
    for e in &t.home {
        let s = &sent[&e.event_id];
        assert_eq!(
            (e.person_id, e.lat, e.lon, e.recorded_at),
            (s.person_id, s.lat, s.lon, s.recorded_at)
        );
    }
    let last = expected
        .iter()
        .map(|e| e.recorded_at)
        .max()
        .expect("events");
    assert!(
        t.heartbeats.contains(&last),
        "a heartbeat carries the last event time"
    );

    // Paced: again (the persons exist now), shifted to now, 30× faster than real time.
    let before = Utc::now().timestamp_micros();
    let output = sim(
        &[
            "--produce",
            "--attendees",
            "60",
            "--duration-s",
            "60",
            "--realtime",
            "--speed",
            "30",
        ],
        &env,
    )
    .await;
    let after = Utc::now().timestamp_micros();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "udaconnect-sim --realtime failed: {stderr}"
    );
    let s = summary(&output);
    let paced = expected_events(60, 60);
    assert_eq!(s["persons_inserted"], 0);
    assert_eq!(s["accepted"], paced.len() as u64);
    assert_eq!(s["realtime"], true);
    let t = tokio::task::spawn_blocking(move || read_locations(&topic, 3))
        .await
        .expect("read the topic");
    let live: Vec<&LocationEvent> = t.home.iter().filter(|e| e.recorded_at >= before).collect();
    assert_eq!(live.len(), paced.len(), "the paced run's events");
    // The conference (60 s at 30×: 2 s) was stamped with times within the run.
    for e in &live {
        assert!(
            e.recorded_at <= after && e.received_at >= e.recorded_at,
            "recorded_at {} not within the run [{before}, {after}]",
            e.recorded_at
        );
    }
    let span = live.iter().map(|e| e.recorded_at).max().unwrap_or(0)
        - live.iter().map(|e| e.recorded_at).min().unwrap_or(0);
    assert!(
        span > 60 * MICROS_PER_S / 30 / 2 && span <= 60 * MICROS_PER_S / 30,
        "recorded_at spans {span} µs, the simulated minute compressed 30×"
    );
    // Duplicates keep one id after the shift.
    assert_eq!(
        id_counts(live.iter().copied()).len(),
        id_counts(paced.iter()).len()
    );

    let rows: i64 = client
        .query_one("SELECT count(*) FROM person", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 60);
    drop(client);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_names_the_service_it_cannot_reach() {
    let closed = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        listener.local_addr().expect("addr").port()
    };
    let broker = format!("127.0.0.1:{}", closed());
    let db = TestDb::new().await;
    let output = sim(
        &["--produce", "--attendees", "10", "--wait-s", "1"],
        &[
            ("UDACONNECT_DATABASE_URL", db.url.clone()),
            ("UDACONNECT_KAFKA_BROKERS", broker.clone()),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("kafka broker at {broker} is unreachable")),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "no summary after an error");

    let port = closed();
    let output = sim(
        &["--produce", "--attendees", "10", "--wait-s", "1"],
        &[
            (
                "UDACONNECT_DATABASE_URL",
                format!("postgres://postgres@127.0.0.1:{port}/udaconnect"),
            ),
            ("UDACONNECT_KAFKA_BROKERS", kafka_brokers()),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!(
            "postgres at postgres://postgres@127.0.0.1:{port}/udaconnect is unreachable"
        )),
        "{stderr}"
    );
    db.drop_db().await;
}

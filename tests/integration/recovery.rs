//! Recovery against the real broker: a snapshot whose offset the log contradicts (the topics
//! deleted and created again, retention past the snapshot, a new topic incarnation that grew
//! past the old offset), and the broker itself killed mid-stream. In each case every
//! acknowledged report is stored and matched, and a mismatch is reported, never skipped
//! silently.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Request;
use udaconnect::pipeline::ingest::Ingestor;
use udaconnect::proto::v1::admin_client::AdminClient as GrpcAdminClient;
use udaconnect::proto::v1::ClusterStatusRequest;
use udaconnect::Config;
use udaconnect_actors::domain::{LocationEvent, Micros, NewLocationEvent};
use udaconnect_bench::produce::wire;
use uuid::Uuid;

use crate::helpers::{eventually, get_json, scalar, test_config, PrivateBroker, TestApp, TestDb};

const TOKEN: &str = "recovery-admin-token";
/// The venue: persons report 500 m apart from each other unless they meet.
const LAT: f64 = 48.1374;
const LON: f64 = 11.5755;

fn now_micros() -> Micros {
    chrono::Utc::now().timestamp_micros()
}

/// A fresh database with persons 1..=`persons`, and a configuration with one partition per
/// topic and the admin token.
async fn single_partition_setup(persons: i64) -> (TestDb, tokio_postgres::Client, Config) {
    let (db, client) = TestDb::migrated().await;
    for id in 1..=persons {
        client
            .execute(
                "INSERT INTO person (id, first_name, last_name, company_name)
                 VALUES ($1::int8, 'First' || $1::int8::text, 'Last' || $1::int8::text, 'Co')",
                &[&id],
            )
            .await
            .expect("insert person");
    }
    let mut config = test_config(&db);
    config.locations_partitions = 1;
    config.person_updates_partitions = 1;
    config.connections_partitions = 1;
    config.admin_token = Some(udaconnect::config::Secret::new(TOKEN));
    (db, client, config)
}

/// A report of `person` `meters_east` of the venue, at `at`.
fn report(person: i64, meters_east: f64, at: Micros) -> Value {
    json!({
        "person_id": person,
        "lat": LAT,
        "lon": LON + meters_east / 74_000.0,
        "recorded_at": chrono::DateTime::from_timestamp_micros(at).expect("time").to_rfc3339(),
    })
}

/// POSTs one report to `/v1/locations`; returns the acknowledged event id.
async fn post(app: &TestApp, body: &Value) -> String {
    let response = crate::helpers::client()
        .post(app.url("/v1/locations"))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let answer: Value = response.json().await.expect("JSON body");
    assert_eq!(status, 202, "{answer}");
    answer["event_id"].as_str().expect("event_id").to_owned()
}

/// Persons `first..first+n` report once each, 500 m apart (no co-location); returns the ids.
async fn scattered_reports(app: &TestApp, first: i64, n: i64) -> Vec<String> {
    let t = now_micros();
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(post(app, &report(first + i, 500.0 * i as f64, t)).await);
    }
    ids
}

/// Persons `a` and `b` meet: three reports each, 1 m apart, a second apart; returns the ids.
async fn meeting(app: &TestApp, a: i64, b: i64) -> Vec<String> {
    let t = now_micros();
    let mut ids = Vec::new();
    for k in 0..3i64 {
        let at = t + k * 1_000_000;
        ids.push(post(app, &report(a, 10_000.0, at)).await);
        ids.push(post(app, &report(b, 10_001.0, at)).await);
    }
    ids
}

/// Polls until `GET /v1/locations/{id}` answers 200 for every id (stored), for up to `within`.
async fn wait_stored(app: &TestApp, ids: &[String], within: Duration) {
    eventually("every acknowledged report stored", within, || async {
        for id in ids {
            let (status, body) = get_json(&app.url(&format!("/v1/locations/{id}"))).await;
            if status != 200 {
                return Err(format!("report {id}: {status} {body}"));
            }
        }
        Ok(())
    })
    .await;
}

/// Polls the history of `a` until it holds a connection with `b`, for up to `within`.
async fn wait_connected(app: &TestApp, a: i64, b: i64, within: Duration) {
    eventually(
        &format!("{a} and {b} met: a connection"),
        within,
        || async {
            let (status, page) = get_json(&app.url(&format!("/v1/persons/{a}/connections"))).await;
            assert_eq!(status, 200, "{page}");
            let peers: Vec<i64> = page["items"]
                .as_array()
                .expect("items")
                .iter()
                .filter_map(|c| c["peer"]["id"].as_i64())
                .collect();
            peers
                .contains(&b)
                .then_some(())
                .ok_or_else(|| page.to_string())
        },
    )
    .await;
}

/// Polls `/v1/status` until every local partition has processed its whole log.
pub(crate) async fn wait_caught_up(app: &TestApp, within: Duration) -> Value {
    eventually("every local partition caught up", within, || async {
        let (status, body) = get_json(&app.url("/v1/status")).await;
        let partitions = body["partitions"].as_array().cloned().unwrap_or_default();
        let caught_up = status == 200
            && !partitions.is_empty()
            && partitions
                .iter()
                .all(|p| p["local"] == true && p["lag"] == 0);
        if caught_up {
            Ok(body)
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await
}

/// The service on `config`'s single partitions, owning them.
async fn start(config: &Config) -> TestApp {
    let app = TestApp::spawn(config.clone()).await;
    crate::pipeline::wait_for_assignment(&app, 1, 1).await;
    app
}

/// Starts the service, has `send` post reports, waits until they are stored and every
/// partition has caught up, then stops it gracefully (which snapshots every partition at the
/// end of its log); returns the reports' ids.
async fn one_run(config: &Config, send: impl AsyncFnOnce(&TestApp) -> Vec<String>) -> Vec<String> {
    let app = start(config).await;
    let ids = send(&app).await;
    wait_stored(&app, &ids, Duration::from_secs(60)).await;
    wait_caught_up(&app, Duration::from_secs(60)).await;
    app.stop().await.expect("clean shutdown");
    ids
}

fn kafka_admin(config: &Config) -> AdminClient<DefaultClientContext> {
    udaconnect::kafka::client_config(config)
        .create()
        .expect("admin client")
}

/// Deletes the service's three topics and waits until the broker no longer lists them.
async fn delete_topics(config: &Config) {
    let topics = config.topics();
    let names = [
        topics.locations.as_str(),
        topics.person_updates.as_str(),
        topics.connections.as_str(),
    ];
    let admin = kafka_admin(config);
    for result in admin
        .delete_topics(&names, &AdminOptions::new())
        .await
        .expect("delete topics")
    {
        result.expect("topic deleted");
    }
    let broker = udaconnect::kafka::Broker::new(config).expect("client");
    eventually("the topics gone", Duration::from_secs(60), || async {
        let counts = broker
            .partition_counts(Duration::from_secs(5))
            .await
            .expect("metadata");
        if counts
            .iter()
            .any(|(name, _)| names.contains(&name.as_str()))
        {
            Err(format!("still listed: {counts:?}"))
        } else {
            Ok(())
        }
    })
    .await;
}

/// The snapshot mismatches `/v1/status` reports, by stage.
fn mismatches(status: &Value) -> Vec<(String, String)> {
    status["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter_map(|p| {
            let kind = p["snapshot_mismatch"]["kind"].as_str()?;
            Some((
                p["stage"].as_str().expect("stage").to_owned(),
                kind.to_owned(),
            ))
        })
        .collect()
}

/// `udaconnect_snapshot_offset_mismatches_total` of `stage` and `kind` in `/metrics`.
async fn mismatch_metric(app: &TestApp, stage: &str, kind: &str) -> f64 {
    let text = app.metrics().await;
    let prefix = format!(
        "udaconnect_snapshot_offset_mismatches_total{{stage=\"{stage}\",kind=\"{kind}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_deleted_and_created_again_are_read_from_their_start_and_the_mismatch_is_reported() {
    let (db, client, config) = single_partition_setup(40).await;
    one_run(&config, async |app| scattered_reports(app, 1, 30).await).await;
    let snapshot_offset = scalar(
        &client,
        "SELECT min(next_offset) FROM shard_snapshot WHERE stage = 'zones'",
    )
    .await;
    assert!(snapshot_offset >= 30, "zones snapshot at {snapshot_offset}");

    // What an operator does to "reset" the topics; the service creates them again.
    delete_topics(&config).await;
    let app = start(&config).await;
    let after = meeting(&app, 31, 32).await;
    wait_stored(&app, &after, Duration::from_secs(60)).await;
    wait_connected(&app, 31, 32, Duration::from_secs(60)).await;
    wait_connected(&app, 32, 31, Duration::from_secs(60)).await;

    let status = wait_caught_up(&app, Duration::from_secs(60)).await;
    let found = mismatches(&status);
    for stage in ["zones", "persons"] {
        assert!(
            found.contains(&(stage.to_owned(), "other_topic_id".to_owned())),
            "{stage}: {status}"
        );
        assert_eq!(mismatch_metric(&app, stage, "other_topic_id").await, 1.0);
    }
    let zones = status["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["stage"] == "zones")
        .expect("zones partition");
    assert_eq!(
        zones["snapshot_mismatch"]["snapshot_offset"], snapshot_offset,
        "{zones}"
    );
    assert_eq!(zones["snapshot_mismatch"]["resumed_at"], 0, "{zones}");

    // The gRPC admin view says the same.
    let channel = Channel::from_shared(format!("http://{}", app.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("grpc");
    let mut request = Request::new(ClusterStatusRequest {});
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    let cluster = GrpcAdminClient::new(channel)
        .cluster_status(request)
        .await
        .expect("cluster status")
        .into_inner();
    for p in &cluster.partitions {
        let m = p
            .snapshot_mismatch
            .as_ref()
            .unwrap_or_else(|| panic!("no mismatch on {p:?}"));
        assert_eq!(m.kind, "other_topic_id", "{p:?}");
        assert_eq!(p.lag, Some(0), "{p:?}");
    }
    // Every report ever acknowledged is stored.
    assert_eq!(scalar(&client, "SELECT count(*) FROM location").await, 36);
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// The zones stage's stored snapshot: its row and its parts.
async fn zone_snapshot(client: &tokio_postgres::Client) -> Vec<tokio_postgres::Row> {
    client
        .query(
            "SELECT s.next_offset, s.format, s.state, s.topic_id, p.key, p.state
             FROM shard_snapshot s JOIN shard_snapshot_part p USING (stage, topic, partition)
             WHERE s.stage = 'zones'",
            &[],
        )
        .await
        .expect("read the zones snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_behind_the_log_start_reads_what_the_log_holds_and_says_so() {
    let (db, client, config) = single_partition_setup(6).await;
    let topic = config.topics().locations;

    let first = one_run(&config, async |app| meeting(app, 1, 2).await).await;
    // An old copy of the zones snapshot, as a database restored from an older backup has.
    let old = zone_snapshot(&client).await;
    let old_offset: i64 = old[0].get(0);

    let second = one_run(&config, async |app| {
        let ids = meeting(app, 3, 4).await;
        wait_connected(app, 3, 4, Duration::from_secs(60)).await;
        ids
    })
    .await;
    let end = scalar(
        &client,
        "SELECT next_offset FROM shard_snapshot WHERE stage = 'zones'",
    )
    .await;
    assert!(end > old_offset, "{end} after {old_offset}");

    // Retention removes the records before `end`; the old snapshot comes back.
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(end))
        .expect("offset");
    kafka_admin(&config)
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("delete records");
    client
        .execute("DELETE FROM shard_snapshot WHERE stage = 'zones'", &[])
        .await
        .expect("drop the newer snapshot");
    for row in &old {
        client
            .execute(
                "INSERT INTO shard_snapshot (stage, topic, partition, next_offset, format, state, topic_id)
                 VALUES ('zones', $1, 0, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[
                    &topic,
                    &row.get::<_, i64>(0),
                    &row.get::<_, i32>(1),
                    &row.get::<_, Vec<u8>>(2),
                    &row.get::<_, Option<String>>(3),
                ],
            )
            .await
            .expect("restore the old snapshot");
        client
            .execute(
                "INSERT INTO shard_snapshot_part (stage, topic, partition, key, state)
                 VALUES ('zones', $1, 0, $2, $3)",
                &[&topic, &row.get::<_, i64>(4), &row.get::<_, Vec<u8>>(5)],
            )
            .await
            .expect("restore the old snapshot's part");
    }

    let app = start(&config).await;
    let third = meeting(&app, 5, 6).await;
    wait_stored(&app, &third, Duration::from_secs(60)).await;
    wait_connected(&app, 5, 6, Duration::from_secs(60)).await;
    let status = wait_caught_up(&app, Duration::from_secs(60)).await;
    let zones = status["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["stage"] == "zones")
        .expect("zones partition")
        .clone();
    let m = &zones["snapshot_mismatch"];
    assert_eq!(m["kind"], "below_start", "{zones}");
    assert_eq!(
        (m["snapshot_offset"].as_i64(), m["log_start"].as_i64()),
        (Some(old_offset), Some(end))
    );
    assert_eq!(m["resumed_at"], end, "{zones}");
    assert!(
        m["message"]
            .as_str()
            .is_some_and(|s| s.contains("cannot be read")),
        "{m}"
    );
    assert_eq!(mismatch_metric(&app, "zones", "below_start").await, 1.0);
    // Every acknowledged report is stored, and each meeting is a connection.
    let all: BTreeSet<&String> = first.iter().chain(&second).chain(&third).collect();
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM location").await,
        all.len() as i64
    );
    for (a, b) in [(1, 2), (3, 4), (5, 6)] {
        wait_connected(&app, a, b, Duration::from_secs(30)).await;
    }
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// An ingestor of `config`'s topics, as a gateway in front of a stopped service would use.
async fn gateway(config: &Config) -> Ingestor {
    let pool = udaconnect::store::pool(config, Duration::from_secs(5)).expect("pool");
    let producer = udaconnect::kafka::Producer::new(config).expect("producer");
    Ingestor::new(config, producer, pool, config.locations_partitions as u32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_past_the_snapshot_offset_is_known_by_its_topic_id() {
    let (db, client, config) = single_partition_setup(12).await;
    let first = one_run(&config, async |app| meeting(app, 1, 2).await).await;
    let snapshot_offset = scalar(
        &client,
        "SELECT next_offset FROM shard_snapshot WHERE stage = 'zones'",
    )
    .await;

    // The topics come back empty, and a gateway writes more records into the new locations
    // topic than the snapshot's offset before the service starts: the offsets alone look
    // plausible, only the topic id tells the logs apart.
    delete_topics(&config).await;
    let broker = udaconnect::kafka::Broker::new(&config).expect("client");
    broker
        .ensure_topics(
            &udaconnect::kafka::topic_specs(&config),
            1,
            Duration::from_secs(30),
        )
        .await
        .expect("topics created again");
    let ingestor = gateway(&config).await;
    let t = now_micros();
    let mut sent: Vec<Uuid> = Vec::new();
    let mut k = 0;
    while (sent.len() as i64) < snapshot_offset + 5 {
        // Persons 3 and 4 meet, one report each per call: one record per call.
        for (person, east) in [(3, 20_000.0), (4, 20_001.0)] {
            let e = NewLocationEvent {
                event_id: None,
                person_id: person,
                lat: LAT,
                lon: LON + east / 74_000.0,
                recorded_at: t + k * 1_000_000,
            };
            let report = ingestor.ingest(&[e]).await.expect("acknowledged");
            sent.extend(report.accepted.iter().map(|(_, id)| *id));
        }
        k += 1;
    }
    let end = broker
        .log_position(&config.topics().locations, 0, Duration::from_secs(5))
        .await
        .expect("log position")
        .end;
    assert!(
        end > snapshot_offset,
        "the new log ({end}) is past the snapshot's offset ({snapshot_offset})"
    );

    let app = start(&config).await;
    let ids: Vec<String> = sent.iter().map(Uuid::to_string).collect();
    wait_stored(&app, &ids, Duration::from_secs(60)).await;
    wait_connected(&app, 3, 4, Duration::from_secs(60)).await;
    let status = wait_caught_up(&app, Duration::from_secs(60)).await;
    assert!(
        mismatches(&status).contains(&("zones".to_owned(), "other_topic_id".to_owned())),
        "{status}"
    );
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM location").await,
        (first.len() + sent.len()) as i64
    );
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// Sends `events` through `/v1/locations/batch`, `per_call` per request, each request sent
/// again until it is acknowledged (a gateway's behaviour: a 503 means "not acknowledged, try
/// again"); `before_call(i)` runs before request `i`. Returns the messages of the 503s.
async fn send_with_retries(
    app: &TestApp,
    events: &[LocationEvent],
    per_call: usize,
    mut before_call: impl FnMut(usize),
) -> Vec<String> {
    let client = crate::helpers::client();
    let mut refusals = Vec::new();
    for (i, chunk) in events.chunks(per_call).enumerate() {
        before_call(i);
        let body: Vec<Value> = chunk
            .iter()
            .map(|e| {
                let w = wire(e);
                json!({
                    "event_id": w.event_id,
                    "person_id": w.person_id,
                    "lat": w.lat,
                    "lon": w.lon,
                    "recorded_at": chrono::DateTime::from_timestamp_micros(w.recorded_at)
                        .expect("time")
                        .to_rfc3339(),
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let response = client
                .post(app.url("/v1/locations/batch"))
                .json(&json!({ "events": body }))
                .send()
                .await
                .expect("request sent");
            let status = response.status().as_u16();
            let answer: Value = response.json().await.expect("JSON body");
            match status {
                202 => {
                    assert_eq!(answer["accepted"], chunk.len(), "{answer}");
                    break;
                }
                503 => refusals.push(answer["message"].as_str().unwrap_or_default().to_owned()),
                other => panic!("ingest answered {other}: {answer}"),
            }
            assert!(
                Instant::now() < deadline,
                "not acknowledged within 180 s: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    refusals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_killed_mid_stream_loses_nothing_acknowledged() {
    let mut broker = PrivateBroker::start().await;
    let broker_addr = broker.addr.to_string();
    let (events, db, client, mut config) = crate::pipeline::conference_in_db(300, 300).await;
    config.kafka_brokers = broker_addr.clone();
    config.ingest_ack_timeout_ms = 3_000;
    let params = config.engine_params();
    let app = TestApp::spawn(config).await;
    let pipeline = crate::pipeline::wait_for_assignment(&app, 4, 3).await;

    // The broker is killed (SIGKILL) a third of the way through, and started again 15 s
    // later, while the gateway keeps sending.
    let (kill, killed) = tokio::sync::oneshot::channel::<()>();
    let restarter = tokio::spawn(async move {
        let _ = killed.await;
        broker.stop();
        tokio::time::sleep(Duration::from_secs(15)).await;
        broker.restart().await;
        broker
    });
    let calls = events.chunks(200).count();
    let mut kill = Some(kill);
    let refusals = send_with_retries(&app, &events, 200, |i| {
        if i == calls / 3 {
            if let Some(kill) = kill.take() {
                let _ = kill.send(());
            }
        }
    })
    .await;
    let broker = restarter.await.expect("broker restarted");
    assert!(
        !refusals.is_empty(),
        "ingest was refused while the broker was away"
    );
    for message in &refusals {
        assert!(
            message.contains(&format!("the broker at {broker_addr}")),
            "a refusal names the broker: {message}"
        );
    }

    // Everything acknowledged goes through, with no restart of the service.
    pipeline.ingestor().finish().await.expect("heartbeat");
    let expected = crate::pipeline::reference(&events, &params);
    let unique: BTreeSet<Uuid> = events.iter().map(|e| e.event_id).collect();
    crate::pipeline::wait_for_reference(
        &client,
        &expected,
        unique.len(),
        Duration::from_secs(240),
        || format!("{} ingest requests were refused", refusals.len()),
    )
    .await;
    app.stop().await.expect("clean shutdown");
    drop(broker);
    db.drop_db().await;
}

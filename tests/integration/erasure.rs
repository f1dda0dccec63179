//! Erasure (`DELETE /v1/persons/{id}`, docs/design.md §6): after it, no table, stored snapshot,
//! actor view, notification buffer or API answer (`/v1` and the POC's `/api`) holds the person,
//! while the others' data stays; and a replay of the whole Kafka log (snapshots gone) does not
//! bring the person back. Who may erase whom is checked on the way.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use udaconnect::auth::Role;
use udaconnect::config::Config;
use udaconnect::pipeline::hub::Resume;
use udaconnect::store::snapshots::PgSnapshots;
use udaconnect_actors::actors::person::decode_person_snapshot;
use udaconnect_actors::actors::ports::Stage;
use udaconnect_actors::actors::zone::decode_zone_snapshot;
use udaconnect_actors::zones::{CellCache, ZoneGrid};

use crate::helpers::{client_as, eventually, scalar, test_config, token, TestApp, TestDb};
use crate::recovery::wait_caught_up;
use crate::rest::{assert_error, create_person, get, now_rfc3339, post, send};

/// Every person id an API answer names: the values of `person_id` and `peer_id` keys, and the
/// `id` of objects under `person` or `peer` keys, at any depth.
fn persons_in(v: &Value) -> BTreeSet<i64> {
    let mut out = BTreeSet::new();
    fn walk(v: &Value, out: &mut BTreeSet<i64>) {
        match v {
            Value::Object(map) => {
                for (k, x) in map {
                    match (k.as_str(), x) {
                        ("person_id" | "peer_id", Value::Number(n)) => {
                            out.extend(n.as_i64());
                        }
                        ("person" | "peer", Value::Object(o)) => {
                            out.extend(o.get("id").and_then(Value::as_i64));
                        }
                        _ => {}
                    }
                    walk(x, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

/// A position whose reports reach a neighbouring zone too (a halo: ghost copies), found by
/// walking north from (37.5, -122.29) one metre at a time.
fn position_with_halo(config: &Config) -> (f64, f64) {
    let mut cache = CellCache::new(ZoneGrid::new(&config.engine_params()));
    let lon = -122.29;
    (0..100_000)
        .map(|i| 37.5 + f64::from(i) * 0.000_009)
        .find(|&lat| !cache.route(lat, lon).halo.is_empty())
        .map(|lat| (lat, lon))
        .expect("a zone border within 900 m")
}

/// Reports of `persons` at `(lat, lon)`, now, each 1 m north of the previous one.
async fn meet(app: &TestApp, persons: &[i64], (lat, lon): (f64, f64)) {
    let t = now_rfc3339();
    for (i, who) in persons.iter().enumerate() {
        let body = json!({"person_id": who, "lat": lat + 0.000_009 * i as f64, "lon": lon, "recorded_at": t});
        let (status, body) = post(&app.url("/v1/locations"), &body).await;
        assert_eq!(status, 202, "{body}");
    }
}

/// The rows of `person` in each table that can hold it.
async fn rows_of(db: &TestDb, person: i64) -> Vec<(&'static str, i64)> {
    let client = db.client().await;
    let mut out = Vec::new();
    for (table, sql) in [
        (
            "person",
            format!("SELECT count(*) FROM person WHERE id = {person}"),
        ),
        (
            "location",
            format!("SELECT count(*) FROM location WHERE person_id = {person}"),
        ),
        (
            "halo_copy",
            format!("SELECT count(*) FROM halo_copy WHERE person_id = {person}"),
        ),
        (
            "connection",
            format!(
                "SELECT count(*) FROM connection WHERE person_id = {person} OR peer_id = {person}"
            ),
        ),
    ] {
        out.push((table, scalar(&client, &sql).await));
    }
    out
}

/// The persons the stored snapshots of both stages hold: each zone's points' persons, each
/// person part's person, and the peers of every person's episodes; and how many partitions
/// had a snapshot.
async fn persons_in_snapshots(config: &Config) -> (BTreeSet<i64>, usize) {
    let pool = udaconnect::store::pool(config, Duration::from_secs(5)).expect("pool");
    let topics = config.topics();
    let mut persons = BTreeSet::new();
    let mut stored = 0;
    for (stage, topic, partitions) in [
        (Stage::Zones, &topics.locations, config.locations_partitions),
        (
            Stage::Persons,
            &topics.person_updates,
            config.person_updates_partitions,
        ),
    ] {
        let snapshots = PgSnapshots::new(pool.clone(), topic.as_str());
        for partition in 0..partitions as u32 {
            let Some((blob, _)) = snapshots.load(stage, partition).await.expect("load") else {
                continue;
            };
            stored += 1;
            match stage {
                Stage::Zones => {
                    let decoded = decode_zone_snapshot(&blob).expect("a zone snapshot decodes");
                    for zone in &decoded.zones {
                        persons.extend(zone.points(usize::MAX).iter().map(|p| p.person));
                    }
                }
                Stage::Persons => {
                    let (_, states) =
                        decode_person_snapshot(&blob).expect("a person snapshot decodes");
                    for state in &states {
                        persons.insert(state.person());
                        persons.extend(state.peers());
                    }
                }
            }
        }
    }
    (persons, stored)
}

/// Snapshots every partition this process owns now.
async fn snapshot_all(app: &TestApp) {
    let pipeline = app.pipeline(Duration::from_secs(60)).await;
    for stage in [Stage::Zones, Stage::Persons] {
        for partition in pipeline.owned_partitions(stage) {
            pipeline
                .snapshot_now(stage, partition)
                .await
                .expect("owned partition snapshots");
        }
    }
}

/// The persons of every answer a user can get about the others: the persons list, Bob's
/// person, history and live state on `/v1`, the live points, and the POC's persons and Bob's
/// connections.
async fn persons_in_answers(app: &TestApp, bob: i64, day: &str) -> BTreeSet<i64> {
    let mut seen = BTreeSet::new();
    for path in [
        format!("/v1/persons/{bob}/connections?limit=1000"),
        format!("/v1/persons/{bob}/live"),
        "/v1/points?limit=10000".to_owned(),
        format!("/api/persons/{bob}/connection?start_date={day}&end_date=2099-01-01&distance=10"),
    ] {
        let (status, body) = get(&app.url(&path)).await;
        assert_eq!(status, 200, "{path}: {body}");
        seen.extend(persons_in(&body));
    }
    // The directories list persons by `id`.
    for (path, list) in [("/v1/persons?limit=1000", "/items"), ("/api/persons", "")] {
        let (status, body) = get(&app.url(path)).await;
        assert_eq!(status, 200, "{path}: {body}");
        seen.extend(
            body.pointer(list)
                .and_then(Value::as_array)
                .expect("a list")
                .iter()
                .filter_map(|p| p["id"].as_i64()),
        );
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_person_is_in_no_table_snapshot_actor_or_answer_and_a_replay_does_not_bring_it_back(
) {
    let db = TestDb::new().await;
    let config = test_config(&db);
    let app = TestApp::spawn(config.clone()).await;
    let pipeline = app.pipeline(Duration::from_secs(60)).await;
    let mut feed = pipeline.hub().subscribe_all();
    let [alice, bob, carol, dan] = [
        create_person(&app, "Alice").await,
        create_person(&app, "Bob").await,
        create_person(&app, "Carol").await,
        create_person(&app, "Dan").await,
    ];
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let place = position_with_halo(&config);
    let elsewhere = (place.0 + 0.01, place.1);

    // Bob meets Carol; then Alice meets both at a zone border (ghost copies); then Bob meets
    // Dan. The first notification is where a resumed stream starts.
    meet(&app, &[bob, carol], elsewhere).await;
    let first = tokio::time::timeout(Duration::from_secs(30), feed.recv())
        .await
        .expect("a notification in time")
        .expect("the hub runs");
    meet(&app, &[alice, bob, carol], place).await;
    meet(&app, &[bob, dan], (elsewhere.0 + 0.01, elsewhere.1)).await;

    // Everything holds Alice before: the rows (her episodes with Bob and Carol, both sides,
    // and the ghost copies of her report), the snapshots, the answers, the resume buffer.
    let client = db.client().await;
    eventually("every episode stored", Duration::from_secs(60), || async {
        let n = scalar(&client, "SELECT count(*) FROM connection").await;
        // Alice–Bob, Alice–Carol, Bob–Carol, Bob–Dan, each on both sides.
        (n >= 8).then_some(()).ok_or(format!("{n} rows"))
    })
    .await;
    let before = rows_of(&db, alice).await;
    assert!(before.iter().all(|(_, n)| *n > 0), "{before:?}");
    snapshot_all(&app).await;
    let (in_snapshots, stored) = persons_in_snapshots(&config).await;
    assert!(stored > 0);
    assert!(
        [alice, bob, carol, dan]
            .iter()
            .all(|p| in_snapshots.contains(p)),
        "{in_snapshots:?}"
    );
    let answers = persons_in_answers(&app, bob, &day).await;
    assert!(
        answers.contains(&alice) && answers.contains(&carol),
        "{answers:?}"
    );
    // Her actor itself, asked locally (the API's person views answer 404 from the table first).
    let view = pipeline.person_view(alice).await.expect("owned here");
    assert!(view.is_some_and(|v| !v.trajectory.is_empty()));
    let notified = |resume: Resume| -> BTreeSet<i64> {
        let Resume::After(backlog) = resume else {
            panic!("the first notification is held")
        };
        backlog
            .iter()
            .flat_map(|n| [n.episode.person, n.episode.peer])
            .collect()
    };
    let (_, resume) = pipeline.hub().subscribe_after(&[], true, first.id);
    assert!(notified(resume).contains(&alice));

    // Who may erase: not another attendee, not a gateway; nobody erases a person that never
    // existed.
    let url = app.url(&format!("/v1/persons/{alice}"));
    for (role, person) in [(Role::Attendee, Some(bob)), (Role::Gateway, None)] {
        let response = client_as(&token(role, person))
            .delete(&url)
            .send()
            .await
            .expect("sent");
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("JSON");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("may not erase person {alice}"))),
            "{body}"
        );
        assert_error(&(status, body), 403, "permission_denied", Some("person_id"));
    }
    let missing = send(
        reqwest::Method::DELETE,
        &app.url("/v1/persons/987654321"),
        None,
    )
    .await;
    assert_error(&missing, 404, "not_found", Some("person_id"));

    // Alice erases herself.
    let response = client_as(&token(Role::Attendee, Some(alice)))
        .delete(&url)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 200);
    let erased: Value = response.json().await.expect("JSON");
    let count = |table: &str| before.iter().find(|(t, _)| *t == table).map(|(_, n)| *n);
    assert_eq!(erased["person_id"], alice, "{erased}");
    assert_eq!(erased["person_deleted"], true, "{erased}");
    assert_eq!(erased["locations"].as_i64(), count("location"), "{erased}");
    assert_eq!(
        erased["halo_copies"].as_i64(),
        count("halo_copy"),
        "{erased}"
    );
    assert_eq!(
        erased["connections"].as_i64(),
        count("connection"),
        "{erased}"
    );
    assert_eq!(erased["processes"], 1, "{erased}");
    assert_eq!(
        erased["partitions"].as_u64(),
        Some((config.locations_partitions + config.person_updates_partitions) as u64),
        "{erased}"
    );
    assert!(erased["notifications"].as_u64() > Some(0), "{erased}");

    // Nothing holds her now; the others' data stays.
    let after = rows_of(&db, alice).await;
    assert!(after.iter().all(|(_, n)| *n == 0), "{after:?}");
    assert_eq!(
        scalar(
            &client,
            &format!("SELECT count(*) FROM erased_person WHERE person_id = {alice}")
        )
        .await,
        1
    );
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM connection").await,
        4,
        "Bob–Carol and Bob–Dan, both sides, stay"
    );
    let (in_snapshots, _) = persons_in_snapshots(&config).await;
    assert!(!in_snapshots.contains(&alice), "{in_snapshots:?}");
    assert!(
        [bob, carol, dan].iter().all(|p| in_snapshots.contains(p)),
        "{in_snapshots:?}"
    );
    let answers = persons_in_answers(&app, bob, &day).await;
    assert!(!answers.contains(&alice), "{answers:?}");
    assert_eq!(pipeline.person_view(alice).await.expect("owned here"), None);
    assert!(
        answers.contains(&carol) && answers.contains(&dan),
        "{answers:?}"
    );
    for path in [
        format!("/v1/persons/{alice}"),
        format!("/v1/persons/{alice}/live"),
        format!("/v1/persons/{alice}/connections"),
    ] {
        assert_error(
            &get(&app.url(&path)).await,
            404,
            "not_found",
            Some("person_id"),
        );
    }
    let (_, resume) = pipeline.hub().subscribe_after(&[], true, first.id);
    let notified_after = notified(resume);
    assert!(!notified_after.contains(&alice), "{notified_after:?}");
    assert!(notified_after.contains(&dan), "{notified_after:?}");
    // Her reports are refused as those of an unknown person.
    let (status, body) = post(
        &app.url("/v1/locations"),
        &json!({"person_id": alice, "lat": place.0, "lon": place.1, "recorded_at": now_rfc3339()}),
    )
    .await;
    assert_error(&(status, body), 404, "not_found", Some("person_id"));
    // Her id never names a person again, whoever inserts it (a seed, a simulator).
    let inserted = client
        .execute(
            "INSERT INTO person (id, first_name, last_name, company_name)
             VALUES ($1, 'Alice', 'Again', 'Seed') ON CONFLICT (id) DO NOTHING",
            &[&alice],
        )
        .await
        .expect("insert");
    assert_eq!(inserted, 0);
    // Erasing again finishes nothing left: 200, nothing more deleted.
    let (status, again) = send(reqwest::Method::DELETE, &url, None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (
            again["person_deleted"].as_bool(),
            again["locations"].as_i64()
        ),
        (Some(false), Some(0)),
        "{again}"
    );

    // An erasure this process is not told of (another process erased Carol and could not reach
    // it): read from `erased_person` within seconds, and forgotten by its actors too.
    client
        .execute(
            "INSERT INTO erased_person (person_id) VALUES ($1)",
            &[&carol],
        )
        .await
        .expect("mark");
    eventually(
        "Carol forgotten by the actors",
        Duration::from_secs(30),
        || async {
            let (_, live) = get(&app.url(&format!("/v1/persons/{bob}/live"))).await;
            let (_, points) = get(&app.url("/v1/points?limit=10000")).await;
            let seen: BTreeSet<i64> = persons_in(&live)
                .union(&persons_in(&points))
                .copied()
                .collect();
            (!seen.contains(&carol))
                .then_some(())
                .ok_or(format!("{seen:?}"))
        },
    )
    .await;

    // The forwarded mark (with which processes ask each other to forget locally) is honoured
    // only with the cluster's admin token: an organizer's JWT with it erases Dan whole.
    let mut admin = udaconnect::proto::v1::admin_client::AdminClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", app.grpc_addr))
            .expect("uri")
            .connect()
            .await
            .expect("gRPC connects"),
    );
    let mut request =
        tonic::Request::new(udaconnect::proto::v1::ErasePersonRequest { person_id: dan });
    let metadata = request.metadata_mut();
    metadata.insert(
        "authorization",
        format!("Bearer {}", crate::helpers::organizer_token())
            .parse()
            .expect("header"),
    );
    metadata.insert(udaconnect::cluster::FORWARDED, "1".parse().expect("header"));
    let answer = admin
        .erase_person(request)
        .await
        .expect("erased")
        .into_inner();
    assert!(answer.person_deleted && answer.locations > 0, "{answer:?}");
    assert!(rows_of(&db, dan).await.iter().all(|(_, n)| *n == 0));

    // A replay of the whole log (every snapshot gone) drops what the topics still hold of her.
    app.stop().await.expect("stops");
    client
        .execute("DELETE FROM shard_snapshot", &[])
        .await
        .expect("snapshots deleted");
    let app = TestApp::spawn(config.clone()).await;
    let pipeline: Arc<_> = app.pipeline(Duration::from_secs(60)).await;
    wait_caught_up(&app, Duration::from_secs(90)).await;
    // The episodes' changes are written within their flush interval.
    tokio::time::sleep(udaconnect_actors::actors::person::CHANGES_FLUSH_INTERVAL * 2).await;
    let after_replay = rows_of(&db, alice).await;
    assert!(
        after_replay.iter().all(|(_, n)| *n == 0),
        "{after_replay:?}"
    );
    let (status, live) = get(&app.url(&format!("/v1/persons/{bob}/live"))).await;
    assert_eq!(status, 200, "{live}");
    let peers = persons_in(&live);
    assert!(peers.contains(&bob), "{live}");
    for erased in [alice, carol, dan] {
        assert!(!peers.contains(&erased), "{erased}: {live}");
    }
    snapshot_all(&app).await;
    let (in_snapshots, _) = persons_in_snapshots(&config).await;
    assert!(in_snapshots.contains(&bob), "{in_snapshots:?}");
    for erased in [alice, carol, dan] {
        assert!(
            !in_snapshots.contains(&erased),
            "{erased}: {in_snapshots:?}"
        );
    }
    drop(pipeline);
    app.stop().await.expect("stops");
}

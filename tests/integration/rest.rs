//! The REST API against the running service with the real PostgreSQL and broker: the POC
//! contract on the POC seed, every `/v1` endpoint with its bad-input cases, live SSE and
//! WebSocket streams, and the API documents in sync with the code.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use udaconnect::store;

use crate::helpers::{eventually, poc_seed_dir, test_config, TestApp, TestDb};

pub(crate) async fn send(method: reqwest::Method, url: &str, body: Option<&Value>) -> (u16, Value) {
    let client = crate::helpers::client();
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, body)
}

pub(crate) async fn get(url: &str) -> (u16, Value) {
    send(reqwest::Method::GET, url, None).await
}

pub(crate) async fn post(url: &str, body: &Value) -> (u16, Value) {
    send(reqwest::Method::POST, url, Some(body)).await
}

/// Asserts the shared error shape, its status, code and field.
#[track_caller]
pub(crate) fn assert_error(got: &(u16, Value), status: u16, code: &str, field: Option<&str>) {
    let (s, body) = got;
    assert_eq!(*s, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(body["field"].as_str(), field, "{body}");
    let keys: BTreeSet<&str> = body
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        keys.is_subset(&BTreeSet::from(["code", "message", "field"])),
        "{body}"
    );
}

#[tokio::test]
async fn the_api_documents_match_the_code() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for (name, generated) in udaconnect::rest::docs::documents().expect("documents") {
        let stored = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            stored == generated,
            "docs/{name} is out of date with the code: run `cargo run -- docs --out docs`"
        );
    }
    // The collection covers every operation of the OpenAPI document, each with its method.
    let spec = udaconnect::rest::docs::openapi_json().expect("spec");
    let collection = udaconnect::rest::docs::postman_collection(&spec).expect("collection");
    let mut in_collection = BTreeSet::new();
    for folder in collection["item"].as_array().expect("folders") {
        for item in folder["item"].as_array().expect("items") {
            let r = &item["request"];
            let path: Vec<String> = r["url"]["path"]
                .as_array()
                .expect("path")
                .iter()
                .map(|s| {
                    let s = s.as_str().expect("segment");
                    s.strip_prefix(':')
                        .map_or_else(|| s.to_owned(), |n| format!("{{{n}}}"))
                })
                .collect();
            in_collection.insert((
                r["method"].as_str().expect("method").to_lowercase(),
                format!("/{}", path.join("/")),
            ));
            if r.get("body").is_some() {
                let raw = r["body"]["raw"].as_str().expect("raw body");
                serde_json::from_str::<Value>(raw).expect("example body is JSON");
            }
        }
    }
    let mut in_spec = BTreeSet::new();
    for (path, ops) in spec["paths"].as_object().expect("paths") {
        for method in ops.as_object().expect("ops").keys() {
            in_spec.insert((method.clone(), path.clone()));
        }
    }
    assert_eq!(in_collection, in_spec);
    for op in [
        ("get", "/api/persons/{person_id}/connection"),
        ("post", "/v1/locations/batch"),
        ("get", "/v1/persons/{person_id}/connections/stream"),
        ("get", "/v1/connections/stream"),
        ("get", "/v1/points"),
        ("get", "/v1/ws"),
        ("get", "/v1/status"),
    ] {
        assert!(
            in_spec.contains(&(op.0.to_owned(), op.1.to_owned())),
            "{op:?} missing"
        );
    }
}

/// The (person, location) pairs the POC's semantics give, derived the POC's way: one query per
/// own location, then duplicates removed.
async fn poc_expected(
    client: &tokio_postgres::Client,
    person: i64,
    start: &str,
    end: &str,
    meters: f64,
) -> BTreeSet<(i64, i64)> {
    let own = client
        .query(
            "SELECT ST_X(coordinate), ST_Y(coordinate) FROM location
             WHERE person_id = $1
               AND recorded_at >= to_date($2, 'YYYY-MM-DD')::timestamp AT TIME ZONE 'UTC'
               AND recorded_at < to_date($3, 'YYYY-MM-DD')::timestamp AT TIME ZONE 'UTC'",
            &[&person, &start, &end],
        )
        .await
        .expect("own locations");
    let mut expected = BTreeSet::new();
    for row in own {
        let (x, y): (f64, f64) = (row.get(0), row.get(1));
        let near = client
            .query(
                "SELECT person_id, id FROM location
                 WHERE ST_DWithin(coordinate::geography,
                                  ST_SetSRID(ST_MakePoint($1, $2), 4326)::geography, $3)
                   AND person_id <> $4
                   AND to_date($5, 'YYYY-MM-DD')::timestamp AT TIME ZONE 'UTC' <= recorded_at
                   AND (to_date($6, 'YYYY-MM-DD') + 1)::timestamp AT TIME ZONE 'UTC' > recorded_at",
                &[&x, &y, &meters, &person, &start, &end],
            )
            .await
            .expect("near locations");
        expected.extend(
            near.iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1))),
        );
    }
    expected
}

/// A service on a fresh database seeded with the POC's data.
pub(crate) async fn poc_seeded() -> (TestDb, TestApp) {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    let mut client = db.client().await;
    store::seed_poc(&mut client, &poc_seed_dir())
        .await
        .expect("seed");
    (db, app)
}

#[tokio::test]
async fn the_poc_contract_on_the_poc_seed() {
    let (db, app) = poc_seeded().await;
    let client = db.client().await;

    // Persons, in the POC's shape.
    let (status, persons) = get(&app.url("/api/persons")).await;
    assert_eq!(status, 200);
    let ids: Vec<i64> = persons
        .as_array()
        .expect("list")
        .iter()
        .map(|p| p["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, vec![1, 5, 6, 8, 9]);
    assert_eq!(
        get(&app.url("/api/persons/5")).await,
        (
            200,
            json!({"id": 5, "first_name": "Taco", "last_name": "Fargo", "company_name": "Alpha Omega Upholstery"})
        )
    );
    assert_error(
        &get(&app.url("/api/persons/404")).await,
        404,
        "not_found",
        Some("person_id"),
    );
    assert_error(
        &get(&app.url("/api/persons/abc")).await,
        400,
        "invalid_argument",
        Some("person_id"),
    );

    // Locations: raw X as `latitude`, Y as `longitude`, strings; UTC time without offset.
    assert_eq!(
        get(&app.url("/api/locations/29")).await,
        (
            200,
            json!({"id": 29, "person_id": 1, "latitude": "-122.290524", "longitude": "37.553441", "creation_time": "2020-08-18T10:37:06"})
        )
    );
    assert_error(
        &get(&app.url("/api/locations/999999")).await,
        404,
        "not_found",
        Some("location_id"),
    );

    // The connection query: for each of the 5 persons, exactly the POC's set, each pair once;
    // also on windows where the other persons' extra day matters.
    let mut total = 0;
    let windows = [
        ("2020-01-01", "2020-12-30", "5"),
        ("2020-08-15", "2020-08-18", "5"),
        ("2020-08-18", "2020-08-19", "5"),
        ("2020-08-15", "2020-08-16", "1000"),
    ];
    for (start, end, distance) in windows {
        for person in [1i64, 5, 6, 8, 9] {
            let url = app.url(&format!(
                "/api/persons/{person}/connection?start_date={start}&end_date={end}&distance={distance}"
            ));
            let (status, rows) = get(&url).await;
            assert_eq!(status, 200, "{rows}");
            let rows = rows.as_array().expect("list").clone();
            let got: Vec<(i64, i64)> = rows
                .iter()
                .map(|r| {
                    assert_eq!(r["person"]["id"], r["location"]["person_id"], "{r}");
                    assert!(r["location"]["latitude"].is_string(), "{r}");
                    assert!(r["person"]["company_name"].is_string(), "{r}");
                    (
                        r["person"]["id"].as_i64().expect("id"),
                        r["location"]["id"].as_i64().expect("id"),
                    )
                })
                .collect();
            let unique: BTreeSet<(i64, i64)> = got.iter().copied().collect();
            assert_eq!(unique.len(), got.len(), "person {person}: repeated rows");
            let meters: f64 = distance.parse().expect("number");
            let expected = poc_expected(&client, person, start, end, meters).await;
            assert_eq!(
                unique, expected,
                "person {person}, {start}..{end}, {distance} m"
            );
            assert!(unique.iter().all(|(p, _)| *p != person));
            if (person, start, end) == (5, "2020-08-15", "2020-08-18") {
                // Location 29 (person 1, 2020-08-18) is at the point of person 5's location 31
                // (2020-08-15): in, because others are searched up to end_date + 1 day.
                assert!(unique.contains(&(1, 29)), "{unique:?}");
            }
            total += unique.len();
        }
    }
    assert!(total > 0, "the seed has co-located persons");

    // Bad input names the parameter; unknown persons are 404.
    let bad = [
        ("start_date=2020-13-01&end_date=2020-12-30", "start_date"),
        ("end_date=2020-12-30", "start_date"),
        ("start_date=2020-01-01&end_date=tomorrow", "end_date"),
        ("start_date=2020-02-01&end_date=2020-01-01", "end_date"),
        (
            "start_date=2020-01-01&end_date=2020-12-30&distance=abc",
            "distance",
        ),
        (
            "start_date=2020-01-01&end_date=2020-12-30&distance=-1",
            "distance",
        ),
    ];
    for (query, field) in bad {
        let url = app.url(&format!("/api/persons/5/connection?{query}"));
        assert_error(&get(&url).await, 400, "invalid_argument", Some(field));
    }
    let url = app.url("/api/persons/77/connection?start_date=2020-01-01&end_date=2020-12-30");
    assert_error(&get(&url).await, 404, "not_found", Some("person_id"));

    // Writes in the POC's shape.
    let (status, created) = post(
        &app.url("/api/persons"),
        &json!({"first_name": "Ada", "last_name": "Byron", "company_name": "Engines"}),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let new_id = created["id"].as_i64().expect("id");
    assert_eq!(
        get(&app.url(&format!("/api/persons/{new_id}"))).await,
        (200, created)
    );
    let body = json!({"person_id": new_id, "latitude": "-122.290524", "longitude": "37.553441", "creation_time": "2020-08-18T10:37:07"});
    let (status, location) = post(&app.url("/api/locations"), &body).await;
    assert_eq!(status, 200, "{location}");
    assert_eq!(
        (
            &location["latitude"],
            &location["longitude"],
            &location["creation_time"]
        ),
        (
            &json!("-122.290524"),
            &json!("37.553441"),
            &json!("2020-08-18T10:37:07")
        )
    );
    let id = location["id"].as_i64().expect("id");
    assert_eq!(
        get(&app.url(&format!("/api/locations/{id}"))).await,
        (200, location.clone())
    );
    // A retried post is the same location.
    assert_eq!(
        post(&app.url("/api/locations"), &body).await,
        (200, location)
    );
    // The new location is 0 m from location 29 (person 1), so person 1 now meets the new person.
    let url =
        app.url("/api/persons/1/connection?start_date=2020-08-18&end_date=2020-08-19&distance=1");
    let (_, rows) = get(&url).await;
    assert!(
        rows.as_array()
            .expect("list")
            .iter()
            .any(|r| r["location"]["id"] == id),
        "{rows}"
    );
    for (body, field) in [
        (
            json!({"person_id": new_id, "latitude": "north", "longitude": "1", "creation_time": "2020-08-18T10:37:07"}),
            "latitude",
        ),
        (
            json!({"person_id": new_id, "latitude": "1", "longitude": "500", "creation_time": "2020-08-18T10:37:07"}),
            "longitude",
        ),
        (
            json!({"person_id": new_id, "latitude": "1", "longitude": "1", "creation_time": "18/08/2020"}),
            "creation_time",
        ),
        (
            json!({"person_id": "five", "latitude": "1", "longitude": "1", "creation_time": "2020-08-18T10:37:07"}),
            "person_id",
        ),
        (json!({"first_name": "x"}), "person_id"),
    ] {
        assert_error(
            &post(&app.url("/api/locations"), &body).await,
            400,
            "invalid_argument",
            Some(field),
        );
    }
    let body = json!({"person_id": 4040, "latitude": "1", "longitude": "1", "creation_time": "2020-08-18T10:37:07"});
    assert_error(
        &post(&app.url("/api/locations"), &body).await,
        404,
        "not_found",
        Some("person_id"),
    );
    assert_error(
        &post(
            &app.url("/api/persons"),
            &json!({"first_name": "x", "last_name": 3, "company_name": "y"}),
        )
        .await,
        400,
        "invalid_argument",
        Some("last_name"),
    );

    // Unknown paths and malformed bodies get the same shape.
    assert_error(&get(&app.url("/api/nothing")).await, 404, "not_found", None);
    let response = crate::helpers::client()
        .post(app.url("/api/persons"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("sent");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON error");
    assert_error(&(status, body), 400, "invalid_argument", Some("body"));

    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// A batch answer's rejected items, as (index, field).
pub(crate) fn rejected_items(report: &Value) -> Vec<(i64, &str)> {
    report["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|r| {
            (
                r["index"].as_i64().expect("index"),
                r["field"].as_str().expect("field"),
            )
        })
        .collect()
}

pub(crate) async fn create_person(app: &TestApp, first: &str) -> i64 {
    let (status, body) = post(
        &app.url("/v1/persons"),
        &json!({"first_name": first, "last_name": "Tester", "company_name": "UdaConnect"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_i64().expect("id")
}

pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A valid report of `person`, now.
pub(crate) fn good(person: i64) -> Value {
    json!({"person_id": person, "lat": 10.0, "lon": 20.0, "recorded_at": now_rfc3339()})
}

/// [`good`] with `key` set to `value`.
fn report_with(person: i64, key: &str, value: Value) -> Value {
    let mut v = good(person);
    v[key] = value;
    v
}

/// [`good`] without `key`.
fn report_without(person: i64, key: &str) -> Value {
    let mut v = good(person);
    v.as_object_mut().expect("object").remove(key);
    v
}

/// A running service with `n` persons, its pipeline started.
async fn v1_app(n: usize) -> (TestDb, TestApp, Vec<i64>) {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    app.pipeline(Duration::from_secs(60)).await;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(create_person(&app, &format!("P{i}")).await);
    }
    (db, app, ids)
}

#[tokio::test]
async fn v1_persons_are_created_read_searched_and_paginated() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    app.pipeline(Duration::from_secs(60)).await;

    // Persons: create, read, search, paginate with cursors.
    let mut ids = Vec::new();
    for name in ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay", "Gus"] {
        ids.push(create_person(&app, name).await);
    }
    let (status, ann) = get(&app.url(&format!("/v1/persons/{}", ids[0]))).await;
    assert_eq!(
        (status, ann),
        (
            200,
            json!({"id": ids[0], "first_name": "Ann", "last_name": "Tester", "company_name": "UdaConnect"})
        )
    );
    let mut seen = Vec::new();
    let mut url = app.url("/v1/persons?limit=3");
    let mut pages = 0;
    loop {
        let (status, page) = get(&url).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 3);
        seen.extend(items.iter().map(|p| p["id"].as_i64().expect("id")));
        match page["next_cursor"].as_str() {
            Some(cursor) => url = app.url(&format!("/v1/persons?limit=3&cursor={cursor}")),
            None => break,
        }
    }
    assert_eq!((seen, pages), (ids.clone(), 3));
    let (_, found) = get(&app.url("/v1/persons?q=EV")).await;
    assert_eq!(found["items"][0]["first_name"], "Eve", "{found}");
    assert_eq!(found["items"].as_array().map(Vec::len), Some(1), "{found}");
    // PostgreSQL's text cannot hold NUL: refused naming the field, never a 500 (schemathesis
    // found the 500).
    assert_error(
        &get(&app.url("/v1/persons?q=E%00V")).await,
        400,
        "invalid_argument",
        Some("q"),
    );
    for (path, shape) in [
        ("/v1/persons", "first_name"),
        ("/api/persons", "first_name"),
    ] {
        let body = json!({"first_name": "E\u{0}ve", "last_name": "X", "company_name": "Y"});
        assert_error(
            &post(&app.url(path), &body).await,
            400,
            "invalid_argument",
            Some(shape),
        );
    }
    assert_error(
        &get(&app.url("/v1/persons?limit=0")).await,
        400,
        "invalid_argument",
        Some("limit"),
    );
    assert_error(
        &get(&app.url("/v1/persons?limit=1001")).await,
        400,
        "invalid_argument",
        Some("limit"),
    );
    assert_error(
        &get(&app.url("/v1/persons?limit=ten")).await,
        400,
        "invalid_argument",
        Some("limit"),
    );
    assert_error(
        &get(&app.url("/v1/persons?cursor=bogus")).await,
        400,
        "invalid_argument",
        Some("cursor"),
    );
    assert_error(
        &get(&app.url("/v1/persons/999999")).await,
        404,
        "not_found",
        Some("person_id"),
    );
    assert_error(
        &get(&app.url("/v1/persons/x1")).await,
        400,
        "invalid_argument",
        Some("person_id"),
    );
    for (body, field) in [
        (
            json!({"first_name": 5, "last_name": "a", "company_name": "b"}),
            "first_name",
        ),
        (
            json!({"first_name": "a", "last_name": " ", "company_name": "b"}),
            "last_name",
        ),
        (json!({"first_name": "a", "last_name": "b"}), "company_name"),
        (
            json!({"first_name": "a", "last_name": "b", "company_name": "c".repeat(201)}),
            "company_name",
        ),
        (json!(["a"]), "body"),
    ] {
        assert_error(
            &post(&app.url("/v1/persons"), &body).await,
            400,
            "invalid_argument",
            Some(field),
        );
    }

    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn v1_a_location_is_acknowledged_then_stored_and_a_retry_is_the_same_event() {
    let (db, app, ids) = v1_app(2).await;
    // One location: 202 with its id once the broker acknowledged, then stored.
    let recorded_at = now_rfc3339();
    let body = json!({"person_id": ids[0], "lat": 37.553441, "lon": -122.290524, "recorded_at": recorded_at});
    let (status, accepted) = post(&app.url("/v1/locations"), &body).await;
    assert_eq!(status, 202, "{accepted}");
    let event_id = accepted["event_id"].as_str().expect("event id").to_owned();
    // A retried send without an id is the same event.
    assert_eq!(
        post(&app.url("/v1/locations"), &body).await,
        (202, accepted.clone())
    );
    let location = wait_for_location(&app, &event_id).await;
    assert_eq!(
        (&location["person_id"], &location["lat"], &location["lon"]),
        (&json!(ids[0]), &json!(37.553441), &json!(-122.290524))
    );
    let stored_at =
        chrono::DateTime::parse_from_rfc3339(location["recorded_at"].as_str().expect("time"))
            .expect("rfc3339");
    assert_eq!(
        stored_at,
        chrono::DateTime::parse_from_rfc3339(&recorded_at).expect("rfc3339")
    );
    assert!(location["zone"].is_string(), "{location}");
    let client_id = uuid::Uuid::new_v4();
    let (status, accepted) = post(
        &app.url("/v1/locations"),
        &json!({"event_id": client_id, "person_id": ids[1], "lat": 1.0, "lon": 2.0, "recorded_at": now_rfc3339()}),
    )
    .await;
    assert_eq!((status, accepted), (202, json!({"event_id": client_id})));

    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn v1_a_bad_report_is_refused_naming_its_field() {
    let (db, app, ids) = v1_app(1).await;
    let with = |key: &str, value: Value| report_with(ids[0], key, value);
    let without = |key: &str| report_without(ids[0], key);
    let in_an_hour = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    for (body, field) in [
        (with("lat", json!(90.5)), "lat"),
        (with("lat", json!("37.5")), "lat"),
        (with("lon", json!(-180.01)), "lon"),
        (without("lon"), "lon"),
        (
            with("recorded_at", json!("2020-08-18 10:37")),
            "recorded_at",
        ),
        (with("recorded_at", json!(in_an_hour)), "recorded_at"),
        (without("recorded_at"), "recorded_at"),
        (with("person_id", json!(1.5)), "person_id"),
        (with("person_id", json!(-3)), "person_id"),
        (with("event_id", json!("not-a-uuid")), "event_id"),
        (json!("text"), "body"),
        // Second 60 outside a leap second (and UTC times here have none).
        (
            with("recorded_at", json!("2026-11-29T10:37:60Z")),
            "recorded_at",
        ),
    ] {
        let got = post(&app.url("/v1/locations"), &body).await;
        assert_error(&got, 400, "invalid_argument", Some(field));
    }
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn v1_numbers_a_double_cannot_hold_name_the_field_they_came_in() {
    let (db, app, ids) = v1_app(1).await;
    // Numbers JSON allows but a double cannot hold name the field they came in, in a single
    // report and in a batch.
    for (path, text, field) in [
        (
            "/v1/locations",
            format!(
                r#"{{"person_id": {}, "lat": 1e999, "lon": 2, "recorded_at": "{}"}}"#,
                ids[0],
                now_rfc3339()
            ),
            "lat",
        ),
        (
            "/v1/locations/batch",
            format!(
                r#"{{"events": [{}, {{"person_id": 1, "lat": 1, "lon": -1e400}}]}}"#,
                good(ids[0])
            ),
            "events[1].lon",
        ),
    ] {
        let response = crate::helpers::client()
            .post(app.url(path))
            .header("content-type", "application/json")
            .body(text)
            .send()
            .await
            .expect("sent");
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("JSON error");
        assert_error(&(status, body), 400, "invalid_argument", Some(field));
    }
    assert_error(
        &post(&app.url("/v1/locations"), &good(987_654)).await,
        404,
        "not_found",
        Some("person_id"),
    );
    assert_error(
        &get(&app.url("/v1/locations/not-a-uuid")).await,
        400,
        "invalid_argument",
        Some("event_id"),
    );
    let unknown = uuid::Uuid::new_v4();
    assert_error(
        &get(&app.url(&format!("/v1/locations/{unknown}"))).await,
        404,
        "not_found",
        Some("event_id"),
    );

    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn v1_a_batch_keeps_its_valid_items_and_an_oversized_body_is_refused() {
    let (db, app, ids) = v1_app(4).await;
    // A batch keeps its valid items whatever the others are.
    let batch = json!({"events": [
        good(ids[2]),
        report_with(ids[0], "lat", json!(-91)),
        json!({"person_id": "x"}),
        good(424_242),
        good(ids[3]),
        7,
    ]});
    let (status, report) = post(&app.url("/v1/locations/batch"), &batch).await;
    assert_eq!(status, 202, "{report}");
    assert_eq!(report["accepted"], 2, "{report}");
    let rejected = rejected_items(&report);
    assert_eq!(
        rejected,
        vec![
            (1, "lat"),
            (2, "person_id"),
            (3, "person_id"),
            (5, "events[5]")
        ]
    );
    for item in report["items"].as_array().expect("items") {
        wait_for_location(&app, item["event_id"].as_str().expect("id")).await;
    }
    let indexes: Vec<i64> = report["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["index"].as_i64().expect("index"))
        .collect();
    assert_eq!(indexes, vec![0, 4]);
    let oversize = json!({"events": vec![good(ids[0]); 10_001]});
    assert_error(
        &post(&app.url("/v1/locations/batch"), &oversize).await,
        413,
        "payload_too_large",
        Some("events"),
    );
    assert_error(
        &post(&app.url("/v1/locations/batch"), &json!({"events": 3})).await,
        400,
        "invalid_argument",
        Some("events"),
    );
    assert_error(
        &post(&app.url("/v1/locations/batch"), &json!({})).await,
        400,
        "invalid_argument",
        Some("events"),
    );
    // A body over the limit is refused before it is read.
    let huge = format!(
        "{{\"events\": [\"{}\"]}}",
        "x".repeat(udaconnect::rest::MAX_BODY_BYTES)
    );
    let response = crate::helpers::client()
        .post(app.url("/v1/locations/batch"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("sent");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON error");
    assert_error(&(status, body), 413, "payload_too_large", None);

    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn v1_status_shows_every_partition_owned_and_the_lag_draining_to_zero() {
    let (db, app, ids) = v1_app(1).await;
    let (code, body) = post(&app.url("/v1/locations"), &good(ids[0])).await;
    assert_eq!(code, 202, "{body}");
    // Status: once both stages hold their partitions, this process owns every one of them and
    // the lag drains to 0.
    let config = test_config(&db);
    let every = (config.locations_partitions + config.person_updates_partitions) as usize;
    let url = app.url("/v1/status");
    let status = eventually(
        "every partition owned here, lag 0",
        Duration::from_secs(60),
        || async {
            let (code, status) = get(&url).await;
            assert_eq!(code, 200, "{status}");
            let local = status["partitions"].as_array().map_or(0, |ps| {
                ps.iter().filter(|p| p["local"] == json!(true)).count()
            });
            if status["lag_total"] == 0 && local == every {
                Ok(status)
            } else {
                Err(status.to_string())
            }
        },
    )
    .await;
    let partitions = status["partitions"].as_array().expect("partitions");
    let zones = partitions.iter().filter(|p| p["stage"] == "zones").count();
    let persons = partitions
        .iter()
        .filter(|p| p["stage"] == "persons")
        .count();
    assert_eq!(
        (zones, persons),
        (
            config.locations_partitions as usize,
            config.person_updates_partitions as usize
        ),
        "{status}"
    );
    for p in partitions {
        assert_eq!(
            (&p["owner"], &p["local"], &p["lag"]),
            (&status["node"], &json!(true), &json!(0)),
            "{p}"
        );
        assert!(
            p["end_offset"].as_i64().is_some() && p["processed_offset"] == p["end_offset"],
            "{p}"
        );
    }

    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

async fn wait_for_location(app: &TestApp, event_id: &str) -> Value {
    let url = app.url(&format!("/v1/locations/{event_id}"));
    let body = eventually(
        &format!("event {event_id} stored"),
        Duration::from_secs(60),
        || async {
            let (status, body) = get(&url).await;
            // Not yet stored is a 404; anything else is wrong.
            assert!(status == 200 || status == 404, "{status} {body}");
            (status == 200)
                .then_some(body.clone())
                .ok_or_else(|| body.to_string())
        },
    )
    .await;
    assert_eq!(body["event_id"], event_id);
    body
}

#[tokio::test]
async fn v1_connection_history_overlaps_and_pages() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    let me = create_person(&app, "Me").await;
    let mut peers = Vec::new();
    for name in ["P1", "P2", "P3", "P4"] {
        peers.push(create_person(&app, name).await);
    }
    // Episodes written as the person stage writes them (one open).
    let client = db.client().await;
    let episodes = [
        (
            peers[0],
            "2020-08-18T10:00:00Z",
            "2020-08-18T10:05:00Z",
            Some("2020-08-18T10:05:00Z"),
        ),
        (
            peers[1],
            "2020-08-18T10:00:00Z",
            "2020-08-18T11:00:00Z",
            Some("2020-08-18T11:00:00Z"),
        ),
        (
            peers[2],
            "2020-08-18T12:00:00Z",
            "2020-08-18T12:01:00Z",
            Some("2020-08-18T12:01:00Z"),
        ),
        (
            peers[3],
            "2020-08-18T13:00:00Z",
            "2020-08-18T13:30:00Z",
            None,
        ),
        (
            peers[0],
            "2020-08-19T09:00:00Z",
            "2020-08-19T09:10:00Z",
            Some("2020-08-19T09:10:00Z"),
        ),
    ];
    for (peer, start, last, end) in episodes {
        client
            .execute(
                "INSERT INTO connection (person_id, peer_id, started_at, last_seen_at, ended_at,
                                         colocations, min_distance_m, lat, lon)
                 VALUES ($1, $2, $3::text::timestamptz, $4::text::timestamptz, $5::text::timestamptz, 3, 1.25, 37.5, -122.3)",
                &[&me, &peer, &start, &last, &end],
            )
            .await
            .expect("episode");
    }
    let page = |query: String| {
        let url = app.url(&format!("/v1/persons/{me}/connections{query}"));
        async move { get(&url).await }
    };
    let starts = |body: &Value| -> Vec<(i64, String)> {
        body["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|i| {
                (
                    i["peer"]["id"].as_i64().expect("peer"),
                    i["started_at"].as_str().expect("start").to_owned(),
                )
            })
            .collect()
    };
    // Everything, in (started_at, peer) order, the peer as a Person.
    let (status, all) = page(String::new()).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["items"].as_array().map(Vec::len), Some(5), "{all}");
    assert_eq!(all["items"][0]["peer"]["first_name"], "P1");
    assert_eq!(all["items"][0]["colocations"], 3);
    assert_eq!(
        all["items"][3]["ended_at"],
        Value::Null,
        "the open episode has no end"
    );
    assert!(all.get("next_cursor").is_none(), "{all}");
    // Overlap with [10:30, 12:00.5): the 10:00–11:00 episode and the one starting 12:00.
    let (_, some) = page("?from=2020-08-18T10:30:00Z&to=2020-08-18T12:00:00.5Z".to_owned()).await;
    let got: Vec<i64> = starts(&some).iter().map(|(p, _)| *p).collect();
    assert_eq!(got, vec![peers[1], peers[2]], "{some}");
    // An open episode spans its start to now: after 13:30 only it is still going on, and a
    // range that begins tomorrow holds nothing yet.
    let (_, open) = page("?from=2020-08-19T10:00:00Z".to_owned()).await;
    let got: Vec<i64> = starts(&open).iter().map(|(p, _)| *p).collect();
    assert_eq!(got, vec![peers[3]], "{open}");
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let (status, future) = page(format!("?from={}", tomorrow.replace('+', "%2B"))).await;
    assert_eq!(status, 200, "{future}");
    assert_eq!(future["items"], json!([]), "{future}");
    // Pages of 2 walk the same sequence as one page.
    let mut walked = Vec::new();
    let mut query = "?limit=2".to_owned();
    loop {
        let (status, body) = page(query.clone()).await;
        assert_eq!(status, 200, "{body}");
        walked.extend(starts(&body));
        match body["next_cursor"].as_str() {
            Some(c) => query = format!("?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(walked, starts(&all));
    // Bad input.
    for (query, field) in [
        ("?from=yesterday", "from"),
        ("?to=2020-08-18", "to"),
        ("?from=2020-08-19T00:00:00Z&to=2020-08-18T00:00:00Z", "to"),
        ("?limit=-1", "limit"),
        ("?cursor=AAAA", "cursor"),
    ] {
        assert_error(
            &page(query.to_owned()).await,
            400,
            "invalid_argument",
            Some(field),
        );
    }
    let url = app.url("/v1/persons/55555/connections");
    assert_error(&get(&url).await, 404, "not_found", Some("person_id"));

    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// The next text message of a WebSocket, as JSON.
pub(crate) async fn next_text<S>(ws: &mut S) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await.expect("open").expect("message") {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON message"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads Server-Sent Events until one of `kind` arrives; returns its data.
pub(crate) async fn next_sse<B: AsRef<[u8]>>(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<B>> + Unpin),
    buffer: &mut String,
    kind: &str,
) -> Value {
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let mut name = None;
            let mut data = String::new();
            for line in event.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if name.as_deref() == Some(kind) {
                return serde_json::from_str(&data).expect("event data is JSON");
            }
        }
        let chunk = stream.next().await.expect("stream open").expect("chunk");
        buffer.push_str(&String::from_utf8_lossy(chunk.as_ref()));
    }
}

#[tokio::test]
async fn sse_and_websocket_subscribers_hear_of_a_pair_posted_through_v1() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    app.pipeline(Duration::from_secs(60)).await;
    let a = create_person(&app, "Alice").await;
    let b = create_person(&app, "Bob").await;
    let c = create_person(&app, "Carol").await;

    // Bad subscriptions first.
    let url = app.url(&format!("/v1/persons/{}/connections/stream", 777_777));
    assert_error(&get(&url).await, 404, "not_found", Some("person_id"));
    // A browser's WebSocket sends no Authorization header: the token rides in the query.
    let ws_base = format!(
        "ws://{}/v1/ws?access_token={}",
        app.rest_addr,
        crate::helpers::organizer_token()
    );
    let refused = tokio_tungstenite::connect_async(format!("{ws_base}&person_ids=1,x")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 400);
        }
        other => panic!("a bad person_ids must be refused: {:?}", other.map(|_| ())),
    }

    // SSE for Alice.
    let response = crate::helpers::get(app.url(&format!("/v1/persons/{a}/connections/stream")))
        .await
        .expect("sse");
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/event-stream"));
    let mut sse = response.bytes_stream();
    let mut sse_buffer = String::new();

    // WebSocket for Bob (at connect time) and Carol (subscribed later).
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{ws_base}&person_ids={b}"))
        .await
        .expect("websocket");
    assert_eq!(
        next_text(&mut ws).await,
        json!({"type": "subscribed", "person_ids": [b]})
    );
    ws.send(Message::Text(json!({"subscribe": [c]}).to_string().into()))
        .await
        .expect("send");
    assert_eq!(
        next_text(&mut ws).await,
        json!({"type": "subscribed", "person_ids": [b, c]})
    );
    ws.send(Message::Text("{\"subscribe\": \"all\"}".into()))
        .await
        .expect("send");
    let error = next_text(&mut ws).await;
    assert_eq!(
        (&error["type"], &error["code"], &error["field"]),
        (
            &json!("error"),
            &json!("invalid_argument"),
            &json!("message")
        ),
        "{error}"
    );
    ws.send(Message::Text(
        json!({"subscribe": [888_888]}).to_string().into(),
    ))
    .await
    .expect("send");
    let error = next_text(&mut ws).await;
    assert_eq!(
        (&error["code"], &error["field"]),
        (&json!("not_found"), &json!("subscribe")),
        "{error}"
    );

    // Alice and Bob, 1 m apart at the same time, through /v1/locations.
    let t = now_rfc3339();
    let sent = Instant::now();
    for (person, lat) in [(a, 37.553441), (b, 37.553450)] {
        let body = json!({"person_id": person, "lat": lat, "lon": -122.290524, "recorded_at": t});
        let (status, body) = post(&app.url("/v1/locations"), &body).await;
        assert_eq!(status, 202, "{body}");
    }
    let acked = sent.elapsed();
    let acked_at = Instant::now();
    let within = Duration::from_secs(30);
    let heard = tokio::time::timeout(
        within,
        next_sse(&mut sse, &mut sse_buffer, "connection.started"),
    )
    .await
    .expect("SSE hears connection.started");
    let sse_latency = acked_at.elapsed();
    assert_eq!(
        (heard["person_id"].as_i64(), heard["peer_id"].as_i64()),
        (Some(a), Some(b)),
        "{heard}"
    );
    assert_eq!(heard["type"], "connection.started");
    assert!(
        heard["min_distance_m"]
            .as_f64()
            .is_some_and(|d| d > 0.5 && d < 1.5),
        "{heard}"
    );
    let on_ws = tokio::time::timeout(within, next_text(&mut ws))
        .await
        .expect("WebSocket hears it");
    let ws_latency = acked_at.elapsed();
    assert_eq!(
        (
            on_ws["type"].as_str(),
            on_ws["person_id"].as_i64(),
            on_ws["peer_id"].as_i64()
        ),
        (Some("connection.started"), Some(b), Some(a)),
        "{on_ws}"
    );
    // The two sides of one episode start at the same co-location.
    assert_eq!(on_ws["started_at"], heard["started_at"]);
    eprintln!(
        "both posts acknowledged after {acked:?}; from the last acknowledgement, SSE heard connection.started after {sse_latency:?}, the WebSocket after {ws_latency:?}"
    );
    // The pipeline bench's p99 from ingest-ack to notification at half the sustainable rate
    // (docs/benchmarks.md).
    let bench_p99 = Duration::from_millis(5_200);
    assert!(
        sse_latency <= bench_p99 && ws_latency <= bench_p99,
        "{sse_latency:?} / {ws_latency:?}"
    );

    // Alice's actor: her sighting, and the open connection with Bob.
    let (status, live) = get(&app.url(&format!("/v1/persons/{a}/live"))).await;
    assert_eq!(status, 200, "{live}");
    let node = get(&app.url("/v1/status")).await.1["node"].clone();
    assert_eq!(live["owner"], node, "{live}");
    assert_eq!(
        live["trajectory"].as_array().map(Vec::len),
        Some(1),
        "{live}"
    );
    assert_eq!(live["last_location"]["lat"], 37.553441, "{live}");
    assert!(live["current_zone"].is_string(), "{live}");
    let open: Vec<i64> = live["open_connections"]
        .as_array()
        .expect("open connections")
        .iter()
        .map(|c| c["peer_id"].as_i64().expect("peer"))
        .collect();
    assert_eq!(open, vec![b], "{live}");
    // Carol never reported: a known person with no live state.
    let (status, live) = get(&app.url(&format!("/v1/persons/{c}/live"))).await;
    assert_eq!(status, 200, "{live}");
    assert_eq!(
        (
            live["trajectory"].as_array().map(Vec::len),
            live.get("owner")
        ),
        (Some(0), None),
        "{live}"
    );
    assert_error(
        &get(&app.url("/v1/persons/919191/live")).await,
        404,
        "not_found",
        Some("person_id"),
    );
    assert_error(
        &get(&app.url("/v1/persons/x/live")).await,
        400,
        "invalid_argument",
        Some("person_id"),
    );

    ws.close(None).await.expect("close");
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// The `Access-Control-Allow-Origin` an answer carries, if any.
fn allowed_origin(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get("access-control-allow-origin")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `GET path` as a page on `origin` sends it.
async fn get_from(app: &TestApp, origin: &str, path: &str) -> reqwest::Response {
    crate::helpers::client()
        .get(app.url(path))
        .header("origin", origin)
        .send()
        .await
        .expect("get")
}

/// The browser's CORS preflight for a JSON `method path` from a page on `origin`.
async fn preflight(app: &TestApp, origin: &str, path: &str, method: &str) -> reqwest::Response {
    crate::helpers::client()
        .request(reqwest::Method::OPTIONS, app.url(path))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .expect("preflight")
}

/// The POC's frontend, served from another origin (port 30000), calls `/api` from the browser;
/// the POC answered every origin. `/api` does too, `/v1` does not (no `cors_origins` set).
#[tokio::test]
async fn the_poc_contract_answers_browsers_from_any_origin_and_v1_does_not() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    let page = "http://localhost:30000";
    for (path, method) in [
        ("/api/persons", "GET"),
        ("/api/persons", "POST"),
        ("/api/persons/1/connection", "GET"),
        ("/api/locations", "POST"),
    ] {
        let answer = preflight(&app, page, path, method).await;
        assert!(
            answer.status().is_success(),
            "preflight {method} {path}: {}",
            answer.status()
        );
        let origin = allowed_origin(&answer);
        assert!(
            origin.as_deref() == Some(page) || origin.as_deref() == Some("*"),
            "preflight {method} {path} allows {origin:?}"
        );
        let methods = answer
            .headers()
            .get("access-control-allow-methods")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(methods.contains(method), "{path} allows {methods:?}");
    }
    // The answers themselves, and an error's, carry the header, so the page can read them.
    let persons = get_from(&app, page, "/api/persons").await;
    assert_eq!(persons.status().as_u16(), 200);
    assert!(allowed_origin(&persons).is_some(), "GET /api/persons");
    let missing = get_from(&app, page, "/api/persons/31337").await;
    assert_eq!(missing.status().as_u16(), 404);
    assert!(allowed_origin(&missing).is_some(), "GET /api/persons/31337");
    // /v1 stays closed to other origins.
    let v1 = preflight(&app, page, "/v1/persons", "POST").await;
    assert_eq!(
        allowed_origin(&v1),
        None,
        "preflight /v1/persons: {}",
        v1.status()
    );
    let v1 = get_from(&app, page, "/v1/persons").await;
    assert_eq!(v1.status().as_u16(), 200);
    assert_eq!(allowed_origin(&v1), None, "GET /v1/persons");
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn cors_lets_the_configured_origin_read_answers_and_errors() {
    let db = TestDb::new().await;
    let mut config = test_config(&db);
    config.cors_origins = "http://venue.example, http://other.example".to_owned();
    let app = TestApp::spawn(config).await;
    let answer = preflight(&app, "http://venue.example", "/v1/persons", "POST").await;
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(
        allowed_origin(&answer).as_deref(),
        Some("http://venue.example")
    );
    // An error answer carries the header too, so the page can read the JSON error.
    let response = get_from(&app, "http://other.example", "/v1/persons/31337").await;
    assert_eq!(
        allowed_origin(&response).as_deref(),
        Some("http://other.example")
    );
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON");
    assert_error(&(status, body), 404, "not_found", Some("person_id"));
    // Another origin is not allowed.
    let refused = preflight(&app, "http://elsewhere.example", "/v1/persons", "POST").await;
    assert_eq!(allowed_origin(&refused), None);
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn without_a_broker_the_pipeline_endpoints_answer_503_and_the_rest_works() {
    let db = TestDb::new().await;
    let mut config = test_config(&db);
    // Nothing listens there: the pipeline cannot start.
    config.kafka_brokers = format!("127.0.0.1:{}", crate::helpers::free_port());
    let app = TestApp::spawn(config).await;
    let person = create_person(&app, "Solo").await;
    let event = json!({"person_id": person, "lat": 1.0, "lon": 2.0, "recorded_at": now_rfc3339()});
    assert_error(
        &post(&app.url("/v1/locations"), &event).await,
        503,
        "unavailable",
        None,
    );
    let batch = json!({"events": [event]});
    assert_error(
        &post(&app.url("/v1/locations/batch"), &batch).await,
        503,
        "unavailable",
        None,
    );
    for path in [
        "/v1/status".to_owned(),
        format!("/v1/persons/{person}/live"),
        format!("/v1/persons/{person}/connections/stream"),
    ] {
        assert_error(&get(&app.url(&path)).await, 503, "unavailable", None);
    }
    let ws = format!(
        "ws://{}/v1/ws?person_ids={person}&access_token={}",
        app.rest_addr,
        crate::helpers::organizer_token()
    );
    match tokio_tungstenite::connect_async(ws).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
        }
        other => panic!("the socket must be refused: {:?}", other.map(|_| ())),
    }
    // What needs only PostgreSQL still answers.
    assert_eq!(
        get(&app.url(&format!("/v1/persons/{person}/connections")))
            .await
            .0,
        200
    );
    assert_eq!(get(&app.url("/api/persons")).await.0, 200);
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// `/v1/points` refuses a box or a limit it cannot read, naming the parameter, and keeps to
/// the box it is given; `/v1/connections/stream` carries everyone's notifications, an
/// episode once per side; `/v1/status` counts the open episode once.
#[tokio::test]
async fn the_console_endpoints_check_their_input_and_answer_everyone() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    app.pipeline(Duration::from_secs(60)).await;
    for (query, field) in [
        ("bbox=1,2,3", "bbox"),
        ("bbox=a,b,c,d", "bbox"),
        ("bbox=13,53,14,52", "bbox"),
        ("bbox=170,0,-170,1", "bbox"),
        ("bbox=0,-91,1,1", "bbox"),
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
    ] {
        let got = get(&app.url(&format!("/v1/points?{query}"))).await;
        assert_error(&got, 400, "invalid_argument", Some(field));
    }

    let response = crate::helpers::get(app.url("/v1/connections/stream"))
        .await
        .expect("sse");
    assert_eq!(response.status().as_u16(), 200);
    let mut sse = response.bytes_stream();
    let mut buffer = String::new();
    let a = create_person(&app, "Ann").await;
    let b = create_person(&app, "Ben").await;
    let at = now_rfc3339();
    for (person, lat) in [(a, 48.8584), (b, 48.85841)] {
        let report = json!({"person_id": person, "lat": lat, "lon": 2.2945, "recorded_at": at});
        let (status, body) = post(&app.url("/v1/locations"), &report).await;
        assert_eq!(status, 202, "{body}");
    }
    let mut heard = BTreeSet::new();
    for _ in 0..2 {
        let event = tokio::time::timeout(
            Duration::from_secs(30),
            next_sse(&mut sse, &mut buffer, "connection.started"),
        )
        .await
        .expect("connection.started on everyone's stream");
        heard.insert((
            event["person_id"].as_i64().expect("person_id"),
            event["peer_id"].as_i64().expect("peer_id"),
        ));
    }
    assert_eq!(heard, BTreeSet::from([(a, b), (b, a)]));

    // The map's source: both points, and only what the box holds.
    let (status, all) = get(&app.url("/v1/points")).await;
    assert_eq!(status, 200, "{all}");
    let persons: BTreeSet<i64> = all["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["person_id"].as_i64().expect("person_id"))
        .collect();
    assert_eq!(persons, BTreeSet::from([a, b]), "{all}");
    assert_eq!(
        all["zones"][0]["boundary"].as_array().map(Vec::len),
        Some(6),
        "{all}"
    );
    let (_, elsewhere) = get(&app.url("/v1/points?bbox=13.3,52.5,13.4,52.6")).await;
    assert_eq!(elsewhere["points"], json!([]), "{elsewhere}");
    let (_, one) = get(&app.url("/v1/points?limit=1")).await;
    assert_eq!(one["points"].as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(one["truncated"], true, "{one}");

    let open = eventually(
        "the open episode stored",
        Duration::from_secs(30),
        || async {
            let (_, status) = get(&app.url("/v1/status")).await;
            (status["open_connections"] == 1)
                .then_some(())
                .ok_or_else(|| status.to_string())
        },
    );
    open.await;
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

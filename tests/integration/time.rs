//! Event time we trust, against the running service with the real PostgreSQL and broker: a
//! fast phone clock cannot make everyone else's reports late, a quiet meeting ends on the
//! clock, and a client's `event_id` means one report.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::helpers::{eventually, test_config, TestApp, TestDb};
use crate::rest::{assert_error, create_person, get, next_sse, post, rejected_items};

/// 1 m of latitude, in degrees (about).
const METER: f64 = 1.0 / 111_320.0;
const LAT: f64 = 41.3870;
const LON: f64 = 2.1700;

fn at(seconds_from_now: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(seconds_from_now))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn report(person: i64, meters_north: f64, recorded_at: &str) -> Value {
    json!({"person_id": person, "lat": LAT + meters_north * METER, "lon": LON,
           "recorded_at": recorded_at})
}

/// Copies the zone stage counted as late (the late path), over all partitions, from `/metrics`.
fn zone_late_copies(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("udaconnect_partition_late_events_total{stage=\"zones\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A service on `db` whose quiet meetings end 40 s of event time after their last co-location
/// (`episode_gap_s` 30 + `lateness_s` 10), its pipeline started; and its configuration.
async fn ending_in_40_s(db: &TestDb) -> (udaconnect::Config, TestApp) {
    let mut config = test_config(db);
    config.episode_gap_s = 30;
    config.lateness_s = 10;
    let app = TestApp::spawn(config.clone()).await;
    app.pipeline(Duration::from_secs(60)).await;
    (config, app)
}

/// Posts one report and asserts it was accepted.
async fn accepted(app: &TestApp, body: &Value) {
    let (status, answer) = post(&app.url("/v1/locations"), body).await;
    assert_eq!(status, 202, "{answer}");
}

/// The notifications stream of `person`, read until an event of `kind` comes, for at most
/// `within`.
struct Notifications {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    buffer: String,
}

impl Notifications {
    async fn of(app: &TestApp, person: i64) -> Self {
        let url = app.url(&format!("/v1/persons/{person}/connections/stream"));
        let response = crate::helpers::get(url).await.expect("sse");
        assert_eq!(response.status().as_u16(), 200);
        Self {
            stream: Box::pin(response.bytes_stream().map(|b| b.map(|b| b.to_vec()))),
            buffer: String::new(),
        }
    }

    async fn next(&mut self, kind: &str, within: Duration) -> Value {
        tokio::time::timeout(within, next_sse(&mut self.stream, &mut self.buffer, kind))
            .await
            .unwrap_or_else(|_| panic!("no {kind} notification within {within:?}"))
    }
}

#[tokio::test]
async fn a_phone_clock_290_s_ahead_does_not_make_everyone_else_late() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    app.pipeline(Duration::from_secs(60)).await;
    let [p, q, r, s, t] = [
        create_person(&app, "P").await,
        create_person(&app, "Q").await,
        create_person(&app, "R").await,
        create_person(&app, "S").await,
        create_person(&app, "T").await,
    ];
    let mut heard_p = Notifications::of(&app, p).await;
    let mut heard_s = Notifications::of(&app, s).await;

    // P and Q meet now.
    accepted(&app, &report(p, 0.0, &at(0))).await;
    accepted(&app, &report(q, 1.0, &at(0))).await;
    let started = heard_p
        .next("connection.started", Duration::from_secs(20))
        .await;
    assert_eq!(started["peer_id"].as_i64(), Some(q), "{started}");

    // R, 2 km away, sends a report stamped 290 s ahead: accepted (within future_skew_s).
    accepted(&app, &report(r, 2_000.0, &at(290))).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // S and T meet 30 m from P, now: connected in real time all the same.
    accepted(&app, &report(s, 30.0, &at(0))).await;
    accepted(&app, &report(t, 31.0, &at(0))).await;
    let started = heard_s
        .next("connection.started", Duration::from_secs(20))
        .await;
    assert_eq!(started["peer_id"].as_i64(), Some(t), "{started}");

    // R's report is stored with the time it carries, and counted.
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("udaconnect_ingest_untrusted_times_total{reason=\"ahead_of_clock\"} 1"),
        "{metrics}"
    );
    // Nobody's report was late: S and T met in real time, not through the late path.
    assert_eq!(zone_late_copies(&metrics), 0.0, "{metrics}");
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn a_quiet_meeting_ends_within_the_gap_and_the_lateness() {
    let db = TestDb::new().await;
    let (_, app) = ending_in_40_s(&db).await;
    let a = create_person(&app, "A").await;
    let b = create_person(&app, "B").await;
    let mut heard = Notifications::of(&app, a).await;

    // One report each, 1 m apart, now; then nobody reports.
    let posted = Instant::now();
    accepted(&app, &report(a, 0.0, &at(0))).await;
    accepted(&app, &report(b, 1.0, &at(0))).await;
    let started = heard
        .next("connection.started", Duration::from_secs(20))
        .await;
    assert_eq!(started["peer_id"].as_i64(), Some(b), "{started}");

    // The episode ends once the clock is past its last co-location by the gap and the
    // lateness (40 s), plus the heartbeats' and the stages' few seconds.
    let ended = heard
        .next("connection.ended", Duration::from_secs(70))
        .await;
    let silence = posted.elapsed();
    assert!(
        silence >= Duration::from_secs(38) && silence <= Duration::from_secs(58),
        "ended after {silence:?}"
    );
    assert_eq!(
        (ended["peer_id"].as_i64(), ended["colocations"].as_i64()),
        (Some(b), Some(1)),
        "{ended}"
    );
    assert!(ended["ended_at"].is_string(), "{ended}");
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn an_event_id_reused_for_a_different_report_is_refused_naming_it() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    app.pipeline(Duration::from_secs(60)).await;
    let person = create_person(&app, "Ada").await;
    let id = uuid::Uuid::new_v4();
    let now = at(0);
    let barcelona = json!({"event_id": id, "person_id": person, "lat": 41.3870, "lon": 2.1700, "recorded_at": now});
    let munich = json!({"event_id": id, "person_id": person, "lat": 48.1374, "lon": 11.5755, "recorded_at": now});

    let url = app.url("/v1/locations");
    assert_eq!(post(&url, &barcelona).await, (202, json!({"event_id": id})));
    // Refused while the first is known to this process, and once it is stored.
    assert_error(
        &post(&url, &munich).await,
        409,
        "already_exists",
        Some("event_id"),
    );
    let stored = app.url(&format!("/v1/locations/{id}"));
    eventually(
        "the first report stored",
        Duration::from_secs(30),
        || async {
            match get(&stored).await {
                (200, _) => Ok(()),
                (status, body) => Err(format!("{status} {body}")),
            }
        },
    )
    .await;
    assert_error(
        &post(&url, &munich).await,
        409,
        "already_exists",
        Some("event_id"),
    );
    // An identical retry is a silent success.
    assert_eq!(post(&url, &barcelona).await, (202, json!({"event_id": id})));
    // In a batch, the reuse is the item's rejection; the rest goes through.
    let other = uuid::Uuid::new_v4();
    let (status, batch) = post(
        &app.url("/v1/locations/batch"),
        &json!({"events": [
            munich,
            {"event_id": other, "person_id": person, "lat": 41.0, "lon": 2.0, "recorded_at": now},
            {"event_id": other, "person_id": person, "lat": 42.0, "lon": 2.0, "recorded_at": now},
        ]}),
    )
    .await;
    assert_eq!(status, 202, "{batch}");
    assert_eq!(batch["accepted"], 1, "{batch}");
    assert_eq!(
        rejected_items(&batch),
        vec![(0, "event_id"), (2, "event_id")],
        "{batch}"
    );
    // The first report is the one stored.
    let (_, stored) = get(&app.url(&format!("/v1/locations/{id}"))).await;
    assert_eq!(
        (&stored["lat"], &stored["lon"]),
        (&json!(41.3870), &json!(2.1700))
    );

    // Two reports with one new id sent at the same moment: one is accepted, the other refused,
    // and afterwards a retry of the accepted one is a 202 and of the refused one a 409.
    let pairs = (0..10).map(|_| {
        let id = uuid::Uuid::new_v4();
        let one = json!({"event_id": id, "person_id": person, "lat": 35.080, "lon": 2.0, "recorded_at": now});
        let other = json!({"event_id": id, "person_id": person, "lat": 35.081, "lon": 2.0, "recorded_at": now});
        (one, other)
    });
    for (one, other) in pairs.collect::<Vec<_>>() {
        let (a, b) = tokio::join!(post(&url, &one), post(&url, &other));
        let mut statuses = [a.0, b.0];
        statuses.sort_unstable();
        assert_eq!(statuses, [202, 409], "{a:?} {b:?}");
        let (kept, refused) = if a.0 == 202 {
            (one, other)
        } else {
            (other, one)
        };
        assert_eq!(post(&url, &kept).await.0, 202);
        assert_error(
            &post(&url, &refused).await,
            409,
            "already_exists",
            Some("event_id"),
        );
    }
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// Case 1 of the late path: persons A and B each post one batch of 6 reports, 1 m apart,
/// stamped 10 to 5 minutes ago (a phone whose Wi-Fi came back), while event time is at now.
/// Every report is late; the pair still gets its episode, with every co-location the oracle
/// counts (the same 6 times on both sides, 60 s apart with a 60 s window: 6 + 2 × 5 = 16),
/// and both hear `connection.started` within seconds of the upload.
#[tokio::test]
async fn an_offline_pair_gets_its_episode_within_seconds_of_the_upload() {
    let db = TestDb::new().await;
    let mut config = test_config(&db);
    config.late_horizon_s = 86_400;
    let app = TestApp::spawn(config).await;
    app.pipeline(Duration::from_secs(60)).await;
    let a = create_person(&app, "A").await;
    let b = create_person(&app, "B").await;
    let c = create_person(&app, "C").await;
    let mut heard_a = Notifications::of(&app, a).await;
    let mut heard_b = Notifications::of(&app, b).await;

    // Someone 2 km away reports now and then: event time is now.
    for _ in 0..3 {
        accepted(&app, &report(c, 2_000.0, &at(0))).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The same six times for both (60 s apart: each report also meets the peer's next one).
    let first = chrono::Utc::now() - chrono::Duration::seconds(600);
    let times: Vec<String> = (0..6)
        .map(|k| {
            (first + chrono::Duration::seconds(60 * k))
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        })
        .collect();
    let upload = |person: i64, meters_north: f64| {
        let events: Vec<Value> = times
            .iter()
            .map(|t| report(person, meters_north, t))
            .collect();
        json!({ "events": events })
    };
    let uploaded = Instant::now();
    for (person, north) in [(a, 0.0), (b, 1.0)] {
        let (status, answer) = post(&app.url("/v1/locations/batch"), &upload(person, north)).await;
        assert_eq!(
            (status, answer["accepted"].as_u64()),
            (202, Some(6)),
            "{answer}"
        );
    }
    let to_a = heard_a
        .next("connection.started", Duration::from_secs(20))
        .await;
    let to_b = heard_b
        .next("connection.started", Duration::from_secs(20))
        .await;
    assert!(uploaded.elapsed() < Duration::from_secs(20));
    assert_eq!(to_a["peer_id"].as_i64(), Some(b), "{to_a}");
    assert_eq!(to_b["peer_id"].as_i64(), Some(a), "{to_b}");
    // One upload, one announcement each, with the episode's figures after it.
    assert_eq!(
        (to_a["colocations"].as_i64(), to_b["colocations"].as_i64()),
        (Some(16), Some(16)),
        "{to_a} {to_b}"
    );

    // The stored episode starts at the first report; it stays open until the gap has passed,
    // and the person's live state counts all 16 co-locations.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, page) = get(&app.url(&format!("/v1/persons/{a}/connections"))).await;
        let (_, live) = get(&app.url(&format!("/v1/persons/{a}/live"))).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        let open = live["open_connections"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let counted = open.first().and_then(|e| e["colocations"].as_i64());
        if let (Some(e), Some(16)) = (items.first(), counted) {
            assert_eq!((items.len(), open.len()), (1, 1), "{page} {live}");
            assert_eq!(e["peer"]["id"].as_i64(), Some(b), "{e}");
            assert_eq!(
                chrono::DateTime::parse_from_rfc3339(e["started_at"].as_str().expect("start")),
                chrono::DateTime::parse_from_rfc3339(&times[0]),
                "{e}"
            );
            assert!(e["ended_at"].is_null(), "{e}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no episode of 16 co-locations: {page} {live}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // They took the late path.
    let metrics = app.metrics().await;
    let late = zone_late_copies(&metrics);
    assert!(late >= 12.0, "late copies: {late}");
    let searched: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("udaconnect_late_copies_searched_total "))
        .and_then(|v| v.parse().ok())
        .expect("udaconnect_late_copies_searched_total");
    assert!(searched >= 12.0, "late copies searched: {searched}");
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// The late path's horizon: a report older than `late_horizon_s` before its receive time is
/// refused naming `recorded_at`; one just inside it is accepted.
#[tokio::test]
async fn a_report_older_than_the_late_horizon_is_refused_naming_recorded_at() {
    let db = TestDb::new().await;
    let mut config = test_config(&db);
    config.late_horizon_s = 3_600;
    let app = TestApp::spawn(config).await;
    app.pipeline(Duration::from_secs(60)).await;
    let a = create_person(&app, "A").await;
    let url = app.url("/v1/locations");
    let answer = post(&url, &report(a, 0.0, &at(-3_700))).await;
    assert_error(&answer, 400, "invalid_argument", Some("recorded_at"));
    assert!(
        answer.1.to_string().contains("late horizon"),
        "{}",
        answer.1
    );
    accepted(&app, &report(a, 0.0, &at(-3_500))).await;
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// A late upload newer than every live report (a phone back online after the last live report
/// of the day) does not stop event time: the quiet pair's episode still ends within the gap
/// and the lateness plus a few seconds.
#[tokio::test]
async fn a_late_upload_after_the_last_live_report_does_not_stop_the_clock() {
    let db = TestDb::new().await;
    let (_, app) = ending_in_40_s(&db).await;
    let a = create_person(&app, "A").await;
    let b = create_person(&app, "B").await;
    let c = create_person(&app, "C").await;
    let mut heard = Notifications::of(&app, a).await;

    let posted = Instant::now();
    let met = chrono::Utc::now();
    let stamp = |after_s: i64| {
        (met + chrono::Duration::seconds(after_s))
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    };
    accepted(&app, &report(a, 0.0, &stamp(0))).await;
    accepted(&app, &report(b, 1.0, &stamp(0))).await;
    heard
        .next("connection.started", Duration::from_secs(20))
        .await;
    // 13 s later, C (2 km away) uploads two reports stamped 1 and 2 s after the meeting:
    // newer than every live report, and late (received more than lateness_s after their time).
    tokio::time::sleep(Duration::from_secs(13).saturating_sub(posted.elapsed())).await;
    accepted(&app, &report(c, 2_000.0, &stamp(1))).await;
    accepted(&app, &report(c, 2_000.0, &stamp(2))).await;
    let ended = heard
        .next("connection.ended", Duration::from_secs(70))
        .await;
    let silence = posted.elapsed();
    assert!(
        silence >= Duration::from_secs(38) && silence <= Duration::from_secs(58),
        "ended after {silence:?}: {ended}"
    );
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// A restarted service resumes event time from the stored reports: a meeting still open when
/// it stopped ends on the clock although nobody reports after the restart.
#[tokio::test]
async fn a_meeting_open_at_a_restart_ends_on_the_clock_with_nobody_reporting() {
    let db = TestDb::new().await;
    let (config, app) = ending_in_40_s(&db).await;
    let a = create_person(&app, "A").await;
    let b = create_person(&app, "B").await;
    // Listening before the reports go in: a stream starts from now on, and the notification
    // could otherwise be published before the subscription (it was, once, in a full run).
    let mut heard = Notifications::of(&app, a).await;
    let posted = Instant::now();
    accepted(&app, &report(a, 0.0, &at(0))).await;
    accepted(&app, &report(b, 1.0, &at(0))).await;
    heard
        .next("connection.started", Duration::from_secs(20))
        .await;
    app.stop().await.expect("clean shutdown");

    let app = TestApp::spawn(config).await;
    app.pipeline(Duration::from_secs(60)).await;
    // The episode ends once the clock is 40 s past the meeting, plus the restart's seconds.
    let deadline = posted + Duration::from_secs(90);
    loop {
        let (status, page) = get(&app.url(&format!("/v1/persons/{a}/connections"))).await;
        assert_eq!(status, 200, "{page}");
        if page["items"][0]["ended_at"].is_string() {
            assert!(posted.elapsed() >= Duration::from_secs(38), "{page}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still open {:?} after the meeting: {page}",
            posted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

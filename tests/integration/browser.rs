//! Real-browser tests: Debian's Chromium (`/usr/bin/chromium`, installed by `./dev setup`),
//! driven headless by playwright-core from `tests/browser/` (npm, pinned by its lockfile,
//! installed by `./dev setup`; it downloads no browser).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use udaconnect::config::Config;
use udaconnect_bench::produce::{ensure_persons, wire};
use udaconnect_bench::sim::{ConferenceConfig, Simulation};

use crate::helpers::{
    eventually, test_config, test_config_for, wait_for_status, PrivateBroker, TestApp, TestDb,
};
use crate::rest::{get, poc_seeded, post};

/// `tests/browser/`.
fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Headless Chromium driven by `tests/browser/drive.mjs`, one JSON command and answer at a
/// time, so that the test can act between the browser's steps.
struct Chromium {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Chromium {
    /// Starts the browser with a page of `width` × `height` CSS pixels.
    async fn start(width: u32, height: u32) -> Self {
        let dir = browser_dir();
        assert!(
            dir.join("node_modules/playwright-core").exists(),
            "playwright-core is not installed in {}: run ./dev setup",
            dir.display()
        );
        let chromium =
            std::env::var("UDATEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
        assert!(
            Path::new(&chromium).exists(),
            "no Chromium at {chromium}: run ./dev setup, or set UDATEST_CHROMIUM"
        );
        let node = std::env::var("UDATEST_NODE").unwrap_or_else(|_| "node".to_owned());
        let mut child = tokio::process::Command::new(node)
            .arg(dir.join("drive.mjs"))
            .env("UDATEST_CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs drive.mjs");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut browser = Self {
            child,
            stdin,
            lines,
        };
        browser
            .run(json!({"op": "open", "width": width, "height": height}))
            .await;
        browser
    }

    /// Sends one command; its answer's value, or the error the browser gave.
    async fn send(&mut self, command: Value) -> Result<Value, String> {
        let line = format!("{command}\n");
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("drive.mjs reads commands");
        let answer = tokio::time::timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("drive.mjs did not answer {command} within 120 s"))
            .expect("drive.mjs output")
            .unwrap_or_else(|| panic!("drive.mjs exited before answering {command}"));
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("drive.mjs answered no JSON ({e}): {answer}"));
        if answer["ok"] == true {
            Ok(answer["value"].clone())
        } else {
            Err(answer["error"].as_str().unwrap_or_default().to_owned())
        }
    }

    /// [`Chromium::send`] that must succeed; a failure names the page's problems too.
    async fn run(&mut self, command: Value) -> Value {
        match self.send(command.clone()).await {
            Ok(value) => value,
            Err(e) => {
                let problems = self.send(json!({"op": "problems"})).await;
                panic!("{command}: {e}; the page's problems: {problems:?}")
            }
        }
    }

    async fn goto(&mut self, url: &str) {
        self.run(json!({"op": "goto", "url": url})).await;
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, js: &str) -> Value {
        self.run(json!({"op": "eval", "js": js})).await
    }

    /// Waits until `js` is truthy in the page, for up to `within`; its value and how long
    /// that took. Panics with `what`, the expression's last value of `show` and the page's
    /// problems otherwise.
    async fn wait(
        &mut self,
        what: &str,
        js: &str,
        within: Duration,
        show: &str,
    ) -> (Value, Duration) {
        let started = Instant::now();
        let command = json!({"op": "wait", "js": js, "timeout_ms": within.as_millis() as u64});
        match self.send(command).await {
            Ok(v) => (v["value"].clone(), started.elapsed()),
            Err(e) => {
                let seen = self.eval(show).await;
                let problems = self.send(json!({"op": "problems"})).await;
                panic!("{what}: not within {within:?} ({e}); the page shows {seen}; problems: {problems:?}")
            }
        }
    }

    /// Types `value` into the input `selector` and presses Enter (submits its form).
    async fn enter(&mut self, selector: &str, value: &str) {
        self.run(json!({"op": "fill", "selector": selector, "value": value}))
            .await;
        self.run(json!({"op": "press", "selector": selector, "key": "Enter"}))
            .await;
    }

    /// Waits until the element `selector` has `data-state` `state`, for up to `within`, and
    /// returns its text.
    async fn says(&mut self, what: &str, selector: &str, state: &str, within: Duration) -> String {
        let element = format!("document.querySelector({selector:?})");
        let (text, _) = self
            .wait(
                what,
                &format!("{element}.dataset.state === {state:?} && {element}.textContent"),
                within,
                &format!("{element}.textContent"),
            )
            .await;
        text.as_str().unwrap_or_default().to_owned()
    }

    async fn problems(&mut self) -> Value {
        self.run(json!({"op": "problems"})).await
    }

    async fn close(mut self) {
        let _ = self.stdin.write_all(b"{\"op\": \"close\"}\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// The text of each cell of each row matching `selector`.
async fn rows(browser: &mut Chromium, selector: &str) -> Vec<Vec<String>> {
    let js = format!(
        "Array.from(document.querySelectorAll({selector:?})).map(r => \
         Array.from(r.children).map(c => c.textContent.trim()))"
    );
    serde_json::from_value(browser.eval(&js).await).expect("rows of cells")
}

/// Serves `html` at `/` on a port of its own (another origin than the service's); returns the
/// page's base URL and the server task.
async fn serve_page(html: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).expect("acceptor");
    let page = poem::endpoint::make_sync(move |_| poem::web::Html(html));
    let server = tokio::spawn(async move {
        let _ = poem::Server::new_with_acceptor(acceptor).run(page).await;
    });
    (format!("http://127.0.0.1:{port}"), server)
}

/// The POC's frontend is a page on another origin (port 30000) that calls `/api/persons` and
/// `/api/persons/{id}/connection` from the browser. A stand-in that does the same
/// (`tests/browser/poc-frontend.html`) renders exactly what those two calls answer, in
/// Chromium, on the POC's seed.
#[tokio::test]
async fn the_poc_frontend_on_another_origin_renders_the_poc_api_in_chromium() {
    let (db, app) = poc_seeded().await;
    let (status, persons) = get(&app.url("/api/persons")).await;
    assert_eq!(status, 200);
    let expected_persons: Vec<Vec<String>> = persons
        .as_array()
        .expect("list")
        .iter()
        .map(|p| {
            vec![
                p["id"].to_string(),
                p["first_name"].as_str().expect("first_name").to_owned(),
                p["last_name"].as_str().expect("last_name").to_owned(),
                p["company_name"].as_str().expect("company_name").to_owned(),
            ]
        })
        .collect();
    let query = "start_date=2020-01-01&end_date=2020-12-30&distance=5";
    let (status, connections) = get(&app.url(&format!("/api/persons/5/connection?{query}"))).await;
    assert_eq!(status, 200);
    let mut expected_connections: Vec<Vec<String>> = connections
        .as_array()
        .expect("list")
        .iter()
        .map(|c| {
            vec![
                c["person"]["id"].to_string(),
                c["location"]["id"].to_string(),
            ]
        })
        .collect();
    expected_connections.sort();
    assert!(
        !expected_connections.is_empty(),
        "the seed gives person 5 connections"
    );

    let (page, server) = serve_page(include_str!("../browser/poc-frontend.html")).await;
    let url = format!("{page}/?api={}&person=5&{query}", app.url(""));
    let mut browser = Chromium::start(1280, 800).await;
    browser.goto(&url).await;
    let status = "document.querySelector('#status').textContent";
    let (shown, _) = browser
        .wait(
            "the POC page loaded",
            &format!("{status} !== 'loading' && {status}"),
            Duration::from_secs(15),
            status,
        )
        .await;
    assert_eq!(shown, "loaded", "problems: {}", browser.problems().await);
    assert_eq!(browser.problems().await, json!([]));
    assert_eq!(
        rows(&mut browser, "#persons tr.person").await,
        expected_persons
    );
    let mut seen = rows(&mut browser, "#connections tr.connection").await;
    seen.sort();
    assert_eq!(seen, expected_connections);

    browser.close().await;
    server.abort();
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// Where the console test writes its screenshots: `$UDATEST_SCREENSHOT_DIR`, else a scratch
/// directory under `target/`. `UDATEST_SCREENSHOT_DIR=docs/console ./dev test console` refreshes
/// the ones the README shows.
fn screenshot_dir() -> PathBuf {
    let dir = std::env::var("UDATEST_SCREENSHOT_DIR")
        .map(|d| Path::new(env!("CARGO_MANIFEST_DIR")).join(d))
        .unwrap_or_else(|_| Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots"));
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

/// A simulated conference of `attendees` (ids from 1001) that started `before_s` seconds ago
/// and lasts `duration_s`.
fn conference_from(before_s: u32, attendees: u32, duration_s: u32) -> Simulation {
    let mut config = ConferenceConfig::for_attendees(attendees);
    config.first_person_id = 1001;
    config.duration_s = duration_s;
    config.start = chrono::Utc::now().timestamp_micros() - i64::from(before_s) * 1_000_000;
    config.fit_venue();
    Simulation::new(config).expect("valid conference")
}

/// A report as `/v1/locations` reads it.
fn report_json(e: &udaconnect_actors::domain::LocationEvent) -> Value {
    let e = wire(e);
    json!({
        "event_id": e.event_id,
        "person_id": e.person_id,
        "lat": e.lat,
        "lon": e.lon,
        "recorded_at": udaconnect::store::timestamp(e.recorded_at),
    })
}

/// Feeds the simulation through `/v1/locations/batch` as its phones would: inserts its
/// attendees, posts at once every report that would have arrived by now, and returns how many,
/// with a task that posts the others as their arrival time comes (once a second).
async fn feed(
    app: &TestApp,
    db_url: &str,
    sim: &Simulation,
) -> (usize, tokio::task::JoinHandle<()>) {
    let pool =
        udaconnect::store::pool(&test_config_for(db_url), Duration::from_secs(5)).expect("pool");
    ensure_persons(&pool, sim).await.expect("insert persons");
    let mut events = Vec::new();
    let mut it = sim.events();
    while let Some(batch) = it.next_batch() {
        events.extend_from_slice(batch);
    }
    events.sort_by_key(|e| e.received_at);
    let now = chrono::Utc::now().timestamp_micros();
    let split = events.partition_point(|e| e.received_at <= now);
    let url = app.url("/v1/locations/batch");
    let post_all = |url: String, batch: Vec<Value>| async move {
        let (status, body) = post(&url, &json!({ "events": batch })).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["rejected"], json!([]), "{body}");
    };
    for chunk in events[..split].chunks(2_000) {
        post_all(url.clone(), chunk.iter().map(report_json).collect()).await;
    }
    let later = events.split_off(split);
    let live = tokio::spawn(async move {
        let mut rest = later.as_slice();
        while !rest.is_empty() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = chrono::Utc::now().timestamp_micros();
            let due = rest.partition_point(|e| e.received_at <= now);
            if due > 0 {
                post_all(url.clone(), rest[..due].iter().map(report_json).collect()).await;
                rest = &rest[due..];
            }
        }
    });
    (split, live)
}

/// Posts through `/v1/locations`, at time `at`, each `(person, meters)`: the person that many
/// meters north of `spot` (WGS84 degrees).
async fn report_north_of(app: &TestApp, spot: (f64, f64), at: &str, persons: &[(i64, f64)]) {
    for &(person, north_m) in persons {
        let report = json!({
            "person_id": person,
            "lat": spot.0 + north_m / 111_320.0,
            "lon": spot.1,
            "recorded_at": at,
        });
        let (status, body) = post(&app.url("/v1/locations"), &report).await;
        assert_eq!(status, 202, "{body}");
    }
}

/// The person page's history table and `/v1/persons/{person}/connections{query}` (the same
/// range as the page's form), read again until they agree (an episode may change between the
/// two reads; at most 10 times): the table's `(peer, started_at, ended_at)` and the API's,
/// then the table's cells and the cells the API's answer should give.
#[allow(clippy::type_complexity)]
async fn history_as_api(
    browser: &mut Chromium,
    app: &TestApp,
    person: i64,
    query: &str,
) -> (
    Vec<(i64, String, String)>,
    Vec<(i64, String, String)>,
    Vec<Vec<String>>,
    Vec<Vec<String>>,
) {
    let history_js = "Array.from(document.querySelectorAll('#history tbody tr')).map(r => \
         [Number(r.dataset.peer), r.dataset.startedAt, r.dataset.endedAt])";
    let done = "['ok', 'empty'].includes(document.querySelector('#history-state').dataset.state)";
    let mut read = Default::default();
    for _ in 0..10 {
        browser
            .run(json!({"op": "click", "selector": "#history-range button"}))
            .await;
        browser
            .wait(
                "the history table loaded",
                done,
                Duration::from_secs(5),
                "document.querySelector('#history-state').textContent",
            )
            .await;
        let shown =
            serde_json::from_value::<Vec<(i64, String, String)>>(browser.eval(history_js).await)
                .expect("history rows");
        let table = rows(browser, "#history tbody tr").await;
        let (_, page) = get(&app.url(&format!("/v1/persons/{person}/connections{query}"))).await;
        read = (shown, episodes(&page), table, history_text(&page));
        if read.0 == read.1 && read.2 == read.3 {
            break;
        }
    }
    read
}

/// The cells the console's history table should show for a `/v1/persons/{id}/connections`
/// page: whom (name and id), started, ended or "open", co-locations, closest meters.
fn history_text(page: &Value) -> Vec<Vec<String>> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| {
            let peer = &c["peer"];
            let meters = c["min_distance_m"].as_f64().expect("distance");
            vec![
                format!(
                    "{} {} #{}",
                    peer["first_name"].as_str().expect("first"),
                    peer["last_name"].as_str().expect("last"),
                    peer["id"]
                ),
                utc(&c["started_at"]),
                c.get("ended_at").map_or_else(|| "open".to_owned(), utc),
                c["colocations"].to_string(),
                if meters < 10.0 {
                    format!("{meters:.2}")
                } else {
                    format!("{meters:.1}")
                },
            ]
        })
        .collect()
}

/// A time of the API as the console writes it: `2026-11-30 12:58:51 UTC`.
fn utc(t: &Value) -> String {
    let t = t.as_str().expect("a time");
    let (date, time) = t.split_once('T').expect("RFC 3339");
    let seconds = &time[..8];
    format!("{date} {seconds} UTC")
}

/// The map draws each marker where its report is: every marker's centre, turned back into
/// coordinates by the map, lies within 2 m of a retained point of its person (points come and
/// go meanwhile, so 95 % of them), inside the map's view; the zones' outlines and the scale
/// bar are drawn, and live reports are coloured as fresh.
async fn check_map_geometry(browser: &mut Chromium, app: &TestApp) {
    let drawn = browser
        .eval(
            "(() => { const map = window.udaconnect.map(); const box = \
             document.querySelector('#map').getBoundingClientRect(); \
             return Array.from(document.querySelectorAll('#map path.point')).map(p => { \
             const r = p.getBoundingClientRect(); const at = map.containerPointToLatLng(\
             [r.x + r.width / 2 - box.x, r.y + r.height / 2 - box.y]); \
             return [Number(p.classList.value.match(/person-(\\d+)/)[1]), at.lat, at.lng, \
             p.getAttribute('stroke')]; }); })()",
        )
        .await;
    let (_, live) = get(&app.url("/v1/points?limit=10000")).await;
    let retained: Vec<(i64, f64, f64)> = live["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| {
            (
                p["person_id"].as_i64().expect("person"),
                p["lat"].as_f64().expect("lat"),
                p["lon"].as_f64().expect("lon"),
            )
        })
        .collect();
    let drawn = drawn.as_array().expect("markers");
    assert!(!drawn.is_empty());
    let near = drawn
        .iter()
        .filter(|m| {
            let (person, lat, lon) = (
                m[0].as_i64().expect("person"),
                m[1].as_f64().expect("lat"),
                m[2].as_f64().expect("lon"),
            );
            retained.iter().any(|&(p, plat, plon)| {
                p == person
                    && ((plat - lat) * 111_320.0)
                        .hypot((plon - lon) * 111_320.0 * lat.to_radians().cos())
                        < 2.0
            })
        })
        .count();
    assert!(
        near * 100 >= drawn.len() * 95,
        "only {near} of {} markers lie on a retained point of their person: drawn {:?}, retained {:?}",
        drawn.len(),
        drawn.iter().take(3).collect::<Vec<_>>(),
        retained.iter().take(3).collect::<Vec<_>>()
    );
    let colours: BTreeSet<&str> = drawn.iter().filter_map(|m| m[3].as_str()).collect();
    assert_eq!(
        colours,
        BTreeSet::from(["#cf222e", "#fb8f44", "#8c959f"]),
        "live reports fresh (red), the last minute's orange, older ones grey"
    );
    // Each marker lies inside the outline of a zone (its cell's bounding box on the screen).
    let outside = browser
        .eval(
            "(() => { const zones = Array.from(document.querySelectorAll('#map path.zone')) \
             .map(z => z.getBoundingClientRect()); \
             return Array.from(document.querySelectorAll('#map path.point')).filter(p => { \
             const r = p.getBoundingClientRect(); const x = r.x + r.width / 2, y = r.y + r.height / 2; \
             return !zones.some(z => x >= z.left && x <= z.right && y >= z.top && y <= z.bottom); \
             }).length; })()",
        )
        .await;
    assert_eq!(outside, json!(0), "markers outside every zone outline");
    let zones = browser
        .eval("[document.querySelectorAll('#map path.zone').length, Number(document.querySelector('#map').dataset.zones)]")
        .await;
    assert!(
        zones[0].as_u64().is_some_and(|n| n > 0) && zones[0] == zones[1],
        "zone outlines {zones}"
    );
    let scale = browser
        .eval("document.querySelector('.leaflet-control-scale-line').textContent")
        .await;
    assert!(
        scale
            .as_str()
            .is_some_and(|s| s.ends_with(" m") || s.ends_with(" km")),
        "scale bar {scale}"
    );
}

/// Whether the OpenAPI document `spec` has the operation `method` on a path template that
/// `path` fits (`{name}` standing for one segment).
fn documented(spec: &Value, method: &str, path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').collect();
    spec["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .any(|(template, ops)| {
            let parts: Vec<&str> = template.split('/').collect();
            ops.get(method).is_some()
                && parts.len() == segments.len()
                && parts.iter().zip(&segments).all(|(t, s)| {
                    t == s || (t.starts_with('{') && t.ends_with('}') && !s.is_empty())
                })
        })
}

/// `(peer, started_at, ended_at)` of each episode of a history page, as `/v1` writes them.
fn episodes(page: &Value) -> Vec<(i64, String, String)> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| {
            (
                c["peer"]["id"].as_i64().expect("peer id"),
                c["started_at"].as_str().expect("started_at").to_owned(),
                c["ended_at"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The web console (`/`), in Chromium, against a service fed by a simulated conference: the
/// floor map shows the retained points within 5 s; the live feed shows a pair posted through
/// `/v1/locations` within 5 s of the post; searching an attendee's last name finds them; their
/// history table lists exactly what `/v1/persons/{id}/connections` returns; with the broker
/// stopped the page says the service is not ready (and recovers when it returns); before any
/// report and after the service is gone it says so too; every request it made is documented
/// in `/openapi.json`. Writes the screenshots the README shows ([`screenshot_dir`]).
#[tokio::test]
async fn the_console_shows_the_floor_the_feed_people_and_history_and_says_when_not_ready() {
    let db = TestDb::new().await;
    let mut broker = PrivateBroker::start().await;
    let config = Config {
        kafka_brokers: broker.addr.to_string(),
        // Episodes end within the test (the default gap is ten minutes).
        episode_gap_s: 15,
        ..test_config(&db)
    };
    let (zones, persons) = (
        config.locations_partitions as usize,
        config.person_updates_partitions as usize,
    );
    let app = TestApp::spawn(config).await;
    wait_for_status(&app.url("/readyz"), 200, Duration::from_secs(60)).await;
    // Both stages hold their partitions (ready may come before the consumer groups assign).
    crate::pipeline::wait_for_assignment(&app, zones, persons).await;
    let shots = screenshot_dir();
    let mut browser = Chromium::start(1280, 860).await;

    // 0. Nothing yet: each panel says so in words.
    browser.goto(&signed_in(&app, "/")).await;
    let said = browser
        .says(
            "the empty floor said",
            "#map-state",
            "empty",
            Duration::from_secs(5),
        )
        .await;
    assert!(said.contains("No points"), "{said}");
    browser
        .goto(&signed_in(&app, "/#/people?q=Nobody-by-this-name"))
        .await;
    let said = browser
        .says(
            "no match said",
            "#people-state",
            "empty",
            Duration::from_secs(5),
        )
        .await;
    assert!(said.contains("Nobody matches"), "{said}");

    // A conference under way for a minute, with a minute to go: its past reports at once,
    // then live.
    let sim = conference_from(60, 100, 120);
    let (posted, live) = feed(&app, &db.url, &sim).await;
    assert!(posted > 300, "{posted} reports posted");
    eventually(
        "the posted reports processed",
        Duration::from_secs(60),
        || async {
            let (_, points) = get(&app.url("/v1/points?limit=10000")).await;
            let n = points["points"].as_array().map_or(0, Vec::len);
            (n > 0).then_some(()).ok_or_else(|| format!("{n} points"))
        },
    )
    .await;
    // 1. The floor map.
    browser.goto(&signed_in(&app, "/")).await;
    let points = "Number(document.querySelector('#map').dataset.points)";
    let (shown, took) = browser
        .wait(
            "points on the map",
            &format!("{points} > 0 && {points}"),
            Duration::from_secs(5),
            "document.querySelector('#map-state').textContent",
        )
        .await;
    // Each answered point is drawn, and each drawn point is an attendee's.
    let drawn: Vec<i64> = serde_json::from_value(
        browser
            .eval(
                "Array.from(document.querySelectorAll('#map path.point')).map(p => \
                 Number(Array.from(p.classList).find(c => c.startsWith('person-')).slice(7)))",
            )
            .await,
    )
    .expect("person ids");
    let count = browser.eval(points).await;
    assert_eq!(json!(drawn.len()), count, "markers drawn: {drawn:?}");
    let ids = sim.person_ids();
    assert!(drawn.iter().all(|p| ids.contains(p)), "{drawn:?}");
    println!("map: {shown} points within {took:?}");
    check_map_geometry(&mut browser, &app).await;

    // 2. The feed: a pair posted now, 1.5 m apart.
    browser
        .wait(
            "the feed listening",
            "['empty', 'ok'].includes(document.querySelector('#feed-state').dataset.state)",
            Duration::from_secs(10),
            "document.querySelector('#feed-state').textContent",
        )
        .await;
    let (a, b) = (
        crate::rest::create_person(&app, "Ada").await,
        crate::rest::create_person(&app, "Grace").await,
    );
    // 20 m north of an attendee's report: on the floor, apart from the crowd.
    let (_, some) = get(&app.url("/v1/points?limit=1")).await;
    let (spot_lat, spot_lon) = (
        some["points"][0]["lat"].as_f64().expect("lat") + 20.0 / 111_320.0,
        some["points"][0]["lon"].as_f64().expect("lon"),
    );
    let at = crate::rest::now_rfc3339();
    let posted_at = Instant::now();
    report_north_of(&app, (spot_lat, spot_lon), &at, &[(a, 0.0), (b, 1.5)]).await;
    let (first, second) = (a.min(b), a.max(b));
    let started = format!(
        "document.querySelector('#feed li[data-type=\"connection.started\"][data-person=\"{first}\"][data-peer=\"{second}\"]') !== null"
    );
    browser
        .wait(
            "connection.started of the posted pair in the feed",
            &started,
            Duration::from_secs(5),
            "Array.from(document.querySelectorAll('#feed li')).slice(0, 5).map(l => l.textContent)",
        )
        .await;
    println!(
        "feed: connection.started {:?} after the post",
        posted_at.elapsed()
    );
    // Following one person: only their notifications, each once.
    browser.enter("#feed-persons", &second.to_string()).await;
    let c = crate::rest::create_person(&app, "Hedy").await;
    let at = crate::rest::now_rfc3339();
    report_north_of(&app, (spot_lat, spot_lon), &at, &[(c, 3.0), (second, 1.5)]).await;
    browser
        .wait(
            "connection.started of the followed person in the feed",
            &format!("document.querySelector('#feed li[data-type=\"connection.started\"][data-person=\"{second}\"][data-peer=\"{c}\"]') !== null"),
            Duration::from_secs(5),
            "Array.from(document.querySelectorAll('#feed li')).map(l => l.textContent)",
        )
        .await;
    let followed = browser
        .eval(
            "Array.from(document.querySelectorAll('#feed li')).map(l => Number(l.dataset.person))",
        )
        .await;
    assert!(
        followed
            .as_array()
            .expect("persons")
            .iter()
            .all(|p| p == &json!(second)),
        "only {second}'s notifications: {followed}"
    );
    browser.enter("#feed-persons", "abc").await;
    let said = browser
        .eval("document.querySelector('#feed-state').textContent")
        .await;
    assert!(
        said.as_str()
            .is_some_and(|s| s.contains("not a person id: abc")),
        "{said}"
    );
    browser.enter("#feed-persons", "").await;
    assert_eq!(
        browser.problems().await,
        json!([]),
        "no errors on the floor page"
    );
    browser
        .wait(
            "the counters filled, open connections counted",
            "!['…', '—'].includes(document.querySelector('#rate').textContent) \
             && Number(document.querySelector('#open').textContent) > 0",
            Duration::from_secs(20),
            "document.querySelector('#counters').textContent",
        )
        .await;
    browser
        .run(json!({"op": "screenshot", "path": shots.join("console-floor-desktop.png")}))
        .await;
    browser
        .run(json!({"op": "viewport", "width": 375, "height": 812}))
        .await;
    browser
        .wait(
            "the map refitted to the phone's width",
            "(() => { const box = document.querySelector('#map').getBoundingClientRect(); \
             const points = Array.from(document.querySelectorAll('#map path.point')); \
             return points.length > 0 && points.every(p => { const r = p.getBoundingClientRect(); \
             return r.left >= box.left && r.right <= box.right && r.top >= box.top \
             && r.bottom <= box.bottom; }); })()",
            Duration::from_secs(5),
            "document.querySelector('#map-state').textContent",
        )
        .await;
    browser
        .run(json!({"op": "screenshot", "path": shots.join("console-floor-phone.png"), "full_page": true}))
        .await;
    browser
        .run(json!({"op": "viewport", "width": 1280, "height": 860}))
        .await;

    // A click on a point opens its person.
    let topmost = "Number(Array.from(document.querySelectorAll('#map path.point')).pop().classList.value.match(/person-(\\d+)/)[1])";
    let clicked = browser.eval(topmost).await;
    browser
        .run(json!({"op": "click", "selector": "#map path.point:last-of-type"}))
        .await;
    let (opened, _) = browser
        .wait(
            "a person's page after a click on a point",
            "location.hash.startsWith('#/persons/') && Number(location.hash.slice(10))",
            Duration::from_secs(5),
            "location.hash",
        )
        .await;
    assert_eq!(opened, clicked, "the page of the topmost point's person");

    // 3. People: an attendee with a history, found by last name.
    let persons: Vec<_> = sim.persons().collect();
    let attendee = eventually(
        "an attendee's ended episode of more than a second stored",
        Duration::from_secs(30),
        || async {
            for person in &persons {
                let (_, page) =
                    get(&app.url(&format!("/v1/persons/{}/connections", person.id))).await;
                // One that lasted (it ended in another second than it started), so that the
                // table's end column is seen to be the end.
                let lasted = |(_, started, ended): &(i64, String, String)| {
                    ended.len() >= 19 && ended[..19] != started[..19]
                };
                if episodes(&page).iter().any(lasted) {
                    return Ok(person.clone());
                }
            }
            Err("no attendee has an ended episode of more than a second stored".to_owned())
        },
    )
    .await;
    browser.goto(&signed_in(&app, "/#/people")).await;
    browser.enter("#q", &attendee.last_name).await;
    let row = format!("#people tr[data-person-id=\"{}\"]", attendee.id);
    browser
        .wait(
            "the attendee found by last name",
            &format!("document.querySelector('{row}') !== null"),
            Duration::from_secs(5),
            "document.querySelector('#people').textContent",
        )
        .await;
    let listed = rows(&mut browser, "#people tbody tr").await;
    assert!(
        listed.iter().all(|r| {
            let text = r.join(" ").to_lowercase();
            text.contains(&attendee.last_name.to_lowercase())
        }),
        "every row matches {:?}: {listed:?}",
        attendee.last_name
    );

    // 4. Their history: exactly what /v1/persons/{id}/connections answers.
    browser
        .run(json!({"op": "click", "selector": format!("{row} a")}))
        .await;
    let (shown, expected, table, said) = history_as_api(&mut browser, &app, attendee.id, "").await;
    assert!(
        expected.iter().any(|(_, _, ended)| !ended.is_empty()),
        "an ended episode among {expected:?}"
    );
    assert_eq!(
        shown, expected,
        "the history table lists the API's episodes"
    );
    // And says what they are: whom, when, until when, how often, how close.
    assert_eq!(table, said, "the history table's text");
    // A range: from the last episode's start (a UTC time typed in the form), the episodes
    // `?from=` gives.
    let from = expected
        .last()
        .map(|(_, s, _)| s[..19].to_owned())
        .expect("an episode");
    browser
        .run(json!({"op": "fill", "selector": "#history-from", "value": from}))
        .await;
    let (ranged, wanted, _, _) =
        history_as_api(&mut browser, &app, attendee.id, &format!("?from={from}Z")).await;
    assert!(!wanted.is_empty(), "the last episode is in its own range");
    assert_eq!(ranged, wanted, "the history table of a range");

    // The POC's query by day, as /api answers it (live reports add rows meanwhile: ask both
    // again until they agree).
    let mut poc_shown: Vec<i64> = Vec::new();
    let mut poc_expected: Vec<i64> = Vec::new();
    for _ in 0..10 {
        browser
            .run(json!({"op": "click", "selector": "#poc-range button"}))
            .await;
        browser
            .wait(
                "the POC query answered",
                "['ok', 'empty'].includes(document.querySelector('#poc-state').dataset.state)",
                Duration::from_secs(10),
                "document.querySelector('#poc-state').textContent",
            )
            .await;
        let form = browser
            .eval("[document.querySelector('#poc-start').value, document.querySelector('#poc-end').value]")
            .await;
        let (status, poc) = get(&app.url(&format!(
            "/api/persons/{}/connection?start_date={}&end_date={}&distance=5",
            attendee.id,
            form[0].as_str().expect("start"),
            form[1].as_str().expect("end")
        )))
        .await;
        assert_eq!(status, 200, "{poc}");
        poc_expected = poc
            .as_array()
            .expect("list")
            .iter()
            .map(|r| r["person"]["id"].as_i64().expect("id"))
            .collect();
        poc_shown = serde_json::from_value(
            browser
                .eval("Array.from(document.querySelectorAll('#poc tbody tr')).map(r => Number(r.dataset.personId))")
                .await,
        )
        .expect("ids");
        poc_expected.sort_unstable();
        poc_shown.sort_unstable();
        if poc_shown == poc_expected {
            break;
        }
    }
    assert!(!poc_expected.is_empty());
    assert_eq!(
        poc_shown, poc_expected,
        "the POC table lists what /api answers"
    );
    browser
        .run(json!({"op": "screenshot", "path": shots.join("console-person-desktop.png"), "full_page": true}))
        .await;
    assert_eq!(
        browser.problems().await,
        json!([]),
        "no errors on the person page"
    );

    // 5. The broker stops: the page says the service is not ready, naming it. The phones
    // stop first (their posts would be refused meanwhile).
    if live.is_finished() {
        live.await.expect("every live report accepted");
    } else {
        live.abort();
    }
    browser.goto(&signed_in(&app, "/")).await;
    broker.stop();
    let said = browser
        .says(
            "the not-ready state",
            "#service",
            "not-ready",
            Duration::from_secs(30),
        )
        .await;
    assert!(said.contains("kafka"), "{said}");
    assert_eq!(
        browser.eval("document.querySelector('main').hidden === false && document.querySelector('#floor-view').hidden === false").await,
        json!(true),
        "the page itself stays"
    );
    browser
        .run(json!({"op": "screenshot", "path": shots.join("console-not-ready-desktop.png")}))
        .await;
    let crashed: Vec<Value> = browser
        .problems()
        .await
        .as_array()
        .expect("problems")
        .iter()
        .filter(|p| p.as_str().is_some_and(|p| p.starts_with("page error")))
        .cloned()
        .collect();
    assert!(
        crashed.is_empty(),
        "no script error while not ready: {crashed:?}"
    );

    broker.restart().await;
    browser
        .wait(
            "ready again",
            "document.querySelector('#service').dataset.state === 'ready'",
            Duration::from_secs(30),
            "document.querySelector('#service').textContent",
        )
        .await;

    // Every request the page made is the console's own files or an operation of the OpenAPI
    // document.
    let (_, spec) = get(&app.url("/openapi.json")).await;
    let origin = app.url("");
    let requests = browser.run(json!({"op": "requests"})).await;
    let mut undocumented = BTreeSet::new();
    for request in requests.as_array().expect("requests") {
        let (method, url) = request
            .as_str()
            .and_then(|r| r.split_once(' '))
            .expect("METHOD URL");
        let Some(path) = url.strip_prefix(&origin) else {
            undocumented.insert(request.to_string());
            continue;
        };
        let path = path.split(['?', '#']).next().unwrap_or_default();
        if method == "GET" && (path == "/" || path.starts_with("/console/")) {
            continue;
        }
        if !documented(&spec, &method.to_lowercase(), path) {
            undocumented.insert(format!("{method} {path}"));
        }
    }
    assert!(
        undocumented.is_empty(),
        "not in /openapi.json: {undocumented:?}"
    );

    // The service gone: the page says so.
    app.stop().await.expect("clean shutdown");
    let said = browser
        .says(
            "the unreachable state",
            "#service",
            "unreachable",
            Duration::from_secs(10),
        )
        .await;
    assert!(said.starts_with("Unreachable"), "{said}");

    browser.close().await;
    db.drop_db().await;
}

/// The console's URL at `path` (`/` or `/#/…`) signed in as an organizer: `./dev run` prints
/// such a URL; the console keeps the token for the tab and takes it out of the address bar.
fn signed_in(app: &TestApp, path: &str) -> String {
    let (page, fragment) = path.split_once('#').unwrap_or((path, ""));
    let fragment = if fragment.is_empty() {
        String::new()
    } else {
        format!("#{fragment}")
    };
    app.url(&format!(
        "{page}?access_token={}{fragment}",
        crate::helpers::organizer_token()
    ))
}

/// Swagger UI at `/docs`, in Chromium: its Authorize dialog offers the `bearer` scheme first;
/// with an organizer's token pasted there, *Try it out* on `GET /v1/status` sends it and gets
/// 200, where without it the same button gets 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swagger_ui_authorize_sends_the_bearer_token_with_try_it_out() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    app.pipeline(Duration::from_secs(60)).await;
    let mut browser = Chromium::start(1280, 900).await;
    browser.goto(&app.url("/docs")).await;
    let op = "[id$='get_v1_status']";
    browser
        .wait(
            "Swagger UI loads",
            "document.querySelector('button.authorize')",
            Duration::from_secs(20),
            "document.title",
        )
        .await;
    // Without a token: 401.
    browser
        .run(json!({"op": "click", "selector": format!("{op} .opblock-summary")}))
        .await;
    browser
        .run(json!({"op": "click", "selector": format!("{op} button.try-out__btn")}))
        .await;
    try_it_out(&mut browser, op, "401").await;
    // Authorize: `bearer` first; the token pasted there.
    browser
        .run(json!({"op": "click", "selector": "button.authorize"}))
        .await;
    let (schemes, _) = browser
        .wait(
            "the Authorize dialog",
            "[...document.querySelectorAll('.auth-container h4')].map(h => h.textContent.trim().split(/\\s/)[0]).join(',')",
            Duration::from_secs(10),
            "document.title",
        )
        .await;
    assert_eq!(schemes, "bearer,stream_token");
    browser
        .run(json!({"op": "fill", "selector": ".auth-container input", "value": crate::helpers::organizer_token()}))
        .await;
    browser
        .run(json!({"op": "click", "selector": ".auth-container button.authorize"}))
        .await;
    browser
        .run(json!({"op": "click", "selector": "button.close-modal"}))
        .await;
    try_it_out(&mut browser, op, "200").await;
    let curl = browser
        .eval(&format!(
            "document.querySelector(\"{op} .curl\").textContent"
        ))
        .await;
    assert!(
        curl.as_str()
            .unwrap_or_default()
            .contains("Authorization: Bearer"),
        "{curl}"
    );
    browser.close().await;
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// Clicks *Execute* of the Swagger UI operation `op` (a selector) and waits until the status
/// it shows starts with `expected` (a response already shown counts only once replaced).
async fn try_it_out(browser: &mut Chromium, op: &str, expected: &str) {
    browser
        .run(json!({"op": "click", "selector": format!("{op} button.execute")}))
        .await;
    let cell = format!(
        "document.querySelector(\"{op} .live-responses-table tbody .response-col_status\")"
    );
    browser
        .wait(
            &format!("Try it out answers {expected}"),
            &format!("{cell} && {cell}.textContent.trim().startsWith({expected:?})"),
            Duration::from_secs(20),
            &format!("{cell} && {cell}.textContent"),
        )
        .await;
}

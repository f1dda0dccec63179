//! Real-browser tests: Debian's Chromium (`/usr/bin/chromium`, installed by `./dev setup`),
//! driven headless by playwright-core from `tests/browser/` (npm, pinned by its lockfile,
//! installed by `./dev setup`; it downloads no browser).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::rest::{get, poc_seeded};

/// `tests/browser/`.
fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Opens `url` in Chromium (`render.mjs`) and returns what the page rendered: its `status`, the
/// cells of the rows matching `rows`, and its `problems` (console errors, failed requests).
async fn render(url: &str, rows: &str) -> Value {
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
    let (url, rows) = (url.to_owned(), rows.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(node)
            .arg(dir.join("render.mjs"))
            .args([url.as_str(), rows.as_str(), "15000"])
            .env("UDATEST_CHROMIUM", &chromium)
            .output()
    })
    .await
    .expect("joined")
    .expect("node runs");
    assert!(
        out.status.success(),
        "render.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "render.mjs printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The rendered rows, as cell texts.
fn rows_of(rendered: &Value) -> Vec<Vec<String>> {
    rendered["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            row.as_array()
                .into_iter()
                .flatten()
                .map(|c| c.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .collect()
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
    let shown = render(&url, "#persons tr.person").await;
    assert_eq!(shown["status"], "loaded", "{shown}");
    assert_eq!(shown["problems"], serde_json::json!([]), "{shown}");
    assert_eq!(rows_of(&shown), expected_persons, "{shown}");
    let shown = render(&url, "#connections tr.connection").await;
    assert_eq!(shown["status"], "loaded", "{shown}");
    let mut seen = rows_of(&shown);
    seen.sort();
    assert_eq!(seen, expected_connections, "{shown}");

    server.abort();
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

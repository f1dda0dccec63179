//! Who may see whom, on REST against the running service: each role's allowed and refused
//! requests (an attendee trying another person's live state, history, stream and location
//! post included), the 401's `WWW-Authenticate`, the streams' `access_token`, and the service
//! with `auth = "off"` and without the POC's `/api`.

use std::time::Duration;

use futures::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use udaconnect::auth::Role;
use udaconnect::config::AuthMode;
use udaconnect::Config;

use crate::helpers::{
    client_as, eventually, free_port, organizer_token, spawn_serve_logging, test_config, token,
    wait_for_status, TestApp, TestDb, TEST_JWT_KEY,
};
use crate::rest::{assert_error, create_person, good, next_text};

/// `method url` with `token` as the bearer (none: no header); the status, the JSON body and
/// the `WWW-Authenticate` header.
async fn call(
    token: Option<&str>,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> (u16, Value, Option<String>) {
    let client = match token {
        Some(t) => client_as(t),
        None => reqwest::Client::new(),
    };
    let mut request = client.request(method, url);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, body, challenge)
}

async fn get_as(token: Option<&str>, url: &str) -> (u16, Value) {
    let (status, body, _) = call(token, reqwest::Method::GET, url, None).await;
    (status, body)
}

async fn post_as(token: Option<&str>, url: &str, body: &Value) -> (u16, Value) {
    let (status, body, _) = call(token, reqwest::Method::POST, url, Some(body)).await;
    (status, body)
}

/// Person `person`'s SSE stream.
fn bobs_stream(app: &TestApp, person: i64) -> String {
    app.url(&format!("/v1/persons/{person}/connections/stream"))
}

/// The status of opening a stream (SSE) as `token`, by header or by `access_token`.
async fn stream_status(url: &str, token: &str, in_query: bool) -> u16 {
    let response = if in_query {
        reqwest::Client::new()
            .get(format!("{url}?access_token={token}"))
            .send()
            .await
    } else {
        client_as(token).get(url).send().await
    };
    response.expect("request sent").status().as_u16()
}

#[tokio::test]
async fn each_role_may_do_what_the_rules_allow_on_rest_and_nothing_else() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(test_config(&db)).await;
    app.pipeline(Duration::from_secs(60)).await;
    let a = create_person(&app, "Alice").await;
    let b = create_person(&app, "Bob").await;
    let alice_token = token(Role::Attendee, Some(a));
    let gateway_token = token(Role::Gateway, None);
    let alice = Some(alice_token.as_str());
    let gateway = Some(gateway_token.as_str());
    let url = |path: String| app.url(&path);

    // No token, or a bad one: 401 with the challenge, naming `authorization`.
    let (status, body, challenge) = call(
        None,
        reqwest::Method::GET,
        &url(format!("/v1/persons/{a}")),
        None,
    )
    .await;
    assert_error(
        &(status, body),
        401,
        "unauthenticated",
        Some("authorization"),
    );
    assert_eq!(challenge.as_deref(), Some("Bearer realm=\"udaconnect\""));
    let (status, body, challenge) = call(
        Some("not.a.jwt"),
        reqwest::Method::GET,
        &url(format!("/v1/persons/{a}")),
        None,
    )
    .await;
    assert_error(
        &(status, body),
        401,
        "unauthenticated",
        Some("authorization"),
    );
    let challenge = challenge.expect("WWW-Authenticate");
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    let other_key = Config {
        jwt_hs256_key: Some(udaconnect::config::Secret::new(
            "some other key of 32 bytes or more",
        )),
        ..Config::default()
    };
    let forged = udaconnect::auth::mint(&other_key, Role::Organizer, None, Duration::from_secs(60))
        .expect("token");
    let (status, body) = get_as(Some(&forged), &url("/v1/status".to_owned())).await;
    assert_error(
        &(status, body.clone()),
        401,
        "unauthenticated",
        Some("authorization"),
    );
    assert!(
        body["message"].as_str().unwrap().contains("signature"),
        "{body}"
    );

    // The attendee reads itself, not Bob.
    for path in [
        format!("/v1/persons/{a}"),
        format!("/v1/persons/{a}/live"),
        format!("/v1/persons/{a}/connections"),
    ] {
        // Live state answers once the partitions have owners.
        eventually(&path, Duration::from_secs(60), || async {
            match get_as(alice, &url(path.clone())).await {
                (200, _) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
    for path in [
        format!("/v1/persons/{b}"),
        format!("/v1/persons/{b}/live"),
        format!("/v1/persons/{b}/connections"),
        format!("/v1/persons/{b}/connections/stream"),
    ] {
        let got = get_as(alice, &url(path.clone())).await;
        assert_error(&got, 403, "permission_denied", Some("person_id"));
        assert!(
            got.1["message"]
                .as_str()
                .unwrap()
                .contains(&format!("person {b}")),
            "{path}: {}",
            got.1
        );
    }
    // Nor everyone's data, nor the directory.
    for path in [
        "/v1/persons",
        "/v1/points",
        "/v1/status",
        "/v1/connections/stream",
    ] {
        let got = get_as(alice, &url(path.to_owned())).await;
        assert_error(&got, 403, "permission_denied", None);
    }
    let new_person = json!({"first_name": "Eve", "last_name": "X", "company_name": "Y"});
    let got = post_as(alice, &url("/v1/persons".to_owned()), &new_person).await;
    assert_error(&got, 403, "permission_denied", None);

    // Its own stream, by header or by `access_token` (what a browser's EventSource sends);
    // Bob's, neither way.
    let own = url(format!("/v1/persons/{a}/connections/stream"));
    let bobs = url(format!("/v1/persons/{b}/connections/stream"));
    assert_eq!(stream_status(&own, &alice_token, false).await, 200);
    assert_eq!(stream_status(&own, &alice_token, true).await, 200);
    assert_eq!(stream_status(&bobs, &alice_token, true).await, 403);
    assert_eq!(
        reqwest::get(&own).await.expect("sent").status().as_u16(),
        401,
        "a stream without a token"
    );

    // The WebSocket: Bob at connect time is refused; subscribing to him later is an error
    // message, and the socket stays open.
    let ws = format!("ws://{}/v1/ws?access_token={alice_token}", app.rest_addr);
    match tokio_tungstenite::connect_async(format!("{ws}&person_ids={b}")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403);
        }
        other => panic!("Bob's socket must be refused: {:?}", other.map(|_| ())),
    }
    match tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", app.rest_addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 401);
        }
        other => panic!(
            "a socket without a token must be refused: {:?}",
            other.map(|_| ())
        ),
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("{ws}&person_ids={a}"))
        .await
        .expect("its own socket");
    assert_eq!(
        next_text(&mut socket).await,
        json!({"type": "subscribed", "person_ids": [a]})
    );
    socket
        .send(Message::Text(json!({"subscribe": [b]}).to_string().into()))
        .await
        .expect("sent");
    let refused = next_text(&mut socket).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "permission_denied", "{refused}");
    assert_eq!(refused["field"], "subscribe", "{refused}");
    socket
        .send(Message::Text(
            json!({"unsubscribe": [a]}).to_string().into(),
        ))
        .await
        .expect("sent");
    assert_eq!(
        next_text(&mut socket).await,
        json!({"type": "subscribed", "person_ids": []})
    );
    // Following no one, the socket stays open for the next subscription (it used to end).
    socket
        .send(Message::Text(json!({"subscribe": [a]}).to_string().into()))
        .await
        .expect("sent");
    assert_eq!(
        next_text(&mut socket).await,
        json!({"type": "subscribed", "person_ids": [a]})
    );
    let _ = socket.close(None).await;

    // Reports: its own yes, Bob's no; in a batch, Bob's item alone is rejected.
    let locations = url("/v1/locations".to_owned());
    let (status, own_ack) = post_as(alice, &locations, &good(a)).await;
    assert_eq!(status, 202, "{own_ack}");
    let got = post_as(alice, &locations, &good(b)).await;
    assert_error(&got, 403, "permission_denied", Some("person_id"));
    let batch = json!({"events": [good(a), good(b)]});
    let (status, report) = post_as(alice, &url("/v1/locations/batch".to_owned()), &batch).await;
    assert_eq!(status, 202, "{report}");
    assert_eq!(report["accepted"], 1, "{report}");
    assert_eq!(report["rejected"][0]["index"], 1, "{report}");
    assert_eq!(report["rejected"][0]["field"], "person_id", "{report}");

    // The gateway posts for anyone and reads no one.
    let (status, bob_ack) = post_as(gateway, &locations, &good(b)).await;
    assert_eq!(status, 202, "{bob_ack}");
    for path in [
        format!("/v1/persons/{b}"),
        format!("/v1/persons/{b}/live"),
        format!("/v1/persons/{b}/connections"),
    ] {
        let got = get_as(gateway, &url(path)).await;
        assert_error(&got, 403, "permission_denied", Some("person_id"));
    }
    for path in [
        "/v1/status",
        "/v1/persons",
        "/v1/points",
        "/v1/connections/stream",
    ] {
        let got = get_as(gateway, &url(path.to_owned())).await;
        assert_error(&got, 403, "permission_denied", None);
    }
    assert_eq!(
        stream_status(&bobs_stream(&app, b), &gateway_token, true).await,
        403
    );

    // Stored reports: Alice reads hers, and Bob's is refused naming `event_id`.
    let own_event = url(format!(
        "/v1/locations/{}",
        own_ack["event_id"].as_str().unwrap()
    ));
    let bob_event = url(format!(
        "/v1/locations/{}",
        bob_ack["event_id"].as_str().unwrap()
    ));
    eventually(
        "Bob's report is stored",
        Duration::from_secs(60),
        || async {
            match crate::helpers::get_json(&bob_event).await {
                (200, _) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eventually(
        "Alice's report is stored",
        Duration::from_secs(60),
        || async {
            match get_as(alice, &own_event).await {
                (200, body) => Ok(body),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // Another person's report is, to an attendee, a report that does not exist: neither its
    // existence nor its owner is told.
    let got = get_as(alice, &bob_event).await;
    assert_error(&got, 404, "not_found", Some("event_id"));
    assert!(
        !got.1["message"].as_str().unwrap().contains("person"),
        "{}",
        got.1
    );
    let got = get_as(gateway, &bob_event).await;
    assert_error(&got, 403, "permission_denied", None);

    // Health, metrics, the API documents and the console need no token.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/",
    ] {
        let status = reqwest::get(app.url(path))
            .await
            .expect("sent")
            .status()
            .as_u16();
        assert_eq!(status, 200, "{path}");
    }
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// `auth = "off"` lets every caller do everything (with a warning at start), and with
/// `poc_api = false` the POC's `/api` answers 404 naming the setting.
#[tokio::test]
async fn auth_off_opens_v1_and_poc_api_off_closes_api() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(Config {
        auth: AuthMode::Off,
        poc_api: false,
        ..test_config(&db)
    })
    .await;
    let a = create_person(&app, "Alice").await;
    let (status, body) = get_as(None, &app.url(&format!("/v1/persons/{a}"))).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get_as(None, &app.url("/v1/persons")).await;
    assert_eq!(status, 200, "{body}");
    let got = get_as(None, &app.url("/api/persons")).await;
    assert_error(&got, 404, "not_found", None);
    assert!(
        got.1["message"].as_str().unwrap().contains("poc_api"),
        "{}",
        got.1
    );
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// The secrets of a run never reach its log, even at debug level: the database password, the
/// admin token, the JWT key, and the bearer tokens of requests (in a header, and in a stream's
/// `access_token`, which is logged redacted), a refused one included.
#[tokio::test]
async fn no_secret_reaches_the_log_of_a_run() {
    let db = TestDb::new().await;
    let mut config = test_config(&db);
    // The dev cluster trusts local connections, so the password is carried but never asked.
    let password = "pw-never-logged-7f3a9c";
    assert!(db.url.contains("postgres@"), "{}", db.url);
    config.database_url = udaconnect::config::DatabaseUrl::new(db.url.replacen(
        "postgres@",
        &format!("postgres:{password}@"),
        1,
    ));
    let admin = "admin-token-never-logged-51d2e8";
    config.admin_token = Some(udaconnect::config::Secret::new(admin));
    let log = tempfile::NamedTempFile::new().expect("log file");
    let port = free_port();
    let mut child = spawn_serve_logging(
        &config,
        (port, 0),
        "secrets",
        log.path(),
        "debug,h2=info,hyper=info,hyper_util=info,tower=info,librdkafka=warn,rdkafka=warn",
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_for_status(&format!("{base}/readyz"), 200, Duration::from_secs(90)).await;
    let organizer = organizer_token();
    let refused = "bad-token-never-logged-9e21";
    assert_eq!(
        get_as(Some(&organizer), &format!("{base}/v1/status"))
            .await
            .0,
        200
    );
    assert_eq!(
        get_as(Some(admin), &format!("{base}/v1/status")).await.0,
        200
    );
    assert_eq!(
        get_as(Some(refused), &format!("{base}/v1/persons/1"))
            .await
            .0,
        401
    );
    let feed = format!("{base}/v1/connections/stream?access_token={organizer}");
    let response = reqwest::get(&feed).await.expect("sse");
    assert_eq!(response.status().as_u16(), 200);
    drop(response);
    // The request logs come out as the requests end.
    let text = eventually(
        "the stream's request is logged",
        Duration::from_secs(10),
        || async {
            let text = std::fs::read_to_string(log.path()).expect("log");
            if text.contains("access_token=***") {
                Ok(text)
            } else {
                Err("not yet".to_owned())
            }
        },
    )
    .await;
    child.kill().expect("stopped");
    let _ = child.wait();
    assert!(
        text.contains("rest server listening"),
        "not the service's log:\n{text}"
    );
    assert!(text.contains("DEBUG"), "not a debug-level log");
    for (what, secret) in [
        ("the database password", password),
        ("the admin token", admin),
        ("the JWT key", TEST_JWT_KEY),
        ("an organizer's token", organizer.as_str()),
        (
            "an organizer's token's signature",
            organizer.rsplit('.').next().expect("a JWT"),
        ),
        ("a refused token", refused),
    ] {
        assert!(!text.contains(secret), "{what} is in the log");
    }
    db.drop_db().await;
}

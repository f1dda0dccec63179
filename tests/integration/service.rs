//! `udaconnect serve` in-process: health, readiness against the real services, topic creation,
//! graceful shutdown.

use std::time::Duration;

use udaconnect::kafka::Broker;
use udaconnect::Config;

use crate::helpers::{
    eventually, free_port, get_json, postgres_addr, test_config, wait_for_status, PrivateBroker,
    TcpProxy, TestApp, TestDb,
};

fn missing(body: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(body["missing"].clone()).expect("missing is a list of names")
}

#[tokio::test]
async fn ready_with_postgres_and_the_broker_and_topics_are_created() {
    let db = TestDb::new().await;
    let config = test_config(&db);
    let app = TestApp::spawn(config.clone()).await;

    let (status, body) = get_json(&app.url("/healthz")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("alive")));

    let body = wait_for_status(&app.url("/readyz"), 200, Duration::from_secs(20)).await;
    assert_eq!(body["status"], "ready");
    assert!(missing(&body).is_empty(), "{body}");
    let checked: Vec<&str> = body["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(checked, ["postgres", "kafka", "pipeline"], "{body}");

    // Start-up created the topics of docs/design.md §2 with the configured partition counts.
    let broker = Broker::new(&config).expect("kafka client");
    let topics = config.topics();
    let expected = [
        (
            topics.locations.clone(),
            config.locations_partitions as usize,
        ),
        (
            topics.person_updates.clone(),
            config.person_updates_partitions as usize,
        ),
        (
            topics.connections.clone(),
            config.connections_partitions as usize,
        ),
        (topics.locations_dlq.clone(), 1),
        (topics.person_updates_dlq.clone(), 1),
    ];
    let found = eventually("every topic created", Duration::from_secs(30), || async {
        let counts = broker
            .partition_counts(Duration::from_secs(5))
            .await
            .expect("metadata");
        let found: Vec<(String, usize)> = expected
            .iter()
            .filter_map(|(name, _)| counts.iter().find(|(n, _)| n == name).cloned())
            .collect();
        if found.len() == expected.len() {
            Ok(found)
        } else {
            Err(format!("{found:?}"))
        }
    })
    .await;
    assert_eq!(found, expected.to_vec());

    // The OpenAPI document describes the probes.
    let (status, spec) = get_json(&app.url("/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(
        spec["paths"]["/readyz"]["get"]["responses"]["503"].is_object(),
        "{spec}"
    );

    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn readiness_names_the_broker_when_it_stops_and_recovers_when_it_returns() {
    let db = TestDb::new().await;
    let mut broker = PrivateBroker::start().await;
    let config = Config {
        kafka_brokers: broker.addr.to_string(),
        ..test_config(&db)
    };
    let app = TestApp::spawn(config).await;
    wait_for_status(&app.url("/readyz"), 200, Duration::from_secs(20)).await;

    broker.stop();
    let body = wait_for_status(&app.url("/readyz"), 503, Duration::from_secs(20)).await;
    assert_eq!(body["status"], "unavailable");
    assert_eq!(missing(&body), vec!["kafka".to_owned()], "{body}");
    let kafka_check = &body["checks"][1];
    assert_eq!(kafka_check["name"], "kafka");
    assert!(
        kafka_check["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    // The process itself is still alive.
    assert_eq!(get_json(&app.url("/healthz")).await.0, 200);

    broker.restart().await;
    let body = wait_for_status(&app.url("/readyz"), 200, Duration::from_secs(20)).await;
    assert!(missing(&body).is_empty(), "{body}");

    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn readiness_names_postgres_when_it_is_cut_off_and_recovers() {
    let db = TestDb::new().await;
    let proxy = TcpProxy::start(postgres_addr()).await;
    let url = db
        .url
        .replacen(&postgres_addr().to_string(), &proxy.addr.to_string(), 1);
    assert_ne!(url, db.url, "the database URL goes through the proxy");
    let config = Config {
        database_url: udaconnect::config::DatabaseUrl::new(url),
        ..test_config(&db)
    };
    let app = TestApp::spawn(config).await;
    wait_for_status(&app.url("/readyz"), 200, Duration::from_secs(20)).await;

    proxy.cut();
    let body = wait_for_status(&app.url("/readyz"), 503, Duration::from_secs(20)).await;
    assert_eq!(missing(&body), vec!["postgres".to_owned()], "{body}");

    proxy.restore().await;
    let body = wait_for_status(&app.url("/readyz"), 200, Duration::from_secs(20)).await;
    assert!(missing(&body).is_empty(), "{body}");

    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test]
async fn start_up_fails_with_a_clear_error_when_postgres_never_answers() {
    let unused_port = free_port();
    let config = Config {
        database_url: udaconnect::config::DatabaseUrl::new(format!(
            "postgres://postgres@127.0.0.1:{unused_port}/udaconnect"
        )),
        startup_wait_s: 1,
        rest_addr: "127.0.0.1:0".parse().expect("addr"),
        // Checked before PostgreSQL: a key, or no authentication.
        auth: udaconnect::config::AuthMode::Off,
        ..Config::default()
    };
    let err = match udaconnect::Server::build(config).await {
        Ok(_) => panic!("start-up succeeded without a database"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&format!(
            "postgres at postgres://postgres@127.0.0.1:{unused_port}/udaconnect did not answer"
        )),
        "{err}"
    );
}

#[tokio::test]
async fn readiness_names_the_pipeline_while_it_has_not_started() {
    let db = TestDb::new().await;
    let config = Config {
        kafka_brokers: format!("127.0.0.1:{}", free_port()),
        ..test_config(&db)
    };
    let app = TestApp::spawn(config).await;
    let body = wait_for_status(&app.url("/readyz"), 503, Duration::from_secs(20)).await;
    assert_eq!(
        missing(&body),
        vec!["kafka".to_owned(), "pipeline".to_owned()],
        "{body}"
    );
    let pipeline_check = &body["checks"][2];
    assert!(
        pipeline_check["error"]
            .as_str()
            .is_some_and(|e| e.contains("has not started")),
        "{body}"
    );
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

//! The gRPC API against the running service (real PostgreSQL and broker): every
//! `udaconnect.v1` method on valid and invalid input, the admin token, a live `Subscribe`
//! stream fed through `RecordStream`, forwarding between two `udaconnect serve` processes,
//! health and reflection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use udaconnect::auth::Role;
use udaconnect::proto::convert::timestamp;
use udaconnect::proto::v1::admin_client::AdminClient;
use udaconnect::proto::v1::connections_client::ConnectionsClient;
use udaconnect::proto::v1::ingest_client::IngestClient;
use udaconnect::proto::v1::{
    ClusterStatusRequest, ConnectionEventKind, ErasePersonRequest, GetPersonRequest,
    GetZoneRequest, HistoryRequest, ListPointsRequest, ListZonesRequest, LocationEvent,
    PersonState, SubscribeRequest, TriggerSnapshotRequest, ZoneState,
};
use udaconnect::Config;
use udaconnect_actors::domain::Micros;
use udaconnect_actors::zones::{zone_partition, ZoneGrid};

use crate::helpers::{
    eventually, free_port, get_json, scalar, spawn_serve, test_config, Served, TestApp, TestDb,
};

const TOKEN: &str = "grpc-test-admin-token";
/// The venue of these tests (Brandenburg Gate); persons stand 500 m apart (different zones).
const LAT: f64 = 52.5163;
const LON: f64 = 13.3777;

fn now_micros() -> Micros {
    chrono::Utc::now().timestamp_micros()
}

/// A location event of `person` at (lat, lon), `ago_s` seconds ago.
fn event(person: i64, lat: f64, lon: f64, at: Micros) -> LocationEvent {
    LocationEvent {
        event_id: String::new(),
        person_id: person,
        lat,
        lon,
        recorded_at: Some(timestamp(at)),
    }
}

/// Inserts persons `ids` with explicit ids.
async fn insert_persons(client: &tokio_postgres::Client, ids: impl IntoIterator<Item = i64>) {
    for id in ids {
        client
            .execute(
                "INSERT INTO person (id, first_name, last_name, company_name)
                 VALUES ($1::int8, 'First' || $1::int8::text, 'Last' || $1::int8::text, 'Company')",
                &[&id],
            )
            .await
            .expect("insert person");
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to gRPC at {addr}: {e}"))
}

/// Polls `grpc.health.v1` until the whole server reports SERVING, for up to `within`.
async fn wait_serving(channel: Channel, within: Duration) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let health = HealthClient::new(channel);
    eventually("the server reports SERVING", within, || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status);
            match status {
                Ok(s) if s == ServingStatus::Serving as i32 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
}

/// `message` with the admin bearer token.
fn admin<T>(message: T) -> Request<T> {
    with_token(message, TOKEN)
}

/// Adds an organizer's JWT to every call of a client (`with_interceptor`).
fn as_organizer(mut request: Request<()>) -> Result<Request<()>, Status> {
    if !request.metadata().contains_key("authorization") {
        let value = format!("Bearer {}", crate::helpers::organizer_token());
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("header"));
    }
    Ok(request)
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

/// The status's code and the field it names (`x-error-field`).
fn code_and_field(status: &Status) -> (Code, Option<String>) {
    let field = status
        .metadata()
        .get("x-error-field")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status.code(), field)
}

fn invalid(field: &str) -> (Code, Option<String>) {
    (Code::InvalidArgument, Some(field.to_owned()))
}

/// A fresh database with persons `persons`, and the service on it with the admin token and
/// 2 + 2 partitions, SERVING.
async fn serving_app(
    persons: impl IntoIterator<Item = i64>,
) -> (TestDb, tokio_postgres::Client, Config, TestApp) {
    let (db, client) = TestDb::migrated().await;
    insert_persons(&client, persons).await;
    let mut config = test_config(&db);
    config.admin_token = Some(udaconnect::config::Secret::new(TOKEN));
    config.locations_partitions = 2;
    config.person_updates_partitions = 2;
    let app = TestApp::spawn(config.clone()).await;
    wait_serving(channel(app.grpc_addr).await, Duration::from_secs(90)).await;
    (db, client, config, app)
}

/// Calls `f` until it returns `Ok`, or an error other than `retry_on`, for up to `within`.
async fn until_ok<T, F, Fut>(within: Duration, retry_on: &[Code], mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    eventually("the call answers", within, || {
        let call = f();
        async move {
            match call.await {
                Ok(v) => Ok(v),
                Err(s) if retry_on.contains(&s.code()) => {
                    Err(format!("{:?}: {}", s.code(), s.message()))
                }
                Err(s) => panic!("{:?}: {}", s.code(), s.message()),
            }
        }
    })
    .await
}

/// `GetZone` of `zone` (every point), retried while the zone has no actor yet or its owner is
/// not known yet.
async fn zone_eventually(client: &AdminClient<Channel>, zone: u64, within: Duration) -> ZoneState {
    until_ok(within, &[Code::NotFound, Code::Unavailable], || {
        let mut c = client.clone();
        async move {
            Ok(c.get_zone(admin(GetZoneRequest {
                zone: format!("{zone:x}"),
                point_limit: 0,
            }))
            .await?
            .into_inner())
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_readiness_and_reflection_lists_every_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let (db, _client, _config, app) = serving_app([]).await;
    let channel = channel(app.grpc_addr).await;
    let mut health = HealthClient::new(channel.clone());
    for service in [
        "udaconnect.v1.Ingest",
        "udaconnect.v1.Connections",
        "udaconnect.v1.Admin",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".to_owned(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);

    let channel_for_alpha = channel.clone();
    let mut reflection = ServerReflectionClient::new(channel);
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "udaconnect.v1.Admin".to_owned(),
            )),
        ]))
        .await
        .expect("reflection answers")
        .into_inner();
    let listed = match answers
        .message()
        .await
        .expect("stream")
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::ListServicesResponse(list)) => list
            .service
            .into_iter()
            .map(|s| s.name)
            .collect::<BTreeSet<_>>(),
        other => panic!("not a service list: {other:?}"),
    };
    let expected: BTreeSet<String> = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "udaconnect.v1.Admin",
        "udaconnect.v1.Connections",
        "udaconnect.v1.Ingest",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(listed, expected);
    match answers
        .message()
        .await
        .expect("stream")
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            use prost::Message;
            let names: Vec<String> = files
                .file_descriptor_proto
                .iter()
                .map(|bytes| {
                    prost_types::FileDescriptorProto::decode(bytes.as_slice())
                        .expect("a file descriptor")
                        .name()
                        .to_owned()
                })
                .collect();
            assert!(
                names.iter().any(|n| n == "udaconnect/v1/admin.proto"),
                "{names:?}"
            );
        }
        other => panic!("not a file descriptor: {other:?}"),
    }

    // v1alpha too, for clients (older grpcurl) that only speak that.
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

        let mut client = ServerReflectionClient::new(channel_for_alpha);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client
            .server_reflection_info(futures::stream::iter(vec![request]))
            .await
            .expect("v1alpha reflection answers")
            .into_inner();
        let listed: BTreeSet<String> = match answers
            .message()
            .await
            .expect("stream")
            .and_then(|r| r.message_response)
        {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("not a service list: {other:?}"),
        };
        for service in [
            "udaconnect.v1.Admin",
            "udaconnect.v1.Connections",
            "udaconnect.v1.Ingest",
        ] {
            assert!(listed.contains(service), "{listed:?}");
        }
    }
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_health_is_not_serving_and_ingest_is_unavailable() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let (db, _client) = TestDb::migrated().await;
    let mut config = test_config(&db);
    // Nothing listens there: the topics cannot be created, the pipeline never starts.
    config.kafka_brokers = format!("127.0.0.1:{}", free_port());
    let app = TestApp::spawn(config).await;
    let channel = channel(app.grpc_addr).await;
    let health = HealthClient::new(channel.clone());
    // The first readiness check runs at start-up and takes at most readiness_timeout.
    let status = until_ok(Duration::from_secs(10), &[Code::NotFound], || {
        let mut health = health.clone();
        async move {
            Ok(health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner()
                .status)
        }
    })
    .await;
    assert_eq!(status, ServingStatus::NotServing as i32);
    let err = IngestClient::with_interceptor(channel.clone(), as_organizer)
        .record(event(1, LAT, LON, now_micros()))
        .await
        .expect_err("no pipeline");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = ConnectionsClient::with_interceptor(channel, as_organizer)
        .subscribe(SubscribeRequest {
            person_ids: vec![1],
        })
        .await
        .expect_err("no pipeline");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_acknowledges_valid_events_and_names_the_field_of_bad_ones() {
    let (db, client, _config, app) = serving_app([1, 2]).await;
    let mut ingest = IngestClient::with_interceptor(channel(app.grpc_addr).await, as_organizer);
    let t = now_micros() - 1_000_000;

    // One event: acknowledged with its derived id, which is deterministic; then stored.
    let ack = ingest
        .record(event(1, LAT, LON, t))
        .await
        .expect("accepted")
        .into_inner();
    let again = ingest
        .record(event(1, LAT, LON, t))
        .await
        .expect("a retry is accepted")
        .into_inner();
    assert_eq!(
        ack.event_id, again.event_id,
        "a retried send is the same event"
    );
    let own_id = uuid::Uuid::new_v4().to_string();
    let ack_own = ingest
        .record(LocationEvent {
            event_id: own_id.clone(),
            ..event(2, LAT, LON, t)
        })
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(ack_own.event_id, own_id);

    let bad = [
        (
            LocationEvent {
                lat: 91.0,
                ..event(1, LAT, LON, t)
            },
            "lat",
        ),
        (
            LocationEvent {
                lon: -180.5,
                ..event(1, LAT, LON, t)
            },
            "lon",
        ),
        (
            LocationEvent {
                recorded_at: None,
                ..event(1, LAT, LON, t)
            },
            "recorded_at",
        ),
        (
            event(1, LAT, LON, now_micros() + 3_600_000_000),
            "recorded_at",
        ),
        (
            LocationEvent {
                event_id: "nope".to_owned(),
                ..event(1, LAT, LON, t)
            },
            "event_id",
        ),
    ];
    for (e, field) in bad {
        let status = ingest.record(e).await.expect_err("rejected");
        assert_eq!(
            code_and_field(&status),
            invalid(field),
            "{}",
            status.message()
        );
    }
    // A valid event of a person that does not exist: NOT_FOUND, as REST's 404.
    let status = ingest
        .record(event(999, LAT, LON, t))
        .await
        .expect_err("unknown person");
    assert_eq!(
        code_and_field(&status),
        (Code::NotFound, Some("person_id".to_owned())),
        "{}",
        status.message()
    );

    // A stream: the bad items are reported by index, the others accepted.
    let items = vec![
        event(1, LAT, LON + 0.001, t + 1_000_000),
        LocationEvent {
            lat: -95.0,
            ..event(2, LAT, LON, t)
        },
        event(2, LAT, LON + 0.001, t + 1_000_000),
        event(77, LAT, LON, t),
        LocationEvent {
            recorded_at: None,
            ..event(1, LAT, LON, t)
        },
        event(1, LAT, LON + 0.002, t + 2_000_000),
    ];
    let summary = ingest
        .record_stream(futures::stream::iter(items))
        .await
        .expect("stream answered")
        .into_inner();
    assert_eq!((summary.received, summary.accepted), (6, 3));
    let rejected: Vec<(u64, &str)> = summary
        .rejections
        .iter()
        .map(|r| (r.index, r.field.as_str()))
        .collect();
    assert_eq!(rejected, [(1, "lat"), (3, "person_id"), (4, "recorded_at")]);
    assert!(
        summary.rejections[1]
            .reason
            .starts_with("no person with id 77"),
        "{:?}",
        summary.rejections[1]
    );

    // Acknowledged means in the broker: the pipeline stores every accepted event (4 distinct
    // ones: the retried send is the same event).
    eventually(
        "accepted events stored",
        Duration::from_secs(90),
        || async {
            match scalar(&client, "SELECT count(*) FROM location").await {
                n if n >= 5 => Ok(()),
                n => Err(format!("{n} stored")),
            }
        },
    )
    .await;
    assert_eq!(scalar(&client, "SELECT count(*) FROM location").await, 5);
    let stored = scalar(
        &client,
        &format!(
            "SELECT count(*) FROM location WHERE event_id = '{}'",
            ack.event_id
        ),
    )
    .await;
    assert_eq!(stored, 1);
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_through_episodes_and_checks_its_arguments() {
    let (db, client, _config, app) = serving_app([1, 2, 3, 4]).await;
    // Three episodes of person 1 (with 2, 3, 4), an hour apart, the last one open.
    let base = chrono::DateTime::parse_from_rfc3339("2026-03-02T09:00:00Z")
        .expect("time")
        .with_timezone(&chrono::Utc);
    for (i, peer) in [2i64, 3, 4].into_iter().enumerate() {
        let start = base + chrono::Duration::hours(i as i64);
        let end = start + chrono::Duration::minutes(10);
        let ended = (peer != 4).then_some(end);
        client
            .execute(
                "INSERT INTO connection (person_id, peer_id, started_at, last_seen_at, ended_at,
                                         colocations, min_distance_m, lat, lon)
                 VALUES (1, $1, $2, $3, $4, 3, 1.5, 52.5, 13.4)",
                &[&peer, &start, &end, &ended],
            )
            .await
            .expect("insert connection");
    }
    let mut connections =
        ConnectionsClient::with_interceptor(channel(app.grpc_addr).await, as_organizer);
    let request = |page_size, page_token: String| HistoryRequest {
        person_id: 1,
        from: None,
        to: None,
        page_size,
        page_token,
    };
    let first = connections
        .history(request(2, String::new()))
        .await
        .expect("history")
        .into_inner();
    let peers = |page: &udaconnect::proto::v1::HistoryPage| -> Vec<i64> {
        page.connections
            .iter()
            .map(|c| c.peer.as_ref().expect("peer").id)
            .collect()
    };
    assert_eq!(peers(&first), [2, 3]);
    assert!(!first.next_page_token.is_empty());
    let c = &first.connections[0];
    assert_eq!(
        c.peer.as_ref().map(|p| p.first_name.as_str()),
        Some("First2")
    );
    assert_eq!(
        c.started_at,
        Some(udaconnect::proto::convert::chrono_timestamp(base))
    );
    assert_eq!((c.colocations, c.min_distance_m), (3, 1.5));
    assert!(c.ended_at.is_some());
    let second = connections
        .history(request(2, first.next_page_token.clone()))
        .await
        .expect("history")
        .into_inner();
    assert_eq!(peers(&second), [4]);
    assert!(second.connections[0].ended_at.is_none(), "open episode");
    assert!(second.next_page_token.is_empty(), "last page");

    // [from, to) keeps the episodes overlapping it: only the one with 3.
    let window = connections
        .history(HistoryRequest {
            from: Some(udaconnect::proto::convert::chrono_timestamp(
                base + chrono::Duration::minutes(30),
            )),
            to: Some(udaconnect::proto::convert::chrono_timestamp(
                base + chrono::Duration::minutes(90),
            )),
            ..request(0, String::new())
        })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(peers(&window), [3]);

    let not_found = connections
        .history(HistoryRequest {
            person_id: 404,
            ..request(0, String::new())
        })
        .await
        .expect_err("unknown person");
    assert_eq!(
        code_and_field(&not_found),
        (Code::NotFound, Some("person_id".to_owned()))
    );
    let cases = [
        (request(1_001, String::new()), "page_size"),
        (request(0, "garbage".to_owned()), "page_token"),
        (
            HistoryRequest {
                person_id: -1,
                ..request(0, String::new())
            },
            "person_id",
        ),
        (
            HistoryRequest {
                from: Some(timestamp(1_700_000_000_000_000)),
                to: Some(timestamp(1_600_000_000_000_000)),
                ..request(0, String::new())
            },
            "to",
        ),
    ];
    for (r, field) in cases {
        let status = connections.history(r).await.expect_err("invalid");
        assert_eq!(
            code_and_field(&status),
            invalid(field),
            "{}",
            status.message()
        );
    }
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_streams_connection_started_for_a_pair_sent_through_record_stream() {
    let (db, _client, _config, app) = serving_app([1, 2]).await;
    let channel = channel(app.grpc_addr).await;
    let mut connections = ConnectionsClient::with_interceptor(channel.clone(), as_organizer);

    for (ids, expected) in [
        (
            vec![],
            (Code::InvalidArgument, Some("person_ids".to_owned())),
        ),
        (
            vec![1, 404],
            (Code::NotFound, Some("person_ids".to_owned())),
        ),
    ] {
        let status = connections
            .subscribe(SubscribeRequest { person_ids: ids })
            .await
            .expect_err("refused");
        assert_eq!(code_and_field(&status), expected, "{}", status.message());
    }

    let mut stream = connections
        .subscribe(SubscribeRequest {
            person_ids: vec![1],
        })
        .await
        .expect("subscribed")
        .into_inner();
    // Persons 1 and 2 about 0.7 m apart, one second apart.
    let t = now_micros() - 2_000_000;
    let summary = IngestClient::with_interceptor(channel, as_organizer)
        .record_stream(futures::stream::iter(vec![
            event(1, LAT, LON, t),
            event(2, LAT, LON + 0.00001, t + 1_000_000),
        ]))
        .await
        .expect("ingested")
        .into_inner();
    assert_eq!((summary.accepted, summary.rejections.len()), (2, 0));

    let n = tokio::time::timeout(Duration::from_secs(90), stream.message())
        .await
        .expect("a notification within 90 s")
        .expect("stream healthy")
        .expect("stream open");
    assert_eq!(n.kind, ConnectionEventKind::ConnectionStarted as i32);
    assert_eq!(n.r#type, "connection.started");
    assert_eq!((n.person_id, n.peer_id), (1, 2));
    assert_eq!(
        n.started_at,
        Some(timestamp(t + 1_000_000)),
        "the later event's time"
    );
    assert!(
        n.min_distance_m > 0.5 && n.min_distance_m < 1.0,
        "{}",
        n.min_distance_m
    );
    assert!(uuid::Uuid::parse_str(&n.id).is_ok(), "{}", n.id);

    // The same episode is in the history once episode changes are written (at most
    // CHANGES_FLUSH_INTERVAL after the notification).
    let peers = eventually(
        "the episode in the history",
        Duration::from_secs(30),
        || {
            let mut connections = connections.clone();
            async move {
                let page = connections
                    .history(HistoryRequest {
                        person_id: 1,
                        from: None,
                        to: None,
                        page_size: 0,
                        page_token: String::new(),
                    })
                    .await
                    .expect("history")
                    .into_inner();
                let peers: Vec<i64> = page
                    .connections
                    .iter()
                    .map(|c| c.peer.as_ref().expect("peer").id)
                    .collect();
                if peers.is_empty() {
                    Err("no connection yet".to_owned())
                } else {
                    Ok(peers)
                }
            }
        },
    )
    .await;
    assert_eq!(peers, [2]);
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_refuses_missing_or_wrong_tokens_and_other_roles_than_organizer() {
    let (db, _client, _config, app) = serving_app([]).await;
    let mut admin_client = AdminClient::new(channel(app.grpc_addr).await);
    let missing = admin_client
        .cluster_status(ClusterStatusRequest {})
        .await
        .expect_err("no token");
    assert_eq!(
        code_and_field(&missing),
        (Code::Unauthenticated, Some("authorization".to_owned()))
    );
    let wrong = admin_client
        .get_person(with_token(
            GetPersonRequest { person_id: 1 },
            "not-the-token",
        ))
        .await
        .expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let right = admin_client
        .cluster_status(admin(ClusterStatusRequest {}))
        .await
        .expect("the right token");
    assert_eq!(right.into_inner().processes.len(), 1);
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;

    // A service without admin_token: Admin takes an organizer's JWT, and refuses the other
    // roles with PERMISSION_DENIED.
    let (db, _client) = TestDb::migrated().await;
    let app = TestApp::spawn(test_config(&db)).await;
    wait_serving(channel(app.grpc_addr).await, Duration::from_secs(90)).await;
    let mut admin_client = AdminClient::new(channel(app.grpc_addr).await);
    let organizer = admin_client
        .cluster_status(with_token(
            ClusterStatusRequest {},
            &crate::helpers::organizer_token(),
        ))
        .await;
    assert!(organizer.is_ok(), "{organizer:?}");
    for role in [Role::Attendee, Role::Gateway] {
        let person = (role == Role::Attendee).then_some(1);
        let status = admin_client
            .get_person(with_token(
                GetPersonRequest { person_id: 1 },
                &crate::helpers::token(role, person),
            ))
            .await
            .expect_err("not an organizer");
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{role:?}: {status:?}"
        );
        // Erasure over gRPC is an organizer's, even of an attendee's own person (REST's
        // DELETE lets an attendee erase itself).
        let status = admin_client
            .erase_person(with_token(
                ErasePersonRequest { person_id: 1 },
                &crate::helpers::token(role, person),
            ))
            .await
            .expect_err("not an organizer");
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{role:?}: {status:?}"
        );
    }
    let bad = admin_client
        .erase_person(with_token(
            ErasePersonRequest { person_id: 0 },
            &crate::helpers::organizer_token(),
        ))
        .await
        .expect_err("not a person id");
    assert_eq!(
        code_and_field(&bad),
        (Code::InvalidArgument, Some("person_id".to_owned()))
    );
    let old_token = admin_client
        .cluster_status(admin(ClusterStatusRequest {}))
        .await
        .expect_err("no admin token here");
    assert_eq!(old_token.code(), Code::Unauthenticated);
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// The authorization rules on gRPC, role by role: an attendee records, reads history of and
/// subscribes to itself only; a gateway records for anyone and reads no one; a refused item of
/// a stream is rejected alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_what_the_rules_allow_on_grpc_and_nothing_else() {
    let (db, _client, _config, app) = serving_app([1, 2]).await;
    let channel = channel(app.grpc_addr).await;
    let mut ingest = IngestClient::new(channel.clone());
    let mut connections = ConnectionsClient::new(channel);
    let attendee = crate::helpers::token(Role::Attendee, Some(1));
    let gateway = crate::helpers::token(Role::Gateway, None);
    let t = now_micros() - 1_000_000;
    let history = |person| HistoryRequest {
        person_id: person,
        ..HistoryRequest::default()
    };
    let subscribe = |ids: Vec<i64>| SubscribeRequest { person_ids: ids };

    // No token at all: UNAUTHENTICATED on every service.
    let status = ingest.record(event(1, LAT, LON, t)).await.unwrap_err();
    assert_eq!(
        code_and_field(&status),
        (Code::Unauthenticated, Some("authorization".to_owned()))
    );
    let status = connections.history(history(1)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // The attendee: itself yes, person 2 no, naming the field.
    ingest
        .record(with_token(event(1, LAT, LON, t), &attendee))
        .await
        .expect("its own report");
    let status = ingest
        .record(with_token(event(2, LAT, LON, t), &attendee))
        .await
        .expect_err("another's report");
    assert_eq!(
        code_and_field(&status),
        (Code::PermissionDenied, Some("person_id".to_owned()))
    );
    connections
        .history(with_token(history(1), &attendee))
        .await
        .expect("its own history");
    let status = connections
        .history(with_token(history(2), &attendee))
        .await
        .expect_err("another's history");
    assert_eq!(
        code_and_field(&status),
        (Code::PermissionDenied, Some("person_id".to_owned()))
    );
    let status = connections
        .subscribe(with_token(subscribe(vec![1, 2]), &attendee))
        .await
        .map(|_| ())
        .expect_err("another's notifications");
    assert_eq!(
        code_and_field(&status),
        (Code::PermissionDenied, Some("person_ids".to_owned()))
    );
    connections
        .subscribe(with_token(subscribe(vec![1]), &attendee))
        .await
        .expect("its own notifications");
    // A stream with another person's report: that item alone is rejected.
    let summary = ingest
        .record_stream(with_token(
            futures::stream::iter(vec![
                event(1, LAT, LON, t + 1_000_000),
                event(2, LAT, LON, t + 1_000_000),
            ]),
            &attendee,
        ))
        .await
        .expect("stream answered")
        .into_inner();
    assert_eq!((summary.received, summary.accepted), (2, 1));
    assert_eq!(summary.rejections.len(), 1);
    assert_eq!(
        (
            summary.rejections[0].index,
            summary.rejections[0].field.as_str()
        ),
        (1, "person_id")
    );

    // The gateway: records for anyone, reads no one.
    ingest
        .record(with_token(event(2, LAT, LON, t + 2_000_000), &gateway))
        .await
        .expect("a gateway posts for anyone");
    let status = connections
        .history(with_token(history(2), &gateway))
        .await
        .expect_err("a gateway reads no history");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = connections
        .subscribe(with_token(subscribe(vec![2]), &gateway))
        .await
        .map(|_| ())
        .expect_err("a gateway follows no one");
    assert_eq!(status.code(), Code::PermissionDenied);
    app.stop().await.expect("clean shutdown");
    db.drop_db().await;
}

/// A service with persons 1, 2 and 3 where 1 and 2 met (sent through `RecordStream`), once
/// person 1's actor holds the open episode with 2; what the Admin tests start from.
struct MetPair {
    db: TestDb,
    client: tokio_postgres::Client,
    app: TestApp,
    admin_client: AdminClient<Channel>,
    /// Person 1's state, with the episode.
    person: PersonState,
    /// The zone both stand in, and its zone partition.
    zone: u64,
    zone_partition: i32,
    grid: ZoneGrid,
    /// When person 1 reported (µs since the epoch).
    t: Micros,
}

/// [`met_pair_at`] two seconds ago: a live stream, whose event time then follows the clock
/// (the ingest side sends a heartbeat every 500 ms).
async fn met_pair() -> MetPair {
    met_pair_at(now_micros() - 2_000_000).await
}

/// [`MetPair`] with person 1 reporting at `t` (µs since the epoch) and person 2 a second later.
async fn met_pair_at(t: Micros) -> MetPair {
    let (db, client, config, app) = serving_app([1, 2, 3]).await;
    let channel = channel(app.grpc_addr).await;
    let admin_client = AdminClient::new(channel.clone());
    let summary = IngestClient::with_interceptor(channel, as_organizer)
        .record_stream(futures::stream::iter(vec![
            event(1, LAT, LON, t),
            event(2, LAT, LON + 0.00001, t + 1_000_000),
        ]))
        .await
        .expect("ingested")
        .into_inner();
    assert_eq!(summary.accepted, 2);

    // Person 1's actor: its sighting, and the open episode with 2.
    let person: PersonState = until_ok(
        Duration::from_secs(90),
        &[Code::NotFound, Code::Unavailable],
        || {
            let mut c = admin_client.clone();
            async move {
                let state = c
                    .get_person(admin(GetPersonRequest { person_id: 1 }))
                    .await?
                    .into_inner();
                if state.open_episodes.is_empty() {
                    return Err(Status::not_found("no episode yet"));
                }
                Ok(state)
            }
        },
    )
    .await;
    let grid = ZoneGrid::new(&config.engine_params());
    let zone = grid.home_zone(LAT, LON);
    MetPair {
        db,
        client,
        app,
        admin_client,
        person,
        zone,
        zone_partition: zone_partition(zone, 2) as i32,
        grid,
        t,
    }
}

impl MetPair {
    async fn stop(self) {
        self.app.stop().await.expect("clean shutdown");
        self.db.drop_db().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_get_person_shows_the_sighting_and_the_open_episode() {
    let pair = met_pair().await;
    let MetPair {
        client, zone, t, ..
    } = &pair;
    let (person, zone, t) = (&pair.person, *zone, *t);
    assert_eq!(person.person_id, 1);
    assert_eq!(
        person.owner,
        scalar_owner(client, "persons", person.partition).await
    );
    assert_eq!(person.trajectory.len(), 1);
    assert_eq!(person.trajectory[0].recorded_at, Some(timestamp(t)));
    assert_eq!(person.current_zone, Some(format!("{zone:x}")));
    assert_eq!(person.open_episodes.len(), 1);
    assert_eq!(person.open_episodes[0].peer_id, 2);
    assert_eq!(person.counters.map(|c| c.started), Some(1));

    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_get_zone_and_list_zones_show_the_points_of_the_pair_s_zone() {
    let pair = met_pair().await;
    let MetPair { zone, .. } = &pair;
    let mut admin_client = pair.admin_client.clone();
    let zone = *zone;
    // The zone both stand in: both points, home.
    let zone_state = zone_eventually(&admin_client, zone, Duration::from_secs(30)).await;
    assert_eq!(zone_state.zone, format!("{zone:x}"));
    assert_eq!(zone_state.partition, zone_partition(zone, 2) as i32);
    let mut points: Vec<(i64, bool)> = zone_state
        .points
        .iter()
        .map(|p| (p.person_id, p.home))
        .collect();
    points.sort_unstable();
    assert_eq!(points, [(1, true), (2, true)]);
    assert_eq!(zone_state.retained, 2);
    assert!(
        zone_state.counters.is_some_and(|c| c.colocations >= 1),
        "{zone_state:?}"
    );
    let limited = admin_client
        .get_zone(admin(GetZoneRequest {
            zone: format!("{zone:x}"),
            point_limit: 1,
        }))
        .await
        .expect("zone")
        .into_inner();
    assert_eq!((limited.points.len(), limited.retained), (1, 2));

    // ListZones: the zone in its partition, and every partition when none is named.
    let listed = admin_client
        .list_zones(admin(ListZonesRequest {
            partition: Some(zone_state.partition),
        }))
        .await
        .expect("zones")
        .into_inner();
    assert_eq!(listed.partitions.len(), 1);
    let zones: Vec<(&str, u64)> = listed.partitions[0]
        .zones
        .iter()
        .map(|z| (z.zone.as_str(), z.retained))
        .collect();
    assert_eq!(zones, [(format!("{zone:x}").as_str(), 2)]);
    let all = admin_client
        .list_zones(admin(ListZonesRequest { partition: None }))
        .await
        .expect("zones")
        .into_inner();
    assert_eq!(
        all.partitions
            .iter()
            .map(|p| p.partition)
            .collect::<Vec<_>>(),
        [0, 1]
    );
    assert!(all.partitions.iter().all(|p| p.error.is_empty()), "{all:?}");

    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cluster_status_lists_one_process_owning_every_partition() {
    let pair = met_pair().await;
    let MetPair {
        app,
        zone_partition,
        ..
    } = &pair;
    let mut admin_client = pair.admin_client.clone();
    let zone_state_partition = *zone_partition;
    // ClusterStatus: one process owning all 4 partitions, their offsets known.
    let status = admin_client
        .cluster_status(admin(ClusterStatusRequest {}))
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.processes.len(), 1);
    assert!(status.processes[0].reachable);
    assert_eq!(status.processes[0].addr, app.grpc_addr.to_string());
    assert_eq!(status.partitions.len(), 4);
    assert!(
        status
            .partitions
            .iter()
            .all(|p| p.owner == status.node && p.processed_offset >= 0 && p.end_offset >= 0),
        "{status:#?}"
    );
    let zone_partition_status = status
        .partitions
        .iter()
        .find(|p| p.stage == "zones" && p.partition == zone_state_partition)
        .expect("listed");
    assert!(
        zone_partition_status.processed_offset >= 1,
        "{zone_partition_status:?}"
    );

    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_trigger_snapshot_stores_what_was_processed_and_then_reports_it() {
    // An hour ago: not a live stream, so event time moves with reports alone and no heartbeat
    // follows the clock (with met_pair's live reports, a heartbeat every 500 ms could land
    // between the two requests below and make the second one take a snapshot: the test failed
    // that way under load).
    let pair = met_pair_at(now_micros() - 3_600 * 1_000_000).await;
    let MetPair {
        client,
        zone_partition,
        ..
    } = &pair;
    let mut admin_client = pair.admin_client.clone();
    let zone_state_partition = *zone_partition;
    let node = admin_client
        .cluster_status(admin(ClusterStatusRequest {}))
        .await
        .expect("status")
        .into_inner()
        .node;
    // Quiet first: the zone partition has processed its events record and the ingest side's
    // one heartbeat after them (no other record comes), so the snapshots below cover it all.
    let settled = eventually(
        "the zone partition settled",
        Duration::from_secs(30),
        || {
            let mut admin_client = admin_client.clone();
            async move {
                let status = admin_client
                    .cluster_status(admin(ClusterStatusRequest {}))
                    .await
                    .expect("status")
                    .into_inner();
                let p = status
                    .partitions
                    .into_iter()
                    .find(|p| p.stage == "zones" && p.partition == zone_state_partition)
                    .expect("listed");
                if p.end_offset >= 2 && p.processed_offset == p.end_offset {
                    Ok(p.processed_offset)
                } else {
                    Err(format!("{p:?}"))
                }
            }
        },
    )
    .await;

    // A snapshot now: stored, covering what was processed.
    let snapshot = admin_client
        .trigger_snapshot(admin(TriggerSnapshotRequest {
            stage: "zones".to_owned(),
            partition: zone_state_partition,
        }))
        .await
        .expect("snapshot")
        .into_inner();
    assert_eq!(snapshot.owner, node);
    let stored: i64 = client
        .query_one(
            "SELECT next_offset FROM shard_snapshot WHERE stage = 'zones' AND partition = $1",
            &[&zone_state_partition],
        )
        .await
        .expect("a stored snapshot")
        .get(0);
    assert_eq!(snapshot.snapshot_offset, Some(stored));
    assert_eq!(
        stored, settled,
        "the snapshot covers every processed record"
    );
    // Nothing changed since: no new snapshot, the stored one reported.
    let again = admin_client
        .trigger_snapshot(admin(TriggerSnapshotRequest {
            stage: "zones".to_owned(),
            partition: zone_state_partition,
        }))
        .await
        .expect("snapshot")
        .into_inner();
    assert!(!again.taken);
    assert_eq!(again.snapshot_offset, Some(stored));

    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_unknown_state_is_not_found_and_invalid_arguments_name_their_field() {
    let pair = met_pair().await;
    let MetPair {
        app, grid, zone, ..
    } = &pair;
    let mut admin_client = pair.admin_client.clone();
    let zone = *zone;
    // Invalid arguments name their field; unknown state is NOT_FOUND.
    let far_zone = grid.home_zone(-45.0, 170.0);
    let not_found = admin_client
        .get_zone(admin(GetZoneRequest {
            zone: format!("{far_zone:x}"),
            point_limit: 0,
        }))
        .await
        .expect_err("no actor");
    assert_eq!(
        code_and_field(&not_found),
        (Code::NotFound, Some("zone".to_owned()))
    );
    // A person never seen: an empty state, as REST's live state answers it; an id no person
    // has: NOT_FOUND naming person_id, as REST's 404.
    let unseen = admin_client
        .get_person(admin(GetPersonRequest { person_id: 3 }))
        .await
        .expect("a known person never seen")
        .into_inner();
    assert_eq!(
        (
            unseen.person_id,
            unseen.owner.as_str(),
            unseen.counters,
            unseen.trajectory.len()
        ),
        (3, "", None, 0)
    );
    let (status, live) = get_json(&app.url("/v1/persons/3/live")).await;
    assert_eq!(status, 200, "{live}");
    assert_eq!(
        (
            live["owner"].is_null(),
            live["counters"].is_null(),
            live["partition"].as_i64()
        ),
        (true, true, Some(i64::from(unseen.partition)))
    );
    let not_found = admin_client
        .get_person(admin(GetPersonRequest { person_id: 99 }))
        .await
        .expect_err("no such person");
    assert_eq!(
        code_and_field(&not_found),
        (Code::NotFound, Some("person_id".to_owned()))
    );
    let fine_cell = h3o::LatLng::new(LAT, LON)
        .expect("coordinates")
        .to_cell(h3o::Resolution::Fifteen);
    let invalid_cases: Vec<(Status, &str)> = vec![
        (
            admin_client
                .get_zone(admin(GetZoneRequest {
                    zone: "42".to_owned(),
                    point_limit: 0,
                }))
                .await
                .expect_err("x"),
            "zone",
        ),
        (
            admin_client
                .get_zone(admin(GetZoneRequest {
                    zone: fine_cell.to_string(),
                    point_limit: 0,
                }))
                .await
                .expect_err("x"),
            "zone",
        ),
        (
            admin_client
                .get_zone(admin(GetZoneRequest {
                    zone: format!("{zone:x}"),
                    point_limit: 10_001,
                }))
                .await
                .expect_err("x"),
            "point_limit",
        ),
        (
            admin_client
                .get_person(admin(GetPersonRequest { person_id: 0 }))
                .await
                .expect_err("x"),
            "person_id",
        ),
        (
            admin_client
                .list_zones(admin(ListZonesRequest { partition: Some(2) }))
                .await
                .expect_err("x"),
            "partition",
        ),
        (
            admin_client
                .trigger_snapshot(admin(TriggerSnapshotRequest {
                    stage: "nope".to_owned(),
                    partition: 0,
                }))
                .await
                .expect_err("x"),
            "stage",
        ),
        (
            admin_client
                .trigger_snapshot(admin(TriggerSnapshotRequest {
                    stage: "persons".to_owned(),
                    partition: -1,
                }))
                .await
                .expect_err("x"),
            "partition",
        ),
    ];
    for (status, field) in invalid_cases {
        assert_eq!(
            code_and_field(&status),
            invalid(field),
            "{}",
            status.message()
        );
    }
    pair.stop().await;
}

/// The owner `shard_owner` names for a partition of a stage.
async fn scalar_owner(client: &tokio_postgres::Client, stage: &str, partition: i32) -> String {
    client
        .query_one(
            "SELECT owner FROM shard_owner WHERE stage = $1 AND partition = $2",
            &[&stage, &partition],
        )
        .await
        .expect("an owner row")
        .get(0)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_answer_get_person_and_get_zone_for_each_other() {
    let persons: Vec<i64> = (1..=8).collect();
    let (db, client) = TestDb::migrated().await;
    insert_persons(&client, persons.clone()).await;
    let mut config = test_config(&db);
    config.locations_partitions = 2;
    config.person_updates_partitions = 2;
    let log = tempfile::NamedTempFile::new().expect("log file");
    let read_log = || std::fs::read_to_string(log.path()).unwrap_or_default();
    let ports = [
        ("node-a", (free_port(), free_port())),
        ("node-b", (free_port(), free_port())),
    ];
    config.admin_token = Some(udaconnect::config::Secret::new(TOKEN));
    let _nodes: Vec<Served> = ports
        .iter()
        .map(|(node, (grpc, rest))| spawn_serve(&config, (*rest, *grpc), node, log.path()))
        .collect();
    let addrs: BTreeMap<&str, SocketAddr> = ports
        .iter()
        .map(|(node, (grpc, _))| (*node, SocketAddr::from(([127, 0, 0, 1], *grpc))))
        .collect();
    let rest: BTreeMap<&str, String> = ports
        .iter()
        .map(|(node, (_, rest))| (*node, format!("http://127.0.0.1:{rest}")))
        .collect();

    // Both own partitions of both stages.
    let split = eventually(
        "the partitions split between the two",
        Duration::from_secs(180),
        || async {
            let now = owners(&client).await;
            let of = |stage: &str| -> BTreeSet<String> {
                now.iter()
                    .filter(|((s, _), _)| s == stage)
                    .map(|(_, o)| o.clone())
                    .collect()
            };
            if now.len() == 4 && of("zones").len() == 2 && of("persons").len() == 2 {
                Ok(now)
            } else {
                Err(format!("no split: {now:?}\n{}", read_log()))
            }
        },
    )
    .await;
    let mut clients = BTreeMap::new();
    for (node, addr) in &addrs {
        let channel = channel(*addr).await;
        wait_serving(channel.clone(), Duration::from_secs(60)).await;
        clients.insert(*node, channel);
    }

    // Each person alone in its own zone, 500 m east of the previous one.
    let grid = ZoneGrid::new(&config.engine_params());
    let t = now_micros() - 2_000_000;
    let spots: Vec<(i64, f64, f64)> = persons
        .iter()
        .map(|&p| (p, LAT, LON + 0.0075 * p as f64))
        .collect();
    let zones: BTreeSet<u64> = spots
        .iter()
        .map(|(_, lat, lon)| grid.home_zone(*lat, *lon))
        .collect();
    let summary = IngestClient::with_interceptor(clients["node-a"].clone(), as_organizer)
        .record_stream(futures::stream::iter(
            spots
                .iter()
                .map(|&(p, lat, lon)| event(p, lat, lon, t))
                .collect::<Vec<_>>(),
        ))
        .await
        .expect("ingested")
        .into_inner();
    assert_eq!(summary.accepted, persons.len() as u64);

    // Persons: both processes give the owner's state, whichever owns it.
    let mut person_owners = BTreeSet::new();
    for &person in &persons {
        let mut answers = Vec::new();
        for node in ["node-a", "node-b"] {
            let admin_client = AdminClient::new(clients[node].clone());
            let state: PersonState = until_ok(
                Duration::from_secs(90),
                &[Code::NotFound, Code::Unavailable],
                || {
                    let mut c = admin_client.clone();
                    async move {
                        let state = c
                            .get_person(admin(GetPersonRequest { person_id: person }))
                            .await?
                            .into_inner();
                        // Until its report is processed the person has no actor state.
                        if state.counters.is_none() {
                            return Err(Status::not_found("no actor state yet"));
                        }
                        Ok(state)
                    }
                },
            )
            .await;
            answers.push(state);
        }
        let owner = &split[&("persons".to_owned(), answers[0].partition)];
        assert_eq!(&answers[0].owner, owner, "person {person}");
        assert_eq!(
            answers[0], answers[1],
            "person {person}: both processes agree"
        );
        assert_eq!(answers[0].trajectory.len(), 1, "person {person}");
        // REST's live state goes the same way: either process answers with the owner's state.
        let mut live = Vec::new();
        for node in ["node-a", "node-b"] {
            let url = format!("{}/v1/persons/{person}/live", rest[node]);
            let response = crate::helpers::get(&url).await.expect("live answered");
            assert_eq!(response.status().as_u16(), 200, "{url}");
            live.push(response.json::<serde_json::Value>().await.expect("JSON"));
        }
        assert_eq!(live[0], live[1], "person {person}: both REST answers agree");
        assert_eq!(
            live[0]["owner"].as_str(),
            Some(owner.as_str()),
            "{}",
            live[0]
        );
        assert_eq!(live[0]["partition"], answers[0].partition, "{}", live[0]);
        assert_eq!(
            live[0]["trajectory"].as_array().map(Vec::len),
            Some(1),
            "{}",
            live[0]
        );
        assert_eq!(live[0]["last_location"]["lat"], LAT, "{}", live[0]);
        person_owners.insert(owner.clone());
    }
    assert_eq!(
        person_owners.len(),
        2,
        "persons on both processes: {person_owners:?}"
    );

    // Zones likewise.
    let mut zone_owners = BTreeSet::new();
    for &zone in &zones {
        let mut answers = Vec::new();
        for node in ["node-a", "node-b"] {
            let admin_client = AdminClient::new(clients[node].clone());
            let mut state = zone_eventually(&admin_client, zone, Duration::from_secs(90)).await;
            // The watermark moves with heartbeats between the two calls.
            state.watermark = None;
            answers.push(state);
        }
        let owner = &split[&("zones".to_owned(), zone_partition(zone, 2) as i32)];
        assert_eq!(&answers[0].owner, owner, "zone {zone:x}");
        assert_eq!(
            answers[0], answers[1],
            "zone {zone:x}: both processes agree"
        );
        assert!(!answers[0].points.is_empty(), "zone {zone:x}");
        zone_owners.insert(owner.clone());
    }
    assert_eq!(
        zone_owners.len(),
        2,
        "zones on both processes: {zone_owners:?}"
    );

    // ClusterStatus from either process shows both, with every partition's offsets.
    for node in ["node-a", "node-b"] {
        let status = AdminClient::new(clients[node].clone())
            .cluster_status(admin(ClusterStatusRequest {}))
            .await
            .expect("status")
            .into_inner();
        assert_eq!(status.node, node);
        let reachable: BTreeSet<&str> = status
            .processes
            .iter()
            .filter(|p| p.reachable)
            .map(|p| p.node.as_str())
            .collect();
        assert_eq!(
            reachable,
            BTreeSet::from(["node-a", "node-b"]),
            "{status:#?}"
        );
        assert_eq!(status.partitions.len(), 4);
        for p in &status.partitions {
            assert_eq!(p.owner, split[&(p.stage.clone(), p.partition)], "{p:?}");
            assert!(p.processed_offset >= 0 && p.end_offset >= 0, "{p:?}");
        }

        // ListZones from either process lists every zone, each partition from its owner.
        let listed = AdminClient::new(clients[node].clone())
            .list_zones(admin(ListZonesRequest { partition: None }))
            .await
            .expect("zones")
            .into_inner();
        let mut listed_zones = BTreeSet::new();
        for p in &listed.partitions {
            assert!(p.error.is_empty(), "{p:?}");
            assert_eq!(p.owner, split[&("zones".to_owned(), p.partition)], "{p:?}");
            listed_zones.extend(
                p.zones
                    .iter()
                    .map(|z| u64::from_str_radix(&z.zone, 16).expect("hex")),
            );
        }
        assert_eq!(listed_zones, zones, "from {node}");

        // ListPoints from either process gathers every person's point from both owners, and
        // REST's /v1/points (the console's map) gives the same; a box keeps to its inside.
        let live = AdminClient::new(clients[node].clone())
            .list_points(admin(ListPointsRequest::default()))
            .await
            .expect("points")
            .into_inner();
        assert!(live.unanswered.is_empty() && !live.truncated, "{live:?}");
        let mut seen: Vec<i64> = live.points.iter().map(|p| p.person_id).collect();
        seen.sort_unstable();
        assert_eq!(seen, persons, "from {node}: {live:?}");
        let asked: BTreeSet<u64> = live
            .zones
            .iter()
            .map(|z| u64::from_str_radix(&z.zone, 16).expect("hex"))
            .collect();
        assert_eq!(asked, zones, "from {node}");
        for z in &live.zones {
            assert_eq!(z.owner, split[&("zones".to_owned(), z.partition)], "{z:?}");
        }
        let url = format!("{}/v1/points", rest[node]);
        let body: serde_json::Value = crate::helpers::get(&url)
            .await
            .expect("points answered")
            .json()
            .await
            .expect("JSON");
        let mut over_rest: Vec<i64> = body["points"]
            .as_array()
            .expect("points")
            .iter()
            .map(|p| p["person_id"].as_i64().expect("person_id"))
            .collect();
        over_rest.sort_unstable();
        assert_eq!(over_rest, persons, "{body}");
        // Persons 3 and 4 only: each stands 0.0075° east of the previous one.
        let boxed = AdminClient::new(clients[node].clone())
            .list_points(admin(ListPointsRequest {
                min_lat: LAT - 0.001,
                min_lon: LON + 0.0075 * 2.5,
                max_lat: LAT + 0.001,
                max_lon: LON + 0.0075 * 4.5,
                limit: 0,
            }))
            .await
            .expect("points in a box")
            .into_inner();
        let mut inside: Vec<i64> = boxed.points.iter().map(|p| p.person_id).collect();
        inside.sort_unstable();
        assert_eq!(inside, vec![3, 4], "{boxed:?}");

        // TriggerSnapshot of each zone partition runs on its owner.
        for partition in 0..2 {
            let snapshot = AdminClient::new(clients[node].clone())
                .trigger_snapshot(admin(TriggerSnapshotRequest {
                    stage: "zones".to_owned(),
                    partition,
                }))
                .await
                .expect("snapshot")
                .into_inner();
            assert_eq!(snapshot.owner, split[&("zones".to_owned(), partition)]);
            assert!(
                snapshot.snapshot_offset.is_some_and(|o| o >= 1),
                "{snapshot:?}"
            );
        }
    }

    // Erasure reaches the other process: a person whose actor the other one holds, erased
    // through REST on one and through gRPC on the other; both processes forget it, each
    // storing its partitions' snapshots again.
    let held_by = |p: i64| {
        split[&(
            "persons".to_owned(),
            udaconnect_actors::zones::person_partition(p, 2) as i32,
        )]
            .clone()
    };
    let on_b = *persons
        .iter()
        .find(|&&p| held_by(p) == "node-b")
        .expect("one on node-b");
    let on_a = *persons
        .iter()
        .find(|&&p| held_by(p) == "node-a")
        .expect("one on node-a");
    let response = crate::helpers::client()
        .delete(format!("{}/v1/persons/{on_b}", rest["node-a"]))
        .send()
        .await
        .expect("DELETE sent");
    assert_eq!(response.status().as_u16(), 200);
    let erased: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(
        (
            erased["processes"].as_u64(),
            erased["partitions"].as_u64(),
            erased["person_deleted"].as_bool()
        ),
        (Some(2), Some(4), Some(true)),
        "{erased}"
    );
    let answer = AdminClient::new(clients["node-b"].clone())
        .erase_person(admin(udaconnect::proto::v1::ErasePersonRequest {
            person_id: on_a,
        }))
        .await
        .expect("erased")
        .into_inner();
    assert_eq!((answer.processes, answer.partitions), (2, 4), "{answer:?}");
    let left: Vec<i64> = persons
        .iter()
        .copied()
        .filter(|p| *p != on_a && *p != on_b)
        .collect();
    for node in ["node-a", "node-b"] {
        for gone in [on_a, on_b] {
            let status = AdminClient::new(clients[node].clone())
                .get_person(admin(GetPersonRequest { person_id: gone }))
                .await
                .expect_err("erased");
            assert_eq!(status.code(), Code::NotFound, "{node}, person {gone}");
        }
        let live = AdminClient::new(clients[node].clone())
            .list_points(admin(ListPointsRequest::default()))
            .await
            .expect("points")
            .into_inner();
        let mut seen: Vec<i64> = live.points.iter().map(|p| p.person_id).collect();
        seen.sort_unstable();
        assert_eq!(seen, left, "from {node}: {live:?}");
    }
    for gone in [on_a, on_b] {
        let rows = client
            .query_one(
                "SELECT (SELECT count(*) FROM person WHERE id = $1)
                      + (SELECT count(*) FROM location WHERE person_id = $1)",
                &[&gone],
            )
            .await
            .expect("count")
            .get::<_, i64>(0);
        assert_eq!(rows, 0, "person {gone}");
    }
    db.drop_db().await;
}

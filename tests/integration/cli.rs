//! The `udaconnect` binary as a user runs it.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::helpers::{eventually, free_port, kafka_brokers, poc_seed_dir, wait_for_status, TestDb};

fn udaconnect(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_udaconnect"))
        .args(args)
        .env("UDACONNECT_DATABASE_URL", &db.url)
        .env("UDACONNECT_STARTUP_WAIT_S", "5")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run udaconnect")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).trim().to_owned()
}

#[tokio::test]
async fn migrate_then_seed_poc_twice() {
    let db = TestDb::new().await;

    let migrated = udaconnect(&db, &["migrate"]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    let versions: Vec<i32> = udaconnect::store::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    let newest = versions.last().expect("migrations");
    assert_eq!(
        stdout(&migrated),
        format!("schema at version {newest} (applied now: {versions:?})")
    );
    let again = udaconnect(&db, &["migrate"]);
    assert_eq!(
        stdout(&again),
        format!("schema at version {newest} (applied now: none)")
    );

    let dir = poc_seed_dir();
    let dir = dir.to_str().expect("utf-8 path");
    let seeded = udaconnect(&db, &["seed", "poc", dir]);
    assert!(seeded.status.success(), "{}", stderr(&seeded));
    assert_eq!(
        stdout(&seeded),
        "persons: 5 read, 5 inserted; locations: 39 read, 39 inserted"
    );
    let reseeded = udaconnect(&db, &["seed", "poc", dir]);
    assert_eq!(
        stdout(&reseeded),
        "persons: 5 read, 0 inserted; locations: 39 read, 0 inserted"
    );

    db.drop_db().await;
}

#[tokio::test]
async fn user_mistakes_get_clear_errors_and_a_failing_exit_code() {
    let db = TestDb::new().await;

    let no_dir = udaconnect(&db, &["seed", "poc", "/nonexistent/seed"]);
    assert_eq!(no_dir.status.code(), Some(1));
    assert!(
        stderr(&no_dir).contains("cannot read /nonexistent/seed/persons.csv"),
        "{}",
        stderr(&no_dir)
    );

    let bad_env = Command::new(env!("CARGO_BIN_EXE_udaconnect"))
        .arg("migrate")
        .env("UDACONNECT_DATABASE_URL", &db.url)
        .env("UDACONNECT_RADIUS_M", "-1")
        .output()
        .expect("run");
    assert_eq!(bad_env.status.code(), Some(1));
    assert!(
        stderr(&bad_env).contains("radius_m"),
        "{}",
        stderr(&bad_env)
    );

    let missing_config = udaconnect(
        &db,
        &["--config", "/nonexistent/udaconnect.toml", "migrate"],
    );
    assert_eq!(missing_config.status.code(), Some(1));
    assert!(
        stderr(&missing_config).contains("/nonexistent/udaconnect.toml"),
        "{}",
        stderr(&missing_config)
    );

    db.drop_db().await;
}

/// `udaconnect token` prints a JWT the service accepts, with the role and person asked for;
/// mistakes (an attendee without a person, a person for a gateway, a bad `--ttl`, no key) are
/// errors naming what is wrong. `serve` without any key refuses to start, saying which to set.
#[tokio::test]
async fn token_mints_what_the_service_accepts_and_serve_needs_a_key() {
    let db = TestDb::new().await;
    let with_key = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_udaconnect"))
            .args(args)
            .env("UDACONNECT_JWT_HS256_KEY", crate::helpers::TEST_JWT_KEY)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run udaconnect")
    };
    let config = udaconnect::Config {
        jwt_hs256_key: Some(udaconnect::config::Secret::new(
            crate::helpers::TEST_JWT_KEY,
        )),
        ..udaconnect::Config::default()
    };
    let auth = udaconnect::auth::Authenticator::from_config(&config).expect("authenticator");
    let minted = with_key(&[
        "token", "--role", "attendee", "--person", "1001", "--ttl", "30m",
    ]);
    assert!(minted.status.success(), "{}", stderr(&minted));
    let principal = auth.authenticate(Some(&stdout(&minted))).expect("accepted");
    assert_eq!(
        (principal.role, principal.person),
        (udaconnect::auth::Role::Attendee, Some(1001))
    );
    let organizer = with_key(&["token", "--role", "organizer"]);
    let principal = auth
        .authenticate(Some(&stdout(&organizer)))
        .expect("accepted");
    assert_eq!(principal, udaconnect::auth::Principal::ORGANIZER);

    for (args, says) in [
        (&["token", "--role", "attendee"][..], "--person"),
        (
            &["token", "--role", "gateway", "--person", "5"][..],
            "--person",
        ),
        (
            &["token", "--role", "organizer", "--ttl", "soon"][..],
            "--ttl",
        ),
        (
            &["token", "--role", "organizer", "--ttl", "400days"][..],
            "366days",
        ),
        (&["token", "--role", "janitor"][..], "--role"),
    ] {
        let out = with_key(args);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    let no_key = udaconnect(&db, &["token", "--role", "organizer"]);
    assert_eq!(no_key.status.code(), Some(1));
    assert!(
        stderr(&no_key).contains("jwt_hs256_key"),
        "{}",
        stderr(&no_key)
    );
    let short_key = Command::new(env!("CARGO_BIN_EXE_udaconnect"))
        .args(["token", "--role", "organizer"])
        .env("UDACONNECT_JWT_HS256_KEY", "too-short")
        .output()
        .expect("run");
    assert_eq!(short_key.status.code(), Some(1));
    assert!(
        stderr(&short_key).contains("jwt_hs256_key must be at least 32 bytes"),
        "{}",
        stderr(&short_key)
    );

    let serve = udaconnect(&db, &["serve"]);
    assert_eq!(serve.status.code(), Some(1));
    assert!(
        stderr(&serve).contains("auth = \"jwt\" needs a key"),
        "{}",
        stderr(&serve)
    );
    db.drop_db().await;
}

#[tokio::test]
async fn serve_shuts_down_cleanly_on_sigterm_and_sigint() {
    for signal in ["TERM", "INT"] {
        let db = TestDb::new().await;
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_udaconnect"))
            .arg("serve")
            .env("UDACONNECT_DATABASE_URL", &db.url)
            .env("UDACONNECT_KAFKA_BROKERS", kafka_brokers())
            .env(
                "UDACONNECT_TOPIC_PREFIX",
                format!("test-{}", uuid::Uuid::new_v4().simple()),
            )
            .env("UDACONNECT_REST_ADDR", format!("127.0.0.1:{port}"))
            .env("UDACONNECT_GRPC_ADDR", "127.0.0.1:0")
            .env("UDACONNECT_JWT_HS256_KEY", crate::helpers::TEST_JWT_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start udaconnect serve");
        wait_for_status(
            &format!("http://127.0.0.1:{port}/healthz"),
            200,
            Duration::from_secs(30),
        )
        .await;

        let sent = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let status = eventually(
            &format!("serve exits after SIG{signal}"),
            Duration::from_secs(15),
            || {
                let exited = child.try_wait().expect("wait");
                async move { exited.ok_or_else(|| "still running".to_owned()) }
            },
        )
        .await;
        let mut log = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut log)
            .expect("log");
        assert!(status.success(), "SIG{signal}: exit {status}: {log}");
        let announced = if signal == "TERM" {
            "sigterm received"
        } else {
            "ctrl-c received"
        };
        assert!(log.contains(announced), "SIG{signal}: {log}");
        assert!(log.contains("shut down"), "SIG{signal}: {log}");
        db.drop_db().await;
    }
}

//! Throw-away state for a bench or rehearsal run: a fresh database and topic prefix per phase,
//! removed at the end, a simulated conference generated before any clock starts, and what a
//! run stored, read back.

use std::time::Duration;

use anyhow::Context;
use tokio_postgres::NoTls;
use udaconnect::config::redact_url;
use udaconnect::kafka::client_config;
use udaconnect::Config;
use udaconnect_actors::domain::{Episode, LocationEvent};
use uuid::Uuid;

use crate::sim::{ConferenceConfig, Simulation};
use crate::with_database;

/// Databases and topics this run created, removed at the end unless `--keep`.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Database names.
    pub databases: Vec<String>,
    /// Topic prefixes (each with the five topics of [`udaconnect::config::Topics`]).
    pub prefixes: Vec<String>,
}

/// A connection to the database at `url` (the benches' maintenance database or one of theirs);
/// errors name the server (password redacted).
pub async fn pg_client(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("postgres at {} is unreachable", redact_url(url)))?;
    tokio::spawn(connection);
    Ok(client)
}

/// A fresh database and topic prefix for one phase, and the configuration using them.
pub async fn fresh(
    base: &Config,
    admin_url: &str,
    leftovers: &mut Leftovers,
) -> anyhow::Result<Config> {
    let id = Uuid::new_v4().simple().to_string();
    let name = format!("udaconnect_bench_{id}");
    pg_client(admin_url)
        .await?
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .with_context(|| format!("failed to create database {name}"))?;
    leftovers.databases.push(name.clone());
    let mut config = base.clone();
    config.database_url = udaconnect::config::DatabaseUrl::new(with_database(admin_url, &name)?);
    config.topic_prefix = format!("bench-{id}");
    leftovers.prefixes.push(config.topic_prefix.clone());
    Ok(config)
}

/// Drops the databases and deletes the topics of `leftovers`; what cannot be removed is said on
/// stderr, never an error (a bench's figures matter more than its clean-up).
pub async fn cleanup(base: &Config, admin_url: &str, leftovers: &Leftovers) {
    if let Ok(admin) = pg_client(admin_url).await {
        for db in &leftovers.databases {
            if let Err(e) = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await
            {
                eprintln!("cannot drop database {db}: {e}");
            }
        }
    }
    let admin: Result<rdkafka::admin::AdminClient<_>, _> = client_config(base).create();
    if let Ok(admin) = admin {
        let mut names = Vec::new();
        for prefix in &leftovers.prefixes {
            let t = udaconnect::config::Topics::new(prefix);
            names.extend([
                t.locations,
                t.person_updates,
                t.connections,
                t.locations_dlq,
                t.person_updates_dlq,
            ]);
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let options =
            rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        // Some are absent (the bare topics have no dead-letter topics); that is fine.
        let _ = admin.delete_topics(&names, &options).await;
    }
}

/// Generates every event of `config` (before any clock starts).
pub fn generate(config: ConferenceConfig) -> anyhow::Result<(Simulation, Vec<LocationEvent>)> {
    let sim = Simulation::new(config)
        .map_err(|e| anyhow::anyhow!("invalid conference: {e} ({})", e.field))?;
    let mut events = Vec::with_capacity(sim.expected_events() as usize);
    let mut it = sim.events();
    while let Some(batch) = it.next_batch() {
        events.extend_from_slice(batch);
    }
    Ok((sim, events))
}

/// The `connection` rows of a database as episodes, ordered as the reference engine's
/// (person, peer, start).
pub async fn stored_episodes(client: &tokio_postgres::Client) -> anyhow::Result<Vec<Episode>> {
    Ok(client
        .query(
            "SELECT person_id, peer_id, started_at, last_seen_at, ended_at, colocations,
                    min_distance_m, lat, lon
             FROM connection ORDER BY person_id, peer_id, started_at",
            &[],
        )
        .await?
        .iter()
        .map(|r| Episode {
            person: r.get(0),
            peer: r.get(1),
            started_at: udaconnect::store::micros(r.get(2)),
            last_seen_at: udaconnect::store::micros(r.get(3)),
            ended_at: r
                .get::<_, Option<chrono::DateTime<chrono::Utc>>>(4)
                .map(udaconnect::store::micros),
            colocations: r.get::<_, i32>(5) as u32,
            min_distance_m: r.get(6),
            lat: r.get(7),
            lon: r.get(8),
        })
        .collect())
}

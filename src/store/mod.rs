//! PostgreSQL + PostGIS persistence: the connection pool, migrations, the POC seed loader,
//! the queries of the front ends (`queries`), and the pipeline's effects, one module per
//! table family: `locations` (zone stage, late path), `connections` (person stage),
//! `snapshots` and `owners` (partitions); `retention` deletes reports past their retention,
//! `erasure` a person's rows.

pub mod connections;
pub mod erasure;
pub mod locations;
mod migrate;
pub mod owners;
pub mod queries;
pub mod retention;
mod seed;
pub mod snapshots;

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
pub use migrate::{migrate, MigrationReport, MIGRATIONS};
pub use seed::{seed_poc, SeedReport};
use tokio_postgres::NoTls;
use udaconnect_actors::domain::Micros;

use crate::config::Config;

/// A timestamp in microseconds since the epoch as PostgreSQL `timestamptz`.
pub fn timestamp(micros: Micros) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Microseconds since the epoch of a `timestamptz`.
pub fn micros(t: DateTime<Utc>) -> Micros {
    t.timestamp_micros()
}

/// What can go wrong talking to PostgreSQL or loading data into it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL does not parse.
    #[error("invalid database_url {url}: {source}")]
    BadUrl {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No connection could be had from the pool (or the pool could not be built).
    #[error("postgres unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A statement failed.
    #[error("postgres error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// An applied migration no longer matches the one compiled in.
    #[error("migration {version} ({name}) was changed after it was applied (checksum {applied} in the database, {compiled} compiled in)")]
    MigrationChanged {
        version: i32,
        name: String,
        applied: String,
        compiled: String,
    },
    /// The database has migrations this binary does not know (a newer binary ran).
    #[error("the database is at schema version {database}, newer than this binary's {binary}")]
    SchemaTooNew { database: i32, binary: i32 },
    /// A seed file is missing, unreadable or has a bad row.
    #[error("{0}")]
    Seed(String),
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Postgres(e),
            other => StoreError::Unavailable(Box::new(other)),
        }
    }
}

/// Builds the connection pool; connections are opened lazily, so this succeeds while the
/// database is down, and every checkout waits at most `connect_timeout`.
pub fn pool(config: &Config, connect_timeout: Duration) -> Result<Pool, StoreError> {
    let mut pg: tokio_postgres::Config =
        config
            .database_url
            .expose()
            .parse()
            .map_err(|source: tokio_postgres::Error| StoreError::BadUrl {
                url: config.database_url.redacted(),
                source,
            })?;
    pg.connect_timeout(connect_timeout);
    pg.application_name("udaconnect");
    // PostGIS notices (one per row for the POC-order points in the geography index) would
    // flood the log and the wire.
    pg.options("-c client_min_messages=warning");
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.database_pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(connect_timeout))
        .create_timeout(Some(connect_timeout))
        .recycle_timeout(Some(connect_timeout))
        .build()
        .map_err(|e| StoreError::Unavailable(Box::new(e)))
}

/// Answers whether PostgreSQL takes a query right now.
pub async fn ping(pool: &Pool) -> Result<(), StoreError> {
    let client = pool.get().await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}

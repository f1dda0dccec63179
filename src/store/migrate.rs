//! Versioned schema migrations, applied at start-up, idempotent and safe to run concurrently.

use tokio_postgres::Client;
use tracing::info;

use super::StoreError;

/// One schema change, compiled into the binary.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Strictly increasing version.
    pub version: i32,
    /// Short name, for logs.
    pub name: &'static str,
    /// The SQL, run in one transaction.
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "snapshot topic id",
        sql: include_str!("migrations/0002_snapshot_topic_id.sql"),
    },
    Migration {
        version: 3,
        name: "connection writes",
        sql: include_str!("migrations/0003_connection_writes.sql"),
    },
    Migration {
        version: 4,
        name: "late path",
        sql: include_str!("migrations/0004_late_path.sql"),
    },
    Migration {
        version: 5,
        name: "open connections",
        sql: include_str!("migrations/0005_open_connections.sql"),
    },
    Migration {
        version: 6,
        name: "retention",
        sql: include_str!("migrations/0006_retention.sql"),
    },
    Migration {
        version: 7,
        name: "erasure",
        sql: include_str!("migrations/0007_erasure.sql"),
    },
    Migration {
        version: 8,
        name: "erased ids stay erased",
        sql: include_str!("migrations/0008_erased_ids_stay_erased.sql"),
    },
];

/// Arbitrary but fixed key of the advisory lock that serializes concurrent migrators.
const MIGRATION_LOCK_KEY: i64 = 0x7564_6163_6f6e_6e31;

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this run.
    pub applied: Vec<i32>,
    /// Schema version after the run.
    pub version: i32,
}

/// Brings the database to the newest schema; a no-op when it is there already.
pub async fn migrate(client: &mut Client) -> Result<MigrationReport, StoreError> {
    // Two processes starting at once: the second waits here, then finds nothing to do.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let result = migrate_locked(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result?;
    unlocked?;
    Ok(report)
}

async fn migrate_locked(client: &mut Client) -> Result<MigrationReport, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 checksum   text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
    let rows = client
        .query(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    let applied: Vec<(i32, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();

    let newest = MIGRATIONS.last().map_or(0, |m| m.version);
    if let Some((version, _, _)) = applied.iter().find(|(v, _, _)| *v > newest) {
        return Err(StoreError::SchemaTooNew {
            database: *version,
            binary: newest,
        });
    }

    let mut report = MigrationReport {
        applied: Vec::new(),
        version: applied.last().map_or(0, |a| a.0),
    };
    for migration in MIGRATIONS {
        let compiled = checksum(migration.sql);
        if let Some((_, name, sum)) = applied.iter().find(|(v, _, _)| *v == migration.version) {
            if *sum != compiled {
                return Err(StoreError::MigrationChanged {
                    version: migration.version,
                    name: name.clone(),
                    applied: sum.clone(),
                    compiled,
                });
            }
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(migration.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &compiled],
        )
        .await?;
        tx.commit().await?;
        info!(
            version = migration.version,
            name = migration.name,
            "migration applied"
        );
        report.applied.push(migration.version);
        report.version = migration.version;
    }
    Ok(report)
}

/// FNV-1a, 64 bits, as hex: stable across Rust releases, unlike `DefaultHasher`.
fn checksum(sql: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sql.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_strictly_increase() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version, "{pair:?}");
        }
        assert_eq!(MIGRATIONS.first().map(|m| m.version), Some(1));
    }

    #[test]
    fn checksum_is_fnv1a() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(checksum(""), "cbf29ce484222325");
        assert_eq!(checksum("a"), "af63dc4c8601ec8c");
        assert_ne!(checksum("SELECT 1"), checksum("SELECT 2"));
    }
}

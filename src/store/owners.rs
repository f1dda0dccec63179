//! `shard_owner`: which process owns which partition of a stage, as the cluster sees it
//! (docs/design.md §5).

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use udaconnect_actors::actors::ports::{PortError, Stage};

use crate::store::StoreError;

/// Who owns a partition of a stage, as `shard_owner` records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShardOwner {
    pub stage: String,
    pub topic: String,
    pub partition: i32,
    /// The owning process's name (the pod name on K3s).
    pub owner: String,
    /// Where the owner answers internal requests.
    pub owner_addr: String,
    /// Since when it owns the partition (RFC 3339).
    pub since: DateTime<Utc>,
    /// The last time it confirmed the ownership (each snapshot).
    pub heartbeat_at: DateTime<Utc>,
    /// The partition's stored snapshot: its next offset (what the group committed at most)
    /// and its age in seconds; `None` before the first snapshot.
    pub snapshot_offset: Option<i64>,
    pub snapshot_age_s: Option<f64>,
}

/// `shard_owner` rows written by one process (docs/design.md §5): it claims a partition when it is
/// assigned, confirms it with each snapshot, and releases it on revocation.
#[derive(Clone)]
pub struct PgOwners {
    pool: Pool,
    topic: String,
    owner: String,
    owner_addr: String,
}

impl PgOwners {
    pub fn new(pool: Pool, topic: impl Into<String>, owner: &str, owner_addr: &str) -> Self {
        Self {
            pool,
            topic: topic.into(),
            owner: owner.to_owned(),
            owner_addr: owner_addr.to_owned(),
        }
    }

    /// Records this process as the partition's owner (replacing a previous owner's row).
    pub async fn claim(&self, stage: Stage, partition: u32) -> Result<(), PortError> {
        let client = self.pool.get().await.map_err(PortError::of)?;
        client
            .execute(
                "INSERT INTO shard_owner (stage, topic, partition, owner, owner_addr)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (stage, topic, partition) DO UPDATE SET
                     owner = EXCLUDED.owner, owner_addr = EXCLUDED.owner_addr,
                     since = now(), heartbeat_at = now()",
                &[
                    &stage.as_str(),
                    &self.topic,
                    &(partition as i32),
                    &self.owner,
                    &self.owner_addr,
                ],
            )
            .await
            .map_err(PortError::of)?;
        Ok(())
    }

    /// Confirms the ownership (a no-op when another process took the row over).
    pub async fn heartbeat(&self, stage: Stage, partition: u32) -> Result<(), PortError> {
        self.update(
            "UPDATE shard_owner SET heartbeat_at = now()
             WHERE stage = $1 AND topic = $2 AND partition = $3 AND owner = $4",
            stage,
            partition,
        )
        .await
    }

    /// Removes the row, if it is still this process's.
    pub async fn release(&self, stage: Stage, partition: u32) -> Result<(), PortError> {
        self.update(
            "DELETE FROM shard_owner
             WHERE stage = $1 AND topic = $2 AND partition = $3 AND owner = $4",
            stage,
            partition,
        )
        .await
    }

    async fn update(&self, sql: &str, stage: Stage, partition: u32) -> Result<(), PortError> {
        let client = self.pool.get().await.map_err(PortError::of)?;
        client
            .execute(
                sql,
                &[
                    &stage.as_str(),
                    &self.topic,
                    &(partition as i32),
                    &self.owner,
                ],
            )
            .await
            .map_err(PortError::of)?;
        Ok(())
    }
}

/// Every partition of `topics` with an owner or a snapshot, with both: the cluster's view.
pub async fn shard_owners(pool: &Pool, topics: &[&str]) -> Result<Vec<ShardOwner>, StoreError> {
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT o.stage, o.topic, o.partition, o.owner, o.owner_addr, o.since,
                    o.heartbeat_at, s.next_offset,
                    extract(epoch FROM now() - s.taken_at)::float8
             FROM shard_owner o
             LEFT JOIN shard_snapshot s USING (stage, topic, partition)
             WHERE o.topic = ANY($1)
             ORDER BY o.stage DESC, o.partition",
            &[&topics],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ShardOwner {
            stage: r.get(0),
            topic: r.get(1),
            partition: r.get(2),
            owner: r.get(3),
            owner_addr: r.get(4),
            since: r.get(5),
            heartbeat_at: r.get(6),
            snapshot_offset: r.get(7),
            snapshot_age_s: r.get(8),
        })
        .collect())
}

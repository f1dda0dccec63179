//! `shard_snapshot` and `shard_snapshot_part`: the stages' partition snapshots
//! (docs/design.md §5).

use deadpool_postgres::Pool;
use udaconnect_actors::actors::ports::{PortError, SnapshotBlob, Stage};

/// `shard_snapshot` for one topic: snapshots of a stage's partitions.
#[derive(Clone)]
pub struct PgSnapshots {
    pool: Pool,
    topic: String,
}

impl PgSnapshots {
    /// Snapshots of partitions of `topic`.
    pub fn new(pool: Pool, topic: impl Into<String>) -> Self {
        Self {
            pool,
            topic: topic.into(),
        }
    }

    /// Stores a partition's snapshot, taken on the topic incarnation `topic_id` (Kafka's topic
    /// id: the offset means nothing on another one), in one transaction: the partition-wide
    /// state replaces the stored one; the parts replace theirs (all of them when the snapshot
    /// is complete, only the changed ones otherwise).
    pub async fn store(
        &self,
        stage: Stage,
        partition: u32,
        snapshot: &SnapshotBlob,
        topic_id: &str,
    ) -> Result<(), PortError> {
        let mut client = self.pool.get().await.map_err(PortError::of)?;
        let tx = client.transaction().await.map_err(PortError::of)?;
        let (stage, partition) = (stage.as_str(), partition as i32);
        tx.execute(
            "INSERT INTO shard_snapshot
                 (stage, topic, partition, next_offset, format, state, topic_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (stage, topic, partition) DO UPDATE SET
                 next_offset = EXCLUDED.next_offset, format = EXCLUDED.format,
                 state = EXCLUDED.state, topic_id = EXCLUDED.topic_id, taken_at = now()",
            &[
                &stage,
                &self.topic,
                &partition,
                &(snapshot.next_offset as i64),
                &(snapshot.format as i32),
                &snapshot.bytes,
                &topic_id,
            ],
        )
        .await
        .map_err(PortError::of)?;
        let (mut keys, mut states, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        for (key, state) in &snapshot.parts {
            match state {
                Some(state) => {
                    keys.push(*key);
                    states.push(state.as_slice());
                }
                None => removed.push(*key),
            }
        }
        if snapshot.complete {
            tx.execute(
                "DELETE FROM shard_snapshot_part
                 WHERE stage = $1 AND topic = $2 AND partition = $3 AND key <> ALL($4)",
                &[&stage, &self.topic, &partition, &keys],
            )
            .await
            .map_err(PortError::of)?;
        } else if !removed.is_empty() {
            tx.execute(
                "DELETE FROM shard_snapshot_part
                 WHERE stage = $1 AND topic = $2 AND partition = $3 AND key = ANY($4)",
                &[&stage, &self.topic, &partition, &removed],
            )
            .await
            .map_err(PortError::of)?;
        }
        if !keys.is_empty() {
            tx.execute(
                "INSERT INTO shard_snapshot_part (stage, topic, partition, key, state)
                 SELECT $1, $2, $3, p.key, p.state FROM unnest($4::int8[], $5::bytea[]) AS p(key, state)
                 ON CONFLICT (stage, topic, partition, key) DO UPDATE SET state = EXCLUDED.state",
                &[&stage, &self.topic, &partition, &keys, &states],
            )
            .await
            .map_err(PortError::of)?;
        }
        tx.commit().await.map_err(PortError::of)?;
        Ok(())
    }

    /// A partition's snapshot, if one was stored (complete: with every part), with the topic
    /// id it was taken on (`None` for snapshots stored before topic ids were recorded).
    pub async fn load(
        &self,
        stage: Stage,
        partition: u32,
    ) -> Result<Option<(SnapshotBlob, Option<String>)>, PortError> {
        let mut client = self.pool.get().await.map_err(PortError::of)?;
        // The row and its parts as of one moment (a previous owner may still be storing).
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(PortError::of)?;
        let (stage, partition) = (stage.as_str(), partition as i32);
        let Some(row) = tx
            .query_opt(
                "SELECT next_offset, format, state, topic_id FROM shard_snapshot
                 WHERE stage = $1 AND topic = $2 AND partition = $3",
                &[&stage, &self.topic, &partition],
            )
            .await
            .map_err(PortError::of)?
        else {
            return Ok(None);
        };
        let parts = tx
            .query(
                "SELECT key, state FROM shard_snapshot_part
                 WHERE stage = $1 AND topic = $2 AND partition = $3 ORDER BY key",
                &[&stage, &self.topic, &partition],
            )
            .await
            .map_err(PortError::of)?
            .into_iter()
            .map(|r| (r.get::<_, i64>(0), Some(r.get::<_, Vec<u8>>(1))))
            .collect();
        tx.commit().await.map_err(PortError::of)?;
        Ok(Some((
            SnapshotBlob {
                next_offset: row.get::<_, i64>(0) as u64,
                format: row.get::<_, i32>(1) as u32,
                bytes: row.get(2),
                parts,
                complete: true,
            },
            row.get(3),
        )))
    }
}

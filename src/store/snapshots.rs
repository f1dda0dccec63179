//! `shard_snapshot` and `shard_snapshot_part`: the stages' partition snapshots
//! (docs/design.md §5).

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use udaconnect_actors::actors::ports::{PortError, SnapshotBlob, Stage};

/// How long an abandoned store waits for its cancelled statement before it cancels again.
const CANCEL_RETRY: Duration = Duration::from_millis(100);

/// How a [`PgSnapshots::store`] ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Committed: this snapshot is the partition's stored one.
    Stored,
    /// Given up before its commit: the partition's stored snapshot is the one before.
    Abandoned,
}

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
    ///
    /// When `abandon` is cancelled before the transaction commits (a release's budget ran
    /// out, docs/design.md §5), the statement running is cancelled (PostgreSQL's cancel
    /// request), the transaction is rolled back and [`Stored::Abandoned`] returned: the stored
    /// snapshot is then the previous one, whole, and nothing of this one. The decision is taken
    /// before `COMMIT` is sent, so the outcome is never in doubt. A connection a cancel request
    /// was sent on is closed, not returned to the pool: the request travels on its own socket
    /// and may arrive after the statement it was meant for, cancelling the next user's.
    /// Errors: the pool's or PostgreSQL's, as [`PortError`] (nothing stored either).
    pub async fn store(
        &self,
        stage: Stage,
        partition: u32,
        snapshot: &SnapshotBlob,
        topic_id: &str,
        abandon: &CancellationToken,
    ) -> Result<Stored, PortError> {
        let mut client = tokio::select! {
            biased;
            _ = abandon.cancelled() => return Ok(Stored::Abandoned),
            client = self.pool.get() => client.map_err(PortError::of)?,
        };
        let cancel = client.cancel_token();
        let tx = client.transaction().await.map_err(PortError::of)?;
        let mut cancelled = false;
        let written = {
            let mut writing = std::pin::pin!(self.write(&tx, stage, partition, snapshot, topic_id));
            tokio::select! {
                biased;
                written = &mut writing => Some(written),
                _ = abandon.cancelled() => {
                    // Cancel whatever statement runs until the writing gives up (a cancel
                    // request that arrives between two statements cancels nothing).
                    loop {
                        cancelled = true;
                        let _ = cancel.cancel_query(NoTls).await;
                        if tokio::time::timeout(CANCEL_RETRY, &mut writing).await.is_ok() {
                            break;
                        }
                    }
                    None
                }
            }
        };
        let outcome = match written {
            Some(Ok(())) if !abandon.is_cancelled() => {
                tx.commit().await.map_err(PortError::of)?;
                return Ok(Stored::Stored);
            }
            Some(Err(e)) if !abandon.is_cancelled() => {
                let _ = tx.rollback().await;
                Err(e)
            }
            _ => {
                // Nothing of this snapshot is visible to anyone (never committed); the
                // rollback frees its locks now rather than when the server notices the
                // connection closed.
                let _ = tx.rollback().await;
                Ok(Stored::Abandoned)
            }
        };
        if cancelled {
            drop(deadpool_postgres::Object::take(client));
        }
        outcome
    }

    /// The statements of [`PgSnapshots::store`], in its transaction.
    async fn write(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        stage: Stage,
        partition: u32,
        snapshot: &SnapshotBlob,
        topic_id: &str,
    ) -> Result<(), PortError> {
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

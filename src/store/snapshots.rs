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
    /// Refused: the partition's `shard_owner` row names another process (this one lost the
    /// partition while it was away, e.g. paused past its session): the stored snapshot is the
    /// new owner's, and stays.
    Superseded,
}

/// `shard_snapshot` for one topic: snapshots of a stage's partitions.
#[derive(Clone)]
pub struct PgSnapshots {
    pool: Pool,
    topic: String,
    /// The process storing, when its snapshots are fenced by `shard_owner`.
    owner: Option<String>,
}

impl PgSnapshots {
    /// Snapshots of partitions of `topic`.
    pub fn new(pool: Pool, topic: impl Into<String>) -> Self {
        Self {
            pool,
            topic: topic.into(),
            owner: None,
        }
    }

    /// The same, storing as the process `node`: a store is refused ([`Stored::Superseded`])
    /// while the partition's `shard_owner` row names another process, so that a process that
    /// lost a partition (paused, partitioned from the broker) cannot put an older state over
    /// its new owner's.
    pub fn owned_by(mut self, node: impl Into<String>) -> Self {
        self.owner = Some(node.into());
        self
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
            Some(Ok(false)) if !abandon.is_cancelled() => {
                let _ = tx.rollback().await;
                return Ok(Stored::Superseded);
            }
            Some(Ok(true)) if !abandon.is_cancelled() => {
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

    /// The statements of [`PgSnapshots::store`], in its transaction; `false` when the
    /// partition's owner row names another process than [`PgSnapshots::owned_by`]'s (nothing
    /// written then).
    async fn write(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        stage: Stage,
        partition: u32,
        snapshot: &SnapshotBlob,
        topic_id: &str,
    ) -> Result<bool, PortError> {
        let (stage, partition) = (stage.as_str(), partition as i32);
        // The owner row is locked (FOR SHARE) until the commit, so that a claim by another
        // process waits for this store, or this store sees the claim.
        let written = tx
            .execute(
                "INSERT INTO shard_snapshot
                     (stage, topic, partition, next_offset, format, state, topic_id)
                 SELECT $1, $2, $3, $4, $5, $6, $7
                 WHERE NOT EXISTS (
                     SELECT 1 FROM shard_owner o
                     WHERE o.stage = $1 AND o.topic = $2 AND o.partition = $3
                       AND $8::text IS NOT NULL AND o.owner <> $8::text
                     FOR SHARE)
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
                    &self.owner,
                ],
            )
            .await
            .map_err(PortError::of)?;
        if written == 0 {
            return Ok(false);
        }
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
        Ok(true)
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
